//! Command-line interface: parses arguments and hands off to the runtimes. The only place that
//! uses `anyhow`, so errors print with their whole chain.

use crate::formats::precomputed::WriteOptions;
use crate::ops::downsample::{Factor, Method};
use crate::runtime::local;
use crate::task::downsample::{Bounds, DownsampleOptions};
use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "cuboids",
    version,
    about = "GPU resolution pyramids of neuroscience volumes (WGSL/wgpu)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Show the GPU adapter cuboids would use and its limits.
    Info,
    /// Add downsampled mips to a precomputed volume (local directory or s3://bucket/prefix).
    Downsample {
        /// The precomputed volume: a directory holding `info`, or s3://bucket/prefix.
        location: String,
        /// Source mip to read.
        #[arg(long, default_value_t = 0)]
        mip: usize,
        /// Number of mips to compute from one read.
        #[arg(long, default_value_t = 1)]
        num_mips: u32,
        /// Downsampling factor: 2,2,1 (anisotropic) or 2,2,2 (isotropic).
        #[arg(long, default_value = "2,2,1", value_parser = parse_factor)]
        factor: Factor,
        /// Absolute voxel bounds at the source mip: x0,y0,z0,x1,y1,z1 (rounded out to whole chunks).
        #[arg(long, value_parser = parse_bounds)]
        bounds: Option<Bounds>,
        /// Read missing chunks as zeros instead of failing.
        #[arg(long)]
        fill_missing: bool,
        /// Pooling method; default: average for images, mode for segmentation.
        #[arg(long, value_enum)]
        method: Option<MethodArg>,
        /// gzip level of written chunks (0 = uncompressed).
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
        gzip_level: u32,
        /// Run the CPU reference implementation instead of the GPU.
        #[arg(long)]
        cpu: bool,
    },
    /// One step of the Boss resolution hierarchy (the DownsampleChannel activity) on the GPU:
    /// reads the job document, writes cuboids and index entries, prints the next document.
    BossDownsample {
        /// The DownsampleChannel input document (JSON).
        #[arg(long)]
        job: PathBuf,
        /// Run every remaining resolution in this process, reading each level from memory.
        #[arg(long)]
        all_levels: bool,
        /// Memory for cuboids kept between levels with --all-levels, in MiB.
        #[arg(long, default_value_t = 4096)]
        cache_mib: usize,
    },
    /// Make a small synthetic EM image and segmentation under DIR and downsample both.
    Demo {
        #[arg(long, default_value = "demo-data")]
        dir: PathBuf,
        /// Volume size x,y,z.
        #[arg(long, default_value = "512,512,64", value_parser = parse_vec3)]
        size: [usize; 3],
    },
    /// Measure end-to-end and kernel throughput (MVx/s) on a synthetic uint8 volume.
    Bench {
        #[arg(long, default_value = "1024,1024,128", value_parser = parse_vec3)]
        size: [usize; 3],
        #[arg(long, default_value_t = 4)]
        num_mips: u32,
        /// gzip level of input and output chunks (0 = uncompressed).
        #[arg(long, default_value_t = 6, value_parser = clap::value_parser!(u32).range(0..=9))]
        gzip_level: u32,
        /// Also time the CPU reference implementation.
        #[arg(long)]
        cpu: bool,
        /// Where to put the temporary volume (default: the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Keep the input volume (mip 0 only) at DIR/image for comparisons with other tools.
        #[arg(long, requires = "dir")]
        keep: bool,
        /// Largest GPU slab in MiB (default: 16 on lavapipe, else the binding limit up to 256).
        #[arg(long)]
        slab_mib: Option<u64>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum MethodArg {
    Average,
    Mode,
}

fn parse_list(s: &str, n: usize) -> Result<Vec<i64>, String> {
    let v: Result<Vec<i64>, _> = s.split(',').map(|p| p.trim().parse::<i64>()).collect();
    match v {
        Ok(v) if v.len() == n => Ok(v),
        _ => Err(format!("expected {n} comma-separated integers, got {s:?}")),
    }
}

fn parse_vec3(s: &str) -> Result<[usize; 3], String> {
    let v = parse_list(s, 3)?;
    if v.iter().any(|&x| x <= 0) {
        return Err(format!("sizes must be positive, got {s:?}"));
    }
    Ok([v[0] as usize, v[1] as usize, v[2] as usize])
}

fn parse_factor(s: &str) -> Result<Factor, String> {
    Factor::new(parse_vec3(s)?).map_err(|e| e.to_string())
}

fn parse_bounds(s: &str) -> Result<Bounds, String> {
    let v = parse_list(s, 6)?;
    let b = Bounds {
        start: [v[0], v[1], v[2]],
        stop: [v[3], v[4], v[5]],
    };
    if (0..3).any(|i| b.stop[i] <= b.start[i]) {
        return Err(format!(
            "bounds {s:?}: each stop must be greater than its start"
        ));
    }
    Ok(b)
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,cuboids=info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Info => {
            let ctx = local::gpu()?;
            println!("{}", ctx.describe());
            Ok(())
        }
        Command::Downsample {
            location,
            mip,
            num_mips,
            factor,
            bounds,
            fill_missing,
            method,
            gzip_level,
            cpu,
        } => {
            let dir = std::path::Path::new(location.trim_start_matches("file://"));
            if !location.starts_with("s3://") && !dir.is_dir() {
                bail!(
                    "{location} is not a directory holding a precomputed volume (nor an s3:// URL)"
                );
            }
            let opts = DownsampleOptions {
                mip,
                num_mips,
                factor,
                bounds,
                fill_missing,
                method: method.map(|m| match m {
                    MethodArg::Average => Method::Average,
                    MethodArg::Mode => Method::Mode,
                }),
                write: WriteOptions { gzip_level },
                ..Default::default()
            };
            runtime.block_on(local::downsample_location(&location, &opts, cpu))
        }
        Command::Demo { dir, size } => runtime.block_on(local::demo(&dir, size)),
        Command::BossDownsample {
            job,
            all_levels,
            cache_mib,
        } => runtime.block_on(local::boss_downsample(
            &job,
            all_levels.then_some(cache_mib << 20),
        )),
        Command::Bench {
            size,
            num_mips,
            gzip_level,
            cpu,
            dir,
            keep,
            slab_mib,
        } => runtime.block_on(local::bench(local::BenchOptions {
            size,
            num_mips,
            gzip_level,
            cpu,
            dir,
            keep,
            slab_bytes: slab_mib.map(|m| m << 20),
        })),
    }
}

//! `cuboids infer`: an image layer through the user's ONNX model into a float32 layer of the
//! model's output channels (affinities for `segment`), patch by patch on one global grid
//! ([`crate::infer::blend`]), so the bytes do not depend on how the output is tiled.
//!
//! The output is written in tiles of whole output chunks; each tile reads the input its
//! patches need (the tile grown by the patch grid's reach), runs them, blends and writes.
//! The layer's `info` is written last, and a failed or stopped run removes the chunks it
//! wrote, so no layer that claims to be complete is ever half-written.

use crate::dtype::DataType;
use crate::formats::precomputed::{
    chunk_grid, chunk_key, info::Encoding, info::Info, info::LayerType, Precomputed,
    PrecomputedError, WriteOptions,
};
use crate::geometry::{voxels, Box3, Vec3};
use crate::infer::blend::{patch_mask, BlendError, Blender, Bump, PatchGrid};
use crate::infer::region::{
    final_below, infer_row, input_box, normalised, rows_meeting, Executor, ImageWindow,
    RegionReport,
};
use crate::infer::{InferError, Model};
use crate::ops::nn::Tensor;
use crate::progress::Progress;
use crate::store::{Store, StoreError};
use crate::volume::Volume;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Error)]
pub enum InferTaskError {
    #[error(transparent)]
    Model(#[from] InferError),
    #[error("{location}: {source}")]
    Grid {
        location: String,
        #[source]
        source: BlendError,
    },
    #[error("{location}: {field}: {message}")]
    Input {
        location: String,
        field: &'static str,
        message: String,
    },
    #[error("the output {location} already has a layer (an info); infer writes a new one")]
    OutputExists { location: String },
    #[error(
        "the output {location} has an info unlike the one this plan writes: it is another layer"
    )]
    OtherLayer { location: String },
    #[error(
        "{location}: bounds {start:?}..{stop:?} (relative x,y,z) must lie in the volume {size:?} and start on whole output chunks of {chunk:?}"
    )]
    Bounds {
        location: String,
        start: Vec3,
        stop: Vec3,
        size: Vec3,
        chunk: Vec3,
    },
    #[error(
        "--task-mib {task_mib} is too small for this model and patch: a task holds {fixed_mib} MiB before any column, and a column of one chunk ({chunk:?}) {column_mib} MiB more; it needs --task-mib {needed_mib} at least"
    )]
    Budget {
        task_mib: usize,
        fixed_mib: usize,
        chunk: Vec3,
        column_mib: usize,
        needed_mib: usize,
    },
    #[error(transparent)]
    Precomputed(#[from] PrecomputedError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a background thread failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("stopped before it finished: the runner is shutting down")]
    Cancelled,
}

/// The effective GFLOP/s task times are reckoned at unless told: about what the native CPU
/// engine measured on 2 cores (61-88 on RSUNets, benches/RESULTS.md); a GPU's is higher, and
/// the WGSL executor on lavapipe's about 5.
pub const DEFAULT_GFLOPS: f64 = 60.0;

/// chunkflow's default output patch overlap (z, y, x = 4, 64, 64), as x, y, z.
pub const DEFAULT_OVERLAP: Vec3 = [64, 64, 4];

/// What `cuboids infer` takes, beyond the image, model and output.
#[derive(Clone, Debug)]
pub struct InferOptions {
    pub mip: usize,
    /// Input patch (x, y, z); default: the model's static input shape.
    pub patch: Option<Vec3>,
    /// Overlap of neighbouring output patches.
    pub overlap: Vec3,
    /// Output patch (x, y, z): default the model's output for the input patch; smaller crops
    /// the model's output around its centre (chunkflow's crop margin).
    pub output_patch: Option<Vec3>,
    pub bump: Bump,
    /// Output channels: the model's first N (default all).
    pub channels: Option<usize>,
    /// Host memory of the run (fixed part included), which sizes its columns.
    pub memory_bytes: usize,
    /// Columns of x, y output voxels (whole chunks) instead of the largest within
    /// `memory_bytes`.
    pub column: Option<[usize; 2]>,
    /// Only this output region (relative voxels, whole chunks; a task of a staged plan), and
    /// no info; `None`: the whole volume, then the info.
    pub bounds: Option<Box3>,
    /// Only the info, after every region's task (the last task of a staged plan).
    pub finalize: bool,
    /// A uint8 layer of round(255 · clamp(v, 0, 1)) instead of float32 (what `segment` reads
    /// as v / 255; a quarter of the bytes).
    pub quantize: bool,
    pub fill_missing: bool,
    pub write: WriteOptions,
    pub cancel: Option<CancellationToken>,
}

impl Default for InferOptions {
    fn default() -> Self {
        InferOptions {
            mip: 0,
            patch: None,
            overlap: DEFAULT_OVERLAP,
            output_patch: None,
            bump: Bump::Wu,
            channels: None,
            memory_bytes: crate::task::spec::DEFAULT_TASK_MIB << 20,
            column: None,
            bounds: None,
            finalize: false,
            quantize: false,
            fill_missing: false,
            write: WriteOptions::default(),
            cancel: None,
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct InferReport {
    pub voxels: u64,
    pub patches: usize,
    pub skipped: usize,
    pub columns: usize,
    /// The columns' x, y extent.
    pub column: [usize; 2],
    pub chunks_written: usize,
    pub channels: usize,
    pub engine: &'static str,
    /// What the net computed in (set by the caller, which chose the executor).
    pub precision: crate::infer::Precision,
    /// Floating-point operations of one patch's convolutions.
    pub patch_flops: u64,
    /// The most a column's image and output windows held at once (what streaming bounds).
    pub peak_column_bytes: usize,
    pub wall: Duration,
    pub compute: Duration,
}

impl InferReport {
    pub fn mvx_per_s(&self) -> f64 {
        self.voxels as f64 / 1e6 / self.wall.as_secs_f64().max(1e-9)
    }

    /// Effective GFLOP/s of the net: its convolutions' arithmetic over the time it ran.
    pub fn gflops(&self) -> f64 {
        self.patches as f64 * self.patch_flops as f64 / 1e9 / self.compute.as_secs_f64().max(1e-9)
    }

    pub fn describe(&self, what: &str) -> Vec<String> {
        vec![
            format!(
                "{what}: {:.2} MVx in {:.2} s = {:.2} MVx/s ({} engine, {})",
                self.voxels as f64 / 1e6,
                self.wall.as_secs_f64(),
                self.mvx_per_s(),
                self.engine,
                self.precision.name()
            ),
            format!(
                "  {} patches run, {} all-zero skipped, {} columns of {}x{}, {} chunks of {} channels written; the net ran {:.2} s ({:.1} GFLOP/s)",
                self.patches,
                self.skipped,
                self.columns,
                self.column[0],
                self.column[1],
                self.chunks_written,
                self.channels,
                self.compute.as_secs_f64(),
                self.gflops()
            ),
        ]
    }
}

/// How a model's output patch is cut to the output patch the grid blends.
struct Cropped<'a> {
    inner: &'a dyn Executor,
    /// Voxels dropped at the start of each axis (x, y, z) of the model's output.
    crop: Vec3,
    output: Vec3,
}

impl Executor for Cropped<'_> {
    fn run(&self, patch: Tensor) -> Result<Tensor, InferError> {
        let out = self.inner.run(patch)?;
        if self.crop == [0; 3] {
            return Ok(out);
        }
        let s = &out.shape;
        let (n, c, [ox, oy, oz]) = (s[0], s[1], self.output);
        let mut data = Vec::with_capacity(n * c * ox * oy * oz);
        // Batch and channel taken together: each (n, c) plane block is cropped alike.
        for ch in 0..n * c {
            for z in 0..oz {
                for y in 0..oy {
                    let at = ((ch * s[2] + z + self.crop[2]) * s[3] + y + self.crop[1]) * s[4]
                        + self.crop[0];
                    data.extend_from_slice(&out.data[at..at + ox]);
                }
            }
        }
        Ok(Tensor::new(vec![n, c, oz, oy, ox], data))
    }

    fn batch(&self, shape: &[usize]) -> usize {
        self.inner.batch(shape)
    }

    fn check(&self, shape: &[usize]) -> Result<(), InferError> {
        self.inner.check(shape)
    }

    fn engine(&self) -> &'static str {
        self.inner.engine()
    }
}

/// The grid and channels a model and image give, every mismatch named.
pub struct InferLayout {
    pub grid: PatchGrid,
    pub channels: usize,
    /// Where the output patch lies in the model's output (x, y, z).
    pub net_crop: Vec3,
}

/// Checks the image against the model and the options, and lays out the patch grid.
pub fn layout(
    model: &Model,
    image: &Precomputed,
    opts: &InferOptions,
) -> Result<InferLayout, InferTaskError> {
    let location = image.store.location();
    let input_error = |field, message: String| InferTaskError::Input {
        location: location.clone(),
        field,
        message,
    };
    if opts.mip >= image.info.scales.len() {
        return Err(input_error(
            "scales",
            format!("no mip {} (it has {})", opts.mip, image.info.scales.len()),
        ));
    }
    let scale = image.scale(opts.mip);
    let channels_in = image.info.num_channels;
    if let Some(c) = model.input_channels() {
        if c != channels_in {
            return Err(input_error(
                "num_channels",
                format!(
                    "{channels_in}, but the model {} takes {c} input channel{}",
                    model.path,
                    if c == 1 { "" } else { "s" }
                ),
            ));
        }
    }
    let patch = match opts.patch {
        Some(p) => p,
        None => {
            let dims = &model.input_shape;
            match (
                dims.len(),
                dims.get(2..).map(|d| d.iter().all(Option::is_some)),
            ) {
                (5, Some(true)) => [dims[4].unwrap(), dims[3].unwrap(), dims[2].unwrap()],
                _ => {
                    return Err(InferError::Model {
                        path: model.path.clone(),
                        message: "its input has no static z, y, x shape: give --patch".into(),
                    }
                    .into())
                }
            }
        }
    };
    let shapes = model.shapes(&[1, channels_in, patch[2], patch[1], patch[0]])?;
    let out = &shapes[model.output_slot];
    if out.len() != 5 || out[0] != 1 {
        return Err(InferError::Model {
            path: model.path.clone(),
            message: format!("its output has shape {out:?}; inference needs [1, C, z, y, x]"),
        }
        .into());
    }
    let net_out = [out[4], out[3], out[2]];
    let output_patch = opts.output_patch.unwrap_or(net_out);
    if (0..3)
        .any(|a| output_patch[a] > net_out[a] || !(net_out[a] - output_patch[a]).is_multiple_of(2))
    {
        return Err(InferError::Model {
            path: model.path.clone(),
            message: format!(
                "its output patch is {net_out:?} (x,y,z) for an input patch of {patch:?}; the output patch {output_patch:?} must fit inside it, centred"
            ),
        }
        .into());
    }
    let net_crop = [0, 1, 2].map(|a| (net_out[a] - output_patch[a]) / 2);
    let channels = opts.channels.unwrap_or(out[1]);
    if channels == 0 || channels > out[1] {
        return Err(InferError::Model {
            path: model.path.clone(),
            message: format!(
                "it has {} output channels; {channels} were asked for",
                out[1]
            ),
        }
        .into());
    }
    let grid = PatchGrid::new(scale.size, patch, output_patch, opts.overlap).map_err(|source| {
        InferTaskError::Grid {
            location: location.clone(),
            source,
        }
    })?;
    Ok(InferLayout {
        grid,
        channels,
        net_crop,
    })
}

/// A raw float32 image layer of `channels` channels with the image scale's geometry.
fn output_info(image: &Info, mip: usize, channels: usize, quantize: bool) -> Info {
    let s = &image.scales[mip];
    Info {
        layer_type: LayerType::Image,
        data_type: if quantize {
            DataType::Uint8
        } else {
            DataType::Float32
        },
        num_channels: channels,
        scales: vec![crate::formats::precomputed::info::Scale {
            encoding: Encoding::Raw,
            sharding: None,
            compressed_segmentation_block_size: None,
            extra: Default::default(),
            ..s.clone()
        }],
        // Not the image's mesh or skeleton keys: this layer has none.
        extra: Default::default(),
    }
}

/// Host memory of an inference run that no plan parameter changes (the process and the GPU
/// driver and its pipelines): measured about 200 MiB on lavapipe.
pub const FIXED_MIB: usize = 230;

/// What sizes a run's memory: the grid, the model's cost per patch and the layers' geometry.
#[derive(Clone, Copy, Debug)]
pub struct Sizing {
    pub input_patch: Vec3,
    pub output_patch: Vec3,
    /// Input rows are `stride_z` apart.
    pub stride_z: usize,
    pub channels: usize,
    pub net_channels: usize,
    pub image_channels: usize,
    /// Bytes of one image value.
    pub image_elem: usize,
    /// The image's chunk (its reads) and the output's (its writes).
    pub image_chunk: Vec3,
    pub output_chunk: Vec3,
    pub cost: crate::infer::model::PatchCost,
}

impl Sizing {
    /// Memory of a run before any column: the fixed part, the model's weights (the loaded
    /// model, the GPU's copy and its re-laid convolution weights) and one patch's activations
    /// (twice: freed buffers are kept for reuse; on lavapipe they are host memory).
    pub fn fixed_bytes(&self) -> usize {
        (FIXED_MIB << 20)
            + 3 * self.cost.weight_bytes as usize
            + 2 * self.cost.peak_activation_bytes as usize
    }

    /// The most a column of `xy` output voxels holds: its window of blended planes (sums and
    /// weights), the slab being written (values, bytes, encoded chunks), its window of image
    /// planes (with the next row's read in flight) and one patch in and out.
    pub fn column_bytes(&self, xy: [usize; 2]) -> usize {
        let [px, py, pz] = self.input_patch;
        let [ox, oy, oz] = self.output_patch;
        let plane = xy[0] * xy[1];
        let out_z = self.output_chunk[2];
        let blended = plane * (out_z + oz + self.stride_z) * (self.channels + 1) * 4;
        let slab = 3 * plane * out_z * self.channels * 4;
        let in_plane = (xy[0] + px + ox) * (xy[1] + py + oy) * self.image_channels;
        let in_z = self.image_chunk[2];
        let image = in_plane
            * ((pz + 2 * in_z + self.stride_z) * 4 + 2 * (in_z + self.stride_z) * self.image_elem);
        let patch =
            2 * px * py * pz * self.image_channels * 4 + 3 * ox * oy * oz * self.net_channels * 4;
        blended + slab + image + patch
    }

    /// The largest near-square column of whole output chunks (within `extent`, x, y) that a
    /// run of `memory_bytes` holds.
    pub fn column(
        &self,
        extent: [usize; 2],
        memory_bytes: usize,
    ) -> Result<[usize; 2], InferTaskError> {
        let chunk = self.output_chunk;
        let fixed = self.fixed_bytes();
        let least = self.column_bytes([chunk[0], chunk[1]]);
        if fixed + least > memory_bytes {
            return Err(InferTaskError::Budget {
                task_mib: memory_bytes >> 20,
                fixed_mib: fixed.div_ceil(1 << 20),
                chunk,
                column_mib: least.div_ceil(1 << 20),
                needed_mib: (fixed + least).div_ceil(1 << 20),
            });
        }
        let whole = [0, 1].map(|a| extent[a].div_ceil(chunk[a]) * chunk[a]);
        let mut xy = [chunk[0], chunk[1]];
        loop {
            // Grow the shorter side first (fewer patches run twice at the columns' borders).
            let mut grown = false;
            let mut axes = [0, 1];
            axes.sort_by_key(|&a| xy[a]);
            for a in axes {
                let mut bigger = xy;
                bigger[a] = (xy[a] + chunk[a]).min(whole[a]);
                if bigger != xy && fixed + self.column_bytes(bigger) <= memory_bytes {
                    xy = bigger;
                    grown = true;
                    break;
                }
            }
            if !grown {
                return Ok(xy);
            }
        }
    }
}

/// The sizing of a run over `image` with `model`.
pub fn sizing(
    model: &Model,
    layout: &InferLayout,
    image: &Info,
    mip: usize,
) -> Result<Sizing, InferTaskError> {
    let grid = &layout.grid;
    let [px, py, pz] = grid.input_patch;
    let cost = model.cost(&[1, image.num_channels, pz, py, px])?;
    let shapes = model.shapes(&[1, image.num_channels, pz, py, px])?;
    let input_overlap_z = grid.output_overlap[2] + 2 * grid.crop[2];
    let scale = &image.scales[mip];
    Ok(Sizing {
        input_patch: grid.input_patch,
        output_patch: grid.output_patch,
        stride_z: pz - input_overlap_z,
        channels: layout.channels,
        net_channels: shapes[model.output_slot][1],
        image_channels: image.num_channels,
        image_elem: image.data_type.size(),
        image_chunk: scale.chunk_size(),
        output_chunk: scale.chunk_size(),
        cost,
    })
}

/// A staged plan of inference: tasks of whole columns (or of their z pieces where tasks are
/// bounded in time), then one that writes the info.
#[derive(Clone, Debug)]
pub struct InferPlan {
    pub column: [usize; 2],
    /// Each task's output region (relative voxels, whole output chunks).
    pub tasks: Vec<Box3>,
    pub sizing: Sizing,
    /// A task's peak host memory, estimated.
    pub task_bytes: usize,
    /// Patches in the global grid, and those the tasks run (patches on a task's border run
    /// in both).
    pub grid_patches: usize,
    pub patches_run: usize,
    pub largest_task_patches: usize,
}

/// How `plan infer` is bounded.
#[derive(Clone, Copy, Debug)]
pub struct InferBudget {
    /// Host memory per task (fixed part included).
    pub task_bytes: usize,
    /// The longest a task should run, at `gflops`.
    pub seconds: Option<f64>,
    /// The engine's effective GFLOP/s (what `cuboids infer` prints).
    pub gflops: f64,
}

/// Plans inference over `layout`'s grid in tasks within `budget`: columns as large as a task's
/// memory holds, cut along z where a whole column would take longer than `budget.seconds`.
pub fn plan(
    sizing: Sizing,
    layout: &InferLayout,
    budget: &InferBudget,
    column: Option<[usize; 2]>,
) -> Result<InferPlan, InferTaskError> {
    let grid = &layout.grid;
    let size = grid.volume;
    let chunk = sizing.output_chunk;
    let column = match column {
        Some(c) => c,
        None => sizing.column([size[0], size[1]], budget.task_bytes)?,
    };
    let patch_seconds = sizing.cost.flops as f64 / (budget.gflops.max(1e-9) * 1e9);
    let columns = crate::task::plan::split(Box3::from_shape(size), [column[0], column[1], size[2]]);
    let mut tasks = Vec::new();
    // Pieces of z per count of patches a column's row has (columns at the volume's edge have
    // fewer): greedily as many whole chunks as keep the piece's patches within the time bound
    // (one chunk at the least).
    let mut pieces_by_row: std::collections::HashMap<usize, Vec<(usize, usize)>> =
        std::collections::HashMap::new();
    for col in columns {
        let per_row = (0..2)
            .map(|a| grid.starts_meeting(a, col.start[a], col.stop[a]).len())
            .product::<usize>();
        let pieces = pieces_by_row.entry(per_row).or_insert_with(|| {
            let rows = |z0: usize, z1: usize| grid.starts_meeting(2, z0, z1).len();
            let fits = |z0: usize, z1: usize| match budget.seconds {
                Some(seconds) => (rows(z0, z1) * per_row) as f64 * patch_seconds <= seconds,
                None => true,
            };
            let mut pieces = Vec::new();
            let mut z0 = 0;
            while z0 < size[2] {
                let mut z1 = (z0 + chunk[2]).min(size[2]);
                while z1 < size[2] && fits(z0, (z1 + chunk[2]).min(size[2])) {
                    z1 = (z1 + chunk[2]).min(size[2]);
                }
                pieces.push((z0, z1));
                z0 = z1;
            }
            pieces
        });
        tasks.extend(pieces.iter().map(|&(z0, z1)| {
            Box3::new(
                [col.start[0], col.start[1], z0],
                [col.stop[0], col.stop[1], z1],
            )
        }));
    }
    let counts: Vec<usize> = tasks.iter().map(|&t| grid.count_meeting(t)).collect();
    Ok(InferPlan {
        column,
        task_bytes: sizing.fixed_bytes() + sizing.column_bytes(column),
        grid_patches: grid.len(),
        patches_run: counts.iter().sum(),
        largest_task_patches: counts.iter().copied().max().unwrap_or(0),
        tasks,
        sizing,
    })
}

impl InferPlan {
    /// Seconds of the largest task at the budget's GFLOP/s.
    pub fn largest_task_seconds(&self, budget: &InferBudget) -> f64 {
        self.largest_task_patches as f64 * self.sizing.cost.flops as f64 / (budget.gflops * 1e9)
    }

    /// What `plan infer --estimate` prints.
    pub fn describe(&self, budget: &InferBudget) -> String {
        let flops = self.sizing.cost.flops as f64;
        let largest = self.largest_task_patches as f64 * flops;
        format!(
            "{} tasks of columns {}x{} (x,y), each at most {} MiB of host memory ({} MiB fixed and model)\n\
             patches: {} in the grid, {} run ({:.2}x: patches on task borders run in both)\n\
             per patch {:.2} GFLOP; largest task {} patches = {:.0} GFLOP, {:.0} s at {} GFLOP/s\n\
             then 1 finalize task (the info)\n",
            self.tasks.len(),
            self.column[0],
            self.column[1],
            self.task_bytes.div_ceil(1 << 20),
            self.sizing.fixed_bytes().div_ceil(1 << 20),
            self.grid_patches,
            self.patches_run,
            self.patches_run as f64 / self.grid_patches.max(1) as f64,
            flops / 1e9,
            self.largest_task_patches,
            largest / 1e9,
            largest / (budget.gflops * 1e9),
            budget.gflops
        )
    }
}

/// A model's run over one column: the image window, the blended planes and the output
/// layer it writes whole chunk slabs of.
struct ColumnRun<'a> {
    executor: &'a Arc<dyn Executor>,
    layout: &'a Arc<InferLayout>,
    mask: &'a Arc<Vec<f32>>,
    image: &'a Precomputed,
    out: &'a Precomputed,
    opts: &'a InferOptions,
}

/// What a column did.
#[derive(Default)]
struct ColumnReport {
    region: RegionReport,
    compute: Duration,
    chunks_written: usize,
    /// The most its image and output windows held at once.
    peak_bytes: usize,
}

impl ColumnRun<'_> {
    /// Reads image planes `[z0, z1)` of `extent` (x, y), normalised.
    async fn read_planes(
        &self,
        extent: Box3,
        z0: usize,
        z1: usize,
    ) -> Result<Vec<f32>, InferTaskError> {
        if z1 <= z0 {
            return Ok(Vec::new());
        }
        let b = Box3::new(
            [extent.start[0], extent.start[1], z0],
            [extent.stop[0], extent.stop[1], z1],
        );
        let (vol, _) = self
            .image
            .read_region(self.opts.mip, b, self.opts.fill_missing)
            .await?;
        Ok(tokio::task::spawn_blocking(move || normalised(&vol)).await?)
    }

    /// The blended planes up to `z` as slabs of whole output chunks of z (or to the column's
    /// end), ready to write.
    fn take_slabs(
        &self,
        col: Box3,
        blender: &mut Blender,
        flushed: &mut usize,
        z: usize,
    ) -> Vec<(Box3, Volume)> {
        let cz = self.out.scale(0).chunk_size()[2];
        let mut slabs = Vec::new();
        while *flushed < z && (*flushed + cz <= z || z == col.stop[2]) {
            let stop = (*flushed + cz).min(col.stop[2]);
            let slab = Box3::new(
                [col.start[0], col.start[1], *flushed],
                [col.stop[0], col.stop[1], stop],
            );
            let values = blender.take(stop);
            let (dtype, data) = if self.opts.quantize {
                (DataType::Uint8, quantized(&values))
            } else {
                (
                    DataType::Float32,
                    bytemuck::cast_slice::<f32, u8>(&values).to_vec(),
                )
            };
            let volume = Volume::from_bytes(dtype, slab.shape(), self.layout.channels, data)
                .expect("sized by the slab");
            slabs.push((slab, volume));
            *flushed = stop;
        }
        slabs
    }

    /// Writes slabs and notes the chunks written.
    async fn write_slabs(
        &self,
        slabs: Vec<(Box3, Volume)>,
        written: &mut Vec<String>,
        progress: &Progress,
    ) -> Result<usize, InferTaskError> {
        let scale = self.out.scale(0);
        let mut chunks = 0;
        for (slab, volume) in slabs {
            written.extend(chunk_grid(scale, slab).iter().map(|&c| chunk_key(scale, c)));
            chunks += self
                .out
                .write_region(0, slab.start, &volume, self.opts.write)
                .await?;
            progress.add(voxels(slab.shape()) as u64);
        }
        Ok(chunks)
    }

    /// Streams one column up z: row by row of patches, the next row's image read while this
    /// row runs, and each whole slab of output chunks written once no later row reaches it.
    async fn run(
        &self,
        col: Box3,
        written: &mut Vec<String>,
        progress: &Progress,
    ) -> Result<ColumnReport, InferTaskError> {
        let grid = &self.layout.grid;
        let rows = rows_meeting(grid, col);
        let mut report = ColumnReport::default();
        let mut blender = Blender::new(col, self.layout.channels);
        let mut flushed = col.start[2];
        let mut pending: Vec<(Box3, Volume)> = Vec::new();
        let extent = input_box(grid, col).unwrap_or(col);
        let channels_in = self.image.info.num_channels;
        let mut window = ImageWindow::new(extent, channels_in);
        let image_z = self.image.scale(self.opts.mip).chunk_size()[2];
        let volume_z = grid.volume[2];
        // The planes a row needs, read to the end of their last image chunk (each chunk once).
        let reach =
            |z: usize| ((z + grid.input_patch[2]).div_ceil(image_z) * image_z).min(volume_z);
        if let Some(&(z, _)) = rows.first() {
            let planes = self.read_planes(extent, z, reach(z)).await?;
            window.append(z, reach(z) - z, &planes);
        }
        for (k, (z, row)) in rows.iter().enumerate() {
            if self.opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                return Err(InferTaskError::Cancelled);
            }
            window.drop_below(*z);
            let next = rows.get(k + 1).map(|r| r.0);
            // The next row's planes this window lacks, read while this row runs.
            let (from, to) = match next {
                Some(n) if reach(n) > window.z1() => (window.z1(), reach(n)),
                _ => (0, 0),
            };
            let t = Instant::now();
            let (executor, layout, mask, row) = (
                self.executor.clone(),
                self.layout.clone(),
                self.mask.clone(),
                row.clone(),
            );
            let compute = tokio::task::spawn_blocking(move || {
                let cropped = Cropped {
                    inner: executor.as_ref(),
                    crop: layout.net_crop,
                    output: layout.grid.output_patch,
                };
                let part = infer_row(&cropped, &layout.grid, &mask, &window, &row, &mut blender);
                (part, window, blender)
            });
            // The last row's finished slabs are written while this row runs.
            let (computed, planes, wrote) = tokio::join!(
                compute,
                self.read_planes(extent, from, to),
                self.write_slabs(std::mem::take(&mut pending), written, progress)
            );
            report.chunks_written += wrote?;
            let (part, w, b) = computed?;
            (window, blender) = (w, b);
            let part = part?;
            report.compute += t.elapsed();
            report.region.patches += part.patches;
            report.region.skipped += part.skipped;
            window.append(from, to - from, &planes?);
            report.peak_bytes = report.peak_bytes.max(window.bytes() + blender.bytes());
            let done = final_below(grid, col, next);
            pending = self.take_slabs(col, &mut blender, &mut flushed, done);
        }
        report.chunks_written += self.write_slabs(pending, written, progress).await?;
        // A column no patch reaches (a valid net's border) is zeros, written slab by slab.
        let cz = self.out.scale(0).chunk_size()[2];
        while flushed < col.stop[2] {
            let z = (flushed + cz).min(col.stop[2]);
            let slabs = self.take_slabs(col, &mut blender, &mut flushed, z);
            report.chunks_written += self.write_slabs(slabs, written, progress).await?;
        }
        Ok(report)
    }
}

/// round(255 · clamp(v, 0, 1)) per value.
fn quantized(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect()
}

/// Checks a task's bounds: inside the volume, starting on whole output chunks.
fn checked_bounds(
    bounds: Option<Box3>,
    size: Vec3,
    chunk: Vec3,
    location: &str,
) -> Result<Box3, InferTaskError> {
    let Some(b) = bounds else {
        return Ok(Box3::from_shape(size));
    };
    let aligned = (0..3).all(|a| {
        b.start[a] < b.stop[a]
            && b.stop[a] <= size[a]
            && b.start[a].is_multiple_of(chunk[a])
            && (b.stop[a].is_multiple_of(chunk[a]) || b.stop[a] == size[a])
    });
    if aligned {
        Ok(b)
    } else {
        Err(InferTaskError::Bounds {
            location: location.to_string(),
            start: b.start,
            stop: b.stop,
            size,
            chunk,
        })
    }
}

/// Runs the model over the image (or `opts.bounds` of it) and writes the output layer (its
/// info last, and only for the whole volume or `opts.finalize`).
pub async fn infer(
    executor: Arc<dyn Executor>,
    model: &Model,
    image: &Precomputed,
    output: Arc<dyn Store>,
    opts: &InferOptions,
) -> Result<InferReport, InferTaskError> {
    let start = Instant::now();
    let layout = Arc::new(layout(model, image, opts)?);
    let [px, py, pz] = layout.grid.input_patch;
    executor.check(&[1, image.info.num_channels, pz, py, px])?;
    let info = output_info(&image.info, opts.mip, layout.channels, opts.quantize);
    let region = checked_bounds(
        opts.bounds,
        info.scales[0].size,
        info.scales[0].chunk_size(),
        &image.store.location(),
    )?;
    let location = output.location();
    match Precomputed::open(output.clone()).await {
        Ok(existing) if opts.finalize && existing.info == info => {}
        Ok(existing) if opts.finalize => {
            let _ = existing;
            return Err(InferTaskError::OtherLayer { location });
        }
        Ok(_) => return Err(InferTaskError::OutputExists { location }),
        Err(PrecomputedError::MissingInfo { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let out = Precomputed::new(output, info);
    let sizing = sizing(model, &layout, &image.info, opts.mip)?;
    let mut report = InferReport {
        channels: layout.channels,
        engine: executor.engine(),
        patch_flops: sizing.cost.flops,
        ..Default::default()
    };
    if opts.finalize {
        out.write_info().await?;
        report.wall = start.elapsed();
        return Ok(report);
    }
    let column = match opts.column {
        Some(c) => c,
        None => sizing.column([region.shape()[0], region.shape()[1]], opts.memory_bytes)?,
    };
    let columns = crate::task::plan::split(region, [column[0], column[1], region.shape()[2]]);
    report.voxels = voxels(region.shape()) as u64;
    report.columns = columns.len();
    report.column = column;
    let mask = Arc::new(patch_mask(
        opts.bump,
        layout.grid.output_patch,
        layout.grid.output_overlap,
    ));
    let run = ColumnRun {
        executor: &executor,
        layout: &layout,
        mask: &mask,
        image,
        out: &out,
        opts,
    };
    let progress = Progress::new("infer", report.voxels);
    let mut written: Vec<String> = Vec::new();
    let result: Result<(), InferTaskError> = async {
        for col in columns {
            let part = run.run(col, &mut written, &progress).await?;
            report.compute += part.compute;
            report.patches += part.region.patches;
            report.skipped += part.region.skipped;
            report.chunks_written += part.chunks_written;
            report.peak_column_bytes = report.peak_column_bytes.max(part.peak_bytes);
        }
        if opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(InferTaskError::Cancelled);
        }
        if opts.bounds.is_none() {
            out.write_info().await?;
        }
        Ok(())
    }
    .await;
    progress.finish();
    if let Err(e) = result {
        for key in &written {
            if let Err(err) = out.store.delete(key).await {
                tracing::warn!(key, error = %err, "could not remove a chunk of an unfinished output");
            }
        }
        return Err(e);
    }
    report.wall = start.elapsed();
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout_and_sizing(volume: Vec3, chunk: Vec3) -> (InferLayout, Sizing) {
        let grid = PatchGrid::new(volume, [64, 64, 20], [64, 64, 20], [16, 16, 4]).unwrap();
        let sizing = Sizing {
            input_patch: grid.input_patch,
            output_patch: grid.output_patch,
            stride_z: 16,
            channels: 3,
            net_channels: 3,
            image_channels: 1,
            image_elem: 1,
            image_chunk: chunk,
            output_chunk: chunk,
            cost: crate::infer::model::PatchCost {
                flops: 1_000_000_000,
                peak_activation_bytes: 1 << 20,
                weight_bytes: 1 << 10,
            },
        };
        let layout = InferLayout {
            grid,
            channels: 3,
            net_crop: [0; 3],
        };
        (layout, sizing)
    }

    #[test]
    fn plans_cover_the_volume_once_in_whole_chunks_and_keep_each_task_within_its_time() {
        let (volume, chunk) = ([300, 250, 200], [32, 32, 16]);
        let (layout, sizing) = layout_and_sizing(volume, chunk);
        // 1 GFLOP a patch at 10 GFLOP/s: 0.1 s a patch, 60 patches a task at most.
        let budget = InferBudget {
            task_bytes: 4 << 30,
            seconds: Some(6.0),
            gflops: 10.0,
        };
        let plan = plan(sizing, &layout, &budget, Some([96, 64])).unwrap();
        let covered: usize = plan.tasks.iter().map(|t| voxels(t.shape())).sum();
        assert_eq!(covered, voxels(volume));
        for (i, a) in plan.tasks.iter().enumerate() {
            assert!((0..3).all(|k| a.start[k] % chunk[k] == 0), "{a:?}");
            for b in &plan.tasks[i + 1..] {
                let apart = (0..3).any(|k| a.stop[k] <= b.start[k] || b.stop[k] <= a.start[k]);
                assert!(apart, "{a:?} and {b:?} overlap");
            }
            let patches = layout.grid.count_meeting(*a);
            // A piece of one chunk of z may exceed the bound on its own; longer ones may not.
            assert!(
                patches <= 60 || a.shape()[2] <= chunk[2],
                "{a:?}: {patches}"
            );
        }
        // Without a time bound: one task per column, the volume's whole z.
        let whole = InferBudget {
            seconds: None,
            ..budget
        };
        let columns = super::plan(sizing, &layout, &whole, Some([96, 64])).unwrap();
        assert_eq!(columns.tasks.len(), 4 * 4);
        assert!(columns.tasks.iter().all(|t| t.shape()[2] == 200));
        assert!(columns.patches_run > columns.grid_patches);
    }

    #[test]
    fn columns_grow_with_the_budget_and_a_budget_below_one_chunk_is_refused() {
        let (_, sizing) = layout_and_sizing([1024, 1024, 64], [64, 64, 16]);
        let small = sizing
            .column([1024, 1024], sizing.fixed_bytes() + (64 << 20))
            .unwrap();
        let large = sizing
            .column([1024, 1024], sizing.fixed_bytes() + (512 << 20))
            .unwrap();
        assert!(voxels([large[0], large[1], 1]) > voxels([small[0], small[1], 1]));
        for c in [small, large] {
            assert!(
                c[0] % 64 == 0 && c[1] % 64 == 0 && c[0].abs_diff(c[1]) <= 64,
                "{c:?}"
            );
            assert!(
                sizing.fixed_bytes() + sizing.column_bytes(c) <= sizing.fixed_bytes() + (512 << 20)
            );
        }
        let refused = sizing.column([1024, 1024], sizing.fixed_bytes());
        assert!(matches!(refused, Err(InferTaskError::Budget { .. })));
    }
}

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
use crate::infer::blend::{patch_mask, BlendError, Bump, PatchGrid};
use crate::infer::region::{infer_region, input_box, normalised, Executor, RegionReport};
use crate::infer::{InferError, Model};
use crate::ops::nn::Tensor;
use crate::progress::Progress;
use crate::store::{Store, StoreError};
use crate::task::stitch::ChunkGrid;
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
    #[error(transparent)]
    Precomputed(#[from] PrecomputedError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a background thread failed")]
    Join(#[from] tokio::task::JoinError),
    #[error("stopped before it finished: the runner is shutting down")]
    Cancelled,
}

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
    /// Output voxels per tile, at most (rounded to whole output chunks).
    pub tile_voxels: usize,
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
            tile_voxels: 16 << 20,
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
    pub tiles: usize,
    pub chunks_written: usize,
    pub channels: usize,
    pub engine: &'static str,
    pub wall: Duration,
    pub compute: Duration,
}

impl InferReport {
    pub fn mvx_per_s(&self) -> f64 {
        self.voxels as f64 / 1e6 / self.wall.as_secs_f64().max(1e-9)
    }

    pub fn describe(&self, what: &str) -> Vec<String> {
        vec![
            format!(
                "{what}: {:.2} MVx in {:.2} s = {:.2} MVx/s ({} engine)",
                self.voxels as f64 / 1e6,
                self.wall.as_secs_f64(),
                self.mvx_per_s(),
                self.engine
            ),
            format!(
                "  {} patches run, {} all-zero skipped, {} tiles, {} chunks of {} channels written; the net ran {:.2} s",
                self.patches,
                self.skipped,
                self.tiles,
                self.chunks_written,
                self.channels,
                self.compute.as_secs_f64()
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
        let (c, [ox, oy, oz]) = (s[1], self.output);
        let mut data = Vec::with_capacity(c * ox * oy * oz);
        for ch in 0..c {
            for z in 0..oz {
                for y in 0..oy {
                    let at = ((ch * s[2] + z + self.crop[2]) * s[3] + y + self.crop[1]) * s[4]
                        + self.crop[0];
                    data.extend_from_slice(&out.data[at..at + ox]);
                }
            }
        }
        Ok(Tensor::new(vec![1, c, oz, oy, ox], data))
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
fn output_info(image: &Info, mip: usize, channels: usize) -> Info {
    let s = &image.scales[mip];
    Info {
        layer_type: LayerType::Image,
        data_type: DataType::Float32,
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

/// Output tiles: whole output chunks, about `tile_voxels` each, grown along x, then y, then z.
fn tiles(size: Vec3, chunk: Vec3, tile_voxels: usize) -> Vec<Box3> {
    let mut tile = chunk;
    for a in 0..3 {
        while tile[a] < size[a] && voxels(tile) * 2 <= tile_voxels.max(voxels(chunk)) {
            tile[a] *= 2;
        }
    }
    let grid = ChunkGrid {
        region: size,
        chunk: tile,
    };
    (0..grid.len()).map(|t| grid.core(t)).collect()
}

/// One tile's output channels: zeros where no patch reaches it (the border of a valid-padding
/// net), else its patches run and blended; with the time the net and the blending took.
async fn infer_tile(
    executor: &Arc<dyn Executor>,
    layout: &Arc<InferLayout>,
    mask: &Arc<Vec<f32>>,
    image: &Precomputed,
    opts: &InferOptions,
    tile: Box3,
) -> Result<(Volume, RegionReport, Duration), InferTaskError> {
    let Some(reads) = input_box(&layout.grid, tile) else {
        let zeros = Volume::zeros(DataType::Float32, tile.shape(), layout.channels);
        return Ok((zeros, RegionReport::default(), Duration::ZERO));
    };
    let (vol, _) = image
        .read_region(opts.mip, reads, opts.fill_missing)
        .await?;
    let t = Instant::now();
    let (executor, shared, mask) = (executor.clone(), layout.clone(), mask.clone());
    let (values, part) = tokio::task::spawn_blocking(move || {
        let cropped = Cropped {
            inner: executor.as_ref(),
            crop: shared.net_crop,
            output: shared.grid.output_patch,
        };
        let image = normalised(&vol);
        infer_region(
            &cropped,
            &shared.grid,
            &mask,
            &image,
            reads,
            vol.channels,
            tile,
            shared.channels,
        )
    })
    .await??;
    let data = bytemuck::cast_slice::<f32, u8>(&values).to_vec();
    let volume = Volume::from_bytes(DataType::Float32, tile.shape(), layout.channels, data)
        .expect("sized by the tile");
    Ok((volume, part, t.elapsed()))
}

/// Runs the model over the image and writes the output layer.
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
    let location = output.location();
    match Precomputed::open(output.clone()).await {
        Ok(_) => return Err(InferTaskError::OutputExists { location }),
        Err(PrecomputedError::MissingInfo { .. }) => {}
        Err(e) => return Err(e.into()),
    }
    let info = output_info(&image.info, opts.mip, layout.channels);
    let out = Precomputed::new(output, info);
    let scale = out.scale(0).clone();
    let tiles = tiles(scale.size, scale.chunk_size(), opts.tile_voxels);
    let mask = Arc::new(patch_mask(
        opts.bump,
        layout.grid.output_patch,
        layout.grid.output_overlap,
    ));
    let mut report = InferReport {
        voxels: voxels(scale.size) as u64,
        tiles: tiles.len(),
        channels: layout.channels,
        engine: executor.engine(),
        ..Default::default()
    };
    let progress = Progress::new("infer", report.voxels);
    let mut written: Vec<String> = Vec::new();
    let result: Result<(), InferTaskError> = async {
        for tile in tiles {
            if opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                return Err(InferTaskError::Cancelled);
            }
            let (volume, part, compute) =
                infer_tile(&executor, &layout, &mask, image, opts, tile).await?;
            report.compute += compute;
            report.patches += part.patches;
            report.skipped += part.skipped;
            written.extend(
                chunk_grid(&scale, tile)
                    .iter()
                    .map(|&c| chunk_key(&scale, c)),
            );
            report.chunks_written += out.write_region(0, tile.start, &volume, opts.write).await?;
            progress.add(voxels(tile.shape()) as u64);
        }
        if opts.cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
            return Err(InferTaskError::Cancelled);
        }
        out.write_info().await?;
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

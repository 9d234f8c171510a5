//! The GPU side: one context (device, queue, lazily built pipelines) and the kernels that use it.
//! Compute functions take a `&GpuContext`; they never create one.

pub mod compressed_segmentation;
pub mod context;
pub mod downsample;
pub mod kernels;
pub mod labeling;
pub mod nn;
pub(crate) mod work;

pub use context::{GpuContext, GpuError};

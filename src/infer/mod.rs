//! ConvNet inference from ONNX models (chunkflow's image → affinities), a folder of its own:
//!
//! - [`onnx`]: the ONNX wire format (prost messages for the parts of `onnx.proto3` read);
//! - [`model`]: a model loaded and checked: supported operators and attributes (anything else
//!   is refused at load, naming the node), constants resolved, BatchNormalization folded into
//!   the Conv before it, static shapes per node;
//! - [`cpu`]: the model run on the CPU by the reference operators in [`crate::ops::nn`], the
//!   oracle for the GPU executor and what the tests compare with onnxruntime;
//! - [`native`]: a CPU engine, the convolutions as matrix products (im2col tiles and the
//!   `gemm` crate's vector kernels) on every core;
//! - [`gpu`]: the WGSL executor on wgpu (`shaders/nn.wgsl`);
//! - [`blend`], [`region`]: chunkflow's patch grid and blending, and a region (or a column
//!   streamed up z) of the output from the global grid.

pub mod blend;
pub mod cpu;
pub mod gpu;
pub mod model;
pub mod native;
pub mod onnx;
pub mod region;

pub use model::{InferError, Model};

/// Which executor runs the net.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// The GPU where the adapter is one, else (lavapipe: a CPU behind Vulkan) the native CPU
    /// engine, which is the faster there.
    #[default]
    Auto,
    /// The WGSL executor on the adapter (lavapipe included).
    Gpu,
    /// Convolutions as matrix products on this CPU's cores ([`native`]).
    Native,
    /// The reference operators (slow; for checking).
    Reference,
}

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

/// The precision a net computes in.
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
pub enum Precision {
    #[default]
    Float32,
    /// Half precision as a GPU with fp16 storage computes (PyTorch's `.half()`, chunkflow's
    /// `--dtype float16`): weights, the input and every tensor a node makes are rounded to the
    /// nearest float16 (ties to even, subnormals kept), sums are accumulated in float32. The
    /// blending stays float32 and the layer is float32, as chunkflow converts it back.
    Float16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Float32 => "float32",
            Precision::Float16 => "float16",
        }
    }
}

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

//! ConvNet inference from ONNX models (chunkflow's image → affinities), a folder of its own:
//!
//! - [`onnx`]: the ONNX wire format (prost messages for the parts of `onnx.proto3` read);
//! - [`model`]: a model loaded and checked: supported operators and attributes (anything else
//!   is refused at load, naming the node), constants resolved, BatchNormalization folded into
//!   the Conv before it, static shapes per node;
//! - [`cpu`]: the model run on the CPU by the reference operators in [`crate::ops::nn`], the
//!   oracle for the GPU executor and what the tests compare with onnxruntime.

pub mod blend;
pub mod cpu;
pub mod gpu;
pub mod model;
pub mod onnx;
pub mod region;

pub use model::{InferError, Model};

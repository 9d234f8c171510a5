//! cuboids: GPU (WGSL through wgpu) resolution pyramids of neuroscience volumes.
//!
//! Layout: `formats` (precomputed info, codecs) and `store` (where bytes live) are the I/O side;
//! `gpu` holds the context and kernels, `ops` their CPU reference implementations; `task` plans
//! and runs whole jobs and task documents; `runtime` holds the ways the binary runs (locally, as
//! an AWS Batch job, as a Step Functions activity worker).

pub mod cli;
pub mod dtype;
pub mod formats;
pub mod geometry;
pub mod gpu;
pub mod hash;
pub mod infer;
pub mod ops;
pub mod progress;
pub mod runtime;
pub mod store;
pub mod task;
pub mod volume;

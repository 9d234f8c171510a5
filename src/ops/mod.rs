//! CPU reference implementations of every GPU kernel. They define the semantics the GPU must
//! reproduce bit for bit, and they are written for clarity rather than speed. `evaluate` (how far
//! a segmentation is from a ground truth) has no kernel: it runs on the CPU only.

pub mod agglomerate;
pub mod connected_components;
pub mod downsample;
pub mod evaluate;
pub mod nn;
pub mod union_find;
pub mod watershed;

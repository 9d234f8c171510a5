//! CPU reference implementations of every GPU kernel. They define the semantics the GPU must
//! reproduce bit for bit, and they are written for clarity rather than speed.

pub mod agglomerate;
pub mod connected_components;
pub mod downsample;
pub mod nn;
pub mod union_find;
pub mod watershed;

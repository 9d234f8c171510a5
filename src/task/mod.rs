//! Whole jobs: the task document, planning a volume into GPU-sized work and running it, and how
//! failures are classified for the runtimes that retry them.

pub mod boss;
pub mod boss_downsample;
pub mod downsample;
pub mod failure;
pub mod infer;
pub mod plan;
pub mod pyramid;
pub mod route;
pub mod segment;
pub mod spec;
pub mod staged;
pub mod stitch;

//! Whole jobs: planning a volume into GPU-sized work and running it.

pub mod boss;
pub mod boss_downsample;
pub mod downsample;
pub mod plan;

//! On-disk and on-S3 formats.

pub mod blosc;
pub mod boss;
pub mod precomputed;
pub mod preview;

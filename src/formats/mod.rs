//! On-disk and on-S3 formats.

pub mod precomputed;

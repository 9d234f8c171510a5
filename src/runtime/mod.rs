//! The ways the binary runs. Locally (files, lavapipe or a local GPU) for now; AWS Batch and
//! Step Functions activity workers come later.

pub mod local;
pub mod synthetic;

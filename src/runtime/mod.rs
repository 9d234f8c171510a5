//! The ways the binary runs: locally (files, lavapipe or a local GPU), as an AWS Batch job, as a
//! Step Functions activity worker and as an AWS Lambda function. All of them run task documents
//! through the `Executor`.

pub mod activity;
pub mod batch;
pub mod executor;
pub mod lambda;
pub mod local;
pub mod segmentation;
pub mod synthetic;
pub mod view;

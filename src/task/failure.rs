//! Why a task failed, in the terms its runners need: a stable error name for Step Functions
//! (SendTaskFailure's `error`, which a state machine's Retry and Catch match) and whether running
//! the task again could succeed (the AWS Batch exit code that a retryStrategy matches).

use crate::formats::boss::CuboidError;
use crate::formats::precomputed::PrecomputedError;
use crate::gpu::GpuError;
use crate::store::boss_index::IndexError;
use crate::store::StoreError;
use crate::task::boss::JobError;
use crate::task::boss_downsample::BossError;
use crate::task::downsample::TaskError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureKind {
    /// The task document is malformed or asks for something impossible.
    InvalidTask,
    /// The data is invalid: a corrupt or missing chunk, an unusable info, a wrong-size cuboid.
    InvalidData,
    /// Storage refused the request: access denied, no such bucket or table.
    AccessDenied,
    /// A storage or service fault that outlasted the SDK's own retries.
    Storage,
    /// The GPU failed: no adapter, device lost, out of memory.
    Gpu,
    /// The runner was asked to stop (SIGTERM) before the task finished.
    Interrupted,
    /// The output document is over Step Functions' 256 KiB limit.
    OutputTooLarge,
    /// A bug: a background thread panicked.
    Internal,
}

/// Batch exit code of a failure that a retry can fix (sysexits' EX_TEMPFAIL).
pub const EXIT_RETRYABLE: u8 = 75;
/// Batch exit code of a failure that a retry cannot fix (sysexits' EX_DATAERR).
pub const EXIT_PERMANENT: u8 = 65;

impl FailureKind {
    pub const ALL: [FailureKind; 8] = [
        FailureKind::InvalidTask,
        FailureKind::InvalidData,
        FailureKind::AccessDenied,
        FailureKind::Storage,
        FailureKind::Gpu,
        FailureKind::Interrupted,
        FailureKind::OutputTooLarge,
        FailureKind::Internal,
    ];

    /// The `error` sent with SendTaskFailure; state machines match these names.
    pub fn error_name(self) -> &'static str {
        match self {
            FailureKind::InvalidTask => "cuboids.InvalidTask",
            FailureKind::InvalidData => "cuboids.InvalidData",
            FailureKind::AccessDenied => "cuboids.AccessDenied",
            FailureKind::Storage => "cuboids.StorageError",
            FailureKind::Gpu => "cuboids.GpuError",
            FailureKind::Interrupted => "cuboids.Interrupted",
            FailureKind::OutputTooLarge => "cuboids.OutputTooLarge",
            FailureKind::Internal => "cuboids.InternalError",
        }
    }

    /// Whether the same task could succeed on another attempt (or another host).
    pub fn is_retryable(self) -> bool {
        matches!(
            self,
            FailureKind::Storage
                | FailureKind::Gpu
                | FailureKind::Interrupted
                | FailureKind::Internal
        )
    }

    pub fn exit_code(self) -> u8 {
        if self.is_retryable() {
            EXIT_RETRYABLE
        } else {
            EXIT_PERMANENT
        }
    }
}

/// Errors that know which kind of failure they are.
pub trait Classify {
    fn failure_kind(&self) -> FailureKind;
}

impl Classify for StoreError {
    fn failure_kind(&self) -> FailureKind {
        match self {
            StoreError::InvalidKey { .. } | StoreError::Location { .. } => FailureKind::InvalidTask,
            _ if self.is_transient() => FailureKind::Storage,
            _ => FailureKind::AccessDenied,
        }
    }
}

impl Classify for IndexError {
    fn failure_kind(&self) -> FailureKind {
        if self.is_transient() {
            FailureKind::Storage
        } else {
            FailureKind::AccessDenied
        }
    }
}

impl Classify for PrecomputedError {
    fn failure_kind(&self) -> FailureKind {
        match self {
            PrecomputedError::Store(e) => e.failure_kind(),
            PrecomputedError::Join(_) => FailureKind::Internal,
            PrecomputedError::MissingInfo { .. } => FailureKind::InvalidTask,
            _ => FailureKind::InvalidData,
        }
    }
}

impl Classify for GpuError {
    fn failure_kind(&self) -> FailureKind {
        match self {
            // Too many mips for this adapter's binding limit: the task must change.
            GpuError::TooLarge { .. } => FailureKind::InvalidTask,
            _ => FailureKind::Gpu,
        }
    }
}

impl Classify for TaskError {
    fn failure_kind(&self) -> FailureKind {
        match self {
            TaskError::Precomputed(e) => e.failure_kind(),
            TaskError::Gpu(e) => e.failure_kind(),
            TaskError::Downsample(_)
            | TaskError::NoSuchMip { .. }
            | TaskError::ScaleMismatch { .. }
            | TaskError::Bounds { .. }
            | TaskError::SlabTooLarge { .. }
            | TaskError::Sharding { .. } => FailureKind::InvalidTask,
            TaskError::Cancelled => FailureKind::Interrupted,
            TaskError::Join(_) => FailureKind::Internal,
        }
    }
}

impl Classify for crate::task::segment::SegmentError {
    fn failure_kind(&self) -> FailureKind {
        use crate::task::segment::SegmentError as E;
        match self {
            E::Precomputed(e) => e.failure_kind(),
            E::Gpu(e) => e.failure_kind(),
            E::Task(e) => e.failure_kind(),
            E::Input { .. } | E::OutputMismatch { .. } => FailureKind::InvalidTask,
            E::Join(_) => FailureKind::Internal,
            E::Cancelled => FailureKind::Interrupted,
        }
    }
}

impl Classify for crate::task::staged::StagedError {
    fn failure_kind(&self) -> FailureKind {
        use crate::task::staged::StagedError as E;
        match self {
            E::Segment(e) => e.failure_kind(),
            E::Store { source, .. } => source.as_ref().failure_kind(),
            // A stage run before its inputs exist, or over damaged ones: running it again
            // changes nothing until someone runs the stage before (or the plan) again.
            E::Missing { .. } | E::Corrupt { .. } => FailureKind::InvalidData,
            E::OtherPlan { .. } | E::BadPlan { .. } | E::Budget { .. } => FailureKind::InvalidTask,
        }
    }
}

impl Classify for BossError {
    fn failure_kind(&self) -> FailureKind {
        match self {
            BossError::Job(_) => FailureKind::InvalidTask,
            BossError::Store(e) => e.failure_kind(),
            BossError::Cuboid { source, .. } => source.failure_kind(),
            BossError::Index(e) => e.failure_kind(),
            BossError::Gpu(e) => e.failure_kind(),
            BossError::Task(e) => e.failure_kind(),
            BossError::Join(_) => FailureKind::Internal,
        }
    }
}

impl Classify for CuboidError {
    fn failure_kind(&self) -> FailureKind {
        FailureKind::InvalidData
    }
}

impl Classify for JobError {
    fn failure_kind(&self) -> FailureKind {
        FailureKind::InvalidTask
    }
}

impl Classify for crate::infer::InferError {
    /// A model error is the task's to fix (a model file that is missing, unreadable, not ONNX,
    /// or asks for an operator or shape inference does not run); the GPU's are the GPU's.
    fn failure_kind(&self) -> FailureKind {
        match self {
            crate::infer::InferError::Gpu {
                source: crate::gpu::nn::NnGpuError::Gpu(e),
                ..
            } => e.failure_kind(),
            _ => FailureKind::InvalidTask,
        }
    }
}

impl Classify for crate::task::infer::InferTaskError {
    fn failure_kind(&self) -> FailureKind {
        use crate::task::infer::InferTaskError as E;
        match self {
            E::Model(e) => e.failure_kind(),
            E::Grid { .. }
            | E::Input { .. }
            | E::OutputExists { .. }
            | E::OtherLayer { .. }
            | E::Bounds { .. }
            | E::Budget { .. } => FailureKind::InvalidTask,
            E::Precomputed(e) => e.failure_kind(),
            E::Store(e) => e.failure_kind(),
            E::Join(_) => FailureKind::Internal,
            E::Cancelled => FailureKind::Interrupted,
        }
    }
}

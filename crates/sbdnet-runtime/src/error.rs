//! Typed errors of the runtime.

use thiserror::Error;

/// Everything that can go wrong loading, validating, planning or running a deployed model.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// The file could not be read or written.
    #[error("{path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The cause (part of the message, not a `source()`: the binary prints error chains, which would repeat it).
        cause: std::io::Error,
    },
    /// The bytes are not a valid `.sbd` file (truncated, corrupted, wrong version).
    #[error("{path}: not a valid sbdnet model file: {reason}")]
    Format {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The layer graph is inconsistent (shapes, kinds, tensor sizes).
    #[error("invalid model graph: layer {layer}: {reason}")]
    Graph {
        /// The layer's name (or index).
        layer: String,
        /// What is wrong.
        reason: String,
    },
    /// A batch too large to plan: one of its activation or scratch buffers would exceed
    /// [`MAX_BATCH_VALUES`](crate::plan::MAX_BATCH_VALUES) values.
    #[error(
        "a batch of {batch} images would need {values} values in one buffer (at most {limit}); use a smaller batch"
    )]
    Batch {
        /// Images per batch asked for.
        batch: usize,
        /// Values of the largest buffer (saturated on overflow).
        values: usize,
        /// The limit.
        limit: usize,
    },
    /// An input of the wrong size was passed to `run`.
    #[error("input has {got} values, the model takes {expected} per image ({batch} images)")]
    Input {
        /// Values passed.
        got: usize,
        /// Values expected.
        expected: usize,
        /// Batch size planned.
        batch: usize,
    },
}

pub(crate) fn graph_err(layer: impl Into<String>, reason: impl Into<String>) -> RuntimeError {
    RuntimeError::Graph { layer: layer.into(), reason: reason.into() }
}

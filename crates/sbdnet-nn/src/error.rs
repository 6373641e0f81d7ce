//! Errors of the nn crate.

use thiserror::Error;

/// What can go wrong building, running, saving or loading a model.
#[derive(Debug, Error)]
pub enum NnError {
    /// A model configuration that cannot be built.
    #[error("invalid model configuration: {0}")]
    Config(String),
    /// A model name that is not one of the presets.
    #[error("unknown model '{name}': choose one of {choices}")]
    UnknownModel {
        /// The name given.
        name: String,
        /// The valid names.
        choices: String,
    },
    /// Input of the wrong size or labels out of range.
    #[error("bad input: {0}")]
    Input(String),
    /// Checkpoint I/O failed.
    #[error("checkpoint {path}: {cause}")]
    Io {
        /// The file.
        path: String,
        /// The cause (part of the message, not a `source()`: the binary prints error chains, which would repeat it).
        cause: std::io::Error,
    },
    /// A checkpoint that cannot be read or does not fit the model.
    #[error("checkpoint {path} is not usable: {reason}")]
    Checkpoint {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

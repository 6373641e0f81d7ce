//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while loading, fetching or transforming data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file or directory could not be read or written.
    #[error("I/O error on {path}: {cause}; check that the path exists and is accessible")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The cause (part of the message, not a `source()`: the binary prints error chains, which would repeat it).
        cause: std::io::Error,
    },
    /// The data set is not present in the data directory.
    #[error("{}", not_installed_message(name, dir))]
    NotInstalled {
        /// Data set name (`mnist`, `fashion-mnist`, `cifar10`).
        name: String,
        /// The directory that was searched.
        dir: PathBuf,
    },
    /// A data file is malformed.
    #[error("{file}: malformed data: {reason}; delete the file and install the data set again")]
    Format {
        /// The file (or `<buffer>` for in-memory data).
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file's SHA-256 does not match the expected value.
    #[error("checksum mismatch for {file}: expected {expected}, got {actual}; delete it and fetch again")]
    Checksum {
        /// The file.
        file: PathBuf,
        /// Expected hex digest.
        expected: String,
        /// Actual hex digest.
        actual: String,
    },
    /// An external tool (npm, apt-get, dpkg-deb) is missing or failed.
    #[error("`{tool}` failed: {message}; install it or put the data files in place by hand")]
    Tool {
        /// The command that was run.
        tool: String,
        /// Its error output or the launch error.
        message: String,
    },
    /// An unknown data set name was given.
    #[error("unknown data set `{0}`: valid names are digits, mnist, fashion-mnist, cifar10")]
    UnknownKind(String),
    /// An argument is out of range.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

fn not_installed_message(name: &str, dir: &std::path::Path) -> String {
    let d = dir.display();
    if name == "cifar10" {
        format!(
            "cifar10 is not installed in {d}: download the CIFAR-10 binary version \
             (cifar-10-binary.tar.gz) and unpack it into {d} \
             (or pass --data-dir DIR / set SBDNET_DATA)"
        )
    } else {
        format!(
            "{name} is not installed in {d}: run `sbdnet data fetch {name}` \
             (or pass --data-dir DIR / set SBDNET_DATA)"
        )
    }
}

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), cause: source }
    }

    pub(crate) fn format(reason: impl Into<String>) -> Self {
        DataError::Format { file: PathBuf::from("<buffer>"), reason: reason.into() }
    }

    /// Attach a file name to a [`DataError::Format`] error.
    pub(crate) fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            DataError::Format { reason, .. } => DataError::Format { file: path.to_path_buf(), reason },
            other => other,
        }
    }
}

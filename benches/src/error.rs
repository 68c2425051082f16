//! The load tool's errors.

/// What can stop a benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Kaelix(#[from] kaelix_core::Error),
    #[error("{target} protocol: {reason}")]
    Protocol {
        target: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Usage(String),
    #[error("the {0} task ended abnormally: {1}")]
    Task(&'static str, String),
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;

pub fn protocol(target: &'static str, reason: impl Into<String>) -> BenchError {
    BenchError::Protocol {
        target,
        reason: reason.into(),
    }
}

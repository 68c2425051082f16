//! Where the broker's tasks run: on the [`OptimizedRuntime`] the broker was
//! given (the `kaelix-broker` binary always gives one), else on the tokio
//! runtime of the caller (a broker embedded in a tokio program or a test).
//!
//! [`OptimizedRuntime`]: kaelix_core::runtime::OptimizedRuntime

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use kaelix_core::runtime::{self, Handle, TaskPriority};
use kaelix_core::Result;

/// A spawned task of either kind.
pub(crate) enum Task<T> {
    Kaelix(runtime::JoinHandle<T>),
    Tokio(tokio::task::JoinHandle<T>),
}

impl<T> Task<T> {
    /// Cancels the task.
    pub(crate) fn abort(self) {
        match self {
            Task::Kaelix(handle) => handle.abort(),
            Task::Tokio(handle) => handle.abort(),
        }
    }
}

impl<T> Future for Task<T> {
    /// `None` when the task panicked or was cancelled.
    type Output = Option<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        match self.get_mut() {
            Task::Kaelix(handle) => Pin::new(handle).poll(cx).map(|r| r.ok()),
            Task::Tokio(handle) => Pin::new(handle).poll(cx).map(|r| r.ok()),
        }
    }
}

/// Spawns on `runtime` (on the current worker when called from one), or on
/// tokio without one. Fails only when the runtime's queues are full or it
/// is shutting down.
pub(crate) fn spawn<F>(
    runtime: Option<&Handle>,
    priority: TaskPriority,
    future: F,
) -> Result<Task<F::Output>>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    match runtime {
        Some(handle) => handle.spawn(priority, future).map(Task::Kaelix),
        None => Ok(Task::Tokio(tokio::spawn(future))),
    }
}

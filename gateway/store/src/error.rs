//! What a storage engine's failure means to its caller: try again later, or
//! do not try again.

use std::future::Future;
use std::pin::Pin;

/// A storage operation failed; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The engine is unavailable or busy (connection lost, locked, disk full
    /// or failing): retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The engine refused the operation (a constraint, a corrupt or newer
    /// database): the same operation will fail again.
    #[error("storage refused: {0}")]
    Refused(String),
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn retry_later(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// What the hub's storage traits return: a boxed future, so the traits work as
/// trait objects over any engine, embedded or networked.
pub type StoreFuture<'a, T, E = StoreError> =
    Pin<Box<dyn Future<Output = Result<T, E>> + Send + 'a>>;

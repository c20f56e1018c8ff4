//! Notifications: alert events routed to receivers (webhook, email, Alertmanager), grouped,
//! silenced, written to a PostgreSQL outbox and delivered with retries.
//!
//! `route`, `group` and `payload` are pure; `run` owns the transaction that turns events into
//! outbox rows; `deliver` sends them.

pub mod config;
pub mod deliver;
pub(crate) mod group;
pub mod payload;
pub(crate) mod route;
pub(crate) mod run;

/// Why routing or queueing notifications failed.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("encoding a notification group: {0}")]
    State(serde_json::Error),
}

impl NotifyError {
    pub fn is_retryable(&self) -> bool {
        match self {
            NotifyError::Store(e) => e.is_retryable(),
            NotifyError::State(_) => false,
        }
    }
}

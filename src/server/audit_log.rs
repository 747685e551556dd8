//! The server's audit writer: group commit onto the store's hash chain.
//!
//! Every issuance waits until its record is durable before the SVID is returned. One fsync per
//! record would cap issuance at the disk's sync rate, so one writer task gathers whatever
//! records arrive while the previous transaction commits and appends them together: each
//! caller still gets its own durable record, and the rate scales with concurrency.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditEvent, AuditRecord};
use crate::store::{Store, StoreError};

/// The most records committed in one transaction.
const MAX_BATCH: usize = 512;
/// Records waiting for the writer before callers are made to wait for room.
const QUEUE: usize = 8192;

/// Why a record could not be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The store refused the batch holding this record.
    #[error("the audit record could not be stored: {0}")]
    Store(String),
    /// The record repeats a serial number already issued; it was not stored.
    #[error("the audit record repeats a serial number already issued")]
    DuplicateSerial,
    /// The writer has stopped (the server is shutting down).
    #[error("the audit log is closed because the server is shutting down")]
    Closed,
}

type Pending = (AuditEvent, oneshot::Sender<Result<AuditRecord, AuditError>>);

/// A handle to the audit writer; cheap to clone.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
}

impl AuditLog {
    /// Starts the writer task on `store`.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(store, rx));
        Self { tx }
    }

    /// Appends `event` (its time set now if unset) and returns its record once durable.
    ///
    /// # Errors
    /// [`AuditError`] when the record could not be made durable: the caller must then not
    /// hand out what it was about to.
    pub async fn record(&self, mut event: AuditEvent) -> Result<AuditRecord, AuditError> {
        if event.time_ms == 0 {
            event.time_ms = now_ms();
        }
        let (reply, wait) = oneshot::channel();
        self.tx
            .send((event, reply))
            .await
            .map_err(|_| AuditError::Closed)?;
        wait.await.map_err(|_| AuditError::Closed)?
    }
}

/// Now, in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

async fn write_loop(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Pending>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    // The batch split in two, so the events go to the store without being copied.
    let mut events: Vec<AuditEvent> = Vec::with_capacity(MAX_BATCH);
    let mut replies = Vec::with_capacity(MAX_BATCH);
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        for (event, reply) in batch.drain(..) {
            events.push(event);
            replies.push(reply);
        }
        match store.append_audit(&events).await {
            Ok(records) => {
                for (reply, record) in replies.drain(..).zip(records) {
                    let _ = reply.send(Ok(record));
                }
            }
            Err(StoreError::AlreadyExists(_)) if events.len() > 1 => {
                // One record in the batch repeats a serial and the store wrote nothing: append
                // the records one by one so only the offending one fails.
                for (event, reply) in events.drain(..).zip(replies.drain(..)) {
                    let result = store
                        .append_audit(std::slice::from_ref(&event))
                        .await
                        .map(|mut r| r.remove(0))
                        .map_err(to_audit_error);
                    let _ = reply.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = events.len(), "audit append failed");
                let err = to_audit_error(e);
                for reply in replies.drain(..) {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
        events.clear();
        replies.clear();
    }
}

fn to_audit_error(e: StoreError) -> AuditError {
    match e {
        StoreError::AlreadyExists(_) => AuditError::DuplicateSerial,
        other => AuditError::Store(other.to_string()),
    }
}

//! The server's audit writer: group commit onto the store's hash chain.
//!
//! Every issuance waits until its record is durable before the SVID is returned. One fsync per
//! record would cap issuance at the disk's sync rate, so one writer task gathers whatever
//! records arrive while the previous transaction commits and appends them together: each
//! caller still gets its own durable record, and the rate scales with concurrency. A record that
//! finds nothing else under way is appended by its caller directly: there is nothing to gather
//! then, and the hand-offs to and from the writer task would only add to the caller's wait.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, oneshot};

use crate::audit::{AuditEvent, AuditRecord};
use crate::store::{Store, StoreError};
use crate::under_way::UnderWay;

/// The most records committed in one transaction.
const MAX_BATCH: usize = 512;
/// Records waiting for the writer before callers are made to wait for room.
const QUEUE: usize = 8192;

/// Why a record could not be written.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The store refused the batch holding this record. The store's error is shared by every
    /// record of the batch, hence the `Arc`.
    #[error("the audit record could not be stored")]
    Store(#[source] Arc<StoreError>),
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
    store: Arc<dyn Store>,
    /// Records being written, directly or by the writer task.
    under_way: UnderWay,
}

impl AuditLog {
    /// Starts the writer task on `store`.
    pub fn start(store: Arc<dyn Store>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(write_loop(store.clone(), rx));
        Self {
            tx,
            store,
            under_way: UnderWay::default(),
        }
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
        let under_way = self.under_way.enter();
        if under_way.others() == 0 {
            return append_one(&*self.store, &event).await;
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
                    let _ = reply.send(append_one(&*store, &event).await);
                }
            }
            Err(e) => {
                tracing::error!(error = %crate::wire::error_chain(&e), records = events.len(), "audit append failed");
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

/// Appends one record on its own.
async fn append_one(store: &dyn Store, event: &AuditEvent) -> Result<AuditRecord, AuditError> {
    store
        .append_audit(std::slice::from_ref(event))
        .await
        .map(|mut records| records.remove(0))
        .map_err(to_audit_error)
}

fn to_audit_error(e: StoreError) -> AuditError {
    match e {
        StoreError::AlreadyExists(_) => AuditError::DuplicateSerial,
        other => AuditError::Store(Arc::new(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::ChainVerifier;
    use crate::store::AuditFilter;
    use crate::store::sqlite::SqliteStore;

    fn issued(n: u32) -> AuditEvent {
        AuditEvent {
            reason: "issued".into(),
            task_id: Some(format!("task-{n}")),
            serial: crate::svid::Serial::from_hex(&format!("01{n:030x}")),
            ..AuditEvent::new(crate::audit::AuditAction::SvidTask)
        }
    }

    async fn chain_length(store: &dyn Store) -> i64 {
        let (seq, hash) = store.audit_head().await.unwrap();
        let mut verifier = ChainVerifier::new();
        for record in store.list_audit(&AuditFilter::default()).await.unwrap() {
            verifier.push(&record).unwrap();
        }
        verifier.finish(seq, hash).unwrap()
    }

    /// Records alone (written by their callers) and records at once (gathered by the writer
    /// task) land on one chain, each caller with its own record; a repeated serial fails only
    /// its own caller, on either path.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn lone_and_concurrent_records_form_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> =
            Arc::new(SqliteStore::open(&dir.path().join("a.db")).await.unwrap());
        let log = AuditLog::start(store.clone());

        let first = log.record(issued(1)).await.unwrap();
        assert_eq!(first.seq, 1);
        assert!(first.event.time_ms > 0, "the time is set when unset");
        // Alone, a repeated serial is refused and nothing is written.
        assert!(matches!(
            log.record(issued(1)).await,
            Err(AuditError::DuplicateSerial)
        ));

        let callers: Vec<_> = (2..=101u32)
            .map(|n| {
                let log = log.clone();
                // One of them repeats serial 1.
                let event = if n == 50 { issued(1) } else { issued(n) };
                tokio::spawn(async move { (n, log.record(event).await) })
            })
            .collect();
        let mut seqs = Vec::new();
        for caller in callers {
            let (n, result) = caller.await.unwrap();
            match result {
                Ok(record) => {
                    assert_eq!(record.event.task_id, Some(format!("task-{n}")));
                    seqs.push(record.seq);
                }
                Err(e) => {
                    assert_eq!(n, 50, "only the repeated serial fails: {e}");
                    assert!(matches!(e, AuditError::DuplicateSerial));
                }
            }
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (2..=100).collect::<Vec<i64>>());
        assert_eq!(chain_length(&*store).await, 100);
    }
}

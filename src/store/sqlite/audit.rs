//! Appending to the hash-chained audit log on SQLite, in as few trips to SQLite as possible.
//!
//! sqlx runs each SQLite connection on a thread of its own, and every statement is a round
//! trip to that thread: two thread wake-ups, which on a quiet server cost more than the
//! statements themselves. An append done step by step (begin, read the chain head, insert,
//! move the head, commit) is five such trips, and an issued SVID waits for all of them.
//!
//! The appender has a connection of its own and remembers the chain head its last append
//! left. With it, an append is one statement list sent in one trip: `BEGIN IMMEDIATE`, the
//! inserts chained from the remembered head, the head update, `COMMIT`. Should another
//! connection (another process on the same file) have appended meanwhile, the remembered head
//! is stale and the first insert reuses a sequence number, which the primary key refuses; the
//! appender then rolls back and appends step by step from the head it reads under the write
//! lock, as it also does for its first append and after any failure. Nothing is written by a
//! failed attempt: every statement list starts its own transaction and ends with its commit.

use std::sync::LazyLock;

use sqlx::sqlite::SqliteConnectOptions;
use sqlx::{ConnectOptions, Connection, Sqlite, SqliteConnection};
use tokio::sync::Mutex;

use crate::audit::{self, AuditEvent, AuditRecord, Decision};
use crate::store::StoreError;
use crate::store::rows::{self, audit_columns};

/// Rows per multi-row `INSERT INTO audit`: a batch is written in chunks of these sizes, largest
/// first, so each batch costs a few statements instead of one per record, and only these few
/// statements are ever prepared (and cached) on the connection.
const AUDIT_CHUNKS: [usize; 6] = [32, 16, 8, 4, 2, 1];

/// The number of columns in `audit_columns!()`.
const AUDIT_COLUMNS: usize = 15;

/// The largest batch appended in one trip; larger ones (rare: only a burst fills them) go step
/// by step. Every batch size up to it is one statement list prepared on the connection, so it
/// also bounds what the connection's statement cache holds.
const ONE_TRIP_MOST: usize = 32;

/// Moves the chain head; its parameters follow the inserts' in a one-trip list.
const UPDATE_HEAD: &str = "UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1";

/// The `INSERT INTO audit` statement for each size in [`AUDIT_CHUNKS`].
static AUDIT_INSERTS: LazyLock<Vec<(usize, String)>> = LazyLock::new(|| {
    AUDIT_CHUNKS
        .iter()
        .map(|&rows| {
            // Anonymous `?` parameters, bound in order: SQLite looks a named one (`$N`) up
            // by a scan of all the names, which over hundreds of them costs more than the
            // insert itself. Across a statement list, sqlx binds them in order too.
            let row = format!("({})", vec!["?"; AUDIT_COLUMNS].join(", "));
            let values = vec![row; rows].join(", ");
            (
                rows,
                format!(
                    concat!("INSERT INTO audit (", audit_columns!(), ") VALUES {}"),
                    values
                ),
            )
        })
        .collect()
});

/// The sizes, from [`AUDIT_CHUNKS`], that `n` records are inserted in.
fn chunk_sizes(mut n: usize) -> Vec<usize> {
    let mut sizes = Vec::new();
    while n > 0 {
        let size = AUDIT_CHUNKS.into_iter().find(|&s| s <= n).unwrap_or(1);
        sizes.push(size);
        n -= size;
    }
    sizes
}

fn insert_sql(rows: usize) -> &'static str {
    AUDIT_INSERTS
        .iter()
        .find(|(r, _)| *r == rows)
        .map(|(_, sql)| sql.as_str())
        .unwrap_or_else(|| unreachable!("chunk sizes come from AUDIT_CHUNKS"))
}

/// The statement list appending `n` records in one trip, for each `n` up to [`ONE_TRIP_MOST`].
static ONE_TRIP: LazyLock<Vec<String>> =
    LazyLock::new(|| (0..=ONE_TRIP_MOST).map(one_trip_sql).collect());

/// The statement list appending `n` records in one trip.
fn one_trip_sql(n: usize) -> String {
    let mut sql = String::from("BEGIN IMMEDIATE; ");
    for size in chunk_sizes(n) {
        sql.push_str(insert_sql(size));
        sql.push_str("; ");
    }
    sql.push_str(UPDATE_HEAD);
    sql.push_str("; COMMIT");
    sql
}

/// Binds `records`' columns, in the order of `audit_columns!()`.
fn bind_records<'q>(
    mut query: sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments>,
    records: &'q [AuditRecord],
) -> sqlx::query::Query<'q, Sqlite, sqlx::sqlite::SqliteArguments> {
    for record in records {
        let event = &record.event;
        query = query
            .bind(record.seq)
            .bind(event.time_ms)
            .bind(event.action.as_str())
            .bind(event.decision.map(Decision::as_str))
            .bind(&event.reason)
            .bind(event.agent_id.as_deref())
            .bind(event.attestor.as_deref())
            .bind(event.entry_id.as_deref())
            .bind(event.spiffe_id.as_deref())
            .bind(event.task_id.as_deref())
            .bind(rows::audit_scopes(event))
            .bind(event.serial.map(|s| s.to_hex()))
            .bind(event.not_after)
            .bind(&record.prev_hash[..])
            .bind(&record.hash[..]);
    }
    query
}

/// The appender's connection and what its last append left as the chain head.
#[derive(Default)]
struct Appending {
    conn: Option<SqliteConnection>,
    head: Option<(i64, [u8; 32])>,
}

/// Appends audit batches over a connection of its own (see the module's documentation).
pub(super) struct AuditAppender {
    options: SqliteConnectOptions,
    state: Mutex<Appending>,
}

impl std::fmt::Debug for AuditAppender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditAppender").finish_non_exhaustive()
    }
}

impl AuditAppender {
    /// An appender that connects with `options` on first use.
    pub(super) fn new(options: SqliteConnectOptions) -> Self {
        Self {
            options,
            state: Mutex::new(Appending::default()),
        }
    }

    /// Appends `events` to the chain in one transaction, durably, and returns their records.
    /// Concurrent callers are served one at a time.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when a record repeats an issued serial number (nothing is
    /// written then); [`StoreError::Database`].
    pub(super) async fn append(
        &self,
        events: &[AuditEvent],
    ) -> Result<Vec<AuditRecord>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut state = self.state.lock().await;
        // The connection is out of the state while in use: should this future be dropped
        // half-way, it is closed (SQLite rolls back what it had begun) rather than reused.
        let mut conn = match state.conn.take() {
            Some(conn) => conn,
            None => self.options.connect().await?,
        };
        if let Some(head) = state.head.take()
            && events.len() <= ONE_TRIP_MOST
        {
            let records = audit::chain(head.0, head.1, events);
            let sql = ONE_TRIP[records.len()].as_str();
            let last = records.last().map(|r| (r.seq, r.hash));
            let query = bind_records(sqlx::query(sqlx::AssertSqlSafe(sql)), &records);
            let (seq, hash) = last.unwrap_or(head);
            let done = query.bind(seq).bind(hash.to_vec()).execute(&mut conn).await;
            match done {
                Ok(_) => {
                    state.head = last;
                    state.conn = Some(conn);
                    return Ok(records);
                }
                // A stale head, a repeated serial or a busy database: undo whatever the list
                // began, then go step by step, which tells these apart.
                // (A rollback that fails because nothing was begun is fine; one that leaves a
                // transaction open makes the next BEGIN fail, and the connection is dropped.)
                Err(_) => {
                    let _ = sqlx::query("ROLLBACK").execute(&mut conn).await;
                }
            }
        }
        let records = step_by_step(&mut conn, events).await?;
        state.head = records.last().map(|r| (r.seq, r.hash));
        state.conn = Some(conn);
        Ok(records)
    }

    /// Closes the connection.
    pub(super) async fn close(&self) {
        if let Some(conn) = self.state.lock().await.conn.take() {
            let _ = conn.close().await;
        }
    }
}

/// Appends `events` from the head read under the write lock: begin, read the head, insert in
/// chunks, move the head, commit.
async fn step_by_step(
    conn: &mut SqliteConnection,
    events: &[AuditEvent],
) -> Result<Vec<AuditRecord>, StoreError> {
    let mut tx = conn.begin_with("BEGIN IMMEDIATE").await?;
    let (head_seq, head_hash) = rows::audit_head(
        sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?,
    )?;
    let records = audit::chain(head_seq, head_hash, events);
    let mut rest = &records[..];
    while !rest.is_empty() {
        let (chunk, tail) = rest.split_at(chunk_sizes(rest.len())[0]);
        match insert(chunk).execute(&mut *tx).await {
            Ok(_) => {}
            // A multi-row statement that breaks a constraint is backed out on its own (the
            // transaction stays open): insert its rows one by one so the error names the
            // offending serial, exactly as a single-row batch does.
            Err(e) if chunk.len() > 1 && is_unique_violation(&e) => {
                for one in chunk {
                    insert(std::slice::from_ref(one))
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| audit_exists(e, one))?;
                }
            }
            Err(e) => return Err(audit_exists(e, &chunk[0])),
        }
        rest = tail;
    }
    if let Some(last) = records.last() {
        sqlx::query(UPDATE_HEAD)
            .bind(last.seq)
            .bind(&last.hash[..])
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(records)
}

/// One `INSERT INTO audit` of `rows`, whose count is a size in [`AUDIT_CHUNKS`].
fn insert(rows: &[AuditRecord]) -> sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments> {
    bind_records(
        sqlx::query(sqlx::AssertSqlSafe(insert_sql(rows.len()))),
        rows,
    )
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// A failed audit insert, as [`StoreError::AlreadyExists`] naming the serial of `record` when it
/// is a unique violation.
fn audit_exists(err: sqlx::Error, record: &AuditRecord) -> StoreError {
    rows::unique_violation(err, || {
        format!(
            "an audit record for serial {}",
            record
                .event
                .serial
                .map_or_else(|| "?".to_owned(), |s| s.to_hex())
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_size_largest_first() {
        assert_eq!(chunk_sizes(0), Vec::<usize>::new());
        assert_eq!(chunk_sizes(1), vec![1]);
        assert_eq!(chunk_sizes(31), vec![16, 8, 4, 2, 1]);
        assert_eq!(chunk_sizes(70), vec![32, 32, 4, 2]);
        for n in 0..200 {
            assert_eq!(chunk_sizes(n).iter().sum::<usize>(), n);
        }
    }

    #[test]
    fn one_trip_list_is_one_transaction_with_a_parameter_per_column() {
        let sql = one_trip_sql(3);
        assert!(sql.starts_with("BEGIN IMMEDIATE; INSERT INTO audit"));
        assert!(sql.ends_with("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1; COMMIT"));
        assert_eq!(sql.matches("INSERT INTO audit").count(), 2);
        assert_eq!(sql.matches('?').count(), 3 * AUDIT_COLUMNS + 2);
    }
}

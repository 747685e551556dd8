//! The SQLite engine: the embedded default, one WAL file in the server's data dir.
//!
//! Durability: `synchronous=FULL`, so a committed audit record is on disk before the SVID it
//! describes is returned. Concurrency: registration writes go through one writer connection (a
//! pool of one, which queues callers fairly), audit appends through one of their own (see
//! `sqlite_audit`), and multi-statement writes open with `BEGIN IMMEDIATE`, so they take
//! SQLite's write lock up front and wait for it (busy timeout 5 s) instead of failing when
//! another connection or process writes the same file. Reads use connections of their own
//! (`Readers`; under load the agent and entry lookups of every issuance are batched, see
//! `serve_lookups`) and, thanks to WAL, never wait for a writer.

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::{Arc, LazyLock, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions, Connection, FromRow, Row, Sqlite, SqliteConnection, Transaction};
use tokio::sync::{Semaphore, SemaphorePermit, mpsc, oneshot};

use super::rows::{
    self, AgentRow, AuditRow, CaCertRow, EntryColumns, EntryRow, agent_columns, audit_columns,
    entry_columns,
};
use super::sqlite_audit::AuditAppender;
use super::{
    AgentRecord, AuditFilter, CaCertRecord, Entry, EntryId, JoinTokenRecord, Store, StoreError,
};
use crate::audit::{AuditEvent, AuditRecord};
use crate::id::SpiffeId;
use crate::svid::Serial;
use crate::under_way::UnderWay;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

/// Connections for concurrent reads.
const READERS: u32 = 4;
/// How long a statement waits for another connection's (or process's) write lock.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    /// The single connection every write goes through.
    writer: SqlitePool,
    /// Connections for reads.
    reader: Arc<Readers>,
    /// The batcher of agent and entry lookups (see [`serve_lookups`]).
    lookups: mpsc::UnboundedSender<Lookup>,
    /// Lookups under way, batched or not (see [`SqliteStore::lookup`]).
    lookups_under_way: UnderWay,
    /// Audit appends, over a connection of their own.
    audit: Arc<AuditAppender>,
}

/// The connections reads go through, lent whole. A `SqlitePool` pings every connection it
/// takes back, a round trip to that connection's worker thread; the issuance path reads twice
/// per request, so lending connections directly halves its trips to SQLite's threads. A read
/// cancelled half-way is harmless: its connection's worker finishes the statement before it
/// takes the next one, and each statement answers on its own channel.
struct Readers {
    idle: std::sync::Mutex<Vec<SqliteConnection>>,
    /// One permit per idle connection; closed when the store is.
    available: Semaphore,
}

impl std::fmt::Debug for Readers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Readers")
            .field("available", &self.available.available_permits())
            .finish_non_exhaustive()
    }
}

impl Readers {
    async fn open(options: &SqliteConnectOptions) -> Result<Self, sqlx::Error> {
        let mut idle = Vec::with_capacity(READERS as usize);
        for _ in 0..READERS {
            idle.push(options.connect().await?);
        }
        Ok(Self {
            idle: std::sync::Mutex::new(idle),
            available: Semaphore::new(READERS as usize),
        })
    }

    /// An idle connection, waiting (first come, first served) for one when all are lent.
    async fn get(&self) -> Result<Reader<'_>, sqlx::Error> {
        let permit = self
            .available
            .acquire()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let conn = self
            .idle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .ok_or(sqlx::Error::PoolClosed)?;
        Ok(Reader {
            conn: Some(conn),
            readers: self,
            _permit: permit,
        })
    }

    /// Waits for every lent connection to come back, then closes them all.
    async fn close(&self) {
        if let Ok(all) = self.available.acquire_many(READERS).await {
            all.forget();
        }
        self.available.close();
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(PoisonError::into_inner));
        for conn in idle {
            let _ = conn.close().await;
        }
    }
}

/// A lent read connection; it goes back to its [`Readers`] when dropped.
struct Reader<'a> {
    conn: Option<SqliteConnection>,
    readers: &'a Readers,
    /// Released after `drop` has put the connection back, so whoever it wakes finds it.
    _permit: SemaphorePermit<'a>,
}

impl std::ops::Deref for Reader<'_> {
    type Target = SqliteConnection;
    fn deref(&self) -> &SqliteConnection {
        self.conn
            .as_ref()
            .expect("a lent connection is present until dropped")
    }
}

impl std::ops::DerefMut for Reader<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn
            .as_mut()
            .expect("a lent connection is present until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            self.readers
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(conn);
        }
    }
}

impl SqliteStore {
    /// Opens (creating if missing) the database at `path` and applies migrations.
    ///
    /// A missing parent directory is created with mode 0700 and a missing database file with
    /// mode 0600 (SQLite gives its `-wal` and `-shm` files the same mode).
    ///
    /// # Errors
    /// [`StoreError::Database`] when the file cannot be created or opened,
    /// [`StoreError::Migrate`] when the schema cannot be brought up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        prepare_file(path).map_err(|e| {
            StoreError::Database(sqlx::Error::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", path.display()),
            )))
        })?;
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            // SQLite's default checkpoint interval (1,000 pages) stays on purpose: 16,384 cut
            // the server's CPU per SVID by 8% under load, but a WAL growing towards 64 MiB
            // makes every commit's fsync also commit the file's new size (measured +50-65 µs
            // per fsync here), which a task SVID minted one at a time waits for.
            .foreign_keys(true);
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        MIGRATOR.run(&writer).await?;
        let reader = Arc::new(Readers::open(&options).await?);
        let (lookups, requests) = mpsc::unbounded_channel();
        // Outside a tokio runtime the receiver is dropped here, and lookups go straight to the
        // readers (see `lookup`).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(serve_lookups(reader.clone(), requests));
        }
        Ok(Self {
            writer,
            reader,
            lookups,
            lookups_under_way: UnderWay::default(),
            audit: Arc::new(AuditAppender::new(options)),
        })
    }

    /// The pool writes go through (one connection), for tests and maintenance.
    pub fn pool(&self) -> &SqlitePool {
        &self.writer
    }

    /// Closes every connection, waiting for them to finish.
    pub async fn close(&self) {
        self.audit.close().await;
        self.reader.close().await;
        self.writer.close().await;
    }

    /// A connection for one read.
    async fn read(&self) -> Result<Reader<'_>, sqlx::Error> {
        self.reader.get().await
    }

    /// A write transaction holding SQLite's write lock from its first statement.
    async fn write(&self) -> Result<Transaction<'static, Sqlite>, StoreError> {
        Ok(self.writer.begin_with("BEGIN IMMEDIATE").await?)
    }
}

/// Creates the parent directory (0700) and an empty database file (0600) when missing.
fn prepare_file(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && !parent.exists()
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
    }
    match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

/// Looks up one agent by SPIFFE ID.
const AGENT_BY_ID: &str = concat!(
    "SELECT ",
    agent_columns!(),
    " FROM agents WHERE spiffe_id = $1"
);
/// Looks up one entry by ID.
const ENTRY_BY_ID: &str = concat!("SELECT ", entry_columns!(), " FROM entries WHERE id = $1");

/// The sizes a batched lookup is padded to (repeating its last key), so only these few
/// statements are ever prepared; the largest is the most keys one statement asks for.
const LOOKUP_SIZES: [usize; 6] = [1, 2, 4, 8, 16, 32];

/// `SELECT … FROM agents WHERE spiffe_id IN (…)` for each size in [`LOOKUP_SIZES`].
static AGENT_LOOKUPS: LazyLock<Vec<String>> = LazyLock::new(|| {
    lookup_statements(concat!(
        "SELECT ",
        agent_columns!(),
        " FROM agents WHERE spiffe_id IN "
    ))
});
/// `SELECT … FROM entries WHERE id IN (…)` for each size in [`LOOKUP_SIZES`].
static ENTRY_LOOKUPS: LazyLock<Vec<String>> = LazyLock::new(|| {
    lookup_statements(concat!(
        "SELECT ",
        entry_columns!(),
        " FROM entries WHERE id IN "
    ))
});

fn lookup_statements(prefix: &str) -> Vec<String> {
    LOOKUP_SIZES
        .iter()
        .map(|&n| format!("{prefix}({})", vec!["?"; n].join(", ")))
        .collect()
}

type Reply<T> = oneshot::Sender<Result<Option<T>, StoreError>>;

/// A point lookup waiting for the batcher: the key and where to send the answer.
enum Lookup {
    Agent(String, Reply<AgentRecord>),
    Entry(String, Reply<Entry>),
}

/// Answers agent and entry lookups, the two reads of every issuance, in batches: whatever
/// lookups are waiting when a batch starts are asked with one statement per table, so under
/// load the trips to SQLite's threads no longer grow with the request rate. Each statement
/// starts after the lookups it answers were asked, so every caller still reads what was
/// committed before it asked, as with a query of its own.
///
/// It runs on the runtime that opened the store, so that runtime must keep running while the
/// store is used (a current-thread runtime left idle would leave lookups waiting); once that
/// runtime is gone, lookups go straight to the readers.
async fn serve_lookups(readers: Arc<Readers>, mut requests: mpsc::UnboundedReceiver<Lookup>) {
    let most = 2 * LOOKUP_SIZES[LOOKUP_SIZES.len() - 1];
    let mut batch = Vec::with_capacity(most);
    while requests.recv_many(&mut batch, most).await > 0 {
        let mut agents = Vec::new();
        let mut entries = Vec::new();
        for lookup in batch.drain(..) {
            match lookup {
                Lookup::Agent(key, reply) => agents.push((key, reply)),
                Lookup::Entry(key, reply) => entries.push((key, reply)),
            }
        }
        tokio::join!(
            answer_lookups::<AgentRow, AgentRecord>(
                &readers,
                &AGENT_LOOKUPS,
                AGENT_BY_ID,
                "spiffe_id",
                agents
            ),
            answer_lookups::<EntryRow, Entry>(&readers, &ENTRY_LOOKUPS, ENTRY_BY_ID, "id", entries),
        );
    }
}

/// Answers `waiting` lookups of one table, [`LOOKUP_SIZES`]'s largest at a time. Should a
/// batch fail (a database error, a corrupt row), each of its lookups is asked again on its
/// own, so every caller gets exactly the answer a query of its own would have given.
async fn answer_lookups<R, T>(
    readers: &Readers,
    statements: &[String],
    one: &'static str,
    key_column: &str,
    mut waiting: Vec<(String, Reply<T>)>,
) where
    R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    T: TryFrom<R, Error = StoreError> + Clone,
{
    while !waiting.is_empty() {
        let take = waiting.len().min(LOOKUP_SIZES[LOOKUP_SIZES.len() - 1]);
        let chunk: Vec<_> = waiting.drain(..take).collect();
        let size = LOOKUP_SIZES
            .iter()
            .position(|&n| n >= chunk.len())
            .unwrap_or(LOOKUP_SIZES.len() - 1);
        let mut query = sqlx::query(sqlx::AssertSqlSafe(statements[size].as_str()));
        for i in 0..LOOKUP_SIZES[size] {
            query = query.bind(chunk[i.min(chunk.len() - 1)].0.as_str());
        }
        let rows = match readers.get().await {
            Ok(mut conn) => query.fetch_all(&mut *conn).await.ok(),
            Err(_) => None,
        };
        let found = rows.and_then(|rows| {
            rows.iter()
                .map(|row| {
                    let key: String = row.try_get(key_column).ok()?;
                    let record = T::try_from(R::from_row(row).ok()?).ok()?;
                    Some((key, record))
                })
                .collect::<Option<Vec<_>>>()
        });
        match found {
            Some(found) => {
                for (key, reply) in chunk {
                    let record = found
                        .iter()
                        .find(|(k, _)| *k == key)
                        .map(|(_, r)| r.clone());
                    let _ = reply.send(Ok(record));
                }
            }
            None => {
                for (key, reply) in chunk {
                    let _ = reply.send(lookup_one::<R, T>(readers, one, &key).await);
                }
            }
        }
    }
}

/// One lookup by key, on its own.
async fn lookup_one<R, T>(
    readers: &Readers,
    sql: &'static str,
    key: &str,
) -> Result<Option<T>, StoreError>
where
    R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    T: TryFrom<R, Error = StoreError>,
{
    sqlx::query_as::<_, R>(sql)
        .bind(key)
        .fetch_optional(&mut *readers.get().await?)
        .await?
        .map(T::try_from)
        .transpose()
}

impl SqliteStore {
    /// Looks one agent or entry up. On a quiet store (fewer than [`DIRECT_LOOKUPS`] under way)
    /// the lookup goes straight to a reader: batching has nothing to gather then, and the trip
    /// through the batcher task would only add two thread hand-offs to the caller's wait.
    /// Otherwise it goes to the batcher; should that be gone (its runtime shut down), it asks
    /// directly too.
    async fn lookup<R, T>(
        &self,
        lookup: impl FnOnce(Reply<T>) -> Lookup,
        one: &'static str,
        key: &str,
    ) -> Result<Option<T>, StoreError>
    where
        R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
        T: TryFrom<R, Error = StoreError>,
    {
        let under_way = self.lookups_under_way.enter();
        if under_way.others() < DIRECT_LOOKUPS {
            return lookup_one::<R, T>(&self.reader, one, key).await;
        }
        let (reply, answer) = oneshot::channel();
        if self.lookups.send(lookup(reply)).is_ok()
            && let Ok(result) = answer.await
        {
            return result;
        }
        lookup_one::<R, T>(&self.reader, one, key).await
    }
}

/// Below this many lookups under way, a lookup skips the batcher: an issuance makes two at
/// once, and a quiet server should answer both without it.
const DIRECT_LOOKUPS: usize = 2;

#[async_trait]
impl Store for SqliteStore {
    async fn create_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        let columns = EntryColumns::new(entry);
        let mut tx = self.write().await?;
        sqlx::query(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, scopes, ttl_secs, \
             dns_names, created_at, identity_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(entry.id.as_str())
        .bind(entry.spiffe_id.as_str())
        .bind(entry.parent_id.as_str())
        .bind(&columns.selectors)
        .bind(&columns.scopes)
        .bind(columns.ttl_secs)
        .bind(&columns.dns_names)
        .bind(entry.created_at)
        .bind(&columns.identity_key)
        .execute(&mut *tx)
        .await
        .map_err(|e| rows::entry_exists(e, entry))?;
        sqlx::query("UPDATE entries_revision SET revision = revision + 1 WHERE id = 1")
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(())
    }

    async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError> {
        let key = id.as_str().to_owned();
        self.lookup::<EntryRow, Entry>(|reply| Lookup::Entry(key, reply), ENTRY_BY_ID, id.as_str())
            .await
    }

    async fn list_entries(&self) -> Result<Vec<Entry>, StoreError> {
        sqlx::query_as::<_, EntryRow>(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM entries ORDER BY spiffe_id, id"
        ))
        .fetch_all(&mut *self.read().await?)
        .await?
        .into_iter()
        .map(Entry::try_from)
        .collect()
    }

    async fn list_entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError> {
        sqlx::query_as::<_, EntryRow>(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM entries WHERE parent_id = $1 ORDER BY spiffe_id, id"
        ))
        .bind(parent.as_str())
        .fetch_all(&mut *self.read().await?)
        .await?
        .into_iter()
        .map(Entry::try_from)
        .collect()
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let deleted = sqlx::query("DELETE FROM entries WHERE id = $1")
            .bind(id.as_str())
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        if deleted {
            sqlx::query("UPDATE entries_revision SET revision = revision + 1 WHERE id = 1")
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    async fn entries_revision(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM entries_revision WHERE id = 1")
                .fetch_one(&mut *self.read().await?)
                .await?,
        )
    }

    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (secret_hash, node_id, expires_at) VALUES ($1, $2, $3)",
        )
        .bind(&token.secret_hash[..])
        .bind(&token.node_id)
        .bind(token.expires_at)
        .execute(&self.writer)
        .await
        .map_err(|e| rows::unique_violation(e, || "a join token with this secret".to_owned()))?;
        Ok(())
    }

    async fn consume_join_token(
        &self,
        secret_hash: &[u8; 32],
        now: i64,
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        // One statement, so one atomic step: of concurrent callers exactly one deletes the row
        // and gets it back. An expired token is deleted too. `fetch_all` runs the statement to
        // completion, so its implicit transaction commits before the connection is reused.
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "DELETE FROM join_tokens WHERE secret_hash = $1 RETURNING node_id, expires_at",
        )
        .bind(&secret_hash[..])
        .fetch_all(&self.writer)
        .await?;
        Ok(rows
            .into_iter()
            .next()
            .filter(|&(_, expires_at)| now < expires_at)
            .map(|(node_id, expires_at)| JoinTokenRecord {
                secret_hash: *secret_hash,
                node_id,
                expires_at,
            }))
    }

    async fn create_agent(&self, agent: &AgentRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO agents (spiffe_id, attestor, current_serial, next_serial, not_after, \
             banned, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(agent.spiffe_id.as_str())
        .bind(&agent.attestor)
        .bind(agent.current_serial.to_hex())
        .bind(agent.next_serial.map(|s| s.to_hex()))
        .bind(agent.not_after)
        .bind(agent.banned)
        .bind(agent.created_at)
        .execute(&self.writer)
        .await
        .map_err(|e| rows::unique_violation(e, || format!("agent {}", agent.spiffe_id)))?;
        Ok(())
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
        let key = id.as_str().to_owned();
        self.lookup::<AgentRow, AgentRecord>(
            |reply| Lookup::Agent(key, reply),
            AGENT_BY_ID,
            id.as_str(),
        )
        .await
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        sqlx::query_as::<_, AgentRow>(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM agents ORDER BY spiffe_id"
        ))
        .fetch_all(&mut *self.read().await?)
        .await?
        .into_iter()
        .map(AgentRecord::try_from)
        .collect()
    }

    async fn set_agent_next_serial(
        &self,
        id: &SpiffeId,
        presented_serial: &Serial,
        next_serial: &Serial,
        not_after: i64,
    ) -> Result<bool, StoreError> {
        let updated = sqlx::query(
            "UPDATE agents SET next_serial = $3, not_after = $4 \
             WHERE spiffe_id = $1 AND banned = 0 \
             AND (current_serial = $2 OR next_serial = $2)",
        )
        .bind(id.as_str())
        .bind(presented_serial.to_hex())
        .bind(next_serial.to_hex())
        .bind(not_after)
        .execute(&self.writer)
        .await?
        .rows_affected();
        Ok(updated > 0)
    }

    /// `true` when `serial` was the next serial and is now current, and also when it already
    /// was the current one (a repeated promotion is harmless, so callers can retry); `false`
    /// for an unknown agent or any other serial, such as a superseded one.
    async fn promote_agent_serial(
        &self,
        id: &SpiffeId,
        serial: &Serial,
    ) -> Result<bool, StoreError> {
        let serial = serial.to_hex();
        let promoted = sqlx::query(
            "UPDATE agents SET current_serial = next_serial, next_serial = NULL \
             WHERE spiffe_id = $1 AND next_serial = $2",
        )
        .bind(id.as_str())
        .bind(&serial)
        .execute(&self.writer)
        .await?
        .rows_affected()
            > 0;
        if promoted {
            return Ok(true);
        }
        // Read through the writer so a promotion committed just before is seen.
        let current: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM agents WHERE spiffe_id = $1 AND current_serial = $2")
                .bind(id.as_str())
                .bind(&serial)
                .fetch_optional(&self.writer)
                .await?;
        Ok(current.is_some())
    }

    async fn ban_agent(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        let updated = sqlx::query("UPDATE agents SET banned = 1 WHERE spiffe_id = $1")
            .bind(id.as_str())
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(updated > 0)
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM agents WHERE spiffe_id = $1")
            .bind(id.as_str())
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn put_ca_cert(&self, cert: &CaCertRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO ca_certs (fingerprint, der, not_after) VALUES ($1, $2, $3) \
             ON CONFLICT (fingerprint) DO NOTHING",
        )
        .bind(&cert.fingerprint)
        .bind(&cert.der)
        .bind(cert.not_after)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn list_ca_certs(&self, now: i64) -> Result<Vec<CaCertRecord>, StoreError> {
        // A certificate is valid through its notAfter second (RFC 5280 §4.1.2.5).
        Ok(sqlx::query_as::<_, CaCertRow>(
            "SELECT fingerprint, der, not_after FROM ca_certs WHERE not_after >= $1 \
             ORDER BY fingerprint",
        )
        .bind(now)
        .fetch_all(&mut *self.read().await?)
        .await?
        .into_iter()
        .map(CaCertRecord::from)
        .collect())
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> Result<Vec<AuditRecord>, StoreError> {
        self.audit.append(events).await
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        sqlx::query_as::<_, AuditRow>(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit WHERE seq > $1 AND ($2 IS NULL OR task_id = $2) \
             ORDER BY seq LIMIT coalesce($3, -1)"
        ))
        .bind(filter.after_seq)
        .bind(filter.task_id.as_deref())
        .bind(rows::limit(filter.limit))
        .fetch_all(&mut *self.read().await?)
        .await?
        .into_iter()
        .map(AuditRecord::try_from)
        .collect()
    }

    async fn audit_head(&self) -> Result<(i64, [u8; 32]), StoreError> {
        rows::audit_head(
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                .fetch_one(&mut *self.read().await?)
                .await?,
        )
    }
}

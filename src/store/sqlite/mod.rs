//! The SQLite engine: the embedded default, one WAL file in the server's data dir.
//!
//! Durability: `synchronous=FULL`, so a committed audit record is on disk before the SVID it
//! describes is returned. Concurrency: registration writes go through one writer connection (a
//! pool of one, which queues callers fairly), audit appends through one of their own, and
//! multi-statement writes open with `BEGIN IMMEDIATE`, so they take SQLite's write lock up
//! front and wait for it (busy timeout 5 s) instead of failing when another connection or
//! process writes the same file. Reads use connections of their own and, thanks to WAL, never
//! wait for a writer.
//!
//! # The fast path, and its seam
//!
//! sqlx runs each SQLite connection on a thread of its own, so every statement is a round trip
//! to that thread (two wake-ups), which on a quiet server costs more than the statement. The
//! issuance path (two lookups, one durable audit record) is therefore cut down to as few trips
//! as it can take. Every such shortcut lives in this folder, behind [`SqliteStore`]'s
//! [`Store`] methods: nothing outside sees more than the trait, so each piece can be removed
//! (or replaced by the plain statement it stands for) without touching a caller. The pieces:
//!
//! - [`readers`]: read connections lent whole, not through a `SqlitePool`, which pings every
//!   connection it takes back (one extra trip per read).
//! - [`lookups`]: the agent and entry lookups of every issuance batched under load into one
//!   statement per table; below [`lookups::DIRECT_LOOKUPS`] under way (an `UnderWay` count) a
//!   lookup skips the batcher and asks a reader itself. Its queue is bounded
//!   ([`lookups::LOOKUP_QUEUE`]): a caller waits for room rather than growing it.
//! - [`audit`]: an audit append sent as one statement list (begin, inserts chained from the
//!   remembered head, head update, commit) instead of five trips.
//!
//! Outside this folder, `server::audit_log` gathers concurrent records into one append (group
//! commit, a bounded queue) and lets a lone record be appended by its caller; that serves every
//! engine and stays with the server.
//!
//! Whether each piece earns its place is judged by `mayfly bench task`'s process layout (server,
//! agent and workload as separate processes, as deployed): p50/p99 at 1 in flight and SVIDs/s
//! at 16, A/B against a build without the piece, runs interleaved, on a quiet machine.
//!
//! Measured 2026-12-01 (2 cores, release, three interleaved runs each) against a build with the
//! batcher, the direct lookups' count, the one-trip appends and the server's direct audit
//! append all switched off (reader connections kept): as deployed, task SVID p50 at 1 in flight
//! 995–1,014 µs with them vs 1,081–1,142 µs without, 16 in flight 3,020–3,300 vs 2,480–3,190
//! SVIDs/s; `bench issue` 170–188 vs 232–263 µs of server CPU per SVID (ratio 0.28–0.32 vs
//! 0.21–0.25). Together they pay, so all stay; each piece alone has not been measured yet.

mod audit;
mod lookups;
mod readers;

use std::fs::{DirBuilder, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow,
    SqliteSynchronous,
};
use sqlx::{FromRow, Sqlite, Transaction};
use tokio::sync::{mpsc, oneshot};

use self::audit::AuditAppender;
use self::lookups::{
    AGENT_BY_ID, DIRECT_LOOKUPS, ENTRY_BY_ID, LOOKUP_QUEUE, Lookup, Reply, lookup_one,
    serve_lookups,
};
use self::readers::{Reader, Readers};
use super::ca_journal;
use super::node_groups;
use super::rows::{
    self, AgentRow, AuditRow, CaCertRow, EntryColumns, EntryRow, agent_columns, audit_columns,
    entry_columns,
};
use super::sync::{self, SyncEntryRow};
use super::{
    AgentRecord, AuditFilter, CaCertRecord, CaChange, CaJournalRecord, Deletion, Entry, EntryId,
    EntryQuery, JoinTokenRecord, Revisions, Store, StoreError, SyncQuery, SyncRow, is_server_id,
    paging,
};
use crate::audit::{AuditEvent, AuditRecord};
use crate::id::SpiffeId;
use crate::svid::Serial;
use crate::under_way::UnderWay;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/sqlite");

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
    lookups: mpsc::Sender<Lookup>,
    /// Lookups under way, batched or not (see [`SqliteStore::lookup`]).
    lookups_under_way: UnderWay,
    /// Audit appends, over a connection of their own.
    audit: Arc<AuditAppender>,
}

impl SqliteStore {
    /// Publishes one CA certificate and bumps the bundle sequence if it is new, atomically.
    async fn apply_publish(&self, cert: &CaCertRecord) -> Result<(), StoreError> {
        let mut tx = self.write().await?;
        ca_journal::publish_ca_cert!(&mut *tx, cert);
        tx.commit().await?;
        Ok(())
    }

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
        let (lookups, requests) = mpsc::channel(LOOKUP_QUEUE);
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
        if self.lookups.send(lookup(reply)).await.is_ok()
            && let Ok(result) = answer.await
        {
            return result;
        }
        lookup_one::<R, T>(&self.reader, one, key).await
    }
}

impl SqliteStore {
    /// One page of entry-sync rows read by `sql` (see `sync`): every page statement binds the
    /// same five values in the same order.
    async fn sync_page<R>(&self, sql: &'static str, query: &SyncQuery) -> Result<Vec<R>, StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, SqliteRow> + Send + Unpin,
    {
        Ok(sqlx::query_as::<_, R>(sql)
            .bind(sync::parents_json(query))
            .bind(query.upto)
            .bind(query.after.revision)
            .bind(query.after.id.as_str())
            .bind(i64::from(query.limit.max(1)))
            .fetch_all(&mut *self.read().await?)
            .await?)
    }
}

#[async_trait]
impl Store for SqliteStore {
    async fn create_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        let columns = EntryColumns::new(entry);
        let mut tx = self.write().await?;
        // The revision first: its lock orders concurrent writers (see `sync`).
        let revision: i64 = sqlx::query_scalar(sync::BUMP_REVISION)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query(sync::INSERT_ENTRY)
            .bind(entry.id.as_str())
            .bind(entry.spiffe_id.as_str())
            .bind(entry.parent_id.as_str())
            .bind(&columns.selectors)
            .bind(&columns.scopes)
            .bind(columns.ttl_secs)
            .bind(&columns.dns_names)
            .bind(entry.created_at)
            .bind(&columns.identity_key)
            .bind(revision)
            .bind(&entry.hint)
            .bind(columns.jwt_ttl_secs)
            .execute(&mut *tx)
            .await
            .map_err(|e| rows::entry_exists(e, entry))?;
        if is_server_id(&entry.parent_id) {
            sqlx::query(sync::MARK_GROUPS)
                .bind(revision)
                .execute(&mut *tx)
                .await?;
        }
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

    // Operator lists, paged and filtered (issue 10).
    async fn list_entries_page(&self, query: &EntryQuery) -> Result<Vec<Entry>, StoreError> {
        let sql = paging::entry_page_sql(query, paging::Dialect::Sqlite);
        // Built from constant text and numbered placeholders only; every value is bound.
        let mut statement = sqlx::query_as::<_, EntryRow>(sqlx::AssertSqlSafe(sql));
        for value in paging::entry_page_binds(query) {
            statement = statement.bind(value);
        }
        statement
            .bind(i64::from(query.limit.max(1)))
            .fetch_all(&mut *self.read().await?)
            .await?
            .into_iter()
            .map(Entry::try_from)
            .collect()
    }

    async fn list_agents_page(
        &self,
        after: Option<&SpiffeId>,
        limit: u32,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        let mut statement = sqlx::query_as::<_, AgentRow>(paging::agent_page_sql(after.is_some()));
        if let Some(after) = after {
            statement = statement.bind(after.as_str());
        }
        statement
            .bind(i64::from(limit.max(1)))
            .fetch_all(&mut *self.read().await?)
            .await?
            .into_iter()
            .map(AgentRecord::try_from)
            .collect()
    }

    async fn update_entry(&self, before: &Entry, entry: &Entry) -> Result<bool, StoreError> {
        if (&entry.id, &entry.spiffe_id, &entry.parent_id)
            != (&before.id, &before.spiffe_id, &before.parent_id)
        {
            return Ok(false);
        }
        let (columns, was) = (EntryColumns::new(entry), EntryColumns::new(before));
        let mut tx = self.write().await?;
        // The revision first: its lock orders concurrent writers (see `sync`). Nothing
        // updated (or a clash) means nothing committed, so the bump is rolled back too.
        let revision: i64 = sqlx::query_scalar(sync::BUMP_REVISION)
            .fetch_one(&mut *tx)
            .await?;
        let updated = sqlx::query(sync::UPDATE_ENTRY)
            .bind(entry.id.as_str())
            .bind(&columns.selectors)
            .bind(&columns.scopes)
            .bind(columns.ttl_secs)
            .bind(&columns.dns_names)
            .bind(&entry.hint)
            .bind(columns.jwt_ttl_secs)
            .bind(&columns.identity_key)
            .bind(revision)
            .bind(entry.spiffe_id.as_str())
            .bind(entry.parent_id.as_str())
            .bind(&was.selectors)
            .bind(&was.scopes)
            .bind(was.ttl_secs)
            .bind(&was.dns_names)
            .bind(&before.hint)
            .bind(was.jwt_ttl_secs)
            .execute(&mut *tx)
            .await
            .map_err(|e| rows::entry_exists(e, entry))?
            .rows_affected();
        if updated == 0 {
            return Ok(false);
        }
        if is_server_id(&entry.parent_id) {
            sqlx::query(sync::MARK_GROUPS)
                .bind(revision)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn delete_entry(&self, id: &EntryId) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        // The revision first: its lock orders concurrent writers (see `sync`). Nothing
        // deleted means nothing committed, so the bump is rolled back with the transaction.
        let revision: i64 = sqlx::query_scalar(sync::BUMP_REVISION)
            .fetch_one(&mut *tx)
            .await?;
        let parent: Option<String> = sqlx::query_scalar(sync::DELETE_ENTRY)
            .bind(id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let Some(parent) = parent else {
            return Ok(false);
        };
        if SpiffeId::parse(&parent).is_ok_and(|p| is_server_id(&p)) {
            sqlx::query(sync::MARK_GROUPS)
                .bind(revision)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query(sync::INSERT_TOMBSTONE)
            .bind(id.as_str())
            .bind(parent)
            .bind(revision)
            .bind(crate::wire::unix_secs(std::time::SystemTime::now()))
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(true)
    }

    async fn entries_revision(&self) -> Result<i64, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT revision FROM entries_revision WHERE id = 1")
                .fetch_one(&mut *self.read().await?)
                .await?,
        )
    }

    async fn entry_revisions(&self) -> Result<Revisions, StoreError> {
        let (current, horizon, groups): (i64, i64, i64) = sqlx::query_as(sync::REVISIONS)
            .fetch_one(&mut *self.read().await?)
            .await?;
        Ok(Revisions {
            current,
            horizon,
            groups,
        })
    }

    async fn entry_changes_page(&self, query: &SyncQuery) -> Result<Vec<SyncRow>, StoreError> {
        let rows = self
            .sync_page::<SyncEntryRow>(sync::CHANGES_PAGE_SQLITE, query)
            .await?;
        Ok(rows.into_iter().map(SyncRow::from).collect())
    }

    async fn entry_deletions_page(&self, query: &SyncQuery) -> Result<Vec<Deletion>, StoreError> {
        let rows = self
            .sync_page::<(i64, String)>(sync::DELETIONS_PAGE_SQLITE, query)
            .await?;
        Ok(rows.into_iter().map(sync::deletion).collect())
    }

    async fn prune_tombstones(&self, deleted_before: i64) -> Result<u64, StoreError> {
        let mut tx = self.write().await?;
        let horizon: i64 = sqlx::query_scalar(sync::PRUNED_HORIZON)
            .bind(deleted_before)
            .fetch_one(&mut *tx)
            .await?;
        let pruned = sqlx::query(sync::PRUNE)
            .bind(deleted_before)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query(sync::RAISE_HORIZON)
            .bind(horizon)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(pruned)
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
        sqlx::query(node_groups::INSERT_AGENT)
            .bind(agent.spiffe_id.as_str())
            .bind(&agent.attestor)
            .bind(agent.current_serial.to_hex())
            .bind(agent.next_serial.map(|s| s.to_hex()))
            .bind(agent.not_after)
            .bind(agent.banned)
            .bind(agent.created_at)
            .bind(rows::encode_selectors(&agent.node_selectors))
            .bind(0_i64)
            .execute(&self.writer)
            .await
            .map_err(|e| rows::unique_violation(e, || format!("agent {}", agent.spiffe_id)))?;
        Ok(())
    }

    async fn reattest_agent(&self, agent: &AgentRecord) -> Result<bool, StoreError> {
        let selectors = rows::encode_selectors(&agent.node_selectors);
        let mut tx = self.write().await?;
        let standing: Option<(bool, String, i64)> = sqlx::query_as(node_groups::AGENT_STANDING)
            .bind(agent.spiffe_id.as_str())
            .fetch_optional(&mut *tx)
            .await?;
        let resync_revision = match standing {
            Some((true, _, _)) => return Ok(false),
            // The same node selectors, so the same groups: its entries did not change, and it
            // keeps syncing incrementally.
            Some((false, stored, kept)) if stored == selectors => kept,
            // A new record, or other selectors: its next sync is a full one, from a revision
            // of its own (taken as every entry write takes one, see `sync`).
            _ => {
                sqlx::query_scalar(sync::BUMP_REVISION)
                    .fetch_one(&mut *tx)
                    .await?
            }
        };
        let written = sqlx::query(node_groups::UPSERT_AGENT)
            .bind(agent.spiffe_id.as_str())
            .bind(&agent.attestor)
            .bind(agent.current_serial.to_hex())
            .bind(agent.not_after)
            .bind(agent.created_at)
            .bind(&selectors)
            .bind(resync_revision)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if written == 0 {
            // Banned since it was read: the upsert re-checks the row, and nothing is written.
            return Ok(false);
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn claim_single_use(
        &self,
        key: &[u8; 32],
        until: i64,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        sqlx::query(node_groups::PRUNE_EXPIRED)
            .bind(now)
            .bind(node_groups::PRUNE_SINGLE_USE)
            .execute(&mut *tx)
            .await?;
        let claimed = sqlx::query(node_groups::CLAIM)
            .bind(&key[..])
            .bind(until)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected()
            > 0;
        tx.commit().await?;
        Ok(claimed)
    }

    async fn list_node_entries(
        &self,
        server: &SpiffeId,
        group: Option<&SpiffeId>,
    ) -> Result<Vec<Entry>, StoreError> {
        sqlx::query_as::<_, EntryRow>(node_groups::NODE_ENTRIES)
            .bind(server.as_str())
            .bind(group.map(SpiffeId::as_str))
            .fetch_all(&mut *self.read().await?)
            .await?
            .into_iter()
            .map(Entry::try_from)
            .collect()
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
        self.apply_publish(cert).await
    }

    async fn list_ca_journal(&self) -> Result<Vec<CaJournalRecord>, StoreError> {
        sqlx::query_as::<_, ca_journal::JournalRow>(ca_journal::SELECT_ALL)
            .fetch_all(&mut *self.read().await?)
            .await?
            .into_iter()
            .map(CaJournalRecord::try_from)
            .collect()
    }

    async fn apply_ca_change(&self, change: &CaChange) -> Result<bool, StoreError> {
        let mut tx = self.write().await?;
        let applied = ca_journal::apply_ca_change!(&mut *tx, change);
        if applied {
            tx.commit().await?;
        } else {
            tx.rollback().await?;
        }
        Ok(applied)
    }

    async fn bundle_sequence(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query_scalar::<_, i64>(ca_journal::SEQUENCE)
            .fetch_one(&mut *self.read().await?)
            .await?)
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

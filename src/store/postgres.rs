//! The PostgreSQL engine: for several server replicas sharing one database.
//!
//! Every operation is one statement or one transaction, so replicas need no coordination of
//! their own: join tokens are consumed with a single `DELETE … RETURNING`, and audit appenders
//! lock the one `audit_head` row (`SELECT … FOR UPDATE`) so the hash chain stays linear
//! whichever replica writes. Audit transactions commit with `synchronous_commit = on`, so a
//! record is durable (flushed to the WAL) before the SVID it describes is returned, even when
//! the server's default is relaxed.

use async_trait::async_trait;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};

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
use crate::audit::{self, AuditEvent, AuditRecord, Decision};
use crate::id::SpiffeId;
use crate::svid::Serial;

static MIGRATOR: Migrator = sqlx::migrate!("migrations/postgres");

/// Connections per server replica.
const MAX_CONNECTIONS: u32 = 10;

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

impl PostgresStore {
    /// Publishes one CA certificate and bumps the bundle sequence if it is new, atomically.
    async fn apply_publish(&self, cert: &CaCertRecord) -> Result<(), StoreError> {
        let mut tx = self.pool.begin().await?;
        ca_journal::publish_ca_cert!(&mut *tx, cert);
        tx.commit().await?;
        Ok(())
    }

    /// Connects to `url` (`postgres://USER@HOST/DB`) and applies migrations.
    ///
    /// # Errors
    /// [`StoreError::Database`] when the URL is malformed or the database cannot be reached,
    /// [`StoreError::Migrate`] when the schema cannot be brought up to date.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_options(url.parse()?).await
    }

    /// Like [`PostgresStore::connect`], with every connection's `search_path` set to `schema`,
    /// so Mayfly's tables (and its migration history) live in that schema, which must exist.
    /// Lets several stores share one database: tests use a fresh schema each.
    ///
    /// # Errors
    /// [`StoreError::UnsupportedUrl`] when `schema` is not a plain lowercase identifier
    /// (`[a-z_][a-z0-9_]*`, at most 63 bytes); otherwise as [`PostgresStore::connect`].
    pub async fn connect_with_schema(url: &str, schema: &str) -> Result<Self, StoreError> {
        let plain = !schema.is_empty()
            && schema.len() <= 63
            && !schema.starts_with(|c: char| c.is_ascii_digit())
            && schema
                .bytes()
                .all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'));
        if !plain {
            return Err(StoreError::UnsupportedUrl(format!(
                "{url} (schema '{schema}' is not a plain lowercase identifier)"
            )));
        }
        let options: PgConnectOptions = url.parse()?;
        Self::connect_options(options.options([("search_path", schema)])).await
    }

    /// Connects with `options` and applies migrations.
    ///
    /// # Errors
    /// As [`PostgresStore::connect`].
    pub(crate) async fn connect_options(options: PgConnectOptions) -> Result<Self, StoreError> {
        let pool = PgPoolOptions::new()
            .max_connections(MAX_CONNECTIONS)
            .connect_with(options)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool })
    }

    /// The connection pool, for tests and maintenance.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Closes every connection, waiting for them to finish.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl PostgresStore {
    /// One page of entry-sync rows read by `sql` (see `sync`): every page statement binds the
    /// same five values in the same order.
    async fn sync_page<R>(&self, sql: &'static str, query: &SyncQuery) -> Result<Vec<R>, StoreError>
    where
        R: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
    {
        Ok(sqlx::query_as::<_, R>(sql)
            .bind(sync::parents_json(query))
            .bind(query.upto)
            .bind(query.after.revision)
            .bind(query.after.id.as_str())
            .bind(i64::from(query.limit.max(1)))
            .fetch_all(&self.pool)
            .await?)
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn create_entry(&self, entry: &Entry) -> Result<(), StoreError> {
        let columns = EntryColumns::new(entry);
        let mut tx = self.pool.begin().await?;
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
        sqlx::query_as::<_, EntryRow>(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM entries WHERE id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .map(Entry::try_from)
        .transpose()
    }

    async fn list_entries(&self) -> Result<Vec<Entry>, StoreError> {
        sqlx::query_as::<_, EntryRow>(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM entries ORDER BY spiffe_id, id"
        ))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(Entry::try_from)
        .collect()
    }

    async fn list_entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError> {
        sqlx::query_as::<_, EntryRow>(concat!(
            "SELECT ",
            entry_columns!(),
            " FROM entries WHERE parent_id = $1 \
             ORDER BY spiffe_id, id"
        ))
        .bind(parent.as_str())
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(Entry::try_from)
        .collect()
    }

    // Operator lists, paged and filtered (issue 10).
    async fn list_entries_page(&self, query: &EntryQuery) -> Result<Vec<Entry>, StoreError> {
        let sql = paging::entry_page_sql(query, paging::Dialect::Postgres);
        // Built from constant text and numbered placeholders only; every value is bound.
        let mut statement = sqlx::query_as::<_, EntryRow>(sqlx::AssertSqlSafe(sql));
        for value in paging::entry_page_binds(query) {
            statement = statement.bind(value);
        }
        statement
            .bind(i64::from(query.limit.max(1)))
            .fetch_all(&self.pool)
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
            .fetch_all(&self.pool)
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
        let mut tx = self.pool.begin().await?;
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
        let mut tx = self.pool.begin().await?;
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
                .fetch_one(&self.pool)
                .await?,
        )
    }

    async fn entry_revisions(&self) -> Result<Revisions, StoreError> {
        let (current, horizon, groups): (i64, i64, i64) = sqlx::query_as(sync::REVISIONS)
            .fetch_one(&self.pool)
            .await?;
        Ok(Revisions {
            current,
            horizon,
            groups,
        })
    }

    async fn entry_changes_page(&self, query: &SyncQuery) -> Result<Vec<SyncRow>, StoreError> {
        let rows = self
            .sync_page::<SyncEntryRow>(sync::CHANGES_PAGE_POSTGRES, query)
            .await?;
        Ok(rows.into_iter().map(SyncRow::from).collect())
    }

    async fn entry_deletions_page(&self, query: &SyncQuery) -> Result<Vec<Deletion>, StoreError> {
        let rows = self
            .sync_page::<(i64, String)>(sync::DELETIONS_PAGE_POSTGRES, query)
            .await?;
        Ok(rows.into_iter().map(sync::deletion).collect())
    }

    async fn prune_tombstones(&self, deleted_before: i64) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
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
        .execute(&self.pool)
        .await
        .map_err(|e| rows::unique_violation(e, || "a join token with this secret".to_owned()))?;
        Ok(())
    }

    async fn consume_join_token(
        &self,
        secret_hash: &[u8; 32],
        now: i64,
    ) -> Result<Option<JoinTokenRecord>, StoreError> {
        // One statement: concurrent deleters of one row serialise on its row lock, and only the
        // first one gets it back. An expired token is deleted too.
        let row: Option<(String, i64)> = sqlx::query_as(
            "DELETE FROM join_tokens WHERE secret_hash = $1 RETURNING node_id, expires_at",
        )
        .bind(&secret_hash[..])
        .fetch_optional(&self.pool)
        .await?;
        Ok(row
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
            .execute(&self.pool)
            .await
            .map_err(|e| rows::unique_violation(e, || format!("agent {}", agent.spiffe_id)))?;
        Ok(())
    }

    async fn reattest_agent(&self, agent: &AgentRecord) -> Result<bool, StoreError> {
        let selectors = rows::encode_selectors(&agent.node_selectors);
        let mut tx = self.pool.begin().await?;
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
        let mut tx = self.pool.begin().await?;
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
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(Entry::try_from)
            .collect()
    }

    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError> {
        sqlx::query_as::<_, AgentRow>(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM agents WHERE spiffe_id = $1"
        ))
        .bind(id.as_str())
        .fetch_optional(&self.pool)
        .await?
        .map(AgentRecord::try_from)
        .transpose()
    }

    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError> {
        sqlx::query_as::<_, AgentRow>(concat!(
            "SELECT ",
            agent_columns!(),
            " FROM agents ORDER BY spiffe_id"
        ))
        .fetch_all(&self.pool)
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
             WHERE spiffe_id = $1 AND NOT banned \
             AND (current_serial = $2 OR next_serial = $2)",
        )
        .bind(id.as_str())
        .bind(presented_serial.to_hex())
        .bind(next_serial.to_hex())
        .bind(not_after)
        .execute(&self.pool)
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
        .execute(&self.pool)
        .await?
        .rows_affected()
            > 0;
        if promoted {
            return Ok(true);
        }
        let current: Option<i32> =
            sqlx::query_scalar("SELECT 1 FROM agents WHERE spiffe_id = $1 AND current_serial = $2")
                .bind(id.as_str())
                .bind(&serial)
                .fetch_optional(&self.pool)
                .await?;
        Ok(current.is_some())
    }

    async fn ban_agent(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        let updated = sqlx::query("UPDATE agents SET banned = TRUE WHERE spiffe_id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(updated > 0)
    }

    async fn delete_agent(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        let deleted = sqlx::query("DELETE FROM agents WHERE spiffe_id = $1")
            .bind(id.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(deleted > 0)
    }

    async fn put_ca_cert(&self, cert: &CaCertRecord) -> Result<(), StoreError> {
        self.apply_publish(cert).await
    }

    async fn list_ca_journal(&self) -> Result<Vec<CaJournalRecord>, StoreError> {
        sqlx::query_as::<_, ca_journal::JournalRow>(ca_journal::SELECT_ALL)
            .fetch_all(&self.pool)
            .await?
            .into_iter()
            .map(CaJournalRecord::try_from)
            .collect()
    }

    async fn apply_ca_change(&self, change: &CaChange) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
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
            .fetch_one(&self.pool)
            .await?)
    }

    async fn list_ca_certs(&self, now: i64) -> Result<Vec<CaCertRecord>, StoreError> {
        // A certificate is valid through its notAfter second (RFC 5280 §4.1.2.5).
        Ok(sqlx::query_as::<_, CaCertRow>(
            "SELECT fingerprint, der, not_after FROM ca_certs WHERE not_after >= $1 \
             ORDER BY fingerprint",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(CaCertRecord::from)
        .collect())
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> Result<Vec<AuditRecord>, StoreError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET LOCAL synchronous_commit = on")
            .execute(&mut *tx)
            .await?;
        // The row lock serialises appenders across connections and replicas; under READ
        // COMMITTED a waiter reads the head as its predecessor committed it.
        let (head_seq, head_hash) = rows::audit_head(
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
                .fetch_one(&mut *tx)
                .await?,
        )?;
        let records = audit::chain(head_seq, head_hash, events);

        // One statement for the whole batch, column by column.
        let n = records.len();
        let mut seq = Vec::with_capacity(n);
        let mut time_ms = Vec::with_capacity(n);
        let mut action = Vec::with_capacity(n);
        let mut decision = Vec::with_capacity(n);
        let mut reason = Vec::with_capacity(n);
        let mut agent_id = Vec::with_capacity(n);
        let mut attestor = Vec::with_capacity(n);
        let mut entry_id = Vec::with_capacity(n);
        let mut spiffe_id = Vec::with_capacity(n);
        let mut task_id = Vec::with_capacity(n);
        let mut scopes = Vec::with_capacity(n);
        let mut serial = Vec::with_capacity(n);
        let mut not_after = Vec::with_capacity(n);
        let mut prev_hash = Vec::with_capacity(n);
        let mut hash = Vec::with_capacity(n);
        for record in &records {
            let event = &record.event;
            seq.push(record.seq);
            time_ms.push(event.time_ms);
            action.push(event.action.as_str());
            decision.push(event.decision.map(Decision::as_str));
            reason.push(event.reason.as_str());
            agent_id.push(event.agent_id.as_deref());
            attestor.push(event.attestor.as_deref());
            entry_id.push(event.entry_id.as_deref());
            spiffe_id.push(event.spiffe_id.as_deref());
            task_id.push(event.task_id.as_deref());
            scopes.push(rows::audit_scopes(event));
            serial.push(event.serial.map(|s| s.to_hex()));
            not_after.push(event.not_after);
            prev_hash.push(record.prev_hash.to_vec());
            hash.push(record.hash.to_vec());
        }
        sqlx::query(concat!(
            "INSERT INTO audit (",
            audit_columns!(),
            ") SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], \
             $5::text[], $6::text[], $7::text[], $8::text[], $9::text[], $10::text[], \
             $11::text[], $12::text[], $13::bigint[], $14::bytea[], $15::bytea[])"
        ))
        .bind(&seq)
        .bind(&time_ms)
        .bind(&action)
        .bind(&decision)
        .bind(&reason)
        .bind(&agent_id)
        .bind(&attestor)
        .bind(&entry_id)
        .bind(&spiffe_id)
        .bind(&task_id)
        .bind(&scopes)
        .bind(&serial)
        .bind(&not_after)
        .bind(&prev_hash)
        .bind(&hash)
        .execute(&mut *tx)
        .await
        .map_err(|e| {
            rows::unique_violation(e, || {
                "an audit record with one of these serial numbers".to_owned()
            })
        })?;
        if let Some(last) = records.last() {
            sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
                .bind(last.seq)
                .bind(&last.hash[..])
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(records)
    }

    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError> {
        sqlx::query_as::<_, AuditRow>(concat!(
            "SELECT ",
            audit_columns!(),
            " FROM audit WHERE seq > $1 AND ($2::text IS NULL OR task_id = $2) \
             ORDER BY seq LIMIT $3"
        ))
        .bind(filter.after_seq)
        .bind(filter.task_id.as_deref())
        .bind(rows::limit(filter.limit))
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(AuditRecord::try_from)
        .collect()
    }

    async fn audit_head(&self) -> Result<(i64, [u8; 32]), StoreError> {
        rows::audit_head(
            sqlx::query_as("SELECT seq, hash FROM audit_head WHERE id = 1")
                .fetch_one(&self.pool)
                .await?,
        )
    }
}

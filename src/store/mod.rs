//! The registration store: entries, join tokens, agents, CA certificates and the audit log.
//!
//! One [`Store`] trait, two engines behind it: SQLite ([`sqlite::SqliteStore`], the embedded
//! default, a WAL file in the server's data dir) and PostgreSQL ([`postgres::PostgresStore`],
//! for several server replicas sharing one database). Both pass the same conformance suite
//! (`tests/store_conformance.rs`). Schema changes are sqlx migrations under `migrations/`.

pub mod ca_journal;
mod node_groups;
mod paging;
pub mod postgres;
pub mod query;
pub(crate) mod rows;
pub mod sqlite;
pub mod sync;

use std::sync::Arc;

use async_trait::async_trait;
use mayfly_attestors::Selector;

use crate::audit::{AuditEvent, AuditRecord};
use crate::id::{ScopeSet, SpiffeId};
use crate::svid::Serial;

pub use ca_journal::{CaChange, CaJournalRecord, CaState};
pub use query::{EntryCursor, EntryQuery, PrefixError, SpiffeIdPrefix};
pub use sync::{Deletion, Revisions, SyncCursor, SyncQuery, SyncRow};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or answered with an error.
    #[error("the database failed")]
    Database(#[from] sqlx::Error),
    /// The schema could not be brought up to date.
    #[error("could not apply database migrations")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored row could not be read back as a valid value (the database was edited by hand
    /// or is from an incompatible version).
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The record already exists.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The URL names no engine Mayfly supports.
    #[error("unsupported database URL '{0}': use sqlite://PATH or postgres://USER@HOST/DB")]
    UnsupportedUrl(String),
}

/// An entry's ID: 32 lowercase hex digits, random.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EntryId(String);

impl EntryId {
    /// A new random ID.
    ///
    /// # Panics
    /// Only if the operating system's random source fails.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 16];
        aws_lc_rs::rand::fill(&mut bytes).expect("the system random source failed");
        Self(hex::encode(bytes))
    }

    /// Validates an ID given by a caller: exactly 32 lowercase hex digits.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] is never returned; `None` means the text is not an entry ID.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
            .then(|| Self(s.to_owned()))
    }

    /// The ID as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for EntryId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A registration entry: an identity, who may receive it, and the ceiling of what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The entry's ID.
    pub id: EntryId,
    /// The identity (never containing the reserved `scope` segment).
    pub spiffe_id: SpiffeId,
    /// The agent that may ask for it.
    pub parent_id: SpiffeId,
    /// The selectors a workload must all have (sorted, unique, non-empty).
    pub selectors: Vec<Selector>,
    /// The scopes a task SVID may carry at most.
    pub scopes: ScopeSet,
    /// The longest TTL an SVID for this entry may have, in seconds.
    pub ttl_secs: u32,
    /// DNS names to put in its SVIDs.
    pub dns_names: Vec<String>,
    /// When it was created, Unix seconds. Never changed by an update: of the entries matching
    /// one workload, the first created is its default identity (see the agent's state).
    pub created_at: i64,
    /// A short label telling a workload's identities apart (the Workload API's `hint`); empty
    /// for none.
    pub hint: String,
    /// The longest TTL a JWT-SVID for this entry may have, in seconds; 0 for the server's
    /// default.
    pub jwt_ttl_secs: u32,
}

/// A stored join token: only its hash, never the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinTokenRecord {
    /// SHA-256 of the secret.
    pub secret_hash: [u8; 32],
    /// The node ID the agent gets.
    pub node_id: String,
    /// After this Unix second the token is dead.
    pub expires_at: i64,
}

/// An attested agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// Its SPIFFE ID, `spiffe://<td>/mayfly/agent/<attestor>/<node id>`.
    pub spiffe_id: SpiffeId,
    /// The node attestor that admitted it.
    pub attestor: String,
    /// Serial of the SVID it currently holds (stored as hex).
    pub current_serial: Serial,
    /// Serial of a renewed SVID it has been sent but not used yet (stored as hex).
    pub next_serial: Option<Serial>,
    /// `notAfter` of the newest agent SVID, Unix seconds.
    pub not_after: i64,
    /// Banned agents are refused at their next call.
    pub banned: bool,
    /// When it first attested, Unix seconds (kept when it attests again).
    pub created_at: i64,
    /// What its node attestor proved about the node (`x509pop:subject:cn:web-1`, ...), sorted
    /// and unique; empty for a join token. It decides the agent's node groups.
    pub node_selectors: Vec<Selector>,
    /// An agent whose known entry revision is below this must sync in full: its node groups
    /// may have changed since. Set by the store ([`Store::reattest_agent`]); what a caller
    /// writes here is ignored (a new record starts at 0).
    pub resync_revision: i64,
}

impl AgentRecord {
    /// Whether the agent is in the node group `node_entry` defines: its node selectors
    /// include all of the node entry's (a node entry always has at least one).
    pub fn is_member_of(&self, node_entry: &Entry) -> bool {
        !node_entry.selectors.is_empty()
            && node_entry
                .selectors
                .iter()
                .all(|s| self.node_selectors.contains(s))
    }
}

/// Whether `parent` is a server's ID (`spiffe://<td>/mayfly/server`): entries under it are
/// node entries, which define node groups instead of issuing anything. The store uses this to
/// notice that a write changes node groups.
pub fn is_server_id(parent: &SpiffeId) -> bool {
    parent.path() == crate::wire::SERVER_PATH
}

/// A CA certificate published in the trust bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaCertRecord {
    /// SHA-256 of the DER, hex: the record's key.
    pub fingerprint: String,
    /// The certificate, DER.
    pub der: Vec<u8>,
    /// Its `notAfter`, Unix seconds: after that it leaves the bundle.
    pub not_after: i64,
}

/// Which audit records to list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only records with a sequence number above this.
    pub after_seq: i64,
    /// Only records of this task.
    pub task_id: Option<String>,
    /// At most this many (oldest first); 0 means no limit.
    pub limit: u32,
}

/// The registration store. Every method is one atomic operation.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Adds an entry.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when an entry with the same SPIFFE ID, parent and
    /// selectors exists; [`StoreError::Database`] otherwise.
    async fn create_entry(&self, entry: &Entry) -> Result<(), StoreError>;
    /// One entry by ID.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError>;
    /// All entries, ordered by SPIFFE ID then ID.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn list_entries(&self) -> Result<Vec<Entry>, StoreError>;
    /// The entries whose parent is `parent`, ordered by SPIFFE ID then ID.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn list_entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError>;
    // Operator lists, paged and filtered (issue 10): see `query`.
    /// One page of the entries `query` selects, ordered by SPIFFE ID then ID: at most
    /// `query.limit` (at least one is asked for), after `query.after`. The filters are
    /// evaluated by the database, and only one page is ever held.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn list_entries_page(&self, query: &EntryQuery) -> Result<Vec<Entry>, StoreError>;
    /// One page of agents ordered by SPIFFE ID: at most `limit` (at least one), after `after`.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn list_agents_page(
        &self,
        after: Option<&SpiffeId>,
        limit: u32,
    ) -> Result<Vec<AgentRecord>, StoreError>;
    /// Compare-and-swap: replaces what an update may change of entry `before.id` (selectors,
    /// scopes, TTLs, DNS names, hint) with `after`'s, only if the stored entry is still
    /// `before`, and gives it a new revision so incremental sync sends it again. Its ID, SPIFFE
    /// ID, parent and creation time never change (`after`'s must be `before`'s). `false` when
    /// nothing was written: the entry is gone, or changed since `before` was read (read it
    /// again and re-apply the change, so two concurrent updates never undo each other).
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when another entry has the same SPIFFE ID, parent and
    /// selectors (nothing is written then); [`StoreError::Database`] otherwise.
    async fn update_entry(&self, before: &Entry, after: &Entry) -> Result<bool, StoreError>;
    /// Deletes an entry; `false` when there was none.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn delete_entry(&self, id: &EntryId) -> Result<bool, StoreError>;
    /// A number that grows whenever an entry is created, updated or deleted, so agents can
    /// poll cheaply.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn entries_revision(&self) -> Result<i64, StoreError>;
    // Entry sync for agents (issue 10): see `sync`.
    /// The current entry revision and the tombstone prune horizon, read together.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn entry_revisions(&self) -> Result<Revisions, StoreError>;
    /// One page of the entries under `query.parent` created in `(query.after, query.upto]`,
    /// in `(revision, id)` order. A row that cannot be read back comes as an error in its
    /// [`SyncRow`], so the others still sync.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn entry_changes_page(&self, query: &SyncQuery) -> Result<Vec<SyncRow>, StoreError>;
    /// As [`Store::entry_changes_page`], for the entries deleted (their tombstones).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn entry_deletions_page(&self, query: &SyncQuery) -> Result<Vec<Deletion>, StoreError>;
    /// Forgets the tombstones of entries deleted before `deleted_before` (Unix seconds) and
    /// raises the horizon to the newest revision forgotten; returns how many were pruned.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn prune_tombstones(&self, deleted_before: i64) -> Result<u64, StoreError>;

    /// Stores a new join token.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] for a repeated hash; [`StoreError::Database`].
    async fn create_join_token(&self, token: &JoinTokenRecord) -> Result<(), StoreError>;
    /// Consumes a join token atomically: of any number of concurrent calls with one hash,
    /// exactly one gets the record, and only while `now < expires_at`. A consumed or expired
    /// token is gone.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn consume_join_token(
        &self,
        secret_hash: &[u8; 32],
        now: i64,
    ) -> Result<Option<JoinTokenRecord>, StoreError>;

    /// Adds an agent, or replaces an evicted agent's record on re-attestation.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when an agent with this ID exists;
    /// [`StoreError::Database`].
    async fn create_agent(&self, agent: &AgentRecord) -> Result<(), StoreError>;
    /// Records an agent that attested again with the same ID (an attestor that needs no
    /// operator: x509pop, sshpop, k8s_psat, aws_iid), atomically: an existing record that is
    /// not banned gets `agent`'s current serial, not-after, attestor and node selectors, and no
    /// next serial (its creation time stays); an absent one is inserted. When the record was
    /// absent or its node selectors change, the agent's next entry sync is a full one (its node
    /// groups may differ). `false`, with nothing written, when the stored agent is banned: a
    /// banned agent stays banned whatever evidence it brings.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn reattest_agent(&self, agent: &AgentRecord) -> Result<bool, StoreError>;
    /// Claims single-use attestation evidence by `key` (such as the hash of a token):
    /// `true`, and `key` is remembered until `until` (Unix seconds), when it is not remembered
    /// or only until a time `<= now`; `false` when it is remembered past `now` (a replay). Of
    /// concurrent claims of one key exactly one gets `true`. Each call also forgets a bounded
    /// number of expired keys, so the table does not grow without bound.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn claim_single_use(
        &self,
        key: &[u8; 32],
        until: i64,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// The node entries (entries whose parent is `server`, the server's ID), ordered by SPIFFE
    /// ID then ID; with `group`, only those whose SPIFFE ID is `group` (the entries defining
    /// that one node group).
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn list_node_entries(
        &self,
        server: &SpiffeId,
        group: Option<&SpiffeId>,
    ) -> Result<Vec<Entry>, StoreError>;
    /// One agent by SPIFFE ID.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn get_agent(&self, id: &SpiffeId) -> Result<Option<AgentRecord>, StoreError>;
    /// All agents, ordered by SPIFFE ID.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn list_agents(&self) -> Result<Vec<AgentRecord>, StoreError>;
    /// Records a renewed agent SVID as the agent's next serial, only if `presented_serial`
    /// is still its current or next serial and it is not banned; `false` otherwise.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn set_agent_next_serial(
        &self,
        id: &SpiffeId,
        presented_serial: &Serial,
        next_serial: &Serial,
        not_after: i64,
    ) -> Result<bool, StoreError>;
    /// Makes `serial` the agent's current serial if it is its next one (the agent has started
    /// using its renewed SVID, so the old one is superseded); `false` otherwise.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn promote_agent_serial(
        &self,
        id: &SpiffeId,
        serial: &Serial,
    ) -> Result<bool, StoreError>;
    /// Bans an agent; `false` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn ban_agent(&self, id: &SpiffeId) -> Result<bool, StoreError>;
    /// Deletes an agent so it must attest again; `false` when there is none.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn delete_agent(&self, id: &SpiffeId) -> Result<bool, StoreError>;

    /// Publishes a CA certificate in the bundle (idempotent by fingerprint); a new one bumps
    /// the bundle sequence.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn put_ca_cert(&self, cert: &CaCertRecord) -> Result<(), StoreError>;
    /// The CA certificates still valid at `now`, ordered by fingerprint.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn list_ca_certs(&self, now: i64) -> Result<Vec<CaCertRecord>, StoreError>;

    // The CA journal (issue 10): see `ca_journal`.
    /// Every CA of every server sharing the store, oldest first.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn list_ca_journal(&self) -> Result<Vec<CaJournalRecord>, StoreError>;
    /// Applies one journal step and the bundle changes it implies in one transaction, bumping
    /// the bundle sequence when the published certificates change. `false` (nothing written)
    /// when the step no longer applies: the CA is not in the state the step needs.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when an inserted CA (or a second prepared or active CA
    /// of one server) exists; [`StoreError::Database`].
    async fn apply_ca_change(&self, change: &CaChange) -> Result<bool, StoreError>;
    /// The bundle sequence: it grows with every change of the published CA certificates.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    async fn bundle_sequence(&self) -> Result<i64, StoreError>;

    /// Appends events to the hash-chained audit log in one transaction, in order, and returns
    /// their records. When this returns, the records are durable. Concurrent appenders (also
    /// from other replicas) are serialised so the chain stays linear.
    ///
    /// # Errors
    /// [`StoreError::AlreadyExists`] when a record repeats an issued serial number (nothing is
    /// written then); [`StoreError::Database`].
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<Vec<AuditRecord>, StoreError>;
    /// Audit records in sequence order.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn list_audit(&self, filter: &AuditFilter) -> Result<Vec<AuditRecord>, StoreError>;
    /// The sequence number and hash of the newest record, as the chain head remembers them
    /// (`(0, [0; 32])` when empty). `audit verify` compares it with the last record, so deleting
    /// records at the end is detected too.
    ///
    /// # Errors
    /// [`StoreError::Database`] or [`StoreError::Corrupt`].
    async fn audit_head(&self) -> Result<(i64, [u8; 32]), StoreError>;
}

/// Opens the store a URL names: `sqlite://PATH` (created if missing) or `postgres://…`, and
/// applies migrations.
///
/// # Errors
/// [`StoreError::UnsupportedUrl`], [`StoreError::Database`] or [`StoreError::Migrate`].
pub async fn open(url: &str) -> Result<Arc<dyn Store>, StoreError> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(
            sqlite::SqliteStore::open(std::path::Path::new(path)).await?,
        ))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok(Arc::new(postgres::PostgresStore::connect(url).await?))
    } else {
        Err(StoreError::UnsupportedUrl(url.to_owned()))
    }
}

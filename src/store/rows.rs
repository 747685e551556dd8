//! Row encoding shared by the SQLite and PostgreSQL engines.
//!
//! Both engines store the same logical schema: lists (selectors, scopes, DNS names, audit
//! scopes) as JSON arrays of strings, hashes as 32-byte blobs, times as 64-bit integers. What
//! comes back from the database is validated again before it becomes a record, so a row edited
//! by hand is reported as [`StoreError::Corrupt`] instead of being trusted.

use std::collections::BTreeSet;

use aws_lc_rs::digest;
use mayfly_attestors::Selector;

use super::{AgentRecord, CaCertRecord, Entry, EntryId, StoreError};
use crate::audit::{AuditAction, AuditEvent, AuditRecord, Decision};
use crate::id::{Scope, ScopeSet, SpiffeId};
use crate::svid::Serial;

/// `err` as [`StoreError::AlreadyExists`] (naming `what`) when it is a unique violation.
pub(crate) fn unique_violation(err: sqlx::Error, what: impl FnOnce() -> String) -> StoreError {
    match &err {
        sqlx::Error::Database(db) if db.is_unique_violation() => StoreError::AlreadyExists(what()),
        _ => StoreError::Database(err),
    }
}

/// A unique violation on an entry: which of its two keys clashed.
pub(super) fn entry_exists(err: sqlx::Error, entry: &Entry) -> StoreError {
    let identity_clash = match &err {
        sqlx::Error::Database(db) => {
            db.constraint().is_some_and(|c| c.contains("identity_key"))
                || db.message().contains("identity_key")
        }
        _ => false,
    };
    unique_violation(err, || {
        if identity_clash {
            format!(
                "an entry for {} with parent {} and the same selectors",
                entry.spiffe_id, entry.parent_id
            )
        } else {
            format!("entry {}", entry.id)
        }
    })
}

/// A list of strings as stored: a JSON array.
pub(super) fn encode_list<'a>(items: impl IntoIterator<Item = &'a str>) -> String {
    let items: Vec<&str> = items.into_iter().collect();
    serde_json::Value::from(items).to_string()
}

fn decode_list(text: &str, what: &str) -> Result<Vec<String>, StoreError> {
    serde_json::from_str(text)
        .map_err(|e| StoreError::Corrupt(format!("{what} is not a JSON list of strings: {e}")))
}

/// Selectors as stored (a JSON list), validated again, sorted and without duplicates.
fn decode_selectors(text: &str, what: &str) -> Result<Vec<Selector>, StoreError> {
    Ok(decode_list(text, what)?
        .iter()
        .map(|s| Selector::parse(s))
        .collect::<Result<BTreeSet<_>, _>>()
        .map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))?
        .into_iter()
        .collect())
}

/// Selectors as stored: a JSON list, sorted and without duplicates, so equal sets are equal
/// text.
pub(super) fn encode_selectors(selectors: &[Selector]) -> String {
    let sorted: BTreeSet<&str> = selectors.iter().map(Selector::as_str).collect();
    encode_list(sorted)
}

fn hash32(bytes: &[u8], what: &str) -> Result<[u8; 32], StoreError> {
    bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{what} is {} bytes, not 32", bytes.len())))
}

/// An entry's columns as bound on insert.
pub(super) struct EntryColumns {
    /// Sorted, duplicate-free selectors, JSON.
    pub selectors: String,
    /// Sorted scopes, JSON.
    pub scopes: String,
    /// DNS names in the entry's order, JSON.
    pub dns_names: String,
    /// The longest TTL.
    pub ttl_secs: i64,
    /// The longest JWT-SVID TTL (0: the server's default).
    pub jwt_ttl_secs: i64,
    /// SHA-256 over SPIFFE ID, parent and selectors: the uniqueness key.
    pub identity_key: Vec<u8>,
}

impl EntryColumns {
    pub(super) fn new(entry: &Entry) -> Self {
        let selectors = encode_selectors(&entry.selectors);
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(b"mayfly-entry-identity-v1\0");
        for field in [
            entry.spiffe_id.as_str(),
            entry.parent_id.as_str(),
            selectors.as_str(),
        ] {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(field.as_bytes());
        }
        Self {
            scopes: encode_list(entry.scopes.iter().map(Scope::as_str)),
            dns_names: encode_list(entry.dns_names.iter().map(String::as_str)),
            ttl_secs: i64::from(entry.ttl_secs),
            jwt_ttl_secs: i64::from(entry.jwt_ttl_secs),
            identity_key: ctx.finish().as_ref().to_vec(),
            selectors,
        }
    }
}

/// An `entries` row as read.
#[derive(sqlx::FromRow)]
pub(super) struct EntryRow {
    id: String,
    spiffe_id: String,
    parent_id: String,
    selectors: String,
    scopes: String,
    ttl_secs: i64,
    dns_names: String,
    created_at: i64,
    hint: String,
    jwt_ttl_secs: i64,
}

impl EntryRow {
    /// The row's ID as stored (perhaps not a valid entry ID), to name a row that is corrupt.
    pub(super) fn id(&self) -> &str {
        &self.id
    }
}

/// The columns [`EntryRow`] reads, as a literal for `concat!`.
macro_rules! entry_columns {
    () => {
        "id, spiffe_id, parent_id, selectors, scopes, ttl_secs, dns_names, created_at, hint, \
         jwt_ttl_secs"
    };
}
pub(super) use entry_columns;

impl TryFrom<EntryRow> for Entry {
    type Error = StoreError;

    fn try_from(row: EntryRow) -> Result<Self, StoreError> {
        let corrupt = |field: &str, e: &dyn std::fmt::Display| {
            StoreError::Corrupt(format!("entry {}: {field}: {e}", row.id))
        };
        let id =
            EntryId::parse(&row.id).ok_or_else(|| corrupt("id", &"not 32 lowercase hex digits"))?;
        let spiffe_id = SpiffeId::parse(&row.spiffe_id).map_err(|e| corrupt("spiffe_id", &e))?;
        let parent_id = SpiffeId::parse(&row.parent_id).map_err(|e| corrupt("parent_id", &e))?;
        let selectors =
            decode_selectors(&row.selectors, "selectors").map_err(|e| corrupt("selectors", &e))?;
        let scopes = decode_list(&row.scopes, "scopes")?
            .iter()
            .map(|s| Scope::parse(s))
            .collect::<Result<ScopeSet, _>>()
            .map_err(|e| corrupt("scopes", &e))?;
        let ttl_secs = u32::try_from(row.ttl_secs).map_err(|e| corrupt("ttl_secs", &e))?;
        let dns_names = decode_list(&row.dns_names, "dns_names")?;
        let jwt_ttl_secs =
            u32::try_from(row.jwt_ttl_secs).map_err(|e| corrupt("jwt_ttl_secs", &e))?;
        Ok(Self {
            id,
            spiffe_id,
            parent_id,
            selectors,
            scopes,
            ttl_secs,
            dns_names,
            created_at: row.created_at,
            hint: row.hint,
            jwt_ttl_secs,
        })
    }
}

/// An `agents` row as read.
#[derive(sqlx::FromRow)]
pub(super) struct AgentRow {
    spiffe_id: String,
    attestor: String,
    current_serial: String,
    next_serial: Option<String>,
    not_after: i64,
    banned: bool,
    created_at: i64,
    node_selectors: String,
    resync_revision: i64,
}

/// The columns [`AgentRow`] reads, as a literal for `concat!`.
macro_rules! agent_columns {
    () => {
        "spiffe_id, attestor, current_serial, next_serial, not_after, banned, created_at, \
         node_selectors, resync_revision"
    };
}
pub(super) use agent_columns;

impl TryFrom<AgentRow> for AgentRecord {
    type Error = StoreError;

    fn try_from(row: AgentRow) -> Result<Self, StoreError> {
        let spiffe_id = SpiffeId::parse(&row.spiffe_id)
            .map_err(|e| StoreError::Corrupt(format!("agent {}: {e}", row.spiffe_id)))?;
        let serial = |hex: &str| {
            Serial::from_hex(hex).ok_or_else(|| {
                StoreError::Corrupt(format!(
                    "agent {}: '{hex}' is not a certificate serial number",
                    row.spiffe_id
                ))
            })
        };
        let current_serial = serial(&row.current_serial)?;
        let next_serial = row.next_serial.as_deref().map(serial).transpose()?;
        let node_selectors = decode_selectors(&row.node_selectors, "node_selectors")
            .map_err(|e| StoreError::Corrupt(format!("agent {}: {e}", row.spiffe_id)))?;
        Ok(Self {
            spiffe_id,
            attestor: row.attestor,
            current_serial,
            next_serial,
            not_after: row.not_after,
            banned: row.banned,
            created_at: row.created_at,
            node_selectors,
            resync_revision: row.resync_revision,
        })
    }
}

/// A `ca_certs` row as read.
#[derive(sqlx::FromRow)]
pub(super) struct CaCertRow {
    fingerprint: String,
    der: Vec<u8>,
    not_after: i64,
}

impl From<CaCertRow> for CaCertRecord {
    fn from(row: CaCertRow) -> Self {
        Self {
            fingerprint: row.fingerprint,
            der: row.der,
            not_after: row.not_after,
        }
    }
}

/// An `audit` row as read.
///
/// Only the shape is checked here (decision, list, hash sizes): whether the content is what was
/// written is the hash chain's question, so an edited row still comes back for
/// [`crate::audit::ChainVerifier`] to name.
#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    seq: i64,
    time_ms: i64,
    action: String,
    decision: Option<String>,
    reason: String,
    agent_id: Option<String>,
    attestor: Option<String>,
    entry_id: Option<String>,
    spiffe_id: Option<String>,
    task_id: Option<String>,
    scopes: String,
    serial: Option<String>,
    not_after: Option<i64>,
    prev_hash: Vec<u8>,
    hash: Vec<u8>,
}

/// The columns [`AuditRow`] reads (and `append_audit` writes), as a literal for `concat!`.
macro_rules! audit_columns {
    () => {
        "seq, time_ms, action, decision, reason, agent_id, attestor, entry_id, spiffe_id, \
         task_id, scopes, serial, not_after, prev_hash, hash"
    };
}
pub(super) use audit_columns;

impl TryFrom<AuditRow> for AuditRecord {
    type Error = StoreError;

    fn try_from(row: AuditRow) -> Result<Self, StoreError> {
        let seq = row.seq;
        let decision = row
            .decision
            .map(|d| {
                Decision::parse(&d).ok_or_else(|| {
                    StoreError::Corrupt(format!("audit record {seq}: decision '{d}'"))
                })
            })
            .transpose()?;
        // An action this version does not know is a damaged (or newer) log, not something to
        // pass on as text: it is named here, where the row is read.
        let action = AuditAction::parse(&row.action).ok_or_else(|| {
            StoreError::Corrupt(format!(
                "audit record {seq}: action '{}' is not one this version records",
                crate::text::escape(&row.action)
            ))
        })?;
        Ok(Self {
            seq,
            event: AuditEvent {
                time_ms: row.time_ms,
                action,
                decision,
                reason: row.reason,
                agent_id: row.agent_id,
                attestor: row.attestor,
                entry_id: row.entry_id,
                spiffe_id: row.spiffe_id,
                task_id: row.task_id,
                scopes: decode_list(&row.scopes, &format!("audit record {seq}: scopes"))?,
                serial: row
                    .serial
                    .map(|hex| {
                        Serial::from_hex(&hex).ok_or_else(|| {
                            StoreError::Corrupt(format!("audit record {seq}: serial '{hex}'"))
                        })
                    })
                    .transpose()?,
                not_after: row.not_after,
            },
            prev_hash: hash32(&row.prev_hash, &format!("audit record {seq}: prev_hash"))?,
            hash: hash32(&row.hash, &format!("audit record {seq}: hash"))?,
        })
    }
}

/// The audit head row: `(seq, hash)`.
pub(super) fn audit_head((seq, hash): (i64, Vec<u8>)) -> Result<(i64, [u8; 32]), StoreError> {
    Ok((seq, hash32(&hash, "the audit head's hash")?))
}

/// An audit event's scopes as stored.
pub(super) fn audit_scopes(event: &AuditEvent) -> String {
    encode_list(event.scopes.iter().map(String::as_str))
}

/// `limit` as SQL: `None` for no limit.
pub(super) fn limit(limit: u32) -> Option<i64> {
    (limit > 0).then(|| i64::from(limit))
}

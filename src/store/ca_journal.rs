//! The CA journal's records and the SQL both engines run for them (issue 10).
//!
//! One row per CA of every server sharing the store: which server owns it, its state
//! (prepared, active, old), whether an operator tainted or revoked it, and until when an SVID
//! it signed may live. Every change of the published CA certificates (`ca_certs`) bumps the
//! bundle sequence in the same transaction, so `spiffe_sequence` grows with every change.
//! The statements are plain SQL with `$N` placeholders that both engines accept, so the one
//! text below is the one behaviour.

use crate::store::{CaCertRecord, StoreError};

/// Where a CA is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CaState {
    /// Published in the bundle, signing nothing yet.
    Prepared,
    /// Signing.
    Active,
    /// Replaced; kept in the bundle until the last SVID it signed has expired.
    Old,
}

impl CaState {
    /// The state as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
        }
    }

    /// The state a stored text names.
    ///
    /// # Errors
    /// [`StoreError::Corrupt`] for any other text.
    pub fn parse(text: &str) -> Result<Self, StoreError> {
        match text {
            "prepared" => Ok(Self::Prepared),
            "active" => Ok(Self::Active),
            "old" => Ok(Self::Old),
            other => Err(StoreError::Corrupt(format!(
                "the CA journal holds the unknown state '{}'",
                crate::text::escape_bounded(other, 40)
            ))),
        }
    }
}

/// One CA in the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaJournalRecord {
    /// Hex SHA-256 of the CA certificate's DER.
    pub ca_id: String,
    /// The server that owns it (and holds its key).
    pub instance_id: String,
    /// Where it is in its lifecycle.
    pub state: CaState,
    /// An operator marked it compromised: agents re-issue what it signed.
    pub tainted: bool,
    /// An operator removed it from the bundle.
    pub revoked: bool,
    /// Signed by an upstream CA (the bundle then holds the upstream root, not this CA).
    pub upstream: bool,
    /// Its notBefore, Unix seconds.
    pub not_before: i64,
    /// Its notAfter, Unix seconds.
    pub not_after: i64,
    /// The CA certificate, DER.
    pub der: Vec<u8>,
    /// No SVID it signed lives past this Unix second (an upper bound: its notAfter while it
    /// may sign, then the time it stopped signing plus the longest SVID TTL).
    pub signed_until: i64,
    /// The public half of its JWT signing key (an uncompressed P-256 point), if it has one.
    pub jwt_public: Option<Vec<u8>>,
}

/// One step of the journal, applied atomically with the bundle changes it implies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaChange {
    /// Adds a CA and publishes `roots` in the bundle.
    Insert {
        /// The new row.
        record: CaJournalRecord,
        /// The certificates it adds to the bundle.
        roots: Vec<CaCertRecord>,
    },
    /// Makes the prepared CA `ca_id` of `instance_id` active, and its active CA old, signing
    /// nothing after `old_signed_until` (capped at that CA's notAfter).
    Activate {
        /// The server.
        instance_id: String,
        /// The prepared CA.
        ca_id: String,
        /// The bound of what the replaced CA signed.
        old_signed_until: i64,
    },
    /// Marks a CA tainted.
    Taint {
        /// The CA.
        ca_id: String,
    },
    /// Revokes a tainted CA that is not active: it leaves the bundle.
    Revoke {
        /// The CA.
        ca_id: String,
    },
    /// Gives a CA journaled before JWT-SVIDs existed its JWT key (published at once).
    AttachJwtKey {
        /// The CA.
        ca_id: String,
        /// The key's uncompressed P-256 point.
        jwt_public: Vec<u8>,
    },
    /// Forgets a CA that does not sign (old, or prepared but unusable) and removes it from the
    /// bundle.
    Drop {
        /// The CA.
        ca_id: String,
    },
}

/// Every column, in [`JournalRow`]'s order.
pub(crate) const SELECT_ALL: &str = "SELECT ca_id, instance_id, state, tainted, revoked, upstream, \
     not_before, not_after, der, signed_until, jwt_public FROM ca_journal ORDER BY not_before, ca_id";
pub(crate) const INSERT: &str = "INSERT INTO ca_journal (ca_id, instance_id, state, tainted, \
     revoked, upstream, not_before, not_after, der, signed_until, jwt_public) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";
/// An upstream root is published once per CA under it: it stays as long as the longest-lived.
pub(crate) const PUBLISH: &str = "INSERT INTO ca_certs (fingerprint, der, not_after) \
     VALUES ($1, $2, $3) ON CONFLICT (fingerprint) DO UPDATE SET not_after = excluded.not_after \
     WHERE ca_certs.not_after < excluded.not_after";
pub(crate) const RETIRE_ACTIVE: &str = "UPDATE ca_journal SET state = 'old', \
     signed_until = CASE WHEN not_after < $2 THEN not_after ELSE $2 END \
     WHERE instance_id = $1 AND state = 'active'";
pub(crate) const ACTIVATE: &str = "UPDATE ca_journal SET state = 'active' \
     WHERE instance_id = $1 AND ca_id = $2 AND state = 'prepared' AND NOT revoked \
     AND NOT tainted";
pub(crate) const TAINT: &str =
    "UPDATE ca_journal SET tainted = TRUE WHERE ca_id = $1 AND NOT tainted";
pub(crate) const REVOKE: &str = "UPDATE ca_journal SET revoked = TRUE, state = 'old' \
     WHERE ca_id = $1 AND tainted AND NOT revoked AND state <> 'active'";
pub(crate) const ATTACH_JWT: &str =
    "UPDATE ca_journal SET jwt_public = $2 WHERE ca_id = $1 AND jwt_public IS NULL";
pub(crate) const DROP: &str = "DELETE FROM ca_journal WHERE ca_id = $1 AND state <> 'active'";
pub(crate) const UNPUBLISH: &str = "DELETE FROM ca_certs WHERE fingerprint = $1";
pub(crate) const BUMP: &str = "UPDATE bundle_sequence SET seq = seq + 1 WHERE id = 1";
pub(crate) const SEQUENCE: &str = "SELECT seq FROM bundle_sequence WHERE id = 1";

/// A `ca_journal` row as read.
#[derive(sqlx::FromRow)]
pub(crate) struct JournalRow {
    ca_id: String,
    instance_id: String,
    state: String,
    tainted: bool,
    revoked: bool,
    upstream: bool,
    not_before: i64,
    not_after: i64,
    der: Vec<u8>,
    signed_until: i64,
    jwt_public: Option<Vec<u8>>,
}

impl TryFrom<JournalRow> for CaJournalRecord {
    type Error = StoreError;

    fn try_from(row: JournalRow) -> Result<Self, StoreError> {
        Ok(Self {
            ca_id: row.ca_id,
            instance_id: row.instance_id,
            state: CaState::parse(&row.state)?,
            tainted: row.tainted,
            revoked: row.revoked,
            upstream: row.upstream,
            not_before: row.not_before,
            not_after: row.not_after,
            der: row.der,
            signed_until: row.signed_until,
            jwt_public: row.jwt_public,
        })
    }
}

/// Runs one [`CaChange`] on an open transaction of either engine; `Ok(false)` when the change
/// no longer applies (another caller got there first), in which case the caller rolls back.
macro_rules! apply_ca_change {
    ($tx:expr, $change:expr) => {{
        use $crate::store::ca_journal as j;
        let tx = $tx;
        let (applied, published_changed) = match $change {
            j::CaChange::Insert { record, roots } => {
                sqlx::query(j::INSERT)
                    .bind(&record.ca_id)
                    .bind(&record.instance_id)
                    .bind(record.state.as_str())
                    .bind(record.tainted)
                    .bind(record.revoked)
                    .bind(record.upstream)
                    .bind(record.not_before)
                    .bind(record.not_after)
                    .bind(&record.der)
                    .bind(record.signed_until)
                    .bind(record.jwt_public.as_deref())
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| {
                        $crate::store::rows::unique_violation(e, || {
                            format!(
                                "CA {} (or another {} CA of this server)",
                                record.ca_id,
                                record.state.as_str()
                            )
                        })
                    })?;
                let mut added = 0;
                for root in roots {
                    added += sqlx::query(j::PUBLISH)
                        .bind(&root.fingerprint)
                        .bind(&root.der)
                        .bind(root.not_after)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                }
                // A new JWT key changes the bundle even when the CA's root was published
                // already (an upstream root shared by several CAs).
                (true, added > 0 || record.jwt_public.is_some())
            }
            j::CaChange::AttachJwtKey { ca_id, jwt_public } => {
                let done = sqlx::query(j::ATTACH_JWT)
                    .bind(ca_id)
                    .bind(jwt_public)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                (done == 1, done == 1)
            }
            j::CaChange::Activate {
                instance_id,
                ca_id,
                old_signed_until,
            } => {
                sqlx::query(j::RETIRE_ACTIVE)
                    .bind(instance_id)
                    .bind(*old_signed_until)
                    .execute(&mut *tx)
                    .await?;
                let done = sqlx::query(j::ACTIVATE)
                    .bind(instance_id)
                    .bind(ca_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                (done == 1, false)
            }
            j::CaChange::Taint { ca_id }
            | j::CaChange::Revoke { ca_id }
            | j::CaChange::Drop { ca_id } => {
                // Taint changes no published certificate; revoke and drop remove the CA's.
                let (sql, unpublish) = match $change {
                    j::CaChange::Taint { .. } => (j::TAINT, false),
                    j::CaChange::Revoke { .. } => (j::REVOKE, true),
                    _ => (j::DROP, true),
                };
                let done = sqlx::query(sql)
                    .bind(ca_id)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if done == 1 && unpublish {
                    sqlx::query(j::UNPUBLISH)
                        .bind(ca_id)
                        .execute(&mut *tx)
                        .await?;
                }
                (done == 1, unpublish)
            }
        };
        if applied && published_changed {
            sqlx::query(j::BUMP).execute(&mut *tx).await?;
        }
        applied
    }};
}
pub(crate) use apply_ca_change;

/// Publishes one CA certificate on an open transaction of either engine, bumping the bundle
/// sequence when it is new.
macro_rules! publish_ca_cert {
    ($tx:expr, $cert:expr) => {{
        use $crate::store::ca_journal as j;
        let tx = $tx;
        let cert = $cert;
        let added = sqlx::query(j::PUBLISH)
            .bind(&cert.fingerprint)
            .bind(&cert.der)
            .bind(cert.not_after)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if added > 0 {
            sqlx::query(j::BUMP).execute(&mut *tx).await?;
        }
    }};
}
pub(crate) use publish_ca_cert;

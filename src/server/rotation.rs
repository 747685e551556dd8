//! The CA journal's server side (issue 10): resume this server's CAs at start, rotate them on
//! schedule, and the operator's steps (`mayfly ca prepare|activate|taint|revoke`).
//!
//! Each server owns its CAs (its instance ID, kept in `<data dir>/instance_id`, names them in
//! the journal) and keeps their keys as files, `<data dir>/ca/<CA ID>.key` (the certificate
//! beside it as `<CA ID>.pem`, for operators). A key is written
//! (synced, renamed into place) before its journal row, so `kill -9` never leaves a row whose
//! key is missing; an orphan key file is harmless. Every step is one store transaction, so a
//! restart at any point finds the journal in a state it resumes from.
//!
//! Schedule (SPIRE's): the next CA is prepared, and published in the bundle at once, when the
//! active one has at most 1/2 of its lifetime left; it is activated at 1/6 left; the replaced
//! CA stays in the bundle until the last SVID it may have signed has expired. With `ca_ttl` at
//! least 6× the longest SVID TTL, no SVID is cut short by CA expiry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject as _;
use tokio::sync::Notify;

use crate::ca::{Authority, CaError, CaSet, UpstreamCa};
use crate::files::{self, FileError};
use crate::id::TrustDomain;
use crate::jwt::{JwtError, JwtSigner};
use crate::store::{CaCertRecord, CaChange, CaJournalRecord, CaState, Store, StoreError};
use crate::wire::unix_secs;

/// The file holding this server's instance ID.
const INSTANCE_ID_FILE: &str = "instance_id";
/// How long after a swap an issuance that took the old CA may still sign with it, at most.
const IN_FLIGHT_MARGIN: Duration = Duration::from_secs(5);
/// The same warning is logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Why a CA step failed.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The journal could not be read or written.
    #[error("the CA journal could not be read or written; check the database")]
    Store(#[from] StoreError),
    /// A CA could not be created or loaded.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A JWT signing key could not be made.
    #[error(transparent)]
    Jwt(#[from] JwtError),
    /// A key or instance ID file could not be written.
    #[error(transparent)]
    File(#[from] FileError),
    /// The instance ID file holds something else.
    #[error(
        "{0} does not hold an instance ID (32 hexadecimal digits); restore it from a backup, or remove it to make this server a new instance"
    )]
    BadInstanceId(PathBuf),
    /// The step does not apply in the journal's present state.
    #[error("{0}")]
    OutOfOrder(String),
    /// No CA has this ID.
    #[error("no CA {0}; `mayfly ca list` shows the CAs")]
    NotFound(String),
}

/// This server's rows of the journal and their key files.
struct Journal {
    store: Arc<dyn Store>,
    td: TrustDomain,
    instance_id: String,
    key_dir: PathBuf,
    ca_ttl: Duration,
    max_svid_ttl: Duration,
    upstream: Option<UpstreamCa>,
}

/// One server's CAs: the journal, the key files and the [`CaSet`] issuance signs with.
pub(crate) struct Rotation {
    journal: Journal,
    cas: Arc<CaSet>,
    /// One step at a time: the schedule and the operator's commands never interleave.
    steps: tokio::sync::Mutex<()>,
    /// Woken after every step, so the server refreshes its bundle and own SVID at once.
    pub(crate) changed: Notify,
    warned: Mutex<HashMap<&'static str, Instant>>,
    /// SHA-256 of every tainted CA of the trust domain, as agents are told at each sync.
    tainted: Mutex<Arc<Vec<Vec<u8>>>>,
}

/// What [`Rotation::resume`] needs from the server's configuration.
pub(crate) struct RotationConfig<'a> {
    pub(crate) data_dir: &'a Path,
    pub(crate) td: &'a TrustDomain,
    pub(crate) ca_ttl: Duration,
    pub(crate) max_svid_ttl: Duration,
    pub(crate) upstream: Option<&'a UpstreamCa>,
}

/// Reads this server's instance ID, creating it (random) on first start.
fn instance_id(data_dir: &Path) -> Result<String, RotationError> {
    let path = data_dir.join(INSTANCE_ID_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(id.to_ascii_lowercase())
            } else {
                Err(RotationError::BadInstanceId(path))
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let id = crate::store::EntryId::generate().to_string();
            files::write_atomically(data_dir, INSTANCE_ID_FILE, id.as_bytes(), 0o600)?;
            Ok(id)
        }
        Err(e) => Err(files::io_error("read", &path)(e).into()),
    }
}

impl Journal {
    /// The active and prepared CAs of this server, resumed from `rows` (see
    /// [`Rotation::resume`]).
    async fn resume(
        &self,
        rows: &[CaJournalRecord],
    ) -> Result<(Arc<Authority>, Option<Arc<Authority>>), RotationError> {
        let mine = |state| {
            rows.iter()
                .find(|r| r.instance_id == self.instance_id && r.state == state && !r.revoked)
        };
        let active = match mine(CaState::Active) {
            Some(row) => self.load_row(row).await?,
            None => None,
        };
        let mut next = match mine(CaState::Prepared) {
            Some(row) => self.load_row(row).await?,
            None => None,
        };
        // An unusable prepared CA would block the next one: forget it (its key file stays).
        if let Some(row) = mine(CaState::Prepared)
            && next.is_none()
        {
            self.store
                .apply_ca_change(&CaChange::Drop {
                    ca_id: row.ca_id.clone(),
                })
                .await?;
        }
        if let Some(active) = active {
            return Ok((active, next));
        }
        let active = match next.take() {
            Some(prepared) => prepared,
            None => {
                match Authority::load_legacy(&self.key_dir, &self.td, self.upstream.as_ref())? {
                    Some(legacy) if !rows.iter().any(|r| r.ca_id == legacy.id()) => {
                        tracing::info!(ca_id = %legacy.id(), "moving the CA of ca/ca.pem into the CA journal");
                        self.install(legacy).await?
                    }
                    _ => {
                        let fresh =
                            Authority::create_with(&self.td, self.ca_ttl, self.upstream.as_ref())?;
                        tracing::info!(ca_id = %fresh.id(), not_after = fresh.not_after_unix(), "created a new CA");
                        self.install(fresh).await?
                    }
                }
            }
        };
        self.activate_row(&active.id()).await?;
        Ok((active, None))
    }

    /// The CA of a journal row, if its key file is there and it can still sign.
    async fn load_row(
        &self,
        row: &CaJournalRecord,
    ) -> Result<Option<Arc<Authority>>, RotationError> {
        let key_path = self.key_dir.join(format!("{}.key", row.ca_id));
        if !key_path.exists() {
            tracing::warn!(ca_id = %row.ca_id, path = %key_path.display(), "the key of a journaled CA is missing; replacing that CA");
            return Ok(None);
        }
        let loaded = Authority::resume(&self.td, &row.der, &key_path, self.upstream.as_ref())?;
        let Some(ca) = loaded else {
            tracing::warn!(ca_id = %row.ca_id, "a journaled CA can no longer sign (expired, or another trust domain or upstream CA); replacing it");
            return Ok(None);
        };
        Ok(Some(Arc::new(self.pair_jwt_key(row, ca).await?)))
    }

    /// `ca` with the JWT key of its journal row. A CA journaled before JWT-SVIDs existed gets
    /// a new key now, published at once; a CA whose key file is lost signs no JWT-SVIDs (the
    /// next rotation brings a CA with a key).
    async fn pair_jwt_key(
        &self,
        row: &CaJournalRecord,
        ca: Authority,
    ) -> Result<Authority, RotationError> {
        let file = jwt_key_file(&row.ca_id);
        let Some(public) = &row.jwt_public else {
            let (signer, pkcs8) = JwtSigner::generate()?;
            write_jwt_key(&self.key_dir, &file, &pkcs8)?;
            self.store
                .apply_ca_change(&CaChange::AttachJwtKey {
                    ca_id: row.ca_id.clone(),
                    jwt_public: signer.public().point().to_vec(),
                })
                .await?;
            tracing::info!(ca_id = %row.ca_id, kid = signer.kid(), "gave a CA journaled before JWT-SVIDs its JWT signing key");
            return Ok(ca.with_jwt(signer));
        };
        let path = self.key_dir.join(&file);
        let signer = std::fs::read(&path)
            .ok()
            .and_then(|pem| PrivatePkcs8KeyDer::from_pem_slice(&pem).ok())
            .and_then(|der| JwtSigner::from_pkcs8(der.secret_pkcs8_der()).ok())
            .filter(|s| s.public().point() == public.as_slice());
        match signer {
            Some(signer) => Ok(ca.with_jwt(signer)),
            None => {
                tracing::warn!(ca_id = %row.ca_id, path = %path.display(), "the JWT key of a journaled CA is missing or does not match its published key; this CA signs no JWT-SVIDs until the next rotation");
                Ok(ca)
            }
        }
    }

    /// Writes the key files, then journals `ca` as prepared and publishes its roots and the
    /// public half of its new JWT key.
    async fn install(&self, ca: Authority) -> Result<Arc<Authority>, RotationError> {
        let id = ca.id();
        let (jwt, pkcs8) = JwtSigner::generate()?;
        write_jwt_key(&self.key_dir, &jwt_key_file(&id), &pkcs8)?;
        let jwt_public = Some(jwt.public().point().to_vec());
        let ca = ca.with_jwt(jwt);
        files::write_atomically(
            &self.key_dir,
            &format!("{id}.key"),
            ca.key_pem().as_bytes(),
            0o600,
        )?;
        // For operators and tools; the journal row is what the server reads.
        files::write_atomically(
            &self.key_dir,
            &format!("{id}.pem"),
            ca.certificate_pem().as_bytes(),
            0o644,
        )?;
        let not_after = i64::try_from(ca.not_after_unix()).unwrap_or(i64::MAX);
        let roots = ca
            .bundle_roots()
            .iter()
            .map(|root| CaCertRecord {
                fingerprint: hex::encode(aws_lc_rs::digest::digest(
                    &aws_lc_rs::digest::SHA256,
                    root,
                )),
                der: root.to_vec(),
                not_after,
            })
            .collect();
        let record = CaJournalRecord {
            ca_id: id,
            instance_id: self.instance_id.clone(),
            state: CaState::Prepared,
            tainted: false,
            revoked: false,
            upstream: ca.is_intermediate(),
            not_before: i64::try_from(ca.not_before_unix()).unwrap_or(0),
            not_after,
            der: ca.certificate().to_vec(),
            signed_until: not_after,
            jwt_public,
        };
        self.store
            .apply_ca_change(&CaChange::Insert { record, roots })
            .await?;
        Ok(Arc::new(ca))
    }

    /// Makes the prepared CA `ca_id` active in the journal, and the active one old.
    async fn activate_row(&self, ca_id: &str) -> Result<(), RotationError> {
        // An issuance that took the old CA just before the swap signs a moment later.
        let bound = SystemTime::now() + self.max_svid_ttl + IN_FLIGHT_MARGIN;
        let applied = self
            .store
            .apply_ca_change(&CaChange::Activate {
                instance_id: self.instance_id.clone(),
                ca_id: ca_id.to_owned(),
                old_signed_until: unix_secs(bound),
            })
            .await?;
        if !applied {
            return Err(RotationError::OutOfOrder(format!(
                "CA {ca_id} is no longer prepared (another command changed it); run `mayfly ca list` and try again"
            )));
        }
        Ok(())
    }
}

/// The file name of the JWT key paired with CA `ca_id`.
fn jwt_key_file(ca_id: &str) -> String {
    format!("{ca_id}.jwt.key")
}

/// Writes a JWT key as PKCS#8 PEM, mode 0600, atomically.
fn write_jwt_key(dir: &Path, name: &str, pkcs8: &[u8]) -> Result<(), RotationError> {
    let pem = crate::bundle::pem_block("PRIVATE KEY", pkcs8);
    files::write_atomically(dir, name, pem.as_bytes(), 0o600)?;
    Ok(())
}

/// The fingerprints of the tainted CAs among `rows`.
fn tainted_of(rows: &[CaJournalRecord]) -> Vec<Vec<u8>> {
    rows.iter()
        .filter(|r| r.tainted)
        .filter_map(|r| hex::decode(&r.ca_id).ok())
        .collect()
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

impl Rotation {
    /// Resumes this server's CAs from the journal: the active CA if it can still sign, else
    /// the prepared one (activated now), else the CA of the layout before the journal
    /// (`ca/ca.{key,pem}`, migrated), else a new one. A valid CA is never replaced by an
    /// unrelated one.
    ///
    /// # Errors
    /// [`RotationError`] when the journal, a key file or the upstream CA is unusable.
    pub(crate) async fn resume(
        store: Arc<dyn Store>,
        config: &RotationConfig<'_>,
    ) -> Result<Self, RotationError> {
        let instance_id = instance_id(config.data_dir)?;
        let key_dir = config.data_dir.join("ca");
        files::create_dir(&key_dir, 0o700)?;
        let rows = store.list_ca_journal().await?;
        let journal = Journal {
            store,
            td: config.td.clone(),
            instance_id,
            key_dir,
            ca_ttl: config.ca_ttl,
            max_svid_ttl: config.max_svid_ttl,
            upstream: config.upstream.cloned(),
        };
        let (active, next) = journal.resume(&rows).await?;
        Ok(Self {
            journal,
            cas: Arc::new(CaSet::from_arcs(active, next)),
            steps: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
            warned: Mutex::new(HashMap::new()),
            tainted: Mutex::new(Arc::new(tainted_of(&rows))),
        })
    }

    /// The CAs issuance signs with.
    pub(crate) fn cas(&self) -> Arc<CaSet> {
        Arc::clone(&self.cas)
    }

    /// One pass of the schedule at `now`: prepare, activate, drop what has run out. Returns
    /// whether the signing CA changed.
    ///
    /// # Errors
    /// [`RotationError`] for the step that failed; the next pass tries again.
    pub(crate) async fn tick(&self, now: SystemTime) -> Result<bool, RotationError> {
        let _step = self.steps.lock().await;
        let current = self.cas.current();
        let now_s = unix_secs(now);
        // notBefore is backdated by the clock skew allowance; the schedule counts from issue.
        let issued = current.not_before_unix() + crate::svid::CLOCK_SKEW.as_secs();
        let life = secs(Duration::from_secs(
            current.not_after_unix().saturating_sub(issued),
        ));
        let left = i64::try_from(current.not_after_unix()).unwrap_or(i64::MAX) - now_s;
        let mut changed = false;
        if self.cas.next().is_none() && left * 2 <= life {
            self.prepare_locked().await?;
        }
        if self.cas.next().is_some() && left * 6 <= life {
            self.activate_locked().await?;
            changed = true;
        }
        if !changed && self.cas.next().is_none() && left * 6 <= life {
            self.warn_limited(
                "no-successor",
                &format!("the signing CA expires in {left}s and no successor is prepared"),
            );
        }
        let rows = self.journal.store.list_ca_journal().await?;
        // Other servers' taints reach this one's agents within a pass.
        self.set_tainted(&rows);
        for row in rows {
            let spent = row.state == CaState::Old && row.signed_until < now_s;
            let dead = row.not_after < now_s && row.state != CaState::Active;
            if row.instance_id == self.journal.instance_id && (spent || dead) {
                tracing::info!(ca_id = %row.ca_id, "dropping an old CA from the bundle: no SVID it signed is still valid");
                self.journal
                    .store
                    .apply_ca_change(&CaChange::Drop { ca_id: row.ca_id })
                    .await?;
            }
        }
        Ok(changed)
    }

    /// Logs `message` as a warning, at most once per [`WARN_EVERY`] for `key`.
    pub(crate) fn warn_limited(&self, key: &'static str, message: &str) {
        let mut warned = self.warned.lock().unwrap_or_else(PoisonError::into_inner);
        let due = warned.get(key).is_none_or(|t| t.elapsed() >= WARN_EVERY);
        if due {
            warned.insert(key, Instant::now());
            tracing::warn!("{message}");
        }
    }

    async fn prepare_locked(&self) -> Result<CaJournalRecord, RotationError> {
        if let Some(next) = self.cas.next() {
            return Err(RotationError::OutOfOrder(format!(
                "CA {} is already prepared; activate it with `mayfly ca activate` before preparing another",
                next.id()
            )));
        }
        let ca = Authority::create_with(
            &self.journal.td,
            self.journal.ca_ttl,
            self.journal.upstream.as_ref(),
        )?;
        let wanted = unix_secs(SystemTime::now() + self.journal.ca_ttl);
        if i64::try_from(ca.not_after_unix()).unwrap_or(i64::MAX) + 60 < wanted {
            self.warn_limited(
                "upstream-expiry",
                "the upstream CA expires before a full CA lifetime; the next CA is cut to its notAfter, so renew the upstream CA",
            );
        }
        let ca = self.journal.install(ca).await?;
        tracing::info!(ca_id = %ca.id(), not_after = ca.not_after_unix(), "prepared the next CA and published it in the bundle");
        self.cas.set(self.cas.current(), Some(Arc::clone(&ca)));
        self.changed.notify_one();
        self.record(&ca.id()).await
    }

    async fn activate_locked(&self) -> Result<CaJournalRecord, RotationError> {
        let Some(next) = self.cas.next() else {
            return Err(RotationError::OutOfOrder(
                "no CA is prepared; run `mayfly ca prepare` first".into(),
            ));
        };
        let id = next.id();
        if self.record(&id).await?.tainted {
            return Err(RotationError::OutOfOrder(format!(
                "the prepared CA {id} is tainted, so it must never sign; revoke it (`mayfly ca revoke {id}`) and prepare another"
            )));
        }
        self.journal.activate_row(&id).await?;
        tracing::info!(ca_id = %id, "activated the prepared CA; the previous one signs nothing more");
        self.cas.set(next, None);
        self.changed.notify_one();
        self.record(&id).await
    }

    /// The journal row of `ca_id`.
    async fn record(&self, ca_id: &str) -> Result<CaJournalRecord, RotationError> {
        self.journal
            .store
            .list_ca_journal()
            .await?
            .into_iter()
            .find(|r| r.ca_id == ca_id)
            .ok_or_else(|| RotationError::NotFound(ca_id.to_owned()))
    }

    /// Prepares the next CA now (`mayfly ca prepare`).
    ///
    /// # Errors
    /// [`RotationError::OutOfOrder`] when one is already prepared.
    pub(crate) async fn prepare(&self) -> Result<CaJournalRecord, RotationError> {
        let _step = self.steps.lock().await;
        self.prepare_locked().await
    }

    /// Activates the prepared CA now (`mayfly ca activate`).
    ///
    /// # Errors
    /// [`RotationError::OutOfOrder`] when none is prepared.
    pub(crate) async fn activate(&self) -> Result<CaJournalRecord, RotationError> {
        let _step = self.steps.lock().await;
        self.activate_locked().await
    }

    /// Marks a CA tainted (`mayfly ca taint ID`): agents re-issue what it signed.
    ///
    /// # Errors
    /// [`RotationError::NotFound`]; [`RotationError::OutOfOrder`] for an active or already
    /// tainted CA.
    pub(crate) async fn taint(&self, ca_id: &str) -> Result<CaJournalRecord, RotationError> {
        let _step = self.steps.lock().await;
        let row = self.record(ca_id).await?;
        if row.state == CaState::Active {
            return Err(RotationError::OutOfOrder(format!(
                "CA {ca_id} is active and signing; replace it first (`mayfly ca prepare`, then `mayfly ca activate`) and taint it then"
            )));
        }
        if row.tainted {
            return Err(RotationError::OutOfOrder(format!(
                "CA {ca_id} is already tainted; revoke it with `mayfly ca revoke {ca_id}` if it must leave the bundle"
            )));
        }
        self.apply(CaChange::Taint {
            ca_id: ca_id.to_owned(),
        })
        .await?;
        self.set_tainted(&self.journal.store.list_ca_journal().await?);
        self.record(ca_id).await
    }

    /// Revokes a tainted, non-active CA (`mayfly ca revoke ID`): it leaves the bundle.
    ///
    /// # Errors
    /// [`RotationError::NotFound`]; [`RotationError::OutOfOrder`] for a CA that is active,
    /// not tainted, already revoked, or an intermediate under an upstream CA.
    pub(crate) async fn revoke(&self, ca_id: &str) -> Result<CaJournalRecord, RotationError> {
        let _step = self.steps.lock().await;
        let row = self.record(ca_id).await?;
        let refusal = if row.revoked {
            Some(format!("CA {ca_id} is already revoked"))
        } else if row.state == CaState::Active {
            Some(format!(
                "CA {ca_id} is active and signing; replace it (`mayfly ca prepare`, then `mayfly ca activate`) and taint it before revoking it"
            ))
        } else if !row.tainted {
            Some(format!(
                "CA {ca_id} is not tainted; taint it first (`mayfly ca taint {ca_id}`) so agents replace what it signed before it leaves the bundle"
            ))
        } else if row.upstream {
            Some(format!(
                "CA {ca_id} is an intermediate under the upstream CA, whose root is what the bundle holds; it cannot leave the bundle alone, so rotate the upstream CA instead"
            ))
        } else {
            None
        };
        if let Some(message) = refusal {
            return Err(RotationError::OutOfOrder(message));
        }
        self.apply(CaChange::Revoke {
            ca_id: ca_id.to_owned(),
        })
        .await?;
        if self.cas.next().is_some_and(|n| n.id() == ca_id) {
            self.cas.set(self.cas.current(), None);
        }
        self.record(ca_id).await
    }

    async fn apply(&self, change: CaChange) -> Result<(), RotationError> {
        if !self.journal.store.apply_ca_change(&change).await? {
            return Err(RotationError::OutOfOrder(
                "the CA changed meanwhile (another command or server); run `mayfly ca list` and try again".into(),
            ));
        }
        self.changed.notify_one();
        Ok(())
    }

    /// SHA-256 of every tainted CA (see [`Rotation::tick`], which re-reads them).
    pub(crate) fn tainted(&self) -> Vec<Vec<u8>> {
        self.tainted
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .to_vec()
    }

    fn set_tainted(&self, rows: &[CaJournalRecord]) {
        *self.tainted.lock().unwrap_or_else(PoisonError::into_inner) = Arc::new(tainted_of(rows));
    }

    /// This server's instance ID.
    pub(crate) fn instance_id(&self) -> &str {
        &self.journal.instance_id
    }
}

//! The node API: attestation, agent renewal, entry sync and SVID issuance.
//!
//! Every call but `Attest` re-checks the calling agent against the store (known, not banned,
//! presenting its current or next SVID, not expired), so a ban or an eviction takes effect at
//! the agent's next call. Every issuance and every refusal is audited; an SVID is returned only
//! after its audit record is durable.

use std::sync::Arc;
use std::time::SystemTime;

use tonic::{Request, Response, Status};

use crate::audit::{self, AuditAction, AuditEvent, Decision};
use crate::id::ScopedId;
use crate::mtls::VerifiedPeer;
use crate::proto::node as pb;
use crate::server::ServerState;
use crate::server::audit_log::AuditError;
use crate::server::conn::PeerInfo;
use crate::server::entry_sync::{self, EntrySyncError, entry_message};
use crate::server::policy::{self, Refusal, Standing, check_task_id};
use crate::store::{AgentRecord, Entry, EntryId, StoreError};
use crate::svid::{self, IssuedSvid, LeafSpec, RequestedKey, SvidError};
use crate::wire::unix_secs;

mod attest;
mod jwt;

/// The longest entry ID a request may carry before it is refused unread.
const MAX_ENTRY_ID_LEN: usize = 64;
/// The largest CSR a request may carry before it is refused unread.
const MAX_CSR_LEN: usize = 4096;
/// The longest a `ListEntries` call is held waiting for a change (the agent may ask less).
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(25);
/// How often the standing of an agent whose call is held is checked again.
const STANDING_RECHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Why a node API call failed; mapped to a gRPC status in [`NodeError::status`] only.
#[derive(Debug, thiserror::Error)]
enum NodeError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error("the request's CSR was refused")]
    Csr(#[source] SvidError),
    #[error("signing failed")]
    Sign(#[source] SvidError),
    #[error("the server's store failed")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    /// An incremental entry sync failed.
    #[error(transparent)]
    Sync(#[from] EntrySyncError),
    /// The signing CA has no JWT key (its key file was lost); the next CA will.
    #[error(
        "this server cannot sign JWT-SVIDs until its next CA rotation (its JWT key is missing); use another server or run `mayfly ca prepare` and `mayfly ca activate`"
    )]
    NoJwtKey,
    /// A JWT-SVID could not be signed.
    #[error("signing the JWT-SVID failed")]
    Jwt(#[source] crate::jwt::JwtError),
}

impl NodeError {
    fn status(&self) -> Status {
        let mut status = self.bare_status();
        if let Self::Refused(r) = self {
            r.kind().attach(&mut status);
        }
        status
    }

    fn bare_status(&self) -> Status {
        let message = self.text();
        match self {
            Self::Refused(Refusal::NotAuthenticated) => Status::unauthenticated(message),
            Self::Refused(r) if r.is_invalid_argument() => Status::invalid_argument(message),
            Self::Refused(_) => Status::permission_denied(message),
            Self::Csr(_) | Self::Sync(EntrySyncError::BadPageToken) => {
                Status::invalid_argument(message)
            }
            Self::Sign(_)
            | Self::NoJwtKey
            | Self::Jwt(_)
            | Self::Sync(EntrySyncError::Store(_))
            | Self::Store(_)
            | Self::Audit(_) => {
                tracing::error!(error = %message, "node API call failed");
                Status::unavailable(message)
            }
        }
    }

    /// The error with its causes, as the caller and the audit log get it.
    fn text(&self) -> String {
        crate::wire::error_chain(self)
    }

    /// Whether the refusal is a decision worth an audit record (internal failures are logged
    /// instead: their records might not be writable either).
    fn is_decision(&self) -> bool {
        matches!(self, Self::Refused(_) | Self::Csr(_))
    }
}

/// The node API service.
#[derive(Clone)]
pub struct NodeService {
    state: Arc<ServerState>,
}

impl NodeService {
    /// The service over the server's state.
    pub(crate) fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    /// Audits a refusal and turns it into the status the caller gets.
    async fn refuse(&self, mut event: AuditEvent, err: NodeError) -> Status {
        if err.is_decision() {
            event.decision = Some(Decision::Deny);
            // Every caller-chosen value in the reason was escaped where it entered the
            // message (IdError, DnsNameError and the refusals here hold escaped text), and
            // the event's free-text fields were escaped when they were filled in.
            event.reason = err.text();
            tracing::debug!(
                action = %event.action,
                reason = %event.reason,
                attestor = event.attestor.as_deref().unwrap_or_default(),
                task_id = event.task_id.as_deref().unwrap_or_default(),
                "refused"
            );
            if let Err(audit_err) = self.state.audit.record(event).await {
                tracing::error!(error = %crate::wire::error_chain(&audit_err), "could not audit a refusal");
            }
        }
        err.status()
    }

    /// The calling agent, checked against the store; its renewed SVID becomes current on first
    /// use. `event`, when the call is audited, learns who the agent is.
    async fn authorize_agent(
        &self,
        peer: Option<&VerifiedPeer>,
        event: Option<&mut AuditEvent>,
    ) -> Result<AgentRecord, NodeError> {
        let record = self.lookup_agent(peer).await;
        self.check_agent(peer, record, event).await
    }

    /// The store's record of the calling agent, unchecked; `None` for a peer that is no agent.
    async fn lookup_agent(
        &self,
        peer: Option<&VerifiedPeer>,
    ) -> Result<Option<AgentRecord>, StoreError> {
        match peer {
            Some(p) if self.state.policy.is_agent_id(p.id.spiffe_id()) => {
                self.state.store.get_agent(p.id.spiffe_id()).await
            }
            _ => Ok(None),
        }
    }

    /// Checks the calling agent's standing against its looked-up record; its renewed SVID
    /// becomes current on first use.
    async fn check_agent(
        &self,
        peer: Option<&VerifiedPeer>,
        record: Result<Option<AgentRecord>, StoreError>,
        mut event: Option<&mut AuditEvent>,
    ) -> Result<AgentRecord, NodeError> {
        if let (Some(p), Some(event)) = (peer, event.as_deref_mut()) {
            event.agent_id = Some(p.id.spiffe_id().to_string());
        }
        let record = record?;
        let standing = self
            .state
            .policy
            .check_agent(peer, record.as_ref(), SystemTime::now())?;
        let record = record.ok_or(Refusal::NotAuthenticated)?;
        if let Some(event) = event {
            event.attestor = Some(record.attestor.clone());
        }
        if let (Standing::FirstUseOfNext, Some(p)) = (standing, peer) {
            self.state
                .store
                .promote_agent_serial(&record.spiffe_id, &p.serial)
                .await?;
        }
        Ok(record)
    }

    /// The calling agent's record and the named entry's, read at once: an issuance needs
    /// both, and asked together they travel to the store together (one batch for SQLite's
    /// lookup batcher) instead of one after the other. Nothing is checked here: the caller
    /// checks the agent first, then the entry, so refusals keep their order.
    async fn lookup_agent_and_entry(
        &self,
        peer: Option<&VerifiedPeer>,
        entry_id: &str,
    ) -> (Result<Option<AgentRecord>, StoreError>, EntryLookup) {
        let entry = async {
            match Self::parse_entry_id(entry_id) {
                Ok(id) => {
                    let found = self.state.store.get_entry(&id).await;
                    EntryLookup::Read(id, found)
                }
                Err(refusal) => EntryLookup::Malformed(refusal),
            }
        };
        tokio::join!(self.lookup_agent(peer), entry)
    }

    /// The calling agent's entry `entry_id`, for an issuance: the agent's standing first, then
    /// `request_checks` (the request's own fields), then the entry, so refusals come in that
    /// order whatever is issued. `event` learns the agent and the entry.
    async fn issuance_entry(
        &self,
        peer: Option<&VerifiedPeer>,
        entry_id: &str,
        event: &mut AuditEvent,
        request_checks: impl FnOnce() -> Result<(), Refusal>,
    ) -> Result<Entry, NodeError> {
        let (agent, entry) = self.lookup_agent_and_entry(peer, entry_id).await;
        let agent = self.check_agent(peer, agent, Some(event)).await?;
        request_checks()?;
        self.entry_for(entry_id, entry, &agent, event).await
    }

    /// Signs an SVID for `id` with the current CA; of the CSR only the public key is used.
    fn sign(
        &self,
        id: &ScopedId,
        csr: &[u8],
        ttl: std::time::Duration,
        dns_names: &[String],
    ) -> Result<IssuedSvid, NodeError> {
        let key = svid::parse_csr(csr).map_err(NodeError::Csr)?;
        self.sign_key(id, &key, ttl, dns_names)
    }

    fn sign_key(
        &self,
        id: &ScopedId,
        key: &RequestedKey,
        ttl: std::time::Duration,
        dns_names: &[String],
    ) -> Result<IssuedSvid, NodeError> {
        let spec = LeafSpec {
            id,
            key,
            ttl,
            dns_names,
        };
        svid::issue(&self.state.cas.current(), &spec, SystemTime::now()).map_err(NodeError::Sign)
    }

    /// Records the issuance durably; only then may the SVID be returned.
    async fn audit_issued(
        &self,
        id: &ScopedId,
        issued: &IssuedSvid,
        mut event: AuditEvent,
    ) -> Result<(), NodeError> {
        event.decision = Some(Decision::Allow);
        event.reason = "issued".into();
        event.spiffe_id = Some(id.to_string());
        event.serial = Some(issued.serial);
        event.not_after = Some(unix_secs(issued.not_after));
        self.state.audit.record(event).await?;
        Ok(())
    }

    /// Signs an SVID for `id`, audits it durably, then returns it.
    async fn issue_audited(
        &self,
        id: &ScopedId,
        csr: &[u8],
        ttl: std::time::Duration,
        dns_names: &[String],
        event: AuditEvent,
    ) -> Result<IssuedSvid, NodeError> {
        let issued = self.sign(id, csr, ttl, dns_names)?;
        self.audit_issued(id, &issued, event).await?;
        Ok(issued)
    }

    /// The answer to an issuance: the SVID, or the audited refusal.
    async fn answer(
        &self,
        event: AuditEvent,
        result: Result<(ScopedId, IssuedSvid), NodeError>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        match result {
            Ok((id, issued)) => Ok(Response::new(pb::IssueResponse {
                svid: Some(svid_message(&id, issued)),
            })),
            Err(e) => Err(self.refuse(event, e).await),
        }
    }

    fn check_csr_size(csr: &[u8]) -> Result<(), Refusal> {
        if csr.is_empty() || csr.len() > MAX_CSR_LEN {
            return Err(Refusal::Invalid(format!(
                "the CSR must be 1 to {MAX_CSR_LEN} bytes of DER; send a PKCS#10 request for a P-256 key"
            )));
        }
        Ok(())
    }

    fn parse_entry_id(text: &str) -> Result<EntryId, Refusal> {
        if text.len() > MAX_ENTRY_ID_LEN {
            return Err(Refusal::Invalid(format!(
                "the entry ID is {} bytes; entry IDs are 32 hexadecimal digits",
                text.len()
            )));
        }
        EntryId::parse(text).ok_or_else(|| {
            Refusal::Invalid(format!(
                "'{}' is not an entry ID; entry IDs are 32 hexadecimal digits",
                audit::untrusted(text)
            ))
        })
    }

    /// Checks a looked-up entry: it must exist and belong to `agent`, or to a node group
    /// `agent` is in.
    async fn entry_for(
        &self,
        entry_id: &str,
        looked_up: EntryLookup,
        agent: &AgentRecord,
        event: &mut AuditEvent,
    ) -> Result<Entry, NodeError> {
        let (id, entry) = match looked_up {
            EntryLookup::Read(id, entry) => (id, entry),
            EntryLookup::Malformed(refusal) => return Err(refusal.into()),
        };
        event.entry_id = Some(id.to_string());
        let entry = entry?;
        // Only an entry under another parent needs the node group read, and only for an agent
        // with node selectors (a join-token agent is in no group): the common issuance stays
        // at two lookups.
        let groups = match &entry {
            Some(e) if e.parent_id != agent.spiffe_id && !agent.node_selectors.is_empty() => {
                let server = crate::wire::server_id(&self.state.td);
                self.state
                    .store
                    .list_node_entries(&server, Some(&e.parent_id))
                    .await?
            }
            _ => Vec::new(),
        };
        let entry = self
            .state
            .policy
            .check_entry(entry_id, entry.as_ref(), agent, &groups)?;
        event.spiffe_id = Some(entry.spiffe_id.to_string());
        Ok(entry.clone())
    }

    /// The bundle and the JWT keys, as entry sync sends them.
    fn published(&self) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        (self.bundle(), self.state.jwt_points())
    }

    fn bundle(&self) -> Vec<Vec<u8>> {
        self.state.bundle_der()
    }

    /// One page of an incremental sync. A first page with nothing for the agent is held while
    /// the agent asked to wait (at most [`MAX_WAIT`]): it is answered as soon as an entry under
    /// the agent changes or the bundle does, and the agent's standing is checked again every
    /// [`STANDING_RECHECK`], so a ban or an eviction ends the call. A shutting-down server
    /// answers at once.
    async fn sync_incremental(
        &self,
        peer: Option<&VerifiedPeer>,
        agent: &AgentRecord,
        req: &pb::ListEntriesRequest,
    ) -> Result<pb::ListEntriesResponse, NodeError> {
        let store = self.state.store.as_ref();
        // Subscribed before the first read, so a change between the two still wakes the wait.
        let mut changes = self.state.entry_watch.subscribe();
        let mut closing = self.state.entry_watch.closing();
        // Every page names the tainted CAs, and a held call ends when that set changes, so the
        // agent re-issues what a newly tainted CA signed within one standing re-check.
        let tainted = self.state.rotation.tainted();
        let server = crate::wire::server_id(&self.state.td);
        let mut answer = entry_sync::page(store, (&server, agent), req, self.published()).await?;
        answer.tainted_ca_fingerprints.clone_from(&tainted);
        let wait = std::time::Duration::from_millis(u64::from(req.wait_ms)).min(MAX_WAIT);
        if wait.is_zero() || !answer.unchanged || !answer.bundle.is_empty() {
            return Ok(answer);
        }
        let deadline = tokio::time::Instant::now() + wait;
        let mut recheck = tokio::time::interval_at(
            tokio::time::Instant::now() + STANDING_RECHECK,
            STANDING_RECHECK,
        );
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => return Ok(answer),
                () = closed(&mut closing) => return Ok(answer),
                changed = changes.changed() => {
                    if changed.is_err() {
                        return Ok(answer);
                    }
                }
                _ = recheck.tick() => {
                    self.authorize_agent(peer, None).await?;
                }
            }
            answer = entry_sync::page(store, (&server, agent), req, self.published()).await?;
            answer.tainted_ca_fingerprints = self.state.rotation.tainted();
            if !answer.unchanged
                || !answer.bundle.is_empty()
                || answer.tainted_ca_fingerprints != tainted
            {
                return Ok(answer);
            }
        }
    }
}

/// An entry as the store answered for an ID, or why the ID was refused unread.
enum EntryLookup {
    /// The ID parsed; the store's answer.
    Read(EntryId, Result<Option<Entry>, StoreError>),
    /// The ID is no entry ID.
    Malformed(Refusal),
}

/// Resolves once `closing` turns true (or its sender is gone).
async fn closed(closing: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = closing.wait_for(|c| *c).await;
}

fn peer_of<T>(request: &Request<T>) -> Option<Arc<VerifiedPeer>> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.peer.clone())
}

fn svid_message(id: &ScopedId, issued: IssuedSvid) -> pb::Svid {
    pb::Svid {
        spiffe_id: id.to_string(),
        cert_chain: issued.chain.into_iter().map(|c| c.to_vec()).collect(),
        serial: issued.serial.to_hex(),
        not_after: unix_secs(issued.not_after),
    }
}

fn event(action: AuditAction) -> AuditEvent {
    AuditEvent::new(action)
}

/// The event of a task issuance (X.509 or JWT). Until they are validated, the task ID and
/// scopes are recorded as the workload sent them, escaped and bounded: a refusal's record
/// cannot forge lines or hide text.
fn task_event(action: AuditAction, task_id: &str, scopes: &[String]) -> AuditEvent {
    let mut event = AuditEvent::new(action);
    event.task_id = Some(audit::untrusted(task_id));
    event.scopes = scopes
        .iter()
        .take(policy::MAX_SCOPES)
        .map(|s| audit::untrusted(s))
        .collect();
    event
}

#[tonic::async_trait]
impl pb::node_server::Node for NodeService {
    async fn attest(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        self.attest_unary(request).await
    }

    type AttestAgentStream = attest::AttestStream;

    async fn attest_agent(
        &self,
        request: Request<tonic::Streaming<pb::AttestAgentRequest>>,
    ) -> Result<Response<Self::AttestAgentStream>, Status> {
        self.attest_stream(request).await
    }

    async fn renew_agent(
        &self,
        request: Request<pb::RenewAgentRequest>,
    ) -> Result<Response<pb::RenewAgentResponse>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        let mut event = event(AuditAction::AgentRenew);
        let result: Result<(ScopedId, IssuedSvid), NodeError> = async {
            let agent = self
                .authorize_agent(peer.as_deref(), Some(&mut event))
                .await?;
            Self::check_csr_size(&req.csr)?;
            let id = ScopedId::new(agent.spiffe_id.clone(), Default::default())
                .map_err(Refusal::from)?;
            // Authorized, so there is a peer; its serial is the one to supersede.
            let presented = peer.as_ref().ok_or(Refusal::NotAuthenticated)?.serial;
            // Sign first, record the new serial, then audit: if the agent's standing changed
            // meanwhile (banned, evicted, renewed elsewhere) the store refuses the serial and
            // the new SVID is never returned.
            let issued = self.sign(&id, &req.csr, self.state.agent_ttl, &[])?;
            if !self
                .state
                .store
                .set_agent_next_serial(
                    &agent.spiffe_id,
                    &presented,
                    &issued.serial,
                    unix_secs(issued.not_after),
                )
                .await?
            {
                return Err(Refusal::SupersededSvid {
                    agent: agent.spiffe_id.to_string(),
                    serial: presented,
                }
                .into());
            }
            self.audit_issued(&id, &issued, event.clone()).await?;
            Ok((id, issued))
        }
        .await;
        match result {
            Ok((id, issued)) => Ok(Response::new(pb::RenewAgentResponse {
                svid: Some(svid_message(&id, issued)),
                bundle: self.bundle(),
            })),
            Err(e) => Err(self.refuse(event, e).await),
        }
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        let result: Result<pb::ListEntriesResponse, NodeError> = async {
            let agent = self.authorize_agent(peer.as_deref(), None).await?;
            let server = crate::wire::server_id(&self.state.td);
            if req.incremental {
                return self.sync_incremental(peer.as_deref(), &agent, &req).await;
            }
            // An agent of an earlier version: the whole list in one message, as it expects.
            let revision = self.state.store.entries_revision().await?;
            if revision == req.known_revision {
                return Ok(pb::ListEntriesResponse {
                    revision,
                    unchanged: true,
                    bundle: self.bundle(),
                    jwt_keys: self.state.jwt_points(),
                    tainted_ca_fingerprints: self.state.rotation.tainted(),
                    ..Default::default()
                });
            }
            let store = self.state.store.as_ref();
            let mut entries = Vec::new();
            for parent in entry_sync::parents_of(store, &server, &agent).await? {
                entries.extend(store.list_entries_by_parent(&parent).await?);
            }
            Ok(pb::ListEntriesResponse {
                revision,
                entries: entries.into_iter().map(entry_message).collect(),
                bundle: self.bundle(),
                jwt_keys: self.state.jwt_points(),
                tainted_ca_fingerprints: self.state.rotation.tainted(),
                ..Default::default()
            })
        }
        .await;
        result.map(Response::new).map_err(|e| {
            // Listing is not an issuance: refusals are returned, not audited, so a polling
            // banned agent cannot flood the log.
            e.status()
        })
    }

    async fn issue_identity(
        &self,
        request: Request<pb::IssueIdentityRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        let mut event = event(AuditAction::SvidIdentity);
        let result: Result<(ScopedId, IssuedSvid), NodeError> = async {
            let entry = self
                .issuance_entry(peer.as_deref(), &req.entry_id, &mut event, || {
                    Self::check_csr_size(&req.csr)
                })
                .await?;
            let (id, ttl) = self.state.policy.identity_grant(&entry)?;
            let issued = self
                .issue_audited(&id, &req.csr, ttl, &entry.dns_names, event.clone())
                .await?;
            Ok((id, issued))
        }
        .await;
        self.answer(event, result).await
    }

    async fn issue_identity_jwt(
        &self,
        request: Request<pb::IssueIdentityJwtRequest>,
    ) -> Result<Response<pb::IssueJwtResponse>, Status> {
        self.identity_jwt(request).await
    }

    async fn issue_task_jwt(
        &self,
        request: Request<pb::IssueTaskJwtRequest>,
    ) -> Result<Response<pb::IssueJwtResponse>, Status> {
        self.task_jwt(request).await
    }

    async fn issue_task(
        &self,
        request: Request<pb::IssueTaskRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        let mut event = task_event(AuditAction::SvidTask, &req.task_id, &req.scopes);
        let result: Result<(ScopedId, IssuedSvid), NodeError> = async {
            let entry = self
                .issuance_entry(peer.as_deref(), &req.entry_id, &mut event, || {
                    check_task_id(&req.task_id)?;
                    Self::check_csr_size(&req.csr)
                })
                .await?;
            let (id, ttl) = self
                .state
                .policy
                .task_grant(&entry, &req.scopes, req.ttl_seconds)?;
            event.scopes = id.scopes().iter().map(|s| s.to_string()).collect();
            let issued = self
                .issue_audited(&id, &req.csr, ttl, &entry.dns_names, event.clone())
                .await?;
            Ok((id, issued))
        }
        .await;
        self.answer(event, result).await
    }
}

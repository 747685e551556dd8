//! The admin API: entries, join tokens, agents, the bundle and the audit log, for operators on
//! the server's Unix socket. Every change is audited as the `operator`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use mayfly_attestors::join_token;
use tonic::{Request, Response, Status};

use crate::audit::{AuditAction, AuditEvent, AuditRecord, ChainError, ChainVerifier, Decision};
use crate::id::{IdError, SpiffeId};
use crate::proto::admin as pb;
use crate::server::ServerState;
use crate::server::admin_lists::{self, ListError};
use crate::server::audit_log::AuditError;
use crate::server::entry_rules::{EntryError, EntryRules};
use crate::store::{AgentRecord, AuditFilter, Entry, EntryId, JoinTokenRecord, StoreError};
use crate::wire::unix_secs;

// CA rotation by hand (issue 10).
#[path = "admin_ca.rs"]
mod admin_ca;
// Entry updates (issue 11).
#[path = "admin_entry_update.rs"]
mod admin_entry_update;
// Node groups (issue 12).
#[path = "admin_groups.rs"]
mod admin_groups;
use crate::server::rotation::RotationError;
use admin_ca::CaStep;

/// Join tokens live this long unless asked otherwise.
pub const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(600);
/// No join token lives longer than this.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(7 * 86_400);
/// How often `audit list --follow` looks for new records.
const FOLLOW_POLL: Duration = Duration::from_millis(250);
/// Records read per page when listing or verifying the log.
const PAGE: u32 = 1000;

/// Why an admin call failed; mapped to a gRPC status in [`AdminError::status`] only.
#[derive(Debug, thiserror::Error)]
enum AdminError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Exists(String),
    #[error("the server's store failed")]
    Store(#[source] StoreError),
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Entry(#[from] EntryError),
    #[error(transparent)]
    Ca(RotationError),
    #[error("{0}")]
    Unavailable(String),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists(what) => Self::Exists(format!(
                "{what} already exists; delete it first or change the request"
            )),
            other => Self::Store(other),
        }
    }
}

impl From<IdError> for AdminError {
    fn from(e: IdError) -> Self {
        Self::Invalid(e.to_string())
    }
}

impl From<ListError> for AdminError {
    fn from(e: ListError) -> Self {
        match e {
            ListError::Invalid(m) => Self::Invalid(m),
        }
    }
}

impl AdminError {
    fn status(&self) -> Status {
        match self {
            Self::Invalid(m) => Status::invalid_argument(m.clone()),
            Self::Entry(e) => Status::invalid_argument(crate::wire::error_chain(e)),
            Self::NotFound(m) => Status::not_found(m.clone()),
            Self::Exists(m) => Status::already_exists(m.clone()),
            Self::Ca(RotationError::OutOfOrder(m)) => Status::failed_precondition(m.clone()),
            Self::Ca(e @ RotationError::NotFound(_)) => Status::not_found(e.to_string()),
            Self::Unavailable(m) => Status::unavailable(m.clone()),
            Self::Store(_) | Self::Audit(_) | Self::Ca(_) => {
                Status::unavailable(crate::wire::error_chain(self))
            }
        }
    }
}

/// The admin API service.
pub struct AdminService {
    state: Arc<ServerState>,
}

impl AdminService {
    /// The service over the server's state.
    pub(crate) fn new(state: Arc<ServerState>) -> Self {
        Self { state }
    }

    async fn audit_change(
        &self,
        action: AuditAction,
        reason: String,
        fill: impl FnOnce(&mut AuditEvent),
    ) -> Result<(), AdminError> {
        let mut event = AuditEvent {
            decision: Some(Decision::Allow),
            reason,
            agent_id: Some("operator".into()),
            ..AuditEvent::new(action)
        };
        fill(&mut event);
        self.state.audit.record(event).await?;
        Ok(())
    }

    async fn audit_refusal(&self, action: AuditAction, reason: String) -> Result<(), AdminError> {
        let event = AuditEvent {
            decision: Some(Decision::Deny),
            reason,
            agent_id: Some("operator".into()),
            ..AuditEvent::new(action)
        };
        self.state.audit.record(event).await?;
        Ok(())
    }

    fn entry_rules(&self) -> EntryRules<'_> {
        EntryRules {
            trust_domain: &self.state.td,
            policy: &self.state.policy,
            min_ttl: self.state.min_entry_ttl,
            max_ttl: self.state.max_entry_ttl,
        }
    }

    fn validate_entry(&self, req: &pb::CreateEntryRequest) -> Result<Entry, AdminError> {
        Ok(self.entry_rules().validate(req)?)
    }

    fn parse_entry_id(text: &str) -> Result<EntryId, AdminError> {
        EntryId::parse(text).ok_or_else(|| {
            AdminError::Invalid(format!(
                "'{}' is not an entry ID: entry IDs are 32 hexadecimal digits, as `mayfly entry list` shows",
                crate::text::escape_bounded(text, 80)
            ))
        })
    }
}

fn entry_message(e: Entry) -> pb::Entry {
    pb::Entry {
        node: crate::store::is_server_id(&e.parent_id),
        id: e.id.to_string(),
        spiffe_id: e.spiffe_id.to_string(),
        parent_id: e.parent_id.to_string(),
        selectors: e.selectors.iter().map(|s| s.to_string()).collect(),
        scopes: e.scopes.iter().map(|s| s.to_string()).collect(),
        ttl_seconds: e.ttl_secs,
        dns_names: e.dns_names,
        created_at: e.created_at,
        hint: e.hint,
        jwt_ttl_seconds: e.jwt_ttl_secs,
    }
}

fn agent_message(a: AgentRecord) -> pb::Agent {
    pb::Agent {
        spiffe_id: a.spiffe_id.to_string(),
        attestor: a.attestor,
        current_serial: a.current_serial.to_hex(),
        next_serial: a.next_serial.map(|s| s.to_hex()).unwrap_or_default(),
        not_after: a.not_after,
        banned: a.banned,
        created_at: a.created_at,
        node_selectors: a.node_selectors.iter().map(|s| s.to_string()).collect(),
    }
}

/// The wire form of an audit record.
pub fn audit_message(r: AuditRecord) -> pb::AuditRecord {
    let e = r.event;
    pb::AuditRecord {
        seq: r.seq,
        time_ms: e.time_ms,
        action: e.action.as_str().to_owned(),
        decision: e.decision.map(|d| d.to_string()).unwrap_or_default(),
        reason: e.reason,
        agent_id: e.agent_id.unwrap_or_default(),
        attestor: e.attestor.unwrap_or_default(),
        entry_id: e.entry_id.unwrap_or_default(),
        spiffe_id: e.spiffe_id.unwrap_or_default(),
        task_id: e.task_id.unwrap_or_default(),
        scopes: e.scopes,
        serial: e.serial.map(|s| s.to_hex()).unwrap_or_default(),
        not_after: e.not_after.unwrap_or_default(),
        prev_hash: hex::encode(r.prev_hash),
        hash: hex::encode(r.hash),
    }
}

type AuditStream = Pin<Box<dyn Stream<Item = Result<pb::AuditRecord, Status>> + Send>>;

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_entry(
        &self,
        request: Request<pb::CreateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let req = request.into_inner();
        let result: Result<Entry, AdminError> = async {
            let entry = self.validate_entry(&req)?;
            self.check_parent_exists(&entry).await?;
            self.state.store.create_entry(&entry).await?;
            // Held agent syncs answer at once (issue 10).
            self.state.entry_watch.refresh().await;
            self.audit_change(AuditAction::EntryCreate, "entry created".into(), |e| {
                e.entry_id = Some(entry.id.to_string());
                e.spiffe_id = Some(entry.spiffe_id.to_string());
                e.scopes = entry.scopes.iter().map(|s| s.to_string()).collect();
            })
            .await?;
            Ok(entry)
        }
        .await;
        result
            .map(|e| Response::new(entry_message(e)))
            .map_err(|e| e.status())
    }

    async fn list_entries(
        &self,
        request: Request<pb::ListEntriesRequest>,
    ) -> Result<Response<pb::ListEntriesResponse>, Status> {
        // One page, filtered by the store (see admin_lists).
        let result: Result<pb::ListEntriesResponse, AdminError> = async {
            let query = admin_lists::entry_query(request.get_ref())?;
            let entries = self.state.store.list_entries_page(&query).await?;
            let entries = entries.into_iter().map(entry_message).collect();
            Ok(admin_lists::entries_answer(entries, query.limit))
        }
        .await;
        result.map(Response::new).map_err(|e| e.status())
    }

    async fn get_entry(
        &self,
        request: Request<pb::EntryIdRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        let result: Result<Entry, AdminError> = async {
            let id = Self::parse_entry_id(&request.get_ref().id)?;
            self.state.store.get_entry(&id).await?.ok_or_else(|| {
                AdminError::NotFound(format!(
                    "no entry {id}; `mayfly entry list` shows the entries"
                ))
            })
        }
        .await;
        result
            .map(|e| Response::new(entry_message(e)))
            .map_err(|e| e.status())
    }

    async fn update_entry(
        &self,
        request: Request<pb::UpdateEntryRequest>,
    ) -> Result<Response<pb::Entry>, Status> {
        self.update(request.get_ref())
            .await
            .map(|e| Response::new(entry_message(e)))
            .map_err(|e| e.status())
    }

    async fn delete_entry(
        &self,
        request: Request<pb::EntryIdRequest>,
    ) -> Result<Response<pb::DeleteEntryResponse>, Status> {
        let result: Result<(), AdminError> = async {
            let id = Self::parse_entry_id(&request.get_ref().id)?;
            if !self.state.store.delete_entry(&id).await? {
                return Err(AdminError::NotFound(format!(
                    "no entry {id}; `mayfly entry list` shows the entries"
                )));
            }
            self.state.entry_watch.refresh().await;
            self.audit_change(AuditAction::EntryDelete, "entry deleted".into(), |e| {
                e.entry_id = Some(id.to_string());
            })
            .await
        }
        .await;
        result
            .map(|()| Response::new(pb::DeleteEntryResponse {}))
            .map_err(|e| e.status())
    }

    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let ttl_secs = request.get_ref().ttl_seconds;
        let result: Result<pb::CreateJoinTokenResponse, AdminError> = async {
            let ttl = match u64::from(ttl_secs) {
                0 => DEFAULT_TOKEN_TTL,
                t if t > MAX_TOKEN_TTL.as_secs() => {
                    return Err(AdminError::Invalid(format!(
                        "a join token TTL of {t}s is above the limit of 7 days; give a shorter --ttl"
                    )));
                }
                t => Duration::from_secs(t),
            };
            let token = join_token::generate()
                .map_err(|_| AdminError::Invalid("the system random source failed".into()))?;
            let agent_id = self
                .state
                .policy
                .agent_id(join_token::NAME, &token.node_id)
                .map_err(|e| AdminError::Invalid(e.to_string()))?;
            let expires_at = unix_secs(SystemTime::now() + ttl);
            self.state
                .store
                .create_join_token(&JoinTokenRecord {
                    secret_hash: token.secret_hash,
                    node_id: token.node_id.clone(),
                    expires_at,
                })
                .await?;
            self.audit_change(AuditAction::TokenCreate, "join token created".into(), |e| {
                e.spiffe_id = Some(agent_id.to_string());
                e.attestor = Some(join_token::NAME.into());
                e.not_after = Some(expires_at);
            })
            .await?;
            Ok(pb::CreateJoinTokenResponse {
                token: token.secret,
                agent_id: agent_id.to_string(),
                expires_at,
            })
        }
        .await;
        result.map(Response::new).map_err(|e| e.status())
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        // One page (see admin_lists).
        let result: Result<pb::ListAgentsResponse, AdminError> = async {
            let (after, limit) = admin_lists::agent_query(request.get_ref())?;
            let agents = self
                .state
                .store
                .list_agents_page(after.as_ref(), limit)
                .await?;
            let agents = agents.into_iter().map(agent_message).collect();
            Ok(admin_lists::agents_answer(agents, limit))
        }
        .await;
        result.map(Response::new).map_err(|e| e.status())
    }

    async fn get_agent(
        &self,
        request: Request<pb::AgentIdRequest>,
    ) -> Result<Response<pb::AgentDetail>, Status> {
        self.agent_detail(request.get_ref())
            .await
            .map(Response::new)
            .map_err(|e| e.status())
    }

    async fn ban_agent(
        &self,
        request: Request<pb::AgentIdRequest>,
    ) -> Result<Response<pb::Agent>, Status> {
        let result: Result<AgentRecord, AdminError> =
            async {
                let id = SpiffeId::parse(&request.get_ref().spiffe_id)?;
                if !self.state.store.ban_agent(&id).await? {
                    return Err(AdminError::NotFound(format!(
                        "no agent {id}; `mayfly agent list` shows the agents"
                    )));
                }
                self.audit_change(AuditAction::AgentBan, "agent banned".into(), |e| {
                    e.spiffe_id = Some(id.to_string());
                })
                .await?;
                self.state.store.get_agent(&id).await?.ok_or_else(|| {
                    AdminError::NotFound(format!("agent {id} was evicted meanwhile"))
                })
            }
            .await;
        result
            .map(|a| Response::new(agent_message(a)))
            .map_err(|e| e.status())
    }

    async fn evict_agent(
        &self,
        request: Request<pb::AgentIdRequest>,
    ) -> Result<Response<pb::EvictAgentResponse>, Status> {
        let result: Result<(), AdminError> = async {
            let id = SpiffeId::parse(&request.get_ref().spiffe_id)?;
            if !self.state.store.delete_agent(&id).await? {
                return Err(AdminError::NotFound(format!(
                    "no agent {id}; `mayfly agent list` shows the agents"
                )));
            }
            self.audit_change(
                AuditAction::AgentEvict,
                "agent evicted; it must attest again".into(),
                |e| {
                    e.spiffe_id = Some(id.to_string());
                },
            )
            .await
        }
        .await;
        result
            .map(|()| Response::new(pb::EvictAgentResponse {}))
            .map_err(|e| e.status())
    }

    async fn get_bundle(
        &self,
        _request: Request<pb::GetBundleRequest>,
    ) -> Result<Response<pb::GetBundleResponse>, Status> {
        let result: Result<pb::GetBundleResponse, AdminError> = async {
            let certificates = self.state.bundle_der();
            // Never an empty bundle silently: a verifier given one would trust nothing.
            if certificates.is_empty() {
                return Err(AdminError::Unavailable(
                    "the trust bundle is empty: no CA of this trust domain is valid now; check the server's log for CA rotation warnings".into(),
                ));
            }
            let sequence = self.state.store.bundle_sequence().await?;
            Ok(pb::GetBundleResponse {
                trust_domain: self.state.td.to_string(),
                certificates,
                sequence: u64::try_from(sequence).unwrap_or(0),
                refresh_hint_seconds: u32::try_from(self.state.refresh_hint.as_secs())
                    .unwrap_or(u32::MAX),
                jwt_keys: self.state.jwt_points(),
            })
        }
        .await;
        result.map(Response::new).map_err(|e| e.status())
    }

    async fn list_cas(
        &self,
        _request: Request<pb::ListCasRequest>,
    ) -> Result<Response<pb::ListCasResponse>, Status> {
        self.ca_list()
            .await
            .map(Response::new)
            .map_err(|e| e.status())
    }

    async fn prepare_ca(
        &self,
        _request: Request<pb::PrepareCaRequest>,
    ) -> Result<Response<pb::Ca>, Status> {
        self.ca_step(CaStep::Prepare, "")
            .await
            .map(Response::new)
            .map_err(|e| e.status())
    }

    async fn activate_ca(
        &self,
        _request: Request<pb::ActivateCaRequest>,
    ) -> Result<Response<pb::Ca>, Status> {
        self.ca_step(CaStep::Activate, "")
            .await
            .map(Response::new)
            .map_err(|e| e.status())
    }

    async fn taint_ca(
        &self,
        request: Request<pb::CaIdRequest>,
    ) -> Result<Response<pb::Ca>, Status> {
        self.ca_step(CaStep::Taint, &request.get_ref().id)
            .await
            .map(Response::new)
            .map_err(|e| e.status())
    }

    async fn revoke_ca(
        &self,
        request: Request<pb::CaIdRequest>,
    ) -> Result<Response<pb::Ca>, Status> {
        self.ca_step(CaStep::Revoke, &request.get_ref().id)
            .await
            .map(Response::new)
            .map_err(|e| e.status())
    }

    type ListAuditStream = AuditStream;

    async fn list_audit(
        &self,
        request: Request<pb::ListAuditRequest>,
    ) -> Result<Response<Self::ListAuditStream>, Status> {
        let req = request.into_inner();
        let store = self.state.store.clone();
        let task_id = (!req.task_id.is_empty()).then_some(req.task_id);
        let stream = async_stream::try_stream! {
            let mut after = req.after_seq;
            let mut left = if req.limit == 0 { u64::MAX } else { u64::from(req.limit) };
            loop {
                let filter = AuditFilter {
                    after_seq: after,
                    task_id: task_id.clone(),
                    limit: PAGE.min(left.min(u64::from(u32::MAX)) as u32),
                };
                let page = store
                    .list_audit(&filter)
                    .await
                    .map_err(|e| AdminError::from(e).status())?;
                let full = page.len() as u32 == filter.limit;
                for record in page {
                    after = record.seq;
                    left -= 1;
                    yield audit_message(record);
                }
                if left == 0 {
                    break;
                }
                if !full {
                    if !req.follow {
                        break;
                    }
                    tokio::time::sleep(FOLLOW_POLL).await;
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }

    async fn verify_audit(
        &self,
        _request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let store = &self.state.store;
        let result: Result<Result<i64, ChainError>, AdminError> = async {
            // The head is read first: records appended while the log is read only extend it.
            let (head_seq, _) = store.audit_head().await?;
            let mut verifier = ChainVerifier::new();
            let mut after = 0;
            let mut last_hash = [0u8; 32];
            loop {
                let page = store
                    .list_audit(&AuditFilter {
                        after_seq: after,
                        task_id: None,
                        limit: PAGE,
                    })
                    .await?;
                let done = (page.len() as u32) < PAGE;
                for record in page.iter().take_while(|r| r.seq <= head_seq) {
                    if let Err(e) = verifier.push(record) {
                        return Ok(Err(e));
                    }
                    last_hash = record.hash;
                }
                match page.last() {
                    Some(r) if !done && r.seq < head_seq => after = r.seq,
                    _ => break,
                }
            }
            // Compare with the head as it was when reading began, re-read so that a
            // concurrent append does not look like tampering.
            let (now_seq, now_hash) = store.audit_head().await?;
            let head_hash = if now_seq == head_seq {
                now_hash
            } else {
                last_hash
            };
            Ok(verifier.finish(head_seq, head_hash))
        }
        .await;
        match result {
            Ok(Ok(records)) => Ok(Response::new(pb::VerifyAuditResponse {
                ok: true,
                records,
                problem: String::new(),
            })),
            Ok(Err(problem)) => Ok(Response::new(pb::VerifyAuditResponse {
                ok: false,
                records: 0,
                problem: problem.to_string(),
            })),
            Err(e) => Err(e.status()),
        }
    }
}

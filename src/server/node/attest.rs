//! Node attestation: the unary `Attest` (join tokens, as older agents send them) and the
//! `AttestAgent` stream (every node attestor, with a challenge when the attestor asks one).
//!
//! Both run the same steps: the source address passes the attestation gate; the request's
//! sizes and CSR are checked; the attestor reads the evidence (and the answer to its
//! challenge, on the same stream, so the nonce never leaves this server); then the node is
//! admitted: a join token is consumed, a bearer token is remembered as used, a banned agent
//! stays banned, and the agent SVID is signed, stored and audited before it is returned.
//! Refusals from a source past its first few are counted by the gate, not written one by one.

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use mayfly_attestors::{AttestError, Begun, MAX_EVIDENCE, NodeAttestor, NodeClaim};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use super::{NodeError, NodeService, event, svid_message};
use crate::audit::{self, AuditAction, AuditEvent};
use crate::id::ScopedId;
use crate::proto::node::{self as pb, attest_agent_request, attest_agent_response};
use crate::server::attest_gate::Record;
use crate::server::conn::PeerInfo;
use crate::server::policy::Refusal;
use crate::store::AgentRecord;
use crate::svid::{self, IssuedSvid, RequestedKey};
use crate::wire::{RefusalKind, unix_secs};

/// How long the server waits for each message of an attestation stream.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The answers of an attestation stream.
pub(crate) type AttestStream =
    Pin<Box<dyn Stream<Item = Result<pb::AttestAgentResponse, Status>> + Send>>;

/// An admitted node: its agent SVID and what the attestor proved.
struct Admitted {
    id: ScopedId,
    issued: IssuedSvid,
    selectors: Vec<String>,
}

/// The address a request came from, for the attestation gate.
fn source_of<T>(request: &Request<T>) -> Option<IpAddr> {
    request
        .extensions()
        .get::<PeerInfo>()
        .and_then(|p| p.remote)
        .map(|a| a.ip())
}

impl From<AttestError> for NodeError {
    fn from(err: AttestError) -> Self {
        // The attestor's sentence names what was wrong; evidence read from the caller may be
        // quoted in it, so it is escaped like any untrusted text.
        let text = audit::untrusted(&err.to_string());
        match err {
            AttestError::Malformed { .. } => Refusal::Invalid(text).into(),
            AttestError::Refused { .. } | AttestError::Unavailable { .. } => {
                Refusal::EvidenceRefused(text).into()
            }
        }
    }
}

impl NodeService {
    /// The gate: a source that keeps failing is answered without its evidence being read.
    fn admit_source(&self, source: Option<IpAddr>) -> Result<(), Status> {
        match source {
            Some(ip) if !self.state.attest_gate.admit(ip, Instant::now()) => {
                let mut status = Status::resource_exhausted(format!(
                    "too many refused attestations from {ip}; wait a few seconds before trying again, and check the agent's attestation evidence"
                ));
                RefusalKind::RateLimited.attach(&mut status);
                Err(status)
            }
            _ => Ok(()),
        }
    }

    /// The status of a refused attestation: audited one by one for a source's first few
    /// refusals, counted into the gate's summary after that.
    async fn attest_refused(
        &self,
        source: Option<IpAddr>,
        event: AuditEvent,
        err: NodeError,
    ) -> Status {
        let counted = err.is_decision()
            && source.is_some_and(|ip| {
                self.state
                    .attest_gate
                    .refused(ip, &err.text(), Instant::now())
                    == Record::Counted
            });
        if counted {
            // Summarised with the source's other refusals (attest_gate::summarise).
            err.status()
        } else {
            self.refuse(event, err).await
        }
    }

    /// The attestor named by the request, with its sizes and CSR checked; the CSR is read
    /// before any evidence, so a bad request spends no token.
    fn check_params(
        &self,
        params: &pb::AttestRequest,
    ) -> Result<(Arc<dyn NodeAttestor>, RequestedKey), NodeError> {
        let attestors = &self.state.node_attestors;
        let attestor = attestors.get(&params.attestor).ok_or_else(|| {
            Refusal::Invalid(format!(
                "unknown node attestor '{}'; this server accepts: {}",
                audit::untrusted(&params.attestor),
                attestors.names()
            ))
        })?;
        if params.evidence.len() > MAX_EVIDENCE {
            return Err(Refusal::Invalid(format!(
                "the attestation evidence is {} bytes, over the limit of {MAX_EVIDENCE}",
                params.evidence.len()
            ))
            .into());
        }
        Self::check_csr_size(&params.csr)?;
        let key = svid::parse_csr(&params.csr).map_err(NodeError::Csr)?;
        Ok((attestor.clone(), key))
    }

    /// Admits the node `claim` describes: the agent's record is written, then its SVID is
    /// audited; only then is it returned.
    async fn admit_node(
        &self,
        attestor: &'static str,
        claim: NodeClaim,
        key: &RequestedKey,
        event: &mut AuditEvent,
    ) -> Result<Admitted, NodeError> {
        let now = SystemTime::now();
        // The agent ID first, once, so a refusal below is audited under it and nothing is
        // spent on a claim whose node ID is no SPIFFE ID path.
        let node_id = match &claim {
            NodeClaim::SingleUseSecret { node_id, .. } => node_id,
            NodeClaim::Proven(node) => &node.node_id,
        };
        if !mayfly_attestors::node::is_valid_node_id(node_id) {
            return Err(Refusal::EvidenceRefused(format!(
                "the {attestor} attestor named a node ID that is no SPIFFE ID path; report this"
            ))
            .into());
        }
        let agent_id = self.state.policy.agent_id(attestor, node_id)?;
        event.agent_id = Some(agent_id.to_string());
        // Then what the evidence spends: a join token is consumed, a bearer token is
        // remembered until it expires.
        let selectors = match claim {
            NodeClaim::SingleUseSecret { secret_hash, .. } => {
                if self
                    .state
                    .store
                    .consume_join_token(&secret_hash, unix_secs(now))
                    .await?
                    .is_none()
                {
                    return Err(Refusal::TokenRefused.into());
                }
                Vec::new()
            }
            NodeClaim::Proven(node) => {
                if let Some(once) = &node.single_use
                    && !self
                        .state
                        .store
                        .claim_single_use(&once.key, unix_secs(once.until), unix_secs(now))
                        .await?
                {
                    return Err(Refusal::EvidenceRefused(format!(
                        "this {attestor} evidence was already used to attest; present a fresh one"
                    ))
                    .into());
                }
                node.selectors
            }
        };
        let id = ScopedId::new(agent_id.clone(), Default::default()).map_err(Refusal::from)?;
        let issued = self.sign_key(&id, key, self.state.agent_ttl, &[])?;
        let record = AgentRecord {
            spiffe_id: agent_id.clone(),
            attestor: attestor.into(),
            current_serial: issued.serial,
            next_serial: None,
            not_after: unix_secs(issued.not_after),
            banned: false,
            created_at: unix_secs(now),
            node_selectors: selectors.clone(),
            resync_revision: 0,
        };
        // The agent is stored before the issuance is audited, so the log never shows an
        // agent SVID whose agent the server does not know. A node proven by its evidence may
        // attest again (after an eviction, or with its SVID expired); a banned one may not.
        if record.attestor == mayfly_attestors::join_token::NAME {
            self.state.store.create_agent(&record).await?;
        } else if !self.state.store.reattest_agent(&record).await? {
            return Err(Refusal::Banned(agent_id.to_string()).into());
        }
        self.audit_issued(&id, &issued, event.clone()).await?;
        Ok(Admitted {
            id,
            issued,
            selectors: selectors.iter().map(ToString::to_string).collect(),
        })
    }

    fn attest_answer(&self, admitted: Admitted) -> pb::AttestResponse {
        pb::AttestResponse {
            svid: Some(svid_message(&admitted.id, admitted.issued)),
            bundle: self.bundle(),
            node_selectors: admitted.selectors,
        }
    }

    /// The unary `Attest`: attestors that need no challenge (join tokens, as older agents
    /// send them).
    pub(super) async fn attest_unary(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::AttestResponse>, Status> {
        let source = source_of(&request);
        self.admit_source(source)?;
        let params = request.into_inner();
        let mut event = event(AuditAction::AgentAttest);
        // The attestor name is the caller's, unauthenticated: recorded escaped and bounded.
        event.attestor = Some(audit::untrusted(&params.attestor));
        let result = async {
            let (attestor, key) = self.check_params(&params)?;
            let claim = match attestor.begin(&params.evidence, SystemTime::now())? {
                Begun::Claim(claim) => claim,
                Begun::Challenge(_) => {
                    return Err(Refusal::Invalid(format!(
                        "the {} attestor answers a challenge: attest on the AttestAgent stream (agents of this version do)",
                        attestor.name()
                    ))
                    .into());
                }
            };
            self.admit_node(attestor.name(), claim, &key, &mut event).await
        }
        .await;
        match result {
            Ok(admitted) => Ok(Response::new(self.attest_answer(admitted))),
            Err(e) => Err(self.attest_refused(source, event, e).await),
        }
    }

    /// The `AttestAgent` stream.
    pub(super) async fn attest_stream(
        &self,
        request: Request<Streaming<pb::AttestAgentRequest>>,
    ) -> Result<Response<AttestStream>, Status> {
        let source = source_of(&request);
        self.admit_source(source)?;
        let mut inbound = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let service = self.clone();
        tokio::spawn(async move {
            let mut event = event(AuditAction::AgentAttest);
            let result = service.attest_on(&mut inbound, &tx, &mut event).await;
            let answer = match result {
                Ok(admitted) => Ok(pb::AttestAgentResponse {
                    step: Some(attest_agent_response::Step::Result(
                        service.attest_answer(admitted),
                    )),
                }),
                Err(e) => Err(service.attest_refused(source, event, e).await),
            };
            let _ = tx.send(answer).await;
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    /// One attestation on a stream: the parameters, the challenge if the attestor asks one,
    /// then the node's admission.
    async fn attest_on(
        &self,
        inbound: &mut Streaming<pb::AttestAgentRequest>,
        tx: &tokio::sync::mpsc::Sender<Result<pb::AttestAgentResponse, Status>>,
        event: &mut AuditEvent,
    ) -> Result<Admitted, NodeError> {
        let params = match next_step(inbound).await? {
            attest_agent_request::Step::Params(params) => params,
            attest_agent_request::Step::ChallengeResponse(_) => {
                return Err(Refusal::Invalid(
                    "an attestation starts with the attestor, its evidence and a CSR, not a challenge response".into(),
                )
                .into());
            }
        };
        event.attestor = Some(audit::untrusted(&params.attestor));
        let (attestor, key) = self.check_params(&params)?;
        let claim = match attestor.begin(&params.evidence, SystemTime::now())? {
            Begun::Claim(claim) => claim,
            Begun::Challenge(challenge) => {
                let message = pb::AttestAgentResponse {
                    step: Some(attest_agent_response::Step::Challenge(
                        challenge.challenge().to_vec(),
                    )),
                };
                if tx.send(Ok(message)).await.is_err() {
                    return Err(
                        Refusal::Invalid("the agent left before the challenge".into()).into(),
                    );
                }
                let response = match next_step(inbound).await? {
                    attest_agent_request::Step::ChallengeResponse(response) => response,
                    attest_agent_request::Step::Params(_) => {
                        return Err(Refusal::Invalid(
                            "the server asked a challenge; answer it with challenge_response"
                                .into(),
                        )
                        .into());
                    }
                };
                if response.len() > MAX_EVIDENCE {
                    return Err(Refusal::Invalid(format!(
                        "the challenge response is over {MAX_EVIDENCE} bytes"
                    ))
                    .into());
                }
                challenge.finish(&response, SystemTime::now())?
            }
        };
        self.admit_node(attestor.name(), claim, &key, event).await
    }
}

/// The next message of an attestation stream, within [`STEP_TIMEOUT`].
async fn next_step(
    inbound: &mut Streaming<pb::AttestAgentRequest>,
) -> Result<attest_agent_request::Step, NodeError> {
    let message = tokio::time::timeout(STEP_TIMEOUT, inbound.message())
        .await
        .map_err(|_| {
            Refusal::Invalid(
                "the agent did not send its next attestation message within 10 s".into(),
            )
        })?
        .map_err(|status| {
            Refusal::Invalid(format!(
                "the attestation stream failed: {}",
                audit::untrusted(status.message())
            ))
        })?;
    message.and_then(|m| m.step).ok_or_else(|| {
        Refusal::Invalid("the agent ended the attestation stream early".into()).into()
    })
}

//! Mayfly's task API (`mayfly.task.v1.Task`): a just-in-time SVID for one task, carrying
//! exactly the scopes asked for.
//!
//! The agent only decides which of the caller's entries the SVID is for, since only it knows
//! the caller's selectors; the task ID, the scopes and the TTL are the server's to judge and
//! audit, so they are passed on untouched and the server's refusal comes back unchanged.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::endpoint::{self, EndpointError, WorkloadPeer};
use super::link::ServerLink;
use super::state::{AgentEntry, Snapshot, SnapshotRx};
use super::workload_api::wait_ready;
use crate::attestors::Selector;
use crate::proto::node as node_pb;
use crate::proto::task as pb;
use crate::wire::REFUSAL_METADATA;

/// The `mayfly.task.v1.Task` service.
pub struct TaskApi {
    snapshot: SnapshotRx,
    link: Arc<ServerLink>,
    stop: watch::Receiver<bool>,
}

impl TaskApi {
    /// A service choosing entries from `snapshot` and minting over `link`; a call still waiting
    /// for the agent to be ready gives up once `stop` turns true.
    pub fn new(snapshot: SnapshotRx, link: Arc<ServerLink>, stop: watch::Receiver<bool>) -> Self {
        Self {
            snapshot,
            link,
            stop,
        }
    }
}

impl TaskApi {
    /// The caller, and its entry named `wanted` (see [`choose_entry`]), once the agent is
    /// ready: what every mint starts with.
    async fn caller_and_entry<T>(
        &self,
        request: &Request<T>,
        wanted: &str,
    ) -> Result<(WorkloadPeer, Arc<AgentEntry>), EndpointError> {
        let peer = endpoint::caller(request)?;
        let mut snapshot = self.snapshot.clone();
        let mut stop = self.stop.clone();
        let ready = wait_ready(&mut snapshot, &mut stop).await?;
        let entry = choose_entry(&ready, peer.selectors(), wanted)?;
        Ok((peer, entry))
    }
}

/// The caller's entry a task credential is for: the one with the SPIFFE ID `wanted` (empty:
/// the first-created entry matching `selectors`).
///
/// # Errors
/// [`EndpointError::BadSpiffeId`] for a malformed `wanted`, [`EndpointError::NotCallersEntry`]
/// when no matching entry has that ID, [`EndpointError::NoEntry`] when none matches at all.
fn choose_entry(
    snapshot: &Snapshot,
    selectors: &[Selector],
    wanted: &str,
) -> Result<Arc<AgentEntry>, EndpointError> {
    let mut entries = super::workload_jwt::entries_for(snapshot, selectors, wanted)?;
    // Never empty: entries_for refuses when nothing matches.
    Ok(entries.swap_remove(0))
}

/// The server's refusal as the workload gets it: the same code, message and refusal kind. The
/// rest of the status's metadata (the HTTP headers of the server's answer) is left behind, as it
/// describes that other response, not this one.
pub(super) fn relay(status: Status) -> Status {
    let mut relayed = Status::new(status.code(), status.message());
    if let Some(kind) = status.metadata().get(REFUSAL_METADATA) {
        relayed
            .metadata_mut()
            .insert(REFUSAL_METADATA, kind.clone());
    }
    relayed
}

#[tonic::async_trait]
impl pb::task_server::Task for TaskApi {
    async fn mint_x509svid(
        &self,
        request: Request<pb::MintX509svidRequest>,
    ) -> Result<Response<pb::MintX509svidResponse>, Status> {
        let (peer, entry) = self
            .caller_and_entry(&request, &request.get_ref().spiffe_id)
            .await?;
        let ask = request.into_inner();
        let minted = self
            .link
            .mint_task(&entry, &ask.task_id, &ask.scopes, ask.ttl_seconds)
            .await
            .map_err(relay)?;
        // The mint was a round trip to the server: the key goes only to a process still alive.
        peer.confirm()?;
        let not_after = minted
            .not_after
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        Ok(Response::new(pb::MintX509svidResponse {
            spiffe_id: minted.spiffe_id.as_str().to_owned(),
            x509_svid: minted.chain.concat(),
            x509_svid_key: minted.key_pkcs8,
            // The newest bundle: it may have changed during the round trip.
            bundle: self.snapshot.borrow().bundle_der(),
            serial: minted.serial.to_hex(),
            not_after,
        }))
    }

    async fn mint_jwtsvid(
        &self,
        request: Request<pb::MintJwtsvidRequest>,
    ) -> Result<Response<pb::MintJwtsvidResponse>, Status> {
        let (peer, entry) = self
            .caller_and_entry(&request, &request.get_ref().spiffe_id)
            .await?;
        let ask = request.into_inner();
        let minted = self
            .link
            .mint_task_jwt(
                &entry,
                node_pb::IssueTaskJwtRequest {
                    entry_id: String::new(),
                    audience: ask.audience,
                    task_id: ask.task_id,
                    scopes: ask.scopes,
                    ttl_seconds: ask.ttl_seconds,
                },
            )
            .await
            .map_err(relay)?;
        // A bearer token is a credential: it goes only to the process that asked, if alive.
        peer.confirm()?;
        Ok(Response::new(pb::MintJwtsvidResponse {
            spiffe_id: minted.spiffe_id,
            token: minted.token,
            expires_at: minted.expires_at,
            jti: minted.jti,
        }))
    }
}

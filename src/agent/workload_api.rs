//! The SPIFFE Workload API, served from the agent's [`Snapshot`].
//!
//! Both X.509 streams follow the same rule: every message carries the full current state, the
//! first is sent as soon as the agent is ready, a new one only when what the workload would be
//! sent differs from what it was last sent, and the stream ends with PermissionDenied once the
//! workload has no identity left. "Changes" include time: a stream also wakes at the earliest
//! notAfter among the SVIDs it serves, so an SVID that expires while the server is unreachable
//! is withdrawn on time rather than served stale.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use super::endpoint::{self, EndpointError, WorkloadPeer};
use super::jwt_cache::JwtCache;
use super::link::ServerLink;
use super::state::{Identity, Snapshot, SnapshotRx};
use super::workload_jwt;
use crate::attestors::Selector;
use crate::proto::workload as pb;

/// A server stream of the Workload API.
pub type UpdateStream<M> = Pin<Box<dyn Stream<Item = Result<M, Status>> + Send>>;

/// What one stream sends for a snapshot at a moment: the message, and when it must be computed
/// again even if the snapshot stays the same (the earliest notAfter it relies on).
pub(super) type Rendered<M> = Result<(M, Option<SystemTime>), EndpointError>;

/// The `SpiffeWorkloadAPI` service.
pub struct SpiffeWorkloadApi {
    snapshot: SnapshotRx,
    link: Arc<ServerLink>,
    jwt_cache: JwtCache,
    stop: watch::Receiver<bool>,
}

impl SpiffeWorkloadApi {
    /// A service answering from `snapshot`, asking the server over `link` for JWT-SVIDs; its
    /// streams end once `stop` turns true.
    pub fn new(snapshot: SnapshotRx, link: Arc<ServerLink>, stop: watch::Receiver<bool>) -> Self {
        Self {
            snapshot,
            link,
            jwt_cache: JwtCache::default(),
            stop,
        }
    }

    /// The caller, and a first rendering once the agent is ready; then the stream of updates.
    async fn open<M, T>(
        &self,
        request: &Request<T>,
        render: fn(&Snapshot, &[Selector], SystemTime) -> Rendered<M>,
    ) -> Result<Response<UpdateStream<M>>, Status>
    where
        M: PartialEq + Clone + Send + 'static,
    {
        let peer = endpoint::caller(request)?;
        let mut snapshot = self.snapshot.clone();
        let mut stop = self.stop.clone();
        let ready = wait_ready(&mut snapshot, &mut stop).await?;
        let first = render(&ready, peer.selectors(), SystemTime::now())?;
        Ok(Response::new(updates(peer, snapshot, stop, render, first)))
    }
}

/// The latest snapshot once it is ready: a workload that connects while the agent starts waits
/// instead of being told it has no identity.
///
/// # Errors
/// [`EndpointError::ShuttingDown`] when the agent stops first.
pub(crate) async fn wait_ready(
    snapshot: &mut SnapshotRx,
    stop: &mut watch::Receiver<bool>,
) -> Result<Arc<Snapshot>, EndpointError> {
    loop {
        let current = snapshot.borrow_and_update().clone();
        if current.ready {
            return Ok(current);
        }
        tokio::select! {
            changed = snapshot.changed() => changed.map_err(|_| EndpointError::ShuttingDown)?,
            _ = stop.wait_for(|stopped| *stopped) => return Err(EndpointError::ShuttingDown),
        }
    }
}

/// Sends `first`, then a new message whenever the rendering changes, until the client goes
/// away (tonic drops the stream), the workload has no identity left, its process is gone, or
/// the agent stops.
fn updates<M>(
    peer: WorkloadPeer,
    mut snapshot: SnapshotRx,
    mut stop: watch::Receiver<bool>,
    render: fn(&Snapshot, &[Selector], SystemTime) -> Rendered<M>,
    first: (M, Option<SystemTime>),
) -> UpdateStream<M>
where
    M: PartialEq + Clone + Send + 'static,
{
    Box::pin(async_stream::stream! {
        let (mut last, mut wake_at) = first;
        yield Ok(last.clone());
        loop {
            // `select!` is a macro, opaque to `stream!`: it only says whether to go on.
            let go_on = tokio::select! {
                changed = snapshot.changed() => changed.is_ok(),
                () = sleep_until(wake_at) => true,
                _ = stop.wait_for(|stopped| *stopped) => false,
            };
            if !go_on {
                yield Err(EndpointError::ShuttingDown.into());
                break;
            }
            let current = snapshot.borrow_and_update().clone();
            let rendered = peer
                .confirm()
                .and_then(|()| render(&current, peer.selectors(), SystemTime::now()));
            match rendered {
                Err(e) => {
                    yield Err(e.into());
                    break;
                }
                Ok((message, next)) => {
                    wake_at = next;
                    if message != last {
                        last = message;
                        yield Ok(last.clone());
                    }
                }
            }
        }
    })
}

/// Sleeps until the wall clock reaches `at` (forever for `None`). The margin makes sure the
/// instant is really past when the stream renders again, since an SVID is valid strictly
/// before its notAfter.
async fn sleep_until(at: Option<SystemTime>) {
    match at {
        None => std::future::pending().await,
        Some(at) => {
            let wait = at.duration_since(SystemTime::now()).unwrap_or_default();
            tokio::time::sleep(wait + Duration::from_millis(5)).await;
        }
    }
}

/// The workload's identities that have a valid SVID at `now`, or why it has none.
pub(super) fn served_identities(
    snapshot: &Snapshot,
    selectors: &[Selector],
    now: SystemTime,
) -> Result<Vec<Identity>, EndpointError> {
    let identities = snapshot.identities_for(selectors, now);
    if identities.is_empty() {
        return Err(EndpointError::NoEntry {
            selectors: selectors
                .iter()
                .map(Selector::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let (served, unserved): (Vec<_>, Vec<_>) =
        identities.into_iter().partition(|i| i.svid.is_some());
    if served.is_empty() {
        return Err(EndpointError::NoValidSvid {
            entries: unserved
                .iter()
                .map(|i| i.entry.spiffe_id.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    Ok(served)
}

/// The earliest notAfter among `identities`' SVIDs.
fn earliest_expiry(identities: &[Identity]) -> Option<SystemTime> {
    identities
        .iter()
        .filter_map(|i| i.svid.as_ref().map(|s| s.not_after))
        .min()
}

/// `FetchX509SVID`'s message: one X509SVID per matching entry with a valid SVID, in entry
/// order (first created first, so the first, the default SVID of SPIFFE clients, is the
/// workload's oldest entry and stays so when entries are added), each with its entry's hint.
fn render_svids(
    snapshot: &Snapshot,
    selectors: &[Selector],
    now: SystemTime,
) -> Rendered<pb::X509svidResponse> {
    let identities = served_identities(snapshot, selectors, now)?;
    let bundle = snapshot.bundle_der();
    let svids = identities
        .iter()
        .filter_map(|i| i.svid.as_ref().map(|svid| (svid, &i.entry.hint)))
        .map(|(svid, hint)| pb::X509svid {
            spiffe_id: svid.spiffe_id.as_str().to_owned(),
            x509_svid: svid.chain.concat(),
            x509_svid_key: svid.key_pkcs8.clone(),
            bundle: bundle.clone(),
            hint: hint.clone(),
        })
        .collect();
    let response = pb::X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    };
    Ok((response, earliest_expiry(&identities)))
}

/// `FetchX509Bundles`' message: the trust domain's CAs. Like SPIRE, it is given only to a
/// workload that has an identity, so it too wakes when the last SVID expires.
fn render_bundles(
    snapshot: &Snapshot,
    selectors: &[Selector],
    now: SystemTime,
) -> Rendered<pb::X509BundlesResponse> {
    let identities = served_identities(snapshot, selectors, now)?;
    let response = pb::X509BundlesResponse {
        crl: Vec::new(),
        bundles: HashMap::from([(
            snapshot.trust_domain.id().as_str().to_owned(),
            snapshot.bundle_der(),
        )]),
    };
    Ok((response, earliest_expiry(&identities)))
}

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for SpiffeWorkloadApi {
    type FetchX509SVIDStream = UpdateStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = UpdateStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = UpdateStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.open(&request, render_svids).await
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.open(&request, render_bundles).await
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let peer = endpoint::caller(&request)?;
        let mut snapshot = self.snapshot.clone();
        let mut stop = self.stop.clone();
        let ready = wait_ready(&mut snapshot, &mut stop).await?;
        let answer = workload_jwt::fetch_jwt_svids(
            &ready,
            &peer,
            &self.link,
            &self.jwt_cache,
            request.get_ref(),
        )
        .await?;
        Ok(Response::new(answer))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.open(&request, workload_jwt::render_jwt_bundles).await
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        // Any attested process may validate a token; it needs no identity of its own.
        endpoint::caller(&request)?;
        let mut snapshot = self.snapshot.clone();
        let mut stop = self.stop.clone();
        let ready = wait_ready(&mut snapshot, &mut stop).await?;
        Ok(Response::new(workload_jwt::validate(
            &ready,
            request.get_ref(),
        )?))
    }
}

//! The agent's authenticated connection to the server's node API, and the calls made over it.
//!
//! The node client is swapped as a whole when the agent renews or re-attests: the server keeps
//! an old agent SVID valid only until the new one is first used, so a new SVID means a new
//! connection, never a mix of the two.
//!
//! The agent may be given several servers sharing one database. Its connection reconnects to
//! the next server that answers when its server is lost ([`client::connect_node_any`]), and
//! issuance calls that fail with the server lost are made once more on another server
//! ([`ServerLink::call_with_failover`]). The agent keeps its identity across servers: its SVID
//! verifies on every one, since each server's bundle is the union of all their CAs.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::transport::Channel;

use super::keys::{KeyPool, POOL_SIZE};
use super::state::{AgentEntry, CachedSvid};
use crate::client::{self, ClientError, ConnectedTo};
use crate::id::SpiffeId;
use crate::mtls::SvidSource;
use crate::proto::node as pb;
use crate::proto::node::node_client::NodeClient;
use crate::server_set::ServerSet;
use crate::svid::Serial;
use crate::wire::RefusalKind;

/// A task SVID minted for a workload: the chain from the server and the key this agent made.
#[derive(Clone)]
pub struct MintedSvid {
    /// The scoped SPIFFE ID the server issued.
    pub spiffe_id: SpiffeId,
    /// DER certificates, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// PKCS#8 private key, generated here and never sent anywhere but to the workload.
    pub key_pkcs8: Vec<u8>,
    /// Leaf serial.
    pub serial: Serial,
    /// Leaf notAfter.
    pub not_after: SystemTime,
}

/// The node client in use, and which connection it is.
struct Current {
    node: NodeClient<Channel>,
    /// Counts the connections made, so concurrent callers that saw one connection fail move
    /// to another only once.
    generation: u64,
    /// The server the connection reached.
    on: ConnectedTo,
}

/// The node API as seen from an attested agent, over whichever of the servers answers.
pub struct ServerLink {
    servers: Arc<ServerSet>,
    server_id: SpiffeId,
    source: SvidSource,
    current: RwLock<Current>,
    /// Held while moving to another server.
    moving: tokio::sync::Mutex<()>,
    /// Keys for the SVIDs asked for, made ahead of time.
    keys: Arc<KeyPool>,
}

impl ServerLink {
    /// A link over `node`, an mTLS client presenting the agent SVID held by `source`, to the
    /// one server at `addr`.
    pub fn new(
        addr: std::net::SocketAddr,
        server_id: SpiffeId,
        source: SvidSource,
        node: NodeClient<Channel>,
    ) -> Self {
        let on = ConnectedTo::default();
        on.set(addr);
        Self::over(
            Arc::new(ServerSet::single(addr)),
            server_id,
            source,
            node,
            on,
        )
    }

    /// A link over `node` (connected to the server `on` names), an mTLS client presenting the
    /// agent SVID held by `source`, that moves to another of `servers` when that one is lost.
    pub fn over(
        servers: Arc<ServerSet>,
        server_id: SpiffeId,
        source: SvidSource,
        node: NodeClient<Channel>,
        on: ConnectedTo,
    ) -> Self {
        Self {
            servers,
            server_id,
            source,
            current: RwLock::new(Current {
                node,
                generation: 0,
                on,
            }),
            moving: tokio::sync::Mutex::new(()),
            keys: KeyPool::start(POOL_SIZE),
        }
    }

    /// The node client for one call (cheap: clients share one HTTP/2 connection). When its
    /// server is lost, the connection is made again to the next server that answers at the
    /// next call.
    pub fn client(&self) -> NodeClient<Channel> {
        self.read().node.clone()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The agent SVID presented to the server and the bundles the server is verified against;
    /// renewed in place ([`SvidSource::set_svid`], [`SvidSource::set_bundles`]).
    pub fn source(&self) -> &SvidSource {
        &self.source
    }

    /// The servers this link may use.
    pub fn servers(&self) -> &Arc<ServerSet> {
        &self.servers
    }

    /// Opens a new connection presenting the current agent SVID and uses it from now on.
    ///
    /// # Errors
    /// [`ClientError`] when no server can be reached; the old connection stays.
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        let _moving = self.moving.lock().await;
        self.connect_anew().await
    }

    async fn connect_anew(&self) -> Result<(), ClientError> {
        let (node, on) =
            client::connect_node_servers(&self.servers, &self.source, &self.server_id).await?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        current.generation += 1;
        current.node = node;
        current.on = on;
        Ok(())
    }

    /// Leaves the server of connection `generation` for another one: it goes into backoff and
    /// a new connection is made to the next server that answers. A caller that finds the move
    /// already made by another (a newer generation) just uses the new connection.
    async fn move_on_from(&self, generation: u64) {
        let _moving = self.moving.lock().await;
        let lost = {
            let current = self.read();
            if current.generation != generation {
                return;
            }
            current.on.get()
        };
        if let Some(addr) = lost {
            self.servers.failed(addr, std::time::Instant::now());
        }
        if let Err(e) = self.connect_anew().await {
            tracing::warn!(error = %crate::wire::error_chain(&e), "no other server answered; the next call tries again");
        } else {
            let now_on = self.read().on.get();
            tracing::info!(
                from = %lost.map(|a| a.to_string()).unwrap_or_default(),
                to = %now_on.map(|a| a.to_string()).unwrap_or_default(),
                "moved to another server"
            );
        }
    }

    /// Makes `call` over the current connection and, when it fails because the server was
    /// lost or could not serve (see [`is_server_lost`]), once more over a connection to another
    /// server. Each attempt is a whole new request (`call` is given the attempt's client), so a
    /// retried issuance is a fresh authorization, audited by the server that grants it.
    ///
    /// # Errors
    /// The last attempt's status.
    pub async fn call_with_failover<T, F, Fut>(
        &self,
        what: &str,
        call: F,
    ) -> Result<T, tonic::Status>
    where
        F: Fn(NodeClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let (node, generation, on) = {
            let current = self.read();
            (current.node.clone(), current.generation, current.on.get())
        };
        match call(node).await {
            Err(status) if is_server_lost(&status) => {
                tracing::warn!(
                    server = %on.map(|a| a.to_string()).unwrap_or_default(),
                    reason = status.message(),
                    "{what} failed with the server lost or unable to serve; trying once more on another server"
                );
                self.move_on_from(generation).await;
                call(self.client()).await
            }
            other => other,
        }
    }

    /// Asks for a fresh identity SVID for `entry`, with a key generated here; retried once on
    /// another server when the first is lost.
    ///
    /// # Errors
    /// The server's status, or `Internal` when the key cannot be made or the answer is
    /// malformed.
    pub async fn issue_identity(&self, entry: &AgentEntry) -> Result<CachedSvid, tonic::Status> {
        let minted = self
            .call_with_failover("an identity SVID", |mut node| {
                let keys = self.keys.clone();
                let entry_id = entry.id.clone();
                async move {
                    let key = keys.take().map_err(internal)?;
                    let answer = node
                        .issue_identity(pb::IssueIdentityRequest {
                            entry_id,
                            csr: key.csr,
                        })
                        .await?
                        .into_inner();
                    from_answer(answer, key.key_pkcs8)
                }
            })
            .await?;
        Ok(CachedSvid {
            spiffe_id: minted.spiffe_id,
            chain: minted.chain,
            key_pkcs8: minted.key_pkcs8,
            serial: minted.serial,
            issued_at: SystemTime::now(),
            not_after: minted.not_after,
        })
    }

    /// Asks for a task SVID for `entry` carrying exactly `scopes` (human form), for `task_id`,
    /// living `ttl_seconds` (0: the server's default). The server validates every argument and
    /// audits the decision, so nothing is pre-judged here. A mint that fails because its server
    /// was lost is asked once more of another server, with a new key.
    ///
    /// # Errors
    /// The server's status and reason, passed through; `Internal` when the key cannot be made
    /// or the answer is malformed.
    pub async fn mint_task(
        &self,
        entry: &AgentEntry,
        task_id: &str,
        scopes: &[String],
        ttl_seconds: u32,
    ) -> Result<MintedSvid, tonic::Status> {
        self.call_with_failover("a task mint", |mut node| {
            let keys = self.keys.clone();
            let request = pb::IssueTaskRequest {
                entry_id: entry.id.clone(),
                csr: Vec::new(),
                task_id: task_id.to_owned(),
                scopes: scopes.to_vec(),
                ttl_seconds,
            };
            async move {
                let key = keys.take().map_err(internal)?;
                let answer = node
                    .issue_task(pb::IssueTaskRequest {
                        csr: key.csr,
                        ..request
                    })
                    .await?
                    .into_inner();
                from_answer(answer, key.key_pkcs8)
            }
        })
        .await
    }
}

impl ServerLink {
    /// Asks for an identity JWT-SVID for `entry` and `audience`; retried once on another
    /// server when the first is lost.
    ///
    /// # Errors
    /// The server's status, passed through.
    pub async fn issue_identity_jwt(
        &self,
        entry: &AgentEntry,
        audience: &str,
    ) -> Result<pb::IssueJwtResponse, tonic::Status> {
        let request = pb::IssueIdentityJwtRequest {
            entry_id: entry.id.clone(),
            audience: audience.to_owned(),
        };
        self.call_with_failover("an identity JWT-SVID", |mut node| {
            let request = request.clone();
            async move { Ok(node.issue_identity_jwt(request).await?.into_inner()) }
        })
        .await
    }

    /// Asks for a task JWT-SVID for `entry`; the server judges and audits every argument.
    ///
    /// # Errors
    /// The server's status, passed through.
    pub async fn mint_task_jwt(
        &self,
        entry: &AgentEntry,
        request: pb::IssueTaskJwtRequest,
    ) -> Result<pb::IssueJwtResponse, tonic::Status> {
        let request = pb::IssueTaskJwtRequest {
            entry_id: entry.id.clone(),
            ..request
        };
        self.call_with_failover("a task JWT-SVID", |mut node| {
            let request = request.clone();
            async move { Ok(node.issue_task_jwt(request).await?.into_inner()) }
        })
        .await
    }
}

/// Whether `status` says the server was lost or could not serve, rather than deciding: no
/// answer at all (the connection failed or broke: `Unavailable`, `Unknown`, `Internal`,
/// `Cancelled`, `Aborted`, `DeadlineExceeded` from the transport), or the server's own
/// `Unavailable` (its store or audit log failed). A refusal, which always names its kind, is a
/// decision another server would make the same way, so it is never retried.
pub fn is_server_lost(status: &tonic::Status) -> bool {
    use tonic::Code;
    RefusalKind::of(status).is_none()
        && matches!(
            status.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::Internal
                | Code::Cancelled
                | Code::Aborted
                | Code::DeadlineExceeded
        )
}

fn internal(e: impl std::fmt::Display) -> tonic::Status {
    tonic::Status::internal(format!("the agent could not make a key: {e}"))
}

fn from_answer(answer: pb::IssueResponse, key_pkcs8: Vec<u8>) -> Result<MintedSvid, tonic::Status> {
    let bad = |what: &str| tonic::Status::internal(format!("the server's answer {what}"));
    let svid = answer.svid.ok_or_else(|| bad("had no SVID"))?;
    let spiffe_id =
        SpiffeId::parse(&svid.spiffe_id).map_err(|_| bad("had a malformed SPIFFE ID"))?;
    if svid.cert_chain.is_empty() {
        return Err(bad("had an empty certificate chain"));
    }
    let not_after = u64::try_from(svid.not_after).map_err(|_| bad("had a negative notAfter"))?;
    Ok(MintedSvid {
        spiffe_id,
        chain: svid.cert_chain,
        key_pkcs8,
        serial: Serial::from_hex(&svid.serial).ok_or_else(|| bad("had a malformed serial"))?,
        not_after: UNIX_EPOCH + Duration::from_secs(not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    /// A lost connection or a server that could not serve is retried elsewhere; a decision
    /// (every refusal names its kind) or a malformed request is not, whatever its code.
    #[test]
    fn only_a_lost_or_failing_server_is_retried() {
        for code in [
            Code::Unavailable,
            Code::Unknown,
            Code::Internal,
            Code::Cancelled,
            Code::Aborted,
            Code::DeadlineExceeded,
        ] {
            assert!(
                is_server_lost(&Status::new(code, "transport error")),
                "{code:?}"
            );
        }
        for code in [
            Code::PermissionDenied,
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::NotFound,
            Code::ResourceExhausted,
        ] {
            assert!(!is_server_lost(&Status::new(code, "no")), "{code:?}");
        }
        let mut refused = Status::unavailable("refused, yet with a retryable code");
        RefusalKind::Banned.attach(&mut refused);
        assert!(!is_server_lost(&refused));
    }
}

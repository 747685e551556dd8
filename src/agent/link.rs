//! The agent's authenticated connection to the server's node API, and the calls made over it.
//!
//! The node client is swapped as a whole when the agent renews or re-attests: the server keeps
//! an old agent SVID valid only until the new one is first used, so a new SVID means a new
//! connection, never a mix of the two.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::transport::Channel;

use super::keys::{KeyPool, POOL_SIZE};
use super::state::{AgentEntry, CachedSvid};
use crate::client::{self, ClientError};
use crate::id::SpiffeId;
use crate::mtls::SvidSource;
use crate::proto::node as pb;
use crate::proto::node::node_client::NodeClient;
use crate::svid::Serial;

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

/// The node API as seen from an attested agent.
pub struct ServerLink {
    addr: SocketAddr,
    server_id: SpiffeId,
    source: SvidSource,
    node: RwLock<NodeClient<Channel>>,
    /// Keys for the SVIDs asked for, made ahead of time.
    keys: Arc<KeyPool>,
}

impl ServerLink {
    /// A link over `node`, an mTLS client presenting the agent SVID held by `source`.
    pub fn new(
        addr: SocketAddr,
        server_id: SpiffeId,
        source: SvidSource,
        node: NodeClient<Channel>,
    ) -> Self {
        Self {
            addr,
            server_id,
            source,
            node: RwLock::new(node),
            keys: KeyPool::start(POOL_SIZE),
        }
    }

    /// The node client for one call (cheap: clients share one HTTP/2 connection).
    pub fn client(&self) -> NodeClient<Channel> {
        self.node.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The agent SVID presented to the server and the bundles the server is verified against;
    /// renewed in place ([`SvidSource::set_svid`], [`SvidSource::set_bundles`]).
    pub fn source(&self) -> &SvidSource {
        &self.source
    }

    /// Opens a new connection presenting the current agent SVID and uses it from now on.
    ///
    /// # Errors
    /// [`ClientError`] when the server cannot be reached; the old connection stays.
    pub async fn reconnect(&self) -> Result<(), ClientError> {
        let node = client::connect_node(self.addr, &self.source, &self.server_id).await?;
        *self.node.write().unwrap_or_else(|e| e.into_inner()) = node;
        Ok(())
    }

    /// Asks for a fresh identity SVID for `entry`, with a key generated here.
    ///
    /// # Errors
    /// The server's status, or `Internal` when the key cannot be made or the answer is
    /// malformed.
    pub async fn issue_identity(&self, entry: &AgentEntry) -> Result<CachedSvid, tonic::Status> {
        let key = self.keys.take().map_err(internal)?;
        let answer = self
            .client()
            .issue_identity(pb::IssueIdentityRequest {
                entry_id: entry.id.clone(),
                csr: key.csr,
            })
            .await?
            .into_inner();
        let minted = from_answer(answer, key.key_pkcs8)?;
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
    /// audits the decision, so nothing is pre-judged here.
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
        let key = self.keys.take().map_err(internal)?;
        let answer = self
            .client()
            .issue_task(pb::IssueTaskRequest {
                entry_id: entry.id.clone(),
                csr: key.csr,
                task_id: task_id.to_owned(),
                scopes: scopes.to_vec(),
                ttl_seconds,
            })
            .await?
            .into_inner();
        from_answer(answer, key.key_pkcs8)
    }
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

//! The `k8s_psat` node attestor (issue 12): an agent running in a Kubernetes pod presents its
//! projected service account token, and the server verifies it offline against the cluster's
//! JWKS.
//!
//! The evidence is JSON, `{"cluster": NAME, "token": JWT}`. The server trusts a list of
//! clusters ([`PsatCluster`]), each with an issuer, an audience, an allow-list of
//! `namespace:serviceaccount` and a key set it replaces at run time ([`K8sPsatAttestor::set_jwks`],
//! called by the server's JWKS refresher). A token is accepted when it is RS256 or ES256, its
//! `kid` names a key of that cluster, its signature verifies, `iss` is the cluster's issuer,
//! `aud` holds the audience, `exp` is ahead and `nbf`/`iat` are not ahead (30 s of skew), it is
//! bound to a pod and a node, and its service account is allowed. The node ID is
//! `<cluster>/<node uid>`; a token attests once, until it expires ([`SingleUse`]).

mod agent;
mod error;
mod jwks;
mod token;

use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub use agent::K8sPsatEvidence;
pub use error::K8sPsatError;
pub use jwks::{Alg, KeySet, MAX_JWKS};

use error::shown;

use crate::node::{
    AttestError, Begun, MAX_EVIDENCE, NodeAttestor, NodeClaim, ProvenNode, SingleUse,
    is_valid_node_id,
};
use crate::selector::Selector;

/// The attestor's name.
pub const NAME: &str = "k8s_psat";
/// How far `nbf` and `iat` may be ahead of the server's clock.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// A cluster the server trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsatCluster {
    /// Its name: the agent's evidence names it, and it starts the node ID.
    pub name: String,
    /// The issuer its tokens carry (`iss`).
    pub issuer: String,
    /// The audience a token must hold (`aud`).
    pub audience: String,
    /// The service accounts allowed to attest, `namespace:name`.
    pub allowed_service_accounts: Vec<String>,
}

impl PsatCluster {
    fn check(&self) -> Result<(), K8sPsatError> {
        let bad = |what: String| K8sPsatError::BadCluster(what);
        if self.name.contains('/') || !is_valid_node_id(&self.name) {
            return Err(bad(format!(
                "the name {} must be letters, digits, '.', '_' or '-'",
                shown(&self.name)
            )));
        }
        if self.issuer.is_empty() || self.audience.is_empty() {
            return Err(bad(format!(
                "cluster {} needs an issuer and an audience",
                self.name
            )));
        }
        if self.allowed_service_accounts.is_empty() {
            return Err(bad(format!(
                "cluster {} allows no service account; list at least one namespace:name",
                self.name
            )));
        }
        for account in &self.allowed_service_accounts {
            let parts: Vec<&str> = account.split(':').collect();
            if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
                return Err(bad(format!(
                    "the allowed service account {} of cluster {} is not namespace:name",
                    shown(account),
                    self.name
                )));
            }
        }
        Ok(())
    }
}

/// Called with a cluster's name when a token names a key its JWKS lacks, so that the refresher
/// can fetch the JWKS again at once (the cluster may have rotated its keys).
pub type UnknownKidHook = Arc<dyn Fn(&str) + Send + Sync>;

struct Cluster {
    config: PsatCluster,
    /// Swapped whole by `set_jwks`; readers clone the `Arc` and never hold the lock while they
    /// verify, so a refresh never waits for attestations in flight, nor they for it.
    keys: RwLock<Arc<KeySet>>,
}

/// The server side: the trusted clusters and their current keys.
pub struct K8sPsatAttestor {
    clusters: Vec<Cluster>,
    on_unknown_kid: RwLock<Option<UnknownKidHook>>,
}

impl std::fmt::Debug for K8sPsatAttestor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sPsatAttestor")
            .field(
                "clusters",
                &self
                    .clusters
                    .iter()
                    .map(|c| &c.config.name)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// The evidence an agent sends.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Evidence {
    /// The cluster's name.
    pub(crate) cluster: String,
    /// The projected token.
    pub(crate) token: String,
}

impl K8sPsatAttestor {
    /// An attestor trusting `clusters`, each with no key until [`Self::set_jwks`] gives it some.
    ///
    /// # Errors
    /// [`K8sPsatError::BadCluster`] when there is no cluster, a name is not a path-safe word or
    /// repeats, an issuer or audience is empty, or an allow-list entry is not `namespace:name`.
    pub fn new(clusters: Vec<PsatCluster>) -> Result<Self, K8sPsatError> {
        if clusters.is_empty() {
            return Err(K8sPsatError::BadCluster(
                "no cluster is configured; add at least one".into(),
            ));
        }
        let mut names = std::collections::HashSet::new();
        for cluster in &clusters {
            cluster.check()?;
            if !names.insert(cluster.name.as_str()) {
                return Err(K8sPsatError::BadCluster(format!(
                    "the cluster name {} is used twice",
                    cluster.name
                )));
            }
        }
        Ok(Self {
            clusters: clusters
                .into_iter()
                .map(|config| Cluster {
                    config,
                    keys: RwLock::new(Arc::new(KeySet::default())),
                })
                .collect(),
            on_unknown_kid: RwLock::new(None),
        })
    }

    /// The clusters trusted, as configured.
    pub fn clusters(&self) -> impl Iterator<Item = &PsatCluster> {
        self.clusters.iter().map(|c| &c.config)
    }

    /// Replaces the keys of `cluster` with those of the JWKS document `jwks_json`; returns how
    /// many keys it holds.
    ///
    /// # Errors
    /// [`K8sPsatError::UnknownCluster`]; [`K8sPsatError::BadJwks`] when the document is not
    /// usable, in which case the keys held before stay.
    pub fn set_jwks(&self, cluster: &str, jwks_json: &[u8]) -> Result<usize, K8sPsatError> {
        let slot = self.cluster(cluster)?;
        let keys = KeySet::parse(jwks_json)?;
        let count = keys.len();
        *slot.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
        Ok(count)
    }

    /// Whether `cluster` currently holds a key named `kid` (for the refresher's logs and
    /// tests).
    pub fn has_key(&self, cluster: &str, kid: &str) -> bool {
        self.cluster(cluster).is_ok_and(|c| {
            c.keys
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(kid)
        })
    }

    /// Sets the function told of tokens naming a key their cluster's JWKS lacks.
    pub fn on_unknown_kid(&self, hook: UnknownKidHook) {
        *self
            .on_unknown_kid
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    fn cluster(&self, name: &str) -> Result<&Cluster, K8sPsatError> {
        self.clusters
            .iter()
            .find(|c| c.config.name == name)
            .ok_or_else(|| K8sPsatError::UnknownCluster(shown(name)))
    }

    /// Verifies `evidence` at `now` and returns the node it proves.
    ///
    /// # Errors
    /// The [`K8sPsatError`] of the first check that fails, in the order of the module's
    /// description.
    pub fn verify(&self, evidence: &[u8], now: SystemTime) -> Result<ProvenNode, K8sPsatError> {
        if evidence.len() > MAX_EVIDENCE {
            return Err(K8sPsatError::Malformed(format!(
                "the evidence is {} bytes, over the 64 KiB limit",
                evidence.len()
            )));
        }
        let evidence: Evidence = serde_json::from_slice(evidence).map_err(|_| {
            K8sPsatError::Malformed(
                "the evidence is not a JSON object {\"cluster\": NAME, \"token\": JWT}".into(),
            )
        })?;
        let cluster = self.cluster(&evidence.cluster)?;
        let config = &cluster.config;
        let unverified = token::split(&evidence.token)?;
        let keys = Arc::clone(&cluster.keys.read().unwrap_or_else(PoisonError::into_inner));
        if !keys.contains(&unverified.header.kid) {
            let hook = self
                .on_unknown_kid
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(hook) = hook {
                hook(&config.name);
            }
            return Err(K8sPsatError::UnknownKid {
                kid: shown(&unverified.header.kid),
                cluster: config.name.clone(),
            });
        }
        let claims = unverified.verify(&keys)?;
        let expires = check_claims(config, &claims, now)?;
        let node = bound_node(config, claims.kubernetes.as_ref())?;
        let mut proven = ProvenNode::new(node.node_id, node.selectors);
        let jti = claims.jti.as_deref().unwrap_or(&evidence.token);
        proven.single_use = Some(SingleUse {
            key: single_use_key(&config.name, jti),
            until: expires,
        });
        Ok(proven)
    }
}

/// The key under which a token is remembered: its `jti` (or the whole token), with the
/// attestor's name and the cluster so that two clusters' IDs never collide.
fn single_use_key(cluster: &str, jti: &str) -> [u8; 32] {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in [NAME, cluster, jti] {
        context.update(part.as_bytes());
        context.update(b"\0");
    }
    let mut key = [0u8; 32];
    key.copy_from_slice(context.finish().as_ref());
    key
}

/// Checks `iss`, `aud`, `exp`, `nbf` and `iat`; returns the expiry.
fn check_claims(
    config: &PsatCluster,
    claims: &token::Claims,
    now: SystemTime,
) -> Result<SystemTime, K8sPsatError> {
    let iss = claims
        .iss
        .as_deref()
        .ok_or(K8sPsatError::MissingClaim("iss"))?;
    if iss != config.issuer {
        return Err(K8sPsatError::WrongIssuer {
            got: shown(iss),
            cluster: config.name.clone(),
        });
    }
    if !claims
        .aud
        .as_ref()
        .is_some_and(|aud| aud.contains(&config.audience))
    {
        return Err(K8sPsatError::WrongAudience(config.audience.clone()));
    }
    let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let exp = claims.exp.ok_or(K8sPsatError::MissingClaim("exp"))?;
    if exp <= now_secs {
        return Err(K8sPsatError::Expired(now_secs - exp));
    }
    for (claim, value) in [("nbf", claims.nbf), ("iat", claims.iat)] {
        if let Some(at) = value
            && at > now_secs.saturating_add(CLOCK_SKEW.as_secs())
        {
            return Err(K8sPsatError::NotYetValid {
                claim,
                ahead: at - now_secs,
            });
        }
    }
    Ok(UNIX_EPOCH + Duration::from_secs(exp))
}

/// The node a token is bound to, with its selectors, once the service account is allowed.
fn bound_node(
    config: &PsatCluster,
    binding: Option<&token::Binding>,
) -> Result<ProvenNode, K8sPsatError> {
    let binding = binding.ok_or(K8sPsatError::MissingClaim("kubernetes.io"))?;
    let named = |n: Option<&token::Named>, name: &'static str, uid: &'static str| {
        let n = n.ok_or(K8sPsatError::MissingClaim(name))?;
        let get = |v: &Option<String>, claim| {
            v.clone()
                .filter(|v| !v.is_empty())
                .ok_or(K8sPsatError::MissingClaim(claim))
        };
        Ok::<_, K8sPsatError>((get(&n.name, name)?, get(&n.uid, uid)))
    };
    let namespace = binding
        .namespace
        .clone()
        .filter(|v| !v.is_empty())
        .ok_or(K8sPsatError::MissingClaim("kubernetes.io.namespace"))?;
    let (sa, _) = named(
        binding.serviceaccount.as_ref(),
        "kubernetes.io.serviceaccount.name",
        "kubernetes.io.serviceaccount.uid",
    )?;
    let (pod_name, pod_uid) = named(
        binding.pod.as_ref(),
        "kubernetes.io.pod.name",
        "kubernetes.io.pod.uid",
    )?;
    let (node_name, node_uid) = named(
        binding.node.as_ref(),
        "kubernetes.io.node.name",
        "kubernetes.io.node.uid",
    )?;
    let (pod_uid, node_uid) = (pod_uid?, node_uid?);
    let account = format!("{namespace}:{sa}");
    if !config.allowed_service_accounts.contains(&account) {
        return Err(K8sPsatError::NotAllowed(
            shown(&account),
            config.name.clone(),
        ));
    }
    let node_id = format!("{}/{node_uid}", config.name);
    if node_uid.contains('/') || !is_valid_node_id(&node_id) {
        return Err(K8sPsatError::BadValue {
            claim: "kubernetes.io.node.uid",
            value: shown(&node_uid),
        });
    }
    let mut selectors = Vec::with_capacity(7);
    for (kind, claim, value) in [
        ("cluster", "cluster", config.name.as_str()),
        ("agent_ns", "kubernetes.io.namespace", namespace.as_str()),
        ("agent_sa", "kubernetes.io.serviceaccount.name", sa.as_str()),
        (
            "agent_pod_name",
            "kubernetes.io.pod.name",
            pod_name.as_str(),
        ),
        ("agent_pod_uid", "kubernetes.io.pod.uid", pod_uid.as_str()),
        (
            "agent_node_name",
            "kubernetes.io.node.name",
            node_name.as_str(),
        ),
        (
            "agent_node_uid",
            "kubernetes.io.node.uid",
            node_uid.as_str(),
        ),
    ] {
        selectors.push(
            Selector::node(NAME, kind, value).map_err(|_| K8sPsatError::BadValue {
                claim,
                value: shown(value),
            })?,
        );
    }
    Ok(ProvenNode::new(node_id, selectors))
}

impl NodeAttestor for K8sPsatAttestor {
    fn name(&self) -> &'static str {
        NAME
    }

    fn begin(&self, evidence: &[u8], now: SystemTime) -> Result<Begun, AttestError> {
        self.verify(evidence, now)
            .map(|node| Begun::Claim(NodeClaim::Proven(node)))
            .map_err(K8sPsatError::into_attest)
    }
}

#[cfg(test)]
mod tests;

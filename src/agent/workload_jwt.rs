//! The JWT half of the SPIFFE Workload API (issue 11): `FetchJWTSVID`, `FetchJWTBundles` and
//! `ValidateJWTSVID`, and the task API's `MintJWTSVID`.
//!
//! Identity tokens are signed by the server (it holds the keys) and cached here until half
//! their life ([`super::jwt_cache`]). Bundles and validation use the JWT keys the agent syncs
//! with the X.509 bundle, so validation needs no round trip.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tonic::Status;

use super::endpoint::{EndpointError, WorkloadPeer};
use super::jwt_cache::{CachedJwt, JwtCache};
use super::link::ServerLink;
use super::state::{AgentEntry, Snapshot};
use super::workload_api::{Rendered, served_identities};
use crate::attestors::Selector;
use crate::id::SpiffeId;
use crate::jwt::{self, JwtBundles};
use crate::proto::workload as pb;

/// The one audience a `FetchJWTSVID` request names.
///
/// # Errors
/// [`EndpointError::NoAudience`] or [`EndpointError::SeveralAudiences`].
pub(super) fn one_audience(audience: &[String]) -> Result<&str, EndpointError> {
    match audience {
        [] => Err(EndpointError::NoAudience),
        [one] if one.is_empty() => Err(EndpointError::NoAudience),
        [one] => Ok(one),
        many => Err(EndpointError::SeveralAudiences(many.len())),
    }
}

/// The caller's entries a `FetchJWTSVID` answers for: every matching one, in entry order, or
/// the one with the SPIFFE ID `wanted`.
///
/// # Errors
/// [`EndpointError::NoEntry`], [`EndpointError::BadSpiffeId`] or
/// [`EndpointError::NotCallersEntry`].
fn entries_for(
    snapshot: &Snapshot,
    selectors: &[Selector],
    wanted: &str,
) -> Result<Vec<Arc<AgentEntry>>, EndpointError> {
    let matching: Vec<Arc<AgentEntry>> = snapshot
        .identities_for(selectors, SystemTime::now())
        .into_iter()
        .map(|i| i.entry)
        .collect();
    if matching.is_empty() {
        return Err(EndpointError::NoEntry {
            selectors: selectors
                .iter()
                .map(Selector::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    if wanted.is_empty() {
        return Ok(matching);
    }
    let id = SpiffeId::parse(wanted).map_err(|e| EndpointError::BadSpiffeId {
        id: wanted.chars().take(200).collect(),
        reason: e.to_string(),
    })?;
    matching
        .into_iter()
        .find(|e| e.spiffe_id == id)
        .map(|e| vec![e])
        .ok_or_else(|| EndpointError::NotCallersEntry(id.to_string()))
}

/// `FetchJWTSVID`: one identity token per entry asked for, from the cache or the server.
///
/// # Errors
/// The caller's error as an [`EndpointError`] status, or the server's refusal relayed.
pub(super) async fn fetch_jwt_svids(
    snapshot: &Snapshot,
    peer: &WorkloadPeer,
    link: &ServerLink,
    cache: &JwtCache,
    request: &pb::JwtsvidRequest,
) -> Result<pb::JwtsvidResponse, Status> {
    let audience = one_audience(&request.audience)?;
    let entries = entries_for(snapshot, peer.selectors(), &request.spiffe_id)?;
    let mut svids = Vec::with_capacity(entries.len());
    for entry in entries {
        let now = SystemTime::now();
        let jwt = match cache.get(&entry.id, audience, now) {
            Some(jwt) => jwt,
            None => {
                let answer = link
                    .issue_identity_jwt(&entry, audience)
                    .await
                    .map_err(super::task_api::relay)?;
                let jwt = CachedJwt {
                    spiffe_id: answer.spiffe_id,
                    token: answer.token,
                    issued_at: now,
                    expires_at: UNIX_EPOCH
                        + Duration::from_secs(u64::try_from(answer.expires_at).unwrap_or(0)),
                };
                cache.put(&entry.id, audience, jwt.clone());
                jwt
            }
        };
        svids.push(pb::Jwtsvid {
            spiffe_id: jwt.spiffe_id,
            svid: jwt.token,
            hint: entry.hint.clone(),
        });
    }
    // A token is a credential: it goes only to the process that asked, if still alive.
    peer.confirm()?;
    Ok(pb::JwtsvidResponse { svids })
}

/// `FetchJWTBundles`' message: the trust domain's JWKS. Given, like the X.509 bundles, only
/// to a workload with an identity.
pub(super) fn render_jwt_bundles(
    snapshot: &Snapshot,
    selectors: &[Selector],
    now: SystemTime,
) -> Rendered<pb::JwtBundlesResponse> {
    let identities = served_identities(snapshot, selectors, now)?;
    let response = pb::JwtBundlesResponse {
        bundles: HashMap::from([(
            snapshot.trust_domain.id().as_str().to_owned(),
            snapshot.jwt_bundle().to_jwks_json(),
        )]),
    };
    let wake = identities
        .iter()
        .filter_map(|i| i.svid.as_ref().map(|s| s.not_after))
        .min();
    Ok((response, wake))
}

/// `ValidateJWTSVID`: the token checked against the trust domain's JWT keys for `audience`.
///
/// # Errors
/// [`EndpointError::NoAudience`], [`EndpointError::NoToken`] or
/// [`EndpointError::InvalidToken`] with the reason.
pub(super) fn validate(
    snapshot: &Snapshot,
    request: &pb::ValidateJwtsvidRequest,
) -> Result<pb::ValidateJwtsvidResponse, EndpointError> {
    if request.audience.is_empty() {
        return Err(EndpointError::NoAudience);
    }
    if request.svid.is_empty() {
        return Err(EndpointError::NoToken);
    }
    let bundles: JwtBundles = [snapshot.jwt_bundle()].into_iter().collect();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let valid = jwt::validate(&request.svid, &request.audience, &bundles, now)
        .map_err(EndpointError::InvalidToken)?;
    Ok(pb::ValidateJwtsvidResponse {
        spiffe_id: valid.spiffe_id().as_str().to_owned(),
        claims: Some(to_struct(valid.claims)),
    })
}

/// JSON claims as a `google.protobuf.Struct`.
fn to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, to_value(v)))
            .collect::<BTreeMap<_, _>>(),
    }
}

fn to_value(value: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match value {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or_default()),
        J::String(s) => Kind::StringValue(s),
        J::Array(items) => Kind::ListValue(prost_types::ListValue {
            values: items.into_iter().map(to_value).collect(),
        }),
        J::Object(map) => Kind::StructValue(to_struct(map)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_non_empty_audience_is_accepted() {
        assert_eq!(one_audience(&["api".into()]).unwrap(), "api");
        assert!(matches!(one_audience(&[]), Err(EndpointError::NoAudience)));
        assert!(matches!(
            one_audience(&[String::new()]),
            Err(EndpointError::NoAudience)
        ));
        assert!(matches!(
            one_audience(&["a".into(), "b".into()]),
            Err(EndpointError::SeveralAudiences(2))
        ));
    }

    #[test]
    fn claims_become_a_protobuf_struct_of_the_same_shape() {
        let claims = serde_json::json!({"sub": "spiffe://t/a", "aud": ["x"], "exp": 5, "n": null});
        let serde_json::Value::Object(map) = claims else {
            unreachable!()
        };
        let s = to_struct(map);
        use prost_types::value::Kind;
        assert_eq!(
            s.fields["sub"].kind,
            Some(Kind::StringValue("spiffe://t/a".into()))
        );
        assert_eq!(s.fields["exp"].kind, Some(Kind::NumberValue(5.0)));
        let Some(Kind::ListValue(aud)) = &s.fields["aud"].kind else {
            panic!()
        };
        assert_eq!(aud.values.len(), 1);
    }
}

//! `--accept jwt`: a client without a certificate authenticates each request with
//! `Authorization: Bearer <JWT-SVID>`.
//!
//! The token is validated by [`crate::jwt::validate`] (signature against the JWT bundles the
//! proxy follows, audience, expiry) — the one validator, so the proxy refuses exactly what the
//! agent's `ValidateJWTSVID` refuses — then authorized by the handshake policy (`--allow-id`,
//! `--require-scope`) as a certificate's identity would be, then, under `--single-use`,
//! recorded in the [`ReplayCache`]. The routes then decide by the token's scopes.
//!
//! A keep-alive client sends the same token on every request, so each connection remembers the
//! last token it accepted: the same bytes, checked against the same bundles, need no second
//! signature verification; only `exp` is checked again (and, under `--single-use`, the replay
//! cache, which refuses the second use anyway). A bundle update (a key rotated out) makes every
//! remembered token be validated again.

use std::sync::{Arc, Mutex};

use http::HeaderMap;

use super::http::Principal;
use super::replay::{ReplayCache, ReplayError};
use crate::jwt::{JwtError, validate};
use crate::mtls::PeerPolicy;
use crate::workload_client::JwtBundleSource;

/// How bearer tokens are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BearerPolicy {
    /// The audience every token must name (`--audience`).
    pub audience: String,
    /// Whether each token is accepted once (`--single-use`).
    pub single_use: bool,
}

/// Why a request's token was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// 401: no usable token; `missing` when there was none at all.
    Unauthorized {
        /// One sentence.
        reason: String,
        /// No `Authorization` header at all (RFC 6750 §3.1: no error code then).
        missing: bool,
    },
    /// 403: a valid token whose identity the policy does not admit.
    Forbidden(String),
    /// 503: the replay cache cannot take the token.
    Unavailable(String),
}

impl Refusal {
    fn invalid(reason: impl ToString) -> Self {
        Self::Unauthorized {
            reason: reason.to_string(),
            missing: false,
        }
    }
}

/// The last token a connection accepted.
struct Accepted {
    token: Box<str>,
    generation: u64,
    expires_at: u64,
    principal: Arc<Principal>,
}

/// One connection's memory of its last accepted token.
#[derive(Default)]
pub(crate) struct ConnectionTokens(Mutex<Option<Accepted>>);

/// The bearer-token authenticator of an HTTP proxy.
pub(crate) struct Bearer {
    policy: BearerPolicy,
    peer_policy: PeerPolicy,
    bundles: JwtBundleSource,
    replay: Option<ReplayCache>,
}

impl Bearer {
    /// Validates tokens for `policy` against `bundles`, admitting identities by `peer_policy`.
    pub(crate) fn new(
        policy: BearerPolicy,
        peer_policy: PeerPolicy,
        bundles: JwtBundleSource,
    ) -> Self {
        let replay = policy
            .single_use
            .then(|| ReplayCache::new(super::replay::DEFAULT_CAPACITY));
        Self {
            policy,
            peer_policy,
            bundles,
            replay,
        }
    }

    /// The principal of a request from `headers`, at `now` (Unix seconds).
    ///
    /// # Errors
    /// The [`Refusal`] to answer with.
    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
        remembered: &ConnectionTokens,
        now: u64,
    ) -> Result<Arc<Principal>, Refusal> {
        let token = bearer_token(headers)?;
        // The generation is read before the bundles: should they change in between, the token
        // is remembered under the older number and validated again on its next use.
        let generation = self.bundles.generation();
        let hit = {
            let last = remembered.0.lock().unwrap_or_else(|e| e.into_inner());
            last.as_ref()
                .filter(|a| a.generation == generation && *a.token == *token)
                .map(|a| (a.expires_at, a.principal.clone()))
        };
        let (principal, expires_at) = match hit {
            Some((expires_at, _)) if now >= expires_at => {
                return Err(Refusal::invalid(JwtError::Expired(now - expires_at)));
            }
            Some((expires_at, principal)) => (principal, expires_at),
            None => {
                let validated =
                    validate(token, &self.policy.audience, &self.bundles.bundles(), now)
                        .map_err(Refusal::invalid)?;
                self.peer_policy
                    .authorize(&validated.subject)
                    .map_err(|refusal| Refusal::Forbidden(refusal.to_string()))?;
                let principal = Arc::new(Principal::from_token(&validated));
                if self.replay.is_none() {
                    *remembered.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(Accepted {
                        token: token.into(),
                        generation,
                        expires_at: validated.expires_at,
                        principal: principal.clone(),
                    });
                }
                (principal, validated.expires_at)
            }
        };
        if let Some(replay) = &self.replay {
            replay
                .record(
                    principal.id.to_string().as_str(),
                    principal.jti(),
                    expires_at,
                    now,
                )
                .map_err(|e| match e {
                    ReplayError::Full(_) => Refusal::Unavailable(e.to_string()),
                    _ => Refusal::invalid(e),
                })?;
        }
        Ok(principal)
    }
}

/// The token of `Authorization: Bearer <token>`.
fn bearer_token(headers: &HeaderMap) -> Result<&str, Refusal> {
    let mut all = headers.get_all(http::header::AUTHORIZATION).iter();
    let Some(value) = all.next() else {
        return Err(Refusal::Unauthorized {
            reason: "the request carries no bearer token; send Authorization: Bearer <JWT-SVID>"
                .to_owned(),
            missing: true,
        });
    };
    if all.next().is_some() {
        return Err(Refusal::invalid(
            "the request carries several Authorization headers; send exactly one",
        ));
    }
    let malformed = || Refusal::invalid("the Authorization header is not 'Bearer <JWT-SVID>'");
    let value = value.to_str().map_err(|_| malformed())?;
    let (scheme, token) = value.split_once(' ').ok_or_else(malformed)?;
    let token = token.trim_matches(' ');
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(malformed());
    }
    Ok(token)
}

/// The `WWW-Authenticate` value of a 401 (RFC 6750 §3): no error code when no token was sent,
/// else `invalid_token` with the reason as a quoted string (quotes and backslashes escaped,
/// anything but printable ASCII replaced, as a header value must be).
pub(crate) fn challenge(reason: &str, missing: bool) -> http::HeaderValue {
    if missing {
        return http::HeaderValue::from_static("Bearer realm=\"mayfly\"");
    }
    let mut value =
        String::from("Bearer realm=\"mayfly\", error=\"invalid_token\", error_description=\"");
    for c in reason.chars() {
        match c {
            '"' | '\\' => {
                value.push('\\');
                value.push(c);
            }
            ' '..='~' => value.push(c),
            _ => value.push('?'),
        }
    }
    value.push('"');
    http::HeaderValue::from_str(&value).unwrap_or_else(|_| {
        http::HeaderValue::from_static("Bearer realm=\"mayfly\", error=\"invalid_token\"")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_str(value).unwrap(),
        );
        h
    }

    #[test]
    fn only_one_bearer_header_with_a_token_is_read() {
        assert_eq!(bearer_token(&headers("Bearer a.b.c")), Ok("a.b.c"));
        assert_eq!(bearer_token(&headers("bearer  a.b.c ")), Ok("a.b.c"));
        for bad in ["Basic dXNlcjpwdw==", "Bearer", "Bearer  ", "a.b.c"] {
            assert!(
                matches!(
                    bearer_token(&headers(bad)),
                    Err(Refusal::Unauthorized { missing: false, .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            bearer_token(&HeaderMap::new()),
            Err(Refusal::Unauthorized { missing: true, .. })
        ));
        let mut two = headers("Bearer a.b.c");
        two.append(
            http::header::AUTHORIZATION,
            http::HeaderValue::from_static("Bearer d.e.f"),
        );
        assert!(bearer_token(&two).is_err());
    }

    #[test]
    fn the_challenge_quotes_the_reason_safely() {
        let v = challenge("the token is for the audience \"x\\\", not y…", false);
        assert_eq!(
            v.to_str().unwrap(),
            "Bearer realm=\"mayfly\", error=\"invalid_token\", error_description=\"the token is for the audience \\\"x\\\\\\\", not y?\""
        );
        assert_eq!(
            challenge("x", true).to_str().unwrap(),
            "Bearer realm=\"mayfly\""
        );
    }
}

//! JWT-SVID issuance on the node API (issue 11): identity tokens for an entry and task tokens
//! with scopes, each for exactly one audience, signed with the JWT key paired with the active
//! CA. The same checks as for X509-SVIDs apply (the agent's standing, the entry's owner, the
//! scopes and TTL ceiling); the audit record keeps the `jti` where an X509-SVID's serial goes
//! and names the audience.

use std::time::SystemTime;

use tonic::{Request, Response, Status};

use super::{NodeError, NodeService, event, peer_of, task_event};
use crate::audit::{self, AuditAction, AuditEvent, Decision};
use crate::id::ScopedId;
use crate::jwt::{Claims, TokenKind};
use crate::proto::node as pb;
use crate::server::entry_rules;
use crate::server::policy::{Refusal, check_task_id};
use crate::svid::Serial;
use crate::wire::unix_secs;

/// The longest audience accepted.
pub(crate) const MAX_AUDIENCE_LEN: usize = 255;

/// A token signed and not yet returned.
struct Minted {
    sub: ScopedId,
    token: String,
    claims: Claims,
}

/// Checks an audience: 1 to [`MAX_AUDIENCE_LEN`] printable characters, no spaces (a URL or a
/// name like `stripe-api`).
///
/// # Errors
/// [`Refusal::Invalid`] saying what is wrong.
pub(crate) fn check_audience(audience: &str) -> Result<(), Refusal> {
    if audience.is_empty() {
        return Err(Refusal::Invalid(
            "a JWT-SVID needs an audience; name the service that will receive it".into(),
        ));
    }
    if audience.len() > MAX_AUDIENCE_LEN {
        return Err(Refusal::Invalid(format!(
            "the audience is {} bytes; an audience is at most {MAX_AUDIENCE_LEN}",
            audience.len()
        )));
    }
    if audience
        .chars()
        .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Refusal::Invalid(format!(
            "the audience '{}' holds spaces or control characters; use a name or URL without them",
            audit::untrusted(audience)
        )));
    }
    Ok(())
}

impl NodeService {
    /// `IssueIdentityJwt`.
    pub(super) async fn identity_jwt(
        &self,
        request: Request<pb::IssueIdentityJwtRequest>,
    ) -> Result<Response<pb::IssueJwtResponse>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        let mut event = event(AuditAction::JwtIdentity);
        let result: Result<Minted, NodeError> = async {
            let entry = self
                .issuance_entry(peer.as_deref(), &req.entry_id, &mut event, || {
                    check_audience(&req.audience)
                })
                .await?;
            let (id, _) = self.state.policy.identity_grant(&entry)?;
            // The entry's JWT TTL (0: the default), never past what the CA lifecycle keeps a
            // JWT key published for.
            let ttl = match entry.jwt_ttl_secs {
                0 => entry_rules::DEFAULT_JWT_TTL,
                secs => std::time::Duration::from_secs(secs.into()),
            }
            .min(self.state.max_entry_ttl);
            self.sign_jwt(TokenKind::Identity, id, &req.audience, ttl, event.clone())
                .await
        }
        .await;
        self.jwt_answer(event, result).await
    }

    /// `IssueTaskJwt`.
    pub(super) async fn task_jwt(
        &self,
        request: Request<pb::IssueTaskJwtRequest>,
    ) -> Result<Response<pb::IssueJwtResponse>, Status> {
        let peer = peer_of(&request);
        let req = request.into_inner();
        let mut event = task_event(AuditAction::JwtTask, &req.task_id, &req.scopes);
        let result: Result<Minted, NodeError> = async {
            let entry = self
                .issuance_entry(peer.as_deref(), &req.entry_id, &mut event, || {
                    check_task_id(&req.task_id)?;
                    check_audience(&req.audience)
                })
                .await?;
            let (id, ttl) = self
                .state
                .policy
                .task_grant(&entry, &req.scopes, req.ttl_seconds)?;
            event.scopes = id.scopes().iter().map(|s| s.to_string()).collect();
            let kind = TokenKind::Task(id.clone());
            self.sign_jwt(kind, id, &req.audience, ttl, event.clone())
                .await
        }
        .await;
        self.jwt_answer(event, result).await
    }

    /// Signs a token of `kind` for `id` and `audience`, living `ttl`, audits it durably, then
    /// returns it.
    async fn sign_jwt(
        &self,
        kind: TokenKind,
        id: ScopedId,
        audience: &str,
        ttl: std::time::Duration,
        mut event: AuditEvent,
    ) -> Result<Minted, NodeError> {
        let ca = self.state.cas.current();
        let signer = ca.jwt_signer().ok_or(NodeError::NoJwtKey)?;
        let now = unix_secs(SystemTime::now()).max(0).cast_unsigned();
        let exp = now + ttl.as_secs();
        let mut claims =
            Claims::new(&kind, id.base(), audience, now, exp).map_err(NodeError::Jwt)?;
        claims.iss = self.state.jwt_issuer.get().cloned();
        let token = claims.sign(signer).map_err(NodeError::Jwt)?;
        event.decision = Some(Decision::Allow);
        event.reason = format!("issued for the audience {}", audit::untrusted(audience));
        event.spiffe_id = Some(claims.sub.to_string());
        event.serial = Serial::from_hex(&claims.jti);
        event.not_after = Some(i64::try_from(exp).unwrap_or(i64::MAX));
        self.state.audit.record(event).await?;
        Ok(Minted {
            sub: id,
            token,
            claims,
        })
    }

    /// The answer to a JWT issuance: the token, or the audited refusal.
    async fn jwt_answer(
        &self,
        event: AuditEvent,
        result: Result<Minted, NodeError>,
    ) -> Result<Response<pb::IssueJwtResponse>, Status> {
        match result {
            Ok(minted) => Ok(Response::new(pb::IssueJwtResponse {
                spiffe_id: minted.sub.to_string(),
                token: minted.token,
                expires_at: i64::try_from(minted.claims.exp).unwrap_or(i64::MAX),
                jti: minted.claims.jti,
            })),
            Err(e) => Err(self.refuse(event, e).await),
        }
    }
}

//! The admin API's CA commands (issue 10, SPIRE's `localauthority`): list the journal, and
//! prepare, activate, taint or revoke a CA by hand. Each change is audited as the `operator`,
//! and refused with one sentence (FailedPrecondition) when it is out of order.

use crate::audit::AuditAction;
use crate::proto::admin as pb;
use crate::server::rotation::RotationError;
use crate::store::CaJournalRecord;

use super::{AdminError, AdminService};

/// The wire form of a journal row, for the server whose instance is `instance_id`.
fn ca_message(r: CaJournalRecord, instance_id: &str) -> pb::Ca {
    pb::Ca {
        this_server: r.instance_id == instance_id,
        id: r.ca_id,
        state: r.state.as_str().to_owned(),
        not_before: r.not_before,
        not_after: r.not_after,
        tainted: r.tainted,
        revoked: r.revoked,
        upstream: r.upstream,
        signed_until: r.signed_until,
        instance_id: r.instance_id,
    }
}

/// A CA ID as given: 64 lowercase hex digits.
fn parse_ca_id(text: &str) -> Result<String, AdminError> {
    if text.len() == 64 && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        Ok(text.to_owned())
    } else {
        Err(AdminError::Invalid(format!(
            "'{}' is not a CA ID: CA IDs are 64 hexadecimal digits, as `mayfly ca list` shows",
            crate::text::escape_bounded(text, 80)
        )))
    }
}

/// A CA step by hand.
#[derive(Debug, Clone, Copy)]
pub(super) enum CaStep {
    Prepare,
    Activate,
    Taint,
    Revoke,
}

impl CaStep {
    fn action(self) -> AuditAction {
        match self {
            Self::Prepare => AuditAction::CaPrepare,
            Self::Activate => AuditAction::CaActivate,
            Self::Taint => AuditAction::CaTaint,
            Self::Revoke => AuditAction::CaRevoke,
        }
    }
}

impl AdminService {
    /// Every CA of every server sharing the store.
    pub(super) async fn ca_list(&self) -> Result<pb::ListCasResponse, AdminError> {
        let instance = self.state.rotation.instance_id();
        let cas = self.state.store.list_ca_journal().await?;
        Ok(pb::ListCasResponse {
            cas: cas.into_iter().map(|r| ca_message(r, instance)).collect(),
        })
    }

    /// Runs `step` (on `id` for taint and revoke) and audits it; a refusal is audited too.
    pub(super) async fn ca_step(&self, step: CaStep, id: &str) -> Result<pb::Ca, AdminError> {
        let rotation = &self.state.rotation;
        let result = match step {
            CaStep::Prepare => rotation.prepare().await,
            CaStep::Activate => rotation.activate().await,
            CaStep::Taint => rotation.taint(&parse_ca_id(id)?).await,
            CaStep::Revoke => rotation.revoke(&parse_ca_id(id)?).await,
        };
        match result {
            Ok(record) => {
                // The answer's effect shows at once in `bundle show`, not at the next refresh.
                let state = &self.state;
                if let Err(e) = crate::server::refresh_bundle(
                    state.store.as_ref(),
                    &state.td,
                    &state.source,
                    &state.jwt_keys,
                )
                .await
                {
                    tracing::warn!(error = %crate::wire::error_chain(&e), "could not refresh the trust bundle after a CA step; the periodic refresh will");
                }
                let reason = format!("CA {} {}", record.ca_id, record.state.as_str());
                self.audit_change(step.action(), reason, |_| {}).await?;
                Ok(ca_message(record, rotation.instance_id()))
            }
            Err(e) => {
                if matches!(e, RotationError::OutOfOrder(_) | RotationError::NotFound(_)) {
                    self.audit_refusal(step.action(), e.to_string()).await?;
                }
                Err(AdminError::Ca(e))
            }
        }
    }
}

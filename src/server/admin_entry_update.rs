//! The admin API's `UpdateEntry` (issue 11): an entry's selectors, scopes, TTLs, DNS names or
//! hint changed under the same rules as `CreateEntry`, as a compare-and-swap, audited as the
//! `operator`. Its agent sees the change at its next sync (held syncs answer at once).

use crate::audit::AuditAction;
use crate::proto::admin as pb;
use crate::store::Entry;

use super::{AdminError, AdminService};

/// How often an entry update is re-applied when other updates of the entry keep coming in
/// between its read and its write.
const UPDATE_ATTEMPTS: u32 = 8;

impl AdminService {
    /// Reads the entry, applies the update under the create rules and writes it back if the
    /// entry is still as read (compare-and-swap); if another update came in between, the
    /// change is applied again to the newer entry, so concurrent updates of different fields
    /// all hold.
    pub(super) async fn update(&self, req: &pb::UpdateEntryRequest) -> Result<Entry, AdminError> {
        let id = Self::parse_entry_id(&req.id)?;
        let mut attempts = 0;
        let entry = loop {
            let Some(stored) = self.state.store.get_entry(&id).await? else {
                return Err(AdminError::NotFound(format!(
                    "no entry {id}; `mayfly entry list` shows the entries"
                )));
            };
            let entry = self.entry_rules().apply_update(stored.clone(), req)?;
            if self.state.store.update_entry(&stored, &entry).await? {
                break entry;
            }
            attempts += 1;
            if attempts == UPDATE_ATTEMPTS {
                return Err(AdminError::Unavailable(format!(
                    "entry {id} changed {UPDATE_ATTEMPTS} times while this update was applied (other updates of it are under way); run the update again"
                )));
            }
        };
        // Held agent syncs answer at once (issue 10).
        self.state.entry_watch.refresh().await;
        self.audit_change(AuditAction::EntryUpdate, update_reason(req), |e| {
            e.entry_id = Some(entry.id.to_string());
            e.spiffe_id = Some(entry.spiffe_id.to_string());
            e.scopes = entry.scopes.iter().map(|s| s.to_string()).collect();
        })
        .await?;
        Ok(entry)
    }
}

/// The audit reason of an update: which fields it replaced (their new values are in the
/// entry; the record names the scopes, the one field issuance decisions depend on).
fn update_reason(req: &pb::UpdateEntryRequest) -> String {
    let changed: Vec<&str> = [
        ("selectors", req.selectors.is_some()),
        ("scopes", req.scopes.is_some()),
        ("ttl", req.ttl_seconds.is_some()),
        ("jwt_ttl", req.jwt_ttl_seconds.is_some()),
        ("dns_names", req.dns_names.is_some()),
        ("hint", req.hint.is_some()),
    ]
    .into_iter()
    .filter_map(|(name, given)| given.then_some(name))
    .collect();
    format!("entry updated: {}", changed.join(", "))
}

//! The JWT-SVID keys a server publishes: the public keys of every live CA of every server
//! sharing the store, re-read with the X.509 bundle, so agents (and through them workloads and
//! proxies) and the OIDC discovery endpoint learn a key before it signs and keep it while
//! tokens it signed may live.

use std::sync::{Arc, PoisonError, RwLock};

use crate::id::TrustDomain;
use crate::jwt::{JwtBundle, JwtKey};
use crate::store::{CaJournalRecord, Store, StoreError};

/// The published JWT keys, shared by the node API, the admin API and the discovery endpoint;
/// cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct PublishedJwtKeys(Arc<RwLock<Arc<Vec<JwtKey>>>>);

impl PublishedJwtKeys {
    /// The keys now, ordered by `kid`.
    pub(crate) fn get(&self) -> Arc<Vec<JwtKey>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The keys as the JWT bundle of `td`.
    pub(crate) fn bundle(&self, td: &TrustDomain) -> JwtBundle {
        JwtBundle::new(td.clone(), self.get().iter().cloned())
    }

    /// Re-reads the keys from the store's CA journal; an unchanged set is left alone.
    ///
    /// # Errors
    /// [`StoreError`] when the journal cannot be read.
    pub(crate) async fn refresh(&self, store: &dyn Store, now: i64) -> Result<(), StoreError> {
        let keys = live_keys(&store.list_ca_journal().await?, now);
        let mut held = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if **held != keys {
            *held = Arc::new(keys);
        }
        Ok(())
    }
}

/// The JWT keys of `rows` that are published at `now`: not revoked, and paired with a CA that
/// may still have signed something alive.
fn live_keys(rows: &[CaJournalRecord], now: i64) -> Vec<JwtKey> {
    let mut keys: Vec<JwtKey> = rows
        .iter()
        .filter(|r| !r.revoked && r.signed_until > now)
        .filter_map(|r| r.jwt_public.as_deref())
        .filter_map(|point| match JwtKey::from_point(point) {
            Ok(key) => Some(key),
            Err(e) => {
                tracing::warn!(error = %e, "the CA journal holds a JWT key that is not a P-256 point; it is not published");
                None
            }
        })
        .collect();
    keys.sort_by(|a, b| a.kid().cmp(b.kid()));
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::JwtSigner;
    use crate::store::CaState;

    fn row(key: Option<&JwtKey>, revoked: bool, signed_until: i64) -> CaJournalRecord {
        CaJournalRecord {
            ca_id: "aa".into(),
            instance_id: "one".into(),
            state: CaState::Old,
            tainted: revoked,
            revoked,
            upstream: false,
            not_before: 0,
            not_after: 1000,
            der: vec![],
            signed_until,
            jwt_public: key.map(|k| k.point().to_vec()),
        }
    }

    #[test]
    fn only_keys_of_unrevoked_cas_whose_tokens_may_live_are_published() {
        let (a, _) = JwtSigner::generate().unwrap();
        let (b, _) = JwtSigner::generate().unwrap();
        let (a, b) = (a.public().clone(), b.public().clone());
        let rows = [
            row(Some(&a), false, 100),
            row(Some(&b), true, 100),
            row(None, false, 100),
        ];
        assert_eq!(live_keys(&rows, 99), vec![a.clone()]);
        assert_eq!(live_keys(&rows, 100), Vec::<JwtKey>::new());
    }
}

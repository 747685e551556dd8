//! Re-reading the trust bundle at once when a client's certificate is refused.
//!
//! Each server re-reads the CAs of every server from the store every few seconds. Until it
//! does, it cannot verify an agent whose SVID a server that has just started signed: that
//! agent, failing over from the new server, would be refused for the rest of the period. So a
//! refused client certificate wakes a re-read at once (at most one per [`MIN_GAP`], so a
//! stream of bad handshakes costs one query per second at most), and the agent's next attempt
//! finds the new CA. An unchanged bundle is left alone, so a wake for a truly foreign
//! certificate changes nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::id::TrustDomain;
use crate::mtls::SvidSource;
use crate::store::Store;

/// The shortest time between two re-reads woken by refusals.
const MIN_GAP: Duration = Duration::from_secs(1);

/// Wakes the re-read; cheap to clone.
#[derive(Clone, Default)]
pub(crate) struct BundleWake(Arc<Notify>);

impl BundleWake {
    /// Asks for a re-read; wakes arriving while one is pending or under way make one more at
    /// most.
    pub(crate) fn wake(&self) {
        self.0.notify_one();
    }

    /// Whether a failed TLS accept was a refused client certificate, the one failure a re-read
    /// may cure.
    pub(crate) fn is_refused_certificate(error: &std::io::Error) -> bool {
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
    }
}

/// Re-reads the bundle into `source` whenever woken, until `stop`.
pub(crate) async fn run(
    wake: BundleWake,
    store: Arc<dyn Store>,
    td: TrustDomain,
    (source, jwt_keys): (SvidSource, super::jwt_keys::PublishedJwtKeys),
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            () = wake.0.notified() => {}
        }
        tracing::debug!("a client certificate was refused; re-reading the trust bundle");
        if let Err(e) = super::refresh_bundle(store.as_ref(), &td, &source, &jwt_keys).await {
            tracing::warn!(error = %crate::wire::error_chain(&e), "could not re-read the trust bundle; keeping the current one");
        }
        tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(MIN_GAP) => {}
        }
    }
}

//! [`Cause`]: a lower layer's error kept as the `source` of one of ours.

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// The error of a lower layer (x509-parser, rcgen, webpki, aws-lc) that made one of ours, kept
/// whole so that the source chain reaches it, instead of being flattened into a string.
///
/// It is shared, so that the errors holding it stay `Clone` (rustls needs its verifier errors to
/// be `Clone`), and two causes are equal when they say the same thing, so that errors holding
/// it stay comparable in tests.
#[derive(Clone)]
pub struct Cause(Arc<dyn Error + Send + Sync>);

impl Cause {
    /// Keeps `error` as a cause.
    pub fn new(error: impl Error + Send + Sync + 'static) -> Self {
        Self(Arc::new(error))
    }

    /// The error kept.
    pub fn get(&self) -> &(dyn Error + Send + Sync + 'static) {
        &*self.0
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl Error for Cause {
    // The cause stands for the error it keeps: its own source is that error's source, so the
    // chain lists the kept error once, not twice.
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

impl PartialEq for Cause {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.to_string() == other.0.to_string()
    }
}

impl Eq for Cause {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_cause_shows_and_chains_as_the_error_it_keeps() {
        let cause = Cause::new(Outer(std::io::Error::other("inner")));
        assert_eq!(cause.to_string(), "outer");
        assert_eq!(cause.source().unwrap().to_string(), "inner");
        assert_eq!(cause.clone(), cause);
        assert_ne!(cause, Cause::new(std::io::Error::other("else")));
    }
}

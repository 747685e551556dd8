//! The JWT-SVID parts of `mayfly bench proxy`: the bearer token the load generator sends to
//! `mayfly proxy --accept jwt`, the comparison of that proxy with `--accept x509` in the same
//! run, and the rate of [`jwt::validate`] against the raw ES256 verification it is built on.
//!
//! The validation rate is measured on one thread, in that thread's CPU time, so it is per
//! core: `iterations` calls of [`jwt::validate`] on a task token (base64url and JSON decoding,
//! header and claim checks, the signature), then as many raw verifications of the same
//! token's signature with aws-lc-rs (`UnparsedPublicKey::verify` over the same bytes), the two
//! alternating for each round. The ratio of the medians says what everything but the signature
//! costs.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;

use super::handshake::{BenchSvid, MtlsBenchError, thread_cpu_ns};
use mayfly::jwt::{self, Claims, JwtBundle, JwtBundles, JwtSigner, TokenKind};
use mayfly::proxy::{Accept, BearerPolicy};
use mayfly::workload_client::JwtBundleSource;

/// The audience of the benchmark's tokens.
pub(crate) const AUDIENCE: &str = "https://bench.internal";
/// How long the benchmark's token lives: longer than any run.
const TOKEN_LIFETIME_SECS: u64 = 24 * 3600;
/// The goal: keep-alive requests/s with `--accept jwt` at least this share of `--accept x509`.
pub const JWT_PROXY_GOAL_RATIO: f64 = 0.9;
/// The goal: `jwt::validate` at least this share of the raw ES256 verify rate, per core.
pub const JWT_VERIFY_GOAL_RATIO: f64 = 0.8;

/// A signing key, the bundle holding it, and a task token for the benchmark client.
pub(crate) struct BenchJwt {
    pub(crate) bundles: JwtBundles,
    pub(crate) token: String,
}

impl BenchJwt {
    /// A fresh key and a token for `client`'s identity and scopes, for [`AUDIENCE`].
    pub(crate) fn generate(client: &BenchSvid) -> Result<Self, MtlsBenchError> {
        let (signer, _) = JwtSigner::generate().map_err(bad)?;
        let now = now_secs();
        let id = client.id.spiffe_id().clone();
        let claims = Claims::new(
            &TokenKind::Task(client.id.clone()),
            &id,
            AUDIENCE,
            now,
            now + TOKEN_LIFETIME_SECS,
        )
        .map_err(bad)?;
        let token = claims.sign(&signer).map_err(bad)?;
        let bundles = [JwtBundle::new(id.trust_domain(), [signer.public().clone()])]
            .into_iter()
            .collect();
        Ok(Self { bundles, token })
    }

    /// What the JWT proxy accepts: bearer tokens only, for [`AUDIENCE`], reusable.
    pub(crate) fn accept() -> Accept {
        Accept {
            x509: false,
            jwt: Some(BearerPolicy {
                audience: AUDIENCE.to_owned(),
                single_use: false,
            }),
        }
    }

    /// The bundles, as the proxy follows them.
    pub(crate) fn source(&self) -> JwtBundleSource {
        JwtBundleSource::fixed(self.bundles.clone())
    }
}

fn bad(e: jwt::JwtError) -> MtlsBenchError {
    MtlsBenchError::Handshake(format!("the benchmark token could not be made: {e}"))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// One load with `--accept jwt` against `--accept x509`, both ours, in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct JwtLoadSummary {
    /// `keep-alive` or `new-connections`.
    pub load: String,
    /// `--accept x509`, per second, median of the rounds.
    pub x509_per_sec: f64,
    /// `--accept jwt`, per second, median of the rounds.
    pub jwt_per_sec: f64,
    /// jwt / x509, ratio of the medians.
    pub ratio: Option<f64>,
    /// jwt / x509 in each round.
    pub round_ratios: Vec<f64>,
    /// The x509 proxy's CPU per request, µs, median.
    pub x509_cpu_us_per_op: Option<f64>,
    /// The jwt proxy's CPU per request, µs, median.
    pub jwt_cpu_us_per_op: Option<f64>,
    /// Whether jwt / x509 is at least [`JWT_PROXY_GOAL_RATIO`] (keep-alive only).
    pub goal_met: Option<bool>,
}

/// `jwt::validate` against the raw ES256 verification, per core.
#[derive(Debug, Clone, Serialize)]
pub struct JwtVerifyFigures {
    /// Calls of each per round.
    pub iterations: usize,
    /// Rounds, alternating the two.
    pub rounds: usize,
    /// The token's length, bytes.
    pub token_bytes: usize,
    /// Raw ES256 verifications per CPU second, median of the rounds.
    pub raw_per_sec: f64,
    /// `jwt::validate` calls per CPU second, median of the rounds.
    pub validate_per_sec: f64,
    /// validate / raw, ratio of the medians.
    pub ratio: f64,
    /// validate / raw in each round.
    pub round_ratios: Vec<f64>,
    /// Whether the ratio is at least [`JWT_VERIFY_GOAL_RATIO`].
    pub goal_met: bool,
}

impl fmt::Display for JwtVerifyFigures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rounds: Vec<String> = self
            .round_ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect();
        write!(
            f,
            "JWT validation per core ({}-byte task token, {} calls x {} rounds, thread CPU time): jwt::validate {:.0}/s, raw ES256 verify {:.0}/s: {:.2}x (rounds: {}); goal >= {JWT_VERIFY_GOAL_RATIO:.1}x {}",
            self.token_bytes,
            self.iterations,
            self.rounds,
            self.validate_per_sec,
            self.raw_per_sec,
            self.ratio,
            rounds.join(", "),
            if self.goal_met { "met" } else { "MISSED" }
        )
    }
}

/// Measures [`jwt::validate`] on `bench.token` against the raw verification of its signature,
/// on this thread.
///
/// # Errors
/// [`MtlsBenchError::Handshake`] when the token does not validate or verify (the figures would
/// be of failures); [`MtlsBenchError::Clock`] when the CPU clock cannot be read.
pub(crate) fn verify_rate(
    bench: &BenchJwt,
    iterations: usize,
    rounds: usize,
) -> Result<JwtVerifyFigures, MtlsBenchError> {
    let token = bench.token.as_str();
    let now = now_secs();
    let validated = jwt::validate(token, AUDIENCE, &bench.bundles, now)
        .map_err(|e| MtlsBenchError::Handshake(format!("the benchmark token: {e}")))?;
    let key = bench
        .bundles
        .get(&validated.spiffe_id().trust_domain())
        .and_then(|b| b.keys().next())
        .ok_or_else(|| MtlsBenchError::Handshake("the benchmark bundle has no key".into()))?;
    let (signed, signature) = token
        .rsplit_once('.')
        .ok_or_else(|| MtlsBenchError::Handshake("the benchmark token has no signature".into()))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| MtlsBenchError::Handshake(e.to_string()))?;
    let raw = || {
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, key.point())
            .verify(signed.as_bytes(), &signature)
            .is_ok()
    };
    if !raw() {
        return Err(MtlsBenchError::Handshake(
            "the benchmark token's signature does not verify raw".into(),
        ));
    }
    let per_cpu_sec = |f: &dyn Fn() -> bool| -> Result<f64, MtlsBenchError> {
        let start = thread_cpu_ns()?;
        let mut ok = 0usize;
        for _ in 0..iterations {
            ok += usize::from(std::hint::black_box(f()));
        }
        let spent = thread_cpu_ns()?.saturating_sub(start).max(1);
        if ok != iterations {
            return Err(MtlsBenchError::Handshake(format!(
                "{} of {iterations} verifications failed",
                iterations - ok
            )));
        }
        Ok(iterations as f64 / (spent as f64 / 1e9))
    };
    let validate =
        || jwt::validate(std::hint::black_box(token), AUDIENCE, &bench.bundles, now).is_ok();
    let (mut raws, mut validates) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        raws.push(per_cpu_sec(&raw)?);
        validates.push(per_cpu_sec(&validate)?);
    }
    let round_ratios: Vec<f64> = validates.iter().zip(&raws).map(|(v, r)| v / r).collect();
    let raw_per_sec = super::handshake::median(&mut raws);
    let validate_per_sec = super::handshake::median(&mut validates);
    let ratio = validate_per_sec / raw_per_sec.max(f64::MIN_POSITIVE);
    Ok(JwtVerifyFigures {
        iterations,
        rounds,
        token_bytes: token.len(),
        raw_per_sec,
        validate_per_sec,
        ratio,
        round_ratios,
        goal_met: ratio >= JWT_VERIFY_GOAL_RATIO,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verify_rate_is_measured_on_a_token_that_validates() {
        let pki = super::super::handshake::BenchPki::generate().unwrap();
        let bench = BenchJwt::generate(&pki.client).unwrap();
        let figures = verify_rate(&bench, 20, 2).unwrap();
        assert!(figures.raw_per_sec > 0.0 && figures.validate_per_sec > 0.0);
        assert_eq!(figures.round_ratios.len(), 2);
        assert!(figures.to_string().contains("jwt::validate"));
    }
}

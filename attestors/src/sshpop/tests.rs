//! Every refusal beside its positive control, on keys and certificates made here by
//! `ssh-keygen`, the tool operators use.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use signature::Signer;
use ssh_key::{PrivateKey, Signature};
use tempfile::TempDir;

use super::*;
use crate::node::NodeEvidence;

mod setup;

/// Runs `ssh-keygen` with `args` in `dir`, failing the test with its stderr.
fn ssh_keygen(dir: &Path, args: &[&str]) {
    let out = Command::new("ssh-keygen")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("ssh-keygen runs");
    assert!(
        out.status.success(),
        "ssh-keygen {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A scratch directory of keys and certificates.
struct Pki {
    dir: TempDir,
}

impl Pki {
    fn new() -> Self {
        Self {
            dir: TempDir::new().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A key pair `name` and `name.pub` of `ty` (`ed25519`, `ecdsa`, `rsa`).
    fn key(&self, name: &str, ty: &str) {
        let mut args = vec!["-q", "-t", ty, "-N", "", "-C", name, "-f", name];
        if ty == "rsa" {
            args.extend(["-b", "2048"]);
        }
        ssh_keygen(self.dir.path(), &args);
    }

    /// Signs `key`'s public key with `ca` into `<label>-cert.pub`, with `args` such as
    /// `-h -n web-1 -V -5m:+1h`, and returns the certificate's path.
    fn certify(&self, ca: &str, key: &str, label: &str, args: &[&str]) -> PathBuf {
        let public = format!("{label}.pub");
        std::fs::copy(self.path(&format!("{key}.pub")), self.path(&public)).unwrap();
        let mut all = vec!["-q", "-s", ca, "-I", label];
        all.extend(args);
        all.push(&public);
        ssh_keygen(self.dir.path(), &all);
        self.path(&format!("{label}-cert.pub"))
    }

    /// The attestor trusting the CAs `names` (their `.pub` files' text).
    fn attestor(&self, names: &[&str]) -> SshPopAttestor {
        let texts: Vec<String> = names
            .iter()
            .map(|n| std::fs::read_to_string(self.path(&format!("{n}.pub"))).unwrap())
            .collect();
        SshPopAttestor::new(&texts).unwrap()
    }

    fn evidence(&self, cert: &Path, key: &str) -> SshPopEvidence {
        SshPopEvidence::new(cert, self.path(key))
    }

    /// A signature by `key` over the challenge message for `nonce` and `cert_wire`.
    fn sign(&self, key: &str, nonce: &[u8], cert_wire: &[u8]) -> Vec<u8> {
        let key = PrivateKey::read_openssh_file(&self.path(key)).unwrap();
        let signature: Signature = Signer::sign(&key, &challenge_message(nonce, cert_wire));
        Vec::<u8>::try_from(signature).unwrap()
    }
}

/// The standard fixture: CA `ca`, host key `host` of `ty`, certificate `web` as the task's
/// `ssh-keygen -s ca -I id -h -n web-1,web-1.example -V -5m:+1h host_key.pub`.
fn fixture(ty: &str) -> (Pki, SshPopAttestor, SshPopEvidence) {
    let pki = Pki::new();
    pki.key("ca", "ed25519");
    pki.key("host", ty);
    let cert = pki.certify("ca", "host", "web", &HOST_ARGS);
    let attestor = pki.attestor(&["ca"]);
    let evidence = pki.evidence(&cert, "host");
    (pki, attestor, evidence)
}

const HOST_ARGS: [&str; 5] = ["-h", "-n", "web-1,web-1.example", "-V", "-5m:+1h"];

/// The challenge a begin returns, or the test fails.
fn challenge(begun: Begun) -> Box<dyn Challenge> {
    match begun {
        Begun::Challenge(c) => c,
        Begun::Claim(claim) => panic!("sshpop decided without a challenge: {claim:?}"),
    }
}

/// One whole attestation: evidence, begin, answer, finish.
fn attest(attestor: &SshPopAttestor, evidence: &SshPopEvidence) -> Result<NodeClaim, AttestError> {
    let now = SystemTime::now();
    let pending = challenge(attestor.begin(&evidence.evidence()?, now)?);
    let response = evidence.answer(pending.challenge())?;
    pending.finish(&response, now)
}

fn is_refused(result: &Result<impl std::fmt::Debug, AttestError>, words: &str) -> bool {
    matches!(result, Err(AttestError::Refused { reason, .. }) if reason.contains(words))
}

fn is_malformed(result: &Result<impl std::fmt::Debug, AttestError>, words: &str) -> bool {
    matches!(result, Err(AttestError::Malformed { reason, .. }) if reason.contains(words))
}

/// The SHA-256 of the public key blob in `name.pub`, computed by the shell's tools.
fn fingerprint_by_tools(pki: &Pki, name: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cut -d' ' -f2 {name}.pub | base64 -d | sha256sum | cut -d' ' -f1"
        ))
        .current_dir(pki.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// The wire bytes of the certificate file `cert`, decoded by the shell's tools.
fn wire_by_tools(cert: &Path) -> Vec<u8> {
    let out = Command::new("sh")
        .arg("-c")
        .arg("cut -d' ' -f2 \"$0\" | base64 -d")
        .arg(cert)
        .output()
        .unwrap();
    assert!(out.status.success());
    out.stdout
}

#[test]
fn a_host_proves_its_certificate_and_gets_its_key_fingerprint_and_principals() {
    for ty in ["ed25519", "ecdsa", "rsa"] {
        let (pki, attestor, evidence) = fixture(ty);
        let NodeClaim::Proven(node) = attest(&attestor, &evidence).unwrap() else {
            panic!("{ty}: not a proven node");
        };
        assert_eq!(node.node_id, fingerprint_by_tools(&pki, "host"), "{ty}");
        assert_eq!(node.node_id.len(), 64);
        assert!(crate::node::is_valid_node_id(&node.node_id));
        let selectors: Vec<&str> = node.selectors.iter().map(Selector::as_str).collect();
        assert_eq!(
            selectors,
            ["sshpop:principal:web-1", "sshpop:principal:web-1.example"],
            "{ty}"
        );
        assert_eq!(node.single_use, None);
        assert_eq!(attestor.name(), "sshpop");
        assert!(evidence.can_reattest());
    }
}

#[test]
fn each_challenge_is_a_fresh_nonce() {
    let (_pki, attestor, evidence) = fixture("ed25519");
    let wire = evidence.evidence().unwrap();
    let now = SystemTime::now();
    let a = challenge(attestor.begin(&wire, now).unwrap());
    let b = challenge(attestor.begin(&wire, now).unwrap());
    assert_eq!(a.challenge().len(), NONCE_LEN);
    assert_ne!(a.challenge(), b.challenge());
}

#[test]
fn certificates_that_are_not_host_certificates_of_a_configured_ca_valid_now_are_refused() {
    let (pki, attestor, evidence) = fixture("ed25519");
    assert!(attest(&attestor, &evidence).is_ok(), "positive control");
    let check = |label: &str, ca: &str, args: &[&str]| {
        let cert = pki.certify(ca, "host", label, args);
        attest(&attestor, &pki.evidence(&cert, "host"))
    };

    let user = check("user", "ca", &["-n", "web-1", "-V", "-5m:+1h"]);
    assert!(is_refused(&user, "user certificate"), "{user:?}");

    pki.key("other_ca", "ed25519");
    let other = check("other", "other_ca", &HOST_ARGS);
    assert!(is_refused(&other, "not in cert_authorities"), "{other:?}");

    let expired = check("expired", "ca", &["-h", "-n", "web-1", "-V", "-2h:-1h"]);
    assert!(is_refused(&expired, "expired"), "{expired:?}");

    let future = check("future", "ca", &["-h", "-n", "web-1", "-V", "+1h:+2h"]);
    assert!(is_refused(&future, "not valid yet"), "{future:?}");

    let args = [
        "-h",
        "-n",
        "web-1",
        "-V",
        "-5m:+1h",
        "-O",
        "critical:verify-required",
    ];
    let critical = check("critical", "ca", &args);
    assert!(is_refused(&critical, "critical options"), "{critical:?}");

    // A terminal escape in a principal never becomes a selector.
    let escape = check(
        "escape",
        "ca",
        &["-h", "-n", "web\x1b[31m-1", "-V", "-5m:+1h"],
    );
    assert!(is_refused(&escape, "principal 1 "), "{escape:?}");

    let anonymous = check("anonymous", "ca", &["-h", "-V", "-5m:+1h"]);
    assert!(is_refused(&anonymous, "no principal"), "{anonymous:?}");
}

#[test]
fn a_certificate_valid_forever_is_accepted_as_openssh_accepts_it() {
    let (pki, attestor, _) = fixture("ed25519");
    // Without -V, ssh-keygen makes a certificate valid from 0 to 2^64-1.
    let forever = pki.certify("ca", "host", "forever", &["-h", "-n", "web-1"]);
    let evidence = pki.evidence(&forever, "host");
    let wire = evidence.evidence().unwrap();
    assert_eq!(wire, wire_by_tools(&forever));
    let cert = wire::SshCertificate::parse(&wire).unwrap();
    assert_eq!((cert.valid_after, cert.valid_before), (0, u64::MAX));
    assert!(attest(&attestor, &evidence).is_ok());
    let far = SystemTime::now() + Duration::from_secs(100 * 365 * 24 * 3600);
    assert!(attestor.begin(&wire, far).is_ok());
}

#[test]
fn the_validity_window_is_checked_at_begin_and_again_at_finish() {
    let (_pki, attestor, evidence) = fixture("ed25519");
    let wire = evidence.evidence().unwrap();
    let now = SystemTime::now();
    let pending = challenge(attestor.begin(&wire, now).unwrap());
    let response = evidence.answer(pending.challenge()).unwrap();
    assert!(pending.finish(&response, now).is_ok(), "positive control");

    let later = now + Duration::from_secs(2 * 3600);
    let earlier = now - Duration::from_secs(3600);
    assert!(is_refused(&attestor.begin(&wire, later), "expired"));
    assert!(is_refused(&attestor.begin(&wire, earlier), "not valid yet"));
    // Expired while the agent was answering.
    let pending = challenge(attestor.begin(&wire, now).unwrap());
    let response = evidence.answer(pending.challenge()).unwrap();
    assert!(is_refused(&pending.finish(&response, later), "expired"));
}

#[test]
fn the_response_must_sign_this_nonce_and_this_certificate_with_its_host_key() {
    let (pki, attestor, evidence) = fixture("ed25519");
    let wire = evidence.evidence().unwrap();
    let now = SystemTime::now();
    let begin = || challenge(attestor.begin(&wire, now).unwrap());
    let pending = begin();
    let good = pki.sign("host", pending.challenge(), &wire);
    assert!(pending.finish(&good, now).is_ok(), "positive control");

    // A signature over another nonce.
    let pending = begin();
    let other_nonce = pki.sign("host", &[7u8; NONCE_LEN], &wire);
    let got = pending.finish(&other_nonce, now);
    assert!(is_refused(&got, "not a signature by"), "{got:?}");

    // A good response to one challenge, replayed for the next.
    let first = begin();
    let response = evidence.answer(first.challenge()).unwrap();
    let second = begin();
    assert!(is_refused(
        &second.finish(&response, now),
        "not a signature"
    ));
    assert!(
        first.finish(&response, now).is_ok(),
        "the original still verifies"
    );

    // The certificate of host key X, the response signed by key Y (itself certified).
    pki.key("other_host", "ed25519");
    let other_cert = pki.certify("ca", "other_host", "db", &HOST_ARGS);
    let other_wire = pki.evidence(&other_cert, "other_host").evidence().unwrap();
    let pending = begin();
    let by_y_for_x = pki.sign("other_host", pending.challenge(), &wire);
    assert!(is_refused(
        &pending.finish(&by_y_for_x, now),
        "not a signature"
    ));
    // Y's own correct response, presented on X's challenge.
    let pending = begin();
    let by_y_for_y = pki.sign("other_host", pending.challenge(), &other_wire);
    assert!(is_refused(
        &pending.finish(&by_y_for_y, now),
        "not a signature"
    ));
    // X's key over another certificate of X's key: the signature binds the certificate.
    let second_cert = pki.certify("ca", "host", "web2", &HOST_ARGS);
    let second_wire = pki.evidence(&second_cert, "host").evidence().unwrap();
    assert_ne!(second_wire, wire);
    let pending = begin();
    let for_other_cert = pki.sign("host", pending.challenge(), &second_wire);
    assert!(is_refused(
        &pending.finish(&for_other_cert, now),
        "not a signature"
    ));
}

#[test]
fn garbage_and_oversized_evidence_and_responses_are_refused_without_panicking() {
    let (_pki, attestor, evidence) = fixture("ecdsa");
    let wire = evidence.evidence().unwrap();
    let now = SystemTime::now();
    assert!(attestor.begin(&wire, now).is_ok(), "positive control");

    let mut trailing = wire.clone();
    trailing.push(0);
    // Every prefix of a good certificate is refused, none panics.
    for len in 0..wire.len() {
        let got = attestor.begin(&wire[..len], now);
        assert!(
            matches!(got, Err(AttestError::Malformed { .. })),
            "{len}: {got:?}"
        );
    }
    let mut bit_flipped = wire.clone();
    let last = bit_flipped.len() - 1;
    bit_flipped[last] ^= 1;
    let text_line = b"ssh-ed25519-cert-v01@openssh.com AAAA web".to_vec();
    for bad in [
        Vec::new(),
        b"garbage".to_vec(),
        vec![0xff; 1000],
        wire[..wire.len() - 1].to_vec(),
        trailing,
        text_line,
        vec![0; MAX_EVIDENCE + 1],
    ] {
        let got = attestor.begin(&bad, now);
        assert!(matches!(got, Err(AttestError::Malformed { .. })), "{got:?}");
    }
    let over = attestor.begin(&vec![0; MAX_EVIDENCE + 1], now);
    assert!(is_malformed(&over, "over 64 KiB"));
    // A flipped bit in the CA's signature parses, and fails the signature check.
    let got = attestor.begin(&bit_flipped, now);
    assert!(
        is_refused(&got, "signature on it does not verify"),
        "{got:?}"
    );

    let pending = || challenge(attestor.begin(&wire, now).unwrap());
    let good = evidence.answer(pending().challenge()).unwrap();
    let mut trailing = good.clone();
    trailing.push(0);
    for bad in [
        Vec::new(),
        b"garbage".to_vec(),
        good[..good.len() - 1].to_vec(),
        trailing,
        vec![0; MAX_EVIDENCE + 1],
    ] {
        let got = pending().finish(&bad, now);
        assert!(matches!(got, Err(AttestError::Malformed { .. })), "{got:?}");
    }
}

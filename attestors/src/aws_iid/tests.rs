//! Every refusal beside its positive control, on AWS-style certificates and signatures made
//! here by `openssl` the way AWS's documentation verifies them (`openssl dgst -sha256`).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use tempfile::TempDir;

use super::*;
use crate::node::NodeEvidence as _;

const ACCOUNT: &str = "123456789012";
pub(crate) const INSTANCE: &str = "i-1234567890abcdef0";
pub(crate) const NODE_ID: &str = "123456789012/us-east-1/i-1234567890abcdef0";
const AGE: Duration = Duration::from_secs(300);

/// A signing authority standing in for AWS: a self-signed RSA certificate and its key.
pub(crate) struct Aws {
    dir: TempDir,
    cert_der: Vec<u8>,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `openssl req -x509 -newkey <newkey>`, the certificate in DER.
fn aws_with(newkey: &[&str]) -> Aws {
    let dir = TempDir::new().unwrap();
    let mut args = vec![
        "req",
        "-x509",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=test AWS",
    ];
    args.extend_from_slice(newkey);
    args.extend_from_slice(&["-keyout", "key.pem", "-outform", "DER", "-out", "cert.der"]);
    openssl(dir.path(), &args);
    Aws {
        cert_der: std::fs::read(dir.path().join("cert.der")).unwrap(),
        key: dir.path().join("key.pem"),
        dir,
    }
}

pub(crate) fn aws() -> Aws {
    aws_with(&["-newkey", "rsa:2048"])
}

impl Aws {
    /// AWS's base64 `signature` of `document`: RSA PKCS#1 v1.5 over its `digest`, wrapped at
    /// 64 columns by `openssl base64` as the metadata service wraps it.
    fn sign_with(&self, document: &str, digest: &str) -> String {
        let doc = self.dir.path().join("doc.json");
        std::fs::write(&doc, document).unwrap();
        let key = self.key.to_str().unwrap();
        openssl(
            self.dir.path(),
            &["dgst", digest, "-sign", key, "-out", "sig.bin", "doc.json"],
        );
        let wrapped = openssl(self.dir.path(), &["base64", "-in", "sig.bin"]);
        String::from_utf8(wrapped).unwrap()
    }

    pub(crate) fn sign(&self, document: &str) -> String {
        self.sign_with(document, "-sha256")
    }

    pub(crate) fn attestor(&self) -> AwsIidAttestor {
        AwsIidAttestor::new(vec![self.cert_der.clone()], AGE).unwrap()
    }
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// An instance identity document as the metadata service serves it, with `instance_id` and
/// `pending` put in.
pub(crate) fn document_for(instance_id: &str, pending: SystemTime) -> String {
    format!(
        r#"{{
  "accountId" : "{ACCOUNT}",
  "architecture" : "x86_64",
  "availabilityZone" : "us-east-1a",
  "billingProducts" : null,
  "devpayProductCodes" : null,
  "marketplaceProductCodes" : null,
  "imageId" : "ami-0abcdef1234567890",
  "instanceId" : "{instance_id}",
  "instanceType" : "t3.micro",
  "kernelId" : null,
  "pendingTime" : "{}",
  "privateIp" : "10.0.1.17",
  "ramdiskId" : null,
  "region" : "us-east-1",
  "version" : "2017-09-30"
}}"#,
        rfc3339(pending)
    )
}

fn evidence(document: &str, signature: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({"document": document, "signature": signature})).unwrap()
}

/// A launch time a minute ago, whole seconds as AWS writes it, and "now".
pub(crate) fn times() -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    let pending = humantime::parse_rfc3339(&rfc3339(now - Duration::from_secs(60))).unwrap();
    (pending, now)
}

fn assert_refused(result: Result<ProvenNode, AttestError>, words: &str) {
    match result {
        Err(AttestError::Refused { attestor, reason }) => {
            assert_eq!(attestor, NAME);
            assert!(reason.contains(words), "{reason}");
        }
        other => panic!("expected a refusal about {words:?}, got {other:?}"),
    }
}

fn assert_malformed(result: Result<ProvenNode, AttestError>, words: &str) {
    match result {
        Err(AttestError::Malformed { attestor, reason }) => {
            assert_eq!(attestor, NAME);
            assert!(reason.contains(words), "{reason}");
        }
        other => panic!("expected malformed evidence about {words:?}, got {other:?}"),
    }
}

#[test]
fn a_signed_document_proves_the_instance_with_spires_id_and_selectors() {
    let aws = aws();
    let (pending, now) = times();
    let document = document_for(INSTANCE, pending);
    let begun = aws
        .attestor()
        .begin(&evidence(&document, &aws.sign(&document)), now)
        .unwrap();
    let Begun::Claim(NodeClaim::Proven(node)) = begun else {
        panic!("aws_iid decides at once, got {begun:?}");
    };
    assert_eq!(node.node_id, NODE_ID);
    let selectors: Vec<&str> = node.selectors.iter().map(Selector::as_str).collect();
    assert_eq!(
        selectors,
        [
            "aws_iid:account_id:123456789012",
            "aws_iid:az:us-east-1a",
            "aws_iid:image:id:ami-0abcdef1234567890",
            "aws_iid:instance:id:i-1234567890abcdef0",
            "aws_iid:region:us-east-1",
        ]
    );
    // The document bounds replay by its age, not by single use: the instance re-attests
    // with the same document.
    assert_eq!(node.single_use, None);
}

#[test]
fn a_1024_bit_key_like_aws_signature_certificate_verifies() {
    let aws = aws_with(&["-newkey", "rsa:1024"]);
    let (pending, now) = times();
    let document = document_for(INSTANCE, pending);
    let node = aws
        .attestor()
        .verify(&evidence(&document, &aws.sign(&document)), now)
        .unwrap();
    assert_eq!(node.node_id, NODE_ID);
}

#[test]
fn another_certificates_signature_is_refused() {
    let (aws, other) = (aws(), aws());
    let (pending, now) = times();
    let document = document_for(INSTANCE, pending);
    let by_aws = evidence(&document, &aws.sign(&document));
    let by_other = evidence(&document, &other.sign(&document));
    assert!(aws.attestor().verify(&by_aws, now).is_ok());
    assert_refused(
        aws.attestor().verify(&by_other, now),
        "does not verify with any configured AWS certificate",
    );
    // Any configured certificate will do: one per region.
    let both =
        AwsIidAttestor::new(vec![aws.cert_der.clone(), other.cert_der.clone()], AGE).unwrap();
    assert!(both.verify(&by_other, now).is_ok());
}

#[test]
fn a_sha1_signature_by_the_right_key_is_refused() {
    let aws = aws();
    let (pending, now) = times();
    let document = document_for(INSTANCE, pending);
    let sha256 = evidence(&document, &aws.sign_with(&document, "-sha256"));
    let sha1 = evidence(&document, &aws.sign_with(&document, "-sha1"));
    assert!(aws.attestor().verify(&sha256, now).is_ok());
    assert_refused(aws.attestor().verify(&sha1, now), "does not verify");
}

#[test]
fn a_document_changed_after_signing_is_refused() {
    let aws = aws();
    let (pending, now) = times();
    let document = document_for(INSTANCE, pending);
    let signature = aws.sign(&document);
    assert!(
        aws.attestor()
            .verify(&evidence(&document, &signature), now)
            .is_ok()
    );
    let forged = document.replace(INSTANCE, "i-0fedcba0987654321");
    assert_refused(
        aws.attestor().verify(&evidence(&forged, &signature), now),
        "does not verify",
    );
    // Even a change JSON ignores: the signature covers the exact bytes.
    let reformatted = document.replace(" : ", ": ");
    assert_refused(
        aws.attestor()
            .verify(&evidence(&reformatted, &signature), now),
        "does not verify",
    );
}

#[test]
fn a_stale_document_is_refused() {
    let aws = aws();
    let (pending, _) = times();
    let document = document_for(INSTANCE, pending);
    let signed = evidence(&document, &aws.sign(&document));
    let attestor = aws.attestor();
    assert!(attestor.verify(&signed, pending + AGE).is_ok());
    assert_refused(
        attestor.verify(&signed, pending + AGE + Duration::from_secs(1)),
        "the document is stale",
    );
}

#[test]
fn a_document_from_beyond_the_clock_skew_is_refused() {
    let aws = aws();
    let (pending, _) = times();
    let document = document_for(INSTANCE, pending);
    let signed = evidence(&document, &aws.sign(&document));
    let attestor = aws.attestor();
    assert!(attestor.verify(&signed, pending - CLOCK_SKEW).is_ok());
    assert_refused(
        attestor.verify(&signed, pending - CLOCK_SKEW - Duration::from_secs(1)),
        "in the future",
    );
}

#[test]
fn malformed_evidence_and_documents_are_refused() {
    let aws = aws();
    let (pending, now) = times();
    let document = document_for(INSTANCE, pending);
    let signature = aws.sign(&document);
    let attestor = aws.attestor();
    assert!(
        attestor
            .verify(&evidence(&document, &signature), now)
            .is_ok()
    );

    assert_malformed(attestor.verify(b"{\"document\": ", now), "JSON ends early");
    assert_malformed(attestor.verify(b"not json", now), "not JSON");
    assert_malformed(
        attestor.verify(br#"{"document": "x"}"#, now),
        "missing field `signature`",
    );
    assert_malformed(
        attestor.verify(&evidence(&document, "not base64!"), now),
        "not standard base64",
    );
    // A document AWS would never sign, signed: its JSON is checked after the signature.
    let not_json = "{\"accountId\" : \"123456789012\",";
    assert_malformed(
        attestor.verify(&evidence(not_json, &aws.sign(not_json)), now),
        "JSON ends early",
    );
    let no_pending = document.replace("pendingTime", "launchTime");
    assert_malformed(
        attestor.verify(&evidence(&no_pending, &aws.sign(&no_pending)), now),
        "missing field `pendingTime`",
    );
    let bad_time = document.replace(&rfc3339(pending), "yesterday");
    assert_malformed(
        attestor.verify(&evidence(&bad_time, &aws.sign(&bad_time)), now),
        "not an RFC 3339 UTC time",
    );
}

#[test]
fn documents_with_values_not_of_aws_form_are_refused() {
    let aws = aws();
    let (pending, now) = times();
    let attestor = aws.attestor();
    let check = |document: &str| attestor.verify(&evidence(document, &aws.sign(document)), now);
    let document = document_for(INSTANCE, pending);
    assert!(check(&document).is_ok());

    for (bad_id, words) in [
        ("i-../../etc", "instanceId"),
        ("i-ABCDEF", "instanceId"),
        ("i-", "instanceId"),
        ("1234567890abcdef0", "instanceId"),
    ] {
        assert_malformed(check(&document_for(bad_id, pending)), words);
    }
    for (from, to, words) in [
        ("\"123456789012\"", "\"12345678901\"", "accountId"),
        ("\"123456789012\"", "\"12345678901x\"", "accountId"),
        ("\"us-east-1\"", "\"us-east-1/x\"", "region"),
        ("\"us-east-1\"", "\"\"", "region"),
        ("\"us-east-1a\"", "\"us east 1a\"", "availabilityZone"),
        ("ami-0abcdef1234567890", "ami-0abc:x", "imageId"),
        ("ami-0abcdef1234567890", "0abcdef1234567890", "imageId"),
    ] {
        let bad = document.replace(from, to);
        assert_ne!(bad, document);
        assert_malformed(check(&bad), words);
    }
}

#[test]
fn evidence_over_64_kib_is_refused() {
    let aws = aws();
    let (pending, now) = times();
    let document = document_for(INSTANCE, pending);
    let mut signed = evidence(&document, &aws.sign(&document));
    // JSON whitespace pads the evidence to exactly the limit, which is accepted.
    signed.resize(MAX_EVIDENCE, b' ');
    assert!(aws.attestor().verify(&signed, now).is_ok());
    signed.push(b' ');
    assert_malformed(aws.attestor().verify(&signed, now), "over 64 KiB");
    let mib = vec![b' '; 1024 * 1024];
    assert_malformed(aws.attestor().verify(&mib, now), "over 64 KiB");
}

#[test]
fn the_configuration_needs_rsa_certificates_and_an_age() {
    let aws = aws();
    assert!(AwsIidAttestor::new(vec![aws.cert_der.clone()], AGE).is_ok());
    assert_eq!(
        AwsIidAttestor::new(vec![], AGE).unwrap_err(),
        AwsIidConfigError::NoCertificate
    );
    assert_eq!(
        AwsIidAttestor::new(vec![aws.cert_der.clone()], Duration::ZERO).unwrap_err(),
        AwsIidConfigError::ZeroAge
    );
    assert!(matches!(
        AwsIidAttestor::new(vec![aws.cert_der.clone(), b"garbage".to_vec()], AGE),
        Err(AwsIidConfigError::Unparsable { index: 2, .. })
    ));
    let ec = aws_with(&["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]);
    assert!(matches!(
        AwsIidAttestor::new(vec![ec.cert_der], AGE),
        Err(AwsIidConfigError::NotRsa { index: 1, found }) if found.contains("elliptic")
    ));
    let small = aws_with(&["-newkey", "rsa:512"]);
    assert!(matches!(
        AwsIidAttestor::new(vec![small.cert_der], AGE),
        Err(AwsIidConfigError::NotRsa { found, .. }) if found.contains("512-bit")
    ));
}

#[test]
fn the_agent_reads_its_evidence_from_files() {
    let aws = aws();
    let (pending, now) = times();
    let document = document_for(INSTANCE, pending);
    let dir = TempDir::new().unwrap();
    let (doc_path, sig_path) = (dir.path().join("document"), dir.path().join("signature"));
    std::fs::write(&doc_path, &document).unwrap();
    std::fs::write(&sig_path, aws.sign(&document)).unwrap();
    let agent = AwsIidEvidence::from_files(&doc_path, &sig_path);
    assert_eq!(agent.name(), NAME);
    assert!(agent.can_reattest());
    let node = aws
        .attestor()
        .verify(&agent.evidence().unwrap(), now)
        .unwrap();
    assert_eq!(node.node_id, NODE_ID);

    let missing = AwsIidEvidence::from_files(dir.path().join("nope"), &sig_path);
    assert!(matches!(
        missing.evidence(),
        Err(AttestError::Unavailable { reason, .. }) if reason.contains("nope")
    ));
    std::fs::write(&doc_path, vec![b' '; MAX_EVIDENCE + 1]).unwrap();
    assert!(matches!(
        agent.evidence(),
        Err(AttestError::Unavailable { reason, .. }) if reason.contains("over 64 KiB")
    ));
}

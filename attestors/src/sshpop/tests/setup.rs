//! The operator's side of sshpop's setup: the CA list the server is given and the files the agent
//! reads, each mistake named with the entry or path at fault.

use super::*;

#[test]
fn the_ca_list_takes_pub_files_and_refuses_nothing_usable() {
    let pki = Pki::new();
    pki.key("ca", "ed25519");
    pki.key("ca2", "ecdsa");
    pki.key("host", "ed25519");
    let ca = std::fs::read_to_string(pki.path("ca.pub")).unwrap();
    let ca2 = std::fs::read_to_string(pki.path("ca2.pub")).unwrap();
    // Two keys in one entry, with a comment and a blank line, as a bundle file holds them.
    let bundle = format!("# fleet CAs\n{ca}\n\n{ca2}");
    let attestor = SshPopAttestor::new(&[bundle]).unwrap();
    let by_ca2 = pki.certify("ca2", "host", "web", &HOST_ARGS);
    assert!(attest(&attestor, &pki.evidence(&by_ca2, "host")).is_ok());
    // An RSA CA signs with rsa-sha2-512, as ssh-keygen does by default.
    pki.key("ca3", "rsa");
    let by_ca3 = pki.certify("ca3", "host", "web3", &HOST_ARGS);
    let ca3 = std::fs::read_to_string(pki.path("ca3.pub")).unwrap();
    assert!(is_refused(
        &attest(&attestor, &pki.evidence(&by_ca3, "host")),
        "not in cert_authorities"
    ));
    let with_rsa = SshPopAttestor::new(&[ca.clone(), ca3]).unwrap();
    assert!(attest(&with_rsa, &pki.evidence(&by_ca3, "host")).is_ok());

    assert_eq!(
        SshPopAttestor::new(&[]).unwrap_err(),
        SshPopConfigError::NoAuthority
    );
    assert_eq!(
        SshPopAttestor::new(&["# only a comment\n\n".into()]).unwrap_err(),
        SshPopConfigError::NoAuthority
    );
    let err = SshPopAttestor::new(&[ca.clone(), "ssh-ed25519 AAAAnotbase64".into()]).unwrap_err();
    assert!(
        matches!(
            err,
            SshPopConfigError::Unparsable {
                entry: 2,
                line: 1,
                ..
            }
        ),
        "{err:?}"
    );
    // A certificate is not a CA key.
    let cert = std::fs::read_to_string(&by_ca2).unwrap();
    assert!(matches!(
        SshPopAttestor::new(&[cert]).unwrap_err(),
        SshPopConfigError::Unparsable { .. }
    ));
    assert!(err.to_string().contains("entry 2, line 1"));
}

#[test]
fn the_agent_says_which_file_is_wrong() {
    let (pki, _attestor, evidence) = fixture("ed25519");
    assert!(evidence.evidence().is_ok(), "positive control");
    assert!(evidence.answer(&[1; NONCE_LEN]).is_ok(), "positive control");
    let cert = pki.path("web-cert.pub");
    let unavailable = |e: SshPopEvidence, words: &str| {
        let got = e.evidence();
        assert!(
            matches!(&got, Err(AttestError::Unavailable { reason, .. }) if reason.contains(words)),
            "{words}: {got:?}"
        );
    };

    unavailable(
        pki.evidence(&pki.path("missing-cert.pub"), "host"),
        "missing-cert.pub",
    );
    unavailable(pki.evidence(&cert, "missing"), "missing");
    unavailable(
        pki.evidence(&pki.path("host.pub"), "host"),
        "not an OpenSSH certificate",
    );
    unavailable(
        pki.evidence(&cert, "host.pub"),
        "not an OpenSSH private key",
    );
    pki.key("other", "ed25519");
    unavailable(pki.evidence(&cert, "other"), "is not the key certified by");
    ssh_keygen(
        pki.dir.path(),
        &["-q", "-t", "ed25519", "-N", "secret", "-f", "locked"],
    );
    let locked_cert = pki.certify("ca", "locked", "locked_web", &HOST_ARGS);
    unavailable(pki.evidence(&locked_cert, "locked"), "encrypted");

    let got = evidence.answer(b"short");
    assert!(is_malformed(&got, "5 bytes"), "{got:?}");
}

//! Node PKI made by the openssl command line, as an operator's would be: a CA and node
//! certificates with their keys, written as PEM files into a directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A certificate and its key, as files.
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    /// The certificate's SHA-1 fingerprint, lowercase hex (SPIRE's x509pop node ID and CA
    /// fingerprint selector), as openssl computes it.
    pub fn sha1(&self) -> String {
        let out = openssl(&[
            "x509",
            "-in",
            &self.cert.display().to_string(),
            "-noout",
            "-fingerprint",
            "-sha1",
        ]);
        out.trim()
            .rsplit('=')
            .next()
            .expect("a fingerprint")
            .replace(':', "")
            .to_lowercase()
    }

    /// The certificate's serial number, lowercase hex, as openssl prints it.
    pub fn serial(&self) -> String {
        let out = openssl(&[
            "x509",
            "-in",
            &self.cert.display().to_string(),
            "-noout",
            "-serial",
        ]);
        out.trim().trim_start_matches("serial=").to_lowercase()
    }
}

fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A self-signed P-256 CA named `name` in `dir`.
pub fn ca(dir: &Path, name: &str) -> CertFiles {
    let files = CertFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-days",
        "2",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout",
        &files.key.display().to_string(),
        "-out",
        &files.cert.display().to_string(),
    ]);
    files
}

/// A node certificate for client authentication, CN `cn` and DNS SAN `<cn>.example`, issued
/// by `ca`, with a new P-256 key, named `name` in `dir`.
pub fn node(dir: &Path, ca: &CertFiles, name: &str, cn: &str) -> CertFiles {
    let files = CertFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
    };
    let csr = dir.join(format!("{name}.csr"));
    let ext = dir.join(format!("{name}.ext"));
    std::fs::write(
        &ext,
        format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=clientAuth\nsubjectAltName=DNS:{cn}.example\n"
        ),
    )
    .expect("write the extensions file");
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-subj",
        &format!("/CN={cn}"),
        "-keyout",
        &files.key.display().to_string(),
        "-out",
        &csr.display().to_string(),
    ]);
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr.display().to_string(),
        "-CA",
        &ca.cert.display().to_string(),
        "-CAkey",
        &ca.key.display().to_string(),
        "-set_serial",
        // A first digit of 1 keeps the DER INTEGER free of a leading zero byte, so the
        // serial selector and openssl print the same digits.
        &format!("0x1{}", &crate::common::random_hex()[..15]),
        "-days",
        "1",
        "-extfile",
        &ext.display().to_string(),
        "-out",
        &files.cert.display().to_string(),
    ]);
    files
}

//! The `mtls` feature on its own (`cargo nextest run --no-default-features --features mtls`):
//! what a service that only verifies peers builds, with no server, agent, CA or store. The
//! test PKI is made here with rcgen; handshakes run over real TCP sockets with
//! `mtls::server_config` and `mtls::client_config`, and the Workload API client is tried
//! against a socket where no agent listens.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use mayfly::id::{Scope, TrustDomain};
use mayfly::mtls::{self, IdPattern, MtlsError, PeerPolicy, SvidSource, VerifiedPeer};
use mayfly::svid::Bundles;
use rcgen::string::Ia5String;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// A trust domain's CA: its certificate and the issuer that signs leaves with it.
struct Ca {
    cert: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(trust_domain: &str) -> Self {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri(&format!("spiffe://{trust_domain}"))];
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{trust_domain} CA"));
        params.serial_number = Some(SerialNumber::from_slice(&[1]));
        let cert = params.self_signed(&key).unwrap();
        Self {
            cert: cert.der().clone(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf of the X509-SVID profile for `id`: its chain and PKCS#8 key.
    fn leaf(&self, id: &str) -> (Vec<CertificateDer<'static>>, Vec<u8>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.subject_alt_names = vec![uri(id)];
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Mayfly");
        params.serial_number = Some(SerialNumber::from_slice(&[0x42, 7, 9]));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::minutes(5);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (vec![cert.der().clone()], key.serialize_der())
    }
}

fn uri(s: &str) -> SanType {
    SanType::URI(Ia5String::try_from(s).unwrap())
}

fn bundles(cas: &[(&str, &Ca)]) -> Bundles {
    cas.iter()
        .map(|(td, ca)| (TrustDomain::new(td).unwrap(), vec![ca.cert.clone()]))
        .collect()
}

const SERVER_ID: &str = "spiffe://acme.test/svc/payments";
const READER_ID: &str = "spiffe://acme.test/agents/bot/scope/stripe.read.customers";

/// One handshake on a real TCP socket: the server's view of the peer, or why either side
/// failed.
async fn handshake(
    server: rustls::ServerConfig,
    client: rustls::ClientConfig,
) -> Result<VerifiedPeer, String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(server));
    let server_side = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let peer = mtls::peer_of(tls.get_ref().1).ok_or("no verified peer")?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        tls.write_all(&byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(peer)
    });
    let connector = TlsConnector::from(Arc::new(client));
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
        let name = ServerName::try_from("payments.acme.test").unwrap();
        let mut tls = connector
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        // TLS 1.3 client certificates are judged after the client's handshake ends: a round
        // trip shows whether the server accepted this one.
        tls.write_all(b"x").await.map_err(|e| e.to_string())?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(())
    };
    let client_result = tokio::time::timeout(Duration::from_secs(10), client_side)
        .await
        .expect("the client side hung");
    let server_result = tokio::time::timeout(Duration::from_secs(10), server_side)
        .await
        .expect("the server side hung")
        .unwrap();
    client_result.map_err(|e| format!("client: {e}"))?;
    server_result.map_err(|e| format!("server: {e}"))
}

struct Fixture {
    acme: Ca,
    server: SvidSource,
}

impl Fixture {
    fn new() -> Self {
        let acme = Ca::new("acme.test");
        let (chain, key) = acme.leaf(SERVER_ID);
        let server = SvidSource::from_parts(chain, &key, bundles(&[("acme.test", &acme)])).unwrap();
        Self { acme, server }
    }

    fn client(&self, issuer: &Ca, id: &str) -> rustls::ClientConfig {
        let (chain, key) = issuer.leaf(id);
        let source =
            SvidSource::from_parts(chain, &key, bundles(&[("acme.test", &self.acme)])).unwrap();
        let expected = PeerPolicy::exact(mayfly::id::SpiffeId::parse(SERVER_ID).unwrap()).unwrap();
        mtls::client_config(&source, expected).unwrap()
    }

    fn server_requiring(&self, scope: &str) -> rustls::ServerConfig {
        let policy = PeerPolicy::ids([IdPattern::parse("spiffe://acme.test/agents/*").unwrap()])
            .unwrap()
            .require_scope(Scope::parse(scope).unwrap());
        mtls::server_config(&self.server, policy).unwrap()
    }
}

#[tokio::test]
async fn a_peer_with_the_required_scope_is_admitted_and_one_without_it_is_refused() {
    let f = Fixture::new();

    // Positive control: the scope the listener requires is in the client's SVID.
    let peer = handshake(
        f.server_requiring("stripe:read:customers"),
        f.client(&f.acme, READER_ID),
    )
    .await
    .expect("a reader is admitted where reading is required");
    assert_eq!(peer.id.to_string(), READER_ID);
    assert!(peer.not_after > SystemTime::now());

    // The same client and fixture, where writing is required: refused in the handshake.
    let refused = handshake(
        f.server_requiring("stripe:write:refunds"),
        f.client(&f.acme, READER_ID),
    )
    .await;
    assert!(refused.is_err(), "a reader must not pass as a writer");
}

#[tokio::test]
async fn a_peer_from_a_trust_domain_without_a_bundle_is_refused() {
    let f = Fixture::new();
    let other = Ca::new("other.test");
    // Positive control on the same fixture: the acme client passes.
    handshake(
        f.server_requiring("stripe:read:customers"),
        f.client(&f.acme, READER_ID),
    )
    .await
    .expect("the acme reader is admitted");
    // A certificate naming the acme ID but signed by a CA the server does not trust for acme.
    let forged = handshake(
        f.server_requiring("stripe:read:customers"),
        f.client(&other, READER_ID),
    )
    .await;
    assert!(
        forged.is_err(),
        "an acme ID signed by another CA is refused"
    );
}

#[tokio::test]
async fn a_source_with_no_agent_behind_its_socket_is_not_ready_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let socket: PathBuf = dir.path().join("agent.sock");
    let waited = Duration::from_millis(300);
    let err = SvidSource::connect(&socket, waited).await.unwrap_err();
    assert!(
        matches!(err, MtlsError::NotReady { waited: w, .. } if w == waited),
        "{err:?}"
    );
}

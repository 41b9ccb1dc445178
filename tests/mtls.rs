//! Mutual TLS: a client certificate for a token endpoint (RFC 8705 `tls_client_auth`) and
//! for a route's upstream, against loopback rustls servers that require one. A certificate
//! that has expired, a key that is not the certificate's, or half a pair are config errors
//! naming the key.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{CertificateParams, ExtendedKeyUsagePurpose};
use support::*;
use token_proxy::testkit::{token_server_tls, upstream_server_tls, MockUpstream};

/// A CA; a server certificate for 127.0.0.1 and one client certificate (valid, expired).
struct Pki {
    ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    expired_cert: PathBuf,
    expired_key: PathBuf,
    server: rustls::ServerConfig,
}

fn pki(dir: &Path) -> Pki {
    let ca = TestCa::new("mtls test CA");
    let (server, server_key) = ca.server();
    let client = |not_after: Option<(i32, u8, u8)>| {
        let mut params = CertificateParams::new(vec!["client.example".into()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let (cert, key) = ca.sign(params);
        (cert.pem(), key.serialize_pem())
    };
    let (cert, key) = client(None);
    let (old_cert, old_key) = client(Some((2021, 1, 1)));
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.cert.der().clone()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![server.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(server_key.serialize_der().into()),
        )
        .unwrap();
    Pki {
        ca: write_file(dir, "ca.pem", &ca.cert.pem()),
        client_cert: write_file(dir, "client.crt", &cert),
        client_key: write_file(dir, "client.key", &key),
        expired_cert: write_file(dir, "expired.crt", &old_cert),
        expired_key: write_file(dir, "expired.key", &old_key),
        server,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_for_the_token_endpoint_and_an_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let world = World::new(Duration::from_secs(300)).await;
    // The provider and a second API both demand a client certificate.
    let idp = token_server_tls(world.auth.clone(), pki.server.clone()).await;
    let secure = MockUpstream::new("secure", Some(world.auth.clone()));
    let secure_server = upstream_server_tls(secure.clone(), pki.server.clone()).await;
    let cert_lines = format!(
        "ca_file = \"{}\"\ntls_client_cert_file = \"{}\"\ntls_client_key_file = \"{}\"\n",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let routes = format!(
        "[[routes]]\nname = \"mtls\"\nprefix = \"/mtls\"\nupstream = \"{}\"\ncredential = \"main\"\n{cert_lines}\
         [[routes]]\nname = \"nocert\"\nprefix = \"/nocert\"\nupstream = \"{}\"\ncredential = \"main\"\nca_file = \"{}\"\n",
        secure_server.url,
        secure_server.url,
        pki.ca.display()
    );
    // RFC 8705 tls_client_auth: the certificate authenticates the client; no secret.
    let toml = world
        .config(&routes, &cert_lines)
        .replace(&world.idp.url, &idp.url)
        .replace("client_secret = \"client-secret-value-123\"\n", "")
        .replace(
            "grant = \"refresh_token\"",
            "grant = \"client_credentials\"",
        );
    let app = start(&toml).await;
    let r = get(&url(&app, "/mtls/x")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(secure.seen().len(), 1);
    let request = &world.auth.requests()[0];
    assert_eq!(request.params["client_id"], "cid");
    assert!(!request.params.contains_key("client_secret"));
    // The same server, a route without a certificate: the handshake is refused.
    let r = get(&url(&app, "/nocert/x")).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(secure.seen().len(), 1);
    app.stop().await;
}

#[test]
fn bad_client_certificates_are_config_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let base = |lines: &str| {
        format!("[[routes]]\nprefix = \"/\"\nupstream = \"https://api.example.com\"\n{lines}")
    };
    let pair = |c: &Path, k: &Path| {
        format!(
            "tls_client_cert_file = \"{}\"\ntls_client_key_file = \"{}\"",
            c.display(),
            k.display()
        )
    };
    let cases = [
        (
            pair(&pki.expired_cert, &pki.expired_key),
            "routes[0].tls_client_cert_file: the certificate in",
        ),
        (
            pair(&pki.client_cert, &pki.expired_key),
            "routes[0].tls_client_key_file",
        ),
        (
            format!("tls_client_cert_file = \"{}\"", pki.client_cert.display()),
            "routes[0].tls_client_key_file: required",
        ),
        (
            pair(Path::new("/nonexistent.crt"), &pki.client_key),
            "routes[0].tls_client_cert_file: cannot read",
        ),
    ];
    for (lines, expected) in cases {
        let e = token_proxy::config::Config::parse(&base(&lines), &|_| None).unwrap_err();
        assert!(e.to_string().contains(expected), "{lines}: {e}");
    }
    let e = token_proxy::config::Config::parse(
        &base(&pair(&pki.expired_cert, &pki.expired_key)),
        &|_| None,
    )
    .unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    token_proxy::config::Config::parse(&base(&pair(&pki.client_cert, &pki.client_key)), &|_| None)
        .unwrap();
}

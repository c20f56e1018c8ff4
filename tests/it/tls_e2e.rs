//! TLS on the listeners: OTLP/HTTP and OTLP/gRPC need a client certificate signed by the
//! configured CA; the admin port serves TLS without one; plain-text clients get nowhere.

use crate::common;
use std::path::PathBuf;

use chrono::Utc;
use common::Service;
use common::spans::Spans;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType,
};

pub(crate) struct Pki {
    ca: String,
    client_cert: String,
    client_key: String,
    /// Holds `ca.pem`, `server.pem` and `server.key`.
    pub(crate) dir: PathBuf,
}

/// A CA, a server certificate for localhost / 127.0.0.1 and a client certificate, as PEM files.
pub(crate) fn pki(name: &str) -> Pki {
    let dir = std::env::temp_dir().join(format!("toolsight-tls-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);

    let server_key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    server
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let server_cert = server.signed_by(&server_key, &issuer).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut client = CertificateParams::new(vec!["mcp-server".to_string()]).unwrap();
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &issuer).unwrap();

    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert.pem()).unwrap();
    std::fs::write(dir.join("server.key"), server_key.serialize_pem()).unwrap();
    Pki {
        ca: ca.pem(),
        client_cert: client_cert.pem(),
        client_key: client_key.serialize_pem(),
        dir,
    }
}

fn body() -> Vec<u8> {
    let mut s = Spans::new();
    s.tool("lookup", Utc::now(), 20, false, vec![]);
    s.body()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_over_tls_with_client_certificates() {
    toolsight::install_crypto_provider();
    let p = pki("mtls");
    let dir = p.dir.clone();
    let svc = Service::start_with("tls", move |c| {
        c.tls.cert_file = Some(dir.join("server.pem"));
        c.tls.key_file = Some(dir.join("server.key"));
        c.tls.client_ca_file = Some(dir.join("ca.pem"));
    })
    .await;
    let ca = reqwest::Certificate::from_pem(p.ca.as_bytes()).unwrap();
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", p.client_cert, p.client_key).as_bytes())
            .unwrap();
    let url = format!("https://localhost:{}/v1/traces", svc.http.port());
    let post = |client: reqwest::Client, url: String| async move {
        client
            .post(url)
            .header("content-type", "application/json")
            .body(body())
            .send()
            .await
    };

    // With the client certificate: stored.
    let with_cert = reqwest::Client::builder()
        .tls_certs_only([ca.clone()])
        .identity(identity)
        .build()
        .unwrap();
    let r = post(with_cert, url.clone()).await.unwrap();
    assert_eq!(r.status(), 200);
    // Without one, the handshake is refused; plain HTTP gets no answer either.
    let without = reqwest::Client::builder()
        .tls_certs_only([ca.clone()])
        .build()
        .unwrap();
    assert!(post(without, url.clone()).await.is_err());
    let plain = post(reqwest::Client::new(), svc.http_url()).await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());

    // gRPC with the client certificate.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&p.ca))
        .identity(tonic::transport::Identity::from_pem(
            &p.client_cert,
            &p.client_key,
        ))
        .domain_name("localhost");
    let channel =
        tonic::transport::Channel::from_shared(format!("https://localhost:{}", svc.grpc.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap();
    let req: ExportTraceServiceRequest = serde_json::from_slice(&body()).unwrap();
    TraceServiceClient::new(channel).export(req).await.unwrap();
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 2);

    // The admin port: TLS, no client certificate needed.
    let admin = reqwest::Client::builder()
        .tls_certs_only([ca])
        .build()
        .unwrap()
        .get(format!("https://localhost:{}/readyz", svc.admin.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(admin.status(), 200);
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_handshake_stall_nobody_and_are_closed() {
    toolsight::install_crypto_provider();
    let p = pki("stall");
    let dir = p.dir.clone();
    let svc = Service::start_with("tls_stall", move |c| {
        c.tls.cert_file = Some(dir.join("server.pem"));
        c.tls.key_file = Some(dir.join("server.key"));
        c.tls.client_ca_file = Some(dir.join("ca.pem"));
        c.otlp.idle_timeout = std::time::Duration::from_secs(60);
        // Metrics read in plain text.
        c.tls.plain_admin = true;
    })
    .await;
    // 300 TCP connections on each OTLP port that never start a handshake.
    let mut idle = Vec::new();
    for port in [svc.http, svc.grpc] {
        for _ in 0..300 {
            idle.push(tokio::net::TcpStream::connect(port).await.unwrap());
        }
    }
    let ca = reqwest::Certificate::from_pem(p.ca.as_bytes()).unwrap();
    let identity =
        reqwest::Identity::from_pem(format!("{}{}", p.client_cert, p.client_key).as_bytes())
            .unwrap();
    let client = reqwest::Client::builder()
        .tls_certs_only([ca])
        .identity(identity)
        .build()
        .unwrap();
    let r = client
        .post(format!("https://localhost:{}/v1/traces", svc.http.port()))
        .header("content-type", "application/json")
        .body(body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The export did not wait for the stalled handshakes to time out: none has yet.
    let timed_out = |listener: &str| {
        format!(
            "toolsight_connections_closed_total{{listener=\"{listener}\",reason=\"handshake_timeout\"}}"
        )
    };
    assert_eq!(svc.metric(&timed_out("http")).await, 0.0);
    // Each stalled handshake is closed at its deadline, on both ports.
    for (listener, n) in [("http", 300.0), ("grpc", 300.0)] {
        common::eventually(&format!("{listener} handshakes to time out"), || async {
            (svc.metric(&timed_out(listener)).await == n).then_some(())
        })
        .await;
    }
    drop(idle);
    svc.stop().await.unwrap();
}

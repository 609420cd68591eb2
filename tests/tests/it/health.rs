//! The platform's pull endpoint: only the allowed identity from the platform's CA reads health,
//! metrics and the audit trail; everything else is refused and counted as a security event.

use std::time::Duration;

use shuyuan_tests::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_metrics_and_audit_for_the_allowed_identity_only() {
    let world = World::new();
    let other = World::new();
    let stop = CancellationToken::new();
    let dev = start_sim(shuyuan::sim::pump_station(), &stop).await;
    let rx = start_receiver(&world, None).await;
    let haddr = free_addr();
    let body = format!(
        "[health]\nlisten = \"{haddr}\"\nallow = [\"platform-health\"]\n\n[[sources]]\nid = \"pump\"\nkind = \"modbus-tcp\"\naddress = \"{dev}\"\ninterval = \"100ms\"\npolicy = \"p\"\npoints = [ {{ name = \"counter\", register = \"holding\", address = 200, type = \"u32\" }} ]\n\n[policies.p]\nfields.counter = {{ action = \"keep\", grade = \"internal\" }}\n"
    );
    let gw = start_gateway(gateway_config(&world, &rx.url(), "200ms", &body));
    assert!(
        wait_until(Duration::from_secs(20), || async {
            rx.records(GATEWAY_ID).len() >= 5
        })
        .await
    );
    let p = &world.pki;

    let (status, text) = health_get(
        haddr,
        &p.ca(),
        &p.health_cert(),
        &p.health_key(),
        GATEWAY_ID,
        "/v1/health",
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["state"], "OK");
    // docs/health.schema.json stays true to the code: every documented key is there, every
    // key there is documented.
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../docs/health.schema.json"
        ))
        .unwrap(),
    )
    .unwrap();
    for key in schema["required"].as_array().unwrap() {
        assert!(
            v.get(key.as_str().unwrap()).is_some(),
            "documented key {key} missing from /v1/health"
        );
    }
    for key in v.as_object().unwrap().keys() {
        assert!(
            schema["properties"].get(key).is_some(),
            "/v1/health key {key} is not in docs/health.schema.json"
        );
    }
    assert_eq!(v["gateway"], GATEWAY_ID);
    assert!(v["sources"][0]["polls_ok"].as_u64().unwrap() >= 5);

    let (status, metrics) = health_get(
        haddr,
        &p.ca(),
        &p.health_cert(),
        &p.health_key(),
        GATEWAY_ID,
        "/metrics",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let mut samples = 0;
    for line in metrics.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        // Prometheus text format: name{labels} value
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad line {line:?}"));
        assert!(value.parse::<f64>().is_ok(), "bad value in {line:?}");
        let bare = name.split('{').next().unwrap();
        assert!(
            bare.starts_with("shuyuan_")
                && bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "bad name in {line:?}"
        );
        if let Some(labels) = name.strip_prefix(bare) {
            assert!(
                labels.is_empty() || (labels.starts_with('{') && labels.ends_with('}')),
                "bad labels in {line:?}"
            );
        }
        samples += 1;
    }
    assert!(
        samples >= 10 && metrics.contains("shuyuan_polls_ok_total{source=\"pump\"}"),
        "{metrics}"
    );

    let (status, audit) = health_get(
        haddr,
        &p.ca(),
        &p.health_cert(),
        &p.health_key(),
        GATEWAY_ID,
        "/v1/audit?after=0",
    )
    .await
    .unwrap();
    assert_eq!(status, 200);
    let a: serde_json::Value = serde_json::from_str(&audit).unwrap();
    assert_eq!(a["entries"][0]["kind"], "gateway_started");

    // An identity of the right CA but not on the list.
    let (status, _) = health_get(
        haddr,
        &p.ca(),
        &p.gateway_cert(),
        &p.gateway_key(),
        GATEWAY_ID,
        "/v1/health",
    )
    .await
    .unwrap();
    assert_eq!(status, 403);
    // Another CA's certificate: refused at the handshake (no HTTP answer).
    let r = health_get(
        haddr,
        &p.ca(),
        &other.pki.health_cert(),
        &other.pki.health_key(),
        GATEWAY_ID,
        "/v1/health",
    )
    .await;
    assert!(!matches!(r, Ok((200, _))), "{r:?}");
    // No client certificate at all: refused at the handshake.
    let refused = no_client_cert_get(haddr, &p.ca()).await;
    assert!(
        refused.is_err(),
        "answered without a client certificate: {refused:?}"
    );

    let (_, text) = health_get(
        haddr,
        &p.ca(),
        &p.health_cert(),
        &p.health_key(),
        GATEWAY_ID,
        "/v1/health",
    )
    .await
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        v["security_events"].as_u64().unwrap() >= 3,
        "refusals counted: {v}"
    );
    gw.shutdown().await.unwrap();
    let trail =
        shuyuan::outbox::admin::audit_list(&world.path().join("state"), 0, usize::MAX).unwrap();
    assert!(
        trail
            .iter()
            .filter(|e| e.kind == "security_refused")
            .count()
            >= 3,
        "refusals on the audit trail"
    );
    stop.cancel();
    rx.shutdown().await;
}

/// A TLS client that trusts the gateway but offers no certificate: the handshake, and then
/// an HTTP request, must fail.
async fn no_client_cert_get(
    addr: std::net::SocketAddr,
    ca: &std::path::Path,
) -> Result<u16, String> {
    use http_body_util::Empty;
    let mut roots = rustls::RootCertStore::empty();
    for c in shuyuan::tls::load_certs(ca).map_err(|e| e.to_string())? {
        roots.add(c).map_err(|e| e.to_string())?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(GATEWAY_ID.to_string())
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/v1/health")
        .header(hyper::header::HOST, GATEWAY_ID)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(resp.status().as_u16())
}

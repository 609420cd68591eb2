//! The reference receiver's refusals: handshakes without a good certificate, envelopes that
//! were altered or signed by someone else, and replays.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use shuyuan::keys::{load_hpke_public, Signer};
use shuyuan::seal::{seal, BatchMeta};
use shuyuan::uplink::{Ack, UplinkError};
use shuyuan_tests::*;

const BODY: &str =
    "{\"source\":\"s\",\"ts\":\"2026-11-25T00:00:00.000Z\",\"seq\":1,\"fields\":{\"v\":1}}\n";

fn envelope(world: &World, seq: u64) -> Vec<u8> {
    let signer = Signer::load(&world.pki.gateway_key()).unwrap();
    let pk = load_hpke_public(&world.pki.hpke_public()).unwrap();
    let meta = BatchMeta {
        gateway_id: GATEWAY_ID,
        seq,
        created_ms: 1_795_568_400_000,
        records: 1,
        pseudonym_key_id: "",
    };
    seal(BODY.as_bytes(), &meta, &pk, &signer, 1).unwrap()
}

fn status(e: UplinkError) -> u16 {
    match e {
        UplinkError::Status { status, .. } => status,
        other => panic!("expected an HTTP status, got {other}"),
    }
}

#[tokio::test]
async fn replayed_batch_is_acked_duplicate_and_written_once() {
    let world = World::new();
    let rx = start_receiver(&world, None).await;
    let p = &world.pki;
    let mut c = client(&p.ca(), &p.gateway_cert(), &p.gateway_key(), &rx.url());
    let env = envelope(&world, 1);
    let key = format!("{GATEWAY_ID}/1");
    assert_eq!(
        c.post_batch(&key, env.clone().into()).await.unwrap(),
        Ack::Accepted
    );
    assert_eq!(
        c.post_batch(&key, env.clone().into()).await.unwrap(),
        Ack::Duplicate
    );
    // A new connection (as after a gateway restart) is deduplicated too.
    let mut c2 = client(&p.ca(), &p.gateway_cert(), &p.gateway_key(), &rx.url());
    assert_eq!(
        c2.post_batch(&key, env.into()).await.unwrap(),
        Ack::Duplicate
    );
    assert_eq!(rx.records(GATEWAY_ID).len(), 1);
    assert_eq!(rx.stats.duplicates.load(Relaxed), 2);
    rx.shutdown().await;
}

#[tokio::test]
async fn tampered_header_or_ciphertext_gets_400_and_nothing_is_written() {
    let world = World::new();
    let rx = start_receiver(&world, None).await;
    let p = &world.pki;
    let mut c = client(&p.ca(), &p.gateway_cert(), &p.gateway_key(), &rx.url());
    let env = envelope(&world, 5);
    let mut header = env.clone();
    header[20] ^= 0x01; // created_ms
    let mut ct = env.clone();
    let at = env.len() - 90;
    ct[at] ^= 0x01;
    for bad in [header, ct] {
        let e = c
            .post_batch(&format!("{GATEWAY_ID}/5"), bad.into())
            .await
            .unwrap_err();
        assert_eq!(status(e), 400);
    }
    assert_eq!(rx.stats.rejected.load(Relaxed), 2);
    assert!(
        rx.records(GATEWAY_ID).is_empty(),
        "nothing written for a tampered batch"
    );
    // The genuine one still goes through afterwards.
    assert_eq!(
        c.post_batch(&format!("{GATEWAY_ID}/5"), env.into())
            .await
            .unwrap(),
        Ack::Accepted
    );
    rx.shutdown().await;
}

#[tokio::test]
async fn envelope_from_another_identity_is_forbidden() {
    let world = World::new();
    let rx = start_receiver(&world, None).await;
    let p = &world.pki;
    // Signed by the gateway's key but sent over the health client's certificate.
    let mut c = client(&p.ca(), &p.health_cert(), &p.health_key(), &rx.url());
    let e = c
        .post_batch(&format!("{GATEWAY_ID}/1"), envelope(&world, 1).into())
        .await
        .unwrap_err();
    assert_eq!(status(e), 403);
    assert!(rx.records(GATEWAY_ID).is_empty());
    rx.shutdown().await;
}

#[tokio::test]
async fn clients_without_a_certificate_or_from_another_ca_are_refused_at_the_handshake() {
    let world = World::new();
    let other = World::new(); // a second, unrelated CA
    let rx = start_receiver(&world, None).await;
    let p = &world.pki;

    // Another CA's gateway certificate (it trusts our server, but we do not trust it).
    let mut c = client(
        &p.ca(),
        &other.pki.gateway_cert(),
        &other.pki.gateway_key(),
        &rx.url(),
    );
    let e = c
        .post_batch(&format!("{GATEWAY_ID}/1"), envelope(&world, 1).into())
        .await
        .unwrap_err();
    assert!(
        !matches!(e, UplinkError::Status { .. }),
        "refused before HTTP: {e}"
    );

    // No client certificate at all.
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        for c in shuyuan::tls::load_certs(&p.ca()).unwrap() {
            r.add(c).unwrap();
        }
        r
    };
    let cfg = rustls::ClientConfig::builder_with_provider(shuyuan::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let ep = shuyuan::uplink::Endpoint::parse(&rx.url()).unwrap();
    let mut anon =
        shuyuan::uplink::HttpClient::new(ep, std::sync::Arc::new(cfg), Duration::from_secs(5))
            .unwrap();
    let e = anon
        .post_batch(&format!("{GATEWAY_ID}/1"), envelope(&world, 1).into())
        .await
        .unwrap_err();
    assert!(
        !matches!(e, UplinkError::Status { .. }),
        "refused before HTTP: {e}"
    );

    let refused = wait_until(Duration::from_secs(5), || async {
        rx.stats.handshakes_refused.load(Relaxed) >= 2
    })
    .await;
    assert!(refused, "both handshakes counted as refused");
    assert_eq!(rx.stats.accepted.load(Relaxed), 0);
    assert!(rx.records(GATEWAY_ID).is_empty());
    rx.shutdown().await;
}

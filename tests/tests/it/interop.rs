//! The envelope read by an implementation written elsewhere: tests/interop/open_envelope.py
//! (pyhpke, cryptography, zstandard, written from docs/protocol.md) opens the committed test
//! vector and a fresh envelope sealed by this build with a dev PKI's keys.

use std::path::PathBuf;
use std::process::Command;

use shuyuan::keys::Signer;
use shuyuan::seal::BatchMeta;
use shuyuan_tests::World;

fn repo() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The venv `./test` (and CI) creates with tests/interop/requirements.txt.
fn python() -> PathBuf {
    let p = std::env::var_os("SHUYUAN_PYTHON")
        .map_or_else(|| repo().join(".venv/bin/python"), PathBuf::from);
    assert!(
        p.exists(),
        "{} is missing: run ./test (it creates the venv), or: python3 -m venv .venv && .venv/bin/pip install -r tests/interop/requirements.txt",
        p.display()
    );
    p
}

fn open_with_python(vector: &std::path::Path) -> String {
    let out = Command::new(python())
        .arg(repo().join("tests/interop/open_envelope.py"))
        .arg(vector)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "independent reader failed on {}:\n{text}",
        vector.display()
    );
    text
}

#[test]
fn python_reader_opens_the_committed_test_vector() {
    let text = open_with_python(&repo().join("docs/vectors/batch-v1.json"));
    assert!(text.contains("2 records"), "{text}");
}

#[test]
fn python_reader_opens_a_fresh_envelope_signed_with_a_gateway_certificate_key() {
    let world = World::new();
    let signer = Signer::load(&world.pki.gateway_key()).unwrap();
    let body: String = (1..=50)
        .map(|i| format!("{{\"source\":\"s\",\"ts\":\"2026-11-25T00:00:00.000Z\",\"seq\":{i},\"fields\":{{\"v\":{i}.5,\"站\":\"和平区\"}}}}\n"))
        .collect();
    let meta = BatchMeta {
        gateway_id: "GW-TEST-0001",
        seq: 9,
        created_ms: 1_795_568_400_123,
        records: 0,
        pseudonym_key_id: "0123456789abcdef",
    };
    let v = shuyuan::seal::test_vector(&body, &meta, &signer).unwrap();
    let path = world.path().join("fresh.json");
    std::fs::write(&path, v.to_string()).unwrap();
    let text = open_with_python(&path);
    assert!(text.contains("50 records"), "{text}");
}

/// A pymodbus device answers the gateway's reads; the receiver gets exactly its values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_from_a_pymodbus_device_arrive_exactly() {
    use shuyuan_tests::*;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    let world = World::new();
    let port = free_addr().port();
    let mut server = std::process::Command::new(python())
        .arg(repo().join("tests/interop/modbus_server.py"))
        .arg(port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up = wait_until(Duration::from_secs(20), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    assert!(up, "pymodbus server did not start");
    let rx = start_receiver(&world, None).await;
    let body = format!(
        r#"
[[sources]]
id = "pymodbus"
kind = "modbus-tcp"
address = "127.0.0.1:{port}"
interval = "200ms"
policy = "all"
points = [
  {{ name = "flow", register = "holding", address = 100, type = "f32", order = "CDAB" }},
  {{ name = "energy", register = "holding", address = 102, type = "i32" }},
  {{ name = "level", register = "holding", address = 104, type = "f64", order = "DCBA" }},
  {{ name = "volume", register = "holding", address = 108, type = "u32", order = "BADC" }},
  {{ name = "temp", register = "holding", address = 110, type = "i16" }},
  {{ name = "pressure", register = "input", address = 0, type = "u16", scale = 0.1 }},
  {{ name = "running", register = "coil", address = 5, type = "bool" }},
  {{ name = "door", register = "discrete", address = 2, type = "bool" }},
  {{ name = "spare", register = "coil", address = 6, type = "bool" }},
]

[policies.all]
fields.flow = {{ action = "keep", grade = "internal" }}
fields.energy = {{ action = "keep", grade = "internal" }}
fields.level = {{ action = "keep", grade = "internal" }}
fields.volume = {{ action = "keep", grade = "internal" }}
fields.temp = {{ action = "keep", grade = "internal" }}
fields.pressure = {{ action = "keep", grade = "internal" }}
fields.running = {{ action = "keep", grade = "internal" }}
fields.door = {{ action = "keep", grade = "internal" }}
fields.spare = {{ action = "keep", grade = "internal" }}
"#
    );
    let gw = start_gateway(gateway_config(&world, &rx.url(), "300ms", &body));
    let got = wait_until(Duration::from_secs(30), || async {
        rx.records(GATEWAY_ID).len() >= 5
    })
    .await;
    let stats = gw.stats.clone();
    gw.shutdown().await.unwrap();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        got,
        "no records from the pymodbus device; polls failed: {:?}",
        stats
            .sources
            .lock()
            .unwrap()
            .first()
            .map(|(_, s)| (s.polls_failed.load(Relaxed), s.last_error()))
    );
    for r in rx.records(GATEWAY_ID) {
        assert_eq!(
            r["fields"],
            serde_json::json!({
                "flow": 12.5, "energy": -123456, "level": -2.75, "volume": 3_000_000_000u64,
                "temp": -7, "pressure": 250.0, "running": true, "door": true, "spare": false
            })
        );
    }
    rx.shutdown().await;
}

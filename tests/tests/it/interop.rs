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

/// The known values' points (kind-specific lines come first) and a policy keeping them.
fn known_points(source: &str) -> String {
    format!(
        r#"
[[sources]]
id = "pymodbus"
policy = "all"
{source}
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
    )
}

/// Runs a gateway with `body` until 5 records arrive, then asserts every record holds
/// exactly the values modbus_server.py put in.
async fn assert_known_values_arrive(body: &str, mut server: std::process::Child) {
    use shuyuan_tests::*;
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::Duration;

    let world = World::new();
    let rx = start_receiver(&world, None).await;
    let gw = start_gateway(gateway_config(&world, &rx.url(), "300ms", body));
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

/// A pymodbus device answers the gateway's reads over TCP; the receiver gets exactly its
/// values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_from_a_pymodbus_device_arrive_exactly() {
    use shuyuan_tests::*;
    use std::time::Duration;

    let port = free_addr().port();
    let server = std::process::Command::new(python())
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
    let source =
        format!("kind = \"modbus-tcp\"\naddress = \"127.0.0.1:{port}\"\ninterval = \"200ms\"");
    assert_known_values_arrive(&known_points(&source), server).await;
}

/// The same device as a pymodbus RTU server at unit 5 on one end of a pty pair (8N1 at
/// 19200 baud: pyserial cannot set parity on a pty); the gateway polls it on the other end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_from_a_pymodbus_rtu_device_arrive_exactly() {
    use shuyuan_tests::*;
    use std::io::BufRead as _;

    let dir = tempfile::tempdir().unwrap();
    let pty = pty_pair(dir.path()).await;
    let mut server = std::process::Command::new(python())
        .arg(repo().join("tests/interop/modbus_server.py"))
        .args(["rtu", pty.a.to_str().unwrap(), "19200", "5"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready");
    let source = format!(
        "kind = \"modbus-rtu\"\nport = \"{}\"\nbaud = 19200\nparity = \"none\"\nunit = 5\ninterval = \"200ms\"\ntimeout = \"500ms\"",
        pty.b.display()
    );
    assert_known_values_arrive(&known_points(&source), server).await;
    drop(pty);
}

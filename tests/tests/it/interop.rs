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

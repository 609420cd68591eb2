//! The `shuyuan` binary as a user runs it: `check` on the shipped examples, exit codes,
//! `certs dev-pki` file modes.

// Test helpers: a panic here is a failed test.
#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;

fn shuyuan() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shuyuan"))
}

/// `shuyuan policy preview --json` of a policy on a sample, as parsed JSON.
fn preview_json(cfg: &Path, policy: &str, sample: &Path) -> serde_json::Value {
    let out = shuyuan()
        .args([
            "policy", "preview", "--policy", policy, "--json", "--config",
        ])
        .arg(cfg)
        .arg("--input")
        .arg(sample)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Copies an example next to a fresh dev PKI in `certs/` and a pseudonym key in `keys/`,
/// as an installation has them.
fn install_example(name: &str, dir: &Path, gateway_id: &str) -> std::path::PathBuf {
    let cfg = dir.join(name);
    std::fs::copy(repo().join("firmware-config").join(name), &cfg).unwrap();
    let out = shuyuan()
        .args(["certs", "dev-pki", "--out"])
        .arg(dir.join("certs"))
        .args(["--gateway-id", gateway_id])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let key = shuyuan()
        .args(["keys", "init", "--out"])
        .arg(dir.join("keys/pseudonym.key"))
        .output()
        .unwrap();
    assert!(
        key.status.success(),
        "{}",
        String::from_utf8_lossy(&key.stderr)
    );
    cfg
}

#[test]
fn every_example_config_passes_check() {
    let mut n = 0;
    for entry in std::fs::read_dir(repo().join("firmware-config")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let dir = tempfile::tempdir().unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let id = text
            .lines()
            .find_map(|l| l.strip_prefix("id = \""))
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_owned();
        let cfg = install_example(name, dir.path(), &id);
        let out = shuyuan()
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stdout).contains(": OK"));
        n += 1;
        // A certificate for another gateway is caught by check, not by the platform.
        let other = tempfile::tempdir().unwrap();
        let cfg = install_example(name, other.path(), "GW-SOMEONE-ELSE");
        let out = shuyuan()
            .args(["check", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("certificate CN is \"GW-SOMEONE-ELSE\"")
        );
    }
    assert!(n >= 1, "no example configs found");
}

#[test]
fn check_without_certificates_exits_64_naming_each_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("water.toml");
    std::fs::copy(repo().join("firmware-config/water.toml"), &cfg).unwrap();
    let out = shuyuan()
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    for key in ["ca file", "cert file", "key file", "recipient file"] {
        assert!(err.contains(key), "{key} not named in:\n{err}");
    }
    assert!(
        err.lines()
            .all(|l| l.starts_with(&cfg.display().to_string())),
        "{err}"
    );
}

#[test]
fn dev_pki_private_keys_are_owner_only() {
    let dir = tempfile::tempdir().unwrap();
    install_example("water.toml", dir.path(), "GW-X");
    for entry in std::fs::read_dir(dir.path().join("certs")).unwrap() {
        let p = entry.unwrap().path();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        if p.extension().is_some_and(|e| e == "key") {
            assert_eq!(mode, 0o600, "{}", p.display());
        } else {
            assert_eq!(mode & 0o077 & 0o022, 0, "{}", p.display());
        }
    }
}

#[test]
fn version_and_usage_errors() {
    let out = shuyuan().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("shuyuan "));
    let out = shuyuan().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn policy_preview_shows_what_leaves_for_a_csv_sample_and_as_json() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = install_example("water.toml", dir.path(), "GW-TJ-WATER-0001");
    let sample = repo().join("firmware-config/samples/water-billing.csv");
    let out = shuyuan()
        .args(["policy", "preview", "--policy", "customer", "--config"])
        .arg(&cfg)
        .arg("--input")
        .arg(&sample)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for want in [
        "张*",
        "138****5678",
        "110105************",
        "天津市和平区",
        "acct_",
        "2026-10",
    ] {
        assert!(text.contains(want), "{want} missing in:\n{text}");
    }
    let v = preview_json(&cfg, "customer", &sample);
    let fields = v["records"][0]["fields"].as_array().unwrap();
    let id = fields.iter().find(|f| f["name"] == "id_card").unwrap();
    assert_eq!(id["in"], "11010519491231002X");
    assert_eq!(id["out"], "110105************");
    assert_eq!(id["grade"], "sensitive");
    // The pseudonym is the same token on a second run with the same key.
    let w = preview_json(&cfg, "customer", &sample);
    assert_eq!(
        v["records"][0]["fields"][0]["out"],
        w["records"][0]["fields"][0]["out"]
    );
}

#[test]
fn transit_swipes_from_json_lines_lose_names_phones_and_exact_places() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = install_example("transit.toml", dir.path(), "GW-TJ-BUS-0003");
    let v = preview_json(
        &cfg,
        "swipes",
        &repo().join("firmware-config/samples/transit-swipes.jsonl"),
    );
    let get = |name: &str| {
        v["records"][0]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap()["out"]
            .clone()
    };
    assert!(get("holder_name").is_null() && get("holder_phone").is_null());
    assert_eq!(get("plate"), "津A*****");
    assert_eq!(get("swipe_time"), "2026-11-24");
    assert_eq!(get("boarding_lat"), "39.14");
    assert!(get("card_no").as_str().unwrap().starts_with("card_"));
}

#[test]
fn policy_preview_polls_a_live_simulated_device() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut sim = shuyuan()
        .args(["simulate", "--listen", &format!("127.0.0.1:{port}")])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the simulator to say it listens (bounded by the read of its first line).
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sim.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert!(line.starts_with("device 1"), "{line}");
    let cfg = install_example("water.toml", dir.path(), "GW-TJ-WATER-0001");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("192.168.10.21:502", &format!("127.0.0.1:{port}"));
    std::fs::write(&cfg, text).unwrap();
    let out = shuyuan()
        .args([
            "policy",
            "preview",
            "--source",
            "pump-station-3",
            "--json",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    let _ = sim.kill();
    let _ = sim.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let fields = v["records"][0]["fields"].as_array().unwrap();
    let get = |n: &str| fields.iter().find(|f| f["name"] == n).unwrap().clone();
    assert_eq!(
        get("flow_m3h")["in"],
        "118.5",
        "the simulator's pump station flow (f32 CDAB)"
    );
    assert_eq!(get("pump_running")["out"], "true");
    assert_eq!(get("meter_id")["out"], "WTR-*********17");
    assert!(get("door_open")["out"].is_null(), "dropped by rule");
}

#[test]
fn preview_of_a_file_source_reads_its_sample_with_the_sources_columns() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = install_example("water.toml", dir.path(), "GW-TJ-WATER-0001");
    let out = shuyuan()
        .args([
            "policy",
            "preview",
            "--source",
            "billing-export",
            "--json",
            "--config",
        ])
        .arg(&cfg)
        .arg("--input")
        .arg(repo().join("firmware-config/samples/water-billing.csv"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let field = |name: &str| {
        v["records"][0]["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap()
            .clone()
    };
    // Typed by the source's columns: the decimal as written, the date with its offset.
    assert_eq!(field("amount_yuan")["in"], "49.84");
    assert_eq!(field("bill_month")["in"], "2026-10-31T00:00:00+08:00");
    assert_eq!(field("bill_month")["out"], "2026-10");
    // Without --input, a file source says what it needs.
    let out = shuyuan()
        .args([
            "policy",
            "preview",
            "--source",
            "billing-export",
            "--config",
        ])
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("reads files: give --input"));
}

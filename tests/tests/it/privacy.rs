//! No raw value leaves in clear or lands on disk: the demo runs with a customer export full
//! of ID and phone numbers, logging at debug level; every log line, the demo's own output,
//! `shuyuan status` (text and JSON), the health endpoint (/v1/health, /metrics, /v1/audit),
//! every file the gateway wrote in its state directory (SQLite and WAL), and the records the
//! platform received are scanned for each raw value.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use shuyuan::demo::{DEMO_EXPORT_ROWS, DEMO_GATEWAY};
use shuyuan::sim_files::{billing_row, mobile, resident_id};
use shuyuan_tests::*;

/// Raw values sharing their first three bytes: their lengths, and the values.
type Candidates = (BTreeSet<usize>, HashSet<Vec<u8>>);

fn all_files(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            all_files(&p, out);
        } else if let Ok(b) = std::fs::read(&p) {
            out.push((p.display().to_string(), b));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_raw_value_in_logs_status_health_or_state_files() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let (out_path, err_path) = (tmp.path().join("demo.out"), tmp.path().join("demo.err"));
    let mut demo = Command::new(shuyuan_bin())
        .args(["demo", "--seconds", "12", "--dir"])
        .arg(&dir)
        .env("SHUYUAN_LOG", "debug")
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();

    // Wait for the export to be taken (the demo writes it before its config; the spool
    // empties once its records are committed).
    let (spool, config) = (dir.join("spool"), dir.join("gateway.toml"));
    let taken = wait_until(Duration::from_secs(40), || async {
        config.exists() && std::fs::read_dir(&spool).unwrap().next().is_none()
    })
    .await;
    assert!(taken, "the demo ingested its export");

    let mut seen: Vec<(String, Vec<u8>)> = Vec::new();
    for json in [false, true] {
        let mut c = Command::new(shuyuan_bin());
        c.args(["status", "--config"]).arg(&config);
        if json {
            c.arg("--json");
        }
        let o = c.stdout(Stdio::piped()).output().unwrap();
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            text.contains("billing-export"),
            "status shows the file source: {text}"
        );
        seen.push((format!("status json={json}"), o.stdout));
    }
    let toml = std::fs::read_to_string(&config).unwrap();
    let listen = toml
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    let certs = dir.join("certs");
    for path in ["/v1/health", "/metrics", "/v1/audit?after=0"] {
        let (code, body) = health_get(
            listen.parse().unwrap(),
            &certs.join("platform-ca.pem"),
            &certs.join("health-client.pem"),
            &certs.join("health-client.key"),
            DEMO_GATEWAY,
            path,
        )
        .await
        .unwrap();
        assert_eq!(code, 200, "{path}: {body}");
        seen.push((format!("health {path}"), body.into_bytes()));
    }

    let status = tokio::task::spawn_blocking(move || demo.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "the demo ends cleanly");
    seen.push(("demo stdout".into(), std::fs::read(&out_path).unwrap()));
    let log = std::fs::read(&err_path).unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("DEBUG"),
        "the log was written at debug level"
    );
    seen.push(("log".into(), log));
    all_files(&dir.join("state"), &mut seen);
    all_files(&dir.join("received"), &mut seen);
    assert!(
        seen.iter().any(|(n, _)| n.ends_with("outbox.sqlite")),
        "the store is scanned"
    );
    let received: usize = seen
        .iter()
        .filter(|(n, _)| n.contains("received"))
        .map(|(_, b)| String::from_utf8_lossy(b).matches("billing-export").count())
        .sum();
    assert_eq!(
        received as u64, DEMO_EXPORT_ROWS,
        "every customer row delivered"
    );

    // Every ID number, mobile number and street address of the export, and the demo pump's
    // duty phone; each is also searched for in GBK (the export's own encoding).
    let mut raw: Vec<String> = Vec::new();
    for n in 0..DEMO_EXPORT_ROWS {
        raw.push(resident_id(n));
        raw.push(mobile(n));
        raw.push(billing_row(n).split(',').nth(4).unwrap().to_string());
    }
    raw.push("13812345678".into());
    // Indexed by their first three bytes, so each file is scanned once.
    let mut index: HashMap<[u8; 3], Candidates> = HashMap::new();
    for value in &raw {
        for form in [
            value.as_bytes().to_vec(),
            encoding_rs::GBK.encode(value).0.into_owned(),
        ] {
            let e = index.entry([form[0], form[1], form[2]]).or_default();
            e.0.insert(form.len());
            e.1.insert(form);
        }
    }
    let scan = |files: &[(String, Vec<u8>)]| {
        let mut leaks = Vec::new();
        for (name, bytes) in files {
            for i in 0..bytes.len().saturating_sub(3) {
                let Some((lens, set)) = index.get(&[bytes[i], bytes[i + 1], bytes[i + 2]]) else {
                    continue;
                };
                for &l in lens {
                    if let Some(w) = bytes.get(i..i + l) {
                        if set.contains(w) {
                            leaks.push(format!("{} in {name}", String::from_utf8_lossy(w)));
                        }
                    }
                }
            }
        }
        leaks
    };
    // The scan finds what it looks for: in the raw export, in both encodings.
    let export = shuyuan::sim_files::billing_export(0, 3);
    let probe = [
        ("utf-8".to_string(), export.clone().into_bytes()),
        (
            "gbk".to_string(),
            encoding_rs::GBK.encode(&export).0.into_owned(),
        ),
    ];
    // Three values per row, and row 0 repeats its phone in the remark.
    assert_eq!(scan(&probe).len(), 2 * (3 * 3 + 1), "{:#?}", scan(&probe));
    let leaks = scan(&seen);
    assert!(leaks.is_empty(), "raw values found: {leaks:#?}");
}

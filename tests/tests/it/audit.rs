//! The audit trail as an operator and the platform use it: what the gateway did is there
//! (start, policy counts per sealed batch, acks), the chain verifies, and an edited row is
//! named by `shuyuan audit verify`.

use std::process::Command;
use std::time::Duration;

use shuyuan_tests::*;
use tokio_util::sync::CancellationToken;

fn cli(world: &World, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(shuyuan_bin())
        .arg("audit")
        .args(args)
        .arg("--config")
        .arg(world.path().join("gateway.toml"))
        .output()
        .unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trail_records_policy_counts_and_acks_and_an_edited_row_is_found() {
    let world = World::new();
    let stop = CancellationToken::new();
    let dev = start_sim(shuyuan::sim::pump_station(), &stop).await;
    let rx = start_receiver(&world, None).await;
    // Two points, one listed: every record has one field dropped by default deny.
    let body = format!(
        "[[sources]]\nid = \"pump\"\nkind = \"modbus-tcp\"\naddress = \"{dev}\"\ninterval = \"100ms\"\npolicy = \"p\"\npoints = [ {{ name = \"counter\", register = \"holding\", address = 200, type = \"u32\" }}, {{ name = \"flow\", register = \"holding\", address = 100, type = \"f32\" }} ]\n\n[policies.p]\nfields.counter = {{ action = \"keep\", grade = \"internal\" }}\n"
    );
    let gw = start_gateway(gateway_config(&world, &rx.url(), "200ms", &body));
    assert!(
        wait_until(Duration::from_secs(20), || async {
            rx.records(GATEWAY_ID).len() >= 10
        })
        .await
    );
    gw.shutdown().await.unwrap();
    // A second start with the same certificate does not record it again.
    let cfg = edit_gateway_config(&world, |t| t);
    start_gateway(cfg).shutdown().await.unwrap();
    stop.cancel();
    rx.shutdown().await;

    let (code, text) = cli(&world, &["verify"]);
    assert_eq!(code, Some(0), "{text}");
    let (_, json) = cli(&world, &["list", "--json"]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(entries[0]["kind"], "gateway_started");
    let installed: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["kind"] == "certificate_installed")
        .collect();
    assert_eq!(installed.len(), 1, "the certificate is recorded once");
    assert_eq!(installed[0]["detail"]["cn"], GATEWAY_ID);
    assert_eq!(installed[0]["detail"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        entries[0]["detail"]["config_digest"]
            .as_str()
            .unwrap()
            .len(),
        64,
        "the configuration's digest is on the trail"
    );
    let sealed: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["kind"] == "batches_sealed")
        .collect();
    assert!(!sealed.is_empty());
    for e in &sealed {
        let d = &e["detail"];
        assert_eq!(
            d["fields_without_rule"], d["records"],
            "one unlisted field per record, counted over the batches"
        );
        assert_eq!(d["fields_kept"], d["records"]);
    }
    // Every batch sealed is acknowledged on the record, each sequence number once.
    let seqs = |kind: &str| -> Vec<u64> {
        let mut out: Vec<u64> = entries
            .iter()
            .filter(|e| e["kind"] == kind)
            .flat_map(|e| e["detail"]["seqs"].as_array().unwrap().clone())
            .flat_map(|r| r[0].as_u64().unwrap()..=r[1].as_u64().unwrap())
            .collect();
        out.sort_unstable();
        out
    };
    let (sealed_seqs, acked_seqs) = (seqs("batches_sealed"), seqs("batches_acked"));
    assert!(!sealed_seqs.is_empty());
    assert_eq!(sealed_seqs, acked_seqs);
    let batches: u64 = sealed
        .iter()
        .map(|e| e["detail"]["batches"].as_u64().unwrap())
        .sum();
    assert_eq!(batches, sealed_seqs.len() as u64);

    // Someone edits a count in the file.
    let target = sealed[sealed.len() / 2]["id"].as_i64().unwrap();
    let db = rusqlite::Connection::open(world.path().join("state/outbox.sqlite")).unwrap();
    db.execute(
        "UPDATE audit SET detail = replace(detail, '\"records\":', '\"records\":1') WHERE id = ?1",
        [target],
    )
    .unwrap();
    drop(db);
    let (code, text) = cli(&world, &["verify"]);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains(&format!("BROKEN at entry {target}:")),
        "names exactly the edited entry: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_destroys_batches_and_keys_and_leaves_the_audit_trail_with_the_record() {
    let world = World::new();
    let stop = CancellationToken::new();
    let dev = start_sim(shuyuan::sim::pump_station(), &stop).await;
    // The platform is down: sealed batches stay in the outbox.
    let down = free_addr();
    let body = format!(
        "[pseudonym]\nkey = \"keys/pseudonym.key\"\n\n[[sources]]\nid = \"pump\"\nkind = \"modbus-tcp\"\naddress = \"{dev}\"\ninterval = \"100ms\"\npolicy = \"p\"\npoints = [ {{ name = \"counter\", register = \"holding\", address = 200, type = \"u32\" }} ]\n\n[policies.p]\nfields.counter = {{ action = \"keep\", grade = \"internal\" }}\n"
    );
    shuyuan::policy::PseudonymKey::init(&world.path().join("keys/pseudonym.key")).unwrap();
    let gw = start_gateway(gateway_config(
        &world,
        &format!("https://{down}"),
        "200ms",
        &body,
    ));
    let p = gw.stats.pipeline.clone();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            p.batches_sealed.load(std::sync::atomic::Ordering::Relaxed) >= 4
        })
        .await
    );
    gw.shutdown().await.unwrap();
    stop.cancel();
    let state = world.path().join("state");
    let waiting = shuyuan::outbox::admin::list(&state).unwrap().len();
    assert!(waiting >= 4);

    let purge = |yes: bool| {
        let mut c = Command::new(shuyuan_bin());
        c.arg("purge")
            .arg("--config")
            .arg(world.path().join("gateway.toml"));
        if yes {
            c.arg("--yes");
        }
        c.output().unwrap()
    };
    let out = purge(false);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--yes"));
    assert_eq!(
        shuyuan::outbox::admin::list(&state).unwrap().len(),
        waiting,
        "nothing destroyed without --yes"
    );
    let out = purge(true);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    assert!(
        shuyuan::outbox::admin::list(&state).unwrap().is_empty(),
        "no batch left"
    );
    assert!(
        !world.pki.gateway_key().exists() && !world.path().join("keys/pseudonym.key").exists(),
        "keys destroyed"
    );
    for f in std::fs::read_dir(&state).unwrap() {
        let bytes = std::fs::read(f.unwrap().path()).unwrap_or_default();
        assert!(
            !bytes.windows(4).any(|w| w == b"SHYB"),
            "no envelope bytes remain on disk"
        );
    }
    let (code, text) = cli(&world, &["verify"]);
    assert_eq!(code, Some(0), "the trail still verifies: {text}");
    let (_, json) = cli(&world, &["list", "--json"]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    let last = entries.last().unwrap();
    assert_eq!(last["kind"], "purge");
    assert_eq!(last["detail"]["batches"], waiting as u64);
    assert_eq!(last["detail"]["key_files"].as_array().unwrap().len(), 2);
}

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
    stop.cancel();
    rx.shutdown().await;

    let (code, text) = cli(&world, &["verify"]);
    assert_eq!(code, Some(0), "{text}");
    let (_, json) = cli(&world, &["list", "--json"]);
    let entries: Vec<serde_json::Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(entries[0]["kind"], "gateway_started");
    let sealed: Vec<&serde_json::Value> = entries
        .iter()
        .filter(|e| e["kind"] == "batch_sealed")
        .collect();
    assert!(!sealed.is_empty());
    for e in &sealed {
        let d = &e["detail"];
        assert_eq!(
            d["fields_without_rule"], d["records"],
            "one unlisted field per record, counted per batch"
        );
        assert_eq!(d["fields_kept"], d["records"]);
    }
    let acked = entries
        .iter()
        .filter(|e| e["kind"] == "batch_acked")
        .count();
    assert_eq!(
        acked,
        sealed.len(),
        "every sealed batch acknowledged, on the record"
    );

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

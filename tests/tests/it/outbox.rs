//! Quarantine and the operator's outbox commands: a platform that refuses batches for good
//! (a final 4xx) gets them quarantined, not retried forever; `shuyuan outbox list|retry|drop`
//! shows and resolves them.

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use shuyuan::sim;
use shuyuan_tests::*;
use tokio_util::sync::CancellationToken;

fn cli(world: &World, args: &[&str]) -> (bool, String) {
    let out = Command::new(shuyuan_bin())
        .arg("outbox")
        .args(args)
        .arg("--config")
        .arg(world.path().join("gateway.toml"))
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_batches_are_quarantined_and_the_operator_retries_or_drops_them() {
    let world = World::new();
    let stop = CancellationToken::new();
    let dev = start_sim(sim::pump_station(), &stop).await;
    let addr = free_addr();
    let refuse = CancellationToken::new();
    start_refusing_platform(&world, addr, 422, &refuse).await;
    let body = format!(
        "[[sources]]\nid = \"pump\"\nkind = \"modbus-tcp\"\naddress = \"{dev}\"\ninterval = \"100ms\"\npolicy = \"p\"\npoints = [ {{ name = \"counter\", register = \"holding\", address = 200, type = \"u32\" }} ]\n\n[policies.p]\nfields.counter = {{ action = \"keep\", grade = \"internal\" }}\n"
    );
    let gw = start_gateway(gateway_config(
        &world,
        &format!("https://{addr}"),
        "200ms",
        &body,
    ));
    let p = gw.stats.pipeline.clone();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            p.batches_quarantined.load(Relaxed) >= 3
        })
        .await
    );
    gw.shutdown().await.unwrap();
    refuse.cancel();
    assert_eq!(p.batches_acked.load(Relaxed), 0);
    // Each refused batch was tried once, not retried in a loop.
    assert_eq!(p.uploads.load(Relaxed), p.batches_quarantined.load(Relaxed));

    let (ok, text) = cli(&world, &["list", "--json"]);
    assert!(ok, "{text}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    assert!(rows.len() >= 3);
    assert!(
        rows.iter()
            .all(|r| r["state"] == "quarantined"
                && r["last_error"].as_str().unwrap().contains("422")),
        "{rows:#?}"
    );
    let first = rows[0]["seq"].as_u64().unwrap();
    let second = rows[1]["seq"].as_u64().unwrap();
    let (ok, text) = cli(&world, &["list"]);
    assert!(
        ok && text.contains("quarantined") && text.contains("schema check failed"),
        "{text}"
    );

    let (ok, text) = cli(&world, &["drop", &second.to_string()]);
    assert!(
        !ok && text.contains("--yes"),
        "drop asks for confirmation: {text}"
    );
    let (ok, text) = cli(&world, &["drop", &second.to_string(), "--yes"]);
    assert!(ok, "{text}");
    let (ok, text) = cli(&world, &["retry", &first.to_string()]);
    assert!(ok, "{text}");
    let (ok, text) = cli(&world, &["retry", &second.to_string()]);
    assert!(!ok && text.contains("no quarantined batch"), "{text}");

    // The platform is fixed: the retried batch goes through, the dropped one never does.
    let rx = start_receiver(&world, Some(addr)).await;
    let cfg = shuyuan::config::load(&world.path().join("gateway.toml"))
        .unwrap()
        .config;
    let gw = start_gateway(cfg);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            rx.stats.accepted.load(Relaxed) >= 2
        })
        .await
    );
    gw.shutdown().await.unwrap();
    let rows: Vec<serde_json::Value> =
        serde_json::from_str(&cli(&world, &["list", "--json"]).1).unwrap();
    let seqs: Vec<u64> = rows.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert!(
        !seqs.contains(&first) && !seqs.contains(&second),
        "retried one delivered, dropped one gone: {seqs:?}"
    );
    assert!(
        rows.iter().all(|r| r["state"] == "quarantined"),
        "only the untouched quarantined batches remain"
    );
    stop.cancel();
    rx.shutdown().await;
}

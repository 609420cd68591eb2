//! `shuyuan status` against a live daemon (healthy, then with a dead device) and a stopped one.

use std::process::Command;
use std::time::Duration;

use shuyuan_tests::*;
use tokio_util::sync::CancellationToken;

fn status(world: &World, json: bool) -> (Option<i32>, String) {
    let mut c = Command::new(shuyuan_bin());
    c.arg("status")
        .arg("--config")
        .arg(world.path().join("gateway.toml"));
    if json {
        c.arg("--json");
    }
    let out = c.output().unwrap();
    (
        out.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn source(id: &str, addr: &str) -> String {
    format!("[[sources]]\nid = \"{id}\"\nkind = \"modbus-tcp\"\naddress = \"{addr}\"\ninterval = \"100ms\"\ntimeout = \"200ms\"\npolicy = \"p\"\ntags = {{ meter_id = \"WTR-1201-000317\" }}\npoints = [ {{ name = \"counter\", register = \"holding\", address = 200, type = \"u32\" }} ]\n\n")
}

const POLICY: &str = "[policies.p]\nfields.counter = { action = \"keep\", grade = \"internal\" }\nfields.meter_id = { action = \"mask\", keep_head = 3, grade = \"personal\" }\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reads_ok_then_degraded_from_a_live_daemon_and_down_when_stopped() {
    let world = World::new();
    let stop = CancellationToken::new();
    let dev = start_sim(shuyuan::sim::pump_station(), &stop).await;
    let rx = start_receiver(&world, None).await;
    let cfg = gateway_config(
        &world,
        &rx.url(),
        "200ms",
        &(source("pump", &dev.to_string()) + POLICY),
    );
    let gw = start_gateway(cfg);
    assert!(
        wait_until(Duration::from_secs(20), || async {
            rx.records(GATEWAY_ID).len() >= 5
        })
        .await
    );

    // The socket: 0660, in the daemon's group (Group=shuyuan under the systemd unit), so
    // technicians in that group can read status and nobody else can.
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let m = std::fs::metadata(world.path().join("state/status.sock")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o660);
        let own = std::fs::metadata("/proc/self").unwrap().gid();
        assert_eq!(m.gid(), own);
    }
    let (code, text) = status(&world, false);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("— OK") && text.contains("pump") && text.contains("last success"),
        "{text}"
    );
    let (_, json) = status(&world, true);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["fields_deidentified"].as_u64().unwrap() >= 5,
        "policy counts are in status: {v}"
    );
    assert!(v["sources"][0]["polls_ok"].as_u64().unwrap() >= 5);
    let days = v["cert_days_left"].as_i64().unwrap();
    assert!(
        (300..=1100).contains(&days),
        "the dev certificate's days left: {days}"
    );
    assert!(v["disk_free_bytes"].as_u64().unwrap() > 0);
    assert!(
        text.contains("days left") && text.contains("disk free"),
        "{text}"
    );
    assert!(
        !json.contains("WTR-1201-000317") && !text.contains("WTR-1201"),
        "no field value in status"
    );
    let out = Command::new(shuyuan_bin())
        .args(["status", "--watch", "--count", "2", "--config"])
        .arg(world.path().join("gateway.toml"))
        .output()
        .unwrap();
    let watched = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        watched.matches("\x1b[2J").count(),
        2,
        "two screens, each redrawn in place"
    );
    assert_eq!(watched.matches("— OK").count(), 2, "{watched}");
    gw.shutdown().await.unwrap();

    // A device that does not answer makes the gateway DEGRADED, with the reason in words.
    let dead = free_addr();
    let cfg = gateway_config(
        &world,
        &rx.url(),
        "200ms",
        &(source("pump", &dev.to_string()) + &source("dead", &dead.to_string()) + POLICY),
    );
    let gw = start_gateway(cfg);
    let st = gw.stats.clone();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            st.sources.lock().unwrap().iter().any(|(id, s)| {
                &**id == "dead" && s.polls_failed.load(std::sync::atomic::Ordering::Relaxed) > 0
            })
        })
        .await
    );
    let (code, text) = status(&world, false);
    assert_eq!(code, Some(1), "{text}");
    assert!(
        text.contains("DEGRADED") && text.contains("source dead is not answering"),
        "{text}"
    );
    gw.shutdown().await.unwrap();

    let (code, text) = status(&world, false);
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("not running") && text.contains("last upload acknowledged 20"),
        "{text}"
    );
    stop.cancel();
    rx.shutdown().await;
}

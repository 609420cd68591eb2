//! The push schedule: windows of local time hold batches back, `shuyuan push` overrides them,
//! and a bandwidth cap keeps the average upload rate under it.

use std::process::Command;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use shuyuan::sim;
use shuyuan_tests::*;
use tokio_util::sync::CancellationToken;

fn sources(addr: &str) -> String {
    format!(
        "[[sources]]\nid = \"pump\"\nkind = \"modbus-tcp\"\naddress = \"{addr}\"\ninterval = \"100ms\"\npolicy = \"p\"\npoints = [ {{ name = \"counter\", register = \"holding\", address = 200, type = \"u32\" }} ]\n\n[policies.p]\nfields.counter = {{ action = \"keep\", grade = \"internal\" }}\n"
    )
}

/// A one-hour window that starts two hours from now (local time), so it is closed now.
fn closed_window() -> String {
    let out = Command::new("date").arg("+%H %M").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let mut it = text.split_whitespace().map(|v| v.parse::<u32>().unwrap());
    let now = it.next().unwrap() * 60 + it.next().unwrap();
    let (a, b) = ((now + 120) % 1440, (now + 180) % 1440);
    format!("{:02}:{:02}-{:02}:{:02}", a / 60, a % 60, b / 60, b % 60)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_the_window_batches_wait_and_shuyuan_push_sends_them_now() {
    let world = World::new();
    let stop = CancellationToken::new();
    let addr = start_sim(sim::pump_station(), &stop).await;
    let rx = start_receiver(&world, None).await;
    gateway_config(&world, &rx.url(), "200ms", &sources(&addr.to_string()));
    let window = closed_window();
    edit_gateway_config(&world, |t| {
        t.replace(
            "timeout = \"5s\"",
            &format!("timeout = \"5s\"\nwindows = [\"{window}\"]"),
        )
    });
    let log = world.path().join("gateway.log");
    let mut gw = spawn_gateway_process(&world, &log);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        rx.stats.accepted.load(Relaxed),
        0,
        "nothing is pushed outside the window {window}"
    );

    let out = Command::new(shuyuan_bin())
        .args(["push", "--config"])
        .arg(world.path().join("gateway.toml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed = wait_until(Duration::from_secs(10), || async {
        rx.stats.accepted.load(Relaxed) >= 3
    })
    .await;
    assert!(pushed, "shuyuan push sends the waiting batches at once");
    assert!(terminate(&mut gw, Duration::from_secs(20)).is_some());
    let out = Command::new(shuyuan_bin())
        .args(["push", "--config"])
        .arg(world.path().join("gateway.toml"))
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "push without a running gateway says so"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("no running gateway"));
    stop.cancel();
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bandwidth_cap_keeps_the_average_upload_rate_under_it() {
    let world = World::new();
    let stop = CancellationToken::new();
    let addr = start_sim(sim::pump_station(), &stop).await;
    // The platform is down first, so a backlog builds up that would drain at once.
    let port = free_addr();
    gateway_config(
        &world,
        &format!("https://{port}"),
        "200ms",
        &sources(&addr.to_string()),
    );
    let cfg = edit_gateway_config(&world, |t| {
        t.replace(
            "timeout = \"5s\"",
            "timeout = \"5s\"\nmax_bytes_per_sec = \"1KiB\"",
        )
    });
    let gw = start_gateway(cfg);
    let p = gw.stats.pipeline.clone();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            p.batches_sealed.load(Relaxed) >= 15
        })
        .await
    );
    let rx = start_receiver(&world, Some(port)).await;
    assert!(
        wait_until(Duration::from_secs(20), || async {
            p.batches_acked.load(Relaxed) >= 1
        })
        .await
    );
    let (t0, b0) = (Instant::now(), p.bytes_acked.load(Relaxed));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (secs, bytes) = (t0.elapsed().as_secs_f64(), p.bytes_acked.load(Relaxed) - b0);
    gw.shutdown().await.unwrap();
    let largest = 1024.0; // one batch can go out before the throttle waits
    assert!(bytes > 0, "uploads go on under the cap");
    assert!(
        (bytes as f64) <= 1024.0 * secs + largest,
        "{bytes} bytes in {secs:.1} s exceeds 1 KiB/s"
    );
    stop.cancel();
    rx.shutdown().await;
}

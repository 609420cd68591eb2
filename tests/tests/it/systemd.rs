//! The daemon under systemd's eyes, without systemd: a notify socket of our own receives
//! READY=1 once the gateway is up, WATCHDOG=1 while it works, RELOADING=1 and READY=1 around a
//! SIGHUP that brings a new configuration (nothing lost or repeated across it), nothing for a
//! SIGHUP with a broken configuration (the running one stays), and STOPPING=1 on SIGTERM.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use shuyuan::sim;
use shuyuan_tests::*;
use tokio_util::sync::CancellationToken;

/// Messages received on `sock` within `limit`, until one contains `until`.
fn read_until(sock: &UnixDatagram, until: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let m = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = m.contains(until);
            got.push(m);
            if done {
                break;
            }
        }
    }
    got
}

fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_watchdog_reload_and_stop_are_told_to_systemd() {
    let world = World::new();
    let stop = CancellationToken::new();
    let addr = start_sim(sim::pump_station(), &stop).await;
    let rx = start_receiver(&world, None).await;
    let body = |station: &str| {
        format!(
            "[[sources]]\nid = \"pump\"\nkind = \"modbus-tcp\"\naddress = \"{addr}\"\ninterval = \"100ms\"\npolicy = \"p\"\ntags = {{ station = \"{station}\" }}\npoints = [ {{ name = \"counter\", register = \"holding\", address = {}, type = \"u32\" }} ]\n\n[policies.p]\nfields.counter = {{ action = \"keep\", grade = \"internal\" }}\nfields.station = {{ action = \"keep\", grade = \"public\" }}\n",
            sim::COUNTER_ADDR
        )
    };
    gateway_config(&world, &rx.url(), "300ms", &body("一号"));
    let sock_path = world.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let log = world.path().join("gateway.log");
    let mut gw = spawn_gateway_process_with(
        &world,
        &log,
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );

    let got = read_until(&sock, "READY=1", Duration::from_secs(15));
    assert!(got.iter().any(|m| m.contains("READY=1")), "{got:?}");
    let got = read_until(&sock, "never", Duration::from_millis(1500));
    let pings = got.iter().filter(|m| *m == "WATCHDOG=1").count();
    assert!(pings >= 3, "a ping every 200 ms: {got:?}");

    // A broken configuration: reported, the running one stays.
    let good = std::fs::read_to_string(world.path().join("gateway.toml")).unwrap();
    std::fs::write(
        world.path().join("gateway.toml"),
        good.replace("interval = \"100ms\"", "interval = \"fast\""),
    )
    .unwrap();
    signal(&gw, "-HUP");
    let got = read_until(&sock, "RELOADING=1", Duration::from_secs(2));
    assert!(!got.iter().any(|m| m.contains("RELOADING")), "{got:?}");
    assert!(gw.try_wait().unwrap().is_none(), "still running");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("not valid") && text.contains("bad duration"),
        "{text}"
    );

    // A good new configuration: reloaded.
    let before = rx.records(GATEWAY_ID).len();
    std::fs::write(
        world.path().join("gateway.toml"),
        good.replace("一号", "二号"),
    )
    .unwrap();
    signal(&gw, "-HUP");
    let got = read_until(&sock, "READY=1", Duration::from_secs(15));
    assert!(got.iter().any(|m| m.contains("RELOADING=1")), "{got:?}");
    assert!(got.last().is_some_and(|m| m.contains("READY=1")), "{got:?}");
    let p = wait_until(Duration::from_secs(15), || async {
        rx.records(GATEWAY_ID)
            .iter()
            .any(|r| r["fields"]["station"] == "二号")
    })
    .await;
    assert!(p, "records under the new configuration");

    signal(&gw, "-TERM");
    let got = read_until(&sock, "STOPPING=1", Duration::from_secs(10));
    assert!(got.iter().any(|m| m.contains("STOPPING=1")), "{got:?}");
    let status = gw.wait().unwrap();
    assert!(status.success(), "{status:?}");

    // Across the reload nothing was lost or sent twice: the sequence is contiguous and the
    // device's counter never repeats.
    let recs = rx.records(GATEWAY_ID);
    assert!(recs.len() > before);
    let seqs: Vec<u64> = recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let counters: Vec<u64> = recs
        .iter()
        .map(|r| r["fields"]["counter"].as_u64().unwrap())
        .collect();
    assert!(counters.windows(2).all(|w| w[1] > w[0]), "{counters:?}");
    stop.cancel();
    rx.shutdown().await;
}

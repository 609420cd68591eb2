//! Modbus device → gateway → receiver, on real sockets, real TLS and real SQLite files.

use std::time::Duration;

use serde_json::json;
use shuyuan::config::WordOrder;
use shuyuan::sim::{Device, Tables};
use shuyuan_tests::*;
use tokio_util::sync::CancellationToken;

fn known_device() -> std::sync::Arc<Device> {
    let mut t = Tables::sized(300, 10, 10, 10);
    t.put_holding(100, &12.5f32.to_be_bytes(), WordOrder::CDAB);
    t.put_holding(102, &(-123_456i32).to_be_bytes(), WordOrder::ABCD);
    t.put_holding(104, &(-2.75f64).to_be_bytes(), WordOrder::DCBA);
    t.put_holding(108, &3_000_000_000u32.to_be_bytes(), WordOrder::BADC);
    t.put_holding(110, &(-7i16).to_be_bytes(), WordOrder::ABCD);
    t.put_holding(
        111,
        &9_007_199_254_740_993u64.to_be_bytes(),
        WordOrder::CDAB,
    );
    t.put_holding(115, &4242u16.to_be_bytes(), WordOrder::ABCD); // a serial nobody listed
    t.input[0] = 2500;
    t.coils[5] = true;
    t.discrete[2] = true;
    t.counter_at = Some(200);
    Device::new(t)
}

const SOURCES: &str = r#"
[[sources]]
id = "pump-1"
kind = "modbus-tcp"
address = "ADDR"
interval = "100ms"
policy = "telemetry"
tags = { meter_id = "WTR-1201-000317", station = "和平区3号泵站" }
points = [
  { name = "flow", register = "holding", address = 100, type = "f32", order = "CDAB" },
  { name = "energy", register = "holding", address = 102, type = "i32" },
  { name = "level", register = "holding", address = 104, type = "f64", order = "DCBA" },
  { name = "volume", register = "holding", address = 108, type = "u32", order = "BADC" },
  { name = "temp", register = "holding", address = 110, type = "i16" },
  { name = "total", register = "holding", address = 111, type = "u64", order = "CDAB" },
  { name = "serial", register = "holding", address = 115, type = "u16" },
  { name = "counter", register = "holding", address = 200, type = "u32" },
  { name = "pressure", register = "input", address = 0, type = "u16", scale = 0.1 },
  { name = "running", register = "coil", address = 5, type = "bool" },
  { name = "door_open", register = "discrete", address = 2, type = "bool" },
]

[policies.telemetry]
fields.flow = { action = "keep", grade = "internal" }
fields.energy = { action = "keep", grade = "internal" }
fields.level = { action = "keep", grade = "internal" }
fields.volume = { action = "keep", grade = "internal" }
fields.temp = { action = "keep", grade = "internal" }
fields.total = { action = "keep", grade = "internal" }
fields.counter = { action = "keep", grade = "internal" }
fields.pressure = { action = "keep", grade = "internal" }
fields.running = { action = "keep", grade = "internal" }
fields.door_open = { action = "drop", grade = "internal" }
fields.station = { action = "keep", grade = "public" }
fields.meter_id = { action = "mask", keep_head = 4, keep_tail = 2, grade = "personal" }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modbus_values_reach_the_receiver_exactly_after_policy_with_no_counter_gap() {
    let world = World::new();
    let stop = CancellationToken::new();
    let device = known_device();
    let sim = start_sim(device.clone(), &stop).await;
    let rx = start_receiver(&world, None).await;
    let cfg = gateway_config(
        &world,
        &rx.url(),
        "300ms",
        &SOURCES.replace("ADDR", &sim.to_string()),
    );
    let gw = start_gateway(cfg);

    let enough = wait_until(Duration::from_secs(30), || async {
        rx.records(GATEWAY_ID).len() >= 25
    })
    .await;
    assert!(
        enough,
        "receiver got only {} records",
        rx.records(GATEWAY_ID).len()
    );
    let stats = gw.stats.clone();
    gw.shutdown().await.unwrap();

    let recs = rx.records(GATEWAY_ID);
    let reads_served = device.poll_counter();
    // Every poll that read the counter was delivered: the final drain leaves nothing behind.
    assert_eq!(
        recs.len() as u64,
        reads_served,
        "records delivered vs. polls served"
    );
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r["source"], "pump-1");
        assert_eq!(
            r["seq"],
            json!(i as u64 + 1),
            "per-source seq is contiguous"
        );
        assert_eq!(
            r["fields"],
            json!({
                "flow": 12.5, "energy": -123456, "level": -2.75, "volume": 3_000_000_000u64,
                "temp": -7, "total": 9_007_199_254_740_993u64, "counter": i as u64,
                "pressure": 250.0, "running": true,
                "station": "和平区3号泵站", "meter_id": "WTR-*********17"
            }),
            "record {i}"
        );
    }
    let p = &stats.pipeline;
    use std::sync::atomic::Ordering::Relaxed;
    assert_eq!(
        p.fields_unlisted.load(Relaxed),
        recs.len() as u64,
        "serial dropped by default deny"
    );
    assert_eq!(
        p.fields_dropped.load(Relaxed),
        recs.len() as u64,
        "door_open dropped by rule"
    );
    assert_eq!(rx.stats.duplicates.load(Relaxed), 0);
    stop.cancel();
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_then_recovery_delivers_the_backlog_in_order() {
    let world = World::new();
    let stop = CancellationToken::new();
    let sim = start_sim(known_device(), &stop).await;
    // Reserve a port for the receiver, which is not running yet.
    let port = free_addr();
    let cfg = gateway_config(
        &world,
        &format!("https://{port}"),
        "200ms",
        &SOURCES.replace("ADDR", &sim.to_string()),
    );
    let gw = start_gateway(cfg);
    use std::sync::atomic::Ordering::Relaxed;
    let sealed = wait_until(Duration::from_secs(20), || async {
        gw.stats.pipeline.batches_sealed.load(Relaxed) >= 5
    })
    .await;
    assert!(sealed);
    assert!(
        gw.stats.pipeline.upload_failures.load(Relaxed) >= 1,
        "uploads failed while the platform was down"
    );
    assert_eq!(gw.stats.pipeline.batches_acked.load(Relaxed), 0);

    let rx = start_receiver(&world, Some(port)).await;
    let drained = wait_until(Duration::from_secs(30), || async {
        gw.stats.pipeline.batches_acked.load(Relaxed)
            >= gw.stats.pipeline.batches_sealed.load(Relaxed)
    })
    .await;
    assert!(drained, "backlog drained after recovery");
    gw.shutdown().await.unwrap();
    let recs = rx.records(GATEWAY_ID);
    assert!(recs.len() >= 10);
    let counters: Vec<u64> = recs
        .iter()
        .map(|r| r["fields"]["counter"].as_u64().unwrap())
        .collect();
    let expected: Vec<u64> = (0..counters.len() as u64).collect();
    assert_eq!(
        counters, expected,
        "oldest first, nothing lost, nothing twice"
    );
    stop.cancel();
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exceptions_and_dead_devices_are_counted_while_healthy_sources_keep_flowing() {
    let world = World::new();
    let stop = CancellationToken::new();
    let good = start_sim(known_device(), &stop).await;
    // A device with a small register map: reading address 100 answers an exception.
    let small = start_sim(Device::new(Tables::sized(10, 10, 10, 10)), &stop).await;
    // Nothing listens here.
    let dead = free_addr();
    let extra = |id: &str, addr: &str| {
        format!(
            "\n[[sources]]\nid = \"{id}\"\nkind = \"modbus-tcp\"\naddress = \"{addr}\"\ninterval = \"100ms\"\ntimeout = \"300ms\"\npolicy = \"telemetry\"\npoints = [ {{ name = \"flow\", register = \"holding\", address = 100, type = \"f32\" }} ]\n"
        )
    };
    let body = SOURCES.replace("ADDR", &good.to_string())
        + &extra("small", &small.to_string())
        + &extra("dead", &dead.to_string());
    let rx = start_receiver(&world, None).await;
    let gw = start_gateway(gateway_config(&world, &rx.url(), "300ms", &body));
    let flowing = wait_until(Duration::from_secs(30), || async {
        rx.records(GATEWAY_ID).len() >= 10
    })
    .await;
    assert!(flowing);
    let by_id = |id: &str| {
        gw.stats
            .sources
            .lock()
            .unwrap()
            .iter()
            .find(|(s, _)| &**s == id)
            .map(|(_, s)| s.clone())
            .unwrap()
    };
    use std::sync::atomic::Ordering::Relaxed;
    let small_stats = by_id("small");
    let dead_stats = by_id("dead");
    assert!(
        small_stats.exceptions.load(Relaxed) >= 1,
        "exception counted"
    );
    assert_eq!(small_stats.polls_ok.load(Relaxed), 0);
    assert!(
        small_stats.last_error().unwrap().contains("exception"),
        "{:?}",
        small_stats.last_error()
    );
    assert!(
        dead_stats.connects_failed.load(Relaxed) >= 1,
        "failed connects counted"
    );
    assert!(dead_stats.polls_failed.load(Relaxed) >= 1);
    gw.shutdown().await.unwrap();
    let recs = rx.records(GATEWAY_ID);
    assert!(
        recs.iter().all(|r| r["source"] == "pump-1"),
        "only the healthy source produced records"
    );
    stop.cancel();
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_buffer_evicts_oldest_and_the_count_equals_the_gap_the_platform_sees() {
    use std::sync::atomic::Ordering::Relaxed;
    let world = World::new();
    let stop = CancellationToken::new();
    let device = known_device();
    let sim = start_sim(device.clone(), &stop).await;
    let port = free_addr();
    gateway_config(
        &world,
        &format!("https://{port}"),
        "200ms",
        &SOURCES.replace("ADDR", &sim.to_string()),
    );
    let cfg = edit_gateway_config(&world, |t| {
        t.replace(
            "max_records = 1000",
            "max_records = 1000\nmax_bytes = \"1KiB\"",
        ) + "\n[buffer]\nmax_bytes = \"3KiB\"\non_full = \"drop_oldest\"\n"
    });
    let gw = start_gateway(cfg);
    let p = gw.stats.pipeline.clone();
    let evicting = wait_until(Duration::from_secs(30), || async {
        p.records_evicted.load(Relaxed) >= 5
    })
    .await;
    assert!(
        evicting,
        "the tiny buffer overflowed while the platform was down"
    );
    let src = gw.stats.sources.lock().unwrap()[0].1.clone();
    let rx = start_receiver(&world, Some(port)).await;
    let drained = wait_until(Duration::from_secs(30), || async {
        p.batches_acked.load(Relaxed) + p.batches_evicted.load(Relaxed)
            >= p.batches_sealed.load(Relaxed)
    })
    .await;
    gw.shutdown().await.unwrap();
    assert!(drained);
    let delivered = rx.records(GATEWAY_ID).len() as u64;
    let polled = device.poll_counter();
    let evicted = p.records_evicted.load(Relaxed);
    assert_eq!(
        polled - delivered,
        evicted,
        "every missing record is an evicted one, counted (polls failed: {}, not handed on: {}, lost uncommitted: {})",
        src.polls_failed.load(Relaxed),
        src.records_not_handed_on.load(Relaxed),
        p.records_lost_uncommitted.load(Relaxed),
    );
    // Oldest first: what arrived is a contiguous tail of each stretch, in order.
    let c: Vec<u64> = rx
        .records(GATEWAY_ID)
        .iter()
        .map(|r| r["fields"]["counter"].as_u64().unwrap())
        .collect();
    assert!(c.windows(2).all(|w| w[0] < w[1]), "in order");
    stop.cancel();
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_keeps_polling_counts_what_it_could_not_take_and_resumes() {
    use std::sync::atomic::Ordering::Relaxed;
    let world = World::new();
    let stop = CancellationToken::new();
    let device = known_device();
    let sim = start_sim(device.clone(), &stop).await;
    let port = free_addr();
    let fast = SOURCES
        .replace("ADDR", &sim.to_string())
        .replace("interval = \"100ms\"", "interval = \"10ms\"");
    gateway_config(&world, &format!("https://{port}"), "200ms", &fast);
    let cfg = edit_gateway_config(&world, |t| {
        t.replace(
            "max_records = 1000",
            "max_records = 1000\nmax_bytes = \"1KiB\"",
        ) + "\n[buffer]\nmax_bytes = \"3KiB\"\non_full = \"pause\"\n"
    });
    let gw = start_gateway(cfg);
    let st = gw.stats.clone();
    assert!(
        wait_until(Duration::from_secs(10), || async {
            !st.sources.lock().unwrap().is_empty()
        })
        .await
    );
    let src = gw.stats.sources.lock().unwrap()[0].1.clone();
    let stalled = wait_until(Duration::from_secs(40), || async {
        src.records_not_handed_on.load(Relaxed) >= 20
    })
    .await;
    assert!(stalled, "the paused pipeline stopped taking records");
    let polls_then = src.polls_ok.load(Relaxed);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // While stalled, each poll waits one interval (at least 100 ms) to hand its record on.
    assert!(
        src.polls_ok.load(Relaxed) >= polls_then + 4,
        "sources keep polling while paused"
    );
    let p = gw.stats.pipeline.clone();
    assert_eq!(p.records_evicted.load(Relaxed), 0, "pause never evicts");

    let rx = start_receiver(&world, Some(port)).await;
    let resumed = wait_until(Duration::from_secs(30), || async {
        p.batches_acked.load(Relaxed) >= 10
    })
    .await;
    assert!(resumed, "uploads resume when the platform is back");
    gw.shutdown().await.unwrap();
    let delivered = rx.records(GATEWAY_ID).len() as u64;
    let polled = device.poll_counter();
    let counted =
        src.records_not_handed_on.load(Relaxed) + p.records_lost_uncommitted.load(Relaxed);
    // What the final drain did not push is still in the outbox, for the next start.
    let waiting: u64 = shuyuan::outbox::admin::list(&world.path().join("state"))
        .unwrap()
        .iter()
        .map(|r| u64::from(r.records))
        .sum();
    assert_eq!(
        polled - delivered - waiting,
        counted,
        "every record neither delivered nor waiting is counted as lost (polled {polled}, delivered {delivered}, waiting {waiting}; not handed on {}, sealed but not committed {}; polls failed {})",
        src.records_not_handed_on.load(Relaxed),
        p.records_lost_uncommitted.load(Relaxed),
        src.polls_failed.load(Relaxed),
    );
    stop.cancel();
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_batches_in_flight_drain_a_backlog_exactly_once() {
    use std::sync::atomic::Ordering::Relaxed;
    let world = World::new();
    let stop = CancellationToken::new();
    let sim = start_sim(known_device(), &stop).await;
    let port = free_addr();
    gateway_config(
        &world,
        &format!("https://{port}"),
        "100ms",
        &SOURCES.replace("ADDR", &sim.to_string()),
    );
    let cfg = edit_gateway_config(&world, |t| {
        t.replace("timeout = \"5s\"", "timeout = \"5s\"\nin_flight = 4")
    });
    let gw = start_gateway(cfg);
    let p = gw.stats.pipeline.clone();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            p.batches_sealed.load(Relaxed) >= 12
        })
        .await
    );
    let rx = start_receiver(&world, Some(port)).await;
    let drained = wait_until(Duration::from_secs(30), || async {
        p.batches_acked.load(Relaxed) >= p.batches_sealed.load(Relaxed)
    })
    .await;
    gw.shutdown().await.unwrap();
    assert!(drained);
    let mut c: Vec<u64> = rx
        .records(GATEWAY_ID)
        .iter()
        .map(|r| r["fields"]["counter"].as_u64().unwrap())
        .collect();
    c.sort_unstable();
    let expected: Vec<u64> = (0..c.len() as u64).collect();
    assert_eq!(
        c, expected,
        "every record once, whatever order the concurrent uploads landed in"
    );
    assert!(p.uploads.load(Relaxed) >= p.batches_acked.load(Relaxed));
    stop.cancel();
    rx.shutdown().await;
}

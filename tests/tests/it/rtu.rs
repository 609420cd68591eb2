//! Modbus RTU without hardware: a pseudo-terminal pair (socat), the simulator serving two
//! pump stations as units 1 and 2 of one bus on one end, the gateway polling them on the
//! other. A unit that never answers costs its own polls only.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use shuyuan::sim;
use shuyuan_tests::*;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_units_on_one_bus_are_polled_and_a_silent_unit_is_counted() {
    let world = World::new();
    let pty = pty_pair(world.path()).await;
    let stop = CancellationToken::new();
    let (one, two) = (sim::pump_station(), sim::pump_station());
    two.update(|t| {
        t.put_holding(
            100,
            &42.25f32.to_be_bytes(),
            shuyuan::config::WordOrder::CDAB,
        )
    });
    let server = tokio::spawn(sim::serve_rtu(
        pty.a.to_str().unwrap().to_string().leak(),
        19_200,
        tokio_serial::Parity::Even,
        vec![(1, one.clone()), (2, two.clone())],
        stop.clone(),
    ));
    let rx = start_receiver(&world, None).await;
    let port = pty.b.display();
    let body = format!(
        r#"
[[sources]]
id = "pump-1"
kind = "modbus-rtu"
port = "{port}"
baud = 19200
unit = 1
interval = "200ms"
timeout = "300ms"
policy = "p"
profile = "pump"

[[sources]]
id = "pump-2"
kind = "modbus-rtu"
port = "{port}"
baud = 19200
unit = 2
interval = "200ms"
timeout = "300ms"
policy = "p"
profile = "pump"

[[sources]]
id = "ghost"
kind = "modbus-rtu"
port = "{port}"
baud = 19200
unit = 9
interval = "500ms"
timeout = "150ms"
policy = "p"
profile = "pump"

[profiles.pump]
points = [
  {{ name = "counter", register = "holding", address = {}, type = "u32" }},
  {{ name = "flow", register = "holding", address = 100, type = "f32", order = "CDAB" }},
  {{ name = "running", register = "coil", address = 5, type = "bool" }},
]

[policies.p]
fields.counter = {{ action = "keep", grade = "internal" }}
fields.flow = {{ action = "keep", grade = "internal" }}
fields.running = {{ action = "keep", grade = "internal" }}
"#,
        sim::COUNTER_ADDR
    );
    let gw = start_gateway(gateway_config(&world, &rx.url(), "300ms", &body));
    let of = |recs: &[serde_json::Value], id: &str| {
        recs.iter()
            .filter(|r| r["source"] == id)
            .cloned()
            .collect::<Vec<_>>()
    };
    let got = wait_until(Duration::from_secs(30), || async {
        let recs = rx.records(GATEWAY_ID);
        of(&recs, "pump-1").len() >= 8 && of(&recs, "pump-2").len() >= 8
    })
    .await;
    let stats = gw.stats.clone();
    gw.shutdown().await.unwrap();
    stop.cancel();
    let _ = server.await;
    let by_id = |id: &str| {
        stats
            .sources
            .lock()
            .unwrap()
            .iter()
            .find(|(s, _)| &**s == id)
            .map(|(_, s)| s.clone())
            .unwrap()
    };
    assert!(
        got,
        "records from both units; pump-1 last error: {:?}",
        by_id("pump-1").last_error()
    );
    let recs = rx.records(GATEWAY_ID);
    for (id, flow) in [("pump-1", 118.5), ("pump-2", 42.25)] {
        let mine = of(&recs, id);
        for r in &mine {
            assert_eq!(r["fields"]["flow"], flow, "{id}");
            assert_eq!(r["fields"]["running"], true);
        }
        // Each unit's counter goes up by one per poll: no poll answered by the wrong unit.
        let counters: Vec<u64> = mine
            .iter()
            .map(|r| r["fields"]["counter"].as_u64().unwrap())
            .collect();
        assert!(
            counters.windows(2).all(|w| w[1] == w[0] + 1),
            "{id}: {counters:?}"
        );
    }
    let ghost = by_id("ghost");
    assert!(
        ghost.timeouts.load(Relaxed) >= 1,
        "the silent unit's timeouts are counted"
    );
    assert_eq!(ghost.polls_ok.load(Relaxed), 0);
    assert!(ghost.last_error().unwrap().contains("unit 9"));
    assert!(of(&recs, "ghost").is_empty());
    rx.shutdown().await;
}

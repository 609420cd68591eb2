//! `shuyuan demo`: the whole path in one process, on loopback only: a simulated pump station
//! (a real Modbus TCP server), a billing system's GBK customer export dropped into a spool
//! directory, a dev PKI made on the fly, the reference receiver, the health endpoint, and the
//! gateway pipeline reading the same kind of config file a utility writes.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::receiver::{Receiver, ReceiverConfig};
use crate::stats::Stats;

pub const DEMO_GATEWAY: &str = "GW-TJ-WATER-DEMO";

pub struct DemoOptions {
    pub seconds: u64,
    pub dir: Option<PathBuf>,
}

/// Rows in the demo's customer export.
pub const DEMO_EXPORT_ROWS: u64 = 2000;

/// The demo gateway's config: the same schema as firmware-config/water.toml.
pub fn gateway_toml(modbus: &str, url: &str, health: &str) -> String {
    format!(
        r#"# Written by `shuyuan demo`: a pump station polled every 500 ms, and the billing
# system's customer export (GBK CSV) taken from spool/.
[gateway]
id = "{DEMO_GATEWAY}"
state_dir = "state"

[uplink]
url = "{url}"
ca = "certs/platform-ca.pem"
cert = "certs/gateway.pem"
key = "certs/gateway.key"
recipient = "certs/platform-hpke.pub"
backoff_min = "200ms"
backoff_max = "5s"

[batch]
max_records = 500
max_age = "2s"

# The platform's pull endpoint (client certificate CN platform-health from the dev CA).
[health]
listen = "{health}"
allow = ["platform-health"]

[[sources]]
id = "billing-export"
kind = "file"
spool = "spool"
pattern = "*.csv"
encoding = "gbk"
settle = "1s"
policy = "customer"
{columns}

[[sources]]
id = "pump-station-3"
kind = "modbus-tcp"
address = "{modbus}"
unit = 1
interval = "500ms"
policy = "telemetry"
tags = {{ station = "和平区3号泵站", meter_id = "WTR-1201-000317", duty_phone = "13812345678" }}
points = [
  {{ name = "flow_m3h", register = "holding", address = 100, type = "f32", order = "CDAB" }},
  {{ name = "energy_wh", register = "holding", address = 102, type = "i32" }},
  {{ name = "device_serial", register = "holding", address = 104, type = "u32" }},
  {{ name = "poll_counter", register = "holding", address = 200, type = "u32" }},
  {{ name = "pressure_kpa", register = "input", address = 0, type = "u16", scale = 0.1 }},
  {{ name = "pump_running", register = "coil", address = 5, type = "bool" }},
]

[policies.telemetry]
fields.flow_m3h = {{ action = "keep", grade = "internal" }}
fields.energy_wh = {{ action = "keep", grade = "internal" }}
fields.poll_counter = {{ action = "keep", grade = "internal" }}
fields.pressure_kpa = {{ action = "keep", grade = "internal" }}
fields.pump_running = {{ action = "keep", grade = "internal" }}
fields.station = {{ action = "keep", grade = "public" }}
fields.meter_id = {{ action = "mask", keep_head = 4, keep_tail = 2, grade = "personal" }}
fields.duty_phone = {{ action = "mask", keep_head = 3, keep_tail = 4, grade = "personal" }}
# device_serial has no rule: default deny drops it.

{customer}"#,
        columns = crate::sim_files::BILLING_COLUMNS_TOML,
        customer = crate::sim_files::BILLING_POLICY_TOML
    )
}

pub fn receiver_toml(listen: &str) -> String {
    format!(
        r#"listen = "{listen}"
client_ca = "certs/platform-ca.pem"
cert = "certs/platform-server.pem"
key = "certs/platform-server.key"
hpke_key = "certs/platform-hpke.key"
out_dir = "received"
"#
    )
}

pub async fn run(opts: DemoOptions, interrupt: CancellationToken) -> anyhow::Result<()> {
    let tmp;
    let dir: PathBuf = match &opts.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.canonicalize()?
        }
        None => {
            tmp = tempfile::Builder::new().prefix("shuyuan-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let stop_all = CancellationToken::new();
    println!("Shuyuan demo: everything on loopback, in {}", dir.display());

    crate::pki::dev_pki(&dir.join("certs"), DEMO_GATEWAY, &[])?;
    println!(
        "  dev PKI         certs/ (CA, platform server, gateway {DEMO_GATEWAY}, HPKE key pair)"
    );

    let device = crate::sim::pump_station();
    let sim_addrs = crate::sim::serve_fleet(
        "127.0.0.1:0".parse()?,
        vec![device.clone()],
        crate::sim::pump_station_step,
        stop_all.clone(),
    )
    .await?;
    println!(
        "  pump station    modbus-tcp://{} (tokio-modbus server)",
        sim_addrs[0]
    );

    std::fs::write(dir.join("receiver.toml"), receiver_toml("127.0.0.1:0"))?;
    let rcfg = ReceiverConfig::load(&dir.join("receiver.toml"))?;
    let receiver = Receiver::bind(&rcfg).await?;
    let raddr = receiver.local_addr()?;
    let rstats = receiver.stats();
    let rtask = tokio::spawn(receiver.serve(stop_all.clone()));
    println!("  receiver        https://{raddr}/v1/batches (mutual TLS)");

    // The billing system's nightly export, as it writes it: GBK, Chinese header.
    let spool = dir.join("spool");
    std::fs::create_dir_all(&spool)?;
    let export = crate::sim_files::billing_export(0, DEMO_EXPORT_ROWS);
    crate::sim_files::write_export(
        &spool.join("customers-202610.csv"),
        &encoding_rs::GBK.encode(&export).0,
    )?;
    println!(
        "  billing export  spool/customers-202610.csv ({DEMO_EXPORT_ROWS} customers, GBK, ID and phone numbers)"
    );
    let health = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    println!("  health          https://{health}/v1/health (mutual TLS: certs/health-client.pem, CN platform-health)");

    let cfg_path = dir.join("gateway.toml");
    std::fs::write(
        &cfg_path,
        gateway_toml(
            &sim_addrs[0].to_string(),
            &format!("https://{raddr}"),
            &health.to_string(),
        ),
    )?;
    let loaded = crate::config::load(&cfg_path)?;
    for w in &loaded.warnings {
        println!("  {w}");
    }
    println!(
        "  gateway         {} → policy → batch → seal → outbox → uplink\n",
        cfg_path.display()
    );

    let stats = Arc::new(Stats::default());
    let gw_stop = CancellationToken::new();
    let config = loaded.config.clone();
    let gw = tokio::spawn({
        let stats = stats.clone();
        let stop = gw_stop.clone();
        async move { crate::daemon::run(&config, stop, stats).await }
    });

    let started = Instant::now();
    let tty = std::io::stdout().is_terminal();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tokio::select! {
            _ = interrupt.cancelled() => break,
            _ = tick.tick() => {}
        }
        let secs = started.elapsed().as_secs();
        let line = progress(&stats, secs);
        if tty {
            print!("\r{line}\x1b[K");
            let _ = std::io::stdout().flush();
        } else if secs % 5 == 0 {
            println!("{line}");
        }
        if secs >= opts.seconds || gw.is_finished() {
            break;
        }
    }
    if tty {
        println!();
    }
    println!("\nstopping: the gateway seals its open batch and pushes what is left …");
    gw_stop.cancel();
    gw.await.context("gateway task")??;
    println!("{}", progress(&stats, started.elapsed().as_secs()));
    stop_all.cancel();
    let _ = rtask.await;

    let out = rcfg.out_dir.join(DEMO_GATEWAY);
    println!(
        "\nreceiver: {} batches accepted, {} duplicates, {} records; decrypted records are in\n  {}",
        rstats.accepted.load(Relaxed),
        rstats.duplicates.load(Relaxed),
        rstats.records.load(Relaxed),
        out.display()
    );
    show_records(&out)?;
    if opts.dir.is_none() {
        println!("\n(pass --dir DIR to keep certificates, SQLite files and receiver output for inspection)");
    }
    Ok(())
}

fn progress(stats: &Stats, secs: u64) -> String {
    let p = &stats.pipeline;
    let (ok, bad) = stats.polls();
    format!(
        "[{secs:>3}s] polls {ok} ok / {bad} failed · records {} · masked {} dropped {} · sealed {} · uploaded {} · acked {}",
        p.records_in.load(Relaxed),
        p.fields_masked.load(Relaxed),
        p.fields_unlisted.load(Relaxed) + p.fields_dropped.load(Relaxed),
        p.batches_sealed.load(Relaxed),
        p.uploads.load(Relaxed),
        p.batches_acked.load(Relaxed),
    )
}

/// Prints the first records and checks the poll counter for gaps.
fn show_records(dir: &Path) -> anyhow::Result<()> {
    let mut files: Vec<_> = match std::fs::read_dir(dir) {
        Ok(rd) => rd.filter_map(Result::ok).map(|e| e.path()).collect(),
        Err(_) => {
            println!("  (nothing received)");
            return Ok(());
        }
    };
    files.sort();
    let mut lines = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f)?;
        lines.extend(text.lines().map(str::to_owned));
    }
    println!("\nfirst records as the platform sees them (meter_id and duty_phone masked, device_serial dropped):");
    for l in lines
        .iter()
        .filter(|l| l.contains("pump-station-3"))
        .take(3)
    {
        println!("  {l}");
    }
    let billing: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains("billing-export"))
        .collect();
    println!(
        "\ncustomer records from the export: {} (ID number dropped; name, phone, account and meter masked; address to the district; remark scrubbed):",
        billing.len()
    );
    for l in billing.iter().take(2) {
        println!("  {l}");
    }
    let counters: Vec<u64> = lines
        .iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["fields"]["poll_counter"].as_u64())
        .collect();
    if let (Some(first), Some(last)) = (counters.first(), counters.last()) {
        let gaps = counters.windows(2).filter(|w| w[1] != w[0] + 1).count();
        println!(
            "\npoll counter {first}..{last}: {} records, {gaps} gaps",
            counters.len()
        );
    }
    Ok(())
}

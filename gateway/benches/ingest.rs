//! File ingest: a GBK CSV of realistic customer rows (the billing export of
//! `shuyuan::sim_files`: names, ID and phone numbers, addresses, decimals, dates) dropped into
//! the spool of the real daemon (`shuyuan run`, a separate process), which hashes it, reads
//! and types every row, applies the customer policy (mask, drop, generalise, scrub), seals and
//! commits the batches to its outbox, then moves the file away. Reports records/s, MB/s and
//! the daemon's RSS over the run (flat means streaming).
//!
//! Compared in the same run with two floors on the same file: reading it and hashing it
//! (SHA-256) alone, and parsing it alone (decode GBK, split CSV, type the columns) with the
//! daemon's own reader.
//!
//! Run: cargo bench -p shuyuan --bench ingest
//! (SHUYUAN_BENCH_INGEST_MIB, default 256; 2048 for the 2 GiB export of docs/benchmarks.md)

// A benchmark panics on setup failures: there is no one to report to.
#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shuyuan::collect::file::{Layout, Row, RowReader};

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// utime + stime of a live process, in clock ticks.
fn cpu_ticks(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    f[11].parse::<f64>().unwrap_or(0.0) + f[12].parse::<f64>().unwrap_or(0.0)
}

fn source_toml() -> String {
    format!(
        r#"[[sources]]
id = "billing"
kind = "file"
spool = "spool"
pattern = "*.csv"
encoding = "gbk"
settle = "10ms"
interval = "100ms"
after = "move"
move_to = "done"
policy = "customer"
{}

{}
"#,
        shuyuan::sim_files::BILLING_COLUMNS_TOML,
        shuyuan::sim_files::BILLING_POLICY_TOML
    )
}

/// Writes at least `mib` MiB of GBK export; returns (bytes, rows).
fn write_export(path: &Path, mib: u64) -> (u64, u64) {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let head = format!("{}\r\n", shuyuan::sim_files::BILLING_HEADER);
    let mut bytes = 0u64;
    let mut chunk = String::new();
    chunk.push_str(&head);
    let mut n = 0u64;
    while bytes < mib << 20 {
        for _ in 0..10_000 {
            chunk.push_str(&shuyuan::sim_files::billing_row(n));
            chunk.push_str("\r\n");
            n += 1;
        }
        let gbk = encoding_rs::GBK.encode(&chunk).0;
        w.write_all(&gbk).unwrap();
        bytes += gbk.len() as u64;
        chunk.clear();
    }
    w.flush().unwrap();
    (bytes, n)
}

fn main() {
    let mib: u64 = std::env::var("SHUYUAN_BENCH_INGEST_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    shuyuan::pki::dev_pki(&dir.join("certs"), "GW-BENCH", &[]).unwrap();
    let staging = dir.join("export.csv");
    let (bytes, rows) = write_export(&staging, mib);
    let mb = bytes as f64 / 1e6;
    println!("export: {mb:.0} MB GBK CSV, {rows} rows");

    // Floor 1: read and hash.
    let t = Instant::now();
    shuyuan::collect::file::sha256_file(&staging).unwrap();
    let hash_s = t.elapsed().as_secs_f64();

    // Floor 2: the daemon's reader alone.
    let cfg_text = format!(
        "[gateway]\nid = \"GW-BENCH\"\nstate_dir = \"state\"\n\n[uplink]\nurl = \"https://127.0.0.1:9\"\nca = \"certs/platform-ca.pem\"\ncert = \"certs/gateway.pem\"\nkey = \"certs/gateway.key\"\nrecipient = \"certs/platform-hpke.pub\"\nbackoff_min = \"1h\"\nbackoff_max = \"1h\"\n\n[batch]\nmax_records = 20000\nmax_bytes = \"4MiB\"\nmax_age = \"1s\"\n\n[buffer]\nmax_bytes = \"16GiB\"\n\n{}",
        source_toml()
    );
    let cfg_path = dir.join("gateway.toml");
    std::fs::write(&cfg_path, &cfg_text).unwrap();
    std::fs::create_dir_all(dir.join("spool")).unwrap();
    let loaded = shuyuan::config::load(&cfg_path).unwrap();
    let layout = Arc::new(Layout::from_config(&loaded.config.sources[0]).unwrap());
    let t = Instant::now();
    let mut reader = RowReader::new(
        std::io::BufReader::with_capacity(256 << 10, std::fs::File::open(&staging).unwrap()),
        layout,
    );
    let mut good = 0u64;
    while let Some(r) = reader.next_row().unwrap() {
        if matches!(r, Row::Good { .. }) {
            good += 1;
        }
    }
    let parse_s = t.elapsed().as_secs_f64();
    assert_eq!(good, rows, "every generated row parses");

    // The daemon: drop the file into its spool and wait until it is moved away, which
    // happens once every record is in a committed batch.
    let mut gw = Command::new(env!("CARGO_BIN_EXE_shuyuan"))
        .args(["run", "--config"])
        .arg(&cfg_path)
        .env("SHUYUAN_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let pid = gw.id();
    std::thread::sleep(Duration::from_millis(500));
    let rss_idle = status_kib(pid, "VmRSS:");
    let cpu0 = cpu_ticks(pid);
    std::fs::rename(&staging, dir.join("spool/export.csv")).unwrap();
    let t = Instant::now();
    let mut samples = Vec::new();
    let done = dir.join("done/export.csv");
    let limit = Duration::from_secs(3600);
    while !done.exists() && t.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(200));
        samples.push((t.elapsed().as_secs_f64(), status_kib(pid, "VmRSS:")));
    }
    let ingest_s = t.elapsed().as_secs_f64();
    assert!(done.exists(), "ingestion did not finish in {limit:?}");
    let hwm = status_kib(pid, "VmHWM:");
    // Clock ticks are 100 per second on Linux.
    let cpu_s = (cpu_ticks(pid) - cpu0) / 100.0;
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = gw.wait();
    let state_bytes: u64 = std::fs::read_dir(dir.join("state"))
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();

    // RSS after the first tenth of the run against the highest sample after it.
    let tenth = samples
        .iter()
        .find(|(s, _)| *s >= ingest_s / 10.0)
        .map_or(rss_idle, |x| x.1);
    let later_max = samples
        .iter()
        .filter(|(s, _)| *s >= ingest_s / 10.0)
        .map(|x| x.1)
        .max()
        .unwrap_or(tenth);
    let mib_of = |kib: u64| kib as f64 / 1024.0;
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| ingest (hash, read, type, policy, seal, commit) | {:.0} records/s, {:.1} MB/s, {ingest_s:.1} s |",
        rows as f64 / ingest_s,
        mb / ingest_s
    );
    println!(
        "| daemon CPU during ingest | {cpu_s:.1} s ({:.2} cores) |",
        cpu_s / ingest_s
    );
    println!("| floor: read + SHA-256 alone | {:.1} MB/s |", mb / hash_s);
    println!(
        "| floor: parse alone (GBK decode, CSV, typed columns) | {:.0} records/s, {:.1} MB/s |",
        rows as f64 / parse_s,
        mb / parse_s
    );
    println!(
        "| ingest time ÷ (hash + parse alone) | {:.2} |",
        ingest_s / (hash_s + parse_s)
    );
    println!(
        "| daemon RSS: idle / after 10% / highest later / VmHWM | {:.1} / {:.1} / {:.1} / {:.1} MiB |",
        mib_of(rss_idle),
        mib_of(tenth),
        mib_of(later_max),
        mib_of(hwm)
    );
    println!(
        "| sealed store after ingest | {:.1} MB ({:.2} of the export) |",
        state_bytes as f64 / 1e6,
        state_bytes as f64 / bytes as f64
    );
}

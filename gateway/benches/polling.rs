//! Polling load: 50 simulated devices × 100 holding registers in a separate process
//! (`shuyuan simulate --profile load`), the real daemon (`shuyuan run`) polling each every
//! second through the whole pipeline to the reference receiver (`shuyuan receive`), all on
//! loopback. Reports the daemon's CPU seconds, peak RSS (VmHWM) and the share of points
//! delivered.
//!
//! Run: cargo bench -p shuyuan --bench polling
//! (SHUYUAN_BENCH_SECONDS, default 60; SHUYUAN_BENCH_DEVICES, default 50)

// A benchmark panics on setup failures: there is no one to report to.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const POINTS: u16 = 100;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shuyuan"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A base port with `n` free ports after it (checked by binding them all).
fn free_range(n: u16) -> u16 {
    for _ in 0..50 {
        let base = 20_000 + free_port() % 30_000;
        let ok = (0..n).all(|i| std::net::TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if ok {
            return base;
        }
    }
    panic!("no range of {n} free ports");
}

fn term(child: &mut Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
}

/// utime + stime of a live process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    let hz: f64 = String::from_utf8(
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .parse()
    .unwrap_or(100.0);
    ticks / hz
}

fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn write_gateway_config(dir: &Path, devices: u16, base: u16, url: &str) {
    let mut t = format!(
        "[gateway]\nid = \"GW-BENCH\"\nstate_dir = \"state\"\n\n[uplink]\nurl = \"{url}\"\nca = \"certs/platform-ca.pem\"\ncert = \"certs/gateway.pem\"\nkey = \"certs/gateway.key\"\nrecipient = \"certs/platform-hpke.pub\"\n\n[batch]\nmax_records = 5000\nmax_age = \"10s\"\n\n"
    );
    // 50 devices of one model: the register map is a profile, written once.
    t += "[profiles.load-100]\npoints = [\n";
    for p in 0..POINTS {
        t += &format!(
            "  {{ name = \"r{p:03}\", register = \"holding\", address = {p}, type = \"u16\" }},\n"
        );
    }
    t += "]\n\n";
    for d in 0..devices {
        t += &format!(
            "[[sources]]\nid = \"dev-{d:02}\"\nkind = \"modbus-tcp\"\naddress = \"127.0.0.1:{}\"\ninterval = \"1s\"\npolicy = \"load\"\nprofile = \"load-100\"\n\n",
            base + d
        );
    }
    t += "[policies.load]\n";
    for p in 0..POINTS {
        t += &format!("fields.r{p:03} = {{ action = \"keep\", grade = \"internal\" }}\n");
    }
    std::fs::write(dir.join("gateway.toml"), t).unwrap();
}

fn main() {
    let seconds: u64 = std::env::var("SHUYUAN_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(60);
    let devices: u16 = std::env::var("SHUYUAN_BENCH_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    assert!(bin()
        .args(["certs", "dev-pki", "--gateway-id", "GW-BENCH", "--out"])
        .arg(d.join("certs"))
        .status()
        .unwrap()
        .success());

    let base = free_range(devices);
    let mut sim = bin()
        .args([
            "simulate",
            "--profile",
            "load",
            "--devices",
            &devices.to_string(),
            "--listen",
            &format!("127.0.0.1:{base}"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut sim_out = BufReader::new(sim.stdout.take().unwrap());
    for _ in 0..devices {
        let mut line = String::new();
        sim_out.read_line(&mut line).unwrap();
        assert!(line.starts_with("device "), "simulator said {line:?}");
    }

    let rport = free_port();
    std::fs::write(
        d.join("receiver.toml"),
        format!("listen = \"127.0.0.1:{rport}\"\nclient_ca = \"certs/platform-ca.pem\"\ncert = \"certs/platform-server.pem\"\nkey = \"certs/platform-server.key\"\nhpke_key = \"certs/platform-hpke.key\"\nout_dir = \"received\"\n"),
    )
    .unwrap();
    let mut receiver = bin()
        .args(["receive", "--config"])
        .arg(d.join("receiver.toml"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    write_gateway_config(d, devices, base, &format!("https://127.0.0.1:{rport}"));
    std::thread::sleep(Duration::from_millis(500));

    let mut gw = bin()
        .args(["run", "--config"])
        .arg(d.join("gateway.toml"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = gw.id();
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let rss_warm = status_kib(pid, "VmRSS:");
    std::thread::sleep(Duration::from_secs(seconds).saturating_sub(started.elapsed()));
    let cpu = cpu_seconds(pid);
    if std::env::var("SHUYUAN_BENCH_SMAPS").is_ok() {
        println!(
            "{}",
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap()
        );
        let maps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
        let mut cur = String::new();
        for l in maps.lines() {
            if l.contains('-') && !l.starts_with(|c: char| c.is_ascii_uppercase()) {
                cur = l.to_string();
            } else if let Some(v) = l.strip_prefix("Rss:") {
                let kb: u64 = v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0);
                if kb > 500 {
                    println!("{kb:>8} kB  {cur}");
                }
            }
        }
    }
    let hwm = status_kib(pid, "VmHWM:");
    let ran = started.elapsed().as_secs_f64();
    term(&mut gw);
    let status = gw.wait().unwrap();
    let total_run = started.elapsed().as_secs_f64();
    term(&mut sim);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut sim_out, &mut rest).unwrap();
    let served: u64 = rest
        .lines()
        .find_map(|l| l.strip_prefix("served "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let _ = sim.wait();
    std::thread::sleep(Duration::from_millis(300));
    term(&mut receiver);
    let _ = receiver.wait();

    let mut records = 0u64;
    let mut points = 0u64;
    if let Ok(rd) = std::fs::read_dir(d.join("received/GW-BENCH")) {
        for f in rd {
            for line in std::fs::read_to_string(f.unwrap().path()).unwrap().lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                records += 1;
                points += v["fields"].as_object().map_or(0, |m| m.len() as u64);
            }
        }
    }
    let read_points = served * u64::from(POINTS);
    println!("devices {devices} x {POINTS} holding registers, polled every 1 s for {ran:.1} s (stopped by SIGTERM, exit {status}, {total_run:.1} s with drain)");
    println!(
        "daemon CPU            {cpu:.2} s  = {:.3} CPU-s per minute (target <= 0.5)",
        cpu / ran * 60.0
    );
    println!(
        "daemon peak RSS       {:.1} MiB VmHWM (target <= 12), {:.1} MiB RSS at 2 s",
        hwm as f64 / 1024.0,
        rss_warm as f64 / 1024.0
    );
    println!(
        "polls answered        {served} by the simulator ({:.1}/s)",
        served as f64 / total_run
    );
    println!("records delivered     {records}, points {points}");
    println!(
        "points delivered      {:.4} of points read (target 1.0)",
        points as f64 / read_points.max(1) as f64
    );
}

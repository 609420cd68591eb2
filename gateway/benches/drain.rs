//! Backlog drain: an outbox holding SHUYUAN_BENCH_DRAIN_MIB (default 1024) MiB of sealed
//! batches is pushed by the real uplink over loopback mTLS to the reference receiver, and
//! compared, in the same run, with the same envelopes posted straight to a fresh receiver by
//! a bare client (the receiver alone: TLS, verify, decrypt, decompress, check, write, fsync).
//! Target: the drain takes at most twice the receiver-alone time.
//!
//! Run: cargo bench -p shuyuan --bench drain

// A benchmark panics on setup failures: there is no one to report to.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use shuyuan::config::OnFull;
use shuyuan::keys::{load_hpke_public, Signer};
use shuyuan::outbox::{Outbox, Quota};
use shuyuan::pki::DevPki;
use shuyuan::receiver::{Receiver, ReceiverConfig};
use shuyuan::seal::{seal, BatchMeta};
use shuyuan::uplink::{Backoff, Endpoint, HttpClient, Schedule, Uplink};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const BATCH_PLAIN: usize = 4 << 20;

/// JSON Lines that compress little (random-looking readings), like a busy gateway's batches
/// once zstd has taken the repetition out.
fn body(seed: u64) -> (Vec<u8>, u32) {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(BATCH_PLAIN + 512);
    let mut n = 0u32;
    while out.len() < BATCH_PLAIN {
        let mut vals = String::new();
        for f in 0..12 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            vals += &format!(
                "{}\"f{f}\":{}",
                if f > 0 { "," } else { "" },
                x % 1_000_000_007
            );
        }
        out.extend_from_slice(format!("{{\"source\":\"s\",\"ts\":\"2026-11-25T00:00:00.000Z\",\"seq\":{n},\"fields\":{{{vals}}}}}\n").as_bytes());
        n += 1;
    }
    (out, n)
}

async fn receiver(
    pki: &DevPki,
    out: std::path::PathBuf,
) -> (std::net::SocketAddr, CancellationToken) {
    let cfg = ReceiverConfig {
        listen: "127.0.0.1:0".into(),
        client_ca: pki.ca(),
        cert: pki.server_cert(),
        key: pki.server_key(),
        hpke_key: pki.hpke_private(),
        out_dir: out,
    };
    let r = Receiver::bind(&cfg).await.unwrap();
    let addr = r.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(r.serve(stop.clone()));
    (addr, stop)
}

fn client(pki: &DevPki, addr: std::net::SocketAddr) -> HttpClient {
    let tls =
        shuyuan::tls::client_config(&pki.ca(), &pki.gateway_cert(), &pki.gateway_key()).unwrap();
    HttpClient::new(
        Endpoint::parse(&format!("https://{addr}")).unwrap(),
        tls,
        Duration::from_secs(120),
    )
    .unwrap()
}

fn main() {
    let mib: usize = std::env::var("SHUYUAN_BENCH_DRAIN_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = shuyuan::pki::dev_pki(&dir.path().join("certs"), "GW-DRAIN", &[]).unwrap();
    let signer = Signer::load(&pki.gateway_key()).unwrap();
    let pk = load_hpke_public(&pki.hpke_public()).unwrap();

    rt.block_on(async {
        let quota = Quota {
            max_bytes: 64 << 30,
            on_full: OnFull::DropOldest,
            min_free_disk: 0,
        };
        let (outbox, _, _t) = Outbox::open(dir.path(), quota).unwrap();
        let mut envelopes = Vec::new();
        let mut total = 0usize;
        let mut seq = 0u64;
        while total < mib << 20 {
            seq += 1;
            let (b, n) = body(seq);
            let meta = BatchMeta {
                gateway_id: "GW-DRAIN",
                seq,
                created_ms: 1_795_568_400_000,
                records: n,
                pseudonym_key_id: "",
            };
            let env = bytes::Bytes::from(seal(&b, &meta, &pk, &signer, 1).unwrap());
            total += env.len();
            outbox
                .append(seq, 0, n, env.clone(), Default::default())
                .await
                .unwrap();
            envelopes.push((seq, env));
        }
        let batches = envelopes.len();

        // The receiver alone.
        let (addr, stop) = receiver(&pki, dir.path().join("alone")).await;
        let mut c = client(&pki, addr);
        let t = Instant::now();
        for (seq, env) in &envelopes {
            c.post_batch(&format!("GW-DRAIN/{seq}"), env.clone())
                .await
                .unwrap();
        }
        let alone = t.elapsed();
        stop.cancel();
        drop(envelopes);

        // The uplink draining the outbox.
        let (addr, stop) = receiver(&pki, dir.path().join("drained")).await;
        let stats = Arc::new(shuyuan::stats::PipelineStats::default());
        let uplink = Uplink {
            gateway_id: "GW-DRAIN".into(),
            outbox: outbox.clone(),
            clients: vec![client(&pki, addr)],
            every: None,
            schedule: Schedule::default(),
            max_bytes_per_sec: None,
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
            push_now: Arc::new(Notify::new()),
            wake: Arc::new(Notify::new()),
            sealed_all: CancellationToken::new(),
            stats: stats.clone(),
        };
        let up_stop = CancellationToken::new();
        let t = Instant::now();
        let task = tokio::spawn(uplink.run(up_stop.clone()));
        while outbox.depth().await.unwrap().batches > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let drain = t.elapsed();
        up_stop.cancel();
        let _ = task.await;
        stop.cancel();

        let mb = total as f64 / 1e6;
        println!(
            "{batches} sealed batches, {:.1} MiB, over loopback mTLS, one batch in flight",
            total as f64 / 1048576.0
        );
        println!(
            "receiver alone      {:>7.2} s  {:>7.1} MB/s  {:>6.1} batches/s",
            alone.as_secs_f64(),
            mb / alone.as_secs_f64(),
            batches as f64 / alone.as_secs_f64()
        );
        println!(
            "outbox drain        {:>7.2} s  {:>7.1} MB/s  {:>6.1} batches/s",
            drain.as_secs_f64(),
            mb / drain.as_secs_f64(),
            batches as f64 / drain.as_secs_f64()
        );
        println!(
            "drain / alone       {:>7.2}   (target <= 2.0)",
            drain.as_secs_f64() / alone.as_secs_f64()
        );
        assert_eq!(
            stats
                .batches_acked
                .load(std::sync::atomic::Ordering::Relaxed) as usize,
            batches
        );
    });
}

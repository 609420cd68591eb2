//! Pipeline throughput: synthetic utility records through the real stages (policy + batch
//! task → seal task → commit task → the real outbox: a synced segment frame per batch, its
//! SQLite index), against the limit set by the two costliest stages alone (zstd level 1, then
//! AES-256-GCM) on the same bytes, measured in the same run. Also: the policy stage alone, in field rules per second.
//!
//! Run: cargo bench -p shuyuan --bench pipeline   (SHUYUAN_BENCH_RECORDS=N to change size,
//! SHUYUAN_BENCH_TURNS=T the number of turns, default 9)

// A benchmark panics on setup failures: there is no one to report to.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use aes_gcm::aead::{Aead, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use shuyuan::batch::{self, Batcher, Limits, SourceEncoder};
use shuyuan::collect::{Names, Record, Value};
use shuyuan::config::{ActionKind, FieldRuleConfig, Grade, OnFull, PolicyConfig};
use shuyuan::daemon::{Sealer, ZSTD_LEVEL};
use shuyuan::keys::Signer;
use shuyuan::outbox::{Outbox, Quota};
use shuyuan::policy::Policy;
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

const SOURCES: usize = 50;

fn records(n: usize) -> Vec<Record> {
    let names: Vec<Arc<str>> = [
        "flow_m3h",
        "pressure_kpa",
        "level_m",
        "energy_kwh",
        "pump_running",
        "valve_pct",
        "temp_c",
        "chlorine_mgl",
        "turbidity_ntu",
        "alarm_code",
        "runtime_h",
        "serial",
    ]
    .iter()
    .map(|s| Arc::from(*s))
    .collect();
    let sources: Vec<Arc<str>> = (0..SOURCES)
        .map(|i| Arc::from(format!("pump-station-{i}")))
        .collect();
    // One names list for every record, as a device's point plan and tags give its records.
    let layout: Names = names
        .iter()
        .cloned()
        .chain([Arc::from("station"), Arc::from("meter_id")])
        .collect();
    let station: Arc<str> = Arc::from("和平区3号泵站");
    let meter: Arc<str> = Arc::from("WTR-1201-000317");
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        // xorshift: values vary like sensor readings, so zstd sees realistic entropy.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..n)
        .map(|i| {
            let round = |v: f64, p: f64| (v * p).round() / p;
            let mut values = vec![
                Value::Float(round(90.0 + next() * 60.0, 1000.0)),
                Value::Float(round(280.0 + next() * 70.0, 10.0)),
                Value::Float(round(3.0 + next() * 2.5, 100.0)),
                Value::UInt(1_250_000 + i as u64 / 7),
                Value::Bool(next() > 0.1),
                Value::UInt((next() * 100.0) as u64),
                Value::Float(round(8.0 + next() * 15.0, 10.0)),
                Value::Float(round(0.2 + next() * 0.4, 100.0)),
                Value::Float(round(next() * 2.0, 100.0)),
                Value::UInt(if next() > 0.98 { 17 } else { 0 }),
                Value::UInt(40_000 + (i / 3600) as u64),
                Value::UInt(99_887_766),
            ];
            values.push(Value::Text(station.clone()));
            values.push(Value::Text(meter.clone()));
            Record {
                source: sources[i % SOURCES].clone(),
                ts_ms: 1_795_568_400_000 + i as i64 * 20 + (next() * 10.0) as i64,
                seq: i as u64,
                names: layout.clone(),
                values,
            }
        })
        .collect()
}

fn policy() -> Policy {
    let mut cfg = PolicyConfig::default();
    let rule = FieldRuleConfig::new;
    for f in [
        "flow_m3h",
        "pressure_kpa",
        "level_m",
        "energy_kwh",
        "pump_running",
        "valve_pct",
        "temp_c",
        "chlorine_mgl",
        "turbidity_ntu",
        "alarm_code",
        "runtime_h",
    ] {
        cfg.fields
            .insert(f.into(), rule(ActionKind::Keep, Grade::Internal));
    }
    cfg.fields
        .insert("station".into(), rule(ActionKind::Keep, Grade::Public));
    let mut m = rule(ActionKind::Mask, Grade::Personal);
    m.keep_head = Some(4);
    m.keep_tail = Some(2);
    cfg.fields.insert("meter_id".into(), m);
    Policy::compile(&cfg, None).unwrap()
}

fn limits() -> Limits {
    Limits {
        max_records: 5000,
        max_bytes: 4 << 20,
        max_age: Duration::from_secs(3600),
    }
}

fn signer() -> Arc<Signer> {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
        .unwrap();
    Arc::new(Signer::from_pkcs8(pkcs8.as_ref()).unwrap())
}

fn best_of<T>(runs: usize, mut f: impl FnMut() -> (Duration, T)) -> (Duration, T) {
    let mut best = f();
    for _ in 1..runs {
        let r = f();
        if r.0 < best.0 {
            best = r;
        }
    }
    best
}

/// The real stages, as tasks on a 2-worker runtime like the daemon's.
fn run_pipeline(pool: &[Record], n: usize, policy: &Arc<Policy>) -> (Duration, Duration, u64) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    rt.block_on(async {
        let (sk_pk_dummy, pk) = shuyuan::seal::derive_hpke_keypair(b"bench");
        drop(sk_pk_dummy);
        let quota = Quota {
            max_bytes: 8 << 30,
            on_full: OnFull::DropOldest,
            min_free_disk: 0,
        };
        let (outbox, _, _thread) = Outbox::open(dir.path(), quota).unwrap();
        let stats = Arc::new(shuyuan::stats::PipelineStats::default());
        let mut policies = HashMap::new();
        for r in pool.iter().take(SOURCES) {
            policies.insert(r.source.clone(), policy.clone());
        }
        let (rtx, rrx) = mpsc::channel(1024);
        let (btx, brx) = mpsc::channel(2);
        let sealed_all = CancellationToken::new();
        let sealer = Sealer {
            gateway_id: "GW-BENCH".into(),
            pseudonym_key_id: String::new(),
            recipient: pk,
            signer: signer(),
            outbox: outbox.clone(),
            next_seq: 1,
            wake: Arc::new(Notify::new()),
            stats: stats.clone(),
        };
        let input: Vec<Record> = (0..n)
            .map(|i| {
                let mut r = pool[i % pool.len()].clone();
                r.seq = i as u64;
                r
            })
            .collect();
        let (start, cpu) = (Instant::now(), process_cpu());
        tokio::spawn(batch::run(rrx, btx, policies, limits(), stats.clone()));
        tokio::spawn(sealer.run(brx, CancellationToken::new(), sealed_all.clone()));
        // The producer stands in for the sources. The records are made before the clock
        // starts (making them is the sources' work, not the pipeline's); handing them over
        // the bounded channel and freeing them after encoding are timed. It hands them over
        // as the daemon's one high-rate source (files) does: room for a chunk of 256
        // reserved at once (a Modbus device sends one record a poll, far below these rates).
        send_chunked(&rtx, input).await;
        drop(rtx);
        sealed_all.cancelled().await;
        let (took, cpu) = (start.elapsed(), process_cpu() - cpu);
        let bytes = outbox.depth().await.unwrap().bytes;
        (took, cpu, bytes)
    })
}

/// Hands `input` over in chunks of 256 with one reservation each, as the file source does.
async fn send_chunked(tx: &mpsc::Sender<Record>, input: Vec<Record>) {
    let mut input = input.into_iter().peekable();
    while input.peek().is_some() {
        let permits = tx.reserve_many(256.min(input.len())).await.unwrap();
        for (permit, r) in permits.zip(&mut input) {
            permit.send(r);
        }
    }
}

/// The pipeline's first hand-off alone: the same records over the same bounded channel to a
/// task that takes them in chunks and frees them, on the same 2-worker runtime.
fn run_handoff(pool: &[Record], n: usize) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let input: Vec<Record> = (0..n).map(|i| pool[i % pool.len()].clone()).collect();
    rt.block_on(async {
        let (tx, mut rx) = mpsc::channel::<Record>(1024);
        let start = Instant::now();
        let taker = tokio::spawn(async move {
            let mut chunk = Vec::with_capacity(256);
            while rx.recv_many(&mut chunk, 256).await > 0 {
                chunk.clear();
            }
        });
        send_chunked(&tx, input).await;
        drop(tx);
        taker.await.unwrap();
        start.elapsed()
    })
}

/// Records per pool: one batch's worth. The single-core measures below cycle through it, so
/// the working set stays in cache as it does when records flow from polls.
const POOL: usize = 5000;

/// The policy-and-batch work alone on one core: the pool encoded `rounds` times into
/// batches as the stage makes them; returns the time and the batches' bodies.
fn encode_alone(pool: &[Record], rounds: usize, policy: &Arc<Policy>) -> (Duration, Vec<Vec<u8>>) {
    let mut batches = Vec::new();
    let mut b = Batcher::new(limits());
    let mut encoders: HashMap<Arc<str>, SourceEncoder> = HashMap::new();
    let mut took = Duration::ZERO;
    for round in 0..rounds {
        let mut input = pool.to_vec();
        let s = Instant::now();
        for (i, r) in input.iter_mut().enumerate() {
            r.seq = (round * POOL + i) as u64;
            if !encoders.contains_key(&r.source) {
                let e = SourceEncoder::new(&r.source, policy.clone());
                encoders.insert(r.source.clone(), e);
            }
            let enc = encoders.get_mut(&r.source).unwrap();
            if let Some(done) = b.push_with(&r.source, r.seq, |out| enc.encode(r, out)) {
                batches.push(done.body);
            }
        }
        drop(input);
        took += s.elapsed();
    }
    batches.extend(b.take().map(|d| d.body));
    (took, batches)
}

/// CPU time this process has used, all threads (clock ticks of 10 ms).
fn process_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    // The fields after the command name (which is in parentheses): utime is the 14th field
    // of the line, stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = rest
        .split(' ')
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    Duration::from_millis((f[0] + f[1]) * 10)
}

/// A positive count from the environment, or `default`.
fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&c| c > 0)
        .unwrap_or(default)
}

fn main() {
    let turns = env_count("SHUYUAN_BENCH_TURNS", 9);
    let n = env_count("SHUYUAN_BENCH_RECORDS", 200_000);
    let rounds = n.div_ceil(POOL);
    let n = rounds * POOL;
    let pool = records(POOL);
    let policy = Arc::new(policy());

    // The same bytes the pipeline compresses: policy output as JSON Lines batches.
    let (_, batches) = encode_alone(&pool, rounds, &policy);
    let plain: usize = batches.iter().map(Vec::len).sum();
    let compress_all = || -> Vec<Vec<u8>> {
        batches
            .iter()
            .map(|b| zstd::bulk::compress(b, ZSTD_LEVEL).unwrap())
            .collect()
    };
    let compressed = compress_all();
    let comp: usize = compressed.iter().map(Vec::len).sum();
    let cipher = Aes256Gcm::new_from_slice(&[7u8; 32]).unwrap();
    let encrypt_all = || -> usize {
        compressed
            .iter()
            .map(|c| {
                cipher
                    .encrypt(Nonce::from_slice(&[1u8; 12]), c.as_slice())
                    .unwrap()
                    .len()
            })
            .sum()
    };
    let (hpke_pk, sg) = (shuyuan::seal::derive_hpke_keypair(b"bench").1, signer());
    let seal_all = || -> Vec<Vec<u8>> {
        batches
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let meta = shuyuan::seal::BatchMeta {
                    gateway_id: "GW-BENCH",
                    seq: i as u64,
                    created_ms: 0,
                    records: 5000,
                    pseudonym_key_id: "",
                };
                shuyuan::seal::seal(b, &meta, &hpke_pk, &sg, ZSTD_LEVEL).unwrap()
            })
            .collect()
    };

    // Every measure is taken in turns (nine by default), and the best of each kept: these
    // machines' speed drifts by a third within a minute, and measuring one thing after the
    // other compared a fast minute with a slow one. The pipeline's CPU time (all threads)
    // is kept from its best turn.
    let mut best = [Duration::MAX; 6];
    let (mut stored, mut pipe_cpu) = (0, Duration::ZERO);
    let mut sealed = Vec::new();
    let turn = |best: &mut [Duration; 6], i: usize, t: Duration| best[i] = best[i].min(t);
    // Each turn's own ratio too (its limit and its pipeline measured a second apart): one
    // lucky second for either moves the ratio of the bests, not the median of these.
    let mut turn_ratios = Vec::new();
    for _ in 0..turns {
        let s = Instant::now();
        std::hint::black_box(compress_all());
        let t_zstd = s.elapsed();
        let s = Instant::now();
        std::hint::black_box(encrypt_all());
        let t_aes = s.elapsed();
        turn(&mut best, 0, t_zstd);
        turn(&mut best, 1, t_aes);
        let (t, cpu, bytes) = run_pipeline(&pool, n, &policy);
        turn_ratios.push((t_zstd + t_aes).as_secs_f64() / t.as_secs_f64());
        if t < best[2] {
            (stored, pipe_cpu) = (bytes, cpu);
        }
        turn(&mut best, 2, t);
        turn(&mut best, 3, encode_alone(&pool, rounds, &policy).0);
        let s = Instant::now();
        sealed = seal_all();
        turn(&mut best, 4, s.elapsed());
        turn(&mut best, 5, run_handoff(&pool, n));
    }
    let [t_zstd, t_aes, t_pipe, t_build, t_seal, t_handoff] = best;
    let t_encode = {
        let mut done = pool.clone();
        for r in &mut done {
            policy.apply(r);
        }
        let mut buf = Vec::with_capacity(4 << 20);
        let s = Instant::now();
        for _ in 0..rounds {
            buf.clear();
            for r in &done {
                shuyuan::batch::encode_line(r, &mut buf);
            }
            std::hint::black_box(&buf);
        }
        s.elapsed()
    };
    let (t_policy, fields) = best_of(3, || {
        let mut took = Duration::ZERO;
        let mut rules = 0u64;
        for _ in 0..rounds {
            let mut copy = pool.clone();
            let s = Instant::now();
            for r in &mut copy {
                rules += r.values.len() as u64;
                std::hint::black_box(policy.apply(r));
            }
            took += s.elapsed();
        }
        (took, rules)
    });
    let t_commit = {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        rt.block_on(async {
            let (ob, _, _t) = Outbox::open(
                dir.path(),
                Quota {
                    max_bytes: 8 << 30,
                    on_full: OnFull::DropOldest,
                    min_free_disk: 0,
                },
            )
            .unwrap();
            let s = Instant::now();
            for (i, e) in sealed.iter().enumerate() {
                ob.append(i as u64 + 1, 0, 5000, e.clone().into(), Default::default())
                    .await
                    .unwrap();
            }
            s.elapsed()
        })
    };

    let rate = |t: Duration| n as f64 / t.as_secs_f64();
    let limit = n as f64 / (t_zstd + t_aes).as_secs_f64();
    let pipe = rate(t_pipe);
    println!("records: {n} ({SOURCES} sources, 14 fields each), JSON Lines {:.1} MiB, zstd-1 -> {:.1} MiB ({:.2}x)", plain as f64 / 1048576.0, comp as f64 / 1048576.0, plain as f64 / comp as f64);
    println!(
        "zstd level 1 alone      {:>12.0} records/s  {:>8.1} MB/s of JSON",
        rate(t_zstd),
        plain as f64 / t_zstd.as_secs_f64() / 1e6
    );
    println!(
        "AES-256-GCM alone       {:>12.0} records/s  {:>8.1} MB/s of compressed",
        rate(t_aes),
        comp as f64 / t_aes.as_secs_f64() / 1e6
    );
    println!("limit (zstd + AES)      {limit:>12.0} records/s");
    println!("pipeline                {pipe:>12.0} records/s  (policy+batch -> seal -> outbox commit; {:.1} MiB stored)", stored as f64 / 1048576.0);
    println!(
        "ratio pipeline / limit  {:>12.2}  (target >= 0.80)",
        pipe / limit
    );
    let shown: Vec<String> = turn_ratios.iter().map(|r| format!("{r:.2}")).collect();
    turn_ratios.sort_by(f64::total_cmp);
    println!(
        "ratio in each turn      {}  (median {:.2})",
        shown.join(" "),
        turn_ratios[turn_ratios.len() / 2]
    );
    println!("seal alone (zstd+HPKE+ECDSA) {:>7.0} records/s; outbox commits alone {:>9.0} records/s ({} commits, {:.1} ms each)",
        rate(t_seal), rate(t_commit), sealed.len(), t_commit.as_secs_f64() * 1000.0 / sealed.len() as f64);
    println!(
        "record hand-off alone   {:>12.0} records/s  (bounded channel to the batch task, freeing included)",
        rate(t_handoff)
    );
    println!(
        "JSON encoding alone     {:>12.0} records/s on one core",
        rate(t_encode)
    );
    println!(
        "policy + JSON batching  {:>12.0} records/s on one core",
        rate(t_build)
    );
    println!(
        "policy stage alone      {:>12.0} field rules/s on one core",
        fields as f64 / t_policy.as_secs_f64()
    );
    // Where the pipeline's time goes: its CPU time per record against the sum of its parts
    // measured alone. On two cores the pipeline cannot beat half that sum.
    let us = |t: Duration| t.as_secs_f64() * 1e6 / n as f64;
    println!(
        "pipeline CPU            {:>12.2} us/record on {:.2} cores; parts alone: policy+JSON {:.2} + seal {:.2} + commit {:.2} + hand-off {:.2} = {:.2} us",
        us(pipe_cpu),
        pipe_cpu.as_secs_f64() / t_pipe.as_secs_f64(),
        us(t_build),
        us(t_seal),
        us(t_commit),
        us(t_handoff),
        us(t_build + t_seal + t_commit + t_handoff)
    );
}

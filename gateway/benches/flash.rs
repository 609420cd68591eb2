//! Flash wear: bytes the outbox writes to storage per record, against the sealed size. Sealed
//! batches of telemetry are committed and acknowledged (deleted) the way a running gateway
//! does, and the process's write(2) bytes (`wchar` in /proc/self/io: SQLite's WAL, checkpoints
//! and main-file writes) are compared with the envelope bytes.
//!
//! Run: cargo bench -p shuyuan --bench flash

// A benchmark panics on setup failures: there is no one to report to.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use shuyuan::config::OnFull;
use shuyuan::keys::Signer;
use shuyuan::outbox::{Outbox, Quota};
use shuyuan::seal::{derive_hpke_keypair, seal, BatchMeta};

fn io(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/io").unwrap();
    s.lines().find_map(|l| l.strip_prefix(key)).unwrap().trim().parse().unwrap()
}

fn main() {
    let batches: u64 = std::env::var("SHUYUAN_BENCH_BATCHES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let records_per_batch = 60u32; // one minute of one-second polls
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new()).unwrap();
    let signer = Signer::from_pkcs8(pkcs8.as_ref()).unwrap();
    let (_, pk) = derive_hpke_keypair(b"flash");
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (ob, _, _t) = Outbox::open(dir.path(), Quota { max_bytes: 1 << 30, on_full: OnFull::DropOldest }).unwrap();
        let mut sealed = 0u64;
        let mut x = 7u64;
        let start = io("wchar:");
        for seq in 1..=batches {
            let mut body = String::new();
            for r in 0..records_per_batch {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                body += &format!(
                    "{{\"source\":\"pump-station-3\",\"ts\":\"2026-11-25T01:{:02}:{:02}.000Z\",\"seq\":{},\"fields\":{{\"flow_m3h\":{:.3},\"pressure_kpa\":{:.1},\"pump_running\":true,\"energy_kwh\":{}}}}}\n",
                    seq % 60, r, seq * 60 + u64::from(r), 100.0 + (x % 5000) as f64 / 100.0, 300.0 + (x % 700) as f64 / 10.0, 1_250_000 + seq * 60 + u64::from(r)
                );
            }
            let meta = BatchMeta { gateway_id: "GW-FLASH", seq, created_ms: 0, records: records_per_batch, pseudonym_key_id: "" };
            let env = seal(body.as_bytes(), &meta, &pk, &signer, 1).unwrap();
            sealed += env.len() as u64;
            ob.append(seq, 0, records_per_batch, env.into(), BTreeMap::new()).await.unwrap();
            // The platform acks each batch soon after: the steady state of a healthy link.
            if seq > 2 {
                ob.ack(seq - 2).await.unwrap();
            }
        }
        let written = io("wchar:") - start;
        let records = batches * u64::from(records_per_batch);
        println!("{batches} batches of {records_per_batch} records, sealed {:.1} KiB each on average", sealed as f64 / batches as f64 / 1024.0);
        println!("sealed bytes          {:>12}  ({:.1} per record)", sealed, sealed as f64 / records as f64);
        println!("written by the outbox {:>12}  ({:.1} per record)", written, written as f64 / records as f64);
        println!("written / sealed      {:>12.2}  (target <= 1.5)", written as f64 / sealed as f64);
    });
}

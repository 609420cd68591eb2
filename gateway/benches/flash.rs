//! Flash wear: bytes the outbox writes to storage per record, against the sealed size. Sealed
//! batches of telemetry are committed and acknowledged (deleted) the way a running gateway
//! does, and the process's write(2) bytes (`wchar` in /proc/self/io: segment frames, SQLite's
//! WAL, checkpoints and main-file writes) and block-layer bytes (`write_bytes`) are compared
//! with the envelope bytes.
//!
//! Run: cargo bench -p shuyuan --bench flash

// A benchmark panics on setup failures: there is no one to report to.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use shuyuan::batch::{BatchRules, RuleCounts};
use shuyuan::config::OnFull;
use shuyuan::keys::Signer;
use shuyuan::outbox::{Outbox, Quota};
use shuyuan::policy::Tally;
use shuyuan::seal::{derive_hpke_keypair, seal, BatchMeta};

fn io(key: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/io").unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

fn main() {
    // Records per batch: one device polled every second for a minute (60) or five (300), ten
    // devices for a minute (600), fifty (3000).
    for (records_per_batch, batches) in [(60u32, 3000u64), (300, 1000), (600, 1000), (3000, 300)] {
        run(records_per_batch, batches);
    }
}

fn run(records_per_batch: u32, batches: u64) {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
        .unwrap();
    let signer = Signer::from_pkcs8(pkcs8.as_ref()).unwrap();
    let (_, pk) = derive_hpke_keypair(b"flash");
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (ob, _, _t) = Outbox::open(dir.path(), Quota { max_bytes: 1 << 30, on_full: OnFull::DropOldest, min_free_disk: 0 }).unwrap();
        let mut sealed = 0u64;
        let mut x = 7u64;
        let start = io("wchar:");
        let start_dev = io("write_bytes:");
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
            // With what the daemon commits alongside: the source's last record number and the
            // policy's counts (four fields kept, one masked), which go to the audit trail.
            let mut source_seqs = BTreeMap::new();
            source_seqs.insert(Arc::from("pump-station-3"), seq * u64::from(records_per_batch));
            let n = u64::from(records_per_batch);
            let counts: RuleCounts = [
                ((Arc::from("flow_m3h"), "keep"), n),
                ((Arc::from("pressure_kpa"), "keep"), n),
                ((Arc::from("pump_running"), "keep"), n),
                ((Arc::from("energy_kwh"), "keep"), n),
                ((Arc::from("meter_no"), "mask"), n),
            ]
            .into_iter()
            .collect();
            let mut rules = BatchRules::new();
            rules.insert(Arc::from("pump-station-3"), Arc::new(counts));
            let tally = Tally { records: records_per_batch, kept: 4 * records_per_batch, masked: records_per_batch, dropped: 0, unlisted: 0 };
            ob.append_audited(seq, 0, records_per_batch, env.into(), source_seqs, tally, Arc::new(rules)).await.unwrap();
            // The platform acks each batch soon after: the steady state of a healthy link.
            if seq > 2 {
                ob.ack(seq - 2).await.unwrap();
            }
        }
        let written = io("wchar:") - start;
        let dev = io("write_bytes:") - start_dev;
        let records = batches * u64::from(records_per_batch);
        println!(
            "{batches:>5} batches of {records_per_batch:>4} records ({:>7.1} KiB sealed each): {:>6.1} B sealed and {:>7.1} B written per record, written/sealed {:.2}",
            sealed as f64 / batches as f64 / 1024.0,
            sealed as f64 / records as f64,
            written as f64 / records as f64,
            written as f64 / sealed as f64
        );
        println!("      block layer (write_bytes): {:.1} B per record, {:.2}x sealed", dev as f64 / records as f64, dev as f64 / sealed as f64);
    });
}

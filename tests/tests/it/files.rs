//! The file-drop source end to end: GBK exports dropped into a spool, read through the
//! policy, sealed, delivered; bad rows recorded by line; a wrong header rejected; marker
//! files and moving; the same content never sent twice; SIGKILL mid-file loses and repeats
//! nothing; a destruction cut short is finished at the next start.

use std::path::Path;
use std::time::Duration;

use shuyuan::sim_files::{billing_export, billing_row, mobile, resident_id, write_export};
use shuyuan_tests::*;

/// A billing-export source on `<world>/spool`, and the customer policy.
fn billing_source(extra: &str) -> String {
    format!(
        r#"
[[sources]]
id = "billing"
kind = "file"
spool = "spool"
pattern = "*.csv"
encoding = "gbk"
settle = "100ms"
interval = "100ms"
policy = "customer"
{extra}
{}

{}
"#,
        shuyuan::sim_files::BILLING_COLUMNS_TOML,
        shuyuan::sim_files::BILLING_POLICY_TOML
    )
}

fn gbk(text: &str) -> Vec<u8> {
    encoding_rs::GBK.encode(text).0.into_owned()
}

fn seqs(recs: &[serde_json::Value]) -> Vec<u64> {
    recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
}

/// Every byte of every file under `dir`.
fn all_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.extend(b);
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn audit_kinds(world: &World) -> Vec<(String, serde_json::Value)> {
    shuyuan::outbox::admin::audit_list(&world.path().join("state"), 0, 100_000)
        .unwrap()
        .into_iter()
        .map(|e| (e.kind, e.detail))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gbk_export_is_delivered_once_bad_rows_recorded_and_the_file_destroyed() {
    let world = World::new();
    let spool = world.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let rx = start_receiver(&world, None).await;
    let cfg = gateway_config(&world, &rx.url(), "300ms", &billing_source(""));

    // 300 good rows, then two bad ones: an amount that is not a number, and a short row.
    let mut text = billing_export(0, 300);
    text.push_str(
        "1299998,坏行,11010519491231002X,13800000000,天津市,WTR-X,2026-10-31,1.0,十二元,\r\n",
    );
    text.push_str("1299999,短行\r\n");
    write_export(&spool.join("bill-202610.csv"), &gbk(&text)).unwrap();
    // A file whose header does not match: rejected, left where it is, recorded.
    write_export(&spool.join("other.csv"), &gbk("编号,名称\r\n1,甲\r\n")).unwrap();

    let gw = start_gateway(cfg.clone());
    assert!(
        wait_until(Duration::from_secs(30), || async {
            rx.records(GATEWAY_ID).len() >= 300 && !spool.join("bill-202610.csv").exists()
        })
        .await,
        "the export is delivered and then destroyed ({} records so far)",
        rx.records(GATEWAY_ID).len()
    );
    let recs = rx.records(GATEWAY_ID);
    assert_eq!(seqs(&recs), (1..=300).collect::<Vec<u64>>());
    // Typed and de-identified as configured: the decimal is exact, the month generalised,
    // the ID number gone, the phone masked, the remark scrubbed.
    let r = &recs[7]["fields"];
    assert!(r.get("id_card").is_none());
    assert_eq!(r["bill_month"], "2026-10");
    assert_eq!(
        r["phone"]
            .as_str()
            .unwrap()
            .chars()
            .filter(|c| *c == '*')
            .count(),
        4
    );
    let received = all_bytes(&world.path().join("received"));
    let row7 = billing_row(7);
    let amount7 = row7.split(',').nth(8).unwrap();
    assert!(
        contains(&received, &format!("\"amount_yuan\":{amount7}")),
        "the amount arrives as written: {amount7}"
    );

    // Nothing raw anywhere the gateway writes: not the ID numbers, phones or names.
    let state = all_bytes(&world.path().join("state"));
    for n in [0u64, 7, 150, 299] {
        for raw in [resident_id(n), mobile(n)] {
            assert!(!contains(&state, &raw), "raw value of row {n} on disk");
            assert!(!contains(&received, &raw), "raw value of row {n} delivered");
        }
    }

    // The file goes first, then its entry on the trail.
    assert!(
        wait_until(Duration::from_secs(10), || async {
            audit_kinds(&world)
                .iter()
                .any(|(k, _)| k == "file_disposed")
        })
        .await
    );
    let audit = audit_kinds(&world);
    let ingested = audit
        .iter()
        .find(|(k, _)| k == "file_ingested")
        .expect("file_ingested on the trail");
    assert_eq!(ingested.1["records"], 300);
    assert_eq!(ingested.1["rows_bad"], 2);
    assert_eq!(ingested.1["file"], "bill-202610.csv");
    assert!(audit
        .iter()
        .any(|(k, d)| k == "file_disposed" && d["note"].as_str().unwrap().contains("overwritten")));
    let rejected = audit
        .iter()
        .find(|(k, _)| k == "file_rejected")
        .expect("the mismatched file is rejected on the trail");
    assert!(rejected.1["reason"].as_str().unwrap().contains("户号"));
    assert!(
        spool.join("other.csv").exists(),
        "a rejected file stays for the operator"
    );

    // The bad rows, by line (the header is line 1), without their content.
    let src = gw
        .stats
        .sources
        .lock()
        .unwrap()
        .iter()
        .find(|(id, _)| &**id == "billing")
        .map(|(_, s)| s.clone())
        .unwrap();
    assert_eq!(src.rows_bad.load(std::sync::atomic::Ordering::Relaxed), 2);
    let bad = shuyuan::outbox::admin::file_bad_rows(&world.path().join("state"), "", 10).unwrap();
    let lines: Vec<u64> = bad.iter().map(|b| b.1).collect();
    assert_eq!(lines, vec![302, 303]);
    assert!(bad[0].2.contains("amount_yuan") && !bad[0].2.contains("十二元"));

    // The same content again, under another name: not sent twice, and disposed of.
    write_export(&spool.join("bill-202610-resent.csv"), &gbk(&text)).unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            !spool.join("bill-202610-resent.csv").exists()
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        rx.records(GATEWAY_ID).len(),
        300,
        "a duplicate is not sent again"
    );
    gw.shutdown().await.unwrap();
    // The store was closed on the way out (its WAL folded in and removed): no handle to it
    // outlived the stages.
    assert!(
        !world.path().join("state/outbox.sqlite-wal").exists(),
        "the store's connection was closed at shutdown"
    );
    // Per rule, over every sealed batch: exactly one outcome per row and field.
    // Indexed in groups, at the latest when the store closes.
    let audit = audit_kinds(&world);
    let rule = |field: &str, outcome: &str| -> u64 {
        audit
            .iter()
            .filter(|(k, _)| k == "batches_sealed")
            .flat_map(|(_, d)| d["rules"].as_array().cloned().unwrap_or_default())
            .filter(|g| g["sources"].as_array().unwrap().contains(&"billing".into()))
            .filter_map(|g| g["fields"][field][outcome].as_u64())
            .sum()
    };
    assert_eq!(rule("id_card", "drop"), 300);
    assert_eq!(rule("phone", "mask"), 300);
    assert_eq!(rule("address", "generalize"), 300);
    assert_eq!(rule("amount_yuan", "keep"), 300);
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jsonl_with_a_marker_waits_for_it_and_is_moved_after() {
    let world = World::new();
    let spool = world.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let rx = start_receiver(&world, None).await;
    let body = r#"
[[sources]]
id = "swipes"
kind = "file"
spool = "spool"
format = "jsonl"
marker = ".done"
after = "move"
move_to = "ingested"
interval = "100ms"
policy = "transit"
time_column = "at"
columns = [
  { name = "at", header = "time", type = "timestamp", format = "%Y%m%d%H%M%S", required = true },
  { name = "fare", type = "decimal" },
  { name = "card", header = "card_no" },
]

[policies.transit]
fields.at = { action = "keep", grade = "internal" }
fields.fare = { action = "keep", grade = "internal" }
fields.card = { action = "mask", keep_tail = 2, grade = "personal" }
"#;
    let cfg = gateway_config(&world, &rx.url(), "200ms", body);
    let lines: String = (0..50)
        .map(|i| {
            format!(
                "{{\"time\":\"202611250{}{:02}00\",\"fare\":\"2.{:02}\",\"card_no\":\"31000{i:05}\",\"line\":\"地铁1号线\"}}\n",
                8,
                i,
                i
            )
        })
        .collect();
    std::fs::write(spool.join("swipes-1.jsonl"), &lines).unwrap();
    let gw = start_gateway(cfg);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(
        rx.records(GATEWAY_ID).is_empty(),
        "nothing is taken before the marker exists"
    );
    std::fs::write(spool.join("swipes-1.jsonl.done"), b"").unwrap();
    // The file is moved, then its marker removed, then the move put on the trail: once the
    // trail has it, the spool holds neither.
    let moved_on_trail = wait_until(Duration::from_secs(20), || async {
        audit_kinds(&world)
            .iter()
            .any(|(k, d)| k == "file_disposed" && d["note"].as_str().unwrap().contains("moved to"))
    })
    .await;
    assert!(moved_on_trail, "the move is on the trail");
    assert!(
        world.path().join("ingested/swipes-1.jsonl").exists(),
        "moved after ingestion"
    );
    assert!(!spool.join("swipes-1.jsonl").exists() && !spool.join("swipes-1.jsonl.done").exists());
    // Disposal follows the commit to the outbox, not the upload: the records may still be on
    // their way.
    assert!(
        wait_until(Duration::from_secs(20), || async {
            rx.records(GATEWAY_ID).len() >= 50
        })
        .await,
        "all rows delivered ({} so far)",
        rx.records(GATEWAY_ID).len()
    );
    let recs = rx.records(GATEWAY_ID);
    assert_eq!(recs.len(), 50);
    // The record time is the row's own (UTC+8 by default), not the time of ingestion.
    assert_eq!(recs[3]["ts"], "2026-11-25T00:03:00.000Z");
    assert_eq!(recs[3]["fields"]["card"], "********03");
    assert!(
        recs[3]["fields"].get("line").is_none(),
        "unlisted: default deny"
    );
    gw.shutdown().await.unwrap();
    rx.shutdown().await;
}

/// Kills per run of the crash loop below.
const KILLS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_file_resumes_without_losing_or_repeating_a_row() {
    let world = World::new();
    let spool = world.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let rx = start_receiver(&world, None).await;
    gateway_config(&world, &rx.url(), "200ms", &billing_source(""));
    // Several files, so kills land inside files, between them and while disposing.
    const FILES: u64 = 6;
    const ROWS: u64 = 15_000;
    for f in 0..FILES {
        let text = billing_export(f * ROWS, ROWS);
        write_export(&spool.join(format!("bill-{f}.csv")), &gbk(&text)).unwrap();
    }
    let log = world.path().join("gateway.log");
    let mut jitter = Jitter::new(0x5eed_0f11);
    for _ in 0..KILLS {
        let mut gw = spawn_gateway_process(&world, &log);
        tokio::time::sleep(jitter.between(Duration::from_millis(300), Duration::from_millis(1500)))
            .await;
        gw.kill().unwrap(); // SIGKILL
        gw.wait().unwrap();
    }
    let mut gw = spawn_gateway_process(&world, &log);
    let total = (FILES * ROWS) as usize;
    let done = wait_until(Duration::from_secs(120), || async {
        rx.records(GATEWAY_ID).len() >= total && std::fs::read_dir(&spool).unwrap().next().is_none()
    })
    .await;
    let status = terminate(&mut gw, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "clean stop: {status:?}"
    );
    let recs = rx.records(GATEWAY_ID);
    assert!(
        done,
        "all rows delivered and the spool emptied: {} of {total}",
        recs.len()
    );
    assert_eq!(
        seqs(&recs),
        (1..=total as u64).collect::<Vec<u64>>(),
        "every row exactly once, in order, across {KILLS} SIGKILLs"
    );
    // And each row is the one its number says (files and rows in order).
    for n in [0u64, 14_999, 15_000, 44_444, total as u64 - 1] {
        let amount = billing_row(n).split(',').nth(8).unwrap().to_string();
        let got = &recs[n as usize]["fields"]["amount_yuan"];
        assert_eq!(
            got.to_string().parse::<f64>().unwrap(),
            amount.parse::<f64>().unwrap(),
            "row {n}"
        );
    }
    let ingested = audit_kinds(&world)
        .into_iter()
        .filter(|(k, _)| k == "file_ingested")
        .count();
    assert_eq!(ingested, FILES as usize, "each file on the trail once");
    let disposed = audit_kinds(&world)
        .into_iter()
        .filter(|(k, _)| k == "file_disposed")
        .count();
    assert_eq!(
        disposed, FILES as usize,
        "each file's disposal on the trail once"
    );
    let resumed = std::fs::read_to_string(&log)
        .unwrap()
        .matches("resuming a file")
        .count();
    eprintln!("file crash loop: {KILLS} SIGKILLs, {resumed} restarts inside a file");
    assert!(resumed > 0, "at least one kill landed inside a file");
    rx.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destruction_cut_short_is_finished_at_the_next_start_and_put_on_the_trail() {
    let world = World::new();
    let spool = world.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let rx = start_receiver(&world, None).await;
    gateway_config(&world, &rx.url(), "200ms", &billing_source(""));
    let old = gbk(&billing_export(0, 50));
    let sha = {
        let p = world.path().join("old.csv");
        std::fs::write(&p, &old).unwrap();
        let sha = shuyuan::collect::file::sha256_file(&p).unwrap();
        std::fs::remove_file(&p).unwrap();
        sha
    };
    // The state a stop leaves part-way through destroying a file: in the ledger its records
    // are committed (the calls the source makes before disposing of it), and in the spool it
    // is under the destroying name with only its first block zeroed, personal data after it.
    {
        let quota = shuyuan::outbox::Quota {
            max_bytes: 1 << 30,
            on_full: shuyuan::config::OnFull::DropOldest,
            min_free_disk: 0,
        };
        let state = world.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let (ob, _, h) = shuyuan::outbox::Outbox::open(&state, quota).unwrap();
        committed_in_ledger(&ob, &sha, "bill-old.csv", 1, 50).await;
        // And one whose destruction ended just before the stop: gone, its disposal unrecorded.
        committed_in_ledger(&ob, &"0".repeat(64), "bill-gone.csv", 51, 60).await;
        drop(ob);
        h.join().unwrap();
    }
    let mut half = old.clone();
    half[..4096].fill(0);
    let hidden = spool.join(format!(".shuyuan-destroying-{sha}"));
    std::fs::write(&hidden, &half).unwrap();
    // A new export behind them goes through as usual.
    write_export(&spool.join("bill-new.csv"), &gbk(&billing_export(100, 30))).unwrap();

    let log = world.path().join("gateway.log");
    let mut gw = spawn_gateway_process(&world, &log);
    let done = wait_until(Duration::from_secs(30), || async {
        rx.records(GATEWAY_ID).len() >= 30 && std::fs::read_dir(&spool).unwrap().next().is_none()
    })
    .await;
    assert!(terminate(&mut gw, Duration::from_secs(20)).is_some_and(|s| s.success()));
    assert!(
        done,
        "the spool emptied and the new export delivered ({} records)",
        rx.records(GATEWAY_ID).len()
    );
    assert_eq!(
        rx.records(GATEWAY_ID).len(),
        30,
        "nothing read from the old file"
    );
    let disposed: Vec<serde_json::Value> = audit_kinds(&world)
        .into_iter()
        .filter(|(k, _)| k == "file_disposed")
        .map(|(_, d)| d)
        .collect();
    let note_of = |name: &str| {
        disposed
            .iter()
            .find(|d| d["file"] == name)
            .map(|d| d["note"].as_str().unwrap().to_string())
    };
    assert!(
        note_of("bill-old.csv").is_some_and(|n| n.contains("finished at start")),
        "{disposed:?}"
    );
    assert!(
        note_of("bill-gone.csv").is_some_and(|n| n.contains("not in the spool at start")),
        "{disposed:?}"
    );
    assert!(note_of("bill-new.csv").is_some(), "{disposed:?}");
    assert_eq!(disposed.len(), 3, "each once: {disposed:?}");
    rx.shutdown().await;
}

/// Records a file in the ledger as the source does up to disposing of it.
async fn committed_in_ledger(
    ob: &shuyuan::outbox::Outbox,
    sha: &str,
    name: &str,
    first: u64,
    last: u64,
) {
    use shuyuan::outbox::files::{FileEntry, FileState};
    let entry = FileEntry {
        sha256: sha.to_string(),
        source: "billing".into(),
        name: name.into(),
        bytes: 10,
        first_seq: first,
        last_seq: None,
        rows_bad: 0,
        state: FileState::Reading,
        started_ms: 0,
        done_ms: None,
        note: None,
    };
    ob.file_started(entry).await.unwrap();
    ob.file_read(sha.to_string(), last).await.unwrap();
    ob.file_committed(sha.to_string()).await.unwrap();
}

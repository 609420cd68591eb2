//! The outbox: the durable queue of sealed batches. The envelopes are in append-only segment
//! files ([`segments`]); the index, the counters and the audit trail are in SQLite (WAL,
//! synchronous=FULL), owned by one thread ([`crate::db::Db`]).
//!
//! Schema:
//! - `batches(seq PRIMARY KEY, created_ms, records, bytes, envelope BLOB, state, attempts,
//!   last_error, seg, off)`: one row per sealed batch; `state` 0 = pending, 1 = quarantined.
//!   The envelope is in segment `seg` at byte `off`, or in `envelope` when `seg` is NULL (a
//!   quarantined batch, which must outlive its segment, or a store from before segments).
//! - `source_seq(source PRIMARY KEY, seq)`: the highest record sequence per source that is
//!   committed, so a restarted source continues without reusing numbers.
//! - `meta(key PRIMARY KEY, value)`: `last_seq` (the highest batch seq ever committed, which
//!   survives the rows being acked and deleted), the eviction counters, and `seq_floor`.
//!
//! A store that fails `PRAGMA quick_check` or cannot be opened is moved aside
//! (`outbox.sqlite.corrupt-<ms>`) and replaced; the new one numbers batches and records from
//! the current Unix time in milliseconds (`seq_floor`), above anything the old one used, so the
//! platform never takes a new batch for a duplicate.
//!
//! Committing a batch is writing and syncing its frame: the frame carries the batch's record
//! sequences and audit entry. Frames are indexed (row, `source_seq`, `last_seq`, audit entry,
//! in one transaction) `FOLD_AT` at a time, with the held acknowledgements, or at once when
//! the buffer is short of room, an upload fails, or the store closes; frames not indexed when
//! the process dies are indexed from the files at the next start. Only sealed bytes are stored
//! (nothing raw reaches the disk); a batch leaves only after the platform acked it, or by
//! eviction under `on_full = "drop_oldest"`, which is counted in `meta`; a segment file is
//! deleted when none of its batches is queued.

pub mod admin;
pub mod audit;
pub mod files;
pub mod segments;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rusqlite::{params, Connection, OptionalExtension};

use crate::config::OnFull;
use crate::db::{Db, DbError};
use segments::{Frame, SegmentError, Writer};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    seq        INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    records    INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    envelope   BLOB    NOT NULL,
    state      INTEGER NOT NULL DEFAULT 0,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    seg        INTEGER,
    off        INTEGER
);
CREATE TABLE IF NOT EXISTS source_seq (source TEXT PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS evicted (seq INTEGER PRIMARY KEY, records INTEGER NOT NULL);
";

#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("the outbox is full ({used} of {max} bytes) and on_full = \"pause\"")]
    Full { used: u64, max: u64 },
    #[error(transparent)]
    Segment(#[from] SegmentError),
}

impl From<rusqlite::Error> for OutboxError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(DbError::Sql(e))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Quota {
    pub max_bytes: u64,
    pub on_full: OnFull,
    /// Free bytes to leave on the file system (0: no check).
    pub min_free_disk: u64,
}

/// Free bytes for an unprivileged writer on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// What the store held when opened.
#[derive(Debug, Clone, Default)]
pub struct Resume {
    pub last_seq: u64,
    pub source_seqs: HashMap<String, u64>,
    pub pending: u64,
    /// Record numbers of a source with no committed record start above this (non-zero only
    /// after a damaged store was replaced).
    pub source_floor: u64,
}

/// A batch waiting for upload.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub records: u32,
    pub envelope: bytes::Bytes,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Depth {
    pub batches: u64,
    pub bytes: u64,
    pub oldest_ms: Option<i64>,
    pub quarantined: u64,
}

/// Batches evicted to make room for a new one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Evicted {
    pub batches: u64,
    pub records: u64,
}

#[derive(Clone)]
pub struct Outbox {
    db: Db,
    quota: Quota,
    dir: Arc<std::path::PathBuf>,
    /// Acknowledged batches still in the file: see [`Outbox::ack`].
    held_acks: Arc<Mutex<Vec<u64>>>,
    log: SharedLog,
}

/// A queued batch's row: seq, records, envelope (empty when in a segment), seg, off.
type QueuedRow = (i64, u32, Vec<u8>, Option<i64>, Option<i64>);

/// Frames written but not indexed: at most this many before they are indexed together (an
/// index commit writes a few pages whatever it holds: shared by 64 batches, its cost is a few
/// per cent of even a 1 KiB batch).
const FOLD_AT: usize = 64;

/// Nor for longer than this (the trail of a slow gateway is at most an hour behind).
const INDEX_LAG_MAX_MS: i64 = 3_600_000;

/// The segment files and the frames the index does not hold yet. Used on the store's thread.
struct Log {
    dir: PathBuf,
    writer: Writer,
    unfolded: Vec<Frame>,
}

type SharedLog = Arc<Mutex<Log>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a panic elsewhere mid-update of plain data.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Log {
    fn queued_bytes(&self) -> u64 {
        self.unfolded.iter().map(|f| f.envelope_len).sum()
    }

    /// The highest record sequence of `source` among the frames not indexed yet.
    fn source_seq(&self, source: &str) -> Option<u64> {
        self.unfolded
            .iter()
            .filter_map(|f| {
                let meta: serde_json::Value = serde_json::from_str(&f.meta).ok()?;
                meta["s"][source].as_u64()
            })
            .max()
    }
}

/// Segment files of at most this size (a file is deleted whole: the smaller, the sooner).
fn segment_max(quota: &Quota) -> u64 {
    (quota.max_bytes / 16).clamp(64 << 10, 4 << 20)
}

/// Indexes written frames: their rows and record sequences, and one audit entry for them all
/// (`batches_sealed`: their sequence numbers as runs, and the sums of their counts).
fn fold_tx(tx: &rusqlite::Transaction<'_>, frames: &[Frame]) -> rusqlite::Result<()> {
    let mut seqs = Vec::new();
    let (mut records, mut bytes, mut tally, mut written_ms) = (0u64, 0u64, [0u64; 4], 0i64);
    let mut rules = GroupedRules::new();
    for f in frames {
        let n = tx.execute(
            "INSERT OR IGNORE INTO batches(seq, created_ms, records, bytes, envelope, seg, off) VALUES (?1, ?2, ?3, ?4, x'', ?5, ?6)",
            params![f.seq as i64, f.created_ms, f.records, f.envelope_len as i64, f.seg as i64, f.off as i64],
        )?;
        if n == 0 {
            continue;
        }
        seqs.push(f.seq);
        records += u64::from(f.records);
        bytes += f.envelope_len;
        written_ms = written_ms.max(f.written_ms);
        // Written by this program just before: a frame whose meta does not parse (it passed
        // its checksum) is still a batch; only its counts are missing from the trail.
        let meta: serde_json::Value = serde_json::from_str(&f.meta).unwrap_or_default();
        if let Some(seqs) = meta["s"].as_object() {
            for (source, s) in seqs {
                if let Some(s) = s.as_u64() {
                    tx.execute(
                        "INSERT INTO source_seq(source, seq) VALUES (?1, ?2) ON CONFLICT(source) DO UPDATE SET seq = MAX(seq, ?2)",
                        params![source, s as i64],
                    )?;
                }
            }
        }
        for (i, t) in tally.iter_mut().enumerate() {
            *t += meta["t"][i].as_u64().unwrap_or(0);
        }
        merge_rules(&mut rules, &meta["r"]);
    }
    let Some(&last) = seqs.last() else {
        return Ok(());
    };
    tx.execute(
        "INSERT INTO meta(key, value) VALUES ('last_seq', ?1) ON CONFLICT(key) DO UPDATE SET value = MAX(value, ?1)",
        [last as i64],
    )?;
    let rules: Vec<serde_json::Value> = rules
        .into_iter()
        .map(|(sources, fields)| serde_json::json!({"sources": sources, "fields": fields}))
        .collect();
    audit::append_at(
        tx,
        written_ms,
        "batches_sealed",
        &serde_json::json!({
            "seqs": seq_ranges(&seqs), "batches": seqs.len(), "records": records, "bytes": bytes,
            "fields_kept": tally[0], "fields_deidentified": tally[1],
            "fields_dropped": tally[2], "fields_without_rule": tally[3],
            "rules": rules,
        }),
    )?;
    Ok(())
}

/// Per group of sources (as [`rules_json`] writes them), per field and outcome, a count.
type GroupedRules = BTreeMap<Vec<String>, BTreeMap<String, BTreeMap<String, u64>>>;

/// Adds one batch's [`rules_json`] to `acc`. Groups are merged by their list of sources, not
/// split per source: fifty devices stay one group however many batches are summed. A source
/// that was grouped differently in some batch (it missed a poll) is in two groups; its counts
/// are the sum over the groups naming it.
fn merge_rules(acc: &mut GroupedRules, rules: &serde_json::Value) {
    for g in rules.as_array().into_iter().flatten() {
        let sources: Vec<String> = g["sources"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect();
        let group = acc.entry(sources).or_default();
        for (field, outcomes) in g["fields"].as_object().into_iter().flatten() {
            let counts = group.entry(field.clone()).or_default();
            for (outcome, n) in outcomes.as_object().into_iter().flatten() {
                *counts.entry(outcome.clone()).or_default() += n.as_u64().unwrap_or(0);
            }
        }
    }
}

/// Indexes the frames not indexed yet and writes `acks`, in one transaction; returns how many
/// evictions the acknowledgements took back.
fn sync(c: &mut Connection, log: &mut Log, acks: &[u64]) -> Result<u64, OutboxError> {
    let tx = c.transaction()?;
    fold_tx(&tx, &log.unfolded)?;
    let reversed = acks_tx(&tx, acks)?;
    tx.commit()?;
    log.unfolded.clear();
    tidy(c, log);
    Ok(reversed)
}

/// Writes the held acknowledgements (with the frames not indexed yet) and forgets them;
/// returns how many evictions they took back. Only calls on the store's thread add to
/// `held`, so the list cannot change between the read and the clear.
fn write_held(
    c: &mut Connection,
    log: &mut Log,
    held: &Mutex<Vec<u64>>,
) -> Result<u64, OutboxError> {
    let seqs = lock(held).clone();
    if seqs.is_empty() {
        return Ok(0);
    }
    let reversed = sync(c, log, &seqs)?;
    lock(held).clear();
    Ok(reversed)
}

/// Deletes the segment files no queued batch needs (a failure only delays it).
fn tidy(c: &Connection, log: &Log) {
    let indexed: rusqlite::Result<Option<i64>> = c
        .query_row(
            "SELECT seq FROM batches WHERE seg IS NOT NULL ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional();
    let Ok(indexed) = indexed else { return };
    let live = [
        indexed.map(|s| s as u64),
        log.unfolded.first().map(|f| f.seq),
    ]
    .into_iter()
    .flatten()
    .min();
    if let Err(e) = segments::remove_unused(&log.dir, live, log.writer.current()) {
        tracing::warn!("cannot remove a segment file no batch needs: {e}");
    }
}

/// Quarantines a batch, its envelope copied into the index so that it outlives its segment.
fn quarantine_tx(
    c: &mut Connection,
    log: &mut Log,
    seq: u64,
    error: &str,
    counts_attempt: bool,
) -> Result<(), OutboxError> {
    if log.unfolded.iter().any(|f| f.seq == seq) {
        sync(c, log, &[])?;
    }
    let place: Option<(Option<i64>, Option<i64>)> = c
        .query_row(
            "SELECT seg, off FROM batches WHERE seq = ?1",
            [seq as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let envelope = match place {
        Some((Some(seg), Some(off))) => {
            segments::read_envelope(&log.dir, seg as u64, off as u64, seq).ok()
        }
        _ => None,
    };
    let tx = c.transaction()?;
    tx.execute(
        "UPDATE batches SET state = 1, attempts = attempts + ?3, last_error = ?2 WHERE seq = ?1",
        params![seq as i64, error, i64::from(counts_attempt)],
    )?;
    if let Some(envelope) = envelope {
        tx.execute(
            "UPDATE batches SET envelope = ?2, seg = NULL, off = NULL WHERE seq = ?1",
            params![seq as i64, envelope],
        )?;
    }
    audit::append(
        &tx,
        "batch_quarantined",
        &serde_json::json!({ "seq": seq, "error": error }),
    )?;
    tx.commit()?;
    Ok(())
}

/// Acknowledgements held at most before they are written on their own.
const ACKS_HELD: usize = 64;

/// `1,2,3`: sequence numbers for an SQL `IN (..)` list (numbers only, never text).
fn seq_list(seqs: &[u64]) -> String {
    let mut out = String::new();
    for (i, s) in seqs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(itoa::Buffer::new().format(*s));
    }
    out
}

/// Writes acknowledgements: the batches deleted, one audit entry for all of them. Returns
/// how many had been evicted while their upload was under way (their evictions are taken
/// back: they were not lost after all).
fn acks_tx(tx: &rusqlite::Transaction<'_>, seqs: &[u64]) -> rusqlite::Result<u64> {
    if seqs.is_empty() {
        return Ok(0);
    }
    let mut reversed = 0;
    for seq in seqs {
        reversed += u64::from(ack_tx(tx, *seq)?);
    }
    let mut sorted = seqs.to_vec();
    sorted.sort_unstable();
    audit::append(
        tx,
        "batches_acked",
        &serde_json::json!({ "seqs": seq_ranges(&sorted), "batches": seqs.len() }),
    )?;
    Ok(reversed)
}

/// `[[first, last], ..]`: sorted sequence numbers as runs.
fn seq_ranges(sorted: &[u64]) -> Vec<[u64; 2]> {
    let mut out: Vec<[u64; 2]> = Vec::new();
    for &s in sorted {
        match out.last_mut() {
            Some(r) if r[1] + 1 == s => r[1] = s,
            Some(r) if r[1] == s => {}
            _ => out.push([s, s]),
        }
    }
    out
}

/// Deletes one acknowledged batch; `true` when it had been evicted while its upload was under
/// way.
fn ack_tx(tx: &rusqlite::Transaction<'_>, seq: u64) -> rusqlite::Result<bool> {
    let deleted = tx.execute("DELETE FROM batches WHERE seq = ?1", [seq as i64])?;
    if deleted > 0 {
        return Ok(false);
    }
    let rec: Option<i64> = tx
        .query_row(
            "SELECT records FROM evicted WHERE seq = ?1",
            [seq as i64],
            |r| r.get(0),
        )
        .optional()?;
    let Some(records) = rec else {
        return Ok(false);
    };
    tx.execute("DELETE FROM evicted WHERE seq = ?1", [seq as i64])?;
    for (k, v) in [("evicted_batches", 1i64), ("evicted_records", records)] {
        tx.execute(
            "UPDATE meta SET value = value - ?2 WHERE key = ?1",
            params![k, v],
        )?;
    }
    audit::append(
        tx,
        "eviction_reversed",
        &serde_json::json!({ "seq": seq, "records": records, "reason": "evicted while its upload was under way, then acknowledged: not lost" }),
    )?;
    Ok(true)
}

impl Outbox {
    /// Opens or creates `dir/outbox.sqlite`.
    pub fn open(
        dir: &Path,
        quota: Quota,
    ) -> Result<(Self, Resume, std::thread::JoinHandle<()>), OutboxError> {
        let path = dir.join("outbox.sqlite");
        match Self::open_checked(&path, quota, 0) {
            Ok(x) => Ok(x),
            Err(OutboxError::Db(e)) if e.is_corrupt() && path.exists() => {
                // A store that cannot be read must not stop the gateway for good (a restart
                // loop helps no one): keep the damaged file for inspection and start afresh,
                // numbering above anything the old store can have used.
                let aside = dir.join(format!(
                    "outbox.sqlite.corrupt-{}",
                    crate::timefmt::now_ms()
                ));
                let moved = std::fs::rename(&path, &aside);
                for ext in ["-wal", "-shm"] {
                    let side = dir.join(format!("outbox.sqlite{ext}"));
                    let _ = std::fs::rename(&side, dir.join(format!("{}{ext}", aside.display())));
                }
                if let Err(m) = moved {
                    tracing::error!(path = %path.display(), "outbox unreadable and cannot be moved aside: {m}");
                    return Err(OutboxError::Db(e));
                }
                let floor = crate::timefmt::now_ms().max(1) as u64;
                tracing::error!(
                    moved_to = %aside.display(),
                    restart_seq_at = floor,
                    "outbox store could not be read ({e}); it was moved aside and a new one started; the batches still in the segment files are indexed again, any others it held are lost"
                );
                Self::open_checked(&path, quota, floor)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens, checks the store's integrity, and reads where numbering resumes. `floor` (after a
    /// store was lost) starts batch and record numbers above anything used before.
    fn open_checked(
        path: &Path,
        quota: Quota,
        floor: u64,
    ) -> Result<(Self, Resume, std::thread::JoinHandle<()>), OutboxError> {
        let mut resume = Resume::default();
        let dir = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let seg_dir = dir.join(segments::DIR);
        let log: SharedLog = Arc::new(Mutex::new(Log {
            dir: seg_dir.clone(),
            writer: Writer::new(seg_dir.clone(), segment_max(&quota)),
            unfolded: Vec::new(),
        }));
        let held_acks: Arc<Mutex<Vec<u64>>> = Arc::default();
        let (log_at_close, held_at_close) = (log.clone(), held_acks.clone());
        // What is still in memory when the last handle goes (a stop) is written then, so a
        // stopped gateway leaves everything indexed.
        let close = move |c: &mut Connection| {
            let acks = lock(&held_at_close).clone();
            let mut log = lock(&log_at_close);
            if log.unfolded.is_empty() && acks.is_empty() {
                return;
            }
            if let Err(e) = sync(c, &mut log, &acks) {
                tracing::error!("cannot index the last batches at close (they are indexed at the next start): {e}");
            }
        };
        let recover_log = log.clone();
        let resume_at = &mut resume;
        let (db, handle) = Db::open_with_close(
            path,
            move |c| {
                let check: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
                if check != "ok" {
                    return Err(rusqlite::Error::SqliteFailure(
                        rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                        Some(format!("integrity check: {check}")),
                    ));
                }
                c.execute_batch(SCHEMA)?;
                add_segment_columns(c)?;
                c.execute_batch(audit::SCHEMA)?;
                c.execute_batch(files::SCHEMA)?;
                if floor > 0 {
                    c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_seq', ?1), ('seq_floor', ?1)", [floor as i64])?;
                    audit::append(
                        c,
                        "store_replaced",
                        &serde_json::json!({ "reason": "the previous store could not be read; batches still in the segment files are indexed again, any others it held are lost", "numbering_restarts_at": floor }),
                    )?;
                }
                // After a store was replaced every frame on disk is indexed again: its batches
                // are not lost (those the platform had already are answered `duplicate`).
                let after = if floor > 0 {
                    0
                } else {
                    read_resume(c)?.last_seq
                };
                recover(c, &mut lock(&recover_log), after)?;
                *resume_at = read_resume(c)?;
                Ok(())
            },
            close,
        )?;
        Ok((
            Self {
                db,
                quota,
                dir: Arc::new(dir),
                held_acks,
                log,
            },
            resume,
            handle,
        ))
    }

    /// Commits one sealed batch, evicting the oldest pending batches first if the quota
    /// requires and allows it.
    pub async fn append(
        &self,
        seq: u64,
        created_ms: i64,
        records: u32,
        envelope: bytes::Bytes,
        source_seqs: BTreeMap<Arc<str>, u64>,
    ) -> Result<Evicted, OutboxError> {
        self.append_audited(
            seq,
            created_ms,
            records,
            envelope,
            source_seqs,
            crate::policy::Tally::default(),
            Arc::default(),
        )
        .await
    }

    /// [`Outbox::append`], recording in the audit trail what the policy did to the batch:
    /// totals, and per source, field and rule.
    #[allow(clippy::too_many_arguments)]
    pub async fn append_audited(
        &self,
        seq: u64,
        created_ms: i64,
        records: u32,
        envelope: bytes::Bytes,
        source_seqs: BTreeMap<Arc<str>, u64>,
        tally: crate::policy::Tally,
        // Shared: a commit that must be retried passes the same counts again.
        rules: Arc<crate::batch::BatchRules>,
    ) -> Result<Evicted, OutboxError> {
        let quota = self.quota;
        // Low on disk: the buffer may not grow, only reuse the room that eviction frees.
        let low_disk = quota.min_free_disk > 0
            && free_bytes(&self.dir)
                .is_some_and(|f| f < quota.min_free_disk.saturating_add(envelope.len() as u64));
        if low_disk {
            tracing::warn!(
                min_free = quota.min_free_disk,
                "file system nearly full: the outbox treats its buffer as full"
            );
        }
        // Read on the store's thread, where `ack` adds to them: an acknowledgement is either
        // written in this transaction (before any eviction), or comes after it and finds the
        // batch gone. A list read before the call let a batch acknowledged meanwhile be
        // evicted and counted as lost although delivered.
        let held = self.held_acks.clone();
        let log = self.log.clone();
        self.db
            .call(move |c| {
                let acks = lock(&held).clone();
                let mut b = NewBatch {
                    seq,
                    created_ms,
                    records,
                    envelope: &envelope,
                    source_seqs: &source_seqs,
                    tally: &tally,
                    rules: &rules,
                    low_disk,
                    acks: &acks,
                };
                let mut log = lock(&log);
                match append_tx(c, &mut log, quota, &b) {
                    // The held acknowledgements did not go in with the refused batch; written
                    // on their own they may make the room that was missing.
                    Err(OutboxError::Full { .. }) if !acks.is_empty() => {
                        write_held(c, &mut log, &held)?;
                        b.acks = &[];
                        append_tx(c, &mut log, quota, &b).map(|(evicted, _)| evicted)
                    }
                    r => {
                        let (evicted, indexed) = r?;
                        if indexed {
                            lock(&held).clear();
                        }
                        Ok(evicted)
                    }
                }
            })
            .await?
    }

    /// Free bytes on the store's file system.
    pub fn free_disk(&self) -> Option<u64> {
        free_bytes(&self.dir)
    }

    /// Removes audit entries older than `keep` (a prefix of the chain, recorded).
    pub async fn prune_audit(&self, keep: std::time::Duration) -> Result<u64, OutboxError> {
        let cutoff = crate::timefmt::now_ms() - i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        Ok(self.db.call(move |c| audit::prune(c, cutoff)).await??)
    }

    /// Audit entries after `after`, oldest first (the health endpoint's `/v1/audit`).
    pub async fn audit_entries(
        &self,
        after: i64,
        limit: usize,
    ) -> Result<Vec<audit::Entry>, OutboxError> {
        Ok(self
            .db
            .call(move |c| audit::list(c, after, limit))
            .await??)
    }

    /// Records an event in the audit trail on its own (start-up, configuration).
    pub async fn audit(
        &self,
        kind: &'static str,
        detail: serde_json::Value,
    ) -> Result<(), OutboxError> {
        self.db
            .call(move |c| audit::append(c, kind, &detail))
            .await??;
        Ok(())
    }

    /// The detail of the newest audit entry of `kind`.
    pub async fn audit_last(
        &self,
        kind: &'static str,
    ) -> Result<Option<serde_json::Value>, OutboxError> {
        Ok(self.db.call(move |c| audit::last_of(c, kind)).await??)
    }

    /// The oldest pending batch with a sequence above `after`. A batch whose frame cannot be
    /// read back (damaged on disk) is quarantined with the reason, and the next one offered.
    pub async fn next_pending(&self, after: Option<u64>) -> Result<Option<Stored>, OutboxError> {
        let held = self.held().clone();
        let log = self.log.clone();
        self.db
            .call(move |c| -> Result<Option<Stored>, OutboxError> {
                let held_list = seq_list(&held);
                let mut after = after.map_or(-1, |a| a as i64);
                // Bounded: each turn past the first quarantines one damaged batch.
                for _ in 0..1000 {
                    let row: Option<QueuedRow> = c
                        .query_row(
                            &format!("SELECT seq, records, envelope, seg, off FROM batches WHERE state = 0 AND seq > ?1 AND seq NOT IN ({held_list}) ORDER BY seq LIMIT 1"),
                            [after],
                            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?)),
                        )
                        .optional()?;
                    let mut log = lock(&log);
                    let (seq, records, seg, off) = match row {
                        Some((seq, records, _, Some(seg), Some(off))) => {
                            (seq as u64, records, seg as u64, off as u64)
                        }
                        Some((seq, records, envelope, _, _)) => {
                            return Ok(Some(Stored {
                                seq: seq as u64,
                                records,
                                envelope: envelope.into(),
                            }))
                        }
                        None => match log
                            .unfolded
                            .iter()
                            .find(|f| f.seq as i64 > after && !held.contains(&f.seq))
                        {
                            Some(f) => (f.seq, f.records, f.seg, f.off),
                            None => return Ok(None),
                        },
                    };
                    match segments::read_envelope(&log.dir, seg, off, seq) {
                        Ok(envelope) => {
                            return Ok(Some(Stored {
                                seq,
                                records,
                                envelope: envelope.into(),
                            }))
                        }
                        Err(e) => {
                            tracing::error!(seq, "a queued batch cannot be read back ({e}): quarantined");
                            quarantine_tx(c, &mut log, seq, &format!("damaged on disk: {e}"), false)?;
                            after = seq as i64;
                        }
                    }
                }
                Ok(None)
            })
            .await?
    }

    /// The platform acknowledged the batch: it may go.
    ///
    /// A commit of its own for each acknowledgement would write a few index pages per batch,
    /// more than a small batch's own frame. So the deletion is held and written with the next
    /// index commit (see `FOLD_AT`), or with others once `ACKS_HELD` wait, or at
    /// [`Outbox::flush_acks`] and when the store closes. Held batches are not offered again
    /// nor counted as pending. A crash before they are written costs only a re-send, which
    /// the platform answers `duplicate`.
    ///
    /// If the batch was evicted while it was being uploaded (the buffer filled up in the
    /// meantime), it was not lost after all: its eviction is taken back out of the counts,
    /// and `true` is returned.
    pub async fn ack(&self, seq: u64) -> Result<bool, OutboxError> {
        // On the store's thread, so that no commit runs between the look and the hold: a batch
        // still stored is held (and cannot be evicted any more, see `append_audited`); one no
        // longer stored was evicted during its upload, and its eviction is taken back now.
        let (log, held) = (self.log.clone(), self.held_acks.clone());
        let (reversed, held_now) = self
            .db
            .call(move |c| -> Result<(bool, usize), OutboxError> {
                let mut log = lock(&log);
                let stored = log.unfolded.iter().any(|f| f.seq == seq)
                    || c.query_row(
                        "SELECT EXISTS(SELECT 1 FROM batches WHERE seq = ?1)",
                        [seq as i64],
                        |r| r.get::<_, bool>(0),
                    )?;
                if stored {
                    let mut held = lock(&held);
                    held.push(seq);
                    return Ok((false, held.len()));
                }
                Ok((sync(c, &mut log, &[seq])? > 0, 0))
            })
            .await??;
        if held_now >= ACKS_HELD {
            self.flush_acks().await?;
        }
        Ok(reversed)
    }

    /// Writes the held acknowledgements now.
    pub async fn flush_acks(&self) -> Result<(), OutboxError> {
        let (log, held) = (self.log.clone(), self.held_acks.clone());
        self.db
            // Held batches were stored when held and cannot be evicted since: no eviction
            // is taken back here.
            .call(move |c| write_held(c, &mut lock(&log), &held))
            .await??;
        Ok(())
    }

    fn held(&self) -> MutexGuard<'_, Vec<u64>> {
        lock(&self.held_acks)
    }

    /// Counts a failed attempt and remembers its cause (kind and status, never data).
    pub async fn attempt_failed(&self, seq: u64, error: String) -> Result<(), OutboxError> {
        let log = self.log.clone();
        self.db
            .call(move |c| -> Result<(), OutboxError> {
                let mut log = lock(&log);
                if log.unfolded.iter().any(|f| f.seq == seq) {
                    sync(c, &mut log, &[])?;
                }
                c.execute(
                    "UPDATE batches SET attempts = attempts + 1, last_error = ?2 WHERE seq = ?1",
                    params![seq as i64, error],
                )?;
                Ok(())
            })
            .await??;
        Ok(())
    }

    /// The platform refused the batch for good: keep it aside for an operator.
    pub async fn quarantine(&self, seq: u64, error: String) -> Result<(), OutboxError> {
        let log = self.log.clone();
        self.db
            .call(move |c| quarantine_tx(c, &mut lock(&log), seq, &error, true))
            .await??;
        Ok(())
    }

    pub async fn depth(&self) -> Result<Depth, OutboxError> {
        let held = self.held().clone();
        let log = self.log.clone();
        Ok(self
            .db
            .call(move |c| -> rusqlite::Result<Depth> {
                let mut d = read_depth(c, &seq_list(&held))?;
                for f in lock(&log)
                    .unfolded
                    .iter()
                    .filter(|f| !held.contains(&f.seq))
                {
                    d.batches += 1;
                    d.bytes += f.envelope_len;
                    d.oldest_ms = Some(d.oldest_ms.map_or(f.created_ms, |o| o.min(f.created_ms)));
                }
                Ok(d)
            })
            .await??)
    }
}

/// Adds `seg` and `off` to a store made before segment files.
fn add_segment_columns(c: &Connection) -> rusqlite::Result<()> {
    let mut stmt = c.prepare("PRAGMA table_info(batches)")?;
    let cols = stmt
        .query_map([], |r| r.get::<_, String>(1))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    if !cols.iter().any(|c| c == "seg") {
        c.execute_batch("ALTER TABLE batches ADD COLUMN seg INTEGER; ALTER TABLE batches ADD COLUMN off INTEGER;")?;
    }
    Ok(())
}

/// Indexes the frames above `after` that the index lacks (the process stopped before it
/// wrote them) and cuts each segment file where it stops making sense (a frame cut short by a
/// power loss, or damage), putting on the trail what was cut.
fn recover(c: &mut Connection, log: &mut Log, after: u64) -> rusqlite::Result<()> {
    let as_sql = |e: SegmentError| rusqlite::Error::ToSqlConversionFailure(Box::new(e));
    let (frames, damage) = segments::scan(&log.dir, after, true).map_err(as_sql)?;
    for d in &damage {
        let file = log.dir.join(segments::file_name(d.seg));
        tracing::error!(
            file = %file.display(), at_byte = d.off, bytes_cut = d.cut_bytes,
            "segment file holds a damaged or incomplete frame ({}); a batch in it or in the bytes cut is lost", d.error
        );
        audit::append(
            c,
            "segment_damaged",
            &serde_json::json!({ "file": file.display().to_string(), "at_byte": d.off, "bytes_cut": d.cut_bytes, "why": d.error }),
        )?;
    }
    if !frames.is_empty() {
        tracing::info!(
            batches = frames.len(),
            "indexing batches written before the last stop"
        );
        log.unfolded = frames;
        sync(c, log, &[]).map_err(|e| match e {
            OutboxError::Db(DbError::Sql(e)) => e,
            e => rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
        })?;
    }
    tidy(c, log);
    Ok(())
}

fn read_resume(c: &Connection) -> rusqlite::Result<Resume> {
    let last_seq = meta_get(c, "last_seq")?.max(c.query_row(
        "SELECT COALESCE(MAX(seq), 0) FROM batches",
        [],
        |r| r.get(0),
    )?);
    let mut stmt = c.prepare("SELECT source, seq FROM source_seq")?;
    let source_seqs = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })?
        .collect::<rusqlite::Result<HashMap<_, _>>>()?;
    let pending = c.query_row("SELECT COUNT(*) FROM batches WHERE state = 0", [], |r| {
        r.get::<_, i64>(0)
    })?;
    Ok(Resume {
        last_seq: last_seq as u64,
        source_seqs,
        pending: pending as u64,
        source_floor: meta_get(c, "seq_floor")? as u64,
    })
}

fn meta_get(c: &Connection, key: &str) -> rusqlite::Result<i64> {
    Ok(
        c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()?
            .unwrap_or(0),
    )
}

/// `held`: acknowledged batches not yet deleted (a [`seq_list`]), left out.
fn read_depth(c: &mut Connection, held: &str) -> rusqlite::Result<Depth> {
    c.query_row(
        &format!("SELECT COUNT(*), COALESCE(SUM(bytes), 0), MIN(created_ms), COALESCE(SUM(state = 1), 0) FROM batches WHERE seq NOT IN ({held})"),
        [],
        |r| {
            Ok(Depth {
                batches: r.get::<_, i64>(0)? as u64,
                bytes: r.get::<_, i64>(1)? as u64,
                oldest_ms: r.get(2)?,
                quarantined: r.get::<_, i64>(3)? as u64,
            })
        },
    )
}

/// `[{"sources": [..], "fields": {field: {rule: count}}}]`: sources whose counts are the same
/// share one entry. Fifty devices on one profile polled alike make one entry of a hundred
/// fields instead of fifty, which keeps the audit row (written with every batch) small next
/// to the batch itself, and building it cheap in memory.
fn rules_json(rules: &crate::batch::BatchRules) -> serde_json::Value {
    let mut groups: BTreeMap<&crate::batch::RuleCounts, Vec<&str>> = BTreeMap::new();
    for (source, counts) in rules {
        groups.entry(&**counts).or_default().push(source);
    }
    let mut out: Vec<(Vec<&str>, serde_json::Value)> = groups
        .into_iter()
        .map(|(counts, sources)| {
            let mut fields = serde_json::Map::new();
            for ((field, rule), n) in counts {
                let e = fields
                    .entry(field.to_string())
                    .or_insert_with(|| serde_json::Value::Object(Default::default()));
                if let serde_json::Value::Object(m) = e {
                    m.insert((*rule).to_string(), (*n).into());
                }
            }
            (sources, serde_json::Value::Object(fields))
        })
        .collect();
    // In source order (each list is sorted, the lists are disjoint).
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.into_iter()
        .map(|(sources, fields)| serde_json::json!({"sources": sources, "fields": fields}))
        .collect()
}

/// One batch to commit, with what goes into the same transaction.
struct NewBatch<'a> {
    seq: u64,
    created_ms: i64,
    records: u32,
    envelope: &'a [u8],
    source_seqs: &'a BTreeMap<Arc<str>, u64>,
    tally: &'a crate::policy::Tally,
    rules: &'a crate::batch::BatchRules,
    /// The file system is short of space: the buffer may not grow.
    low_disk: bool,
    /// Held acknowledgements, written in the same transaction.
    acks: &'a [u64],
}

/// Commits one batch: its frame written and synced. Returns the batches evicted for it, and
/// whether the held acknowledgements (`b.acks`) were written with it.
fn append_tx(
    c: &mut Connection,
    log: &mut Log,
    quota: Quota,
    b: &NewBatch<'_>,
) -> Result<(Evicted, bool), OutboxError> {
    let NewBatch {
        seq,
        created_ms,
        records,
        envelope,
        source_seqs,
        tally,
        rules,
        low_disk,
        acks,
    } = *b;
    let size = envelope.len() as u64;
    let seqs: BTreeMap<&str, u64> = source_seqs.iter().map(|(k, v)| (&**k, *v)).collect();
    // Short keys: the meta is written with every batch.
    let meta = serde_json::json!({
        "s": seqs,
        "t": [tally.kept, tally.masked, tally.dropped, tally.unlisted],
        "r": rules_json(rules),
    })
    .to_string();
    let indexed: i64 = c.query_row("SELECT COALESCE(SUM(bytes), 0) FROM batches", [], |r| {
        r.get(0)
    })?;
    if !low_disk && indexed as u64 + log.queued_bytes() + size <= quota.max_bytes {
        // An index that keeps failing must not let the frames it lacks pile up in memory:
        // past four rounds, the batch waits (and is retried, then counted) until it works.
        if log.unfolded.len() >= 4 * FOLD_AT {
            sync(c, log, &[])?;
        }
        let frame = log
            .writer
            .append(seq, created_ms, records, meta, envelope)?;
        log.unfolded.push(frame);
        let oldest = log.unfolded.first().map_or(0, |f| f.written_ms);
        if log.unfolded.len() < FOLD_AT && crate::timefmt::now_ms() - oldest < INDEX_LAG_MAX_MS {
            return Ok((Evicted::default(), false));
        }
        return match sync(c, log, acks) {
            Ok(_) => Ok((Evicted::default(), true)),
            Err(e) => {
                // The batch is committed (its frame is on disk); the index catches up later.
                tracing::warn!("cannot index written batches yet: {e}");
                Ok((Evicted::default(), false))
            }
        };
    }

    // Short of room: the whole queue into the index first, so that eviction sees all of it.
    let tx = c.transaction()?;
    fold_tx(&tx, &log.unfolded)?;
    acks_tx(&tx, acks)?;
    let mut used: u64 = tx.query_row("SELECT COALESCE(SUM(bytes), 0) FROM batches", [], |r| {
        r.get::<_, i64>(0)
    })? as u64;
    let mut evicted = Evicted::default();
    let max = if low_disk {
        used.min(quota.max_bytes)
    } else {
        quota.max_bytes
    };
    while used + size > max {
        if quota.on_full == OnFull::Pause {
            return Err(OutboxError::Full { used, max });
        }
        let oldest: Option<(i64, i64, i64)> = tx
            .query_row(
                "SELECT seq, records, bytes FROM batches WHERE state = 0 ORDER BY seq LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let Some((old_seq, old_records, old_bytes)) = oldest else {
            break;
        };
        tx.execute("DELETE FROM batches WHERE seq = ?1", [old_seq])?;
        // Remembered (the last thousand) in case an upload of it was under way and succeeds.
        tx.execute(
            "INSERT OR REPLACE INTO evicted(seq, records) VALUES (?1, ?2)",
            [old_seq, old_records],
        )?;
        tx.execute("DELETE FROM evicted WHERE seq <= ?1", [old_seq - 1000])?;
        used -= old_bytes as u64;
        evicted.batches += 1;
        evicted.records += old_records as u64;
    }
    if evicted.batches > 0 {
        audit::append(
            &tx,
            "batches_evicted",
            &serde_json::json!({ "batches": evicted.batches, "records": evicted.records, "reason": "buffer full (on_full = drop_oldest)" }),
        )?;
        for (k, v) in [
            ("evicted_batches", evicted.batches),
            ("evicted_records", evicted.records),
        ] {
            tx.execute(
                "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = value + ?2",
                params![k, v as i64],
            )?;
        }
    }
    let frame = log
        .writer
        .append(seq, created_ms, records, meta, envelope)?;
    fold_tx(&tx, std::slice::from_ref(&frame))?;
    match tx.commit() {
        Ok(()) => {
            log.unfolded.clear();
            tidy(c, log);
            Ok((evicted, true))
        }
        Err(e) => {
            // The frame is on disk: the batch is committed, without the evictions; the index
            // catches up later.
            tracing::warn!("cannot index written batches yet: {e}");
            log.unfolded.push(frame);
            Ok((Evicted::default(), false))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_with_the_same_counts_share_one_audit_entry() {
        let counts = |n: u64| -> Arc<crate::batch::RuleCounts> {
            Arc::new(
                [
                    ((Arc::from("flow"), "keep"), n),
                    ((Arc::from("meter"), "mask"), n),
                ]
                .into_iter()
                .collect(),
            )
        };
        let mut rules = BTreeMap::new();
        rules.insert(Arc::from("dev-02"), counts(10));
        rules.insert(Arc::from("dev-01"), counts(10));
        rules.insert(Arc::from("dev-03"), counts(11));
        let v = rules_json(&rules);
        assert_eq!(
            v,
            serde_json::json!([
                {"sources": ["dev-01", "dev-02"], "fields": {"flow": {"keep": 10}, "meter": {"mask": 10}}},
                {"sources": ["dev-03"], "fields": {"flow": {"keep": 11}, "meter": {"mask": 11}}},
            ])
        );
    }

    #[test]
    fn batches_indexed_together_sum_their_counts_per_group_of_sources() {
        let batch = |groups: serde_json::Value| -> serde_json::Value { groups };
        let mut acc = GroupedRules::new();
        merge_rules(
            &mut acc,
            &batch(serde_json::json!([
                {"sources": ["a", "b"], "fields": {"flow": {"keep": 10}, "meter": {"mask": 10}}},
            ])),
        );
        merge_rules(
            &mut acc,
            &batch(serde_json::json!([
                {"sources": ["a", "b"], "fields": {"flow": {"keep": 5}, "meter": {"mask": 4, "dropped_unsafe": 1}}},
                {"sources": ["c"], "fields": {"flow": {"keep": 7}}},
            ])),
        );
        assert_eq!(acc.len(), 2);
        let ab = &acc[&vec!["a".to_string(), "b".to_string()]];
        assert_eq!(ab["flow"]["keep"], 15);
        assert_eq!(
            (ab["meter"]["mask"], ab["meter"]["dropped_unsafe"]),
            (14, 1)
        );
        assert_eq!(acc[&vec!["c".to_string()]]["flow"]["keep"], 7);
        assert_eq!(seq_ranges(&[3, 4, 5, 7, 9, 10]), [[3, 5], [7, 7], [9, 10]]);
    }

    fn quota(max: u64) -> Quota {
        Quota {
            max_bytes: max,
            on_full: OnFull::DropOldest,
            min_free_disk: 0,
        }
    }

    #[tokio::test]
    async fn sequences_survive_reopen_and_rows_leave_only_on_ack() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, resume, h) = Outbox::open(dir.path(), quota(1 << 20)).unwrap();
        assert_eq!(resume.last_seq, 0);
        let mut seqs = BTreeMap::new();
        seqs.insert(Arc::from("pump"), 41u64);
        ob.append(1, 10, 5, vec![1; 100].into(), seqs.clone())
            .await
            .unwrap();
        ob.append(2, 11, 5, vec![2; 100].into(), seqs)
            .await
            .unwrap();
        assert_eq!(ob.next_pending(None).await.unwrap().unwrap().seq, 1);
        assert_eq!(ob.next_pending(Some(1)).await.unwrap().unwrap().seq, 2);
        ob.ack(1).await.unwrap();
        ob.ack(2).await.unwrap();
        assert!(ob.next_pending(None).await.unwrap().is_none());
        ob.flush_acks().await.unwrap();
        drop(ob);
        h.join().unwrap();

        let (ob, resume, _h) = Outbox::open(dir.path(), quota(1 << 20)).unwrap();
        assert_eq!(resume.last_seq, 2, "last_seq survives the rows being acked");
        assert_eq!(resume.source_seqs["pump"], 41);
        assert_eq!(ob.depth().await.unwrap().batches, 0);
    }

    fn rows(dir: &Path) -> Vec<i64> {
        let c = Connection::open(dir.join("outbox.sqlite")).unwrap();
        let mut st = c.prepare("SELECT seq FROM batches ORDER BY seq").unwrap();
        let rows = st.query_map([], |r| r.get(0)).unwrap();
        rows.map(|r| r.unwrap()).collect()
    }

    fn segment_files(dir: &Path) -> Vec<u64> {
        segments::list(&dir.join(segments::DIR)).unwrap()
    }

    #[tokio::test]
    async fn frames_are_indexed_in_groups_with_held_acks_and_a_crash_only_resends() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _, _h) = Outbox::open(dir.path(), quota(1 << 20)).unwrap();
        for seq in 1..=3u64 {
            ob.append(seq, 0, 1, vec![seq as u8; 100].into(), BTreeMap::new())
                .await
                .unwrap();
        }
        // Committed in a segment file, not indexed yet: offered and counted all the same.
        assert!(rows(dir.path()).is_empty());
        assert_eq!(ob.depth().await.unwrap().batches, 3);
        let first = ob.next_pending(None).await.unwrap().unwrap();
        assert_eq!((first.seq, &first.envelope[..]), (1, &[1u8; 100][..]));
        // Held: neither offered again nor counted.
        ob.ack(1).await.unwrap();
        assert_eq!(ob.next_pending(None).await.unwrap().unwrap().seq, 2);
        assert_eq!(ob.depth().await.unwrap().batches, 2);

        // A crash: nothing written at close. The next start indexes the frames from the file,
        // and the held acknowledgement costs only a re-send (the platform answers `duplicate`).
        std::mem::forget(ob);
        let (ob, resume, h) = Outbox::open(dir.path(), quota(1 << 20)).unwrap();
        assert_eq!(resume.last_seq, 3);
        assert_eq!(resume.pending, 3);
        assert_eq!(rows(dir.path()), [1, 2, 3]);
        assert_eq!(ob.next_pending(None).await.unwrap().unwrap().seq, 1);
        let sealed = ob.audit_last("batches_sealed").await.unwrap().unwrap();
        assert_eq!(sealed["seqs"], serde_json::json!([[1, 3]]));
        assert_eq!(
            (sealed["batches"].as_u64(), sealed["records"].as_u64()),
            (Some(3), Some(3))
        );

        // FOLD_AT frames are indexed together, with the acknowledgements held meanwhile.
        for seq in 1..=3 {
            ob.ack(seq).await.unwrap();
        }
        let last = 3 + FOLD_AT as u64;
        for seq in 4..=last {
            ob.append(seq, 0, 1, vec![0; 10].into(), BTreeMap::new())
                .await
                .unwrap();
        }
        let indexed = rows(dir.path());
        assert_eq!((indexed.first(), indexed.len()), (Some(&4), FOLD_AT));
        // ACKS_HELD acknowledgements are written on their own.
        for seq in 4..4 + ACKS_HELD as u64 - 1 {
            ob.ack(seq).await.unwrap();
        }
        assert_eq!(rows(dir.path()).len(), FOLD_AT, "held, one short");
        ob.ack(3 + ACKS_HELD as u64).await.unwrap();
        assert_eq!(rows(dir.path()).len(), FOLD_AT - ACKS_HELD);
        let acked = ob.audit_last("batches_acked").await.unwrap().unwrap();
        assert_eq!(
            acked["seqs"],
            serde_json::json!([[4, 3 + ACKS_HELD as u64]])
        );
        // Only the file being appended to is left: every batch in the others is gone.
        assert_eq!(segment_files(dir.path()).len(), 1);

        // A stop indexes what is in memory.
        ob.append(last + 1, 0, 1, vec![0; 10].into(), BTreeMap::new())
            .await
            .unwrap();
        drop(ob);
        h.join().unwrap();
        assert_eq!(rows(dir.path()).last(), Some(&(last as i64 + 1)));
    }

    #[tokio::test]
    async fn frames_after_every_padding_length_are_indexed_after_a_crash() {
        // The frame's own bytes besides the envelope, measured on one unpadded frame.
        let scratch = tempfile::tempdir().unwrap();
        let (ob, _, _h) = Outbox::open(scratch.path(), quota(1 << 20)).unwrap();
        ob.append(1, 0, 1, vec![0; 100].into(), BTreeMap::new())
            .await
            .unwrap();
        let file = scratch
            .path()
            .join(segments::DIR)
            .join(segments::file_name(1));
        let overhead = std::fs::metadata(&file).unwrap().len() as usize - 100;
        drop(ob);

        // Frames of one block less 0 to 62 bytes, each padded to the block: every padding
        // length, including those shorter than a frame header, followed by a frame. One short
        // of an index commit, so the crash leaves them all to be indexed from the file.
        let n = FOLD_AT - 1;
        let sizes: Vec<usize> = (0..n).map(|pad| 4096 - overhead - pad).collect();
        let dir = tempfile::tempdir().unwrap();
        let (ob, _, _h) = Outbox::open(dir.path(), quota(1 << 24)).unwrap();
        for (i, &size) in sizes.iter().enumerate() {
            ob.append(
                i as u64 + 1,
                0,
                1,
                vec![i as u8; size].into(),
                BTreeMap::new(),
            )
            .await
            .unwrap();
        }
        assert!(rows(dir.path()).is_empty());
        let file = dir.path().join(segments::DIR).join(segments::file_name(1));
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            4096 * n as u64,
            "every frame padded to its block"
        );
        std::mem::forget(ob);

        let (ob, resume, _h) = Outbox::open(dir.path(), quota(1 << 24)).unwrap();
        assert_eq!((resume.last_seq, resume.pending), (n as u64, n as u64));
        assert_eq!(
            std::fs::metadata(&file).unwrap().len(),
            4096 * n as u64,
            "nothing cut"
        );
        for (i, &size) in sizes.iter().enumerate() {
            let b = ob.next_pending(None).await.unwrap().unwrap();
            assert_eq!((b.seq, b.envelope.len()), (i as u64 + 1, size));
            assert!(b.envelope.iter().all(|&x| x == i as u8));
            ob.ack(b.seq).await.unwrap();
        }
    }

    #[tokio::test]
    async fn a_frame_damaged_on_disk_is_quarantined_and_the_queue_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _, h) = Outbox::open(dir.path(), quota(1 << 20)).unwrap();
        for seq in 1..=3u64 {
            ob.append(seq, 0, 1, vec![seq as u8; 100].into(), BTreeMap::new())
                .await
                .unwrap();
        }
        drop(ob);
        h.join().unwrap();
        let c = Connection::open(dir.path().join("outbox.sqlite")).unwrap();
        let (seg, off): (i64, i64) = c
            .query_row("SELECT seg, off FROM batches WHERE seq = 2", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .unwrap();
        drop(c);
        let path = dir
            .path()
            .join(segments::DIR)
            .join(segments::file_name(seg as u64));
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[off as usize + 100] ^= 0xff;
        std::fs::write(&path, bytes).unwrap();

        let (ob, _, _h) = Outbox::open(dir.path(), quota(1 << 20)).unwrap();
        assert_eq!(ob.next_pending(None).await.unwrap().unwrap().seq, 1);
        assert_eq!(ob.next_pending(Some(1)).await.unwrap().unwrap().seq, 3);
        let d = ob.depth().await.unwrap();
        assert_eq!((d.batches, d.quarantined), (3, 1));
        let listed = admin::list(dir.path()).unwrap();
        let two = listed.iter().find(|r| r.seq == 2).unwrap();
        assert_eq!(two.state, "quarantined");
        assert!(
            two.last_error
                .as_deref()
                .unwrap()
                .contains("checksum mismatch"),
            "{:?}",
            two.last_error
        );
    }

    #[tokio::test]
    async fn drop_oldest_evicts_and_counts_pause_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _, _h) = Outbox::open(dir.path(), quota(250)).unwrap();
        for seq in 1..=2 {
            assert_eq!(
                ob.append(seq, 0, 3, vec![0; 100].into(), BTreeMap::new())
                    .await
                    .unwrap(),
                Evicted::default()
            );
        }
        let ev = ob
            .append(3, 0, 3, vec![0; 100].into(), BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(
            ev,
            Evicted {
                batches: 1,
                records: 3
            }
        );
        assert_eq!(ob.next_pending(None).await.unwrap().unwrap().seq, 2);

        let dir = tempfile::tempdir().unwrap();
        let (ob, _, _h) = Outbox::open(
            dir.path(),
            Quota {
                max_bytes: 150,
                on_full: OnFull::Pause,
                min_free_disk: 0,
            },
        )
        .unwrap();
        ob.append(1, 0, 1, vec![0; 100].into(), BTreeMap::new())
            .await
            .unwrap();
        let err = ob
            .append(2, 0, 1, vec![0; 100].into(), BTreeMap::new())
            .await
            .unwrap_err();
        assert!(matches!(err, OutboxError::Full { .. }));
        assert_eq!(ob.depth().await.unwrap().batches, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_acknowledged_batch_is_never_evicted_and_acks_racing_commits_count_exactly() {
        // Held: 1 is acknowledged (held for the next index commit); making room for 4 must
        // write that acknowledgement, not evict 1 and count it as lost.
        let dir = tempfile::tempdir().unwrap();
        let (ob, _, _h) = Outbox::open(dir.path(), quota(350)).unwrap();
        for seq in 1..=3 {
            ob.append(seq, 0, 3, vec![0; 100].into(), BTreeMap::new())
                .await
                .unwrap();
        }
        assert!(!ob.ack(1).await.unwrap());
        let ev = ob
            .append(4, 0, 3, vec![0; 100].into(), BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(
            ev,
            Evicted::default(),
            "the acknowledged batch made the room"
        );

        // An uplink acknowledging while a committer fills the buffer, on two threads: every
        // batch ends either acknowledged or evicted, never both, never neither.
        let dir = tempfile::tempdir().unwrap();
        let (ob, _, _h) = Outbox::open(dir.path(), quota(350)).unwrap();
        const N: u64 = 300;
        let committer = tokio::spawn({
            let ob = ob.clone();
            async move {
                let mut evicted = 0;
                for seq in 1..=N {
                    let e = ob.append(seq, 0, 1, vec![0; 100].into(), BTreeMap::new());
                    evicted += e.await.unwrap().records;
                }
                evicted
            }
        });
        let uplink = tokio::spawn({
            let ob = ob.clone();
            async move {
                let (mut acked, mut reversed) = (std::collections::BTreeSet::new(), 0u64);
                for _ in 0..100_000 {
                    if committer_done(&ob, N).await {
                        break;
                    }
                    if let Some(b) = ob.next_pending(None).await.unwrap() {
                        reversed += u64::from(ob.ack(b.seq).await.unwrap());
                        acked.insert(b.seq);
                    }
                }
                (acked, reversed)
            }
        });
        let evicted = committer.await.unwrap();
        let (acked, reversed) = uplink.await.unwrap();
        ob.flush_acks().await.unwrap();
        let left = ob.depth().await.unwrap().batches;
        assert_eq!(
            acked.len() as u64 + (evicted - reversed) + left,
            N,
            "acked {}, evicted {evicted} (taken back {reversed}), left {left}",
            acked.len()
        );
    }

    /// Whether batch `last` has been committed (the uplink test's end).
    async fn committer_done(ob: &Outbox, last: u64) -> bool {
        let last_seq = ob
            .db
            .call(|c| meta_get(c, "last_seq"))
            .await
            .unwrap()
            .unwrap();
        last_seq as u64 >= last || lock(&ob.log).unfolded.iter().any(|f| f.seq == last)
    }
}

#[cfg(test)]
mod upgrade {
    use super::*;

    #[tokio::test]
    async fn a_store_from_before_segment_files_is_read_as_it_is() {
        let dir = tempfile::tempdir().unwrap();
        let c = Connection::open(dir.path().join("outbox.sqlite")).unwrap();
        c.execute_batch(
            "CREATE TABLE batches (seq INTEGER PRIMARY KEY, created_ms INTEGER NOT NULL, records INTEGER NOT NULL, bytes INTEGER NOT NULL, envelope BLOB NOT NULL, state INTEGER NOT NULL DEFAULT 0, attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT);
             CREATE TABLE meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
             INSERT INTO batches(seq, created_ms, records, bytes, envelope) VALUES (7, 0, 3, 4, x'01020304');
             INSERT INTO meta VALUES ('last_seq', 7);",
        )
        .unwrap();
        drop(c);
        let q = Quota {
            max_bytes: 1 << 20,
            on_full: OnFull::DropOldest,
            min_free_disk: 0,
        };
        let (ob, resume, _h) = Outbox::open(dir.path(), q).unwrap();
        assert_eq!((resume.last_seq, resume.pending), (7, 1));
        let old = ob.next_pending(None).await.unwrap().unwrap();
        assert_eq!((old.seq, &old.envelope[..]), (7, &[1u8, 2, 3, 4][..]));
        // New batches go to segment files behind it.
        ob.append(8, 0, 1, vec![8; 50].into(), BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(ob.next_pending(Some(7)).await.unwrap().unwrap().seq, 8);
        ob.ack(7).await.unwrap();
        ob.ack(8).await.unwrap();
        ob.flush_acks().await.unwrap();
        assert_eq!(ob.depth().await.unwrap().batches, 0);
    }
}

#[cfg(test)]
mod corruption {
    use super::*;

    fn quota() -> Quota {
        Quota {
            max_bytes: 1 << 20,
            on_full: OnFull::DropOldest,
            min_free_disk: 0,
        }
    }

    #[tokio::test]
    async fn a_damaged_store_is_moved_aside_its_batches_indexed_again_and_numbering_restarts_above_it(
    ) {
        for damage in ["garbage header", "truncated"] {
            let dir = tempfile::tempdir().unwrap();
            let (ob, _, h) = Outbox::open(dir.path(), quota()).unwrap();
            for seq in 1..=20 {
                ob.append(seq, 0, 1, vec![7; 3000].into(), BTreeMap::new())
                    .await
                    .unwrap();
            }
            drop(ob);
            h.join().unwrap();
            let file = dir.path().join("outbox.sqlite");
            let len = std::fs::metadata(&file).unwrap().len();
            match damage {
                "garbage header" => {
                    let mut bytes = std::fs::read(&file).unwrap();
                    bytes[..100].fill(0x5a);
                    std::fs::write(&file, bytes).unwrap();
                }
                _ => {
                    let f = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
                    f.set_len(len / 2).unwrap();
                }
            }
            let before = crate::timefmt::now_ms() as u64;
            let (ob, resume, _h) = Outbox::open(dir.path(), quota()).unwrap();
            assert!(
                resume.last_seq >= before,
                "{damage}: numbering restarts above the old store"
            );
            assert_eq!(resume.source_floor, resume.last_seq);
            // The batches themselves were in the segment files: indexed again, not lost.
            assert_eq!(ob.depth().await.unwrap().batches, 20, "{damage}");
            let first = ob.next_pending(None).await.unwrap().unwrap();
            assert_eq!((first.seq, first.envelope.len()), (1, 3000));
            let aside: Vec<_> = std::fs::read_dir(dir.path())
                .unwrap()
                .filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with("outbox.sqlite.corrupt-")
                })
                .collect();
            assert!(
                !aside.is_empty(),
                "{damage}: the damaged file is kept for inspection"
            );
            ob.append(resume.last_seq + 1, 0, 1, vec![1].into(), BTreeMap::new())
                .await
                .unwrap();
        }
    }
}

#[cfg(test)]
mod low_disk {
    use super::*;

    #[tokio::test]
    async fn below_min_free_disk_the_buffer_does_not_grow() {
        let dir = tempfile::tempdir().unwrap();
        // More free space than any disk has: always "low".
        let q = Quota {
            max_bytes: 1 << 30,
            on_full: OnFull::DropOldest,
            min_free_disk: u64::MAX / 4,
        };
        let (ob, _, _h) = Outbox::open(dir.path(), q).unwrap();
        for seq in 1..=3 {
            ob.append(seq, 0, 2, vec![0; 500].into(), BTreeMap::new())
                .await
                .unwrap();
        }
        let d = ob.depth().await.unwrap();
        assert_eq!(
            d.batches, 1,
            "each new batch replaced the oldest instead of growing the file"
        );
        assert_eq!(ob.next_pending(None).await.unwrap().unwrap().seq, 3);

        let dir = tempfile::tempdir().unwrap();
        let q = Quota {
            max_bytes: 1 << 30,
            on_full: OnFull::Pause,
            min_free_disk: u64::MAX / 4,
        };
        let (ob, _, _h) = Outbox::open(dir.path(), q).unwrap();
        // Under pause, the disk's reserve wins: nothing new is written until space returns.
        let r = ob
            .append(1, 0, 2, vec![0; 500].into(), BTreeMap::new())
            .await;
        assert!(matches!(r, Err(OutboxError::Full { .. })));
        assert_eq!(ob.depth().await.unwrap().batches, 0);
    }
}

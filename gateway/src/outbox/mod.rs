//! The outbox: the durable queue of sealed batches in SQLite (WAL, synchronous=FULL), owned
//! by one thread ([`crate::db::Db`]).
//!
//! Schema:
//! - `batches(seq PRIMARY KEY, created_ms, records, bytes, envelope BLOB, state, attempts,
//!   last_error)`: one row per sealed batch; `state` 0 = pending, 1 = quarantined.
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
//! Invariants: a batch row, its source sequence updates and `last_seq` commit in one
//! transaction; only sealed bytes are stored (nothing raw reaches the disk); a row is deleted
//! only after the platform acked it, or by eviction under `on_full = "drop_oldest"`, which is
//! counted in `meta`.

pub mod admin;
pub mod audit;
pub mod files;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use rusqlite::{params, Connection, OptionalExtension};

use crate::config::OnFull;
use crate::db::{Db, DbError};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS batches (
    seq        INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    records    INTEGER NOT NULL,
    bytes      INTEGER NOT NULL,
    envelope   BLOB    NOT NULL,
    state      INTEGER NOT NULL DEFAULT 0,
    attempts   INTEGER NOT NULL DEFAULT 0,
    last_error TEXT
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
    held_acks: Arc<std::sync::Mutex<Vec<u64>>>,
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

/// Deletes one acknowledged batch and records it; `true` when it had been evicted while its
/// upload was under way (then its eviction is taken back: it was not lost after all).
fn ack_tx(tx: &rusqlite::Transaction<'_>, seq: u64) -> rusqlite::Result<bool> {
    let deleted = tx.execute("DELETE FROM batches WHERE seq = ?1", [seq as i64])?;
    audit::append(tx, "batch_acked", &serde_json::json!({ "seq": seq }))?;
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
                    "outbox store could not be read ({e}); the sealed batches it held are lost; it was moved aside and a new one started"
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
        let (db, handle) = Db::open(path, |c| {
            let check: String = c.query_row("PRAGMA quick_check", [], |r| r.get(0))?;
            if check != "ok" {
                return Err(rusqlite::Error::SqliteFailure(
                    rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CORRUPT),
                    Some(format!("integrity check: {check}")),
                ));
            }
            c.execute_batch(SCHEMA)?;
            c.execute_batch(audit::SCHEMA)?;
            c.execute_batch(files::SCHEMA)?;
            if floor > 0 {
                c.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_seq', ?1), ('seq_floor', ?1)", [floor as i64])?;
                audit::append(
                    c,
                    "store_replaced",
                    &serde_json::json!({ "reason": "the previous store could not be read; its sealed batches are lost", "numbering_restarts_at": floor }),
                )?;
            }
            resume = read_resume(c)?;
            Ok(())
        })?;
        Ok((
            Self {
                db,
                quota,
                dir: Arc::new(path.parent().unwrap_or(Path::new(".")).to_path_buf()),
                held_acks: Arc::default(),
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
        let acks = self.held().clone();
        // Shared with a second attempt (`Bytes` and `Arc` clones are cheap).
        let source_seqs = Arc::new(source_seqs);
        let attempt = |acks: Vec<u64>| {
            let (envelope, source_seqs, rules) =
                (envelope.clone(), source_seqs.clone(), rules.clone());
            self.db.call(move |c| {
                let b = NewBatch {
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
                append_tx(c, quota, &b)
            })
        };
        match attempt(acks.clone()).await? {
            // The held acknowledgements did not go in with the refused batch; written on
            // their own they may make the room that was missing.
            Err(OutboxError::Full { .. }) if !acks.is_empty() => {
                self.flush_acks().await?;
                attempt(Vec::new()).await?
            }
            r => {
                if r.is_ok() {
                    self.written(&acks);
                }
                r
            }
        }
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

    /// The oldest pending batch with a sequence above `after`.
    pub async fn next_pending(&self, after: Option<u64>) -> Result<Option<Stored>, OutboxError> {
        let after = after.map_or(-1, |a| a as i64);
        let held = seq_list(&self.held());
        Ok(self
            .db
            .call(move |c| {
                c.query_row(
                    &format!("SELECT seq, records, envelope FROM batches WHERE state = 0 AND seq > ?1 AND seq NOT IN ({held}) ORDER BY seq LIMIT 1"),
                    [after],
                    |r| {
                        Ok(Stored {
                            seq: r.get::<_, i64>(0)? as u64,
                            records: r.get(1)?,
                            envelope: bytes::Bytes::from(r.get::<_, Vec<u8>>(2)?),
                        })
                    },
                )
                .optional()
            })
            .await??)
    }

    /// The platform acknowledged the batch: it may go.
    ///
    /// A commit of its own for each acknowledgement would write as many pages as the batch's
    /// own commit, which doubles the wear of small batches on flash. So the deletion is held
    /// and written with the next batch's commit, or with others once [`ACKS_HELD`] wait, or
    /// at [`Outbox::flush_acks`] (shutdown). Held batches are not offered again nor counted
    /// as pending. A crash before they are written costs only a re-send, which the platform
    /// answers `duplicate`.
    ///
    /// If the batch was evicted while it was being uploaded (the buffer filled up in the
    /// meantime), it was not lost after all: its eviction is taken back out of the counts,
    /// and `true` is returned.
    pub async fn ack(&self, seq: u64) -> Result<bool, OutboxError> {
        // A read, no write: a batch no longer stored was evicted during its upload, and the
        // caller's counts must be corrected now, so that one is written at once.
        let stored = self
            .db
            .call(move |c| {
                c.query_row(
                    "SELECT EXISTS(SELECT 1 FROM batches WHERE seq = ?1)",
                    [seq as i64],
                    |r| r.get::<_, bool>(0),
                )
            })
            .await??;
        if !stored {
            return Ok(self.write_acks(vec![seq]).await? > 0);
        }
        let full = {
            let mut held = self.held();
            held.push(seq);
            held.len() >= ACKS_HELD
        };
        if full {
            self.flush_acks().await?;
        }
        Ok(false)
    }

    /// Writes the held acknowledgements now.
    pub async fn flush_acks(&self) -> Result<(), OutboxError> {
        let seqs = self.held().clone();
        if !seqs.is_empty() {
            // An eviction taken back here raced the acknowledgement (rare): the store's
            // counts are right; the running totals catch up at the next start.
            self.write_acks(seqs).await?;
        }
        Ok(())
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        // A poisoned lock only means a panic elsewhere mid-push: the list is intact.
        self.held_acks.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forgets held acknowledgements once written.
    fn written(&self, seqs: &[u64]) {
        self.held().retain(|s| !seqs.contains(s));
    }

    /// Writes acknowledgements in one transaction; returns how many evictions they took back.
    async fn write_acks(&self, seqs: Vec<u64>) -> Result<u64, OutboxError> {
        let done = seqs.clone();
        let reversed = self
            .db
            .call(move |c| -> rusqlite::Result<u64> {
                let tx = c.transaction()?;
                let mut reversed = 0;
                for seq in seqs {
                    reversed += u64::from(ack_tx(&tx, seq)?);
                }
                tx.commit()?;
                Ok(reversed)
            })
            .await??;
        self.written(&done);
        Ok(reversed)
    }

    /// Counts a failed attempt and remembers its cause (kind and status, never data).
    pub async fn attempt_failed(&self, seq: u64, error: String) -> Result<(), OutboxError> {
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE batches SET attempts = attempts + 1, last_error = ?2 WHERE seq = ?1",
                    params![seq as i64, error],
                )
            })
            .await??;
        Ok(())
    }

    /// The platform refused the batch for good: keep it aside for an operator.
    pub async fn quarantine(&self, seq: u64, error: String) -> Result<(), OutboxError> {
        self.db
            .call(move |c| -> rusqlite::Result<()> {
                let tx = c.transaction()?;
                tx.execute(
                    "UPDATE batches SET state = 1, attempts = attempts + 1, last_error = ?2 WHERE seq = ?1",
                    params![seq as i64, &error],
                )?;
                audit::append(&tx, "batch_quarantined", &serde_json::json!({ "seq": seq, "error": error }))?;
                tx.commit()
            })
            .await??;
        Ok(())
    }

    pub async fn depth(&self) -> Result<Depth, OutboxError> {
        let held = seq_list(&self.held());
        Ok(self.db.call(move |c| read_depth(c, &held)).await??)
    }
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

fn append_tx(c: &mut Connection, quota: Quota, b: &NewBatch<'_>) -> Result<Evicted, OutboxError> {
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
    let tx = c.transaction()?;
    // First, so that what they free counts toward the room for this batch.
    for seq in acks {
        ack_tx(&tx, *seq)?;
    }
    let size = envelope.len() as u64;
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
    tx.execute(
        "INSERT INTO batches(seq, created_ms, records, bytes, envelope) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![seq as i64, created_ms, records, size as i64, envelope],
    )?;
    tx.execute(
        "INSERT INTO meta(key, value) VALUES ('last_seq', ?1) ON CONFLICT(key) DO UPDATE SET value = MAX(value, ?1)",
        [seq as i64],
    )?;
    for (source, s) in source_seqs {
        tx.execute(
            "INSERT INTO source_seq(source, seq) VALUES (?1, ?2) ON CONFLICT(source) DO UPDATE SET seq = MAX(seq, ?2)",
            params![&**source, *s as i64],
        )?;
    }
    audit::append(
        &tx,
        "batch_sealed",
        &serde_json::json!({
            "seq": seq, "records": records, "bytes": size,
            "fields_kept": tally.kept, "fields_deidentified": tally.masked,
            "fields_dropped": tally.dropped, "fields_without_rule": tally.unlisted,
            "rules": rules_json(rules),
        }),
    )?;
    tx.commit()?;
    Ok(evicted)
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

    #[tokio::test]
    async fn acks_are_held_for_the_next_commit_and_a_crash_only_resends() {
        let dir = tempfile::tempdir().unwrap();
        let (ob, _, h) = Outbox::open(dir.path(), quota(1 << 20)).unwrap();
        for seq in 1..=3 {
            ob.append(seq, 0, 1, vec![0; 100].into(), BTreeMap::new())
                .await
                .unwrap();
        }
        ob.ack(1).await.unwrap();
        // Held: still in the file, but neither offered again nor counted.
        assert_eq!(rows(dir.path()), [1, 2, 3]);
        assert_eq!(ob.next_pending(None).await.unwrap().unwrap().seq, 2);
        assert_eq!(ob.depth().await.unwrap().batches, 2);
        // Written with the next batch's commit, audited there.
        ob.append(4, 0, 1, vec![0; 100].into(), BTreeMap::new())
            .await
            .unwrap();
        assert_eq!(rows(dir.path()), [2, 3, 4]);
        assert_eq!(
            ob.audit_last("batch_acked").await.unwrap().unwrap()["seq"],
            1
        );
        // A crash with an acknowledgement held: the batch is offered again after the start
        // (the platform answers `duplicate`), nothing else is lost.
        ob.ack(2).await.unwrap();
        drop(ob);
        h.join().unwrap();
        let (ob, _, _h) = Outbox::open(dir.path(), quota(1 << 20)).unwrap();
        assert_eq!(ob.next_pending(None).await.unwrap().unwrap().seq, 2);
        // Enough held acknowledgements are written on their own.
        for seq in 2..=4 {
            ob.ack(seq).await.unwrap();
        }
        let last = 5 + ACKS_HELD as u64;
        for seq in 5..=last {
            ob.append(seq, 0, 1, vec![0; 10].into(), BTreeMap::new())
                .await
                .unwrap();
        }
        assert_eq!(
            rows(dir.path()).first(),
            Some(&5),
            "2 to 4 went with batch 5"
        );
        for seq in 5..last - 1 {
            ob.ack(seq).await.unwrap();
        }
        assert_eq!(rows(dir.path()).len(), ACKS_HELD + 1, "held, one short");
        ob.ack(last - 1).await.unwrap();
        assert_eq!(rows(dir.path()), [last as i64]);
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
    async fn a_damaged_store_is_moved_aside_and_numbering_restarts_above_it() {
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
            assert_eq!(ob.depth().await.unwrap().batches, 0);
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

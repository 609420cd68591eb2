//! `shuyuan outbox list|retry|drop`: what an operator needs to act on the queue, in
//! particular on batches the platform refused for good (quarantined). Works on the store file
//! directly, also while the daemon runs (SQLite serialises the writers; a busy store is
//! waited for up to 5 s). Dropping is counted in `meta` like evictions, never silent.

use std::path::Path;

use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub seq: u64,
    pub created_ms: i64,
    pub records: u32,
    pub bytes: u64,
    pub state: &'static str,
    pub attempts: u32,
    pub last_error: Option<String>,
}

fn open(state_dir: &Path, write: bool) -> Result<Connection, String> {
    let path = state_dir.join("outbox.sqlite");
    if !path.exists() {
        return Err(format!(
            "{}: no outbox here (has the gateway run with this state_dir?)",
            path.display()
        ));
    }
    let flags = if write {
        OpenFlags::SQLITE_OPEN_READ_WRITE
    } else {
        OpenFlags::SQLITE_OPEN_READ_ONLY
    };
    let c = Connection::open_with_flags(&path, flags)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    c.busy_timeout(std::time::Duration::from_secs(5))
        .map_err(|e| e.to_string())?;
    Ok(c)
}

pub fn list(state_dir: &Path) -> Result<Vec<Row>, String> {
    let c = open(state_dir, false)?;
    // One snapshot for the rows and the index's last sequence number: a running gateway that
    // indexes frames between two reads would otherwise hide them from both.
    let c = c.unchecked_transaction().map_err(|e| e.to_string())?;
    let mut stmt = c
        .prepare("SELECT seq, created_ms, records, bytes, state, attempts, last_error FROM batches ORDER BY seq")
        .map_err(|e| e.to_string())?;
    let rows = stmt
        .query_map([], |r| {
            Ok(Row {
                seq: r.get::<_, i64>(0)? as u64,
                created_ms: r.get(1)?,
                records: r.get(2)?,
                bytes: r.get::<_, i64>(3)? as u64,
                state: if r.get::<_, i64>(4)? == 1 {
                    "quarantined"
                } else {
                    "pending"
                },
                attempts: r.get(5)?,
                last_error: r.get(6)?,
            })
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(|e| e.to_string())?;
    let mut rows = rows;
    rows.extend(unindexed(state_dir, &c)?.into_iter().map(|f| Row {
        seq: f.seq,
        created_ms: f.created_ms,
        records: f.records,
        bytes: f.envelope_len,
        state: "pending",
        attempts: 0,
        last_error: None,
    }));
    drop(stmt);
    c.finish().map_err(|e| e.to_string())?;
    Ok(rows)
}

/// Batches written to segment files that the index does not hold yet (a running gateway
/// indexes them in groups; a stopped one at its next start). Read only.
fn unindexed(state_dir: &Path, c: &Connection) -> Result<Vec<super::segments::Frame>, String> {
    let last: i64 = c
        .query_row(
            "SELECT MAX(COALESCE((SELECT value FROM meta WHERE key = 'last_seq'), 0), COALESCE((SELECT MAX(seq) FROM batches), 0))",
            [],
            |r| r.get(0),
        )
        .map_err(|e| e.to_string())?;
    let (frames, _) =
        super::segments::scan(&state_dir.join(super::segments::DIR), last as u64, false)
            .map_err(|e| e.to_string())?;
    Ok(frames)
}

/// Puts a quarantined batch back in the queue.
pub fn retry(state_dir: &Path, seq: u64) -> Result<(), String> {
    let c = open(state_dir, true)?;
    let n = c
        .execute(
            "UPDATE batches SET state = 0, last_error = NULL WHERE seq = ?1 AND state = 1",
            [seq as i64],
        )
        .map_err(|e| e.to_string())?;
    if n == 0 {
        return Err(format!(
            "no quarantined batch {seq} (see: shuyuan outbox list)"
        ));
    }
    Ok(())
}

/// Destroys one batch for good, counting it (and its records) as dropped by the operator.
pub fn drop_batch(state_dir: &Path, seq: u64) -> Result<u32, String> {
    let mut c = open(state_dir, true)?;
    let tx = c.transaction().map_err(|e| e.to_string())?;
    let records: Option<u32> = tx
        .query_row(
            "SELECT records FROM batches WHERE seq = ?1",
            [seq as i64],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| e.to_string())?;
    let Some(records) = records else {
        if unindexed(state_dir, &tx)?.iter().any(|f| f.seq == seq) {
            return Err(format!("batch {seq} was just written and is not indexed yet: try again in a minute, or after the gateway's next start"));
        }
        return Err(format!("no batch {seq} (see: shuyuan outbox list)"));
    };
    tx.execute("DELETE FROM batches WHERE seq = ?1", [seq as i64])
        .map_err(|e| e.to_string())?;
    for (k, v) in [
        ("dropped_batches", 1i64),
        ("dropped_records", i64::from(records)),
    ] {
        tx.execute(
            "INSERT INTO meta(key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = value + ?2",
            params![k, v],
        )
        .map_err(|e| e.to_string())?;
    }
    super::audit::append(
        &tx,
        "operator_drop",
        &serde_json::json!({ "seq": seq, "records": records }),
    )
    .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    Ok(records)
}

/// The audit trail's entries after `after`, for `shuyuan audit list`.
pub fn audit_list(
    state_dir: &Path,
    after: i64,
    limit: usize,
) -> Result<Vec<super::audit::Entry>, String> {
    let c = open(state_dir, false)?;
    super::audit::list(&c, after, limit).map_err(|e| e.to_string())
}

/// Verifies the audit chain: `Ok(Ok(n))` when all n entries link.
pub fn audit_verify(state_dir: &Path) -> Result<Result<u64, (i64, String)>, String> {
    let c = open(state_dir, false)?;
    super::audit::verify(&c).map_err(|e| e.to_string())
}

/// What `shuyuan purge` destroyed.
#[derive(Debug, Clone, Serialize)]
pub struct Purged {
    pub batches: u64,
    pub records: u64,
    pub bytes: u64,
    pub key_files: Vec<String>,
}

/// Irreversibly destroys the buffered batches (their pages overwritten with zeros, the
/// database rebuilt) and the given key files (overwritten, synced, unlinked), then writes the
/// destruction record to the audit trail, which is all that remains.
pub fn purge(state_dir: &Path, key_files: &[std::path::PathBuf]) -> Result<Purged, String> {
    let mut c = open(state_dir, true)?;
    c.execute_batch("PRAGMA secure_delete=ON")
        .map_err(|e| e.to_string())?;
    let (mut batches, mut records, mut bytes): (i64, i64, i64) = c
        .query_row(
            "SELECT COUNT(*), COALESCE(SUM(records), 0), COALESCE(SUM(bytes), 0) FROM batches",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .map_err(|e| e.to_string())?;
    for f in unindexed(state_dir, &c)? {
        batches += 1;
        records += i64::from(f.records);
        bytes += f.envelope_len as i64;
    }
    super::segments::wipe(&state_dir.join(super::segments::DIR)).map_err(|e| e.to_string())?;
    let tx = c.transaction().map_err(|e| e.to_string())?;
    tx.execute("DELETE FROM batches", [])
        .map_err(|e| e.to_string())?;
    tx.execute("DELETE FROM evicted", [])
        .map_err(|e| e.to_string())?;
    tx.commit().map_err(|e| e.to_string())?;
    // Rewrite the file so no freed page keeps old content, and fold the WAL in.
    c.execute_batch("VACUUM; PRAGMA wal_checkpoint(TRUNCATE);")
        .map_err(|e| e.to_string())?;
    let mut destroyed = Vec::new();
    for f in key_files {
        if let Ok(meta) = std::fs::metadata(f) {
            use std::io::Write;
            let wipe = std::fs::OpenOptions::new()
                .write(true)
                .open(f)
                .and_then(|mut h| {
                    h.write_all(&vec![0u8; meta.len() as usize])
                        .and_then(|()| h.sync_all())
                });
            wipe.and_then(|()| std::fs::remove_file(f))
                .map_err(|e| format!("{}: cannot destroy: {e}", f.display()))?;
            destroyed.push(f.display().to_string());
        }
    }
    let out = Purged {
        batches: batches as u64,
        records: records as u64,
        bytes: bytes as u64,
        key_files: destroyed,
    };
    super::audit::append(
        &c,
        "purge",
        &serde_json::json!({
            "what": "buffered batches and key material destroyed irreversibly",
            "batches": out.batches, "records": out.records, "bytes": out.bytes,
            "key_files": out.key_files,
            "how": "batches deleted with secure_delete and the database rebuilt (VACUUM); segment files and key files overwritten with zeros, synced and unlinked",
        }),
    )
    .map_err(|e| e.to_string())?;
    Ok(out)
}

/// The file ledger, newest first (`shuyuan outbox files`).
pub fn files(state_dir: &Path, limit: usize) -> Result<Vec<super::files::FileEntry>, String> {
    let c = open(state_dir, false)?;
    super::files::list(&c, limit).map_err(|e| e.to_string())
}

/// Rows of files (whose hash starts with `sha_prefix`) that could not be read:
/// (sha256, line, reason).
pub fn file_bad_rows(
    state_dir: &Path,
    sha_prefix: &str,
    limit: usize,
) -> Result<Vec<(String, u64, String)>, String> {
    let c = open(state_dir, false)?;
    super::files::bad_rows(&c, sha_prefix, limit).map_err(|e| e.to_string())
}

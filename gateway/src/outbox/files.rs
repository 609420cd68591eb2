//! The file ledger: which export files a file source has taken, by content hash, so each is
//! ingested exactly once across crashes and restarts.
//!
//! A file's records get the source's sequence numbers `first_seq ..= last_seq`. Its progress
//! is the source's committed sequence (`source_seq`, written in the same transaction as each
//! batch): every record numbered at or below it is in a committed batch; the rest are read
//! again from the file after a crash. A file is only disposed of once all its records are
//! committed.
//!
//! Schema:
//! - `files(sha256 PRIMARY KEY, source, name, bytes, first_seq, last_seq, rows_bad, state,
//!   started_ms, done_ms, note)`; `state` is a [`FileState`].
//! - `file_rows_bad(sha256, line, reason)`: rows that could not be read (where and why, never
//!   their content).

use rusqlite::{params, Connection, OptionalExtension};

use super::{audit, Outbox, OutboxError};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS files (
    sha256     TEXT PRIMARY KEY,
    source     TEXT NOT NULL,
    name       TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    first_seq  INTEGER NOT NULL,
    last_seq   INTEGER,
    rows_bad   INTEGER NOT NULL DEFAULT 0,
    state      INTEGER NOT NULL,
    started_ms INTEGER NOT NULL,
    done_ms    INTEGER,
    note       TEXT
);
CREATE INDEX IF NOT EXISTS files_by_source ON files(source, state, first_seq);
CREATE TABLE IF NOT EXISTS file_rows_bad (
    sha256 TEXT NOT NULL,
    line   INTEGER NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (sha256, line)
);
";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileState {
    /// Records are being handed on.
    Reading = 0,
    /// Every record handed on (`last_seq` known); waiting for them to be committed.
    Read = 1,
    /// Every record committed; the file may go.
    Committed = 2,
    /// Deleted or moved away.
    Disposed = 3,
    /// Not ingested (its header does not match the configured columns).
    Rejected = 4,
    /// Gone from the spool before all its records were committed.
    Abandoned = 5,
}

impl FileState {
    fn from_i64(v: i64) -> Self {
        match v {
            0 => Self::Reading,
            1 => Self::Read,
            2 => Self::Committed,
            3 => Self::Disposed,
            4 => Self::Rejected,
            _ => Self::Abandoned,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Reading => "reading",
            Self::Read => "read",
            Self::Committed => "committed",
            Self::Disposed => "disposed",
            Self::Rejected => "rejected",
            Self::Abandoned => "abandoned",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub sha256: String,
    pub source: String,
    pub name: String,
    pub bytes: u64,
    pub first_seq: u64,
    pub last_seq: Option<u64>,
    pub rows_bad: u64,
    pub state: FileState,
    pub started_ms: i64,
    pub done_ms: Option<i64>,
    pub note: Option<String>,
}

const COLUMNS: &str =
    "sha256, source, name, bytes, first_seq, last_seq, rows_bad, state, started_ms, done_ms, note";

fn entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<FileEntry> {
    Ok(FileEntry {
        sha256: r.get(0)?,
        source: r.get(1)?,
        name: r.get(2)?,
        bytes: r.get::<_, i64>(3)? as u64,
        first_seq: r.get::<_, i64>(4)? as u64,
        last_seq: r.get::<_, Option<i64>>(5)?.map(|v| v as u64),
        rows_bad: r.get::<_, i64>(6)? as u64,
        state: FileState::from_i64(r.get(7)?),
        started_ms: r.get(8)?,
        done_ms: r.get(9)?,
        note: r.get(10)?,
    })
}

fn by_sha(c: &Connection, sha: &str) -> rusqlite::Result<FileEntry> {
    c.query_row(
        &format!("SELECT {COLUMNS} FROM files WHERE sha256 = ?1"),
        [sha],
        entry,
    )
}

fn set_state(
    c: &Connection,
    sha: &str,
    state: FileState,
    note: Option<&str>,
) -> rusqlite::Result<()> {
    c.execute(
        "UPDATE files SET state = ?2, done_ms = ?3, note = COALESCE(?4, note) WHERE sha256 = ?1",
        params![sha, state as i64, crate::timefmt::now_ms(), note],
    )?;
    Ok(())
}

/// The ledger as the operator sees it (`shuyuan outbox files`): newest first.
pub fn list(c: &Connection, limit: usize) -> rusqlite::Result<Vec<FileEntry>> {
    let mut stmt = c.prepare(&format!(
        "SELECT {COLUMNS} FROM files ORDER BY started_ms DESC, first_seq DESC LIMIT ?1"
    ))?;
    let rows = stmt.query_map([limit as i64], entry)?;
    rows.collect()
}

/// Bad rows of one file (by hash prefix), in line order.
pub fn bad_rows(
    c: &Connection,
    sha_prefix: &str,
    limit: usize,
) -> rusqlite::Result<Vec<(String, u64, String)>> {
    let mut stmt = c.prepare(
        "SELECT sha256, line, reason FROM file_rows_bad WHERE sha256 LIKE ?1 || '%' ORDER BY sha256, line LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![sha_prefix, limit as i64], |r| {
        Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?))
    })?;
    rows.collect()
}

impl Outbox {
    pub async fn file_lookup(&self, sha: String) -> Result<Option<FileEntry>, OutboxError> {
        Ok(self.db.call(move |c| by_sha(c, &sha).optional()).await??)
    }

    /// A source's files not yet committed, in the order their records were numbered.
    pub async fn files_unfinished(&self, source: String) -> Result<Vec<FileEntry>, OutboxError> {
        self.files_in(source, "0, 1").await
    }

    /// Files of `source` whose records are all committed and whose disposal is not recorded
    /// (a stop came in between).
    pub async fn files_committed(&self, source: String) -> Result<Vec<FileEntry>, OutboxError> {
        self.files_in(source, "2").await
    }

    async fn files_in(
        &self,
        source: String,
        states: &'static str,
    ) -> Result<Vec<FileEntry>, OutboxError> {
        Ok(self
            .db
            .call(move |c| {
                let mut stmt = c.prepare(&format!(
                    "SELECT {COLUMNS} FROM files WHERE source = ?1 AND state IN ({states}) ORDER BY first_seq"
                ))?;
                let rows = stmt.query_map([&source], entry)?;
                rows.collect::<rusqlite::Result<Vec<_>>>()
            })
            .await??)
    }

    /// The highest record sequence of `source` in a committed batch (0: none).
    pub async fn committed_seq(&self, source: String) -> Result<u64, OutboxError> {
        let log = self.log.clone();
        Ok(self
            .db
            .call(move |c| -> rusqlite::Result<u64> {
                let indexed = c
                    .query_row(
                        "SELECT seq FROM source_seq WHERE source = ?1",
                        [&source],
                        |r| r.get::<_, i64>(0),
                    )
                    .optional()?
                    .unwrap_or(0) as u64;
                let written = super::lock(&log).source_seq(&source).unwrap_or(0);
                Ok(indexed.max(written))
            })
            .await??)
    }

    /// Records that a file is being taken, before any of its records is handed on.
    pub async fn file_started(&self, e: FileEntry) -> Result<(), OutboxError> {
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO files(sha256, source, name, bytes, first_seq, state, started_ms) VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6)",
                    params![e.sha256, e.source, e.name, e.bytes as i64, e.first_seq as i64, e.started_ms],
                )
            })
            .await??;
        Ok(())
    }

    /// Rows that could not be read; a row seen again after a restart is not counted twice.
    pub async fn file_bad_rows(
        &self,
        sha: String,
        rows: Vec<(u64, String)>,
    ) -> Result<(), OutboxError> {
        self.db
            .call(move |c| -> rusqlite::Result<()> {
                let tx = c.transaction()?;
                {
                    let mut ins = tx.prepare_cached(
                        "INSERT OR IGNORE INTO file_rows_bad(sha256, line, reason) VALUES (?1, ?2, ?3)",
                    )?;
                    for (line, reason) in &rows {
                        ins.execute(params![sha, *line as i64, reason])?;
                    }
                }
                tx.execute(
                    "UPDATE files SET rows_bad = (SELECT COUNT(*) FROM file_rows_bad WHERE sha256 = ?1) WHERE sha256 = ?1",
                    [&sha],
                )?;
                tx.commit()
            })
            .await??;
        Ok(())
    }

    /// Every record of the file has been handed on; `last_seq` < `first_seq` means none.
    pub async fn file_read(&self, sha: String, last_seq: u64) -> Result<(), OutboxError> {
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE files SET state = 1, last_seq = ?2 WHERE sha256 = ?1",
                    params![sha, last_seq as i64],
                )
            })
            .await??;
        Ok(())
    }

    /// Every record of the file is committed: on the trail, with what was taken and what not.
    pub async fn file_committed(&self, sha: String) -> Result<(), OutboxError> {
        self.db
            .call(move |c| -> rusqlite::Result<()> {
                let tx = c.transaction()?;
                let e = by_sha(&tx, &sha)?;
                set_state(&tx, &sha, FileState::Committed, None)?;
                let last = e.last_seq.unwrap_or(e.first_seq.saturating_sub(1));
                audit::append(
                    &tx,
                    "file_ingested",
                    &serde_json::json!({
                        "source": e.source, "file": e.name, "sha256": e.sha256, "bytes": e.bytes,
                        "records": (last + 1).saturating_sub(e.first_seq),
                        "first_seq": e.first_seq, "last_seq": last, "rows_bad": e.rows_bad,
                    }),
                )?;
                tx.commit()
            })
            .await??;
        Ok(())
    }

    /// The raw file is gone from the spool (`how` says where or how).
    pub async fn file_disposed(&self, sha: String, how: String) -> Result<(), OutboxError> {
        self.file_final(sha, FileState::Disposed, "file_disposed", how)
            .await
    }

    /// A file that will not be ingested as it is (the header does not match).
    pub async fn file_rejected(&self, e: FileEntry, reason: String) -> Result<(), OutboxError> {
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT OR REPLACE INTO files(sha256, source, name, bytes, first_seq, state, started_ms, note) VALUES (?1, ?2, ?3, ?4, ?5, 4, ?6, ?7)",
                    params![e.sha256, e.source, e.name, e.bytes as i64, e.first_seq as i64, e.started_ms, reason],
                )?;
                audit::append(
                    c,
                    "file_rejected",
                    &serde_json::json!({ "source": e.source, "file": e.name, "sha256": e.sha256, "reason": reason }),
                )
            })
            .await??;
        Ok(())
    }

    /// A file that went away before all its records were committed.
    pub async fn file_abandoned(&self, sha: String, why: String) -> Result<(), OutboxError> {
        self.file_final(sha, FileState::Abandoned, "file_abandoned", why)
            .await
    }

    async fn file_final(
        &self,
        sha: String,
        state: FileState,
        kind: &'static str,
        note: String,
    ) -> Result<(), OutboxError> {
        self.db
            .call(move |c| -> rusqlite::Result<()> {
                let tx = c.transaction()?;
                let e = by_sha(&tx, &sha)?;
                set_state(&tx, &sha, state, Some(&note))?;
                audit::append(
                    &tx,
                    kind,
                    &serde_json::json!({ "source": e.source, "file": e.name, "sha256": e.sha256, "note": note }),
                )?;
                tx.commit()
            })
            .await??;
        Ok(())
    }
}

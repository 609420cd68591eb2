//! The receiver's dedup store and output files. One SQLite table `received(gateway, seq,
//! file, offset, len, records, received_ms)` remembers what was written where. A batch's row
//! and its bytes in the output file commit together: the row is inserted, the bytes appended
//! and fsynced, then the transaction commits; on start, any file longer than its rows say is
//! cut back (bytes of a batch whose commit never happened), so a crash never writes a batch
//! twice.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

use crate::db::{Db, DbError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persisted {
    Written,
    Duplicate,
}

#[derive(Clone)]
pub struct Store {
    db: Db,
    out: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self::Db(DbError::Sql(e))
    }
}

impl Store {
    pub fn open(out: &Path) -> Result<Self, StoreError> {
        let out_dir = out.to_path_buf();
        let (db, _thread) = Db::open(&out.join("receiver.sqlite"), |c| {
            c.execute_batch(
                "CREATE TABLE IF NOT EXISTS received (
                    gateway TEXT NOT NULL, seq INTEGER NOT NULL, file TEXT NOT NULL,
                    offset INTEGER NOT NULL, len INTEGER NOT NULL, records INTEGER NOT NULL,
                    received_ms INTEGER NOT NULL, PRIMARY KEY (gateway, seq))",
            )?;
            recover(c, &out_dir).map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
        })?;
        Ok(Self {
            db,
            out: out.to_path_buf(),
        })
    }

    pub async fn seen(&self, gateway: &str, seq: u64) -> Result<bool, StoreError> {
        let gw = gateway.to_owned();
        Ok(self
            .db
            .call(move |c| {
                c.query_row(
                    "SELECT 1 FROM received WHERE gateway = ?1 AND seq = ?2",
                    params![gw, seq as i64],
                    |_| Ok(()),
                )
                .optional()
            })
            .await??
            .is_some())
    }

    /// Appends a verified, decrypted batch unless (gateway, seq) was already written.
    pub async fn persist(
        &self,
        gateway: String,
        seq: u64,
        date: String,
        records: u32,
        body: Vec<u8>,
    ) -> Result<Persisted, StoreError> {
        let out = self.out.clone();
        self.db
            .call(move |c| persist_tx(c, &out, &gateway, seq, &date, records, &body))
            .await?
    }

    /// Total records written for a gateway (for tests and the demo).
    pub async fn records(&self, gateway: &str) -> Result<u64, StoreError> {
        let gw = gateway.to_owned();
        Ok(self
            .db
            .call(move |c| {
                c.query_row(
                    "SELECT COALESCE(SUM(records), 0) FROM received WHERE gateway = ?1",
                    [gw],
                    |r| r.get::<_, i64>(0),
                )
            })
            .await?? as u64)
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn persist_tx(
    c: &mut Connection,
    out: &Path,
    gw: &str,
    seq: u64,
    date: &str,
    records: u32,
    body: &[u8],
) -> Result<Persisted, StoreError> {
    let tx = c.transaction()?;
    let exists = tx
        .query_row(
            "SELECT 1 FROM received WHERE gateway = ?1 AND seq = ?2",
            params![gw, seq as i64],
            |_| Ok(()),
        )
        .optional()?
        .is_some();
    if exists {
        return Ok(Persisted::Duplicate);
    }
    let rel = format!("{gw}/{date}.jsonl");
    let path = out.join(&rel);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(io_err(&path))?;
    let offset = f.metadata().map_err(io_err(&path))?.len();
    tx.execute(
        "INSERT INTO received(gateway, seq, file, offset, len, records, received_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![gw, seq as i64, rel, offset as i64, body.len() as i64, records, crate::timefmt::now_ms()],
    )?;
    if let Err(e) = f.write_all(body).and_then(|()| f.sync_data()) {
        // Leave the file as it was so the next attempt starts clean.
        let _ = f.set_len(offset);
        return Err(io_err(&path)(e));
    }
    if let Err(e) = tx.commit() {
        let _ = f.set_len(offset);
        let _ = f.sync_data();
        return Err(e.into());
    }
    Ok(Persisted::Written)
}

/// Cuts every output file back to the end of its last committed batch.
fn recover(c: &Connection, out: &Path) -> std::io::Result<()> {
    let mut stmt = c
        .prepare("SELECT file, MAX(offset + len) FROM received GROUP BY file")
        .map_err(std::io::Error::other)?;
    let ends = stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
        })
        .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
        .map_err(std::io::Error::other)?;
    for (rel, end) in ends {
        let path = out.join(&rel);
        let Ok(meta) = std::fs::metadata(&path) else {
            tracing::error!(file = %path.display(), "output file listed in the store is missing");
            continue;
        };
        if meta.len() > end {
            tracing::warn!(file = %path.display(), cut = meta.len() - end, "removing bytes of a batch that never committed");
            let f = OpenOptions::new().write(true).open(&path)?;
            f.set_len(end)?;
            f.sync_all()?;
        } else if meta.len() < end {
            tracing::error!(file = %path.display(), "output file is shorter than the batches recorded in it");
        }
    }
    Ok(())
}

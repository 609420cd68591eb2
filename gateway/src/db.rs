//! One thread owns a SQLite connection and runs the jobs sent to it, so async code never
//! holds a connection or a lock across an await. Used by the outbox and the receiver.

use std::path::Path;
use std::thread::JoinHandle;

use rusqlite::Connection;
use tokio::sync::{mpsc, oneshot};

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("{path}: cannot open the SQLite store: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("the store's thread has stopped")]
    Gone,
    #[error("SQLite: {0}")]
    Sql(#[from] rusqlite::Error),
}

impl DbError {
    /// The file is damaged or not a database (as opposed to busy, locked or unwritable).
    pub fn is_corrupt(&self) -> bool {
        let e = match self {
            DbError::Open { source, .. } | DbError::Sql(source) => source,
            DbError::Gone => return false,
        };
        matches!(
            e.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseCorrupt | rusqlite::ErrorCode::NotADatabase)
        )
    }
}

/// A handle to the connection's thread; cheap to clone. The thread ends, closing the
/// connection cleanly, when the last handle is dropped.
#[derive(Clone)]
pub struct Db {
    tx: mpsc::Sender<Job>,
}

impl Db {
    /// Opens (creating) the database with WAL and synchronous=FULL, runs `init` on it, and
    /// starts the owning thread.
    pub fn open(
        path: &Path,
        init: impl FnOnce(&mut Connection) -> rusqlite::Result<()>,
    ) -> Result<(Self, JoinHandle<()>), DbError> {
        Self::open_with_close(path, init, |_| {})
    }

    /// [`Db::open`], with `close` run on the connection once the last handle is gone, before
    /// the connection closes (what a store holds in memory is written there).
    pub fn open_with_close(
        path: &Path,
        init: impl FnOnce(&mut Connection) -> rusqlite::Result<()>,
        close: impl FnOnce(&mut Connection) + Send + 'static,
    ) -> Result<(Self, JoinHandle<()>), DbError> {
        let open_err = |source| DbError::Open {
            path: path.display().to_string(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        configure(&conn).map_err(open_err)?;
        init(&mut conn).map_err(open_err)?;
        let (tx, mut rx) = mpsc::channel::<Job>(64);
        let handle = std::thread::Builder::new()
            .name("sqlite".into())
            .spawn(move || {
                while let Some(job) = rx.blocking_recv() {
                    job(&mut conn);
                }
                close(&mut conn);
            })
            .map_err(|e| DbError::Open {
                path: path.display().to_string(),
                source: rusqlite::Error::ToSqlConversionFailure(Box::new(e)),
            })?;
        Ok((Self { tx }, handle))
    }

    /// Runs `f` on the connection's thread and returns its result.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> T + Send + 'static,
    ) -> Result<T, DbError> {
        let (rtx, rrx) = oneshot::channel();
        let job: Job = Box::new(move |c| {
            let _ = rtx.send(f(c));
        });
        self.tx.send(job).await.map_err(|_| DbError::Gone)?;
        rrx.await.map_err(|_| DbError::Gone)
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    // Small pages for flash: every commit writes each page it touches (index rows, the
    // per-source sequences, `meta`, the audit row) once to the WAL and again at checkpoint,
    // so the page size is the unit of wear. 1024-byte pages cut the bytes written two- to
    // threefold against 4096 when the envelopes were stored here (docs/benchmarks.md section
    // 5); 512 cut them a little more but cost the polling daemon about 0.7 MiB of peak
    // memory. Only a new file takes it; an existing store keeps its page size.
    conn.execute_batch("PRAGMA page_size=1024")?;
    // A checkpoint every 4000 pages (a WAL of a few MiB at most): pages rewritten between
    // checkpoints (the freed pages of acknowledged batches, reused) are copied back once.
    conn.execute_batch("PRAGMA wal_autocheckpoint=4000")?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode is {mode}, WAL could not be set"
        )));
    }
    // FULL: in WAL mode, NORMAL may lose the last commits on power loss. A committed batch is
    // one the sources were told is safe, and gateways lose power: every commit must reach the
    // flash before we move on. One fsync per batch, not per record, keeps the cost small.
    conn.execute_batch("PRAGMA synchronous=FULL")?;
    // Appends and deletes of whole batches gain nothing from a large page cache; gateways
    // are short of memory. 512 KiB instead of SQLite's 2 MiB default.
    conn.execute_batch("PRAGMA cache_size=-512")?;
    let sync: i64 = conn.query_row("PRAGMA synchronous", [], |r| r.get(0))?;
    if sync != 2 {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "synchronous is {sync}, FULL (2) could not be set"
        )));
    }
    Ok(())
}

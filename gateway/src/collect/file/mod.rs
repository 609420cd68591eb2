//! The file-drop source: business systems (billing, customer accounts, card swipes) export
//! CSV or JSON Lines files into a spool directory; this source takes each complete file
//! once, hands its rows on as records, and disposes of the raw file once every record is in
//! a committed batch.
//!
//! - Complete: unchanged for `settle`, or a `<name><marker>` file exists (exporters write in
//!   place, so a file seen early is not yet whole).
//! - Exactly once: a file is known by its SHA-256 in the outbox's file ledger
//!   ([`crate::outbox::files`]), with the sequence number of its first record. Progress is
//!   the source's committed sequence, written in the same transaction as each batch, so after
//!   a crash the file is read again and only the records not yet committed are handed on,
//!   with their original numbers. The same content dropped again is a duplicate and is not
//!   sent twice.
//! - One file at a time per source, oldest first; rows stream (memory does not grow with the
//!   file), and a full pipeline holds the reader back instead of losing rows (the file is
//!   durable where it is).
//! - A row that cannot be read is recorded with file and line (never its content), counted,
//!   and skipped; a file whose header does not match the configured columns is rejected
//!   (left in place, recorded) and the source goes on.

pub mod rows;

use std::collections::{HashMap, VecDeque};
use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use rows::{Layout, Row, RowReader};

use super::{LayoutCache, Record};
use crate::config::{AfterIngest, SourceConfig};
use crate::outbox::files::{FileEntry, FileState};
use crate::outbox::Outbox;
use crate::stats::SourceStats;
use crate::timefmt::now_ms;

/// Records are handed on in chunks of this many.
const SEND_CHUNK: usize = 256;
/// Bad rows are written to the ledger in groups of this many.
const BAD_ROWS_FLUSH: usize = 256;
const DEFAULT_SETTLE: Duration = Duration::from_secs(30);

pub struct FileSource {
    pub id: Arc<str>,
    pub spool: PathBuf,
    pub pattern: String,
    pub settle: Duration,
    pub marker: Option<String>,
    pub after: AfterIngest,
    pub move_to: Option<PathBuf>,
    pub interval: Duration,
    pub layout: Arc<Layout>,
    pub outbox: Outbox,
    pub stats: Arc<SourceStats>,
}

/// A file whose records are all handed on, waiting for them to be committed.
struct Pending {
    sha: String,
    path: PathBuf,
    last_seq: u64,
}

/// How reading a file ended.
enum Read {
    /// Every row read; the last record's number (first_seq - 1 when there were none).
    Done {
        last_seq: u64,
    },
    /// Shutdown (or the pipeline closed) part-way; the file resumes at the next start.
    Stopped,
    Rejected(String),
    /// Could not go on; `next_seq` is above every number already handed on.
    Failed {
        error: String,
        next_seq: u64,
    },
}

impl FileSource {
    pub fn from_config(
        cfg: &SourceConfig,
        outbox: Outbox,
        stats: Arc<SourceStats>,
    ) -> Result<Self, String> {
        let layout = Layout::from_config(cfg).map_err(|errs| {
            errs.into_iter()
                .map(|(k, m)| format!("{k}: {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        Ok(Self {
            id: Arc::from(cfg.id.as_str()),
            spool: cfg
                .spool
                .clone()
                .ok_or_else(|| format!("source {:?} has no spool directory", cfg.id))?,
            pattern: cfg.pattern.clone().unwrap_or_else(|| "*".into()),
            settle: cfg.settle.map_or(DEFAULT_SETTLE, |d| d.0),
            marker: cfg.marker.clone(),
            after: cfg.after.unwrap_or(AfterIngest::Delete),
            move_to: cfg.move_to.clone(),
            interval: cfg.interval.0,
            layout: Arc::new(layout),
            outbox,
            stats,
        })
    }

    /// Runs until shutdown. `next_seq` continues the source's numbering from the store.
    pub async fn run(self, tx: mpsc::Sender<Record>, shutdown: CancellationToken, next_seq: u64) {
        let mut next_seq = next_seq;
        let mut pending: VecDeque<Pending> = VecDeque::new();
        // Files seen and not to be looked at again while unchanged (rejected, or a duplicate
        // of one in progress): path → (length, modified).
        let mut skip: HashMap<PathBuf, (u64, SystemTime)> = HashMap::new();
        self.finish_disposals().await;
        if let Err(e) = self
            .resume(&tx, &shutdown, &mut next_seq, &mut pending)
            .await
        {
            self.error(format!("cannot resume: {e}"));
        }
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            self.complete(&mut pending).await;
            let files = match self.scan() {
                Ok(f) => {
                    self.stats.polls_ok.fetch_add(1, Relaxed);
                    self.stats.last_ok_ms.store(now_ms(), Relaxed);
                    f
                }
                Err(e) => {
                    self.stats.polls_failed.fetch_add(1, Relaxed);
                    self.error(format!("spool {}: {e}", self.spool.display()));
                    continue;
                }
            };
            for (path, len, modified) in files {
                if shutdown.is_cancelled() {
                    break;
                }
                if skip.get(&path) == Some(&(len, modified)) {
                    continue;
                }
                match self.take(&path, len, &tx, &shutdown, &mut next_seq).await {
                    Ok(Some(p)) => pending.push_back(p),
                    Ok(None) => {}
                    Err(Skip) => {
                        skip.insert(path, (len, modified));
                    }
                }
                self.complete(&mut pending).await;
            }
        }
        tracing::debug!(source = %self.id, "source stopped");
    }

    /// Completes the disposals that a crash or power loss interrupted, and puts each on the
    /// trail: files part-way through destruction (see [`DESTROYING`]) are destroyed, with their
    /// markers; files committed whose disposal is not recorded and that are no longer in the
    /// spool are recorded as disposed (one still there is disposed of by the scan).
    async fn finish_disposals(&self) {
        let spool = self.spool.clone();
        let destroyed = tokio::task::spawn_blocking(move || finish_destroying(&spool))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)))
            .unwrap_or_else(|e| {
                self.error(format!(
                    "spool {}: cannot finish destroying a file: {e}",
                    self.spool.display()
                ));
                Vec::new()
            });
        for sha in destroyed {
            // Another source's file when sources share a spool: the ledger knows each by hash.
            let Ok(Some(entry)) = self.outbox.file_lookup(sha.clone()).await else {
                continue;
            };
            let how = "overwritten with zeros, synced and unlinked (finished at start: the last run stopped part-way)";
            self.disposed_at_start(entry, how).await;
        }
        let committed = match self.outbox.files_committed(self.id.to_string()).await {
            Ok(c) => c,
            Err(e) => {
                self.error(format!("file ledger: {e}"));
                return;
            }
        };
        for entry in committed {
            if self.spool.join(&entry.name).exists() {
                continue;
            }
            let how = "not in the spool at start: disposed of before the last run stopped, or removed by hand";
            self.disposed_at_start(entry, how).await;
        }
    }

    async fn disposed_at_start(&self, entry: FileEntry, how: &str) {
        let path = self.spool.join(&entry.name);
        if let Some(m) = self.marker_of(&path).filter(|_| !path.exists()) {
            let _ = std::fs::remove_file(m);
        }
        tracing::info!(source = %self.id, file = %entry.name, "{how}");
        if let Err(e) = self
            .outbox
            .file_disposed(entry.sha256, how.to_string())
            .await
        {
            self.error(format!("{}: file ledger: {e}", entry.name));
        }
    }

    /// Files left unfinished by the last run: completes those whose records are committed,
    /// reads again those with records that were not, and abandons those gone from the spool.
    async fn resume(
        &self,
        tx: &mpsc::Sender<Record>,
        shutdown: &CancellationToken,
        next_seq: &mut u64,
        pending: &mut VecDeque<Pending>,
    ) -> Result<(), crate::outbox::OutboxError> {
        let committed = self.outbox.committed_seq(self.id.to_string()).await?;
        for f in self.outbox.files_unfinished(self.id.to_string()).await? {
            let path = self.spool.join(&f.name);
            if let (FileState::Read, Some(last)) = (f.state, f.last_seq) {
                if last <= committed {
                    *next_seq = (*next_seq).max(last + 1);
                    pending.push_back(Pending {
                        sha: f.sha256,
                        path,
                        last_seq: last,
                    });
                    continue;
                }
            }
            let same = match tokio::task::spawn_blocking({
                let path = path.clone();
                move || sha256_file(&path)
            })
            .await
            {
                Ok(Ok(sha)) => sha == f.sha256,
                _ => false,
            };
            if !same {
                let lost = f.last_seq.map_or("unknown".to_string(), |l| {
                    (l + 1)
                        .saturating_sub(committed.max(f.first_seq - 1) + 1)
                        .to_string()
                });
                tracing::error!(source = %self.id, file = %f.name, records_not_committed = %lost, "a file being ingested is gone or changed: its remaining records are lost");
                self.outbox
                    .file_abandoned(
                        f.sha256,
                        format!("gone or changed before all records were committed; records not committed: {lost}"),
                    )
                    .await?;
                continue;
            }
            tracing::info!(source = %self.id, file = %f.name, committed, "resuming a file");
            match self.read(&path, &f, committed + 1, tx, shutdown).await {
                Read::Done { last_seq } => {
                    self.outbox.file_read(f.sha256.clone(), last_seq).await?;
                    *next_seq = (*next_seq).max(last_seq + 1);
                    pending.push_back(Pending {
                        sha: f.sha256,
                        path,
                        last_seq,
                    });
                }
                Read::Stopped => return Ok(()),
                // The file was read before with the same hash, so neither can happen unless
                // the configuration changed; leave it for an operator.
                Read::Rejected(m) => {
                    self.error(format!("{}: {m}", f.name));
                    self.outbox.file_abandoned(f.sha256, m).await?;
                }
                Read::Failed { error, next_seq: n } => {
                    *next_seq = (*next_seq).max(n);
                    self.error(format!("{}: {error}", f.name));
                    self.outbox.file_abandoned(f.sha256, error).await?;
                }
            }
        }
        Ok(())
    }

    /// Takes one complete file: a new one is read, a known one disposed of or skipped.
    async fn take(
        &self,
        path: &Path,
        len: u64,
        tx: &mpsc::Sender<Record>,
        shutdown: &CancellationToken,
        next_seq: &mut u64,
    ) -> Result<Option<Pending>, Skip> {
        let name = file_name(path);
        let sha = match tokio::task::spawn_blocking({
            let path = path.to_path_buf();
            move || sha256_file(&path)
        })
        .await
        {
            Ok(Ok(sha)) => sha,
            Ok(Err(e)) => {
                self.error(format!("{name}: cannot read: {e}"));
                return Ok(None);
            }
            Err(e) => {
                self.error(format!("{name}: {e}"));
                return Ok(None);
            }
        };
        let known = match self.outbox.file_lookup(sha.clone()).await {
            Ok(k) => k,
            Err(e) => {
                self.error(format!("{name}: file ledger: {e}"));
                return Ok(None);
            }
        };
        match known.as_ref().map(|k| k.state) {
            None => {}
            // Committed earlier (a crash before it went), or the same content again.
            Some(FileState::Committed | FileState::Disposed | FileState::Abandoned) => {
                let dup = known
                    .as_ref()
                    .is_some_and(|k| k.state != FileState::Committed);
                if dup {
                    tracing::warn!(source = %self.id, file = %name, "the same content was ingested before: not sent again");
                }
                self.dispose(path, &sha, dup).await;
                return Ok(None);
            }
            Some(FileState::Rejected | FileState::Reading | FileState::Read) => return Err(Skip),
        }
        let entry = FileEntry {
            sha256: sha.clone(),
            source: self.id.to_string(),
            name: name.clone(),
            bytes: len,
            first_seq: *next_seq,
            last_seq: None,
            rows_bad: 0,
            state: FileState::Reading,
            started_ms: now_ms(),
            done_ms: None,
            note: None,
        };
        if let Err(e) = self.outbox.file_started(entry.clone()).await {
            self.error(format!("{name}: file ledger: {e}"));
            return Ok(None);
        }
        tracing::info!(source = %self.id, file = %name, bytes = len, first_seq = *next_seq, "ingesting");
        match self.read(path, &entry, entry.first_seq, tx, shutdown).await {
            Read::Done { last_seq } => {
                if let Err(e) = self.outbox.file_read(sha.clone(), last_seq).await {
                    self.error(format!("{name}: file ledger: {e}"));
                }
                *next_seq = last_seq + 1;
                Ok(Some(Pending {
                    sha,
                    path: path.to_path_buf(),
                    last_seq,
                }))
            }
            // Numbers handed on stay used; the rest of the file resumes at the next start.
            Read::Stopped => Ok(None),
            Read::Rejected(reason) => {
                self.stats.files_rejected.fetch_add(1, Relaxed);
                self.error(format!("{name}: not ingested: {reason}"));
                if let Err(e) = self.outbox.file_rejected(entry, reason).await {
                    self.error(format!("{name}: file ledger: {e}"));
                }
                Err(Skip)
            }
            Read::Failed { error, next_seq: n } => {
                // Abandoned: the numbers it used stay used; the next file goes on above them.
                *next_seq = n.max(*next_seq);
                self.error(format!("{name}: {error}"));
                let _ = self.outbox.file_abandoned(sha, error).await;
                Err(Skip)
            }
        }
    }

    /// Reads the file on a blocking thread, handing on the records numbered from `from`
    /// (those below were committed before); bad rows go to the ledger.
    async fn read(
        &self,
        path: &Path,
        entry: &FileEntry,
        from: u64,
        tx: &mpsc::Sender<Record>,
        shutdown: &CancellationToken,
    ) -> Read {
        let job = ReadJob {
            path: path.to_path_buf(),
            sha: entry.sha256.clone(),
            first_seq: entry.first_seq,
            from,
            source: self.id.clone(),
            layout: self.layout.clone(),
            tx: tx.clone(),
            shutdown: shutdown.clone(),
            outbox: self.outbox.clone(),
            stats: self.stats.clone(),
            rt: tokio::runtime::Handle::current(),
        };
        match tokio::task::spawn_blocking(move || job.run()).await {
            Ok(r) => r,
            // A panic in the reader: nothing handed on is known; stay above the whole file.
            Err(e) => Read::Failed {
                error: format!("reader stopped: {e}"),
                next_seq: from.max(entry.first_seq) + entry.bytes,
            },
        }
    }

    /// Disposes of every pending file whose records are all committed.
    async fn complete(&self, pending: &mut VecDeque<Pending>) {
        if pending.is_empty() {
            return;
        }
        let committed = match self.outbox.committed_seq(self.id.to_string()).await {
            Ok(c) => c,
            Err(e) => {
                self.error(format!("file ledger: {e}"));
                return;
            }
        };
        while pending.front().is_some_and(|p| p.last_seq <= committed) {
            let Some(p) = pending.pop_front() else { break };
            if let Err(e) = self.outbox.file_committed(p.sha.clone()).await {
                self.error(format!("file ledger: {e}"));
                continue;
            }
            self.stats.files_ingested.fetch_add(1, Relaxed);
            self.dispose(&p.path, &p.sha, false).await;
        }
    }

    /// Deletes or moves the raw file (and its marker), and puts that on the trail. A failure
    /// leaves the file where it is; the next scan finds it committed and tries again.
    async fn dispose(&self, path: &Path, sha: &str, duplicate: bool) {
        let name = file_name(path);
        let (after, move_to, marker) = (self.after, self.move_to.clone(), self.marker_of(path));
        let owned = path.to_path_buf();
        let sha_owned = sha.to_string();
        let done = tokio::task::spawn_blocking(move || -> std::io::Result<String> {
            let how = match (after, move_to) {
                (AfterIngest::Move, Some(dir)) => move_into(&owned, &dir, &sha_owned)?,
                _ => {
                    destroy(&owned, &sha_owned)?;
                    "overwritten with zeros, synced and unlinked".to_string()
                }
            };
            if let Some(m) = marker {
                let _ = std::fs::remove_file(m);
            }
            Ok(how)
        })
        .await;
        match done {
            Ok(Ok(how)) => {
                let how = if duplicate {
                    format!("duplicate of a file ingested before; {how}")
                } else {
                    how
                };
                tracing::info!(source = %self.id, file = %name, "{how}");
                if let Err(e) = self.outbox.file_disposed(sha.to_string(), how).await {
                    self.error(format!("{name}: file ledger: {e}"));
                }
            }
            Ok(Err(e)) => self.error(format!("{name}: cannot dispose of the file: {e}")),
            Err(e) => self.error(format!("{name}: {e}")),
        }
    }

    fn marker_of(&self, path: &Path) -> Option<PathBuf> {
        let m = self.marker.as_ref()?;
        let mut os = path.as_os_str().to_owned();
        os.push(m);
        Some(PathBuf::from(os))
    }

    /// Complete files in the spool, oldest first: (path, length, modified).
    fn scan(&self) -> std::io::Result<Vec<(PathBuf, u64, SystemTime)>> {
        let now = SystemTime::now();
        let mut out = Vec::new();
        for ent in std::fs::read_dir(&self.spool)? {
            let ent = ent?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if !is_export(name, &self.pattern, self.marker.as_deref()) {
                continue;
            }
            let meta = match ent.metadata() {
                Ok(m) if m.is_file() => m,
                _ => continue,
            };
            let modified = meta.modified().unwrap_or(now);
            let ready = match &self.marker {
                Some(_) => self.marker_of(&ent.path()).is_some_and(|m| m.exists()),
                None => now.duration_since(modified).unwrap_or_default() >= self.settle,
            };
            if ready {
                out.push((ent.path(), meta.len(), modified));
            }
        }
        out.sort_by(|a, b| a.2.cmp(&b.2).then_with(|| a.0.cmp(&b.0)));
        Ok(out)
    }

    fn error(&self, e: String) {
        tracing::warn!(source = %self.id, "{e}");
        self.stats.set_last_error(e);
    }
}

/// Not to be looked at again while unchanged.
struct Skip;

/// Everything the blocking reader needs.
struct ReadJob {
    path: PathBuf,
    sha: String,
    first_seq: u64,
    from: u64,
    source: Arc<str>,
    layout: Arc<Layout>,
    tx: mpsc::Sender<Record>,
    shutdown: CancellationToken,
    outbox: Outbox,
    stats: Arc<SourceStats>,
    rt: tokio::runtime::Handle,
}

impl ReadJob {
    fn run(self) -> Read {
        let file = match std::fs::File::open(&self.path) {
            Ok(f) => f,
            Err(e) => {
                return Read::Failed {
                    error: format!("cannot open: {e}"),
                    next_seq: self.from,
                }
            }
        };
        let mut reader = RowReader::new(
            std::io::BufReader::with_capacity(256 << 10, file),
            self.layout.clone(),
        );
        let mut seq = self.first_seq;
        let mut layouts = LayoutCache::default();
        let mut bad: Vec<(u64, String)> = Vec::new();
        let mut out: Vec<Record> = Vec::with_capacity(SEND_CHUNK);
        let name = file_name(&self.path);
        let flush = |bad: &mut Vec<(u64, String)>| {
            if bad.is_empty() {
                return;
            }
            let rows = std::mem::take(bad);
            if let Err(e) = self
                .rt
                .block_on(self.outbox.file_bad_rows(self.sha.clone(), rows))
            {
                tracing::warn!(source = %self.source, file = %name, "cannot record bad rows: {e}");
            }
        };
        loop {
            if self.shutdown.is_cancelled() {
                flush(&mut bad);
                return Read::Stopped;
            }
            let row = match reader.next_row() {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(rows::FileError::Header(m)) => return Read::Rejected(m),
                Err(rows::FileError::Io(e)) => {
                    flush(&mut bad);
                    return Read::Failed {
                        error: format!("cannot read: {e}"),
                        next_seq: seq.max(self.from),
                    };
                }
            };
            match row {
                Row::Good { ts_ms, fields, .. } => {
                    let this = seq;
                    seq += 1;
                    if this < self.from {
                        continue;
                    }
                    out.push(layouts.record(
                        self.source.clone(),
                        ts_ms.unwrap_or_else(now_ms),
                        this,
                        fields,
                    ));
                    if out.len() >= SEND_CHUNK && !self.send(&mut out) {
                        flush(&mut bad);
                        return Read::Stopped;
                    }
                }
                Row::Bad { line, reason } => {
                    self.stats.rows_bad.fetch_add(1, Relaxed);
                    tracing::warn!(source = %self.source, file = %name, line, "row not read: {reason}");
                    bad.push((line, reason));
                    if bad.len() >= BAD_ROWS_FLUSH {
                        flush(&mut bad);
                    }
                }
            }
        }
        flush(&mut bad);
        if !self.send(&mut out) {
            return Read::Stopped;
        }
        Read::Done { last_seq: seq - 1 }
    }

    /// Hands on the records in `out`, waiting while the pipeline is full (the file holds
    /// the rest). Room for the whole chunk is reserved at once: a wake per record would cost
    /// more than the record. False when the pipeline has closed.
    fn send(&self, out: &mut Vec<Record>) -> bool {
        if out.is_empty() {
            return true;
        }
        let Ok(permits) = self.rt.block_on(self.tx.reserve_many(out.len())) else {
            return false;
        };
        let n = out.len() as u64;
        for (permit, rec) in permits.zip(out.drain(..)) {
            permit.send(rec);
        }
        self.stats.records.fetch_add(n, Relaxed);
        true
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The file's SHA-256, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// What a spool file is renamed to before it is overwritten (followed by its SHA-256). A crash
/// part-way through the overwrite then leaves a dot name that the scan passes over and the next
/// start finishes destroying, never a half-zeroed export under its own name: that one had a
/// new hash, so it looked like a new file, unreadable (its header zeroed), and stayed in the
/// spool with the rest of its rows.
const DESTROYING: &str = ".shuyuan-destroying-";

/// Destroys a spool file whose records are committed: renames it out of the scan's sight
/// (see [`DESTROYING`]), then overwrites it with zeros, syncs and unlinks it. On flash with
/// wear levelling or a copy-on-write file system the old blocks may survive the overwrite
/// (see docs/operations.md); the unlink always happens.
pub fn destroy(path: &Path, sha: &str) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let hidden = dir.join(format!("{DESTROYING}{sha}"));
    // Left by a crash and not finished yet: renaming over it would unlink it unwiped.
    if hidden.exists() {
        overwrite_and_unlink(&hidden)?;
    }
    std::fs::rename(path, &hidden)?;
    sync_dir(dir);
    overwrite_and_unlink(&hidden)
}

/// Finishes what a crash left part-way through [`destroy`] in `spool`: the SHA-256 of each
/// file destroyed now.
pub fn finish_destroying(spool: &Path) -> std::io::Result<Vec<String>> {
    let mut done = Vec::new();
    let rd = match std::fs::read_dir(spool) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e),
    };
    for ent in rd {
        let ent = ent?;
        let name = ent.file_name();
        let Some(sha) = name.to_str().and_then(|n| n.strip_prefix(DESTROYING)) else {
            continue;
        };
        done.push(sha.to_string());
        overwrite_and_unlink(&ent.path())?;
    }
    Ok(done)
}

fn overwrite_and_unlink(path: &Path) -> std::io::Result<()> {
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(path) {
        let len = f.metadata()?.len();
        let zeros = vec![0u8; 1 << 20];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        f.sync_all()?;
    }
    std::fs::remove_file(path)?;
    if let Some(dir) = path.parent() {
        sync_dir(dir);
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// Moves the file into `dir` (a name already there gets the start of the hash appended);
/// across file systems, copies under a temporary name, syncs, renames and destroys the
/// original, so that a crash never leaves a partial copy under the file's name.
fn move_into(path: &Path, dir: &Path, sha: &str) -> std::io::Result<String> {
    std::fs::create_dir_all(dir)?;
    let name = file_name(path);
    let mut to = dir.join(&name);
    if to.exists() {
        to = dir.join(format!("{name}.{}", &sha[..12.min(sha.len())]));
    }
    match std::fs::rename(path, &to) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.raw_os_error() == Some(18) => {
            // EXDEV: another file system.
            let part = dir.join(format!(".{name}.part"));
            std::fs::copy(path, &part)?;
            std::fs::File::open(&part)?.sync_all()?;
            std::fs::rename(&part, &to)?;
            sync_dir(dir);
            destroy(path, sha)?;
        }
        Err(e) => return Err(e),
    }
    Ok(format!("moved to {}", to.display()))
}

/// Whether a spool entry's name is an export this source takes: not hidden (a dot name, which
/// includes files being destroyed), not a partial or temporary file, not a marker, and
/// matching the pattern.
fn is_export(name: &str, pattern: &str, marker: Option<&str>) -> bool {
    !(name.starts_with('.')
        || name.ends_with(".tmp")
        || name.ends_with(".part")
        || marker.is_some_and(|m| name.ends_with(m)))
        && glob(pattern, name)
}

/// `*` matches any run of characters, `?` one character.
pub fn glob(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_matches_like_a_shell() {
        for (p, n, m) in [
            ("*", "a.csv", true),
            ("*.csv", "bill-2024.csv", true),
            ("*.csv", "bill.csv.tmp", false),
            ("bill-????.csv", "bill-2024.csv", true),
            ("bill-????.csv", "bill-24.csv", false),
            ("*-*.jsonl", "a-b-c.jsonl", true),
            ("用户*.csv", "用户2024.csv", true),
        ] {
            assert_eq!(glob(p, n), m, "{p} {n}");
        }
    }

    #[test]
    fn destroy_overwrites_and_unlinks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.csv");
        std::fs::write(&p, b"secret row\n").unwrap();
        destroy(&p, "aa11").unwrap();
        assert!(!p.exists());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let q = dir.path().join("y.csv");
        std::fs::write(&q, b"row\n").unwrap();
        let how = move_into(&q, &dir.path().join("done"), "abc").unwrap();
        assert!(how.contains("done"));
        assert!(dir.path().join("done/y.csv").exists());
    }

    #[test]
    fn a_destruction_cut_short_is_out_of_the_scans_sight_and_finished_later() {
        let dir = tempfile::tempdir().unwrap();
        // What a crash part-way through the overwrite leaves: the first block zeroed, the rest
        // of the export (rows with personal data) still there, under the destroying name.
        let mut half = vec![0u8; 4096];
        half.extend_from_slice("310101199001011234,13800138000\n".repeat(100).as_bytes());
        let hidden = dir.path().join(format!("{DESTROYING}bb22"));
        std::fs::write(&hidden, &half).unwrap();
        std::fs::write(dir.path().join("next.csv"), b"a,b\n").unwrap();
        assert!(
            !is_export(&format!("{DESTROYING}bb22"), "*", None),
            "the scan passes it over"
        );
        assert!(is_export("next.csv", "*", None));

        // A later file of the same content wipes it first: renaming over it would unlink it
        // with the rows still on disk (a second link shows the blocks' content).
        let link = dir.path().join(".link");
        std::fs::hard_link(&hidden, &link).unwrap();
        let again = dir.path().join("again.csv");
        std::fs::write(&again, b"a,b\n").unwrap();
        destroy(&again, "bb22").unwrap();
        assert!(!hidden.exists() && !again.exists());
        let left = std::fs::read(&link).unwrap();
        assert_eq!(left.len(), half.len());
        assert!(left.iter().all(|&b| b == 0), "wiped before it went");
        std::fs::remove_file(&link).unwrap();

        // The next start finishes what is left.
        std::fs::write(&hidden, &half).unwrap();
        assert_eq!(
            finish_destroying(dir.path()).unwrap(),
            vec!["bb22".to_string()]
        );
        assert!(!hidden.exists());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "only next.csv is left"
        );
    }
}

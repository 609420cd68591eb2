//! Counters the stages bump and the demo (later status and health) read. Atomics only: a
//! counter never holds a field value, and the last-error text is built from error kinds and
//! addresses, never from data.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

#[derive(Debug, Default)]
pub struct SourceStats {
    pub polls_ok: AtomicU64,
    pub polls_failed: AtomicU64,
    pub exceptions: AtomicU64,
    pub timeouts: AtomicU64,
    /// Modbus RTU: replies with a bad CRC or for another unit (noise, wiring, two masters).
    pub crc_errors: AtomicU64,
    pub connects_failed: AtomicU64,
    pub records: AtomicU64,
    /// Polled but not taken by the pipeline in time (it was stalled): lost, and counted.
    pub records_not_handed_on: AtomicU64,
    pub last_ok_ms: AtomicI64,
    /// File sources: files whose records are all committed, files not taken (header did not
    /// match), and rows that could not be read (recorded by file and line).
    pub files_ingested: AtomicU64,
    pub files_rejected: AtomicU64,
    pub rows_bad: AtomicU64,
    last_error: Mutex<Option<String>>,
}

impl SourceStats {
    pub fn set_last_error(&self, e: String) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = Some(e);
        }
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|g| g.clone())
    }
}

#[derive(Debug, Default)]
pub struct PipelineStats {
    pub records_in: AtomicU64,
    pub fields_kept: AtomicU64,
    pub fields_masked: AtomicU64,
    pub fields_dropped: AtomicU64,
    /// Fields without a rule in their policy (default deny).
    pub fields_unlisted: AtomicU64,
    pub batches_sealed: AtomicU64,
    pub records_sealed: AtomicU64,
    pub bytes_sealed: AtomicU64,
    pub uploads: AtomicU64,
    pub upload_failures: AtomicU64,
    pub batches_acked: AtomicU64,
    /// Envelope bytes the platform acknowledged.
    pub bytes_acked: AtomicU64,
    pub batches_duplicate: AtomicU64,
    pub batches_quarantined: AtomicU64,
    pub batches_evicted: AtomicU64,
    pub records_evicted: AtomicU64,
    /// Sealed but never committed (store failing, or still full at shutdown under "pause").
    pub records_lost_uncommitted: AtomicU64,
    /// Polled but not taken by the stalled pipeline, all sources together.
    pub records_not_handed_on: AtomicU64,
    /// When the platform last acknowledged a batch (Unix ms; 0: not since start).
    pub last_ack_ms: AtomicI64,
    /// Failed uploads since the last success.
    pub consecutive_failures: AtomicU64,
    last_upload_error: Mutex<Option<String>>,
}

impl PipelineStats {
    pub fn set_upload_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_upload_error.lock() {
            *g = e;
        }
    }

    pub fn upload_error(&self) -> Option<String> {
        self.last_upload_error.lock().ok().and_then(|g| g.clone())
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

/// Everything a running gateway counts.
#[derive(Debug, Default)]
pub struct Stats {
    pub pipeline: Arc<PipelineStats>,
    /// The client certificate's notAfter (Unix ms; 0: unknown).
    pub cert_not_after_ms: AtomicI64,
    pub sources: Mutex<Vec<(Arc<str>, Arc<SourceStats>)>>,
}

impl Stats {
    pub fn source(&self, id: &Arc<str>) -> Arc<SourceStats> {
        let s = Arc::new(SourceStats::default());
        if let Ok(mut g) = self.sources.lock() {
            g.push((id.clone(), s.clone()));
        }
        s
    }

    pub fn polls(&self) -> (u64, u64) {
        let g = match self.sources.lock() {
            Ok(g) => g,
            Err(_) => return (0, 0),
        };
        g.iter().fold((0, 0), |(ok, bad), (_, s)| {
            (
                ok + s.polls_ok.load(Relaxed),
                bad + s.polls_failed.load(Relaxed),
            )
        })
    }
}

//! `shuyuan status`: the daemon answers on a Unix socket (mode 0660) with a JSON snapshot of
//! its counters; the CLI renders it for a technician, or, when the daemon is not running,
//! says so and shows what the store tells (queue depth, last acknowledged upload). Exit codes:
//! 0 OK, 1 DEGRADED, 2 DOWN. No field value is ever part of a snapshot.

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::outbox::Outbox;
use crate::stats::Stats;
use crate::timefmt::now_ms;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SourceStatus {
    pub id: String,
    pub polls_ok: u64,
    pub polls_failed: u64,
    pub last_ok_ms: i64,
    pub last_error: Option<String>,
    pub records_not_handed_on: u64,
    /// Modbus: requests that timed out, and RTU replies with a bad CRC.
    #[serde(default)]
    pub timeouts: u64,
    #[serde(default)]
    pub crc_errors: u64,
    /// File sources: files fully ingested, files rejected, rows that could not be read.
    #[serde(default)]
    pub files_ingested: u64,
    #[serde(default)]
    pub files_rejected: u64,
    #[serde(default)]
    pub rows_bad: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Snapshot {
    pub gateway: String,
    pub version: String,
    pub now_ms: i64,
    pub started_ms: i64,
    pub sources: Vec<SourceStatus>,
    pub buffer_batches: u64,
    pub buffer_bytes: u64,
    pub buffer_max_bytes: u64,
    pub oldest_batch_ms: Option<i64>,
    pub quarantined: u64,
    pub evicted_records: u64,
    pub last_ack_ms: i64,
    pub consecutive_failures: u64,
    pub last_upload_error: Option<String>,
    pub fields_kept: u64,
    pub fields_deidentified: u64,
    pub fields_dropped: u64,
    pub fields_without_rule: u64,
    pub records_lost: u64,
    /// Days until the gateway's certificate expires (None: unknown).
    pub cert_days_left: Option<i64>,
    pub disk_free_bytes: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Ok,
    Degraded,
    Down,
}

impl Snapshot {
    /// The overall state and, when not OK, the reasons in words.
    pub fn health(&self) -> (Health, Vec<String>) {
        let mut why = Vec::new();
        for s in &self.sources {
            let stale = s.last_ok_ms == 0 || self.now_ms - s.last_ok_ms > 60_000;
            if stale && s.polls_failed > 0 {
                why.push(format!(
                    "source {} is not answering: {}",
                    s.id,
                    s.last_error.as_deref().unwrap_or("no reply")
                ));
            }
        }
        for s in self.sources.iter().filter(|s| s.files_rejected > 0) {
            why.push(format!(
                "source {}: {} files rejected (header does not match the columns): {}",
                s.id,
                s.files_rejected,
                s.last_error.as_deref().unwrap_or("see the log")
            ));
        }
        if self.consecutive_failures >= 3 {
            why.push(format!(
                "the platform is not reachable: {} uploads failed in a row",
                self.consecutive_failures
            ));
        }
        if self.quarantined > 0 {
            why.push(format!(
                "{} batches refused by the platform are quarantined (shuyuan outbox list)",
                self.quarantined
            ));
        }
        if let Some(d) = self.cert_days_left.filter(|d| *d <= 30) {
            why.push(if d < 0 {
                "the gateway's certificate has expired: the platform refuses it; renew it now"
                    .to_string()
            } else {
                format!(
                    "the gateway's certificate expires in {d} days: renew it{}",
                    if d <= 7 { " now" } else { "" }
                )
            });
        }
        if self.evicted_records > 0 || self.records_lost > 0 {
            why.push(format!(
                "{} records lost to a full buffer since start",
                self.evicted_records + self.records_lost
            ));
        }
        let all_sources_down = !self.sources.is_empty()
            && self
                .sources
                .iter()
                .all(|s| s.last_ok_ms == 0 && s.polls_failed > 0);
        // An expired certificate: the platform refuses every upload.
        let cert_expired = self.cert_days_left.is_some_and(|d| d < 0);
        let state = if all_sources_down || cert_expired {
            Health::Down
        } else if why.is_empty() {
            Health::Ok
        } else {
            Health::Degraded
        };
        (state, why)
    }
}

pub async fn snapshot(
    gateway: &str,
    started_ms: i64,
    stats: &Stats,
    outbox: &Outbox,
    max_bytes: u64,
) -> Snapshot {
    let p = &stats.pipeline;
    let depth = outbox.depth().await.unwrap_or_default();
    let sources = stats
        .sources
        .lock()
        .map(|g| {
            g.iter()
                .map(|(id, s)| SourceStatus {
                    id: id.to_string(),
                    polls_ok: s.polls_ok.load(Relaxed),
                    polls_failed: s.polls_failed.load(Relaxed),
                    last_ok_ms: s.last_ok_ms.load(Relaxed),
                    last_error: s.last_error(),
                    records_not_handed_on: s.records_not_handed_on.load(Relaxed),
                    timeouts: s.timeouts.load(Relaxed),
                    crc_errors: s.crc_errors.load(Relaxed),
                    files_ingested: s.files_ingested.load(Relaxed),
                    files_rejected: s.files_rejected.load(Relaxed),
                    rows_bad: s.rows_bad.load(Relaxed),
                })
                .collect()
        })
        .unwrap_or_default();
    Snapshot {
        gateway: gateway.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        now_ms: now_ms(),
        started_ms,
        sources,
        buffer_batches: depth.batches,
        buffer_bytes: depth.bytes,
        buffer_max_bytes: max_bytes,
        oldest_batch_ms: depth.oldest_ms,
        quarantined: depth.quarantined,
        evicted_records: p.records_evicted.load(Relaxed),
        last_ack_ms: p.last_ack_ms.load(Relaxed),
        consecutive_failures: p.consecutive_failures.load(Relaxed),
        last_upload_error: p.upload_error(),
        fields_kept: p.fields_kept.load(Relaxed),
        fields_deidentified: p.fields_masked.load(Relaxed),
        fields_dropped: p.fields_dropped.load(Relaxed),
        fields_without_rule: p.fields_unlisted.load(Relaxed),
        records_lost: p.records_lost_uncommitted.load(Relaxed)
            + p.records_not_handed_on.load(Relaxed),
        cert_days_left: match stats.cert_not_after_ms.load(Relaxed) {
            0 => None,
            t => Some((t - now_ms()).div_euclid(86_400_000)),
        },
        disk_free_bytes: outbox.free_disk(),
    }
}

/// Serves snapshots on `path` until `shutdown`: one JSON document per connection.
pub async fn serve(
    path: std::path::PathBuf,
    gateway: String,
    stats: Arc<Stats>,
    outbox: Outbox,
    max_bytes: u64,
    shutdown: CancellationToken,
) {
    let _ = std::fs::remove_file(&path);
    let listener = match tokio::net::UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(socket = %path.display(), "status socket unavailable: {e}");
            return;
        }
    };
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660));
    }
    let started = now_ms();
    loop {
        let (mut conn, _) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let snap = snapshot(&gateway, started, &stats, &outbox, max_bytes).await;
        if let Ok(json) = serde_json::to_vec(&snap) {
            let _ = tokio::time::timeout(Duration::from_secs(2), conn.write_all(&json)).await;
        }
    }
    let _ = std::fs::remove_file(&path);
}

/// Asks the daemon on `path` for a snapshot (None: not running).
pub async fn fetch(path: &Path) -> Option<Snapshot> {
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::UnixStream::connect(path),
    )
    .await
    .ok()?
    .ok()?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut buf))
        .await
        .ok()?
        .ok()?;
    serde_json::from_slice(&buf).ok()
}

fn ago(now: i64, then: i64) -> String {
    if then <= 0 {
        return "never".into();
    }
    let s = (now - then).max(0) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m{}s ago", s / 60, s % 60),
        _ => format!("{}h{}m ago", s / 3600, (s / 60) % 60),
    }
}

/// The technician's screen.
pub fn render(s: &Snapshot, color: bool) -> String {
    let (state, why) = s.health();
    let (c, off) = match (color, state) {
        (false, _) => ("", ""),
        (true, Health::Ok) => ("\x1b[32m", "\x1b[0m"),
        (true, Health::Degraded) => ("\x1b[33m", "\x1b[0m"),
        (true, Health::Down) => ("\x1b[31m", "\x1b[0m"),
    };
    let word = match state {
        Health::Ok => "OK",
        Health::Degraded => "DEGRADED",
        Health::Down => "DOWN",
    };
    let mut o = format!(
        "{} — {c}{word}{off}   (shuyuan {}, up {}, {})\n",
        s.gateway,
        s.version,
        ago(s.now_ms, s.started_ms).trim_end_matches(" ago"),
        crate::timefmt::rfc3339_ms(s.now_ms)
    );
    for w in &why {
        o += &format!("  ! {w}\n");
    }
    o += "\nsources\n";
    for src in &s.sources {
        let ok = src.last_ok_ms > 0 && s.now_ms - src.last_ok_ms <= 60_000;
        o += &format!(
            "  {:<20} {:<4} last good poll {:<10} polls {} ok / {} failed{}\n",
            src.id,
            if ok { "OK" } else { "FAIL" },
            ago(s.now_ms, src.last_ok_ms),
            src.polls_ok,
            src.polls_failed,
            src.last_error
                .as_ref()
                .filter(|_| !ok)
                .map(|e| format!("  last error: {e}"))
                .unwrap_or_default()
        );
        if src.timeouts + src.crc_errors > 0 {
            o += &format!(
                "  {:<25} timeouts {}, bad CRC {}\n",
                "", src.timeouts, src.crc_errors
            );
        }
        if src.files_ingested + src.files_rejected + src.rows_bad > 0 {
            o += &format!(
                "  {:<25} files {} ingested / {} rejected; {} rows not readable (shuyuan outbox files)\n",
                "", src.files_ingested, src.files_rejected, src.rows_bad
            );
        }
    }
    let pct = if s.buffer_max_bytes > 0 {
        s.buffer_bytes as f64 * 100.0 / s.buffer_max_bytes as f64
    } else {
        0.0
    };
    o += &format!(
        "\nbuffer   {} batches, {} ({pct:.1}% of quota), oldest {}; quarantined {}; lost to a full buffer {}\n",
        s.buffer_batches,
        crate::config::ByteSize(s.buffer_bytes),
        s.oldest_batch_ms.map_or("—".into(), |t| ago(s.now_ms, t)),
        s.quarantined,
        s.evicted_records + s.records_lost
    );
    o += &format!(
        "uplink   last success {}; failures in a row {}{}\n",
        ago(s.now_ms, s.last_ack_ms),
        s.consecutive_failures,
        s.last_upload_error
            .as_ref()
            .map(|e| format!("; last error: {e}"))
            .unwrap_or_default()
    );
    o += &format!(
        "system   certificate {} · disk free {} · clock {}\n",
        s.cert_days_left
            .map_or("expiry unknown".into(), |d| format!("{d} days left")),
        s.disk_free_bytes
            .map_or("unknown".into(), |b| crate::config::ByteSize(b).to_string()),
        crate::timefmt::rfc3339_ms(s.now_ms)
    );
    o += &format!(
        "policy   fields kept {}, de-identified {}, dropped by rule {}, without a rule (dropped) {}\n",
        s.fields_kept, s.fields_deidentified, s.fields_dropped, s.fields_without_rule
    );
    o
}

//! Wires the stages into a running gateway (`shuyuan run`, the demo, the tests):
//!
//! sources ─(records, bounded)─▶ policy+batch ─(batches, bounded)─▶ seal ─(sealed, bounded)─▶ commit ─▶ outbox ◀─ uplink
//!
//! Shutdown is one token. Sources stop on it; their channel closes, so the batch stage hands
//! on its open batch and ends; the seal stage seals it, its commit task commits it, and both
//! end; the uplink pushes what it can within [`crate::uplink::FINAL_DRAIN`] and ends. Every
//! task is awaited, with a grace limit that is logged when it runs out.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::{self, Batch, Limits};
use crate::collect::file::FileSource;
use crate::collect::modbus::{ModbusTcpSource, Plans};
use crate::collect::rtu::RtuBus;
use crate::config::{Config, SourceKind};
use crate::keys::{HpkePublicKey, Signer};
use crate::outbox::{Outbox, OutboxError, Quota};
use crate::policy::{Policy, PseudonymKey};
use crate::seal::{self, BatchMeta};
use crate::stats::{PipelineStats, Stats};
use crate::uplink::{Backoff, Endpoint, HttpClient, Schedule, Uplink, Window};

/// How long shutdown waits for the stages before giving up on them.
pub const GRACE: Duration = Duration::from_secs(20);
const RECORD_QUEUE: usize = 1024;
const BATCH_QUEUE: usize = 2;
pub const ZSTD_LEVEL: i32 = 1;

/// Runs the gateway until `shutdown` fires, then drains and returns.
pub async fn run(
    config: &Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    run_with(config, shutdown, stats, Arc::new(Notify::new())).await
}

/// [`run`], with `push_now` to ring for an immediate push (`shuyuan push`, SIGUSR1).
pub async fn run_with(
    config: &Config,
    shutdown: CancellationToken,
    stats: Arc<Stats>,
    push_now: Arc<Notify>,
) -> anyhow::Result<()> {
    let gw = &config.gateway;
    let u = &config.uplink;
    std::fs::create_dir_all(&gw.state_dir)
        .with_context(|| format!("cannot create state_dir {}", gw.state_dir.display()))?;
    let signer = Arc::new(Signer::load(&u.key)?);
    let not_after = check_certificate(config, &signer)?;
    stats
        .cert_not_after_ms
        .store(not_after.saturating_mul(1000), Relaxed);
    let recipient = crate::keys::load_hpke_public(&u.recipient)?;
    let tls = crate::tls::client_config(&u.ca, &u.cert, &u.key)?;
    let endpoint = Endpoint::parse(&u.url).map_err(anyhow::Error::msg)?;
    let clients = (0..u.in_flight.max(1))
        .map(|_| HttpClient::new(endpoint.clone(), tls.clone(), u.timeout.0))
        .collect::<Result<Vec<_>, _>>()
        .map_err(anyhow::Error::msg)?;
    let quota = Quota {
        max_bytes: config.buffer.max_bytes.0,
        on_full: config.buffer.on_full,
        min_free_disk: config.buffer.min_free_disk.0,
    };
    let (outbox, resume, db_thread) = Outbox::open(&gw.state_dir, quota)?;
    tracing::info!(gateway = %gw.id, pending = resume.pending, last_seq = resume.last_seq, "outbox open");

    let pseudonym = match &config.pseudonym {
        Some(p) => Some(Arc::new(
            PseudonymKey::load(&p.key).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    let mut policies = HashMap::new();
    // Compiled once per policy, shared by the sources that name it.
    let mut compiled: HashMap<&str, Arc<Policy>> = HashMap::new();
    for s in &config.sources {
        let policy = match compiled.get(s.policy.as_str()) {
            Some(p) => p.clone(),
            None => {
                let p = config
                    .policies
                    .get(&s.policy)
                    .with_context(|| format!("policy {:?} not defined", s.policy))?;
                let p = Arc::new(
                    Policy::compile(p, pseudonym.as_ref())
                        .map_err(|e| anyhow::anyhow!("policy {:?}: {:?}", s.policy, e))?,
                );
                compiled.insert(&s.policy, p.clone());
                p
            }
        };
        policies.insert(Arc::from(s.id.as_str()), policy);
    }
    // The header names the pseudonym key whenever one is configured, so the platform knows
    // which key made the tokens it joins on.
    let pseudonym_key_id = pseudonym
        .as_ref()
        .map(|k| k.id().to_string())
        .unwrap_or_default();
    // The trail says which policies (by a digest of their rules) and which key were applied.
    let policy_versions: serde_json::Map<String, serde_json::Value> = config
        .policies
        .iter()
        .map(|(name, p)| {
            use sha2::Digest;
            let d = sha2::Sha256::digest(format!("{p:?}").as_bytes());
            (
                name.clone(),
                serde_json::Value::String(d[..8].iter().map(|b| format!("{b:02x}")).collect()),
            )
        })
        .collect();
    // The configuration as loaded (paths resolved), so a change shows on the trail.
    let config_digest: String = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(format!("{config:?}").as_bytes());
        d.iter().map(|b| format!("{b:02x}")).collect()
    };
    outbox
        .audit(
            "gateway_started",
            serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "config_digest": config_digest,
                "sources": config.sources.len(),
                "policies": policy_versions,
                "pseudonym_key_id": pseudonym_key_id,
            }),
        )
        .await?;

    audit_certificate(config, &outbox, not_after).await;

    let tasks = TaskTracker::new();
    let (rec_tx, rec_rx) = mpsc::channel(RECORD_QUEUE);
    let (batch_tx, batch_rx) = mpsc::channel::<Batch>(BATCH_QUEUE);
    // Each source continues its numbering from what the store holds.
    let next_seq = |id: &str| {
        resume
            .source_seqs
            .get(id)
            .map_or(resume.source_floor + 1, |v| v + 1)
    };
    let mut plans = Plans::default();
    for s in &config.sources {
        match s.kind {
            SourceKind::ModbusTcp => {
                let id: Arc<str> = Arc::from(s.id.as_str());
                let plan = plans.of(config, s).map_err(anyhow::Error::msg)?;
                let mut src = ModbusTcpSource::from_config(s, plan, stats.source(&id))
                    .map_err(anyhow::Error::msg)?;
                src.pipeline = Some(stats.pipeline.clone());
                tasks.spawn(src.run(rec_tx.clone(), shutdown.clone(), next_seq(&s.id)));
            }
            SourceKind::File => {
                let id: Arc<str> = Arc::from(s.id.as_str());
                let src = FileSource::from_config(s, outbox.clone(), stats.source(&id))
                    .map_err(anyhow::Error::msg)?;
                tasks.spawn(src.run(rec_tx.clone(), shutdown.clone(), next_seq(&s.id)));
            }
            // One task per bus, below.
            SourceKind::ModbusRtu => {}
        }
    }
    for bus in RtuBus::from_config(config, &stats, next_seq).map_err(anyhow::Error::msg)? {
        tasks.spawn(bus.run(rec_tx.clone(), shutdown.clone()));
    }
    drop(rec_tx);
    let limits = Limits {
        max_records: config.batch.max_records,
        max_bytes: config.batch.max_bytes.0 as usize,
        max_age: config.batch.max_age.0,
    };
    tasks.spawn(batch::run(
        rec_rx,
        batch_tx,
        policies,
        limits,
        stats.pipeline.clone(),
    ));

    let wake = Arc::new(Notify::new());
    let sealed_all = CancellationToken::new();
    let status_outbox = outbox.clone();
    // Held only by the watchdog task: a handle left in this scope would keep the store's
    // thread alive past shutdown.
    let mut watchdog_outbox = Some(outbox.clone());
    // Audit retention: at start, then daily.
    tasks.spawn({
        let (outbox, keep, stop) = (outbox.clone(), config.audit.keep(), shutdown.clone());
        async move {
            let mut daily = tokio::time::interval(Duration::from_secs(86_400));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = daily.tick() => {}
                }
                match outbox.prune_audit(keep).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(entries = n, "audit entries past retention removed"),
                    Err(e) => tracing::warn!("audit retention: {e}"),
                }
                audit_expiry(&outbox, not_after).await;
            }
        }
    });
    if let Some(h) = &config.health {
        // The gateway answers with its own certificate (CN and DNS name = gateway id).
        let tls = crate::tls::server_config(&u.ca, &u.cert, &u.key)?;
        let addr = crate::health::serve(
            &h.listen,
            tls,
            h.allow.clone(),
            gw.id.clone(),
            stats.clone(),
            outbox.clone(),
            config.buffer.max_bytes.0,
            shutdown.clone(),
        )
        .await?;
        tracing::info!(%addr, "health endpoint listening");
    }
    let sealer = Sealer {
        gateway_id: gw.id.clone(),
        pseudonym_key_id,
        recipient,
        signer,
        outbox: outbox.clone(),
        next_seq: resume.last_seq + 1,
        wake: wake.clone(),
        stats: stats.pipeline.clone(),
    };
    tasks.spawn(sealer.run(batch_rx, shutdown.clone(), sealed_all.clone()));
    let uplink = Uplink {
        gateway_id: gw.id.clone(),
        outbox,
        clients,
        every: u.every.map(|e| e.0),
        schedule: Schedule {
            windows: u
                .windows
                .iter()
                .filter_map(|w| Window::parse(w).ok())
                .collect(),
        },
        max_bytes_per_sec: u.max_bytes_per_sec.map(|b| b.0),
        push_now,
        backoff: Backoff::new(u.backoff_min.0, u.backoff_max.0),
        wake,
        sealed_all,
        stats: stats.pipeline.clone(),
    };
    tasks.spawn(uplink.run(shutdown.clone()));
    tasks.spawn(crate::status::serve(
        config.status_socket(),
        gw.id.clone(),
        stats.clone(),
        status_outbox,
        config.buffer.max_bytes.0,
        shutdown.clone(),
    ));
    // systemd: ready once the store is open and the sources started; then WATCHDOG=1 for as
    // long as the store's thread answers, so a hung pipeline gets restarted.
    let notifier = Arc::new(crate::notify::Notifier::from_env());
    if let (Some(every), Some(outbox)) = (notifier.watchdog_interval(), watchdog_outbox.take()) {
        let (notifier, stop) = (notifier.clone(), shutdown.clone());
        tasks.spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                match tokio::time::timeout(every, outbox.depth()).await {
                    Ok(Ok(_)) => notifier.watchdog(),
                    _ => tracing::error!("the store did not answer: no watchdog ping"),
                }
            }
        });
    }
    drop(watchdog_outbox);
    tasks.close();
    tracing::info!(gateway = %gw.id, sources = config.sources.len(), "gateway running");
    notifier.ready(&format!(
        "{} sources, {} batches pending",
        config.sources.len(),
        resume.pending
    ));

    shutdown.cancelled().await;
    tracing::info!("shutting down: sealing the open batch");
    if tokio::time::timeout(GRACE, tasks.wait()).await.is_err() {
        tracing::error!(
            grace_s = GRACE.as_secs(),
            "stages did not stop in time; exiting anyway"
        );
        return Ok(());
    }
    // Every handle to the store went with the stages: wait for its thread to close the
    // connection, which checkpoints the WAL into the database file, so a stopped gateway
    // leaves one clean file behind.
    let closed = tokio::task::spawn_blocking(move || db_thread.join());
    if tokio::time::timeout(Duration::from_secs(10), closed)
        .await
        .is_err()
    {
        tracing::warn!("the store did not close in time");
    }
    Ok(())
}

/// Days within which a certificate's coming expiry is put on the trail (daily) and shown.
pub const CERT_WARN_DAYS: i64 = 30;
/// Within this many days the coming expiry is logged as an error.
pub const CERT_ERROR_DAYS: i64 = 7;

/// A certificate not seen at the last start is put on the audit trail as installed.
async fn audit_certificate(config: &Config, outbox: &Outbox, not_after: i64) {
    let Ok(certs) = crate::tls::load_certs(&config.uplink.cert) else {
        return;
    };
    let fingerprint: String = {
        use sha2::Digest;
        sha2::Sha256::digest(certs[0].as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let last = outbox
        .audit_last("certificate_installed")
        .await
        .ok()
        .flatten();
    if last.as_ref().and_then(|d| d["sha256"].as_str()) != Some(fingerprint.as_str()) {
        let _ = outbox
            .audit(
                "certificate_installed",
                serde_json::json!({
                    "sha256": fingerprint,
                    "cn": config.gateway.id,
                    "not_after": crate::timefmt::rfc3339_ms(not_after.saturating_mul(1000)),
                    "path": config.uplink.cert.display().to_string(),
                }),
            )
            .await;
    }
}

/// Within [`CERT_WARN_DAYS`] of expiry, says so on the trail (called at start and daily).
async fn audit_expiry(outbox: &Outbox, not_after: i64) {
    let days = (not_after - crate::timefmt::now_ms() / 1000).div_euclid(86_400);
    if days <= CERT_ERROR_DAYS {
        tracing::error!(
            days_left = days,
            "the gateway's certificate expires within a week (or has): renew it now (shuyuan certs request, then certs install)"
        );
    } else if days <= CERT_WARN_DAYS {
        tracing::warn!(
            days_left = days,
            "the gateway's certificate expires soon: renew it"
        );
    }
    if days <= CERT_WARN_DAYS {
        let _ = outbox
            .audit(
                "certificate_near_expiry",
                serde_json::json!({
                    "days_left": days,
                    "not_after": crate::timefmt::rfc3339_ms(not_after.saturating_mul(1000)),
                }),
            )
            .await;
    }
}

/// The client certificate must carry the signing key and name this gateway.
/// Returns the certificate's notAfter (Unix seconds).
fn check_certificate(config: &Config, signer: &Signer) -> anyhow::Result<i64> {
    let u = &config.uplink;
    let certs = crate::tls::load_certs(&u.cert)?;
    let ident = crate::tls::identity(&certs[0])
        .map_err(|e| anyhow::anyhow!("{}: {e}", u.cert.display()))?;
    if ident.spki_der != signer.spki_der() {
        bail!(
            "{}: this certificate is not for the key {}",
            u.cert.display(),
            u.key.display()
        );
    }
    if ident.cn != config.gateway.id {
        bail!(
            "{}: certificate CN is {:?} but gateway.id is {:?}; the platform would refuse every batch",
            u.cert.display(),
            ident.cn,
            config.gateway.id
        );
    }
    Ok(ident.not_after_unix)
}

/// The seal stage: numbers, seals and commits each batch, then wakes the uplink.
pub struct Sealer {
    pub gateway_id: String,
    /// Named in every header (empty without a pseudonym key).
    pub pseudonym_key_id: String,
    pub recipient: HpkePublicKey,
    pub signer: Arc<Signer>,
    pub outbox: Outbox,
    pub next_seq: u64,
    pub wake: Arc<Notify>,
    pub stats: Arc<PipelineStats>,
}

/// Sealed batches waiting for their commit. Committing waits on the disk (fsync), sealing on
/// the CPU: with the two in separate tasks the next batch is sealed while the last one is
/// made durable, instead of the seal stage idling for every fsync.
const COMMIT_QUEUE: usize = 2;

/// A batch after sealing, waiting for its commit.
struct SealedBatch {
    seq: u64,
    created_ms: i64,
    /// `None`: sealing failed (cannot happen with valid keys) and the records are lost.
    envelope: Option<bytes::Bytes>,
    batch: Batch,
}

/// What sealing needs.
struct SealKeys {
    gateway_id: String,
    pseudonym_key_id: String,
    recipient: HpkePublicKey,
    signer: Arc<Signer>,
}

impl SealKeys {
    fn seal(&self, seq: u64, mut batch: Batch) -> SealedBatch {
        let created_ms = crate::timefmt::now_ms();
        let meta = BatchMeta {
            gateway_id: &self.gateway_id,
            seq,
            created_ms,
            records: batch.records,
            pseudonym_key_id: &self.pseudonym_key_id,
        };
        let envelope = match seal::seal(
            &batch.body,
            &meta,
            &self.recipient,
            &self.signer,
            ZSTD_LEVEL,
        ) {
            Ok(e) => Some(bytes::Bytes::from(e)),
            Err(e) => {
                tracing::error!(
                    seq,
                    records = batch.records,
                    "cannot seal batch, records lost: {e}"
                );
                None
            }
        };
        // The plaintext is gone as soon as it is sealed.
        batch.body = Vec::new();
        SealedBatch {
            seq,
            created_ms,
            envelope,
            batch,
        }
    }
}

impl Sealer {
    /// Runs until its input closes and every batch is committed; then fires `sealed_all`.
    pub async fn run(
        self,
        mut rx: mpsc::Receiver<Batch>,
        shutdown: CancellationToken,
        sealed_all: CancellationToken,
    ) {
        let Sealer {
            gateway_id,
            pseudonym_key_id,
            recipient,
            signer,
            outbox,
            mut next_seq,
            wake,
            stats,
        } = self;
        let keys = SealKeys {
            gateway_id,
            pseudonym_key_id,
            recipient,
            signer,
        };
        let (to_commit, committing) = mpsc::channel(COMMIT_QUEUE);
        let full_at_stop = Arc::new(AtomicBool::new(false));
        let committer = Committer {
            outbox,
            wake,
            stats: stats.clone(),
            full_at_stop: full_at_stop.clone(),
        };
        let committer = tokio::spawn(committer.run(committing, shutdown));
        while let Some(b) = rx.recv().await {
            if full_at_stop.load(Relaxed) {
                // Sealing what cannot be committed would only hold up the stop.
                stats
                    .records_lost_uncommitted
                    .fetch_add(b.records.into(), Relaxed);
                continue;
            }
            // The number is taken at sealing (it is in the signed header): a batch lost after
            // sealing leaves its number unused, and the loss is counted and audited.
            // Sealed here, on an async worker, not on the blocking pool: a pool thread beside
            // the batch stage gave the pipeline benchmark no clear gain on two cores, and its
            // own malloc arena (zstd's tables are allocated per batch) raised the polling
            // daemon's peak from 11.9 to 12.4-13.2 MiB, past its 12 MiB budget.
            let sealed = keys.seal(next_seq, b);
            next_seq += 1;
            if to_commit.send(sealed).await.is_err() {
                break;
            }
        }
        drop(to_commit);
        if let Err(e) = committer.await {
            tracing::error!("commit task failed: {e}");
        }
        sealed_all.cancel();
    }
}

/// The commit half of the seal stage: puts sealed batches into the outbox in sequence order
/// and wakes the uplink.
struct Committer {
    outbox: Outbox,
    wake: Arc<Notify>,
    stats: Arc<PipelineStats>,
    /// Set when the buffer was full under on_full = "pause" after shutdown fired: it will not
    /// empty before the stop, so the batches still coming are counted as lost without being
    /// sealed or tried (a seal and a transaction apiece kept the stop of a stalled pipeline,
    /// a thousand records queued, past its grace on a loaded machine, and what was still in
    /// flight then went uncounted).
    full_at_stop: Arc<AtomicBool>,
}

/// Losses go on the audit trail at most this often while the gateway runs (and at the
/// stop): during a stall they grow with every poll, and an entry per batch would add a
/// synced write per batch to a pipeline that is already short of room.
const LOSS_AUDIT_EVERY: Duration = Duration::from_secs(10);

impl Committer {
    async fn run(mut self, mut rx: mpsc::Receiver<SealedBatch>, shutdown: CancellationToken) {
        let mut audited_losses = 0u64;
        let mut last_audit: Option<tokio::time::Instant> = None;
        while let Some(sealed) = rx.recv().await {
            self.commit(sealed, &shutdown).await;
            if last_audit.is_none_or(|t| t.elapsed() >= LOSS_AUDIT_EVERY)
                && self.audit_losses(&mut audited_losses).await
            {
                last_audit = Some(tokio::time::Instant::now());
            }
        }
        self.audit_losses(&mut audited_losses).await;
    }

    /// Puts records lost since the last entry (not taken by a stalled pipeline, or sealed but
    /// never committed) on the audit trail; returns whether an entry was written.
    async fn audit_losses(&self, audited: &mut u64) -> bool {
        let not_taken = self.stats.records_not_handed_on.load(Relaxed);
        let uncommitted = self.stats.records_lost_uncommitted.load(Relaxed);
        let total = not_taken + uncommitted;
        if total <= *audited {
            return false;
        }
        let detail = serde_json::json!({
            "records": total - *audited,
            "since_start_not_taken_by_stalled_pipeline": not_taken,
            "since_start_sealed_not_committed": uncommitted,
        });
        if self.outbox.audit("records_lost", detail).await.is_ok() {
            *audited = total;
            return true;
        }
        false
    }

    async fn commit(&mut self, sealed: SealedBatch, shutdown: &CancellationToken) {
        let SealedBatch {
            seq,
            created_ms,
            envelope,
            batch: mut b,
        } = sealed;
        // Unsealable, or sealed before the stop found the buffer full: counted, not tried.
        let envelope = envelope.filter(|_| !self.full_at_stop.load(Relaxed));
        let Some(envelope) = envelope else {
            self.stats
                .records_lost_uncommitted
                .fetch_add(b.records.into(), Relaxed);
            return;
        };
        let size = envelope.len() as u64;
        let rules = Arc::new(std::mem::take(&mut b.rules));
        // A store that keeps failing holds the stage at most 600 tries; a buffer full under
        // on_full = "pause" holds it until the platform acks something (the uplink keeps
        // pushing) or shutdown; meanwhile sources count what they cannot hand on.
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match self
                .outbox
                .append_audited(
                    seq,
                    created_ms,
                    b.records,
                    envelope.clone(),
                    b.source_seqs.clone(),
                    b.tally,
                    rules.clone(),
                )
                .await
            {
                Ok(ev) => {
                    if ev.batches > 0 {
                        self.stats.batches_evicted.fetch_add(ev.batches, Relaxed);
                        self.stats.records_evicted.fetch_add(ev.records, Relaxed);
                        tracing::warn!(
                            evicted_batches = ev.batches,
                            evicted_records = ev.records,
                            "buffer full: oldest batches evicted"
                        );
                    }
                    self.stats.batches_sealed.fetch_add(1, Relaxed);
                    self.stats
                        .records_sealed
                        .fetch_add(b.records.into(), Relaxed);
                    self.stats.bytes_sealed.fetch_add(size, Relaxed);
                    tracing::debug!(
                        seq,
                        records = b.records,
                        bytes = size,
                        "batch sealed and committed"
                    );
                    self.wake.notify_one();
                    return;
                }
                Err(e) => {
                    let full = matches!(e, OutboxError::Full { .. });
                    if attempt == 1 && full {
                        tracing::warn!(seq, "{e}: waiting for the platform to take batches");
                    } else if !full {
                        tracing::error!(seq, attempt, "cannot commit batch: {e}");
                    }
                    // On shutdown a full buffer will not empty in time: count and move on.
                    if shutdown.is_cancelled() && full {
                        self.full_at_stop.store(true, Relaxed);
                        break;
                    }
                    if (shutdown.is_cancelled() && attempt > 1) || (!full && attempt >= 600) {
                        break;
                    }
                    // Ends early on shutdown so the stop is not held up by a full buffer.
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = shutdown.cancelled(), if attempt > 1 => {}
                    }
                }
            }
        }
        self.stats
            .records_lost_uncommitted
            .fetch_add(b.records.into(), Relaxed);
        tracing::error!(
            seq,
            records = b.records,
            "batch not committed, records lost (counted)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_certificate_near_expiry_goes_on_the_trail() {
        let dir = tempfile::tempdir().unwrap();
        let quota = Quota {
            max_bytes: 1 << 20,
            on_full: crate::config::OnFull::DropOldest,
            min_free_disk: 0,
        };
        let (outbox, _, _t) = Outbox::open(dir.path(), quota).unwrap();
        let now = crate::timefmt::now_ms() / 1000;
        audit_expiry(&outbox, now + 90 * 86_400).await;
        assert!(outbox
            .audit_last("certificate_near_expiry")
            .await
            .unwrap()
            .is_none());
        audit_expiry(&outbox, now + 12 * 86_400 + 60).await;
        let d = outbox
            .audit_last("certificate_near_expiry")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(d["days_left"], 12);
    }
}

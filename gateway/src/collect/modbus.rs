//! The Modbus TCP source: one task per device that polls its [`ReadPlan`] on an interval
//! over tokio-modbus, with per-request timeouts and reconnection under capped backoff. A
//! Modbus exception, a timeout or a short reply fails that poll (counted, logged), never the
//! gateway.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{timeout, Instant, MissedTickBehavior};
use tokio_modbus::client::{Context, Reader};
use tokio_modbus::Slave;
use tokio_util::sync::CancellationToken;

pub use super::points::ReadPlan;
use super::points::{Read, ReadData};
use super::{Names, Record, Value};
use crate::config::{Config, PointConfig, RegisterKind, SourceConfig};
use crate::stats::SourceStats;
use crate::timefmt::now_ms;

const RECONNECT_MIN: Duration = Duration::from_millis(500);
const RECONNECT_MAX: Duration = Duration::from_secs(30);
const SEND_GRACE: Duration = Duration::from_secs(5);

/// `host:port` with a numeric port; the host may be a name resolved at connect time.
pub fn check_address(a: &str) -> Result<(), String> {
    let bad = || format!("address {a:?} must be \"host:port\", e.g. \"192.168.10.21:502\"");
    let (host, port) = a.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad());
    }
    Ok(())
}

pub struct ModbusTcpSource {
    pub id: Arc<str>,
    pub address: String,
    pub unit: u8,
    pub interval: Duration,
    pub timeout: Duration,
    pub layout: DeviceLayout,
    pub stats: Arc<SourceStats>,
    /// The gateway's totals, so losses reach the audit trail.
    pub pipeline: Option<Arc<crate::stats::PipelineStats>>,
}

/// Why one poll failed, and whether the connection must be dropped.
pub(crate) enum PollError {
    Exception(String),
    Broken(String),
}

impl ModbusTcpSource {
    pub fn from_config(
        cfg: &SourceConfig,
        plan: Arc<ReadPlan>,
        stats: Arc<SourceStats>,
    ) -> Result<Self, String> {
        let address = cfg
            .address
            .clone()
            .ok_or_else(|| format!("source {:?} has no address", cfg.id))?;
        Ok(Self {
            id: Arc::from(cfg.id.as_str()),
            address,
            unit: cfg.unit,
            interval: cfg.interval.0,
            timeout: cfg.timeout.0,
            layout: DeviceLayout::new(plan, &cfg.tags),
            stats,
            pipeline: None,
        })
    }

    /// Polls until shutdown, sending one record per good poll. `next_seq` continues the
    /// source's sequence from what the outbox already holds.
    pub async fn run(
        self,
        tx: mpsc::Sender<Record>,
        shutdown: CancellationToken,
        mut next_seq: u64,
    ) {
        let mut ctx: Option<Context> = None;
        let mut backoff = RECONNECT_MIN;
        let mut reconnect_at = Instant::now();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut data: Vec<ReadData> = Vec::with_capacity(self.layout.plan().reads().len());
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            if ctx.is_none() {
                if Instant::now() < reconnect_at {
                    self.stats.polls_failed.fetch_add(1, Relaxed);
                    continue;
                }
                match self.connect().await {
                    Ok(c) => {
                        tracing::info!(source = %self.id, address = %self.address, "connected");
                        ctx = Some(c);
                        backoff = RECONNECT_MIN;
                    }
                    Err(e) => {
                        self.stats.connects_failed.fetch_add(1, Relaxed);
                        self.stats.polls_failed.fetch_add(1, Relaxed);
                        tracing::warn!(source = %self.id, address = %self.address, retry_in_ms = backoff.as_millis() as u64, "connect failed: {e}");
                        self.stats
                            .set_last_error(format!("connect {}: {e}", self.address));
                        reconnect_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(RECONNECT_MAX);
                        continue;
                    }
                }
            }
            let Some(c) = ctx.as_mut() else { continue };
            let ts_ms = now_ms();
            data.clear();
            // A poll under way finishes even during shutdown (its requests have timeouts):
            // the device has answered, so the record is kept.
            let outcome = self.poll(c, &mut data).await;
            match outcome {
                Ok(()) => {
                    let polled = Polled {
                        id: &self.id,
                        layout: &self.layout,
                        stats: &self.stats,
                    };
                    let rec = match polled.record(&data, ts_ms, next_seq) {
                        Ok(r) => r,
                        Err(e) => {
                            self.fail(&e);
                            continue;
                        }
                    };
                    next_seq += 1;
                    let limit = if shutdown.is_cancelled() {
                        SEND_GRACE
                    } else {
                        self.interval.max(Duration::from_millis(100))
                    };
                    match hand_on(&tx, rec, limit, &self.stats, self.pipeline.as_deref()).await {
                        HandOn::Sent => {}
                        HandOn::Closed => break,
                        HandOn::Lost if shutdown.is_cancelled() => break,
                        HandOn::Lost => {}
                    }
                }
                Err(PollError::Exception(e)) => self.fail(&e),
                Err(PollError::Broken(e)) => {
                    self.fail(&e);
                    // A late reply would be matched to the next request: start afresh.
                    ctx = None;
                    reconnect_at = Instant::now();
                }
            }
        }
        tracing::debug!(source = %self.id, "source stopped");
    }

    /// One poll, for `shuyuan policy preview` against a live device.
    pub async fn poll_once(&self) -> Result<Record, String> {
        let mut ctx = self
            .connect()
            .await
            .map_err(|e| format!("connect {}: {e}", self.address))?;
        let mut data = Vec::new();
        match self.poll(&mut ctx, &mut data).await {
            Ok(()) => {}
            Err(PollError::Exception(e)) | Err(PollError::Broken(e)) => return Err(e),
        }
        self.layout.record(&self.id, &data, now_ms(), 1)
    }

    fn fail(&self, e: &str) {
        self.stats.polls_failed.fetch_add(1, Relaxed);
        tracing::warn!(source = %self.id, address = %self.address, "poll failed: {e}");
        self.stats.set_last_error(e.to_string());
    }

    async fn connect(&self) -> Result<Context, String> {
        let stream = timeout(self.timeout, tokio::net::TcpStream::connect(&self.address))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let _ = stream.set_nodelay(true);
        Ok(tokio_modbus::client::tcp::attach_slave(
            stream,
            Slave(self.unit),
        ))
    }

    async fn poll(&self, ctx: &mut Context, data: &mut Vec<ReadData>) -> Result<(), PollError> {
        poll_plan(ctx, self.layout.plan(), self.timeout, &self.stats, data).await
    }
}

/// One device's answer to a poll, made into a record (shared by TCP and RTU).
pub(crate) struct Polled<'a> {
    pub id: &'a Arc<str>,
    pub layout: &'a DeviceLayout,
    pub stats: &'a SourceStats,
}

impl Polled<'_> {
    /// Decodes the poll's data, adds the tags and counts the good poll.
    pub fn record(&self, data: &[ReadData], ts_ms: i64, seq: u64) -> Result<Record, String> {
        let rec = self.layout.record(self.id, data, ts_ms, seq)?;
        self.stats.polls_ok.fetch_add(1, Relaxed);
        self.stats.records.fetch_add(1, Relaxed);
        self.stats.last_ok_ms.store(ts_ms, Relaxed);
        Ok(rec)
    }
}

/// What every record of one device shares: its read plan, the names of its points and then
/// of its tags (one list for all its records), and the tags' values.
#[derive(Debug)]
pub struct DeviceLayout {
    plan: Arc<ReadPlan>,
    names: Names,
    tags: Vec<Value>,
}

impl DeviceLayout {
    pub fn new(plan: Arc<ReadPlan>, tags: &std::collections::BTreeMap<String, String>) -> Self {
        let tags = super::tag_fields(tags);
        let names = plan
            .point_names()
            .chain(tags.iter().map(|t| &t.name))
            .cloned()
            .collect();
        Self {
            plan,
            names,
            tags: tags.into_iter().map(|t| t.value).collect(),
        }
    }

    /// The reads a poll makes (shared by the devices of one profile).
    pub fn plan(&self) -> &ReadPlan {
        &self.plan
    }

    /// One poll's record: the points decoded from `data`, then the tags.
    pub fn record(
        &self,
        source: &Arc<str>,
        data: &[ReadData],
        ts_ms: i64,
        seq: u64,
    ) -> Result<Record, String> {
        let mut values = Vec::with_capacity(self.names.len());
        self.plan.decode(data, &mut values)?;
        values.extend(self.tags.iter().cloned());
        Ok(Record {
            source: source.clone(),
            ts_ms,
            seq,
            names: self.names.clone(),
            values,
        })
    }
}

/// Read plans by profile: sources on one profile share one plan and its field names (fifty
/// devices of a hundred points would otherwise hold fifty copies).
#[derive(Default)]
pub struct Plans(std::collections::HashMap<String, Arc<ReadPlan>>);

impl Plans {
    /// The plan for source `s` of `config`.
    pub fn of(&mut self, config: &Config, s: &SourceConfig) -> Result<Arc<ReadPlan>, String> {
        let Some(profile) = &s.profile else {
            return plan_of(config.points_of(s)).map(Arc::new);
        };
        if let Some(p) = self.0.get(profile) {
            return Ok(p.clone());
        }
        let p = Arc::new(plan_of(config.points_of(s))?);
        self.0.insert(profile.clone(), p.clone());
        Ok(p)
    }
}

/// The read plan of a device's points, its problems in one message.
fn plan_of(points: &[PointConfig]) -> Result<ReadPlan, String> {
    ReadPlan::build(points).map_err(|e| {
        e.into_iter()
            .map(|(p, m)| format!("{p}: {m}"))
            .collect::<Vec<_>>()
            .join("; ")
    })
}

/// Reads every request of `plan` in turn; the first failure ends the poll.
pub(crate) async fn poll_plan(
    ctx: &mut Context,
    plan: &ReadPlan,
    limit: Duration,
    stats: &SourceStats,
    data: &mut Vec<ReadData>,
) -> Result<(), PollError> {
    for r in plan.reads() {
        data.push(read_once(ctx, r, limit, stats).await?);
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HandOn {
    Sent,
    /// The pipeline did not take it in time: lost, counted (and audited by the seal stage).
    Lost,
    /// The pipeline is gone (shutdown).
    Closed,
}

/// Hands a polled record on. Back-pressure: waits for room, but never longer than `limit`
/// (one interval), so polling goes on while the pipeline is stalled (buffer full under
/// on_full = "pause"); what could not be handed on is counted.
pub(crate) async fn hand_on(
    tx: &mpsc::Sender<Record>,
    rec: Record,
    limit: Duration,
    stats: &SourceStats,
    pipeline: Option<&crate::stats::PipelineStats>,
) -> HandOn {
    match tx.send_timeout(rec, limit).await {
        Ok(()) => HandOn::Sent,
        Err(mpsc::error::SendTimeoutError::Closed(_)) => HandOn::Closed,
        Err(mpsc::error::SendTimeoutError::Timeout(r)) => {
            let n = stats.records_not_handed_on.fetch_add(1, Relaxed) + 1;
            if let Some(p) = pipeline {
                p.records_not_handed_on.fetch_add(1, Relaxed);
            }
            if n == 1 || n % 100 == 0 {
                tracing::warn!(source = %r.source, lost = n, "pipeline is not taking records (buffer full and paused?): records counted as lost");
            }
            HandOn::Lost
        }
    }
}

async fn read_once(
    ctx: &mut Context,
    r: &Read,
    limit: Duration,
    stats: &SourceStats,
) -> Result<ReadData, PollError> {
    let what = || format!("{:?} {}+{}", r.kind, r.start, r.count);
    macro_rules! call {
        ($fut:expr, $wrap:path) => {
            match timeout(limit, $fut).await {
                Err(_) => {
                    stats.timeouts.fetch_add(1, Relaxed);
                    Err(PollError::Broken(format!(
                        "read {} timed out after {}ms",
                        what(),
                        limit.as_millis()
                    )))
                }
                Ok(Err(e)) => {
                    let e = e.to_string();
                    if e.contains("CRC") || e.contains("mismatch") {
                        stats.crc_errors.fetch_add(1, Relaxed);
                    }
                    Err(PollError::Broken(format!("read {}: {e}", what())))
                }
                Ok(Ok(Err(code))) => {
                    stats.exceptions.fetch_add(1, Relaxed);
                    Err(PollError::Exception(format!(
                        "read {}: device answered exception {code:?}",
                        what()
                    )))
                }
                Ok(Ok(Ok(v))) => Ok($wrap(v)),
            }
        };
    }
    match r.kind {
        RegisterKind::Holding => call!(
            ctx.read_holding_registers(r.start, r.count),
            ReadData::Words
        ),
        RegisterKind::Input => call!(ctx.read_input_registers(r.start, r.count), ReadData::Words),
        RegisterKind::Coil => call!(ctx.read_coils(r.start, r.count), ReadData::Bits),
        RegisterKind::Discrete => call!(ctx.read_discrete_inputs(r.start, r.count), ReadData::Bits),
    }
}

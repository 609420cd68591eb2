//! The uplink: pushes sealed batches from the outbox to the platform, oldest first, and
//! deletes each only after the platform acked it (`accepted` or `duplicate`). Failures back
//! off exponentially with jitter, capped, honouring `Retry-After`; a final 4xx quarantines the
//! batch. Written as an explicit state machine: each step returns the next [`State`].

mod http;
mod schedule;

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use http::{Ack, Endpoint, HttpClient, Retry, UplinkError};
pub use schedule::{Schedule, Window};

use crate::outbox::{Outbox, Stored};
use crate::stats::PipelineStats;

/// How long, after shutdown, the uplink keeps pushing what the last seal committed.
pub const FINAL_DRAIN: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Nothing to send (or waiting for the schedule).
    Idle,
    /// Send the oldest pending batch.
    Send,
    /// Wait after a failure.
    Backoff(Instant),
    /// Outside every push window: wait until the next one opens.
    Closed(Instant),
    /// Shutdown: one last bounded drain, then stop.
    Final,
    Stopped,
}

/// Capped exponential backoff with jitter in [d/2, d].
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            failures: 0,
        }
    }

    pub fn reset(&mut self) {
        self.failures = 0;
    }

    pub fn next_delay(&mut self) -> Duration {
        let exp = self.min.saturating_mul(1u32 << self.failures.min(20));
        self.failures = self.failures.saturating_add(1);
        let d = exp.min(self.max);
        let half = d / 2;
        half + half.mul_f64(jitter_unit())
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }
}

fn jitter_unit() -> f64 {
    let mut b = [0u8; 8];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).is_err() {
        return 0.5;
    }
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

pub struct Uplink {
    pub gateway_id: String,
    pub outbox: Outbox,
    /// One connection per batch in flight (`uplink.in_flight`).
    pub clients: Vec<HttpClient>,
    pub every: Option<Duration>,
    pub schedule: Schedule,
    /// Bytes per second the uploads may average, when the link is metered.
    pub max_bytes_per_sec: Option<u64>,
    pub backoff: Backoff,
    /// Rung by `shuyuan push` (SIGUSR1): push everything now, whatever the schedule.
    pub push_now: Arc<Notify>,
    /// Rung by the seal stage after each commit.
    pub wake: Arc<Notify>,
    /// Fires when the seal stage has committed its last batch during shutdown.
    pub sealed_all: CancellationToken,
    pub stats: Arc<PipelineStats>,
}

enum Sent {
    /// One batch acknowledged (or quarantined), of this many bytes.
    One(u64),
    Empty,
    Failed(Option<Duration>),
}

impl Uplink {
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut ticker = self.every.map(|d| {
            let mut t = tokio::time::interval(d);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        // Whatever the outbox held at start goes first (or at the first scheduled tick).
        let mut state = if ticker.is_some() {
            State::Idle
        } else {
            State::Send
        };
        // Set by `shuyuan push` until the outbox is empty: the schedule does not apply.
        let mut forced = false;
        loop {
            state = match state {
                State::Idle => tokio::select! {
                    _ = shutdown.cancelled() => State::Final,
                    _ = self.wake.notified(), if ticker.is_none() => State::Send,
                    _ = tick(&mut ticker) => State::Send,
                    _ = self.push_now.notified() => {
                        forced = true;
                        State::Send
                    }
                },
                State::Send => {
                    if shutdown.is_cancelled() {
                        State::Final
                    } else if let Some(wait) = self.schedule.closed_now().filter(|_| !forced) {
                        tracing::debug!(opens_in_s = wait.as_secs(), "outside the push windows");
                        State::Closed(Instant::now() + wait)
                    } else {
                        let started = Instant::now();
                        match self.send_one().await {
                            Sent::One(bytes) => {
                                self.throttle(bytes, started, &shutdown).await;
                                State::Send
                            }
                            Sent::Empty => {
                                forced = false;
                                State::Idle
                            }
                            Sent::Failed(hint) => State::Backoff(Instant::now() + self.delay(hint)),
                        }
                    }
                }
                State::Backoff(until) | State::Closed(until) => tokio::select! {
                    _ = shutdown.cancelled() => State::Final,
                    _ = tokio::time::sleep_until(until) => State::Send,
                    _ = self.push_now.notified() => {
                        forced = true;
                        State::Send
                    }
                },
                State::Final => {
                    self.final_drain().await;
                    State::Stopped
                }
                State::Stopped => break,
            };
        }
        // Acknowledgements held for the next commit (see `Outbox::ack`) are written now.
        if let Err(e) = self.outbox.flush_acks().await {
            tracing::error!("cannot record acknowledged batches (they will be sent again and acknowledged as duplicates): {e}");
        }
        tracing::debug!("uplink stopped");
    }

    /// Keeps the average upload rate under the cap: after sending `bytes`, waits until they
    /// would have taken at the capped rate.
    async fn throttle(&self, bytes: u64, started: Instant, shutdown: &CancellationToken) {
        let Some(cap) = self.max_bytes_per_sec.filter(|c| *c > 0) else {
            return;
        };
        let due = started + Duration::from_secs_f64(bytes as f64 / cap as f64);
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = shutdown.cancelled() => {}
        }
    }

    fn delay(&mut self, hint: Option<Duration>) -> Duration {
        let d = self.backoff.next_delay();
        hint.map_or(d, |h| h.max(d))
    }

    /// After shutdown: wait for the seal stage's last commit, then push what is pending
    /// until the outbox is empty, a push fails, or [`FINAL_DRAIN`] runs out. What is left
    /// stays in the outbox for the next start.
    async fn final_drain(&mut self) {
        let deadline = Instant::now() + FINAL_DRAIN;
        if tokio::time::timeout_at(deadline, self.sealed_all.cancelled())
            .await
            .is_err()
        {
            return;
        }
        if self.backoff.failures() > 0 {
            return; // the platform was failing: do not hold up the stop.
        }
        while let Ok(sent) = tokio::time::timeout_at(deadline, self.send_one()).await {
            if !matches!(sent, Sent::One(_)) {
                break;
            }
        }
    }

    /// Sends the oldest pending batches, up to one per client (the `in_flight` setting),
    /// concurrently, then settles each result in order.
    async fn send_one(&mut self) -> Sent {
        let mut window = Vec::with_capacity(self.clients.len());
        let mut after = None;
        while window.len() < self.clients.len() {
            match self.outbox.next_pending(after).await {
                Ok(Some(b)) => {
                    after = Some(b.seq);
                    window.push(b);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("outbox read failed: {e}");
                    return Sent::Failed(None);
                }
            }
        }
        if window.is_empty() {
            return Sent::Empty;
        }
        self.stats.uploads.fetch_add(window.len() as u64, Relaxed);
        let gw = &self.gateway_id;
        let results =
            futures_util::future::join_all(window.iter().zip(self.clients.iter_mut()).map(
                |(b, c)| async move {
                    let key = format!("{gw}/{}", b.seq);
                    c.post_batch(&key, b.envelope.clone()).await
                },
            ))
            .await;
        let mut sent = 0u64;
        let mut retry: Option<Option<Duration>> = None;
        for (b, r) in window.iter().zip(results) {
            match self.settle(b, r).await {
                Ok(n) => sent += n,
                Err(hint) => retry = Some(retry.flatten().max(hint)),
            }
        }
        match retry {
            Some(hint) => Sent::Failed(hint),
            None => Sent::One(sent),
        }
    }

    /// Acks, quarantines or records the failure of one sent batch. `Ok(bytes)` when the batch
    /// left the queue; `Err(hint)` when it must be retried later.
    async fn settle(
        &mut self,
        b: &Stored,
        r: Result<Ack, UplinkError>,
    ) -> Result<u64, Option<Duration>> {
        match r {
            Ok(ack) => {
                if ack == Ack::Duplicate {
                    self.stats.batches_duplicate.fetch_add(1, Relaxed);
                }
                match self.outbox.ack(b.seq).await {
                    Ok(false) => {}
                    Ok(true) => {
                        // Evicted while in flight, yet delivered: not a loss after all.
                        self.stats.batches_evicted.fetch_sub(1, Relaxed);
                        self.stats
                            .records_evicted
                            .fetch_sub(u64::from(b.records), Relaxed);
                    }
                    Err(e) => {
                        tracing::error!(seq = b.seq, "cannot delete acked batch: {e}");
                        return Err(None);
                    }
                }
                self.stats.batches_acked.fetch_add(1, Relaxed);
                self.stats
                    .last_ack_ms
                    .store(crate::timefmt::now_ms(), Relaxed);
                self.stats.consecutive_failures.store(0, Relaxed);
                self.stats
                    .bytes_acked
                    .fetch_add(b.envelope.len() as u64, Relaxed);
                self.stats.set_upload_error(None);
                self.backoff.reset();
                tracing::debug!(seq = b.seq, records = b.records, ?ack, "batch acked");
                Ok(b.envelope.len() as u64)
            }
            Err(e) => {
                self.stats.upload_failures.fetch_add(1, Relaxed);
                self.stats.consecutive_failures.fetch_add(1, Relaxed);
                self.stats.set_upload_error(Some(e.to_string()));
                match e.retry() {
                    Retry::Never => {
                        tracing::error!(
                            seq = b.seq,
                            "platform refused the batch for good, quarantined: {e}"
                        );
                        self.stats.batches_quarantined.fetch_add(1, Relaxed);
                        if let Err(db) = self.outbox.quarantine(b.seq, e.to_string()).await {
                            tracing::error!(seq = b.seq, "cannot quarantine: {db}");
                            return Err(None);
                        }
                        Ok(b.envelope.len() as u64)
                    }
                    Retry::Later(hint) => {
                        tracing::warn!(
                            seq = b.seq,
                            failures = self.backoff.failures() + 1,
                            "upload failed, will retry: {e}"
                        );
                        let _ = self.outbox.attempt_failed(b.seq, e.to_string()).await;
                        Err(hint)
                    }
                }
            }
        }
    }
}

async fn tick(t: &mut Option<tokio::time::Interval>) {
    match t {
        Some(t) => {
            t.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_stays_within_jitter_bounds() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(8));
        let expect = [1, 2, 4, 8, 8, 8];
        for e in expect {
            let d = b.next_delay();
            let full = Duration::from_secs(e);
            assert!(
                d >= full / 2 && d <= full,
                "{d:?} not in [{:?}, {full:?}]",
                full / 2
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
    }
}

//! The Modbus RTU source: one task per serial bus (RS-485). Every `modbus-rtu` source that
//! names the same port is a device on that bus; the task polls them one at a time, each on
//! its own interval, keeping the line quiet for the inter-frame gap before each request
//! (a bus has one master and one conversation at a time).
//!
//! Point plans, decoding and the hand-on to the pipeline are the Modbus TCP source's
//! ([`super::modbus`]): only the transport differs. A timeout, a CRC error or an exception
//! fails that device's poll (counted, logged); the bus goes on with the next device. A
//! broken port (unplugged adapter) is reopened with capped backoff.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_modbus::client::Context;
use tokio_modbus::prelude::SlaveContext;
use tokio_modbus::Slave;
use tokio_serial::{DataBits, SerialPortBuilderExt as _, StopBits};
use tokio_util::sync::CancellationToken;

use super::modbus::{hand_on, poll_plan, HandOn, Plans, PollError, Polled};
use super::points::ReadData;
use super::Record;
use crate::config::{Config, Parity, SourceConfig, SourceKind};
use crate::stats::{PipelineStats, SourceStats, Stats};
use crate::timefmt::now_ms;

const REOPEN_MIN: Duration = Duration::from_millis(500);
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// Line settings of one bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Line {
    pub baud: u32,
    pub parity: Parity,
    pub stop_bits: u8,
}

impl Line {
    pub fn of(s: &SourceConfig) -> Self {
        Self {
            baud: s.baud.unwrap_or(9600),
            parity: s.parity.unwrap_or(Parity::Even),
            stop_bits: s.stop_bits.unwrap_or(1),
        }
    }

    /// 3.5 character times (11 bits each), or 1.75 ms above 19200 baud (Modbus over serial
    /// line, 2.5.1.1).
    pub fn default_gap(&self) -> Duration {
        if self.baud > 19_200 {
            Duration::from_micros(1750)
        } else {
            Duration::from_micros(3_500_000 * 11 / u64::from(self.baud.max(1)))
        }
    }
}

pub struct RtuDevice {
    pub id: Arc<str>,
    pub unit: u8,
    pub interval: Duration,
    pub timeout: Duration,
    pub layout: super::modbus::DeviceLayout,
    pub stats: Arc<SourceStats>,
    pub next_seq: u64,
}

pub struct RtuBus {
    pub port: String,
    pub line: Line,
    pub gap: Duration,
    pub devices: Vec<RtuDevice>,
    pub pipeline: Option<Arc<PipelineStats>>,
}

impl RtuBus {
    /// One bus per port named by the config's `modbus-rtu` sources; `next_seq` gives each
    /// source's next record number.
    pub fn from_config(
        config: &Config,
        stats: &Stats,
        next_seq: impl Fn(&str) -> u64,
    ) -> Result<Vec<RtuBus>, String> {
        let mut buses: Vec<RtuBus> = Vec::new();
        let mut plans = Plans::default();
        for s in config
            .sources
            .iter()
            .filter(|s| s.kind == SourceKind::ModbusRtu)
        {
            let port = s
                .port
                .clone()
                .ok_or_else(|| format!("source {:?} has no port", s.id))?;
            let plan = plans.of(config, s)?;
            let id: Arc<str> = Arc::from(s.id.as_str());
            let dev = RtuDevice {
                stats: stats.source(&id),
                id,
                unit: s.unit,
                interval: s.interval.0,
                timeout: s.timeout.0,
                layout: super::modbus::DeviceLayout::new(plan, &s.tags),
                next_seq: next_seq(&s.id),
            };
            match buses.iter_mut().find(|b| b.port == port) {
                Some(b) => b.devices.push(dev),
                None => {
                    let line = Line::of(s);
                    buses.push(RtuBus {
                        port,
                        line,
                        gap: s.frame_gap.map_or(line.default_gap(), |g| g.0),
                        devices: vec![dev],
                        pipeline: Some(stats.pipeline.clone()),
                    });
                }
            }
        }
        Ok(buses)
    }

    fn open(&self) -> Result<Context, String> {
        let parity = match self.line.parity {
            Parity::None => tokio_serial::Parity::None,
            Parity::Even => tokio_serial::Parity::Even,
            Parity::Odd => tokio_serial::Parity::Odd,
        };
        let stream = tokio_serial::new(&self.port, self.line.baud)
            .data_bits(DataBits::Eight)
            .parity(parity)
            .stop_bits(if self.line.stop_bits == 2 {
                StopBits::Two
            } else {
                StopBits::One
            })
            .open_native_async()
            .map_err(|e| e.to_string())?;
        Ok(tokio_modbus::client::rtu::attach(stream))
    }

    /// Polls the bus's devices until shutdown.
    pub async fn run(mut self, tx: mpsc::Sender<Record>, shutdown: CancellationToken) {
        let start = Instant::now();
        // Spread the first polls over the gap so devices do not all start at once.
        let mut due: Vec<Instant> = (0..self.devices.len())
            .map(|i| start + self.gap * i as u32)
            .collect();
        let mut ctx: Option<Context> = None;
        let mut backoff = REOPEN_MIN;
        let mut reopen_at = start;
        let mut quiet_until = start;
        let mut data: Vec<ReadData> = Vec::new();
        while let Some((i, at)) = due.iter().copied().enumerate().min_by_key(|(_, t)| *t) {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(at) => {}
            }
            let dev = &mut self.devices[i];
            // Next poll on its interval; polls missed while the bus was busy are skipped.
            due[i] = (at + dev.interval).max(Instant::now());
            if ctx.is_none() {
                if Instant::now() < reopen_at {
                    dev.stats.polls_failed.fetch_add(1, Relaxed);
                    continue;
                }
                match self.open_logged() {
                    Ok(c) => {
                        ctx = Some(c);
                        backoff = REOPEN_MIN;
                    }
                    Err(e) => {
                        for d in &self.devices {
                            d.stats.connects_failed.fetch_add(1, Relaxed);
                            d.stats.set_last_error(format!("open {}: {e}", self.port));
                        }
                        self.devices[i].stats.polls_failed.fetch_add(1, Relaxed);
                        reopen_at = Instant::now() + backoff;
                        backoff = (backoff * 2).min(REOPEN_MAX);
                        continue;
                    }
                }
            }
            let Some(c) = ctx.as_mut() else { continue };
            let dev = &mut self.devices[i];
            c.set_slave(Slave(dev.unit));
            tokio::time::sleep_until(quiet_until).await;
            let ts_ms = now_ms();
            data.clear();
            let outcome = poll_plan(c, dev.layout.plan(), dev.timeout, &dev.stats, &mut data).await;
            quiet_until = Instant::now() + self.gap;
            let err = match outcome {
                Ok(()) => {
                    let polled = Polled {
                        id: &dev.id,
                        layout: &dev.layout,
                        stats: &dev.stats,
                    };
                    match polled.record(&data, ts_ms, dev.next_seq) {
                        Ok(rec) => {
                            dev.next_seq += 1;
                            let limit = dev.interval.max(Duration::from_millis(100));
                            match hand_on(&tx, rec, limit, &dev.stats, self.pipeline.as_deref())
                                .await
                            {
                                HandOn::Closed => break,
                                HandOn::Sent | HandOn::Lost => {}
                            }
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                Err(PollError::Exception(e)) => e,
                Err(PollError::Broken(e)) => {
                    // A device that does not answer is common on a bus and says nothing about
                    // the port; a failing port does. Reopen only on the latter.
                    if !e.contains("timed out") && !e.contains("CRC") {
                        ctx = None;
                    }
                    e
                }
            };
            dev.stats.polls_failed.fetch_add(1, Relaxed);
            tracing::warn!(source = %dev.id, port = %self.port, unit = dev.unit, "poll failed: {err}");
            dev.stats
                .set_last_error(format!("unit {} on {}: {err}", dev.unit, self.port));
        }
        tracing::debug!(port = %self.port, "bus stopped");
    }

    /// One poll of one source's device, for `shuyuan policy preview` on a live bus.
    pub async fn poll_once(config: &Config, source: &SourceConfig) -> Result<Record, String> {
        let only = Config {
            sources: vec![source.clone()],
            ..config.clone()
        };
        let stats = Stats::default();
        let bus = RtuBus::from_config(&only, &stats, |_| 1)?
            .pop()
            .ok_or_else(|| format!("source {:?} is not a modbus-rtu source", source.id))?;
        let dev = bus.devices.first().ok_or("no device")?;
        let mut ctx = bus.open().map_err(|e| format!("open {}: {e}", bus.port))?;
        ctx.set_slave(Slave(dev.unit));
        let mut data = Vec::new();
        match poll_plan(
            &mut ctx,
            dev.layout.plan(),
            dev.timeout,
            &dev.stats,
            &mut data,
        )
        .await
        {
            Ok(()) => {}
            Err(PollError::Exception(e) | PollError::Broken(e)) => {
                return Err(format!("unit {} on {}: {e}", dev.unit, bus.port))
            }
        }
        dev.layout.record(&dev.id, &data, now_ms(), 1)
    }

    fn open_logged(&self) -> Result<Context, String> {
        let r = self.open();
        match &r {
            Ok(_) => {
                tracing::info!(port = %self.port, baud = self.line.baud, devices = self.devices.len(), "serial bus open")
            }
            Err(e) => tracing::warn!(port = %self.port, "cannot open the serial port: {e}"),
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inter_frame_gap_follows_the_baud_rate() {
        let l = |baud| Line {
            baud,
            parity: Parity::Even,
            stop_bits: 1,
        };
        assert_eq!(l(9600).default_gap(), Duration::from_micros(4010));
        assert_eq!(l(19_200).default_gap(), Duration::from_micros(2005));
        assert_eq!(l(115_200).default_gap(), Duration::from_micros(1750));
    }
}

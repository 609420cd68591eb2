//! The policy-and-batch stage: applies each source's [`Policy`] to its records and gathers
//! the results as JSON Lines into a [`Batch`] that closes at `max_records`, `max_bytes` or
//! `max_age`. It ends when its input closes (all sources stopped), after handing on the open
//! batch, which is how shutdown seals what was collected.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::collect::{Record, Value};
use crate::policy::{Policy, Tally};
use crate::stats::PipelineStats;
use crate::timefmt::rfc3339_ms;

/// A closed batch: plaintext JSON Lines that exist only in memory until sealed.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub body: Vec<u8>,
    pub records: u32,
    /// Highest record sequence per source in this batch.
    pub source_seqs: BTreeMap<Arc<str>, u64>,
    pub tally: Tally,
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_records: u32,
    pub max_bytes: usize,
    pub max_age: Duration,
}

pub struct Batcher {
    limits: Limits,
    open: Batch,
    opened_at: Option<Instant>,
    line: Vec<u8>,
}

impl Batcher {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            open: Batch::default(),
            opened_at: None,
            line: Vec::with_capacity(1024),
        }
    }

    /// Adds one record; returns the batch it closed, if any. A batch that would grow past
    /// `max_bytes` closes before the record, which then opens the next one.
    pub fn push(&mut self, rec: &Record, tally: Tally) -> Option<Batch> {
        self.line.clear();
        encode_line(rec, &mut self.line);
        let mut closed = None;
        if self.open.records > 0 && self.open.body.len() + self.line.len() > self.limits.max_bytes {
            closed = self.take();
        }
        if self.open.records == 0 {
            self.opened_at = Some(Instant::now());
            self.open.body.reserve(self.limits.max_bytes.min(1 << 20));
        }
        self.open.body.extend_from_slice(&self.line);
        self.open.records += 1;
        self.open.tally.add(&tally);
        let s = self
            .open
            .source_seqs
            .entry(rec.source.clone())
            .or_insert(rec.seq);
        *s = (*s).max(rec.seq);
        if self.open.records >= self.limits.max_records
            || self.open.body.len() >= self.limits.max_bytes
        {
            // Only one batch can close per push: the earlier one closed above had room.
            return closed.or_else(|| self.take());
        }
        closed
    }

    /// When the open batch must close by age.
    pub fn deadline(&self) -> Option<Instant> {
        self.opened_at.map(|t| t + self.limits.max_age)
    }

    /// Closes the open batch, if it holds anything.
    pub fn take(&mut self) -> Option<Batch> {
        self.opened_at = None;
        if self.open.records == 0 {
            return None;
        }
        Some(std::mem::take(&mut self.open))
    }
}

/// Runs the stage until `rx` closes; then hands on the open batch and returns.
pub async fn run(
    mut rx: mpsc::Receiver<Record>,
    tx: mpsc::Sender<Batch>,
    policies: HashMap<Arc<str>, Arc<Policy>>,
    limits: Limits,
    stats: Arc<PipelineStats>,
) {
    let mut batcher = Batcher::new(limits);
    loop {
        let deadline = batcher.deadline();
        let closed = tokio::select! {
            rec = rx.recv() => match rec {
                Some(mut rec) => {
                    stats.records_in.fetch_add(1, Relaxed);
                    let tally = match policies.get(&rec.source) {
                        Some(p) => p.apply(&mut rec),
                        // A source always has a policy (validated); if not, send nothing.
                        None => {
                            let t = Tally { unlisted: rec.fields.len() as u32, ..Tally::default() };
                            rec.fields.clear();
                            t
                        }
                    };
                    stats.fields_kept.fetch_add(tally.kept.into(), Relaxed);
                    stats.fields_masked.fetch_add(tally.masked.into(), Relaxed);
                    stats.fields_dropped.fetch_add(tally.dropped.into(), Relaxed);
                    stats.fields_unlisted.fetch_add(tally.unlisted.into(), Relaxed);
                    batcher.push(&rec, tally)
                }
                None => break,
            },
            _ = sleep_until_opt(deadline) => batcher.take(),
        };
        if let Some(b) = closed {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    }
    if let Some(b) = batcher.take() {
        let _ = tx.send(b).await;
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

struct Line<'a>(&'a Record);
struct Fields<'a>(&'a [crate::collect::Field]);

impl Serialize for Line<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("source", &*r.source)?;
        m.serialize_entry("ts", &rfc3339_ms(r.ts_ms))?;
        m.serialize_entry("seq", &r.seq)?;
        m.serialize_entry("fields", &Fields(&r.fields))?;
        m.end()
    }
}

impl Serialize for Fields<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for f in self.0 {
            match &f.value {
                Value::Bool(b) => m.serialize_entry(&*f.name, b)?,
                Value::Int(i) => m.serialize_entry(&*f.name, i)?,
                Value::UInt(u) => m.serialize_entry(&*f.name, u)?,
                Value::Float(x) => m.serialize_entry(&*f.name, x)?,
                Value::Text(t) => m.serialize_entry(&*f.name, &**t)?,
            }
        }
        m.end()
    }
}

/// One record as a JSON line: `{"source":..,"ts":..,"seq":..,"fields":{..}}\n`.
pub fn encode_line(rec: &Record, out: &mut Vec<u8>) {
    // Writing JSON into a Vec cannot fail: strings are valid UTF-8 and maps have string keys.
    let _ = serde_json::to_writer(&mut *out, &Line(rec));
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::Field;

    fn rec(seq: u64) -> Record {
        Record {
            source: Arc::from("s"),
            ts_ms: 1_700_000_000_000,
            seq,
            fields: vec![Field {
                name: Arc::from("v"),
                value: Value::Float(1.25),
            }],
        }
    }

    #[test]
    fn line_is_json_with_fields_in_order() {
        let mut out = Vec::new();
        encode_line(&rec(7), &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "{\"source\":\"s\",\"ts\":\"2023-11-14T22:13:20.000Z\",\"seq\":7,\"fields\":{\"v\":1.25}}\n"
        );
    }

    #[test]
    fn closes_by_count_and_by_size_without_losing_records() {
        let mut b = Batcher::new(Limits {
            max_records: 3,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(60),
        });
        assert!(b.push(&rec(1), Tally::default()).is_none());
        assert!(b.push(&rec(2), Tally::default()).is_none());
        let full = b.push(&rec(3), Tally::default()).unwrap();
        assert_eq!(full.records, 3);
        assert_eq!(full.source_seqs[&Arc::from("s")], 3);

        let line_len = {
            let mut v = Vec::new();
            encode_line(&rec(1), &mut v);
            v.len()
        };
        let mut b = Batcher::new(Limits {
            max_records: 100,
            max_bytes: line_len * 2 + 1,
            max_age: Duration::from_secs(60),
        });
        assert!(b.push(&rec(1), Tally::default()).is_none());
        assert!(b.push(&rec(2), Tally::default()).is_none());
        let first = b.push(&rec(3), Tally::default()).unwrap();
        assert_eq!(first.records, 2);
        let rest = b.take().unwrap();
        assert_eq!(rest.records, 1);
        assert!(b.take().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn stage_closes_by_age_and_flushes_when_input_closes() {
        let (rtx, rrx) = mpsc::channel(8);
        let (btx, mut brx) = mpsc::channel(8);
        let mut policies = HashMap::new();
        let mut cfg = crate::config::PolicyConfig::default();
        cfg.fields.insert(
            "v".into(),
            crate::config::FieldRuleConfig {
                action: crate::config::ActionKind::Keep,
                grade: crate::config::Grade::Internal,
                keep_head: None,
                keep_tail: None,
                mask_char: None,
            },
        );
        policies.insert(Arc::from("s"), Arc::new(Policy::compile(&cfg).unwrap()));
        let limits = Limits {
            max_records: 100,
            max_bytes: 1 << 20,
            max_age: Duration::from_secs(5),
        };
        let task = tokio::spawn(run(rrx, btx, policies, limits, Arc::default()));
        rtx.send(rec(1)).await.unwrap();
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert_eq!(brx.recv().await.unwrap().records, 1);
        rtx.send(rec(2)).await.unwrap();
        drop(rtx);
        assert_eq!(brx.recv().await.unwrap().records, 1);
        task.await.unwrap();
    }
}

//! The policy-and-batch stage: applies each source's [`Policy`] to its records and gathers
//! the results as JSON Lines into a [`Batch`] that closes at `max_records`, `max_bytes` or
//! `max_age`. It ends when its input closes (all sources stopped), after handing on the open
//! batch, which is how shutdown seals what was collected.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;

mod encode;
mod json;

pub use encode::{LayoutPlans, RuleCounts, SourceEncoder, DROPPED_UNSAFE, NO_RULE};
pub use json::encode_line;

use crate::collect::Record;
use crate::policy::{FastMap, Policy, Tally};
use crate::stats::PipelineStats;

/// A closed batch: plaintext JSON Lines that exist only in memory until sealed.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub body: Vec<u8>,
    pub records: u32,
    /// Highest record sequence per source in this batch.
    pub source_seqs: BTreeMap<Arc<str>, u64>,
    pub tally: Tally,
    /// What each source's policy did, per field and rule, over this batch's records.
    pub rules: BatchRules,
}

/// Per source, its per-field, per-rule counts. Sources with the same counts (devices on one
/// profile and policy, polled alike) share one map: fifty devices of a hundred points would
/// otherwise hold 5000 entries per batch from closing to commit.
pub type BatchRules = BTreeMap<Arc<str>, Arc<RuleCounts>>;

const RECV_CHUNK: usize = 256;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_records: u32,
    pub max_bytes: usize,
    pub max_age: Duration,
}

pub struct Batcher {
    limits: Limits,
    open: Batch,
    seqs: FastMap<Arc<str>, u64>,
    opened_at: Option<Instant>,
    /// The last push closed a batch without its record (the line did not fit).
    carried: bool,
}

impl Batcher {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            open: Batch::default(),
            seqs: FastMap::default(),
            opened_at: None,
            carried: false,
        }
    }

    /// Adds one record, encoded as it is; returns the batch it closed, if any.
    pub fn push(&mut self, rec: &Record, tally: Tally) -> Option<Batch> {
        self.push_with(&rec.source, rec.seq, |out| {
            encode_line(rec, out);
            tally
        })
    }

    /// Adds one line that `encode` appends (returning what the policy did); returns the
    /// batch it closed, if any. A batch that would grow past `max_bytes` closes before the
    /// line, which then opens the next.
    pub fn push_with(
        &mut self,
        source: &Arc<str>,
        seq: u64,
        encode: impl FnOnce(&mut Vec<u8>) -> Tally,
    ) -> Option<Batch> {
        if self.open.records == 0 {
            self.opened_at = Some(Instant::now());
            self.open.body.reserve(self.limits.max_bytes.min(1 << 20));
        }
        // Encode in place; if the line does not fit, it moves to the next batch.
        let start = self.open.body.len();
        let tally = encode(&mut self.open.body);
        let mut closed = None;
        self.carried = false;
        if self.open.records > 0 && self.open.body.len() > self.limits.max_bytes {
            let line = self.open.body.split_off(start);
            closed = self.take();
            self.carried = true;
            self.opened_at = Some(Instant::now());
            self.open
                .body
                .reserve(self.limits.max_bytes.min(1 << 20).max(line.len()));
            self.open.body.extend_from_slice(&line);
        }
        self.open.records += 1;
        self.open.tally.add(&tally);
        match self.seqs.get_mut(source) {
            Some(s) => *s = (*s).max(seq),
            None => {
                self.seqs.insert(source.clone(), seq);
            }
        }
        if self.open.records >= self.limits.max_records
            || self.open.body.len() >= self.limits.max_bytes
        {
            // Only one batch can close per push: the earlier one closed above had room.
            return closed.or_else(|| self.take());
        }
        closed
    }

    /// Whether the batch the last push closed left that push's record for the next one.
    pub fn carried(&self) -> bool {
        self.carried
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
        let mut b = std::mem::take(&mut self.open);
        b.source_seqs = self.seqs.drain().collect();
        Some(b)
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
    // Policy and encoding fused per source (see encode.rs); a source without a policy (not
    // possible after validation) would send records with no fields.
    let plans = LayoutPlans::default();
    let mut encoders: FastMap<Arc<str>, SourceEncoder> = policies
        .into_iter()
        .map(|(source, policy)| {
            let e = SourceEncoder::with_plans(&source, policy, plans.clone());
            (source, e)
        })
        .collect();
    // Take what has queued up in one wake: under load, one wake per record would cost more
    // than the record itself.
    let mut inbox: Vec<Record> = Vec::with_capacity(RECV_CHUNK);
    loop {
        let deadline = batcher.deadline();
        tokio::select! {
            n = rx.recv_many(&mut inbox, RECV_CHUNK) => if n == 0 { break },
            _ = sleep_until_opt(deadline) => {
                if let Some(mut b) = batcher.take() {
                    flush_rules(&mut encoders, &mut b, None);
                    if !hand_on(&tx, b).await {
                        return;
                    }
                }
                continue;
            }
        }
        let mut t = Tally::default();
        for rec in inbox.drain(..) {
            // Looked up by reference: `entry` would take (and drop) a clone of the name per
            // record, two atomic operations on a count every source's records share. Every
            // configured source has its encoder from the start, so a record costs one
            // look-up; the insert is for the others (not possible after validation).
            let enc = match encoders.get_mut(&rec.source) {
                Some(enc) => enc,
                None => {
                    let e = SourceEncoder::with_plans(&rec.source, Arc::default(), plans.clone());
                    encoders.entry(rec.source.clone()).or_insert(e)
                }
            };
            let mut tally = Tally::default();
            let closed = batcher.push_with(&rec.source, rec.seq, |out| {
                tally = enc.encode(&rec, out);
                tally
            });
            t.add(&tally);
            if let Some(mut b) = closed {
                let carried = batcher.carried().then_some(&rec.source);
                flush_rules(&mut encoders, &mut b, carried);
                if !hand_on(&tx, b).await {
                    return;
                }
            }
        }
        stats.records_in.fetch_add(u64::from(t.records), Relaxed);
        stats.fields_kept.fetch_add(t.kept.into(), Relaxed);
        stats.fields_masked.fetch_add(t.masked.into(), Relaxed);
        stats.fields_dropped.fetch_add(t.dropped.into(), Relaxed);
        stats.fields_unlisted.fetch_add(t.unlisted.into(), Relaxed);
    }
    if let Some(mut b) = batcher.take() {
        flush_rules(&mut encoders, &mut b, None);
        let _ = tx.send(b).await;
    }
}

/// Hands a closed batch to the seal stage and lets the seal stage start on it now; false when
/// the seal stage is gone.
async fn hand_on(tx: &mpsc::Sender<Batch>, b: Batch) -> bool {
    if tx.send(b).await.is_err() {
        return false;
    }
    yield_to_woken().await;
    true
}

/// Lets a task this one has just woken run now, on the other worker if this one is wanted.
///
/// tokio puts a task woken from a worker into that worker's LIFO slot, which other workers
/// cannot steal (tokio-rs/tokio#4941): the seal task woken by a batch waited behind this
/// stage, which encodes the next batch without yielding while records keep coming, for up to
/// three batches while the other core idled (5-9 ms at the start of every burst in the
/// pipeline benchmark). Waking itself and returning `Pending` puts this task at the back of
/// the run queue, where an idle worker steals it, and the woken task runs first;
/// `tokio::task::yield_now` would not do: it defers the wake until the worker parks.
async fn yield_to_woken() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
    .await
}

/// Moves every source's per-rule counts into the batch that closed; the record of `carried`
/// (whose line went to the next batch) stays counted for the next one.
fn flush_rules(
    encoders: &mut FastMap<Arc<str>, SourceEncoder>,
    b: &mut Batch,
    carried: Option<&Arc<str>>,
) {
    let mut distinct: Vec<Arc<RuleCounts>> = Vec::new();
    for (source, enc) in encoders.iter_mut() {
        let mut counts = RuleCounts::new();
        enc.flush_counts(&mut counts, carried.is_some_and(|c| c == source));
        if counts.is_empty() {
            continue;
        }
        let shared = match distinct.iter().find(|d| ***d == counts) {
            Some(d) => d.clone(),
            None => {
                let d = Arc::new(counts);
                distinct.push(d.clone());
                d
            }
        };
        b.rules.insert(source.clone(), shared);
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::{Field, Value};

    /// A task woken by a busy task runs before the busy one yields on its own: without
    /// `yield_to_woken` it sits in the busy worker's LIFO slot, out of the idle worker's reach.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_woken_task_runs_while_the_waker_stays_busy() {
        use std::sync::atomic::AtomicBool;
        let ran = Arc::new(AtomicBool::new(false));
        let (tx, mut rx) = mpsc::channel::<()>(1);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let flag = ran.clone();
        let woken = tokio::spawn(async move {
            let _ = ready_tx.send(());
            if rx.recv().await.is_some() {
                flag.store(true, Relaxed);
            }
        });
        let waker = tokio::spawn(async move {
            ready_rx.await.unwrap();
            // Let the woken task reach its `recv` and wait there.
            tokio::time::sleep(Duration::from_millis(20)).await;
            tx.send(()).await.unwrap();
            yield_to_woken().await;
            // Busy, without yielding, as the batch stage is under load; bounded in time.
            let until = std::time::Instant::now() + Duration::from_secs(5);
            while !ran.load(Relaxed) && std::time::Instant::now() < until {
                std::hint::spin_loop();
            }
            ran.load(Relaxed)
        });
        assert!(
            waker.await.unwrap(),
            "the woken task did not run while its waker was busy"
        );
        woken.await.unwrap();
    }

    fn rec(seq: u64) -> Record {
        Record::new(
            Arc::from("s"),
            1_700_000_000_000,
            seq,
            vec![Field {
                name: Arc::from("v"),
                value: Value::Float(1.25),
            }],
        )
    }

    #[test]
    fn strings_are_escaped_and_non_finite_floats_are_null() {
        let fields = vec![
            Field {
                name: Arc::from("q\"uote"),
                value: Value::Text(Arc::from("a\\b\n\u{1}张")),
            },
            Field {
                name: Arc::from("nan"),
                value: Value::Float(f64::NAN),
            },
            Field {
                name: Arc::from("big"),
                value: Value::UInt(u64::MAX),
            },
            Field {
                name: Arc::from("neg"),
                value: Value::Int(i64::MIN),
            },
            Field {
                name: Arc::from("b"),
                value: Value::Bool(false),
            },
        ];
        let r = Record::new(Arc::from("s"), 0, 1, fields);
        let mut out = Vec::new();
        encode_line(&r, &mut out);
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["fields"]["q\"uote"], "a\\b\n\u{1}张");
        assert!(v["fields"]["nan"].is_null());
        assert_eq!(v["fields"]["big"], u64::MAX);
        assert_eq!(v["fields"]["neg"], i64::MIN);
        assert_eq!(v["fields"]["b"], false);
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
            crate::config::FieldRuleConfig::new(
                crate::config::ActionKind::Keep,
                crate::config::Grade::Internal,
            ),
        );
        policies.insert(
            Arc::from("s"),
            Arc::new(Policy::compile(&cfg, None).unwrap()),
        );
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

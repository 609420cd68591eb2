//! Policy and JSON encoding fused, per source. A source sends records with the same fields
//! in the same order every poll, so the rule for each position is looked up once per layout
//! (not once per field), key fragments are escaped once, and a masked constant (a tag such
//! as a meter id) is masked once and reused while the same value keeps coming. The output is
//! byte for byte what [`Policy::apply`] followed by [`super::encode_line`] produces; a test
//! holds the two paths together.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::json::{line_prefix, write_value, Padded, Slack};
use crate::collect::{same_names, Names, Record, Value};
use crate::policy::{Action, Policy, Tally};

/// The last text input of a transforming rule and its rendered output (`None`: dropped).
type Remembered = (Arc<str>, Option<Padded>);

/// What the policy did, per field and outcome (the rule's name, `no_rule` for default deny,
/// `dropped_unsafe` when a rule could not be applied safely): counts for the audit trail.
pub type RuleCounts = std::collections::BTreeMap<(Arc<str>, &'static str), u64>;

/// Outcome name of a field with no rule.
pub const NO_RULE: &str = "no_rule";
/// Outcome name of a field whose rule could not be applied safely.
pub const DROPPED_UNSAFE: &str = "dropped_unsafe";

enum Step {
    Skip,
    Keep {
        key: Padded,
    },
    /// A de-identifying rule; `slot` is where each source keeps its state for it.
    Transform {
        key: Padded,
        action: Action,
        slot: usize,
    },
}

/// What the policy does at each position of one field layout. Built once per policy and
/// layout, and shared by every source that sends that layout: fifty devices on one profile
/// use one plan, not fifty copies of a hundred steps.
struct Plan {
    /// Held so that the policy's address, part of the key the plan is found by, cannot be
    /// reused by another policy while the plan exists.
    _policy: Arc<Policy>,
    layout: Names,
    steps: Vec<Step>,
    /// Outcome name per position of the layout.
    outcomes: Vec<&'static str>,
    tally: Tally,
    transforms: usize,
}

impl Plan {
    fn new(policy: &Arc<Policy>, layout: Names) -> Self {
        let mut t = Tally {
            records: 1,
            ..Tally::default()
        };
        let mut transforms = 0;
        let outcomes = layout
            .iter()
            .map(|f| policy.rule(f).map_or(NO_RULE, |r| r.action.name()))
            .collect();
        let steps = layout
            .iter()
            .map(|f| match policy.rule(f).map(|r| &r.action) {
                None => {
                    t.unlisted += 1;
                    Step::Skip
                }
                Some(Action::Drop) => {
                    t.dropped += 1;
                    Step::Skip
                }
                Some(Action::Keep) => {
                    t.kept += 1;
                    Step::Keep { key: key(f) }
                }
                Some(action) => {
                    t.masked += 1;
                    transforms += 1;
                    Step::Transform {
                        key: key(f),
                        action: action.clone(),
                        slot: transforms - 1,
                    }
                }
            })
            .collect();
        Plan {
            _policy: policy.clone(),
            layout,
            steps,
            outcomes,
            tally: t,
            transforms,
        }
    }

    fn fits(&self, rec: &Record) -> bool {
        same_names(&self.layout, rec.names.iter())
    }
}

/// Plans by policy and layout, shared by the encoders of one batch stage. Consulted only
/// when a source's layout changes.
#[derive(Clone, Default)]
pub struct LayoutPlans(Arc<Mutex<HashMap<PlanKey, Arc<Plan>>>>);

/// A policy's address and a field layout.
type PlanKey = (usize, Names);

impl LayoutPlans {
    fn get(&self, policy: &Arc<Policy>, rec: &Record) -> Arc<Plan> {
        // The policy's address tells policies apart (each plan holds its policy).
        let k = (Arc::as_ptr(policy) as usize, rec.names.clone());
        // A poisoned lock only means another encoder panicked mid-insert: the map is intact.
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = map.get(&k) {
            return p.clone();
        }
        let p = Arc::new(Plan::new(policy, k.1.clone()));
        map.insert(k, p.clone());
        p
    }
}

/// One source's state for one de-identifying rule of its plan.
#[derive(Default)]
struct Seen {
    /// The last text input and its output: tags repeat, so each is transformed once.
    last: Option<Remembered>,
    /// Records whose value this rule could not de-identify safely (dropped instead).
    failed: u64,
}

pub struct SourceEncoder {
    policy: Arc<Policy>,
    plans: LayoutPlans,
    prefix: Padded,
    plan: Option<Arc<Plan>>,
    /// The names list last found to fit the plan: records sharing it fit without a look.
    fitted: Option<Names>,
    seen: Vec<Seen>,
    /// Records encoded with the current plan since the last flush of the counts.
    uses: u64,
    /// Positions whose rule failed on the last record (usually none).
    last_failed: Vec<usize>,
    /// Counts of earlier layouts not yet flushed.
    pending: RuleCounts,
}

/// `,"name":`, escaped; the first field of a line has its comma replaced by the `{` that
/// opens the fields (one copy a key, and no separator to push).
fn key(name: &str) -> Padded {
    let mut k = vec![b','];
    Slack::new(&mut k).str(name);
    k.push(b':');
    Padded::new(k)
}

impl SourceEncoder {
    /// An encoder with plans of its own.
    pub fn new(source: &str, policy: Arc<Policy>) -> Self {
        Self::with_plans(source, policy, LayoutPlans::default())
    }

    /// An encoder sharing `plans` with the other sources of the stage.
    pub fn with_plans(source: &str, policy: Arc<Policy>, plans: LayoutPlans) -> Self {
        Self {
            policy,
            plans,
            prefix: line_prefix(source),
            plan: None,
            fitted: None,
            seen: Vec::new(),
            uses: 0,
            last_failed: Vec::new(),
            pending: RuleCounts::new(),
        }
    }

    /// Adds the per-rule counts since the last flush to `into`. With `except_last`, the last
    /// record encoded is left out and stays counted for the next flush (it moved to the next
    /// batch).
    pub fn flush_counts(&mut self, into: &mut RuleCounts, except_last: bool) {
        for (k, v) in std::mem::take(&mut self.pending) {
            *into.entry(k).or_default() += v;
        }
        let Some(plan) = &self.plan else { return };
        let keep = u64::from(except_last && self.uses > 0);
        let uses = self.uses - keep;
        for (i, (name, outcome)) in plan.layout.iter().zip(&plan.outcomes).enumerate() {
            let mut failed = match &plan.steps[i] {
                Step::Transform { slot, .. } => std::mem::take(&mut self.seen[*slot].failed),
                _ => 0,
            };
            if keep == 1 && self.last_failed.contains(&i) {
                // The carried record's failure stays with it.
                failed -= 1;
                if let Step::Transform { slot, .. } = &plan.steps[i] {
                    self.seen[*slot].failed = 1;
                }
            }
            if uses - failed > 0 {
                *into.entry((name.clone(), *outcome)).or_default() += uses - failed;
            }
            if failed > 0 {
                *into.entry((name.clone(), DROPPED_UNSAFE)).or_default() += failed;
            }
        }
        self.uses = keep;
    }

    fn replan(&mut self, rec: &Record) {
        // The old layout's counts are kept for the next flush.
        let mut pending = std::mem::take(&mut self.pending);
        self.flush_counts(&mut pending, false);
        self.pending = pending;
        let plan = self.plans.get(&self.policy, rec);
        self.seen = (0..plan.transforms).map(|_| Seen::default()).collect();
        self.plan = Some(plan);
    }

    /// Appends the record, de-identified, as one JSON line; returns what the policy did.
    pub fn encode(&mut self, rec: &Record, out: &mut Vec<u8>) -> Tally {
        if !self
            .fitted
            .as_ref()
            .is_some_and(|n| Arc::ptr_eq(n, &rec.names))
        {
            if !self.plan.as_ref().is_some_and(|p| p.fits(rec)) {
                self.replan(rec);
            }
            self.fitted = Some(rec.names.clone());
        }
        // Borrowed, not cloned: an `Arc` clone per record is two atomic operations on a count
        // the encoders of every source on the profile share.
        let Some(plan) = self.plan.as_deref() else {
            unreachable!("set by replan")
        };
        let mut w = Slack::new(out);
        w.padded(&self.prefix);
        w.ts_seq(rec.ts_ms, rec.seq);
        // The byte before the next key: `{` opens the fields, `,` follows a field.
        let mut sep = b'{';
        let mut tally = plan.tally;
        self.uses += 1;
        self.last_failed.clear();
        for (i, (value, step)) in rec.values.iter().zip(plan.steps.iter()).enumerate() {
            match step {
                Step::Skip => {}
                Step::Keep { key } => {
                    w.key(key, sep);
                    sep = b',';
                    w.value(value);
                }
                Step::Transform { key, action, slot } => {
                    let seen = &mut self.seen[*slot];
                    let local;
                    let bytes = if let Value::Text(t) = value {
                        // Text repeats (tags): transform once per distinct value.
                        if !seen.last.as_ref().is_some_and(|(s, _)| Arc::ptr_eq(s, t)) {
                            seen.last = Some((t.clone(), render(action, value)));
                        }
                        seen.last.as_ref().and_then(|(_, b)| b.as_ref())
                    } else {
                        local = render(action, value);
                        local.as_ref()
                    };
                    match bytes {
                        Some(b) => {
                            w.key(key, sep);
                            sep = b',';
                            w.padded(b);
                        }
                        // The rule could not be applied safely: the field is dropped.
                        None => {
                            tally.masked -= 1;
                            tally.dropped += 1;
                            seen.failed += 1;
                            self.last_failed.push(i);
                        }
                    }
                }
            }
        }
        if sep == b'{' {
            // No field kept: the fields object is empty.
            w.byte(b'{');
        }
        w.array(b"}}\n");
        tally
    }
}

fn render(action: &Action, v: &Value) -> Option<Padded> {
    action.transform(v).map(|v| {
        let mut b = Vec::new();
        write_value(&v, &mut b);
        Padded::new(b)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::{Field, LayoutCache};
    use crate::config::{ActionKind, FieldRuleConfig, Grade, PolicyConfig};

    fn policy() -> Arc<Policy> {
        let mut cfg = PolicyConfig::default();
        let r = |action| FieldRuleConfig::new(action, Grade::Personal);
        let with = |action, f: &dyn Fn(&mut FieldRuleConfig)| {
            let mut x = FieldRuleConfig::new(action, Grade::Personal);
            f(&mut x);
            x
        };
        let f = &mut cfg.fields;
        f.insert("keep".into(), r(ActionKind::Keep));
        f.insert("gone".into(), r(ActionKind::Drop));
        f.insert(
            "meter".into(),
            with(ActionKind::Mask, &|x| {
                x.keep_head = Some(4);
                x.keep_tail = Some(2);
            }),
        );
        f.insert(
            "num".into(),
            with(ActionKind::Mask, &|x| x.keep_head = Some(2)),
        );
        f.insert("q\"k".into(), r(ActionKind::Keep));
        f.insert(
            "account".into(),
            with(ActionKind::Pseudonymize, &|x| {
                x.prefix = Some("acct_".into())
            }),
        );
        f.insert(
            "addr".into(),
            with(ActionKind::Generalize, &|x| {
                x.level = Some(crate::config::Level::District)
            }),
        );
        f.insert(
            "age".into(),
            with(ActionKind::Generalize, &|x| {
                x.buckets = Some(vec![0.0, 18.0, 60.0])
            }),
        );
        f.insert(
            "usage".into(),
            with(ActionKind::Round, &|x| x.decimals = Some(1)),
        );
        f.insert("remark".into(), r(ActionKind::Scrub));
        let key = Arc::new(crate::policy::PseudonymKey::from_bytes(&[9; 32]));
        Arc::new(Policy::compile(&cfg, Some(&key)).unwrap())
    }

    /// A record of these names; the same `cache` gives records of one layout one names list.
    fn rec_in(cache: &mut LayoutCache, seq: u64, names: &[Arc<str>], meter: &Arc<str>) -> Record {
        let addr = if seq % 3 == 0 {
            "天津市和平区南京路1号"
        } else {
            "无效地址"
        };
        let values = [
            Value::Float(seq as f64 * 1.5),
            Value::Int(-(seq as i64)),
            Value::Text(meter.clone()),
            Value::UInt(123_456 + seq),
            Value::Bool(seq % 2 == 0),
            Value::Text(Arc::from(format!("张三{seq}"))),
            Value::Text(Arc::from(format!("ACC-{}", seq % 4))),
            Value::Text(Arc::from(addr)),
            Value::UInt(seq * 3),
            Value::Float(seq as f64 / 7.0),
            Value::Text(Arc::from(format!("回电13812345{:03}，其余正常", seq))),
        ];
        cache.record(
            Arc::from("src"),
            1_795_568_400_000 + seq as i64,
            seq,
            names
                .iter()
                .cloned()
                .zip(values)
                .map(|(name, value)| Field { name, value })
                .collect(),
        )
    }

    fn rec(seq: u64, names: &[Arc<str>], meter: &Arc<str>) -> Record {
        rec_in(&mut LayoutCache::default(), seq, names, meter)
    }

    #[test]
    fn fused_path_equals_apply_then_encode_across_layouts_and_values() {
        let p = policy();
        let mut enc = SourceEncoder::new("src", p.clone());
        let names: Vec<Arc<str>> = [
            "keep", "gone", "meter", "num", "q\"k", "unlisted", "account", "addr", "age", "usage",
            "remark",
        ]
        .iter()
        .map(|n| Arc::from(*n))
        .collect();
        let other: Vec<Arc<str>> = [
            "meter", "keep", "x", "gone", "num", "keep2", "addr", "account", "usage", "age",
            "remark",
        ]
        .iter()
        .map(|n| Arc::from(*n))
        .collect();
        let meters: Vec<Arc<str>> = vec![
            Arc::from("WTR-1201-000317"),
            Arc::from("WTR-9"),
            Arc::from(""),
        ];
        let mut cache = LayoutCache::default();
        for seq in 0..60u64 {
            let layout = if seq % 7 < 4 { &names } else { &other };
            let meter = &meters[(seq / 5) as usize % meters.len()];
            // Shared names lists, and (every third record) a list of its own, found to fit by
            // comparing names.
            let r = match seq % 3 {
                0 => rec(seq, layout, meter),
                _ => rec_in(&mut cache, seq, layout, meter),
            };
            let mut fused = Vec::new();
            let t1 = enc.encode(&r, &mut fused);
            let mut applied = r.clone();
            let t2 = p.apply(&mut applied);
            let mut reference = Vec::new();
            super::super::encode_line(&applied, &mut reference);
            assert_eq!(
                String::from_utf8(fused).unwrap(),
                String::from_utf8(reference).unwrap(),
                "seq {seq}"
            );
            assert_eq!(t1, t2, "seq {seq}");
        }
    }

    #[test]
    fn a_record_with_no_field_kept_has_empty_fields() {
        let p = policy();
        let mut enc = SourceEncoder::new("src", p.clone());
        let names: Vec<Arc<str>> = ["gone", "unlisted"].map(Arc::from).to_vec();
        let meter: Arc<str> = Arc::from("m");
        let r = rec(3, &names, &meter);
        let mut fused = b"x".to_vec();
        enc.encode(&r, &mut fused);
        let mut applied = r.clone();
        p.apply(&mut applied);
        let mut reference = b"x".to_vec();
        super::super::encode_line(&applied, &mut reference);
        assert_eq!(fused, reference);
        assert!(fused.ends_with(b"\"fields\":{}}\n"), "{fused:?}");
    }

    #[test]
    fn sources_with_one_layout_and_policy_share_one_plan() {
        let plans = LayoutPlans::default();
        let (p, q) = (policy(), policy());
        let names: Vec<Arc<str>> = ["keep", "meter", "num"].map(Arc::from).to_vec();
        let meter: Arc<str> = Arc::from("WTR-1201-000317");
        let mut a = SourceEncoder::with_plans("a", p.clone(), plans.clone());
        let mut b = SourceEncoder::with_plans("b", p, plans.clone());
        let mut c = SourceEncoder::with_plans("c", q, plans);
        let r = rec(1, &names, &meter);
        let (mut x, mut y, mut z) = (Vec::new(), Vec::new(), Vec::new());
        a.encode(&r, &mut x);
        b.encode(&r, &mut y);
        c.encode(&r, &mut z);
        let plan = |e: &SourceEncoder| e.plan.clone().unwrap();
        assert!(Arc::ptr_eq(&plan(&a), &plan(&b)));
        // Another policy (even with the same rules) gets its own plan.
        assert!(!Arc::ptr_eq(&plan(&a), &plan(&c)));
        // `{"source":"a",` and `{"source":"b",`: the same line but for the source.
        assert_eq!(x[15..], y[15..]);
        assert_eq!(x.len(), y.len());
    }

    #[test]
    fn rule_counts_are_exact_across_layouts_failures_and_a_carried_record() {
        let mut cfg = PolicyConfig::default();
        cfg.fields.insert(
            "a".into(),
            FieldRuleConfig::new(ActionKind::Keep, Grade::Internal),
        );
        cfg.fields.insert(
            "d".into(),
            FieldRuleConfig::new(ActionKind::Drop, Grade::Internal),
        );
        let mut round = FieldRuleConfig::new(ActionKind::Round, Grade::Internal);
        round.decimals = Some(1);
        cfg.fields.insert("r".into(), round);
        let mut enc = SourceEncoder::new("s", Arc::new(Policy::compile(&cfg, None).unwrap()));
        let field = |n: &str, v: Value| Field {
            name: Arc::from(n),
            value: v,
        };
        let r1 = |seq, rv: Value| {
            Record::new(
                Arc::from("s"),
                0,
                seq,
                vec![
                    field("a", Value::Int(1)),
                    field("d", Value::Int(2)),
                    field("r", rv),
                    field("z", Value::Int(3)),
                ],
            )
        };
        let mut out = Vec::new();
        enc.encode(&r1(1, Value::Float(1.26)), &mut out);
        // Not a number: round cannot apply, the field is dropped.
        enc.encode(&r1(2, Value::Text(Arc::from("n/a"))), &mut out);
        // Another layout.
        let r3 = Record::new(Arc::from("s"), 0, 3, vec![field("a", Value::Float(2.0))]);
        enc.encode(&r3, &mut out);
        // Back to the first layout, with a failure; this record is carried to the next batch.
        enc.encode(&r1(4, Value::Text(Arc::from("?"))), &mut out);
        let mut first = RuleCounts::new();
        enc.flush_counts(&mut first, true);
        let get = |c: &RuleCounts, f: &str, o: &str| c.get(&(Arc::from(f), o)).copied();
        assert_eq!(get(&first, "a", "keep"), Some(3));
        assert_eq!(get(&first, "d", "drop"), Some(2));
        assert_eq!(get(&first, "r", "round"), Some(1));
        assert_eq!(get(&first, "r", DROPPED_UNSAFE), Some(1));
        assert_eq!(get(&first, "z", NO_RULE), Some(2));
        let mut second = RuleCounts::new();
        enc.flush_counts(&mut second, false);
        assert_eq!(get(&second, "a", "keep"), Some(1));
        assert_eq!(get(&second, "r", DROPPED_UNSAFE), Some(1));
        assert_eq!(get(&second, "r", "round"), None);
        let mut none = RuleCounts::new();
        enc.flush_counts(&mut none, false);
        assert!(none.is_empty(), "{none:?}");
    }
}

//! Policy and JSON encoding fused, per source. A source sends records with the same fields
//! in the same order every poll, so the rule for each position is looked up once per layout
//! (not once per field), key fragments are escaped once, and a masked constant (a tag such
//! as a meter id) is masked once and reused while the same value keeps coming. The output is
//! byte for byte what [`Policy::apply`] followed by [`super::encode_line`] produces; a test
//! holds the two paths together.

use std::sync::Arc;

use super::json::{json_str, line_prefix, write_ts_seq, write_value};
use crate::collect::{Record, Value};
use crate::policy::{Action, Policy, Tally};

/// The last text input of a transforming rule and its rendered output (`None`: dropped).
type Remembered = (Arc<str>, Option<Box<[u8]>>);

enum Step {
    Skip,
    Keep {
        key: Box<[u8]>,
    },
    /// A de-identifying rule; `last` remembers the output for the last text input seen.
    Transform {
        key: Box<[u8]>,
        action: Action,
        last: Option<Remembered>,
    },
}

pub struct SourceEncoder {
    policy: Arc<Policy>,
    prefix: Vec<u8>,
    layout: Vec<Arc<str>>,
    steps: Vec<Step>,
    tally: Tally,
}

/// `"name":`, escaped.
fn key(name: &str) -> Box<[u8]> {
    let mut k = Vec::with_capacity(name.len() + 3);
    json_str(name, &mut k);
    k.push(b':');
    k.into_boxed_slice()
}

impl SourceEncoder {
    pub fn new(source: &str, policy: Arc<Policy>) -> Self {
        Self {
            policy,
            prefix: line_prefix(source),
            layout: Vec::new(),
            steps: Vec::new(),
            tally: Tally::default(),
        }
    }

    fn same_layout(&self, rec: &Record) -> bool {
        self.layout.len() == rec.fields.len()
            && self
                .layout
                .iter()
                .zip(&rec.fields)
                .all(|(a, f)| Arc::ptr_eq(a, &f.name) || **a == *f.name)
    }

    fn plan(&mut self, rec: &Record) {
        let mut t = Tally {
            records: 1,
            ..Tally::default()
        };
        self.layout = rec.fields.iter().map(|f| f.name.clone()).collect();
        self.steps = rec
            .fields
            .iter()
            .map(|f| match self.policy.rule(&f.name).map(|r| &r.action) {
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
                    Step::Keep { key: key(&f.name) }
                }
                Some(action) => {
                    t.masked += 1;
                    Step::Transform {
                        key: key(&f.name),
                        action: action.clone(),
                        last: None,
                    }
                }
            })
            .collect();
        self.tally = t;
    }

    /// Appends the record, de-identified, as one JSON line; returns what the policy did.
    pub fn encode(&mut self, rec: &Record, out: &mut Vec<u8>) -> Tally {
        if !self.same_layout(rec) {
            self.plan(rec);
        }
        out.extend_from_slice(&self.prefix);
        write_ts_seq(rec.ts_ms, rec.seq, out);
        let mut first = true;
        let mut tally = self.tally;
        for (f, step) in rec.fields.iter().zip(self.steps.iter_mut()) {
            match step {
                Step::Skip => {}
                Step::Keep { key } => {
                    separate(out, &mut first);
                    out.extend_from_slice(key);
                    write_value(&f.value, out);
                }
                Step::Transform { key, action, last } => {
                    let local;
                    let bytes = if let Value::Text(t) = &f.value {
                        // Text repeats (tags): transform once per distinct value.
                        if !last.as_ref().is_some_and(|(seen, _)| Arc::ptr_eq(seen, t)) {
                            *last = Some((t.clone(), render(action, &f.value)));
                        }
                        last.as_ref().and_then(|(_, b)| b.as_deref())
                    } else {
                        local = render(action, &f.value);
                        local.as_deref()
                    };
                    match bytes {
                        Some(b) => {
                            separate(out, &mut first);
                            out.extend_from_slice(key);
                            out.extend_from_slice(b);
                        }
                        // The rule could not be applied safely: the field is dropped.
                        None => {
                            tally.masked -= 1;
                            tally.dropped += 1;
                        }
                    }
                }
            }
        }
        out.extend_from_slice(b"}}\n");
        tally
    }
}

fn separate(out: &mut Vec<u8>, first: &mut bool) {
    if !*first {
        out.push(b',');
    }
    *first = false;
}

fn render(action: &Action, v: &Value) -> Option<Box<[u8]>> {
    action.transform(v).map(|v| {
        let mut b = Vec::new();
        write_value(&v, &mut b);
        b.into_boxed_slice()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::Field;
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

    fn rec(seq: u64, names: &[Arc<str>], meter: &Arc<str>) -> Record {
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
        Record {
            source: Arc::from("src"),
            ts_ms: 1_795_568_400_000 + seq as i64,
            seq,
            fields: names
                .iter()
                .cloned()
                .zip(values)
                .map(|(name, value)| Field { name, value })
                .collect(),
        }
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
        for seq in 0..60u64 {
            let layout = if seq % 7 < 4 { &names } else { &other };
            let meter = &meters[(seq / 5) as usize % meters.len()];
            let r = rec(seq, layout, meter);
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
}

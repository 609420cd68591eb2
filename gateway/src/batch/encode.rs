//! Policy and JSON encoding fused, per source. A source sends records with the same fields
//! in the same order every poll, so the rule for each position is looked up once per layout
//! (not once per field), key fragments are escaped once, and a masked constant (a tag such
//! as a meter id) is masked once and reused while the same value keeps coming. The output is
//! byte for byte what [`Policy::apply`] followed by [`super::encode_line`] produces; a test
//! holds the two paths together.

use std::sync::Arc;

use super::json::{json_str, line_prefix, write_ts_seq, write_value};
use crate::collect::{Record, Value};
use crate::policy::{mask, Action, Policy, Tally};

enum Step {
    Skip,
    Keep {
        key: Box<[u8]>,
    },
    Mask {
        key: Box<[u8]>,
        head: usize,
        tail: usize,
        ch: char,
        last: Option<(Arc<str>, Box<[u8]>)>,
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
                Some(Action::Mask { head, tail, ch }) => {
                    t.masked += 1;
                    Step::Mask {
                        key: key(&f.name),
                        head: *head,
                        tail: *tail,
                        ch: *ch,
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
        for (f, step) in rec.fields.iter().zip(self.steps.iter_mut()) {
            let key = match step {
                Step::Skip => continue,
                Step::Keep { key } | Step::Mask { key, .. } => key,
            };
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend_from_slice(key);
            match step {
                Step::Mask {
                    head,
                    tail,
                    ch,
                    last,
                    ..
                } => match (&f.value, last.as_ref()) {
                    (Value::Text(t), Some((seen, rendered))) if Arc::ptr_eq(seen, t) => {
                        out.extend_from_slice(rendered)
                    }
                    (v, _) => {
                        let masked = match v {
                            Value::Text(t) => mask(t, *head, *tail, *ch),
                            other => mask(&other.to_text(), *head, *tail, *ch),
                        };
                        let mut rendered = Vec::with_capacity(masked.len() + 2);
                        json_str(&masked, &mut rendered);
                        out.extend_from_slice(&rendered);
                        if let Value::Text(t) = v {
                            *last = Some((t.clone(), rendered.into_boxed_slice()));
                        }
                    }
                },
                _ => write_value(&f.value, out),
            }
        }
        out.extend_from_slice(b"}}\n");
        self.tally
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::Field;
    use crate::config::{ActionKind, FieldRuleConfig, Grade, PolicyConfig};

    fn policy() -> Arc<Policy> {
        let mut cfg = PolicyConfig::default();
        let r = |action, keep_head, keep_tail| FieldRuleConfig {
            action,
            grade: Grade::Personal,
            keep_head,
            keep_tail,
            mask_char: None,
        };
        cfg.fields
            .insert("keep".into(), r(ActionKind::Keep, None, None));
        cfg.fields
            .insert("gone".into(), r(ActionKind::Drop, None, None));
        cfg.fields
            .insert("meter".into(), r(ActionKind::Mask, Some(4), Some(2)));
        cfg.fields
            .insert("num".into(), r(ActionKind::Mask, Some(2), None));
        cfg.fields
            .insert("q\"k".into(), r(ActionKind::Keep, None, None));
        Arc::new(Policy::compile(&cfg).unwrap())
    }

    fn rec(seq: u64, names: &[Arc<str>], meter: &Arc<str>) -> Record {
        let values = [
            Value::Float(seq as f64 * 1.5),
            Value::Int(-(seq as i64)),
            Value::Text(meter.clone()),
            Value::UInt(123_456 + seq),
            Value::Bool(seq % 2 == 0),
            Value::Text(Arc::from(format!("张三{seq}"))),
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
        let names: Vec<Arc<str>> = ["keep", "gone", "meter", "num", "q\"k", "unlisted"]
            .iter()
            .map(|n| Arc::from(*n))
            .collect();
        let other: Vec<Arc<str>> = ["meter", "keep", "x", "gone", "num", "keep2"]
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

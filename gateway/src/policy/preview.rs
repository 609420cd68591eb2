//! `shuyuan policy preview`: what comes in and what would leave, field by field, so IT staff
//! can review a policy on a sample before it runs. This is the one place where raw values are
//! shown on purpose: on the reviewer's own terminal, never in a log or on disk.

use serde::Serialize;

use super::{Action, Policy, Tally};
use crate::collect::{Record, Value};

#[derive(Debug, Serialize)]
pub struct FieldView {
    pub name: String,
    pub rule: String,
    pub grade: Option<String>,
    #[serde(rename = "in")]
    pub input: String,
    /// None: the field does not leave.
    pub out: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct RecordView {
    pub record: usize,
    pub fields: Vec<FieldView>,
}

#[derive(Debug, Serialize)]
pub struct Preview {
    pub policy: String,
    pub records: Vec<RecordView>,
    pub kept: u32,
    pub changed: u32,
    pub dropped: u32,
    pub unlisted: u32,
}

fn rule_name(a: &Action) -> String {
    match a {
        Action::Keep => "keep".into(),
        Action::Drop => "drop".into(),
        Action::Mask { head, tail, .. } => format!("mask {head}+{tail}"),
        Action::Pseudonymize { .. } => "pseudonymize".into(),
        Action::Address(l) | Action::Date(l) => format!("generalize {l:?}").to_lowercase(),
        Action::Buckets(_) => "generalize buckets".into(),
        Action::Round {
            decimals: Some(d), ..
        } => format!("round {d}"),
        Action::Round { grid, .. } => format!("round grid {}", grid.unwrap_or(1.0)),
        Action::Scrub => "scrub".into(),
    }
}

fn show(v: &Value) -> String {
    match v {
        Value::Text(t) => t.to_string(),
        other => other.to_text(),
    }
}

pub fn build(policy_name: &str, policy: &Policy, records: &[Record]) -> Preview {
    let mut total = Tally::default();
    let mut views = Vec::new();
    for (i, rec) in records.iter().enumerate() {
        let mut out = rec.clone();
        total.add(&policy.apply(&mut out));
        let fields = rec
            .fields()
            .map(|(name, value)| {
                let rule = policy.rule(name);
                FieldView {
                    name: name.to_string(),
                    rule: rule.map_or("no rule: dropped".into(), |r| rule_name(&r.action)),
                    grade: rule.map(|r| format!("{:?}", r.grade).to_lowercase()),
                    input: show(value),
                    out: out.get(name).map(show),
                }
            })
            .collect();
        views.push(RecordView {
            record: i + 1,
            fields,
        });
    }
    Preview {
        policy: policy_name.to_string(),
        records: views,
        kept: total.kept,
        changed: total.masked,
        dropped: total.dropped,
        unlisted: total.unlisted,
    }
}

/// Terminal columns a string takes (CJK characters take two).
fn width(s: &str) -> usize {
    s.chars()
        .map(|c| if matches!(c as u32, 0x1100..=0x115F | 0x2E80..=0xA4CF | 0xAC00..=0xD7A3 | 0xF900..=0xFAFF | 0xFE30..=0xFE4F | 0xFF00..=0xFF60 | 0xFFE0..=0xFFE6) { 2 } else { 1 })
        .sum()
}

fn pad(s: &str, w: usize) -> String {
    let mut t: String = s.chars().filter(|c| !c.is_control()).collect();
    let n = width(&t);
    if n > w {
        t = t
            .chars()
            .scan(0, |acc, c| {
                *acc += width(&c.to_string());
                (*acc < w).then_some(c)
            })
            .collect::<String>()
            + "…";
    }
    let n = width(&t);
    t + &" ".repeat(w.saturating_sub(n))
}

impl Preview {
    pub fn render(&self, color: bool) -> String {
        let (dim, red, green, off) = if color {
            ("\x1b[2m", "\x1b[31m", "\x1b[32m", "\x1b[0m")
        } else {
            ("", "", "", "")
        };
        let mut s = format!("policy {:?}: {} records\n", self.policy, self.records.len());
        for r in &self.records {
            s += &format!(
                "\nrecord {}\n{dim}  {} {} {} {}{off}\n",
                r.record,
                pad("field", 16),
                pad("rule", 32),
                pad("in", 30),
                "out"
            );
            for f in &r.fields {
                let rule = match &f.grade {
                    Some(g) => format!("{} ({g})", f.rule),
                    None => f.rule.clone(),
                };
                let out = match &f.out {
                    Some(o) if *o == f.input => o.to_string(),
                    Some(o) => format!("{green}{o}{off}"),
                    None => format!("{red}— (not sent){off}"),
                };
                s += &format!(
                    "  {} {} {} {out}\n",
                    pad(&f.name, 16),
                    pad(&rule, 32),
                    pad(&f.input, 30)
                );
            }
        }
        s += &format!(
            "\nfields: {} kept, {} de-identified, {} dropped by rule, {} without a rule (dropped)\n",
            self.kept, self.changed, self.dropped, self.unlisted
        );
        s
    }
}

//! De-identification: a compiled [`Policy`] decides, field by field, what leaves the
//! gateway. Default deny: a field without a rule is dropped and counted. Pure functions over
//! values, tested without a runtime.
//!
//! Rules today: keep, drop, mask. The rule type is an enum so that pseudonymize, generalize,
//! round and scrub join it without touching the stage around it.

use std::collections::HashMap;
use std::sync::Arc;

use crate::collect::{Field, Record, Value};
use crate::config::{ActionKind, FieldRuleConfig, Grade, KeyPath, PolicyConfig};

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Keep,
    Drop,
    /// Keep `head` leading and `tail` trailing characters (not bytes), mask the rest.
    Mask {
        head: usize,
        tail: usize,
        ch: char,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    pub action: Action,
    pub grade: Grade,
}

/// What a policy did to one record's fields.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Records counted (1 per applied record).
    pub records: u32,
    pub kept: u32,
    pub masked: u32,
    pub dropped: u32,
    /// Fields with no rule: dropped by default deny.
    pub unlisted: u32,
}

impl Tally {
    pub fn add(&mut self, o: &Tally) {
        self.records += o.records;
        self.kept += o.kept;
        self.masked += o.masked;
        self.dropped += o.dropped;
        self.unlisted += o.unlisted;
    }
}

/// FNV-1a: field names are short and trusted (they come from the config), so a simple
/// fast hash serves the per-field lookup better than SipHash's flood resistance.
#[derive(Clone, Copy)]
pub struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<Fnv>>;

#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: FastMap<Arc<str>, Rule>,
}

impl Policy {
    /// Compiles a policy table. Errors carry a path relative to the policy's table.
    pub fn compile(cfg: &PolicyConfig) -> Result<Self, Vec<(KeyPath, String)>> {
        let mut errs = Vec::new();
        let mut rules = FastMap::default();
        for (name, r) in &cfg.fields {
            let at = KeyPath::root().key("fields").key(name.as_str());
            match compile_rule(name, r) {
                Ok(rule) => {
                    rules.insert(Arc::from(name.as_str()), rule);
                }
                Err((key, msg)) => errs.push((at.key(key), msg)),
            }
        }
        if errs.is_empty() {
            Ok(Self { rules })
        } else {
            Err(errs)
        }
    }

    pub fn has_rule(&self, field: &str) -> bool {
        self.rules.contains_key(field)
    }

    pub fn rule(&self, field: &str) -> Option<&Rule> {
        self.rules.get(field)
    }

    /// Applies the policy to a record in place.
    pub fn apply(&self, rec: &mut Record) -> Tally {
        let mut t = Tally {
            records: 1,
            ..Tally::default()
        };
        rec.fields.retain_mut(|f| match self.rules.get(&f.name) {
            None => {
                t.unlisted += 1;
                false
            }
            Some(rule) => match &rule.action {
                Action::Keep => {
                    t.kept += 1;
                    true
                }
                Action::Drop => {
                    t.dropped += 1;
                    false
                }
                Action::Mask { head, tail, ch } => {
                    t.masked += 1;
                    mask_field(f, *head, *tail, *ch);
                    true
                }
            },
        });
        t
    }
}

fn compile_rule(name: &str, r: &FieldRuleConfig) -> Result<Rule, (&'static str, String)> {
    let mask_opts = r.keep_head.is_some() || r.keep_tail.is_some() || r.mask_char.is_some();
    let action = match r.action {
        ActionKind::Keep if r.grade == Grade::Sensitive => {
            return Err((
                "action",
                format!("field {name:?} is graded sensitive: it cannot be kept in clear; use mask (or drop)"),
            ))
        }
        ActionKind::Keep | ActionKind::Drop if mask_opts => {
            return Err((
                "action",
                format!("field {name:?}: keep_head, keep_tail and mask_char apply only to action = \"mask\""),
            ))
        }
        ActionKind::Keep => Action::Keep,
        ActionKind::Drop => Action::Drop,
        ActionKind::Mask => Action::Mask {
            head: r.keep_head.unwrap_or(0),
            tail: r.keep_tail.unwrap_or(0),
            ch: r.mask_char.unwrap_or('*'),
        },
    };
    Ok(Rule {
        action,
        grade: r.grade,
    })
}

fn mask_field(f: &mut Field, head: usize, tail: usize, ch: char) {
    let masked = match &f.value {
        Value::Text(t) => mask(t, head, tail, ch),
        other => mask(&other.to_text(), head, tail, ch),
    };
    f.value = Value::Text(Arc::from(masked));
}

/// Masks all but `head` leading and `tail` trailing characters. When the text is too short to
/// keep both and still hide something, fewer are kept: at least one character is always
/// masked, so a mask never returns its input.
pub fn mask(text: &str, head: usize, tail: usize, ch: char) -> String {
    let n = text.chars().count();
    if n == 0 {
        return String::new();
    }
    let (mut h, mut t) = (head, tail);
    while h + t >= n {
        if t > 0 && t >= h {
            t -= 1;
        } else if h > 0 {
            h -= 1;
        } else {
            break;
        }
    }
    text.chars()
        .enumerate()
        .map(|(i, c)| if i < h || i >= n - t { c } else { ch })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(action: ActionKind, grade: Grade) -> FieldRuleConfig {
        FieldRuleConfig {
            action,
            grade,
            keep_head: None,
            keep_tail: None,
            mask_char: None,
        }
    }

    #[test]
    fn mask_counts_characters_not_bytes() {
        assert_eq!(mask("张三", 1, 0, '*'), "张*");
        assert_eq!(mask("欧阳修文", 1, 0, '*'), "欧***");
        assert_eq!(mask("13812345678", 3, 4, '*'), "138****5678");
        assert_eq!(mask("", 3, 4, '*'), "");
        // Too short to keep head and tail: still hides at least one character.
        assert_eq!(mask("ab", 3, 4, '*'), "a*");
        assert_eq!(mask("a", 1, 1, '#'), "#");
    }

    #[test]
    fn default_deny_drops_and_counts_unlisted_fields() {
        let mut cfg = PolicyConfig::default();
        cfg.fields
            .insert("flow".into(), rule(ActionKind::Keep, Grade::Internal));
        let mut m = rule(ActionKind::Mask, Grade::Personal);
        m.keep_head = Some(3);
        cfg.fields.insert("meter".into(), m);
        cfg.fields
            .insert("secret".into(), rule(ActionKind::Drop, Grade::Internal));
        let p = Policy::compile(&cfg).unwrap();
        let f = |n: &str, v: Value| Field {
            name: Arc::from(n),
            value: v,
        };
        let mut rec = Record {
            source: Arc::from("s"),
            ts_ms: 0,
            seq: 0,
            fields: vec![
                f("flow", Value::Float(1.5)),
                f("meter", Value::Text(Arc::from("WTR-000317"))),
                f("secret", Value::Int(7)),
                f("other", Value::Int(9)),
            ],
        };
        let t = p.apply(&mut rec);
        assert_eq!(
            t,
            Tally {
                records: 1,
                kept: 1,
                masked: 1,
                dropped: 1,
                unlisted: 1
            }
        );
        assert_eq!(
            rec.fields,
            vec![
                f("flow", Value::Float(1.5)),
                f("meter", Value::Text(Arc::from("WTR*******")))
            ]
        );
    }

    #[test]
    fn sensitive_fields_cannot_be_kept() {
        let mut cfg = PolicyConfig::default();
        cfg.fields
            .insert("id_card".into(), rule(ActionKind::Keep, Grade::Sensitive));
        let errs = Policy::compile(&cfg).unwrap_err();
        assert_eq!(errs[0].0.to_string(), "fields.id_card.action");
        assert!(errs[0].1.contains("sensitive"));
    }
}

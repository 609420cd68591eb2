//! De-identification: a compiled [`Policy`] decides, field by field, what leaves the
//! gateway. Default deny: a field without a rule is dropped and counted. Pure functions over
//! values, tested without a runtime.
//!
//! Rules: keep, drop, mask, pseudonymize (keyed HMAC, [`pseudonym`]), generalize (address,
//! date, number buckets, [`generalize`]), round (decimals or grid) and scrub (identifiers in
//! free text, [`detect`]). An unkeyed hash is deliberately not offered: ID and phone numbers
//! are few enough to enumerate, so their plain hashes are reversible.

pub mod detect;
pub mod generalize;
pub mod preview;
pub mod pseudonym;

use std::collections::HashMap;
use std::sync::Arc;

use crate::collect::{Record, Value};
use crate::config::{ActionKind, FieldRuleConfig, Grade, KeyPath, Level, PolicyConfig};
pub use pseudonym::PseudonymKey;

#[derive(Debug, Clone)]
pub enum Action {
    Keep,
    Drop,
    /// Keep `head` leading and `tail` trailing characters (not bytes), mask the rest.
    Mask {
        head: usize,
        tail: usize,
        ch: char,
    },
    Pseudonymize {
        key: Arc<PseudonymKey>,
        prefix: String,
        length: usize,
    },
    Address(Level),
    Date(Level),
    Buckets(Vec<f64>),
    Round {
        decimals: Option<u32>,
        grid: Option<f64>,
    },
    Scrub,
}

impl Action {
    /// The rule's name as written in the config (generalize for addresses, dates and
    /// buckets), for the audit trail's per-rule counts.
    pub fn name(&self) -> &'static str {
        match self {
            Action::Keep => "keep",
            Action::Drop => "drop",
            Action::Mask { .. } => "mask",
            Action::Pseudonymize { .. } => "pseudonymize",
            Action::Address(_) | Action::Date(_) | Action::Buckets(_) => "generalize",
            Action::Round { .. } => "round",
            Action::Scrub => "scrub",
        }
    }

    /// The de-identified value, or `None` when the rule cannot be applied safely to this
    /// value (the field is then dropped). Not called for keep and drop.
    pub fn transform(&self, v: &Value) -> Option<Value> {
        let text = |v: &Value| match v {
            Value::Text(t) => t.to_string(),
            other => other.to_text(),
        };
        let number = |v: &Value| match v {
            Value::Int(i) => Some(*i as f64),
            Value::UInt(u) => Some(*u as f64),
            Value::Float(f) => Some(*f),
            Value::Text(t) | Value::Decimal(t) => t.trim().parse::<f64>().ok(),
            Value::Bool(_) => None,
        };
        let t = |s: String| Some(Value::Text(Arc::from(s)));
        match self {
            Action::Keep => Some(v.clone()),
            Action::Drop => None,
            Action::Mask { head, tail, ch } => t(mask(&text(v), *head, *tail, *ch)),
            Action::Pseudonymize {
                key,
                prefix,
                length,
            } => t(key.token(&text(v), prefix, *length)),
            // Generalising and rounding keep part of the value: if what is left still holds an
            // identifier (a phone number "rounded", digits before a province name), the field
            // is dropped instead.
            Action::Address(level) => generalize::address(&text(v), *level)
                .filter(|o| no_identifier(o))
                .and_then(t),
            Action::Date(level) => generalize::date(&text(v), *level).and_then(t),
            Action::Buckets(b) => number(v).and_then(|x| generalize::bucket(x, b)).and_then(t),
            Action::Round { decimals, grid } => number(v)
                .and_then(|x| generalize::round(x, *decimals, *grid))
                .filter(|x| no_identifier(&Value::Float(*x).to_text()) && no_identifier(&text(v)))
                .map(Value::Float),
            Action::Scrub => match v {
                Value::Text(s) => match detect::scrub(s) {
                    std::borrow::Cow::Borrowed(_) => Some(v.clone()),
                    std::borrow::Cow::Owned(o) => t(o),
                },
                // A number can be a whole phone or ID number: scrub its text form.
                other => Some(Value::Text(Arc::from(
                    detect::scrub(&other.to_text()).into_owned(),
                ))),
            },
        }
    }
}

fn no_identifier(s: &str) -> bool {
    detect::find(s).is_empty()
}

#[derive(Debug, Clone)]
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
    /// Changed by a de-identifying rule (mask, pseudonymize, generalize, round, scrub).
    pub masked: u32,
    /// Dropped by a drop rule, or because a rule could not be applied to the value.
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

/// A hash taking eight bytes a step, each mixed in by a folded multiply (the 128-bit product
/// of state and word, its halves XORed, so that every input bit reaches every output bit).
/// The keys are field and source names from the config (maps of them are never filled from
/// outside input), so a fast hash serves these per-record look-ups better than SipHash's
/// flood resistance; FNV-1a, used before, took one byte a step, and the batch stage hashes a
/// source's name for every record. (A multiply-rotate step, FxHash's, was tried: names that
/// differ in a word's last byte and in the tail collided in all 64 bits.)
#[derive(Clone, Copy)]
pub struct WordHasher(u64);

impl Default for WordHasher {
    fn default() -> Self {
        Self(0x243f_6a88_85a3_08d3)
    }
}

impl WordHasher {
    fn add(&mut self, word: u64) {
        let m = u128::from(self.0 ^ word) * 0x517c_c1b7_2722_0a95;
        self.0 = m as u64 ^ (m >> 64) as u64;
    }
}

impl std::hash::Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            if let Ok(w) = <[u8; 8]>::try_from(w) {
                self.add(u64::from_le_bytes(w));
            }
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            // The length in the top byte: `"ab"` and `"ab\0"` must differ.
            let tail = rest
                .iter()
                .enumerate()
                .fold(0u64, |t, (i, &b)| t | u64::from(b) << (8 * i));
            self.add(tail | (rest.len() as u64) << 56);
        }
    }
}

pub type FastMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<WordHasher>>;

#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: FastMap<Arc<str>, Rule>,
}

impl Policy {
    /// Compiles a policy table. `key` is the deployment's pseudonym key, when configured.
    /// Errors carry a path relative to the policy's table.
    pub fn compile(
        cfg: &PolicyConfig,
        key: Option<&Arc<PseudonymKey>>,
    ) -> Result<Self, Vec<(KeyPath, String)>> {
        let mut errs = Vec::new();
        let mut rules = FastMap::default();
        for (name, r) in &cfg.fields {
            let at = KeyPath::root().key("fields").key(name.as_str());
            match compile_rule(name, r, key) {
                Ok(rule) => {
                    rules.insert(Arc::from(name.as_str()), rule);
                }
                Err((k, msg)) => errs.push((at.key(k), msg)),
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

    /// Whether any rule pseudonymizes (the batch header then names the key).
    pub fn pseudonymizes(&self) -> bool {
        self.rules
            .values()
            .any(|r| matches!(r.action, Action::Pseudonymize { .. }))
    }

    /// Applies the policy to a record in place.
    pub fn apply(&self, rec: &mut Record) -> Tally {
        let mut t = Tally {
            records: 1,
            ..Tally::default()
        };
        let mut names = Vec::with_capacity(rec.names.len());
        let mut values = Vec::with_capacity(rec.values.len());
        for (name, value) in rec.names.iter().zip(std::mem::take(&mut rec.values)) {
            let value = match self.rules.get(name).map(|r| &r.action) {
                None => {
                    t.unlisted += 1;
                    continue;
                }
                Some(Action::Keep) => {
                    t.kept += 1;
                    value
                }
                Some(Action::Drop) => {
                    t.dropped += 1;
                    continue;
                }
                Some(action) => match action.transform(&value) {
                    Some(v) => {
                        t.masked += 1;
                        v
                    }
                    None => {
                        t.dropped += 1;
                        continue;
                    }
                },
            };
            names.push(name.clone());
            values.push(value);
        }
        rec.names = names.into();
        rec.values = values;
        t
    }
}

type RuleError = (&'static str, String);

fn compile_rule(
    name: &str,
    r: &FieldRuleConfig,
    key: Option<&Arc<PseudonymKey>>,
) -> Result<Rule, RuleError> {
    let Some(kind) = r.action else {
        return Err((
            "grade",
            format!("field {name:?} is graded {:?} but has no action: add action = \"drop\", \"mask\", \"pseudonymize\", \"generalize\", \"round\" or \"scrub\" (or \"keep\" if it may leave as is)", r.grade),
        ));
    };
    let opt = |set: bool, key: &'static str, for_: &str| -> Result<(), RuleError> {
        if set {
            Err((
                key,
                format!("field {name:?}: {key} applies only to action = {for_}, not {kind:?}")
                    .replace("Pseudonymize", "\"pseudonymize\""),
            ))
        } else {
            Ok(())
        }
    };
    let is = |k: ActionKind| kind == k;
    opt(
        !is(ActionKind::Mask) && r.keep_head.is_some(),
        "keep_head",
        "\"mask\"",
    )?;
    opt(
        !is(ActionKind::Mask) && r.keep_tail.is_some(),
        "keep_tail",
        "\"mask\"",
    )?;
    opt(
        !is(ActionKind::Mask) && r.mask_char.is_some(),
        "mask_char",
        "\"mask\"",
    )?;
    opt(
        !is(ActionKind::Pseudonymize) && r.prefix.is_some(),
        "prefix",
        "\"pseudonymize\"",
    )?;
    opt(
        !is(ActionKind::Pseudonymize) && r.length.is_some(),
        "length",
        "\"pseudonymize\"",
    )?;
    opt(
        !is(ActionKind::Generalize) && r.level.is_some(),
        "level",
        "\"generalize\"",
    )?;
    opt(
        !is(ActionKind::Generalize) && r.buckets.is_some(),
        "buckets",
        "\"generalize\"",
    )?;
    opt(
        !is(ActionKind::Round) && r.decimals.is_some(),
        "decimals",
        "\"round\"",
    )?;
    opt(
        !is(ActionKind::Round) && r.grid.is_some(),
        "grid",
        "\"round\"",
    )?;
    let action = match kind {
        ActionKind::Keep if r.grade == Grade::Sensitive => {
            return Err(("action", format!("field {name:?} is graded sensitive: it cannot be kept in clear; use mask, pseudonymize, generalize or drop")))
        }
        ActionKind::Keep => Action::Keep,
        ActionKind::Drop => Action::Drop,
        ActionKind::Mask => Action::Mask { head: r.keep_head.unwrap_or(0), tail: r.keep_tail.unwrap_or(0), ch: r.mask_char.unwrap_or('*') },
        ActionKind::Pseudonymize => {
            let key = key.ok_or(("action", format!("field {name:?}: pseudonymize needs a key: add [pseudonym] key = \"keys/pseudonym.key\" and create it with: shuyuan keys init --out keys/pseudonym.key")))?;
            let length = r.length.unwrap_or(pseudonym::DEFAULT_LENGTH);
            if !(8..=52).contains(&length) {
                return Err(("length", format!("field {name:?}: length must be 8 to 52 characters (16 or more keeps collisions negligible)")));
            }
            Action::Pseudonymize { key: key.clone(), prefix: r.prefix.clone().unwrap_or_default(), length }
        }
        ActionKind::Generalize => match (r.level, &r.buckets) {
            (Some(l @ (Level::Province | Level::City | Level::District)), None) => Action::Address(l),
            (Some(l), None) => Action::Date(l),
            (None, Some(b)) => {
                if b.is_empty() || b.windows(2).any(|w| w[0] >= w[1]) || b.iter().any(|x| !x.is_finite()) {
                    return Err(("buckets", format!("field {name:?}: buckets must be finite numbers in ascending order, e.g. [0, 18, 30, 45, 60]")));
                }
                Action::Buckets(b.clone())
            }
            _ => {
                return Err(("action", format!("field {name:?}: generalize needs either level = \"province\" | \"city\" | \"district\" (addresses) | \"day\" | \"month\" | \"year\" (dates), or buckets = [..] (numbers)")))
            }
        },
        ActionKind::Round => {
            if r.grid.is_some_and(|g| !(g.is_finite() && g > 0.0)) {
                return Err(("grid", format!("field {name:?}: grid must be a positive number, e.g. 0.01")));
            }
            if r.decimals.is_some_and(|d| d > 12) {
                return Err(("decimals", format!("field {name:?}: decimals must be 0 to 12")));
            }
            Action::Round { decimals: r.decimals, grid: r.grid }
        }
        ActionKind::Scrub => Action::Scrub,
    };
    Ok(Rule {
        action,
        grade: r.grade,
    })
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
mod props;
#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::Field;

    fn rule(action: ActionKind, grade: Grade) -> FieldRuleConfig {
        FieldRuleConfig::new(action, grade)
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
        let p = Policy::compile(&cfg, None).unwrap();
        let f = |n: &str, v: Value| Field {
            name: Arc::from(n),
            value: v,
        };
        let mut rec = Record::new(
            Arc::from("s"),
            0,
            0,
            vec![
                f("flow", Value::Float(1.5)),
                f("meter", Value::Text(Arc::from("WTR-000317"))),
                f("secret", Value::Int(7)),
                f("other", Value::Int(9)),
            ],
        );
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
        let want = vec![
            f("flow", Value::Float(1.5)),
            f("meter", Value::Text(Arc::from("WTR*******"))),
        ];
        assert_eq!(rec, Record::new(Arc::from("s"), 0, 0, want));
    }

    #[test]
    fn the_word_hash_tells_names_apart() {
        use std::hash::BuildHasher;
        let h = std::hash::BuildHasherDefault::<WordHasher>::default();
        let mut names: Vec<String> = (0..100_000).map(|i| format!("pump-station-{i}")).collect();
        names.extend(["", "a", "a\0", "ab", "ab\0", "abcdefgh", "abcdefgh\0"].map(String::from));
        let hashes: std::collections::HashSet<u64> =
            names.iter().map(|n| h.hash_one(n.as_str())).collect();
        assert_eq!(hashes.len(), names.len());
    }

    #[test]
    fn sensitive_fields_cannot_be_kept() {
        let mut cfg = PolicyConfig::default();
        cfg.fields
            .insert("id_card".into(), rule(ActionKind::Keep, Grade::Sensitive));
        let errs = Policy::compile(&cfg, None).unwrap_err();
        assert_eq!(errs[0].0.to_string(), "fields.id_card.action");
        assert!(errs[0].1.contains("sensitive"));
    }
}

//! Sources: each kind turns what a device or system offers into [`Record`]s and sends them
//! down a bounded channel. A source never stops the gateway: a device that fails is
//! counted, logged by kind and address, and retried.

pub mod file;
pub mod modbus;
pub mod points;
pub mod rtu;
pub mod sample;

use std::collections::BTreeMap;
use std::sync::Arc;

/// A source's fixed `tags`, as text fields added to each of its records.
pub fn tag_fields(tags: &BTreeMap<String, String>) -> Vec<Field> {
    tags.iter()
        .map(|(k, v)| Field {
            name: Arc::from(k.as_str()),
            value: Value::Text(Arc::from(v.as_str())),
        })
        .collect()
}

/// The names of a record's fields, in order. One list is shared by every record of the
/// same layout (a device's points and tags, a file's columns): a record then costs one
/// reference count for its names, taken by the source and given back by the batch stage,
/// instead of one per field on counts that every record of the layout shares.
pub type Names = Arc<[Arc<str>]>;

/// One observation of a source: what a poll read, at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub source: Arc<str>,
    /// Unix time in milliseconds when the observation was made.
    pub ts_ms: i64,
    /// Per-source sequence number, contiguous across restarts, so the platform can see gaps.
    pub seq: u64,
    /// The fields' names; `values[i]` is the value of `names[i]`.
    pub names: Names,
    pub values: Vec<Value>,
}

impl Record {
    /// A record of these fields, with a names list of its own (one-off records: previews,
    /// tests). Sources with a fixed layout share one list; see [`LayoutCache`].
    pub fn new(source: Arc<str>, ts_ms: i64, seq: u64, fields: Vec<Field>) -> Self {
        LayoutCache::default().record(source, ts_ms, seq, fields)
    }

    /// The fields as (name, value) pairs, in order.
    pub fn fields(&self) -> impl ExactSizeIterator<Item = (&Arc<str>, &Value)> {
        self.names.iter().zip(&self.values)
    }

    /// The value of the field `name`, if the record has it.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.fields().find(|(n, _)| ***n == *name).map(|(_, v)| v)
    }
}

/// Whether two lists hold the same names in the same order (by pointer first: names of
/// one layout are usually the same allocations).
pub fn same_names<'a>(a: &[Arc<str>], b: impl ExactSizeIterator<Item = &'a Arc<str>>) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y) || x == y)
}

/// Gives records of a source whose layout can change from record to record (the columns
/// present in a file row) the names list of the previous record when their names are the
/// same, so that a steady layout shares one list.
#[derive(Debug, Default)]
pub struct LayoutCache {
    last: Option<Names>,
}

impl LayoutCache {
    pub fn record(&mut self, source: Arc<str>, ts_ms: i64, seq: u64, fields: Vec<Field>) -> Record {
        let same = self
            .last
            .as_ref()
            .is_some_and(|n| same_names(n, fields.iter().map(|f| &f.name)));
        if !same {
            self.last = Some(fields.iter().map(|f| f.name.clone()).collect());
        }
        let names = self.last.clone().unwrap_or_default();
        Record {
            source,
            ts_ms,
            seq,
            names,
            values: fields.into_iter().map(|f| f.value).collect(),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Field {
    pub name: Arc<str>,
    pub value: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    Int(i64),
    UInt(u64),
    Float(f64),
    /// An exact decimal from an export file (money, readings), as a valid JSON number
    /// literal such as `-1234.50`: written as it is, never through binary floating point.
    Decimal(Arc<str>),
    Text(Arc<str>),
}

impl Value {
    /// The value as text, for rules that work on characters (mask).
    pub fn to_text(&self) -> String {
        match self {
            Value::Bool(b) => b.to_string(),
            Value::Int(i) => i.to_string(),
            Value::UInt(u) => u.to_string(),
            Value::Float(f) => f.to_string(),
            Value::Decimal(t) | Value::Text(t) => t.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(names: &[&Arc<str>], v: i64) -> Vec<Field> {
        names
            .iter()
            .map(|n| Field {
                name: (*n).clone(),
                value: Value::Int(v),
            })
            .collect()
    }

    #[test]
    fn rows_with_the_same_columns_share_one_names_list() {
        let (a, b, c) = (Arc::from("a"), Arc::from("b"), Arc::from("c"));
        let mut cache = LayoutCache::default();
        let s: Arc<str> = Arc::from("s");
        let r1 = cache.record(s.clone(), 0, 1, fields(&[&a, &b], 1));
        let r2 = cache.record(s.clone(), 0, 2, fields(&[&a, &b], 2));
        assert!(Arc::ptr_eq(&r1.names, &r2.names));
        // Equal names that are other allocations (a JSON row's keys) still share.
        let r3 = cache.record(s.clone(), 0, 3, fields(&[&Arc::from("a"), &b], 3));
        assert!(Arc::ptr_eq(&r1.names, &r3.names));
        // An empty cell left a column out: a list of its own, then the same again.
        let r4 = cache.record(s.clone(), 0, 4, fields(&[&a, &c], 4));
        assert!(!Arc::ptr_eq(&r1.names, &r4.names));
        assert_eq!(r4.get("c"), Some(&Value::Int(4)));
        assert_eq!(r4.get("b"), None);
        let r5 = cache.record(s, 0, 5, fields(&[&a, &c], 5));
        assert!(Arc::ptr_eq(&r4.names, &r5.names));
        assert_eq!(r5, Record::new(Arc::from("s"), 0, 5, fields(&[&a, &c], 5)));
    }
}

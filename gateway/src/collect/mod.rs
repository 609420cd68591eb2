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

/// One observation of a source: what a poll read, at one instant.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub source: Arc<str>,
    /// Unix time in milliseconds when the observation was made.
    pub ts_ms: i64,
    /// Per-source sequence number, contiguous across restarts, so the platform can see gaps.
    pub seq: u64,
    pub fields: Vec<Field>,
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

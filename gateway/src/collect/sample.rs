//! Sample files for `shuyuan policy preview`, read by the file source's own reader
//! ([`super::file::RowReader`]): with a file source's columns and encoding when previewing
//! that source, else every column as text (CSV by default, JSON Lines for .jsonl/.ndjson/.json).

use std::path::Path;
use std::sync::Arc;

use super::file::{Layout, Row, RowReader};
use super::Record;
use crate::config::{FileFormat, SourceConfig, SourceKind};

/// What a sample held: up to `limit` records, and the rows that could not be read
/// (`FILE:LINE: reason`).
pub struct Sample {
    pub records: Vec<Record>,
    pub bad: Vec<String>,
}

/// Reads at most `limit` records from a sample file, as `source` (when it is a file
/// source) would.
pub fn read(
    path: &Path,
    source: Option<&SourceConfig>,
    label: &str,
    limit: usize,
) -> Result<Sample, String> {
    let name = path.display().to_string();
    let layout = match source.filter(|s| s.kind == SourceKind::File) {
        Some(s) => Layout::from_config(s).map_err(|errs| {
            errs.into_iter()
                .map(|(k, m)| format!("source {:?} {k}: {m}", s.id))
                .collect::<Vec<_>>()
                .join("; ")
        })?,
        None => Layout::untyped(match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "json" | "ndjson") => FileFormat::Jsonl,
            _ => FileFormat::Csv,
        }),
    };
    let file = std::fs::File::open(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    let mut reader = RowReader::new(std::io::BufReader::new(file), Arc::new(layout));
    let source: Arc<str> = Arc::from(label);
    let mut out = Sample {
        records: Vec::new(),
        bad: Vec::new(),
    };
    while out.records.len() < limit {
        match reader.next_row().map_err(|e| format!("{name}: {e}"))? {
            None => break,
            Some(Row::Good { ts_ms, fields, .. }) => out.records.push(Record::new(
                source.clone(),
                ts_ms.unwrap_or_else(crate::timefmt::now_ms),
                out.records.len() as u64 + 1,
                fields,
            )),
            Some(Row::Bad { line, reason }) => out.bad.push(format!("{name}:{line}: {reason}")),
        }
    }
    if out.records.is_empty() && out.bad.is_empty() {
        return Err(format!(
            "{name}: no records (an empty file, or a header only)"
        ));
    }
    Ok(out)
}

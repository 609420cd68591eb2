//! Sample files for `shuyuan policy preview`: CSV with a header row (UTF-8, with or without a
//! BOM, or GBK/GB18030 as business systems export it) and JSON Lines (flat objects, or records
//! in the gateway's own `{"fields": {...}}` layout), read into [`Record`]s.

use std::path::Path;
use std::sync::Arc;

use super::{Field, Record, Value};

/// Reads at most `limit` records from a sample file.
pub fn read(path: &Path, source: &str, limit: usize) -> Result<Vec<Record>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let text = decode(&bytes);
    let name = path.display().to_string();
    let is_jsonl = matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("jsonl" | "json" | "ndjson")
    );
    let source: Arc<str> = Arc::from(source);
    let mut out = Vec::new();
    if is_jsonl {
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .take(limit)
        {
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| format!("{name}:{}: not JSON: {e}", i + 1))?;
            let obj = v
                .get("fields")
                .unwrap_or(&v)
                .as_object()
                .ok_or_else(|| format!("{name}:{}: not a JSON object", i + 1))?;
            let fields = obj
                .iter()
                .filter_map(|(k, v)| {
                    json_value(v).map(|value| Field {
                        name: Arc::from(k.as_str()),
                        value,
                    })
                })
                .collect();
            out.push(Record {
                source: source.clone(),
                ts_ms: crate::timefmt::now_ms(),
                seq: i as u64 + 1,
                fields,
            });
        }
        return Ok(out);
    }
    let mut rows = csv_rows(&text);
    let header = rows
        .next()
        .ok_or_else(|| format!("{name}: empty file (a header row is needed)"))?;
    let names: Vec<Arc<str>> = header.iter().map(|h| Arc::from(h.trim())).collect();
    for (i, row) in rows.enumerate().take(limit) {
        if row.len() != names.len() {
            return Err(format!(
                "{name}:{}: {} columns, the header has {}",
                i + 2,
                row.len(),
                names.len()
            ));
        }
        let fields = names
            .iter()
            .zip(row)
            .map(|(n, v)| Field {
                name: n.clone(),
                value: Value::Text(Arc::from(v)),
            })
            .collect();
        out.push(Record {
            source: source.clone(),
            ts_ms: crate::timefmt::now_ms(),
            seq: i as u64 + 1,
            fields,
        });
    }
    Ok(out)
}

fn json_value(v: &serde_json::Value) -> Option<Value> {
    Some(match v {
        serde_json::Value::Bool(b) => Value::Bool(*b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::Int(i),
            (_, Some(u), _) => Value::UInt(u),
            (_, _, Some(f)) => Value::Float(f),
            _ => return None,
        },
        serde_json::Value::String(s) => Value::Text(Arc::from(s.as_str())),
        serde_json::Value::Null => return None,
        other => Value::Text(Arc::from(other.to_string())),
    })
}

/// UTF-8 (BOM stripped) when valid, else GB18030 (a superset of GBK).
pub fn decode(bytes: &[u8]) -> String {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    match std::str::from_utf8(bytes) {
        Ok(s) => s.to_owned(),
        Err(_) => encoding_rs::GB18030.decode(bytes).0.into_owned(),
    }
}

/// RFC 4180 rows: comma-separated, fields in double quotes may hold commas, newlines and
/// doubled quotes.
pub fn csv_rows(text: &str) -> impl Iterator<Item = Vec<String>> + '_ {
    let mut chars = text.chars().peekable();
    std::iter::from_fn(move || {
        chars.peek()?;
        let mut row = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        while let Some(c) = chars.next() {
            match (quoted, c) {
                (true, '"') if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                (true, '"') => quoted = false,
                (true, c) => field.push(c),
                (false, '"') if field.is_empty() => quoted = true,
                (false, ',') => row.push(std::mem::take(&mut field)),
                (false, '\r') => {}
                (false, '\n') => break,
                (false, c) => field.push(c),
            }
        }
        row.push(field);
        Some(row)
    })
    .filter(|r| !(r.len() == 1 && r[0].is_empty()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_quotes_commas_and_newlines() {
        let rows: Vec<_> =
            csv_rows("a,b,c\r\n1,\"x, \"\"y\"\"\",\"line\nbreak\"\n\n2,,z\n").collect();
        assert_eq!(
            rows,
            vec![
                vec!["a", "b", "c"],
                vec!["1", "x, \"y\"", "line\nbreak"],
                vec!["2", "", "z"]
            ]
        );
    }

    #[test]
    fn gbk_and_bom_decode() {
        let (gbk, _, _) = encoding_rs::GBK.encode("姓名,地址\n张三,天津市和平区\n");
        assert_eq!(decode(&gbk), "姓名,地址\n张三,天津市和平区\n");
        assert_eq!(decode(b"\xEF\xBB\xBFa,b"), "a,b");
    }
}

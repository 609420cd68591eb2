//! Reading an export file as rows, streaming: physical lines are read as bytes (bounded),
//! decoded (UTF-8, GBK or GB18030, BOM removed), split as CSV or parsed as JSON Lines, and
//! mapped through the configured columns into typed [`Field`]s.
//!
//! Splitting raw bytes on `\n` is safe in all three encodings: GBK and GB18030 never use a
//! byte below 0x30 inside a multi-byte character, so `\n`, `,` and `"` only ever mean
//! themselves.
//!
//! A row that cannot be read is a [`Row::Bad`] with its line number and a reason that names
//! the column and what was expected, never the cell's content (it may be personal data).

use std::io::BufRead;
use std::sync::Arc;

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone};

use crate::collect::{Field, Value};
use crate::config::{ColumnConfig, ColumnType, FileFormat, SourceConfig, TextEncoding};

/// A physical line (or a quoted CSV record over several lines) longer than this is bad.
pub const MAX_RECORD: usize = 1 << 20;

/// Timestamp layouts tried when a column names no format.
const TIME_LAYOUTS: &[&str] = &[
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y/%m/%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y%m%d%H%M%S",
    "%Y-%m-%d %H:%M",
    "%Y/%m/%d %H:%M",
];
const DATE_LAYOUTS: &[&str] = &["%Y-%m-%d", "%Y/%m/%d", "%Y%m%d"];

/// How a source's files are laid out: built once from its config.
#[derive(Debug, Clone)]
pub struct Layout {
    pub format: FileFormat,
    pub encoding: TextEncoding,
    pub delimiter: char,
    pub columns: Vec<Column>,
    /// Index into `columns` of the record time.
    pub time_column: Option<usize>,
    pub tz: FixedOffset,
    /// Fixed fields added to every record.
    pub tags: Vec<Field>,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: Arc<str>,
    pub header: String,
    pub kind: ColumnType,
    pub format: Option<String>,
    pub required: bool,
}

/// UTC+8, the default for timestamps without an offset.
fn china_time() -> FixedOffset {
    FixedOffset::east_opt(8 * 3600).expect("+08:00 is a valid offset")
}

/// `"+08:00"`, `"-05:30"`, `"Z"`, `"UTC"`.
pub fn parse_offset(s: &str) -> Result<FixedOffset, String> {
    let bad = || format!("tz {s:?} must be a UTC offset such as \"+08:00\"");
    if s.eq_ignore_ascii_case("z") || s.eq_ignore_ascii_case("utc") {
        return FixedOffset::east_opt(0).ok_or_else(bad);
    }
    let (sign, rest) = match s.as_bytes().first() {
        Some(b'+') => (1, &s[1..]),
        Some(b'-') => (-1, &s[1..]),
        _ => return Err(bad()),
    };
    let (h, m) = rest.split_once(':').unwrap_or((rest, "0"));
    let (h, m): (i32, i32) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 14 || m > 59 {
        return Err(bad());
    }
    FixedOffset::east_opt(sign * (h * 3600 + m * 60)).ok_or_else(bad)
}

impl Layout {
    /// The layout of a `file` source; the messages say which key is wrong.
    pub fn from_config(s: &SourceConfig) -> Result<Self, Vec<(&'static str, String)>> {
        let mut errs = Vec::new();
        let tz = match parse_offset(s.tz.as_deref().unwrap_or("+08:00")) {
            Ok(tz) => tz,
            Err(m) => {
                errs.push(("tz", m));
                china_time()
            }
        };
        let delimiter = s.delimiter.unwrap_or(',');
        if matches!(delimiter, '"' | '\n' | '\r') || (delimiter as u32) >= 0x80 {
            errs.push((
                "delimiter",
                format!("delimiter {delimiter:?} cannot separate fields: use an ASCII character such as \",\", \";\", \"|\" or \"\\t\""),
            ));
        }
        let columns: Vec<Column> = s.columns.iter().map(Column::from_config).collect();
        let mut seen = std::collections::BTreeSet::new();
        for c in &columns {
            if !seen.insert(c.name.clone()) {
                errs.push((
                    "columns",
                    format!("column name {:?} is listed twice", c.name),
                ));
            }
            if c.format.is_some() && c.kind != ColumnType::Timestamp {
                errs.push((
                    "columns",
                    format!(
                        "column {:?}: format applies to type = \"timestamp\" only",
                        c.name
                    ),
                ));
            }
        }
        let time_column = match &s.time_column {
            None => None,
            Some(t) => match columns.iter().position(|c| &*c.name == t.as_str()) {
                Some(i) if columns[i].kind == ColumnType::Timestamp => Some(i),
                Some(_) => {
                    errs.push((
                        "time_column",
                        format!("time_column {t:?} must be a column of type = \"timestamp\""),
                    ));
                    None
                }
                None => {
                    errs.push((
                        "time_column",
                        format!("time_column {t:?} is not one of the listed columns"),
                    ));
                    None
                }
            },
        };
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Self {
            format: s.format.unwrap_or(FileFormat::Csv),
            encoding: s.encoding,
            delimiter,
            columns,
            time_column,
            tz,
            tags: crate::collect::tag_fields(&s.tags),
        })
    }

    /// Every column as text, in the order of the file (for previews of a sample file).
    pub fn untyped(format: FileFormat) -> Self {
        Self {
            format,
            encoding: TextEncoding::Auto,
            delimiter: ',',
            columns: Vec::new(),
            time_column: None,
            tz: china_time(),
            tags: Vec::new(),
        }
    }
}

impl Column {
    fn from_config(c: &ColumnConfig) -> Self {
        Self {
            name: Arc::from(c.name.as_str()),
            header: c.header.clone().unwrap_or_else(|| c.name.clone()),
            kind: c.column_type,
            format: c.format.clone(),
            required: c.required,
        }
    }

    /// The cell as a typed value; the error names the column and the expectation only.
    fn convert(&self, cell: &str, tz: FixedOffset) -> Result<Option<(Value, Option<i64>)>, String> {
        let t = cell.trim();
        if t.is_empty() {
            if self.required {
                return Err(format!("column {:?} is empty but required", self.name));
            }
            return Ok(None);
        }
        let bad = |what: &str| format!("column {:?}: not {what}", self.name);
        Ok(Some(match self.kind {
            ColumnType::String => (Value::Text(Arc::from(t)), None),
            ColumnType::Integer => {
                let digits = strip_grouping(t);
                let v = digits
                    .strip_prefix('+')
                    .unwrap_or(&digits)
                    .parse::<i64>()
                    .map_err(|_| bad("an integer"))?;
                (Value::Int(v), None)
            }
            ColumnType::Decimal => (
                Value::Decimal(Arc::from(
                    canonical_decimal(t).ok_or_else(|| bad("a decimal number"))?,
                )),
                None,
            ),
            ColumnType::Bool => (
                Value::Bool(parse_bool(t).ok_or_else(|| bad("true/false, 1/0, yes/no or 是/否"))?),
                None,
            ),
            ColumnType::Timestamp => {
                let dt = parse_time(t, self.format.as_deref(), tz).ok_or_else(|| {
                    match &self.format {
                        Some(f) => bad(&format!("a timestamp in the format {f:?}")),
                        None => bad(
                            "a timestamp (e.g. 2024-03-01 08:30:00; set format for other layouts)",
                        ),
                    }
                })?;
                (
                    Value::Text(Arc::from(
                        dt.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
                    )),
                    Some(dt.timestamp_millis()),
                )
            }
        }))
    }
}

/// "1,234.50" → "1234.50" (grouping commas, as spreadsheets export them).
fn strip_grouping(t: &str) -> std::borrow::Cow<'_, str> {
    if t.contains(',') {
        std::borrow::Cow::Owned(t.replace(',', ""))
    } else {
        std::borrow::Cow::Borrowed(t)
    }
}

/// A decimal as a JSON number literal: sign, no leading zeros, digits kept exactly.
pub fn canonical_decimal(t: &str) -> Option<String> {
    let s = strip_grouping(t);
    let (neg, body) = match s.as_bytes().first()? {
        b'-' => (true, &s[1..]),
        b'+' => (false, &s[1..]),
        _ => (false, &s[..]),
    };
    let (int, frac) = body.split_once('.').unwrap_or((body, ""));
    if (int.is_empty() && frac.is_empty())
        || !int.bytes().all(|b| b.is_ascii_digit())
        || !frac.bytes().all(|b| b.is_ascii_digit())
        || int.len() + frac.len() > 40
    {
        return None;
    }
    let int = int.trim_start_matches('0');
    let mut out = String::with_capacity(body.len() + 2);
    if neg {
        out.push('-');
    }
    out.push_str(if int.is_empty() { "0" } else { int });
    if !frac.is_empty() {
        out.push('.');
        out.push_str(frac);
    }
    Some(out)
}

fn parse_bool(t: &str) -> Option<bool> {
    match t.to_ascii_lowercase().as_str() {
        "true" | "t" | "1" | "yes" | "y" | "是" => Some(true),
        "false" | "f" | "0" | "no" | "n" | "否" => Some(false),
        _ => None,
    }
}

fn parse_time(t: &str, format: Option<&str>, tz: FixedOffset) -> Option<DateTime<FixedOffset>> {
    let local = |n: NaiveDateTime| tz.from_local_datetime(&n).single();
    if let Some(f) = format {
        if let Ok(d) = DateTime::parse_from_str(t, f) {
            return Some(d);
        }
        if let Ok(n) = NaiveDateTime::parse_from_str(t, f) {
            return local(n);
        }
        return NaiveDate::parse_from_str(t, f)
            .ok()
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .and_then(local);
    }
    if let Ok(d) = DateTime::parse_from_rfc3339(t) {
        return Some(d);
    }
    for f in TIME_LAYOUTS {
        if let Ok(n) = NaiveDateTime::parse_from_str(t, f) {
            return local(n);
        }
    }
    DATE_LAYOUTS
        .iter()
        .find_map(|f| NaiveDate::parse_from_str(t, f).ok())
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .and_then(local)
}

/// One row of a file.
#[derive(Debug, Clone, PartialEq)]
pub enum Row {
    Good {
        /// The physical line the row starts on (1-based, the header is line 1).
        line: u64,
        /// From `time_column`, when set.
        ts_ms: Option<i64>,
        fields: Vec<Field>,
    },
    Bad {
        line: u64,
        reason: String,
    },
}

/// The file cannot be read at all (as opposed to one bad row).
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("header: {0}")]
    Header(String),
}

/// A streaming reader of [`Row`]s; memory is bounded by [`MAX_RECORD`] whatever the size of
/// the file.
pub struct RowReader<R> {
    input: R,
    layout: Arc<Layout>,
    /// Physical lines consumed.
    line: u64,
    /// Decided encoding (auto: by the BOM or the first line that is not ASCII).
    encoding: Option<&'static encoding_rs::Encoding>,
    raw: Vec<u8>,
    record: String,
    cells: Vec<String>,
    /// CSV: the header's names, and for each header position the configured column.
    header: Option<Vec<(Arc<str>, Option<usize>)>>,
}

impl<R: BufRead> RowReader<R> {
    pub fn new(input: R, layout: Arc<Layout>) -> Self {
        let encoding = match layout.encoding {
            TextEncoding::Auto => None,
            TextEncoding::Utf8 => Some(encoding_rs::UTF_8),
            // encoding_rs decodes GBK as GB18030, its superset.
            TextEncoding::Gbk | TextEncoding::Gb18030 => Some(encoding_rs::GB18030),
        };
        Self {
            input,
            layout,
            line: 0,
            encoding,
            raw: Vec::new(),
            record: String::new(),
            cells: Vec::new(),
            header: None,
        }
    }

    /// The next row, `Ok(None)` at the end of the file.
    pub fn next_row(&mut self) -> Result<Option<Row>, FileError> {
        loop {
            let start = self.line + 1;
            self.record.clear();
            // Gather one record: one line, or more while a quoted CSV field is open.
            let mut bad: Option<String> = None;
            let mut first = true;
            loop {
                match self.read_line()? {
                    LineRead::Eof if first => return Ok(None),
                    LineRead::Eof => {
                        bad.get_or_insert_with(|| {
                            "a quoted field is not closed before the end of the file".into()
                        });
                        break;
                    }
                    LineRead::TooLong => {
                        bad = Some(format!("longer than {} KiB", MAX_RECORD >> 10));
                    }
                    LineRead::Line => {
                        if bad.is_none() {
                            if !first {
                                self.record.push('\n');
                            }
                            if let Err(m) = self.decode_line(start == 1 && first) {
                                bad = Some(m);
                            }
                        }
                    }
                }
                first = false;
                if bad.is_some() || self.layout.format == FileFormat::Jsonl {
                    break;
                }
                if self.record.len() > MAX_RECORD {
                    bad = Some(format!(
                        "a quoted field runs past {} KiB (an unbalanced quote?)",
                        MAX_RECORD >> 10
                    ));
                    break;
                }
                if split_csv(&self.record, self.layout.delimiter, &mut self.cells) {
                    break;
                }
            }
            if let Some(reason) = bad {
                if self.header.is_none() && self.layout.format == FileFormat::Csv {
                    return Err(FileError::Header(format!("line {start}: {reason}")));
                }
                return Ok(Some(Row::Bad {
                    line: start,
                    reason,
                }));
            }
            if self.record.trim().is_empty() {
                continue;
            }
            return Ok(Some(match self.layout.format {
                FileFormat::Jsonl => self.json_row(start),
                FileFormat::Csv => {
                    if self.header.is_none() {
                        self.read_header()?;
                        continue;
                    }
                    self.csv_row(start)
                }
            }));
        }
    }

    fn read_line(&mut self) -> Result<LineRead, std::io::Error> {
        self.raw.clear();
        let n = std::io::Read::take(&mut self.input, MAX_RECORD as u64 + 1)
            .read_until(b'\n', &mut self.raw)?;
        if n == 0 {
            return Ok(LineRead::Eof);
        }
        self.line += 1;
        if self.raw.len() > MAX_RECORD && self.raw.last() != Some(&b'\n') {
            // Skip the rest of the line without holding it.
            loop {
                self.raw.clear();
                let n = std::io::Read::take(&mut self.input, 64 << 10)
                    .read_until(b'\n', &mut self.raw)?;
                if n == 0 || self.raw.last() == Some(&b'\n') {
                    break;
                }
            }
            return Ok(LineRead::TooLong);
        }
        while matches!(self.raw.last(), Some(b'\n' | b'\r')) {
            self.raw.pop();
        }
        Ok(LineRead::Line)
    }

    /// Appends the line in `raw`, decoded, to `record`.
    fn decode_line(&mut self, first_line: bool) -> Result<(), String> {
        let mut bytes = &self.raw[..];
        if first_line {
            if let Some(rest) = bytes.strip_prefix(b"\xEF\xBB\xBF") {
                bytes = rest;
                self.encoding.get_or_insert(encoding_rs::UTF_8);
            } else if let Some(rest) = bytes.strip_prefix(b"\x84\x31\x95\x33") {
                bytes = rest;
                self.encoding.get_or_insert(encoding_rs::GB18030);
            }
        }
        if bytes.is_ascii() {
            // ASCII is the same in all three.
            self.record
                .push_str(std::str::from_utf8(bytes).map_err(|_| "not text".to_string())?);
            return Ok(());
        }
        let enc = *self.encoding.get_or_insert_with(|| {
            if std::str::from_utf8(bytes).is_ok() {
                encoding_rs::UTF_8
            } else {
                encoding_rs::GB18030
            }
        });
        match enc.decode_without_bom_handling_and_without_replacement(bytes) {
            Some(text) => {
                self.record.push_str(&text);
                Ok(())
            }
            None => Err(format!("not valid {} text", enc.name())),
        }
    }

    fn read_header(&mut self) -> Result<(), FileError> {
        let mut names: Vec<(Arc<str>, Option<usize>)> = Vec::with_capacity(self.cells.len());
        for cell in &self.cells {
            let h = cell.trim();
            let col = self.layout.columns.iter().position(|c| c.header == h);
            let name: Arc<str> = match col {
                Some(i) => self.layout.columns[i].name.clone(),
                None => Arc::from(h),
            };
            if names.iter().any(|(n, _)| *n == name) {
                return Err(FileError::Header(format!(
                    "the column {h:?} appears twice in the header"
                )));
            }
            names.push((name, col));
        }
        let missing: Vec<&str> = self
            .layout
            .columns
            .iter()
            .enumerate()
            .filter(|(i, _)| !names.iter().any(|(_, c)| *c == Some(*i)))
            .map(|(_, c)| c.header.as_str())
            .collect();
        if !missing.is_empty() {
            let have: Vec<&str> = self.cells.iter().map(|c| c.trim()).collect();
            return Err(FileError::Header(format!(
                "no column {missing:?} in the header; the header has {have:?}"
            )));
        }
        self.header = Some(names);
        Ok(())
    }

    fn csv_row(&mut self, line: u64) -> Row {
        let Some(header) = &self.header else {
            return Row::Bad {
                line,
                reason: "no header".into(),
            };
        };
        if self.cells.len() != header.len() {
            return Row::Bad {
                line,
                reason: format!(
                    "{} fields, the header has {} (a delimiter or quote in a value?)",
                    self.cells.len(),
                    header.len()
                ),
            };
        }
        let mut fields = Vec::with_capacity(header.len() + self.layout.tags.len());
        let mut ts_ms = None;
        for ((name, col), cell) in header.iter().zip(&self.cells) {
            match col {
                None => {
                    let t = cell.trim();
                    if !t.is_empty() {
                        fields.push(Field {
                            name: name.clone(),
                            value: Value::Text(Arc::from(t)),
                        });
                    }
                }
                Some(i) => match self.typed(*i, cell, &mut ts_ms, &mut fields) {
                    Ok(()) => {}
                    Err(reason) => return Row::Bad { line, reason },
                },
            }
        }
        self.finish(line, ts_ms, fields)
    }

    fn typed(
        &self,
        i: usize,
        cell: &str,
        ts_ms: &mut Option<i64>,
        fields: &mut Vec<Field>,
    ) -> Result<(), String> {
        let col = &self.layout.columns[i];
        if let Some((value, ts)) = col.convert(cell, self.layout.tz)? {
            if self.layout.time_column == Some(i) {
                *ts_ms = ts;
            }
            fields.push(Field {
                name: col.name.clone(),
                value,
            });
        }
        Ok(())
    }

    fn finish(&self, line: u64, ts_ms: Option<i64>, mut fields: Vec<Field>) -> Row {
        if let Some(i) = self.layout.time_column {
            if ts_ms.is_none() {
                return Row::Bad {
                    line,
                    reason: format!("the time column {:?} is empty", self.layout.columns[i].name),
                };
            }
        }
        fields.extend(self.layout.tags.iter().cloned());
        Row::Good {
            line,
            ts_ms,
            fields,
        }
    }

    fn json_row(&self, line: u64) -> Row {
        let bad = |reason: String| Row::Bad { line, reason };
        let v: serde_json::Value = match serde_json::from_str(&self.record) {
            Ok(v) => v,
            // serde_json's message names a position and a kind, not the content.
            Err(e) => return bad(format!("not JSON ({})", e.classify_name())),
        };
        let obj = match v.get("fields").filter(|f| f.is_object()).unwrap_or(&v) {
            serde_json::Value::Object(o) => o,
            _ => return bad("not a JSON object".into()),
        };
        let mut fields = Vec::with_capacity(obj.len() + self.layout.tags.len());
        let mut ts_ms = None;
        for (i, col) in self.layout.columns.iter().enumerate() {
            match obj.get(&col.header) {
                None | Some(serde_json::Value::Null) if col.required => {
                    return bad(format!("column {:?} is missing but required", col.name))
                }
                None | Some(serde_json::Value::Null) => {}
                Some(serde_json::Value::String(s)) => {
                    if let Err(reason) = self.typed(i, s, &mut ts_ms, &mut fields) {
                        return bad(reason);
                    }
                }
                Some(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => {
                    if let Err(reason) = self.typed(i, &v.to_string(), &mut ts_ms, &mut fields) {
                        return bad(reason);
                    }
                }
                Some(_) => {
                    return bad(format!(
                        "column {:?}: an object or array where a value was expected",
                        col.name
                    ))
                }
            }
        }
        for (k, v) in obj {
            if self.layout.columns.iter().any(|c| c.header == *k) {
                continue;
            }
            if let Some(value) = json_value(v) {
                fields.push(Field {
                    name: Arc::from(k.as_str()),
                    value,
                });
            }
        }
        self.finish(line, ts_ms, fields)
    }
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "unexpected data",
            serde_json::error::Category::Eof => "ends early",
        }
    }
}

enum LineRead {
    Line,
    TooLong,
    Eof,
}

/// An untyped JSON value as a field value (null: no field).
pub fn json_value(v: &serde_json::Value) -> Option<Value> {
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

/// Splits one CSV record (RFC 4180: fields in double quotes may hold the delimiter, line
/// breaks and doubled quotes) into `out`. Returns false when a quoted field is still open at
/// the end, that is, the record continues on the next line.
pub fn split_csv(s: &str, delim: char, out: &mut Vec<String>) -> bool {
    out.clear();
    let mut field = String::new();
    let mut quoted = false;
    let mut was_quoted = false;
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if quoted {
            if c == '"' {
                if chars.peek() == Some(&'"') {
                    chars.next();
                    field.push('"');
                } else {
                    quoted = false;
                }
            } else {
                field.push(c);
            }
        } else if c == delim {
            out.push(std::mem::take(&mut field));
            was_quoted = false;
        } else if c == '"' && field.trim().is_empty() && !was_quoted {
            // Spaces before an opening quote are padding.
            field.clear();
            quoted = true;
            was_quoted = true;
        } else {
            field.push(c);
        }
    }
    out.push(field);
    !quoted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(columns: Vec<Column>, format: FileFormat) -> Arc<Layout> {
        let mut l = Layout::untyped(format);
        l.columns = columns;
        Arc::new(l)
    }

    fn col(name: &str, header: &str, kind: ColumnType) -> Column {
        Column {
            name: Arc::from(name),
            header: header.into(),
            kind,
            format: None,
            required: false,
        }
    }

    fn rows(bytes: &[u8], l: Arc<Layout>) -> Result<Vec<Row>, FileError> {
        let mut r = RowReader::new(bytes, l);
        let mut out = Vec::new();
        while let Some(row) = r.next_row()? {
            out.push(row);
        }
        Ok(out)
    }

    fn field<'a>(row: &'a Row, name: &str) -> Option<&'a Value> {
        match row {
            Row::Good { fields, .. } => fields.iter().find(|f| &*f.name == name).map(|f| &f.value),
            Row::Bad { .. } => None,
        }
    }

    #[test]
    fn csv_quotes_commas_newlines_and_blank_lines() {
        let mut cells = Vec::new();
        assert!(split_csv("1,\"x, \"\"y\"\"\",z", ',', &mut cells));
        assert_eq!(cells, vec!["1", "x, \"y\"", "z"]);
        assert!(!split_csv("1,\"open", ',', &mut cells));
        assert!(split_csv("a\tb", '\t', &mut cells));
        assert_eq!(cells, vec!["a", "b"]);

        let got = rows(
            b"id,note\r\n1,\"line\nbreak\"\r\n\r\n2,plain\n",
            layout(vec![], FileFormat::Csv),
        )
        .unwrap();
        assert_eq!(got.len(), 2);
        assert!(matches!(got[0], Row::Good { line: 2, .. }));
        assert_eq!(
            field(&got[0], "note"),
            Some(&Value::Text(Arc::from("line\nbreak")))
        );
        assert!(matches!(got[1], Row::Good { line: 5, .. }));
    }

    #[test]
    fn gbk_gb18030_and_boms_decode() {
        let text = "用户编号,姓名,地址\n1001,张三,天津市和平区\n";
        let (gbk, _, _) = encoding_rs::GBK.encode(text);
        let l = layout(
            vec![col("customer", "用户编号", ColumnType::Integer)],
            FileFormat::Csv,
        );
        for bytes in [
            gbk.to_vec(),
            [b"\x84\x31\x95\x33".as_slice(), &gbk].concat(),
            [b"\xEF\xBB\xBF".as_slice(), text.as_bytes()].concat(),
            text.as_bytes().to_vec(),
        ] {
            let got = rows(&bytes, l.clone()).unwrap();
            assert_eq!(field(&got[0], "customer"), Some(&Value::Int(1001)));
            assert_eq!(
                field(&got[0], "姓名"),
                Some(&Value::Text(Arc::from("张三")))
            );
        }
    }

    #[test]
    fn bad_rows_name_line_and_column_never_the_value() {
        let mut amount = col("amount", "amount", ColumnType::Decimal);
        amount.required = true;
        let l = layout(
            vec![amount, col("at", "at", ColumnType::Timestamp)],
            FileFormat::Csv,
        );
        let got = rows(
            b"amount,at,name\n12.50,2024-03-01 08:30:00,a\nSECRET99x,2024-03-01,b\n,2024-03-01,c\n1,2\n1,not-a-time,d\n",
            l,
        )
        .unwrap();
        assert_eq!(
            field(&got[0], "amount"),
            Some(&Value::Decimal(Arc::from("12.50")))
        );
        assert_eq!(
            field(&got[0], "at"),
            Some(&Value::Text(Arc::from("2024-03-01T08:30:00+08:00")))
        );
        let reasons: Vec<(u64, &str)> = got[1..]
            .iter()
            .map(|r| match r {
                Row::Bad { line, reason } => (*line, reason.as_str()),
                Row::Good { .. } => (0, ""),
            })
            .collect();
        assert_eq!(reasons[0], (3, "column \"amount\": not a decimal number"));
        assert_eq!(reasons[1], (4, "column \"amount\" is empty but required"));
        assert_eq!(reasons[2].0, 5);
        assert!(reasons[2].1.contains("2 fields, the header has 3"));
        assert_eq!(reasons[3].0, 6);
        assert!(reasons[3].1.starts_with("column \"at\": not a timestamp"));
        for (_, r) in reasons {
            assert!(!r.contains("SECRET") && !r.contains("not-a-time"), "{r}");
        }
    }

    #[test]
    fn invalid_bytes_and_overlong_lines_are_bad_rows_and_reading_goes_on() {
        let l = Arc::new(Layout {
            encoding: TextEncoding::Utf8,
            ..(*layout(vec![], FileFormat::Csv)).clone()
        });
        let mut bytes = b"a\nok\n\xff\xfe\n".to_vec();
        bytes.extend(std::iter::repeat_n(b'x', MAX_RECORD + 10));
        bytes.extend_from_slice(b"\nlast\n");
        let got = rows(&bytes, l).unwrap();
        assert_eq!(got.len(), 4);
        assert!(matches!(&got[1], Row::Bad { line: 3, reason } if reason.contains("UTF-8")));
        assert!(matches!(&got[2], Row::Bad { line: 4, reason } if reason.contains("longer")));
        assert_eq!(field(&got[3], "a"), Some(&Value::Text(Arc::from("last"))));
    }

    #[test]
    fn header_problems_stop_the_file_with_the_names() {
        let l = layout(
            vec![col("customer", "用户编号", ColumnType::String)],
            FileFormat::Csv,
        );
        match rows(b"id,name\n1,x\n", l) {
            Err(FileError::Header(m)) => {
                assert!(m.contains("用户编号") && m.contains("\"id\""), "{m}")
            }
            other => panic!("{other:?}"),
        }
        match rows(b"a,a\n", layout(vec![], FileFormat::Csv)) {
            Err(FileError::Header(m)) => assert!(m.contains("twice")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn jsonl_rows_are_typed_and_bad_lines_counted() {
        let mut at = col("at", "time", ColumnType::Timestamp);
        at.format = Some("%Y%m%d%H%M%S".into());
        let mut l = (*layout(
            vec![at, col("fare", "fare", ColumnType::Decimal)],
            FileFormat::Jsonl,
        ))
        .clone();
        l.time_column = Some(0);
        let got = rows(
            b"{\"time\":\"20240301083000\",\"fare\":2.00,\"card\":\"C1\"}\n[1]\n{bad\n{\"fare\":1}\n",
            Arc::new(l),
        )
        .unwrap();
        match &got[0] {
            Row::Good { ts_ms, .. } => assert_eq!(*ts_ms, Some(1_709_253_000_000)),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            field(&got[0], "fare"),
            Some(&Value::Decimal(Arc::from("2.0")))
        );
        assert_eq!(field(&got[0], "card"), Some(&Value::Text(Arc::from("C1"))));
        assert!(matches!(&got[1], Row::Bad { line: 2, reason } if reason == "not a JSON object"));
        assert!(matches!(&got[2], Row::Bad { line: 3, reason } if reason.starts_with("not JSON")));
        assert!(matches!(&got[3], Row::Bad { line: 4, reason } if reason.contains("time column")));
    }

    #[test]
    fn decimals_and_offsets() {
        for (i, o) in [
            ("1,234.50", Some("1234.50")),
            ("+007.5", Some("7.5")),
            ("-0.10", Some("-0.10")),
            (".5", Some("0.5")),
            ("1e5", None),
            ("", None),
            ("-", None),
            ("12a", None),
        ] {
            assert_eq!(canonical_decimal(i).as_deref(), o, "{i}");
        }
        assert_eq!(parse_offset("+08:00").unwrap().local_minus_utc(), 8 * 3600);
        assert_eq!(
            parse_offset("-05:30").unwrap().local_minus_utc(),
            -(5 * 3600 + 1800)
        );
        assert!(parse_offset("Asia/Shanghai").is_err());
    }
}

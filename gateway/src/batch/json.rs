//! JSON Lines encoding of records, written by hand rather than through serde: this is the
//! hottest loop of the gateway (every field of every record), and a direct writer is several
//! times faster. Non-finite floats, which JSON cannot carry, are written as null.

use crate::collect::{Record, Value};
use crate::timefmt::{rfc3339_ms_bytes, PAIRS, RFC3339_MS_LEN};

/// One record as a JSON line: `{"source":..,"ts":..,"seq":..,"fields":{..}}\n`.
pub fn encode_line(rec: &Record, out: &mut Vec<u8>) {
    let mut w = Slack::new(out);
    w.array(b"{\"source\":");
    w.str(&rec.source);
    w.array(b",\"ts\":\"");
    w.ts_seq(rec.ts_ms, rec.seq);
    w.byte(b'{');
    for (i, (name, value)) in rec.fields().enumerate() {
        if i > 0 {
            w.byte(b',');
        }
        w.str(name);
        w.byte(b':');
        w.value(value);
    }
    w.array(b"}}\n");
}

/// One value as JSON.
pub fn write_value(v: &Value, out: &mut Vec<u8>) {
    Slack::new(out).value(v);
}

/// `{"source":"<id>","ts":"`: the constant start of a source's lines.
pub(crate) fn line_prefix(source: &str) -> Padded {
    let mut v = b"{\"source\":".to_vec();
    Slack::new(&mut v).str(source);
    v.extend_from_slice(b",\"ts\":\"");
    Padded::new(v)
}

/// Constant text (a line's start, a key, a masked tag) kept with zeros after it up to a
/// multiple of 16 bytes, so that it is appended in whole 16-byte copies.
#[derive(Debug, Clone)]
pub(crate) struct Padded {
    chunks: Box<[[u8; 16]]>,
    len: usize,
}

impl Padded {
    pub(crate) fn new(text: Vec<u8>) -> Self {
        let chunks = text
            .chunks(16)
            .map(|c| {
                let mut a = [0u8; 16];
                a[..c.len()].copy_from_slice(c);
                a
            })
            .collect();
        Self {
            chunks,
            len: text.len(),
        }
    }
}

/// The `N` bytes of `buf` from `at`, as an array: copies between arrays have a size the
/// compiler knows, and become a few moves instead of a call to `memcpy`.
#[inline]
fn chunk_mut<const N: usize>(buf: &mut [u8], at: usize) -> &mut [u8; N] {
    let Some(c) = buf[at..].first_chunk_mut() else {
        unreachable!("the writer made room first")
    };
    c
}

/// Bytes that a number is copied in: the longest number written is 24 bytes (`ryu`'s, and
/// `-` with 20 digits).
const WINDOW: usize = 24;

/// What the writer adds when it runs short of room: more than a typical line, so that a line
/// costs one growth.
const GROW: usize = 512;

/// Appends to a `Vec<u8>` through zeroed room kept ahead of a cursor. Each piece (a number,
/// a key, a timestamp) goes in as a fixed-size copy and the cursor moves by its true length;
/// the bytes past the cursor are overwritten by the next piece and cut off when the writer
/// is dropped. In the size-optimised build the usual way, `extend_from_slice` per piece, is
/// a capacity check and a call to `memcpy` for every two-byte piece: most of the encoder's
/// instructions.
pub(crate) struct Slack<'a> {
    out: &'a mut Vec<u8>,
    at: usize,
}

impl Drop for Slack<'_> {
    fn drop(&mut self) {
        self.out.truncate(self.at);
    }
}

impl<'a> Slack<'a> {
    pub(crate) fn new(out: &'a mut Vec<u8>) -> Self {
        let at = out.len();
        Self { out, at }
    }

    /// Makes room for `n` bytes past the cursor.
    #[inline]
    fn room(&mut self, n: usize) {
        if self.at + n > self.out.len() {
            self.grow(n);
        }
    }

    #[cold]
    fn grow(&mut self, n: usize) {
        // Copied from zeros rather than `resize`d: `resize` fills byte by byte in the
        // size-optimised build, `extend_from_slice` is one `memcpy`.
        const ZEROS: [u8; GROW] = [0; GROW];
        while self.at + n > self.out.len() {
            self.out.extend_from_slice(&ZEROS);
        }
    }

    /// Appends bytes whose number is known at compile time (literals).
    #[inline]
    pub(crate) fn array<const N: usize>(&mut self, a: &[u8; N]) {
        self.room(N);
        *chunk_mut(self.out, self.at) = *a;
        self.at += N;
    }

    #[inline]
    pub(crate) fn byte(&mut self, b: u8) {
        self.room(1);
        self.out[self.at] = b;
        self.at += 1;
    }

    #[inline]
    pub(crate) fn slice(&mut self, s: &[u8]) {
        self.room(s.len());
        self.out[self.at..self.at + s.len()].copy_from_slice(s);
        self.at += s.len();
    }

    /// Appends padded text in 16-byte copies.
    #[inline]
    pub(crate) fn padded(&mut self, p: &Padded) {
        self.room(p.chunks.len() * 16);
        let mut at = self.at;
        for c in p.chunks.iter() {
            *chunk_mut(self.out, at) = *c;
            at += 16;
        }
        self.at += p.len;
    }

    /// Appends a key kept as `,"name":`, its first byte replaced by `sep` (`{` for the first
    /// field of a line, so that no separator needs a branch or an append of its own).
    #[inline]
    pub(crate) fn key(&mut self, k: &Padded, sep: u8) {
        let at = self.at;
        self.padded(k);
        self.out[at] = sep;
    }

    /// Appends `b[start..end]` (at most [`WINDOW`] bytes) in one copy of fixed size.
    #[inline]
    fn window<const N: usize>(&mut self, b: &[u8; N], start: usize, end: usize) {
        self.room(WINDOW);
        let Some(from) = b[start..].first_chunk::<WINDOW>() else {
            unreachable!("numbers start early enough in their array")
        };
        *chunk_mut(self.out, self.at) = *from;
        self.at += end - start;
    }

    /// From the timestamp to the name of the fields object: `2026-..Z","seq":7,"fields":`.
    pub(crate) fn ts_seq(&mut self, ts_ms: i64, seq: u64) {
        const SEQ: &[u8] = b"\",\"seq\":";
        let mut b = [0u8; RFC3339_MS_LEN + SEQ.len()];
        b[..RFC3339_MS_LEN].copy_from_slice(&rfc3339_ms_bytes(ts_ms));
        b[RFC3339_MS_LEN..].copy_from_slice(SEQ);
        self.array(&b);
        self.int(false, seq);
        self.array(b",\"fields\":");
    }

    /// An integer: its digits written backwards on the stack, then one copy.
    fn int(&mut self, negative: bool, magnitude: u64) {
        let mut b = [b'-'; 48];
        // Ending at 24, the digits start at 3 or later: the window fits in the array.
        let start = put_u64_back(&mut b, 24, magnitude) - usize::from(negative);
        self.window(&b, start, 24);
    }

    pub(crate) fn value(&mut self, v: &Value) {
        match v {
            Value::Bool(true) => self.array(b"true"),
            Value::Bool(false) => self.array(b"false"),
            Value::Int(v) => self.int(*v < 0, v.unsigned_abs()),
            Value::UInt(v) => self.int(false, *v),
            Value::Float(v) if v.is_finite() => self.f64(*v),
            Value::Float(_) => self.array(b"null"),
            Value::Decimal(d) => self.slice(d.as_bytes()),
            Value::Text(t) => self.str(t),
        }
    }

    /// A finite float in the fewest digits that read back as the same `f64`.
    ///
    /// Readings are mostly short decimals (`123.456`, scaled registers): those take an
    /// integer path that is several times cheaper than the general shortest-digits algorithm
    /// (`ryu`), which handles the rest. Why the fast path is exact: for |v| < 1e8 the grid of
    /// millionths is coarser than the spacing of `f64`s there, so at most one six-decimal
    /// number rounds to `v`; if `m / 1e6` (correctly rounded) is `v`, that number is `m`
    /// millionths and printing it with its trailing zeros removed gives the shortest form,
    /// as `ryu` would.
    fn f64(&mut self, v: f64) {
        const SCALE: f64 = 1e6;
        if v != 0.0 && v.abs() < 1e8 {
            // |v * 1e6| < 1e14, so the cast is exact; rounding by hand avoids a libm call.
            let y = v * SCALE;
            let m = if y < 0.0 {
                (y - 0.5) as i64
            } else {
                (y + 0.5) as i64
            };
            if m as f64 / SCALE == v {
                let (int, frac) = (m / 1_000_000, (m % 1_000_000).unsigned_abs() as usize);
                // `-12345678.123456`: the point at 24, the six decimals after it in three
                // pairs, the integer digits backwards from the point, the sign before them.
                let (p1, p2, p3) = (frac / 10_000, frac / 100 % 100, frac % 100);
                let mut b = [b'-'; 48];
                b[24] = b'.';
                (b[25], b[26]) = (PAIRS[p1 * 2], PAIRS[p1 * 2 + 1]);
                (b[27], b[28]) = (PAIRS[p2 * 2], PAIRS[p2 * 2 + 1]);
                (b[29], b[30]) = (PAIRS[p3 * 2], PAIRS[p3 * 2 + 1]);
                let start = put_u64_back(&mut b, 24, int.unsigned_abs()) - usize::from(m < 0);
                // Trailing zeros go, but one decimal always stays (`5.0`).
                let zeros = match (p1, p2, p3) {
                    (_, _, 1..) => usize::from(p3 % 10 == 0),
                    (_, 1.., 0) => 2 + usize::from(p2 % 10 == 0),
                    (1.., 0, 0) => 4 + usize::from(p1 % 10 == 0),
                    (0, 0, 0) => 5,
                };
                self.window(&b, start, 31 - zeros);
                return;
            }
        }
        self.slice(ryu::Buffer::new().format_finite(v).as_bytes());
    }

    /// A JSON string literal, escaping what RFC 8259 requires (quote, backslash, controls).
    pub(crate) fn str(&mut self, s: &str) {
        let bytes = s.as_bytes();
        // Nearly every name and value needs no escaping: check in one pass, copy in one go.
        if bytes.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\') {
            self.room(bytes.len() + 2);
            self.out[self.at] = b'"';
            self.out[self.at + 1..self.at + 1 + bytes.len()].copy_from_slice(bytes);
            self.out[self.at + 1 + bytes.len()] = b'"';
            self.at += bytes.len() + 2;
            return;
        }
        self.byte(b'"');
        let mut start = 0;
        for (i, &b) in bytes.iter().enumerate() {
            let esc: &[u8] = match b {
                b'"' => b"\\\"",
                b'\\' => b"\\\\",
                b'\n' => b"\\n",
                b'\r' => b"\\r",
                b'\t' => b"\\t",
                0..=0x1f => b"",
                _ => continue,
            };
            self.slice(&bytes[start..i]);
            if esc.is_empty() {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                self.slice(b"\\u00");
                self.byte(HEX[usize::from(b >> 4)]);
                self.byte(HEX[usize::from(b & 15)]);
            } else {
                self.slice(esc);
            }
            start = i + 1;
        }
        self.slice(&bytes[start..]);
        self.byte(b'"');
    }
}

/// Writes `v` in decimal so that it ends at `b[end]` (exclusive), two digits at a time;
/// returns where it starts.
fn put_u64_back(b: &mut [u8], mut end: usize, mut v: u64) -> usize {
    while v >= 100 {
        let p = (v % 100) as usize * 2;
        v /= 100;
        (b[end - 2], b[end - 1]) = (PAIRS[p], PAIRS[p + 1]);
        end -= 2;
    }
    if v >= 10 {
        let p = v as usize * 2;
        (b[end - 2], b[end - 1]) = (PAIRS[p], PAIRS[p + 1]);
        end - 2
    } else {
        b[end - 1] = b'0' + v as u8;
        end - 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(v: f64) -> String {
        let mut out = Vec::new();
        write_value(&Value::Float(v), &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn long_escaped_text_after_earlier_lines_and_an_empty_record() {
        use crate::collect::Field;
        use std::sync::Arc;
        // Longer than one growth of the writer, with every kind of escape.
        let long: String = (0..3000)
            .map(|i| ['"', '\\', '\u{1}', '张', '\n', 'a', 'b'][i % 7])
            .collect();
        let mut r = Record::new(
            Arc::from("s\"x"),
            0,
            1,
            vec![Field {
                name: Arc::from("t"),
                value: Value::Text(Arc::from(long.as_str())),
            }],
        );
        let mut out = b"earlier\n".to_vec();
        encode_line(&r, &mut out);
        assert!(out.starts_with(b"earlier\n"));
        assert!(out.ends_with(b"}}\n"));
        let v: serde_json::Value = serde_json::from_slice(&out[8..]).unwrap();
        assert_eq!(v["fields"]["t"], long.as_str());
        assert_eq!(v["source"], "s\"x");
        (r.names, r.values) = (Arc::from([]), Vec::new());
        let mut empty = Vec::new();
        encode_line(&r, &mut empty);
        let v: serde_json::Value = serde_json::from_slice(&empty).unwrap();
        assert_eq!(v["fields"], serde_json::json!({}));
    }

    #[test]
    fn integers_and_the_line_head_match_the_standard_formatting() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut ints = vec![0, 1, -1, 9, 10, 99, 100, -100, i64::MIN, i64::MAX];
        let mut uints = vec![0, 9, 10, 99, 100, 101, 999, 1000, u64::MAX, 10u64.pow(19)];
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            uints.push(x >> (x % 64));
            ints.push((x >> (x % 64)) as i64 * if x % 3 == 0 { -1 } else { 1 });
        }
        let text = |v: &Value| {
            let mut out = Vec::new();
            write_value(v, &mut out);
            String::from_utf8(out).unwrap()
        };
        for v in ints {
            assert_eq!(text(&Value::Int(v)), v.to_string());
        }
        for (i, v) in uints.into_iter().enumerate() {
            assert_eq!(text(&Value::UInt(v)), v.to_string());
            let ts = 1_795_568_400_123 + v as i64 % 86_400_000;
            let mut head = Vec::new();
            Slack::new(&mut head).ts_seq(ts, v);
            assert_eq!(
                String::from_utf8(head).unwrap(),
                format!(
                    "{}\",\"seq\":{v},\"fields\":",
                    crate::timefmt::rfc3339_ms(ts)
                ),
                "{i}"
            );
        }
    }

    #[test]
    fn floats_read_back_exactly_in_the_same_digits_as_ryu() {
        let mut special = vec![
            0.0,
            -0.0,
            1.0,
            -1.0,
            0.5,
            1e-6,
            -1e-6,
            1.5e-6,
            1e-7,
            99_999_999.999_999,
            1e8,
            -1e8,
            123.456,
            -0.001,
            0.1 + 0.2,
            1e300,
            f64::MIN_POSITIVE,
            5e-324,
            2.0f64.powi(52),
            12_345_678.123_456,
            0.000_123,
            -987.65,
        ];
        // Sensor-like values at every scale, plus arbitrary bit patterns.
        let mut x = 0x2545_f491_4f6c_dd1du64;
        for i in 0..200_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let scale = 10f64.powi((i % 9) as i32 - 2);
            let decimals = 10f64.powi((i % 7) as i32);
            special.push(((x >> 11) as f64 / 2f64.powi(53) * 2e4 - 1e4) * scale);
            special.push(((x % 2_000_000_000) as f64 - 1e9).round() / decimals);
            special.push(f64::from_bits(x));
        }
        for v in special.into_iter().filter(|v| v.is_finite()) {
            let s = fast(v);
            let back: f64 = s.parse().unwrap();
            assert_eq!(back.to_bits(), v.to_bits(), "{v:?} written as {s}");
            let r = ryu::Buffer::new().format_finite(v).to_string();
            let parsed_r: f64 = r.parse().unwrap();
            assert_eq!(parsed_r.to_bits(), v.to_bits());
            // Same digits wherever ryu writes positional notation.
            if !r.contains('e') {
                assert_eq!(s, r, "{v:?}");
            }
            assert!(serde_json::from_str::<f64>(&s).is_ok(), "{s} is not JSON");
        }
    }
}

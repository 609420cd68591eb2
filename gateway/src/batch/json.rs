//! JSON Lines encoding of records, written by hand rather than through serde: this is the
//! hottest loop of the gateway (every field of every record), and a direct writer is several
//! times faster. Non-finite floats, which JSON cannot carry, are written as null.

use crate::collect::{Record, Value};
use crate::timefmt::{rfc3339_ms_bytes, PAIRS, RFC3339_MS_LEN};

/// One record as a JSON line: `{"source":..,"ts":..,"seq":..,"fields":{..}}\n`.
pub fn encode_line(rec: &Record, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"source\":");
    json_str(&rec.source, out);
    out.extend_from_slice(b",\"ts\":\"");
    write_ts_seq(rec.ts_ms, rec.seq, out);
    for (i, f) in rec.fields.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        json_str(&f.name, out);
        out.push(b':');
        write_value(&f.value, out);
    }
    out.extend_from_slice(b"}}\n");
}

/// `{"source":"<id>","ts":"`: the constant start of a source's lines.
pub fn line_prefix(source: &str) -> Vec<u8> {
    let mut v = b"{\"source\":".to_vec();
    json_str(source, &mut v);
    v.extend_from_slice(b",\"ts\":\"");
    v
}

/// From the timestamp to the opening of `fields`: `2026-..Z","seq":7,"fields":{`, put
/// together on the stack and appended at once.
pub fn write_ts_seq(ts_ms: i64, seq: u64, out: &mut Vec<u8>) {
    const SEQ: &[u8] = b"\",\"seq\":";
    const FIELDS: &[u8] = b",\"fields\":{";
    let mut b = [0u8; RFC3339_MS_LEN + SEQ.len() + 20 + FIELDS.len()];
    b[..RFC3339_MS_LEN].copy_from_slice(&rfc3339_ms_bytes(ts_ms));
    let mut at = RFC3339_MS_LEN;
    b[at..at + SEQ.len()].copy_from_slice(SEQ);
    at = put_u64(&mut b, at + SEQ.len(), seq);
    b[at..at + FIELDS.len()].copy_from_slice(FIELDS);
    out.extend_from_slice(&b[..at + FIELDS.len()]);
}

/// Writes `v` in decimal at `b[at..]`; returns the end. `b` must have room for the digits
/// (20 at most).
fn put_u64(b: &mut [u8], at: usize, v: u64) -> usize {
    let mut n = 1;
    let mut t = v;
    while t >= 10 {
        t /= 10;
        n += 1;
    }
    put_u64_back(b, at + n, v);
    at + n
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

/// An integer, its sign and digits put together on the stack and appended at once.
fn write_int(negative: bool, magnitude: u64, out: &mut Vec<u8>) {
    let mut b = [b'-'; 21];
    let start = put_u64_back(&mut b, 21, magnitude) - usize::from(negative);
    out.extend_from_slice(&b[start..]);
}

pub fn write_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(v) => write_int(*v < 0, v.unsigned_abs(), out),
        Value::UInt(v) => write_int(false, *v, out),
        Value::Float(v) if v.is_finite() => write_f64(*v, out),
        Value::Float(_) => out.extend_from_slice(b"null"),
        Value::Decimal(d) => out.extend_from_slice(d.as_bytes()),
        Value::Text(t) => json_str(t, out),
    }
}

/// A finite float in the fewest digits that read back as the same `f64`.
///
/// Readings are mostly short decimals (`123.456`, scaled registers): those take an integer
/// path that is several times cheaper than the general shortest-digits algorithm (`ryu`),
/// which handles the rest. Why the fast path is exact: for |v| < 1e8 the grid of millionths
/// is coarser than the spacing of `f64`s there, so at most one six-decimal number rounds to
/// `v`; if `m / 1e6` (correctly rounded) is `v`, that number is `m` millionths and printing
/// it with its trailing zeros removed gives the shortest form, as `ryu` would. The text is put
/// together on the stack and appended at once (small appends cost more than the digits).
fn write_f64(v: f64, out: &mut Vec<u8>) {
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
            // `-12345678.123456`: the six decimals at fixed places, the integer digits
            // written backwards from the point, the sign before them.
            let mut b = [b'-'; 17];
            (b[11], b[12]) = (PAIRS[frac / 10_000 * 2], PAIRS[frac / 10_000 * 2 + 1]);
            let p = frac / 100 % 100 * 2;
            (b[13], b[14]) = (PAIRS[p], PAIRS[p + 1]);
            let p = frac % 100 * 2;
            (b[15], b[16]) = (PAIRS[p], PAIRS[p + 1]);
            b[10] = b'.';
            let start = put_u64_back(&mut b, 10, int.unsigned_abs()) - usize::from(m < 0);
            // Trailing zeros go, but one decimal always stays (`5.0`).
            let zeros = match frac {
                _ if frac % 100_000 == 0 => 5,
                _ if frac % 10_000 == 0 => 4,
                _ if frac % 1_000 == 0 => 3,
                _ if frac % 100 == 0 => 2,
                _ if frac % 10 == 0 => 1,
                _ => 0,
            };
            out.extend_from_slice(&b[start..17 - zeros]);
            return;
        }
    }
    out.extend_from_slice(ryu::Buffer::new().format_finite(v).as_bytes());
}

/// A JSON string literal, escaping what RFC 8259 requires (quote, backslash, controls).
pub fn json_str(s: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    let bytes = s.as_bytes();
    // Nearly every name and value needs no escaping: check in one pass, copy in one go.
    if bytes.iter().all(|&b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
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
        out.extend_from_slice(&bytes[start..i]);
        if esc.is_empty() {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(b"\\u00");
            out.push(HEX[usize::from(b >> 4)]);
            out.push(HEX[usize::from(b & 15)]);
        } else {
            out.extend_from_slice(esc);
        }
        start = i + 1;
    }
    out.extend_from_slice(&bytes[start..]);
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fast(v: f64) -> String {
        let mut out = Vec::new();
        write_f64(v, &mut out);
        String::from_utf8(out).unwrap()
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
            write_ts_seq(ts, v, &mut head);
            assert_eq!(
                String::from_utf8(head).unwrap(),
                format!(
                    "{}\",\"seq\":{v},\"fields\":{{",
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

//! JSON Lines encoding of records, written by hand rather than through serde: this is the
//! hottest loop of the gateway (every field of every record), and a direct writer is several
//! times faster. Non-finite floats, which JSON cannot carry, are written as null.

use crate::collect::{Record, Value};
use crate::timefmt::write_rfc3339_ms;

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

/// From the timestamp to the opening of `fields`: `2026-..Z","seq":7,"fields":{`.
pub fn write_ts_seq(ts_ms: i64, seq: u64, out: &mut Vec<u8>) {
    write_rfc3339_ms(ts_ms, out);
    out.extend_from_slice(b"\",\"seq\":");
    out.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    out.extend_from_slice(b",\"fields\":{");
}

pub fn write_value(v: &Value, out: &mut Vec<u8>) {
    match v {
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::Int(v) => out.extend_from_slice(itoa::Buffer::new().format(*v).as_bytes()),
        Value::UInt(v) => out.extend_from_slice(itoa::Buffer::new().format(*v).as_bytes()),
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
/// it with its trailing zeros removed gives the shortest form, as `ryu` would.
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
            let (int, mut frac) = (m / 1_000_000, (m % 1_000_000).unsigned_abs());
            if m < 0 {
                out.push(b'-');
            }
            out.extend_from_slice(itoa::Buffer::new().format(int.unsigned_abs()).as_bytes());
            out.push(b'.');
            if frac == 0 {
                out.push(b'0');
                return;
            }
            let mut digits = 6;
            while frac % 10 == 0 {
                frac /= 10;
                digits -= 1;
            }
            let mut buf = [b'0'; 6];
            for slot in buf[..digits].iter_mut().rev() {
                *slot = b'0' + (frac % 10) as u8;
                frac /= 10;
            }
            out.extend_from_slice(&buf[..digits]);
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

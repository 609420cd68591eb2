//! Wall-clock helpers: UTC timestamps as RFC 3339 text and calendar dates, without a
//! calendar crate (the gateway only ever needs UTC).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_millis()).unwrap_or(i64::MAX),
        // A clock set before 1970 is a broken clock; report it as the epoch itself.
        Err(_) => 0,
    }
}

/// (year, month, day) of a count of days since 1970-01-01 (proleptic Gregorian).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    // Howard Hinnant's days_from_civil inverse: exact for the whole i64 range we use.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `2026-11-25T01:02:03.456Z` for a Unix time in milliseconds.
pub fn rfc3339_ms(ms: i64) -> String {
    String::from_utf8_lossy(&rfc3339_ms_bytes(ms)).into_owned()
}

/// Length of [`rfc3339_ms_bytes`]: the year is clamped to four digits.
pub const RFC3339_MS_LEN: usize = 24;

/// `2026-11-25T01:02:03.456Z` as fixed bytes: written into an array at fixed offsets, so the
/// encoder copies a timestamp in one go instead of fourteen small appends.
pub fn rfc3339_ms_bytes(ms: i64) -> [u8; RFC3339_MS_LEN] {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000) as usize;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let sod = secs.rem_euclid(86_400) as usize;
    let year = y.clamp(0, 9999) as usize;
    let mut b = *b"0000-00-00T00:00:00.000Z";
    // Byte by byte: a two-byte slice copy is a call to memcpy in the size-optimised build.
    let mut two = |at: usize, v: usize| (b[at], b[at + 1]) = (PAIRS[2 * v], PAIRS[2 * v + 1]);
    two(0, year / 100);
    two(2, year % 100);
    two(5, mo as usize);
    two(8, d as usize);
    two(11, sod / 3600);
    two(14, (sod / 60) % 60);
    two(17, sod % 60);
    two(21, milli % 100);
    b[20] = b'0' + (milli / 100) as u8;
    b
}

/// "00" to "99", for writing two digits at a time.
pub(crate) const PAIRS: &[u8; 200] = b"0001020304050607080910111213141516171819\
2021222324252627282930313233343536373839\
4041424344454647484950515253545556575859\
6061626364656667686970717273747576777879\
8081828384858687888990919293949596979899";

/// `2026-11-25` (UTC) for a Unix time in milliseconds.
pub fn utc_date(ms: i64) -> String {
    let (y, mo, d) = civil_from_days(ms.div_euclid(1000).div_euclid(86_400));
    format!("{y:04}-{mo:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        // 2024-02-29 12:34:56.789 UTC, a leap day.
        assert_eq!(rfc3339_ms(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
        assert_eq!(utc_date(1_709_210_096_789), "2024-02-29");
        assert_eq!(rfc3339_ms(-1), "1969-12-31T23:59:59.999Z");
    }
}

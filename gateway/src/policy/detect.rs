//! Identifiers found in free text, with the validation that keeps false positives down:
//! 18-digit resident ID numbers by the GB 11643 check digit (ISO 7064 MOD 11-2), 15-digit
//! ones by their birth date, bank cards by Luhn, mainland mobile numbers by their prefix,
//! e-mail addresses, and vehicle plates (including new-energy plates). [`scrub`] masks each
//! one found and leaves text without identifiers untouched.

/// GB 11643-1999 check of an 18-character resident ID number (17 digits + digit or X).
pub fn is_resident_id18(s: &str) -> bool {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let b = s.as_bytes();
    if b.len() != 18 || !b[..17].iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = b[..17]
        .iter()
        .zip(W)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    let want = CHECK[(sum % 11) as usize];
    b[17].to_ascii_uppercase() == want && plausible_date(&s[6..14])
}

/// The old 15-digit ID: region (6), birth date YYMMDD (6), sequence (3); no check digit.
pub fn is_resident_id15(s: &str) -> bool {
    s.len() == 15
        && s.bytes().all(|b| b.is_ascii_digit())
        && plausible_date(&format!("19{}", &s[6..12]))
}

fn plausible_date(yyyymmdd: &str) -> bool {
    let n = |r: std::ops::Range<usize>| {
        yyyymmdd
            .get(r)
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let (y, m, d) = (n(0..4), n(4..6), n(6..8));
    (1900..=2100).contains(&y) && (1..=12).contains(&m) && (1..=31).contains(&d)
}

/// Luhn (ISO/IEC 7812) over a digit string of 13 to 19 digits.
pub fn is_bank_card(s: &str) -> bool {
    let b = s.as_bytes();
    if !(13..=19).contains(&b.len()) || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let sum: u32 = b
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| {
            let v = u32::from(d - b'0');
            if i % 2 == 1 {
                let x = v * 2;
                if x > 9 {
                    x - 9
                } else {
                    x
                }
            } else {
                v
            }
        })
        .sum();
    sum % 10 == 0
}

/// Mainland China mobile numbers: 11 digits starting 13-19.
pub fn is_mobile(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 11
        && b[0] == b'1'
        && (b'3'..=b'9').contains(&b[1])
        && b.iter().all(u8::is_ascii_digit)
}

const PROVINCES: &str = "京津沪渝冀豫云辽黑湘皖鲁新苏浙赣鄂桂甘晋蒙陕吉闽贵粤青藏川宁琼";

/// What kind of identifier a span is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    ResidentId,
    Mobile,
    BankCard,
    Email,
    Plate,
}

/// Masks every identifier in `text`. Text without one comes back unchanged (borrowed).
pub fn scrub(text: &str) -> std::borrow::Cow<'_, str> {
    let spans = find(text);
    if spans.is_empty() {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len());
    let mut at = 0;
    for (start, end, kind) in spans {
        out.push_str(&text[at..start]);
        let s = &text[start..end];
        let n = s.chars().count();
        let (head, tail) = match kind {
            Kind::ResidentId => (6, 0),
            Kind::Mobile => (3, 4),
            Kind::BankCard => (0, 4),
            Kind::Plate => (2, 0),
            Kind::Email => (1, 0),
        };
        if kind == Kind::Email {
            // Keep the domain: it says which organisation, not which person.
            let at_sign = s.find('@').unwrap_or(s.len());
            out.push_str(&super::mask(&s[..at_sign], head, 0, '*'));
            out.push_str(&s[at_sign..]);
        } else {
            out.push_str(&super::mask(s, head.min(n), tail, '*'));
        }
        at = end;
    }
    out.push_str(&text[at..]);
    std::borrow::Cow::Owned(out)
}

/// Byte spans `(start, end, kind)` of identifiers, in order, not overlapping.
pub fn find(text: &str) -> Vec<(usize, usize, Kind)> {
    let b = text.as_bytes();
    let mut spans = Vec::new();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c.is_ascii_digit() {
            // A maximal run of digits (an ID may end in X), so that a longer number is never
            // split into a valid-looking part. Letters around it do not matter: the validators
            // are strict enough, and a false positive costs less than a leak.
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let mut end = i;
            if end - start == 17 && i < b.len() && (b[i] == b'X' || b[i] == b'x') {
                end += 1;
                i += 1;
            }
            let s = &text[start..end];
            let kind = if is_resident_id18(s) || is_resident_id15(s) {
                Some(Kind::ResidentId)
            } else if is_mobile(s) {
                Some(Kind::Mobile)
            } else if is_bank_card(s) {
                Some(Kind::BankCard)
            } else {
                None
            };
            if let Some(k) = kind {
                if !email_around(b, start, end) {
                    spans.push((start, end, k));
                }
            }
            continue;
        }
        if c == b'@' {
            if let Some((s, e)) = email_at(b, i) {
                // An e-mail swallows digits found inside it on the left.
                while spans.last().is_some_and(|&(ss, _, _)| ss >= s) {
                    spans.pop();
                }
                spans.push((s, e, Kind::Email));
                i = e;
                continue;
            }
        }
        if c >= 0x80 {
            let ch = text[i..].chars().next().unwrap_or(' ');
            if PROVINCES.contains(ch) {
                if let Some(e) = plate_at(b, i + ch.len_utf8()) {
                    spans.push((i, e, Kind::Plate));
                    i = e;
                    continue;
                }
            }
            i += ch.len_utf8();
            continue;
        }
        i += 1;
    }
    spans
}

fn is_local(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'%' | b'+' | b'-')
}

fn email_at(b: &[u8], at: usize) -> Option<(usize, usize)> {
    let mut s = at;
    while s > 0 && is_local(b[s - 1]) {
        s -= 1;
    }
    let mut e = at + 1;
    while e < b.len() && (b[e].is_ascii_alphanumeric() || b[e] == b'-' || b[e] == b'.') {
        e += 1;
    }
    while e > at + 1 && b[e - 1] == b'.' {
        e -= 1;
    }
    let domain = std::str::from_utf8(&b[at + 1..e]).ok()?;
    let ok = s < at
        && domain.contains('.')
        && domain
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.len() >= 2 && tld.bytes().all(|c| c.is_ascii_alphabetic()));
    ok.then_some((s, e))
}

/// Whether a digit run lies inside an e-mail address (handled as the e-mail).
fn email_around(b: &[u8], start: usize, end: usize) -> bool {
    let mut j = end;
    while j < b.len() && is_local(b[j]) {
        j += 1;
    }
    (j < b.len() && b[j] == b'@')
        || (start > 0
            && b[..start]
                .iter()
                .rev()
                .take_while(|c| is_local(**c) || **c == b'@')
                .any(|c| *c == b'@'))
}

/// After the province character: a letter A-Z, then 5 characters (ordinary plate) or 6
/// (new-energy: D or F then 5 digits, or 5 digits then D or F), letters and digits, not
/// followed by another letter or digit.
fn plate_at(b: &[u8], i: usize) -> Option<usize> {
    let letter = *b.get(i)?;
    if !letter.is_ascii_uppercase() {
        return None;
    }
    let mut j = i + 1;
    while j < b.len() && (b[j].is_ascii_uppercase() || b[j].is_ascii_digit()) && j - i <= 7 {
        j += 1;
    }
    let body = &b[i + 1..j];
    let ordinary = body.len() == 5
        && body.iter().filter(|c| c.is_ascii_digit()).count() >= 3
        && !body.iter().any(|c| matches!(c, b'I' | b'O'));
    let energy = body.len() == 6
        && ((matches!(body[0], b'D' | b'F') && body[1..].iter().all(u8::is_ascii_digit))
            || (body[..5].iter().all(u8::is_ascii_digit) && matches!(body[5], b'D' | b'F')));
    (ordinary || energy).then_some(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resident_ids_follow_gb11643() {
        // Published examples (GB 11643 annex and common test numbers).
        for ok in [
            "11010519491231002X",
            "440524198001010013",
            "120101199003078031",
            "32058319870721458X",
        ] {
            assert!(is_resident_id18(ok), "{ok}");
        }
        // One digit off, or the check character changed: not an ID.
        for bad in [
            "110105194912310029",
            "440524198001010014",
            "120101199003078032",
        ] {
            assert!(!is_resident_id18(bad), "{bad}");
        }
        assert!(is_resident_id18("11010519491231002x"));
        assert!(!is_resident_id18("11010519491231002"));
        // A random 18-digit meter number with a wrong check digit is not an ID.
        assert!(!is_resident_id18("123456789012345678"));
        assert!(is_resident_id15("110105491231002"));
        assert!(!is_resident_id15("110105491331002"), "month 13");
    }

    #[test]
    fn luhn_and_mobiles() {
        for ok in [
            "4111111111111111",
            "6222020200112233446",
            "5500005555555559",
        ] {
            assert!(is_bank_card(ok), "{ok}");
        }
        assert!(!is_bank_card("4111111111111112"));
        assert!(!is_bank_card("12345"));
        assert!(is_mobile("13812345678"));
        assert!(!is_mobile("12812345678"));
        assert!(!is_mobile("1381234567"));
    }

    #[test]
    fn scrub_masks_each_kind_in_chinese_text() {
        let cases = [
            ("用户11010519491231002X来电", "用户110105************来电"),
            ("手机13812345678，请回电", "手机138****5678，请回电"),
            (
                "卡号6222020200112233446已冻结",
                "卡号***************3446已冻结",
            ),
            (
                "邮箱 zhang.san@example.com.cn 联系",
                "邮箱 z********@example.com.cn 联系",
            ),
            ("车辆津A12345违停", "车辆津A*****违停"),
            ("新能源粤BD12345充电", "新能源粤B******充电"),
            ("旧证110105491231002", "旧证110105*********"),
        ];
        for (input, want) in cases {
            assert_eq!(scrub(input), want, "{input}");
        }
    }

    #[test]
    fn scrub_leaves_text_without_identifiers_alone() {
        for t in [
            "",
            "水表读数正常",
            "meter WTR123456789012345678 ok",
            "编号123456789012345678无效",
            "用量 12.5 立方米, 2026-11-25",
            "津A 不完整",
        ] {
            assert!(
                matches!(scrub(t), std::borrow::Cow::Borrowed(_)),
                "{t} changed to {}",
                scrub(t)
            );
        }
    }
}

//! Generalisation: Chinese addresses cut to province, city or district; dates to day, month
//! or year; numbers to buckets; rounding to decimals or to a grid. Each returns `None` when
//! the input cannot be generalised safely, and the field is then dropped (never sent as is).

use crate::config::Level;

const MUNICIPALITIES: [&str; 4] = ["北京市", "天津市", "上海市", "重庆市"];
const PROVINCE_END: [&str; 3] = ["特别行政区", "自治区", "省"];
const CITY_END: [&str; 4] = ["自治州", "地区", "市", "盟"];
const DISTRICT_END: [&str; 4] = ["区", "县", "市", "旗"];

/// Length in bytes of the shortest prefix of `s` ending in one of `ends`.
fn upto(s: &str, ends: &[&str]) -> Option<usize> {
    ends.iter()
        .filter_map(|e| s.find(e).map(|i| i + e.len()))
        .min()
}

/// 天津市和平区南京路123号 → 天津市 / 天津市 / 天津市和平区 for province / city / district.
/// An address that does not reach the level asked comes back at the finest level it has;
/// one with no recognisable province gives `None`.
pub fn address(addr: &str, level: Level) -> Option<String> {
    let a = addr.trim();
    let province = MUNICIPALITIES
        .iter()
        .find(|m| a.starts_with(*m))
        .map(|m| m.len())
        .or_else(|| upto(a, &PROVINCE_END).filter(|&n| n <= 8 * 3 + 15))?;
    if level == Level::Province {
        return Some(a[..province].to_string());
    }
    let municipality = MUNICIPALITIES.iter().any(|m| a.starts_with(*m));
    let city = if municipality {
        province
    } else {
        match upto(&a[province..], &CITY_END) {
            Some(n) => province + n,
            None => return Some(a[..province].to_string()),
        }
    };
    if level == Level::City {
        return Some(a[..city].to_string());
    }
    match upto(&a[city..], &DISTRICT_END) {
        Some(n) if level == Level::District => Some(a[..city + n].to_string()),
        _ => Some(a[..city].to_string()),
    }
}

/// `2026-11-25`, `2026/11/25 08:00`, `20261125`, RFC 3339 … → `2026-11-25` / `2026-11` /
/// `2026` for day / month / year.
pub fn date(text: &str, level: Level) -> Option<String> {
    let t = text.trim();
    let digits: String = t
        .chars()
        .take_while(|c| c.is_ascii_digit() || matches!(c, '-' | '/' | '.' | '年' | '月'))
        .filter(char::is_ascii_digit)
        .collect();
    let (y, m, d) = if t.len() >= 8 && t.as_bytes()[..8].iter().all(u8::is_ascii_digit) {
        (&t[0..4], &t[4..6], &t[6..8])
    } else {
        let mut parts = t
            .split(['-', '/', '.', '年', '月', '日', 'T', ' '])
            .filter(|p| !p.is_empty());
        let (y, m, d) = (parts.next()?, parts.next()?, parts.next().unwrap_or("1"));
        if digits.len() < 5 {
            return None;
        }
        (y, m, d)
    };
    let (y, m, d): (u32, u32, u32) = (
        y.parse().ok()?,
        m.parse().ok()?,
        d.get(..2.min(d.len()))?.parse().ok()?,
    );
    if !(1900..=2200).contains(&y) || !(1..=12).contains(&m) || !(1..=31).contains(&d) {
        return None;
    }
    Some(match level {
        Level::Day => format!("{y:04}-{m:02}-{d:02}"),
        Level::Month => format!("{y:04}-{m:02}"),
        _ => format!("{y:04}"),
    })
}

/// The bucket of `v` among ascending `bounds`: `"18-30"`, `"<0"` below the first, `"60+"`
/// from the last.
pub fn bucket(v: f64, bounds: &[f64]) -> Option<String> {
    if !v.is_finite() {
        return None;
    }
    let show = |x: f64| {
        if x.fract() == 0.0 {
            format!("{x:.0}")
        } else {
            x.to_string()
        }
    };
    let first = *bounds.first()?;
    if v < first {
        return Some(format!("<{}", show(first)));
    }
    for w in bounds.windows(2) {
        if v >= w[0] && v < w[1] {
            return Some(format!("{}-{}", show(w[0]), show(w[1])));
        }
    }
    bounds.last().map(|l| format!("{}+", show(*l)))
}

/// Rounds to `decimals`, or to the nearest multiple of `grid` (its decimals kept).
pub fn round(v: f64, decimals: Option<u32>, grid: Option<f64>) -> Option<f64> {
    if !v.is_finite() {
        return None;
    }
    let p = |d: u32| 10f64.powi(d.min(15) as i32);
    Some(match (grid, decimals) {
        (Some(g), _) => {
            let places = g
                .to_string()
                .split_once('.')
                .map_or(0, |(_, f)| f.len() as u32);
            ((v / g).round() * g * p(places)).round() / p(places)
        }
        (None, Some(d)) => (v * p(d)).round() / p(d),
        (None, None) => v.round(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_cut_at_each_level() {
        let cases = [
            (
                "天津市和平区南京路123号",
                "天津市",
                "天津市",
                "天津市和平区",
            ),
            (
                "广东省深圳市南山区科技园路1号",
                "广东省",
                "广东省深圳市",
                "广东省深圳市南山区",
            ),
            (
                "新疆维吾尔自治区乌鲁木齐市天山区解放路",
                "新疆维吾尔自治区",
                "新疆维吾尔自治区乌鲁木齐市",
                "新疆维吾尔自治区乌鲁木齐市天山区",
            ),
            (
                "江苏省苏州市昆山市前进路",
                "江苏省",
                "江苏省苏州市",
                "江苏省苏州市昆山市",
            ),
            (
                "四川省阿坝藏族羌族自治州汶川县映秀镇",
                "四川省",
                "四川省阿坝藏族羌族自治州",
                "四川省阿坝藏族羌族自治州汶川县",
            ),
        ];
        for (a, p, c, d) in cases {
            assert_eq!(address(a, Level::Province).as_deref(), Some(p), "{a}");
            assert_eq!(address(a, Level::City).as_deref(), Some(c), "{a}");
            assert_eq!(address(a, Level::District).as_deref(), Some(d), "{a}");
        }
        assert_eq!(
            address("南京路123号", Level::District),
            None,
            "no province: dropped"
        );
        assert_eq!(address("", Level::City), None);
        assert_eq!(
            address("河北省", Level::District).as_deref(),
            Some("河北省")
        );
    }

    #[test]
    fn dates_generalise_from_common_layouts() {
        for t in [
            "2026-11-25",
            "2026/11/25 08:30:00",
            "20261125",
            "2026-11-25T08:30:00+08:00",
            "2026年11月25日",
        ] {
            assert_eq!(date(t, Level::Day).as_deref(), Some("2026-11-25"), "{t}");
            assert_eq!(date(t, Level::Month).as_deref(), Some("2026-11"), "{t}");
            assert_eq!(date(t, Level::Year).as_deref(), Some("2026"), "{t}");
        }
        assert_eq!(date("not a date", Level::Day), None);
        assert_eq!(date("2026-13-01", Level::Day), None);
    }

    #[test]
    fn buckets_and_rounding() {
        let b = [0.0, 18.0, 30.0, 45.0, 60.0];
        assert_eq!(bucket(17.0, &b).as_deref(), Some("0-18"));
        assert_eq!(bucket(18.0, &b).as_deref(), Some("18-30"));
        assert_eq!(bucket(77.0, &b).as_deref(), Some("60+"));
        assert_eq!(bucket(-1.0, &b).as_deref(), Some("<0"));
        assert_eq!(bucket(f64::NAN, &b), None);
        assert_eq!(round(12.3456, Some(1), None), Some(12.3));
        assert_eq!(round(117.20345, None, Some(0.01)), Some(117.2));
        assert_eq!(round(39.08765, None, Some(0.05)), Some(39.1));
    }
}

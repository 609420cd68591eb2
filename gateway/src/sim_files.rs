//! Synthetic business-system exports: a water utility's customer billing file, with the
//! layout and Chinese header a billing system really writes, and personal data that looks
//! real (18-digit resident ID numbers with valid check digits, mobile numbers, addresses).
//! For the demo, the tests (which scan everything the gateway writes for these raw values)
//! and the ingest benchmark. Deterministic: row `n` is always the same.

/// The export's header row; [`BILLING_COLUMNS_TOML`] maps it to field names.
pub const BILLING_HEADER: &str =
    "户号,用户姓名,身份证号,联系电话,用水地址,水表编号,账期,用水量(m3),金额(元),备注";

/// The `columns = [...]` of a file source reading [`billing_export`] files.
pub const BILLING_COLUMNS_TOML: &str = r#"columns = [
  { name = "account_no", header = "户号", required = true },
  { name = "customer_name", header = "用户姓名" },
  { name = "id_card", header = "身份证号" },
  { name = "phone", header = "联系电话" },
  { name = "address", header = "用水地址" },
  { name = "meter_id", header = "水表编号" },
  { name = "bill_month", header = "账期", type = "timestamp", format = "%Y-%m-%d" },
  { name = "usage_m3", header = "用水量(m3)", type = "decimal" },
  { name = "amount_yuan", header = "金额(元)", type = "decimal", required = true },
  { name = "remark", header = "备注" },
]"#;

/// A `[policies.customer]` for [`billing_export`] rows: the ID number dropped; name, phone,
/// account and meter masked; address to the district, month of the bill; remark scrubbed.
pub const BILLING_POLICY_TOML: &str = r#"[policies.customer]
fields.account_no = { action = "mask", keep_head = 2, keep_tail = 2, grade = "personal" }
fields.customer_name = { action = "mask", keep_head = 1, grade = "personal" }
fields.id_card = { action = "drop", grade = "sensitive" }
fields.phone = { action = "mask", keep_head = 3, keep_tail = 4, grade = "personal" }
fields.address = { action = "generalize", level = "district", grade = "personal" }
fields.meter_id = { action = "mask", keep_head = 4, keep_tail = 2, grade = "personal" }
fields.bill_month = { action = "generalize", level = "month", grade = "internal" }
fields.usage_m3 = { action = "keep", grade = "internal" }
fields.amount_yuan = { action = "keep", grade = "internal" }
fields.remark = { action = "scrub", grade = "personal" }
"#;

const SURNAMES: &[&str] = &["张", "王", "李", "赵", "刘", "陈", "杨", "欧阳", "黄", "周"];
const GIVEN: &[&str] = &[
    "伟", "芳", "秀英", "敏", "静", "强", "磊", "洋", "艳", "文涛",
];
const DISTRICTS: &[&str] = &["和平区", "河西区", "南开区", "河北区", "红桥区", "滨海新区"];
const ROADS: &[&str] = &["南京路", "卫津路", "鞍山西道", "黄河道", "中山路", "友谊路"];

/// A valid 18-digit resident ID number (GB 11643 check digit) for row `n`.
pub fn resident_id(n: u64) -> String {
    const W: [u64; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    const CHECK: &[u8; 11] = b"10X98765432";
    let year = 1950 + n % 55;
    let month = 1 + n % 12;
    let day = 1 + (n / 12) % 28;
    let body = format!(
        "{:06}{year:04}{month:02}{day:02}{:03}",
        120_101 + (n % 16) * 100,
        n % 1000
    );
    let sum: u64 = body
        .bytes()
        .zip(W)
        .map(|(d, w)| u64::from(d - b'0') * w)
        .sum();
    format!("{body}{}", CHECK[(sum % 11) as usize] as char)
}

/// A mainland mobile number for row `n`.
pub fn mobile(n: u64) -> String {
    const PREFIX: &[&str] = &["138", "139", "150", "186", "188", "135"];
    format!(
        "{}{:08}",
        PREFIX[(n % PREFIX.len() as u64) as usize],
        (n * 7_919 + 12_345_678) % 100_000_000
    )
}

/// Row `n` of the billing export (no line break).
pub fn billing_row(n: u64) -> String {
    let pick = |list: &[&'static str], k: u64| list[(k % list.len() as u64) as usize];
    let name = format!("{}{}", pick(SURNAMES, n), pick(GIVEN, n / 7));
    let phone = mobile(n);
    let remark = match n % 4 {
        0 => format!("客户来电{phone}咨询账单"),
        1 => "已缴费".to_string(),
        2 => String::new(),
        _ => "\"表位变更, 已核实\"".to_string(),
    };
    format!(
        "{},{name},{},{phone},天津市{}{}{}号,WTR-1201-{:06},2026-10-31,{}.{:02},{}.{:02},{remark}",
        1_200_000 + n,
        resident_id(n),
        pick(DISTRICTS, n / 3),
        pick(ROADS, n / 5),
        1 + n % 300,
        n % 1_000_000,
        n % 40,
        n % 100,
        n % 160,
        (n * 37) % 100,
    )
}

/// Rows `first .. first + count` with the header, as UTF-8 text (encode it to GBK with
/// `encoding_rs::GBK.encode` for the exporter's usual form).
pub fn billing_export(first: u64, count: u64) -> String {
    let mut s = String::with_capacity(count as usize * 140 + 100);
    s.push_str(BILLING_HEADER);
    s.push_str("\r\n");
    for n in first..first + count {
        s.push_str(&billing_row(n));
        s.push_str("\r\n");
    }
    s
}

/// Writes an export the way exporters should and often do not: to a temporary name first,
/// then renamed into place (the settle time covers those that write in place).
pub fn write_export(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identifiers_are_valid() {
        for n in 0..2000 {
            assert!(
                crate::policy::detect::is_resident_id18(&resident_id(n)),
                "{}",
                resident_id(n)
            );
            assert!(
                crate::policy::detect::is_mobile(&mobile(n)),
                "{}",
                mobile(n)
            );
        }
        let text = billing_export(0, 3);
        assert_eq!(text.lines().count(), 4);
    }
}

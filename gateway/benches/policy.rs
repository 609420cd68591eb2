//! The policy stage on synthetic customer records (water billing export: account number,
//! name, ID number, phone, address, meter id, bill date, usage, amount), one core:
//! `Policy::apply` and the daemon's fused policy-and-encode path, in field rules per second.
//! Scrub of free text is measured separately, with and without identifiers in the text.
//!
//! Run: cargo bench -p shuyuan --bench policy

// A benchmark panics on setup failures: there is no one to report to.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use shuyuan::batch::SourceEncoder;
use shuyuan::collect::{Names, Record, Value};
use shuyuan::config::{ActionKind, FieldRuleConfig, Grade, Level, PolicyConfig};
use shuyuan::policy::{detect, Policy, PseudonymKey};

const N: usize = 20_000;
const ROUNDS: usize = 10;

fn policy() -> Policy {
    let mut c = PolicyConfig::default();
    let mut put = |name: &str, action, grade, f: &dyn Fn(&mut FieldRuleConfig)| {
        let mut r = FieldRuleConfig::new(action, grade);
        f(&mut r);
        c.fields.insert(name.into(), r);
    };
    put(
        "account_no",
        ActionKind::Pseudonymize,
        Grade::Personal,
        &|r| r.prefix = Some("acct_".into()),
    );
    put("customer_name", ActionKind::Mask, Grade::Personal, &|r| {
        r.keep_head = Some(1)
    });
    put("id_card", ActionKind::Mask, Grade::Sensitive, &|r| {
        r.keep_head = Some(6)
    });
    put("phone", ActionKind::Mask, Grade::Personal, &|r| {
        r.keep_head = Some(3);
        r.keep_tail = Some(4)
    });
    put("address", ActionKind::Generalize, Grade::Personal, &|r| {
        r.level = Some(Level::District)
    });
    put(
        "meter_id",
        ActionKind::Pseudonymize,
        Grade::Personal,
        &|r| r.prefix = Some("mtr_".into()),
    );
    put(
        "bill_month",
        ActionKind::Generalize,
        Grade::Internal,
        &|r| r.level = Some(Level::Month),
    );
    put("usage_m3", ActionKind::Round, Grade::Internal, &|r| {
        r.decimals = Some(1)
    });
    put("amount_yuan", ActionKind::Keep, Grade::Internal, &|_| {});
    let key = Arc::new(PseudonymKey::from_bytes(&[7; 32]));
    Policy::compile(&c, Some(&key)).unwrap()
}

fn records() -> Vec<Record> {
    let names: Names = [
        "account_no",
        "customer_name",
        "id_card",
        "phone",
        "address",
        "meter_id",
        "bill_month",
        "usage_m3",
        "amount_yuan",
    ]
    .iter()
    .map(|s| Arc::from(*s))
    .collect();
    let surnames = ["张", "王", "李", "赵", "欧阳", "刘", "陈"];
    let districts = ["和平区", "南开区", "河西区", "河东区", "红桥区", "河北区"];
    (0..N)
        .map(|i| {
            let t = |s: String| Value::Text(Arc::from(s));
            let values = [
                t(format!("{}", 1_200_000 + i)),
                t(format!(
                    "{}{}",
                    surnames[i % surnames.len()],
                    ["三", "小明", "建国"][i % 3]
                )),
                t(format!(
                    "1201011990{:02}{:02}{:03}X",
                    1 + i % 12,
                    1 + i % 28,
                    i % 1000
                )),
                t(format!("13{}{:08}", 5 + i % 5, i * 7919 % 100_000_000)),
                t(format!(
                    "天津市{}南京路{}号",
                    districts[i % districts.len()],
                    i % 500
                )),
                t(format!("WTR-1201-{:06}", i)),
                t(format!("2026-{:02}-28", 1 + i % 12)),
                t(format!("{:.2}", (i % 4000) as f64 / 100.0)),
                Value::Float((i % 9000) as f64 / 100.0),
            ];
            Record {
                source: Arc::from("billing"),
                ts_ms: 1_795_568_400_000,
                seq: i as u64,
                names: names.clone(),
                values: Vec::from(values),
            }
        })
        .collect()
}

fn main() {
    let p = Arc::new(policy());
    let recs = records();
    let rules = (N * 9 * ROUNDS) as f64;

    let mut t_apply = Duration::ZERO;
    for _ in 0..ROUNDS {
        let mut copy = recs.clone();
        let s = Instant::now();
        for r in &mut copy {
            std::hint::black_box(p.apply(r));
        }
        t_apply += s.elapsed();
    }
    let mut t_fused = Duration::ZERO;
    let mut enc = SourceEncoder::new("billing", p.clone());
    let mut buf = Vec::with_capacity(8 << 20);
    for _ in 0..ROUNDS {
        buf.clear();
        let s = Instant::now();
        for r in &recs {
            std::hint::black_box(enc.encode(r, &mut buf));
        }
        t_fused += s.elapsed();
    }

    let clean: Vec<String> = (0..N)
        .map(|i| {
            format!(
                "客户于2026-11-{:02}来电咨询水费账单，已解释阶梯水价，客户表示满意。编号{}",
                1 + i % 28,
                i
            )
        })
        .collect();
    let dirty: Vec<String> = (0..N).map(|i| format!("客户13{}{:08}来电，身份证1201011990{:02}{:02}{:03}X，邮箱user{i}@example.com，车辆津A{:05}", 5 + i % 5, i, 1 + i % 12, 1 + i % 28, i % 1000, i % 100_000)).collect();
    let scrub_rate = |texts: &[String]| {
        let s = Instant::now();
        let mut changed = 0usize;
        for _ in 0..ROUNDS {
            for t in texts {
                if matches!(
                    detect::scrub(std::hint::black_box(t)),
                    std::borrow::Cow::Owned(_)
                ) {
                    changed += 1;
                }
            }
        }
        let secs = s.elapsed().as_secs_f64();
        let bytes: usize = texts.iter().map(String::len).sum::<usize>() * ROUNDS;
        (
            (texts.len() * ROUNDS) as f64 / secs,
            bytes as f64 / secs / 1e6,
            changed / ROUNDS,
        )
    };
    let (c_rate, c_mb, c_changed) = scrub_rate(&clean);
    let (d_rate, d_mb, d_changed) = scrub_rate(&dirty);

    println!("customer records: {N} x 9 fields (pseudonymize x2, mask x3, generalize x2, round, keep), {ROUNDS} rounds, one core");
    println!(
        "Policy::apply            {:>12.0} field rules/s  (target >= 2000000)",
        rules / t_apply.as_secs_f64()
    );
    println!(
        "fused policy + JSON      {:>12.0} field rules/s  ({:.0} records/s)",
        rules / t_fused.as_secs_f64(),
        (N * ROUNDS) as f64 / t_fused.as_secs_f64()
    );
    println!("scrub, no identifiers    {c_rate:>12.0} texts/s  {c_mb:>7.1} MB/s  ({c_changed} of {N} changed)");
    println!("scrub, 4 identifiers     {d_rate:>12.0} texts/s  {d_mb:>7.1} MB/s  ({d_changed} of {N} changed)");
}

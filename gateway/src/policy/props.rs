//! Table-driven cases for every rule on realistic Chinese data, and property tests: no rule
//! but keep lets an ID, mobile or bank card number through; pseudonyms are stable for a key
//! and differ across keys; scrub leaves text without identifiers alone.

use std::sync::Arc;

use proptest::prelude::*;

use super::detect;
use super::*;
use crate::config::{FieldRuleConfig, Level};

fn key(b: u8) -> Arc<PseudonymKey> {
    Arc::new(PseudonymKey::from_bytes(&[b; 32]))
}

fn compile_one(f: impl FnOnce(&mut FieldRuleConfig), action: ActionKind) -> Action {
    let mut r = FieldRuleConfig::new(action, Grade::Personal);
    f(&mut r);
    let mut cfg = PolicyConfig::default();
    cfg.fields.insert("x".into(), r);
    Policy::compile(&cfg, Some(&key(1)))
        .unwrap()
        .rule("x")
        .unwrap()
        .action
        .clone()
}

fn text(v: &Value) -> String {
    match v {
        Value::Text(t) => t.to_string(),
        o => o.to_text(),
    }
}

fn t(s: &str) -> Value {
    Value::Text(Arc::from(s))
}

#[test]
fn every_rule_on_realistic_values_and_edge_cases() {
    let mask = compile_one(|r| r.keep_head = Some(1), ActionKind::Mask);
    let phone = compile_one(
        |r| {
            r.keep_head = Some(3);
            r.keep_tail = Some(4)
        },
        ActionKind::Mask,
    );
    let district = compile_one(|r| r.level = Some(Level::District), ActionKind::Generalize);
    let month = compile_one(|r| r.level = Some(Level::Month), ActionKind::Generalize);
    let ages = compile_one(
        |r| r.buckets = Some(vec![0.0, 18.0, 35.0, 60.0]),
        ActionKind::Generalize,
    );
    let round1 = compile_one(|r| r.decimals = Some(1), ActionKind::Round);
    let grid = compile_one(|r| r.grid = Some(0.01), ActionKind::Round);
    let scrub = compile_one(|_| {}, ActionKind::Scrub);
    let pseudo = compile_one(
        |r| {
            r.prefix = Some("p_".into());
            r.length = Some(16)
        },
        ActionKind::Pseudonymize,
    );
    let cases: Vec<(&Action, Value, Option<&str>)> = vec![
        (&mask, t("张三"), Some("张*")),
        (&mask, t("欧阳修文"), Some("欧***")),
        (&mask, t("张"), Some("*")),
        (&mask, t(""), Some("")),
        (&mask, t("Zhang三"), Some("Z*****")),
        (&phone, t("13812345678"), Some("138****5678")),
        (&phone, Value::UInt(13812345678), Some("138****5678")),
        (
            &district,
            t("天津市和平区南京路123号"),
            Some("天津市和平区"),
        ),
        (
            &district,
            t("  浙江省杭州市西湖区文三路 "),
            Some("浙江省杭州市西湖区"),
        ),
        (&district, t("no province here"), None),
        (&month, t("2026-10-31"), Some("2026-10")),
        (&month, t("20261031"), Some("2026-10")),
        (&month, t("上个月"), None),
        (&ages, Value::Int(42), Some("35-60")),
        (&ages, t("17"), Some("0-18")),
        (&ages, t("七十"), None),
        (&round1, t("12.46"), Some("12.5")),
        (&round1, Value::Float(-0.04), Some("-0")),
        (&grid, Value::Float(39.13612), Some("39.14")),
        (
            &scrub,
            t("请联系13812345678或zhangsan@example.com"),
            Some("请联系138****5678或z*******@example.com"),
        ),
        (&scrub, t("水表正常"), Some("水表正常")),
        (&scrub, Value::UInt(13812345678), Some("138****5678")),
    ];
    for (i, (action, input, want)) in cases.into_iter().enumerate() {
        let got = action.transform(&input).map(|v| text(&v));
        assert_eq!(got.as_deref(), want, "case {i}: {input:?}");
    }
    let tok = pseudo.transform(&t("1200317")).map(|v| text(&v)).unwrap();
    assert!(tok.starts_with("p_") && tok.len() == 18, "{tok}");
    assert_eq!(
        Some(tok),
        pseudo.transform(&Value::UInt(1200317)).map(|v| text(&v)),
        "a number and its text give one token"
    );
}

#[test]
fn options_of_another_action_and_missing_actions_are_refused() {
    let mut cfg = PolicyConfig::default();
    let mut r = FieldRuleConfig::new(ActionKind::Keep, Grade::Internal);
    r.keep_head = Some(2);
    cfg.fields.insert("a".into(), r);
    let mut r = FieldRuleConfig::new(ActionKind::Generalize, Grade::Personal);
    r.level = Some(Level::City);
    r.buckets = Some(vec![1.0]);
    cfg.fields.insert("b".into(), r);
    let mut r = FieldRuleConfig::new(ActionKind::Keep, Grade::Personal);
    r.action = None;
    cfg.fields.insert("c".into(), r);
    cfg.fields.insert(
        "d".into(),
        FieldRuleConfig::new(ActionKind::Pseudonymize, Grade::Personal),
    );
    let errs = Policy::compile(&cfg, None).unwrap_err();
    let msgs: Vec<String> = errs.iter().map(|(p, m)| format!("{p}: {m}")).collect();
    assert_eq!(msgs.len(), 4, "{msgs:#?}");
    assert!(
        msgs[0].starts_with("fields.a.keep_head") && msgs[0].contains("only to action = \"mask\""),
        "{}",
        msgs[0]
    );
    assert!(
        msgs[1].starts_with("fields.b.action") && msgs[1].contains("either level"),
        "{}",
        msgs[1]
    );
    assert!(
        msgs[2].starts_with("fields.c.grade") && msgs[2].contains("no action"),
        "{}",
        msgs[2]
    );
    assert!(msgs[3].contains("shuyuan keys init"), "{}", msgs[3]);
}

/// A valid 18-digit resident ID from 17 digits.
fn with_check(body: &str) -> String {
    const W: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
    let sum: u32 = body
        .bytes()
        .zip(W)
        .map(|(d, w)| u32::from(d - b'0') * w)
        .sum();
    format!("{body}{}", char::from(b"10X98765432"[(sum % 11) as usize]))
}

fn luhn(body: &str) -> String {
    for d in 0..10 {
        let s = format!("{body}{d}");
        if detect::is_bank_card(&s) {
            return s;
        }
    }
    unreachable!()
}

fn identifiers() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            110_000u32..660_000,
            1950u32..2020,
            1u32..13,
            1u32..29,
            0u32..1000
        )
            .prop_map(|(r, y, m, d, s)| with_check(&format!("{r:06}{y:04}{m:02}{d:02}{s:03}"))),
        (3u8..10, 0u64..1_000_000_000).prop_map(|(p, n)| format!("1{p}{n:09}")),
        (0u64..10_000_000_000_000_000).prop_map(|n| luhn(&format!("62{n:016}"))),
    ]
}

fn all_rules() -> Vec<Action> {
    vec![
        compile_one(
            |r| {
                r.keep_head = Some(3);
                r.keep_tail = Some(4)
            },
            ActionKind::Mask,
        ),
        compile_one(|r| r.keep_head = Some(6), ActionKind::Mask),
        compile_one(|_| {}, ActionKind::Pseudonymize),
        compile_one(|r| r.level = Some(Level::District), ActionKind::Generalize),
        compile_one(|r| r.level = Some(Level::Day), ActionKind::Generalize),
        compile_one(
            |r| r.buckets = Some(vec![0.0, 100.0]),
            ActionKind::Generalize,
        ),
        compile_one(|r| r.decimals = Some(0), ActionKind::Round),
        compile_one(|_| {}, ActionKind::Scrub),
        Action::Drop,
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn no_rule_but_keep_lets_an_identifier_through(
        id in identifiers(),
        before in "[\\u{4e00}-\\u{4e20}a-z ，。]{0,6}",
        after in "[\\u{4e00}-\\u{4e20}a-z ，。]{0,6}",
        alone in any::<bool>(),
    ) {
        let input = if alone { id.clone() } else { format!("{before}{id}{after}") };
        for action in all_rules() {
            if let Some(out) = action.transform(&t(&input)) {
                let out = text(&out);
                prop_assert!(!out.contains(&id), "{action:?} let {id} through in {out:?}");
            }
            if alone {
                if let Ok(n) = id.parse::<u64>() {
                    if let Some(out) = action.transform(&Value::UInt(n)) {
                        prop_assert!(!text(&out).contains(&id), "{action:?} on the number {n}");
                    }
                }
            }
        }
    }

    #[test]
    fn pseudonyms_are_stable_per_key_and_differ_across_keys(v in ".{1,40}", a in any::<u8>(), b in any::<u8>()) {
        prop_assume!(a != b);
        let (ka, kb) = (PseudonymKey::from_bytes(&[a; 32]), PseudonymKey::from_bytes(&[b; 32]));
        prop_assert_eq!(ka.token(&v, "", 20), ka.token(&v, "", 20));
        prop_assert_ne!(ka.token(&v, "", 20), kb.token(&v, "", 20));
    }

    #[test]
    fn scrub_never_changes_text_without_identifiers(s in "[\\u{4e00}-\\u{4fff}a-zA-Z ，。.:/-]{0,60}") {
        prop_assert_eq!(detect::scrub(&s).into_owned(), s);
    }
}

//! Bad configs get one clear `FILE:LINE:COL: message` per problem, never a panic.

use shuyuan::config::{load, ConfigError};
use shuyuan_tests::World;

const GOOD: &str = r#"[gateway]
id = "GW-TEST-0001"
state_dir = "state"

[uplink]
url = "https://127.0.0.1:8443"
ca = "certs/platform-ca.pem"
cert = "certs/gateway.pem"
key = "certs/gateway.key"
recipient = "certs/platform-hpke.pub"

[[sources]]
id = "pump"
kind = "modbus-tcp"
address = "127.0.0.1:502"
interval = "1s"
policy = "telemetry"
points = [
  { name = "flow", register = "holding", address = 100, type = "f32", order = "CDAB" },
]

[policies.telemetry]
fields.flow = { action = "keep", grade = "internal" }
"#;

fn problems(world: &World, text: &str) -> Vec<String> {
    let path = world.path().join("gateway.toml");
    std::fs::write(&path, text).unwrap();
    match load(&path) {
        Ok(_) => Vec::new(),
        Err(ConfigError::Invalid { problems }) => problems,
        Err(e) => panic!("unexpected error kind: {e}"),
    }
}

/// Asserts exactly one problem, at `line`, whose message contains `needle`.
fn expect(world: &World, text: &str, line: usize, needle: &str) {
    let p = problems(world, text);
    let file = world.path().join("gateway.toml");
    assert_eq!(p.len(), 1, "one problem expected, got {p:#?}");
    let prefix = format!("{}:{line}:", file.display());
    assert!(p[0].starts_with(&prefix), "expected line {line}: {}", p[0]);
    assert!(p[0].contains(needle), "expected {needle:?} in {}", p[0]);
}

fn edit(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from}");
    GOOD.replacen(from, to, 1)
}

#[test]
fn the_reference_config_is_valid() {
    let w = World::new();
    assert!(problems(&w, GOOD).is_empty(), "{:#?}", problems(&w, GOOD));
}

#[test]
fn each_bad_config_names_its_line_and_the_fix() {
    let w = World::new();
    let cases: &[(&str, &str, usize, &str)] = &[
        (
            "unknown key",
            "interval = \"1s\"",
            16,
            "unknown field `intervall`",
        ),
        ("wrong type", "id = \"pump\"", 13, "invalid type"),
        ("bad duration", "interval = \"1s\"", 16, "unknown unit"),
        (
            "bad register kind",
            "register = \"holding\"",
            19,
            "unknown variant `holdin`",
        ),
        (
            "missing policy",
            "policy = \"telemetry\"",
            17,
            "not defined",
        ),
        (
            "sensitive kept",
            "fields.flow = { action = \"keep\", grade = \"internal\" }",
            23,
            "cannot be kept in clear",
        ),
        (
            "http url",
            "url = \"https://127.0.0.1:8443\"",
            6,
            "must start with https://",
        ),
        (
            "bad address",
            "address = \"127.0.0.1:502\"",
            15,
            "host:port",
        ),
        (
            "bool in holding",
            "type = \"f32\"",
            19,
            "type bool needs register",
        ),
        (
            "missing key file",
            "key = \"certs/gateway.key\"",
            9,
            "cannot read key file",
        ),
        ("bad gateway id", "id = \"GW-TEST-0001\"", 2, "contains '/'"),
    ];
    let replacement = |name: &str, from: &str| -> String {
        match name {
            "unknown key" => "intervall = \"1s\"".into(),
            "wrong type" => "id = 17".into(),
            "bad duration" => "interval = \"1 fortnight\"".into(),
            "bad register kind" => "register = \"holdin\"".into(),
            "missing policy" => "policy = \"telemetri\"".into(),
            "sensitive kept" => "fields.flow = { action = \"keep\", grade = \"sensitive\" }".into(),
            "http url" => "url = \"http://127.0.0.1:8443\"".into(),
            "bad address" => "address = \"127.0.0.1\"".into(),
            "bool in holding" => "type = \"bool\"".into(),
            "missing key file" => "key = \"certs/nope.key\"".into(),
            "bad gateway id" => "id = \"GW/1\"".into(),
            _ => from.into(),
        }
    };
    for (name, from, line, needle) in cases {
        let text = edit(from, &replacement(name, from));
        let p = problems(&w, &text);
        assert!(!p.is_empty(), "{name}: accepted");
        std::panic::catch_unwind(|| expect(&w, &text, *line, needle))
            .unwrap_or_else(|_| panic!("case {name:?} failed: {p:#?}"));
    }
}

#[test]
fn duplicate_source_ids_and_every_problem_are_reported_at_once() {
    let w = World::new();
    let second = GOOD
        .split("[[sources]]")
        .nth(1)
        .unwrap()
        .split("[policies")
        .next()
        .unwrap();
    let mut text = GOOD.replace(
        "[policies.telemetry]",
        &format!("[[sources]]{second}[policies.telemetry]"),
    );
    text = text.replacen("interval = \"1s\"", "interval = \"0ms\"", 1);
    let p = problems(&w, &text);
    assert!(
        p.iter()
            .any(|m| m.contains("duplicate source id \"pump\"") && m.contains(":23:")),
        "{p:#?}"
    );
    assert!(
        p.iter()
            .any(|m| m.contains("interval must be at least 10ms") && m.contains(":16:")),
        "{p:#?}"
    );
}

#[test]
fn sources_can_share_a_device_profile_and_unknown_profiles_are_named() {
    let w = World::new();
    let with_profile = GOOD.replace(
        "points = [\n  { name = \"flow\", register = \"holding\", address = 100, type = \"f32\", order = \"CDAB\" },\n]\n",
        "profile = \"pump-v2\"\n",
    ) + "\n[profiles.pump-v2]\npoints = [\n  { name = \"flow\", register = \"holding\", address = 100, type = \"f32\" },\n]\n";
    assert!(
        problems(&w, &with_profile).is_empty(),
        "{:#?}",
        problems(&w, &with_profile)
    );
    let typo = with_profile.replace("profile = \"pump-v2\"", "profile = \"pump-v3\"");
    expect(&w, &typo, 18, "profile \"pump-v3\", which is not defined");
}

#[test]
fn de_identification_rules_are_checked_with_their_lines() {
    let w = World::new();
    let with = |extra: &str| format!("{GOOD}{extra}");
    // line 24 is the first line after GOOD
    expect(
        &w,
        &with("fields.name = { grade = \"personal\" }\n"),
        24,
        "graded Personal but has no action",
    );
    expect(
        &w,
        &with("fields.addr = { action = \"keep\", level = \"city\", grade = \"personal\" }\n"),
        24,
        "level applies only to action = \"generalize\"",
    );
    expect(
        &w,
        &with("fields.acct = { action = \"pseudonymize\", grade = \"personal\" }\n"),
        24,
        "shuyuan keys init",
    );
    expect(
        &w,
        &with(
            "fields.age = { action = \"generalize\", buckets = [30, 18], grade = \"personal\" }\n",
        ),
        24,
        "ascending order",
    );
    expect(
        &w,
        &with("fields.x = { action = \"hash\", grade = \"personal\" }\n"),
        24,
        "unknown variant `hash`",
    );
    // With a key configured, pseudonymize is accepted.
    let key = w.path().join("keys/pseudonym.key");
    shuyuan::policy::PseudonymKey::init(&key).unwrap();
    let ok = GOOD.replace(
        "[[sources]]",
        "[pseudonym]\nkey = \"keys/pseudonym.key\"\n\n[[sources]]",
    )
        + "fields.acct = { action = \"pseudonymize\", prefix = \"a_\", grade = \"personal\" }\n";
    assert!(problems(&w, &ok).is_empty(), "{:#?}", problems(&w, &ok));
}

#[test]
fn audit_retention_below_the_regulations_minimum_is_refused() {
    let w = World::new();
    let text = GOOD.replace(
        "[[sources]]",
        "[audit]\nkeep_processing = \"365d\"\n\n[[sources]]",
    );
    expect(&w, &text, 13, "at least 3 years");
    let text = GOOD.replace(
        "[[sources]]",
        "[audit]\nkeep_security = \"30d\"\n\n[[sources]]",
    );
    expect(&w, &text, 13, "at least 6 months");
    let ok = GOOD.replace(
        "[[sources]]",
        "[audit]\nkeep_processing = \"1500d\"\nkeep_security = \"200d\"\n\n[[sources]]",
    );
    assert!(problems(&w, &ok).is_empty());
}

#[test]
fn a_world_readable_private_key_is_refused_with_the_fix() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::new();
    let key = w.pki.gateway_key();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let p = problems(&w, GOOD);
    assert_eq!(p.len(), 1, "{p:#?}");
    assert!(
        p[0].contains(":9:") && p[0].contains("chmod 600"),
        "{}",
        p[0]
    );
}

#[test]
fn toml_syntax_errors_name_the_line() {
    let w = World::new();
    expect(&w, &edit("[uplink]", "[uplink"), 5, "");
}

#[test]
fn file_sources_are_checked_with_their_lines() {
    let w = World::new();
    std::fs::create_dir_all(w.path().join("spool")).unwrap();
    // Lines 25 to 29 after GOOD (line 24 is blank).
    let file = |extra: &str| {
        format!(
            "{GOOD}\n[[sources]]\nid = \"bills\"\nkind = \"file\"\nspool = \"spool\"\npolicy = \"telemetry\"\n{extra}"
        )
    };
    assert!(
        problems(&w, &file("")).is_empty(),
        "{:#?}",
        problems(&w, &file(""))
    );
    expect(&w, &file("after = \"move\"\n"), 30, "needs move_to");
    expect(
        &w,
        &file("address = \"127.0.0.1:502\"\n"),
        30,
        "address does not apply to a source of kind file",
    );
    expect(
        &w,
        &file("time_column = \"at\"\n"),
        30,
        "time_column \"at\" is not one of the listed columns",
    );
    expect(&w, &file("tz = \"Asia/Shanghai\"\n"), 30, "UTC offset");
    expect(
        &w,
        &file("columns = [{ name = \"amount\", type = \"money\" }]\n"),
        30,
        "unknown variant `money`",
    );
    let p = problems(
        &w,
        &file("").replace("spool = \"spool\"", "spool = \"nowhere\""),
    );
    assert!(p.is_empty(), "a missing spool is only a warning: {p:#?}");
}

#[test]
fn rtu_sources_on_one_port_must_agree_and_have_their_own_units() {
    let w = World::new();
    let rtu = |id: &str, unit: u8, baud: u32| {
        format!(
            "\n[[sources]]\nid = \"{id}\"\nkind = \"modbus-rtu\"\nport = \"/dev/ttyS1\"\nbaud = {baud}\nunit = {unit}\npolicy = \"telemetry\"\npoints = [{{ name = \"flow\", register = \"holding\", address = 0, type = \"f32\" }}]\n"
        )
    };
    let ok = format!("{GOOD}{}{}", rtu("m1", 1, 9600), rtu("m2", 2, 9600));
    assert!(problems(&w, &ok).is_empty(), "{:#?}", problems(&w, &ok));
    // GOOD ends at line 23; the first RTU source takes lines 25-32, the second 34-41.
    expect(
        &w,
        &format!("{GOOD}{}{}", rtu("m1", 1, 9600), rtu("m2", 2, 19200)),
        37,
        "shares port \"/dev/ttyS1\" with source \"m1\"",
    );
    expect(
        &w,
        &format!("{GOOD}{}{}", rtu("m1", 1, 9600), rtu("m2", 1, 9600)),
        39,
        "each device on a bus needs its own unit id",
    );
    expect(
        &w,
        &format!("{GOOD}{}", rtu("m1", 0, 9600)),
        30,
        "unit must be from 1 to 247",
    );
}

//! The validation pass: everything serde cannot check alone (cross references, files on
//! disk, ranges, the policy and register plans), reported all at once with a [`KeyPath`] each.

use std::collections::{BTreeMap, BTreeSet};

use super::{Config, KeyPath, SourceKind};
use crate::collect::modbus::ReadPlan;
use crate::policy::Policy;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    /// Works, but probably not what was meant.
    Warning,
}

#[derive(Debug, Clone)]
pub struct Problem {
    pub severity: Severity,
    pub path: KeyPath,
    pub message: String,
}

#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn error(&mut self, path: KeyPath, message: impl Into<String>) {
        self.0.push(Problem {
            severity: Severity::Error,
            path,
            message: message.into(),
        });
    }

    fn warn(&mut self, path: KeyPath, message: impl Into<String>) {
        self.0.push(Problem {
            severity: Severity::Warning,
            path,
            message: message.into(),
        });
    }
}

/// Checks a parsed config and returns every problem found (an empty list means usable).
pub fn validate(config: &Config) -> Vec<Problem> {
    let mut p = Problems::default();
    let root = KeyPath::root();
    check_gateway(config, &mut p);
    check_uplink(config, &mut p);
    check_batch(config, &mut p);
    check_health(config, &mut p);
    check_audit(config, &mut p);

    let key = match &config.pseudonym {
        None => None,
        Some(pc) => match crate::policy::PseudonymKey::load(&pc.key) {
            Ok(k) => Some(std::sync::Arc::new(k)),
            Err(msg) => {
                p.error(root.key("pseudonym").key("key"), msg);
                // Check the policies as if the key were there, so their own problems show.
                Some(std::sync::Arc::new(
                    crate::policy::PseudonymKey::from_bytes(&[0; 32]),
                ))
            }
        },
    };
    let mut compiled: BTreeMap<&str, Policy> = BTreeMap::new();
    for (name, policy) in &config.policies {
        let at = root.key("policies").key(name.as_str());
        match Policy::compile(policy, key.as_ref()) {
            Ok(c) => {
                compiled.insert(name.as_str(), c);
            }
            Err(errs) => {
                for (rel, msg) in errs {
                    let mut path = at.clone();
                    path.0.extend(rel.0);
                    p.error(path, format!("policy {name:?}: {msg}"));
                }
            }
        }
    }

    for (name, prof) in &config.profiles {
        let at = root.key("profiles").key(name.as_str());
        if prof.points.is_empty() {
            p.error(at.key("points"), format!("profile {name:?} has no points"));
        }
        plan_problems(&prof.points, &at, &mut p);
    }

    let mut ids = BTreeSet::new();
    for (i, s) in config.sources.iter().enumerate() {
        let at = root.key("sources").idx(i);
        if let Err(msg) = check_identifier(&s.id) {
            p.error(at.key("id"), format!("source id {msg}"));
        } else if !ids.insert(s.id.as_str()) {
            p.error(
                at.key("id"),
                format!(
                    "duplicate source id {:?}: each source needs its own id",
                    s.id
                ),
            );
        }
        if !config.policies.contains_key(&s.policy) {
            let known: Vec<&str> = config.policies.keys().map(String::as_str).collect();
            p.error(
                at.key("policy"),
                format!(
                    "source {:?} names policy {:?}, which is not defined; add [policies.{}] or use one of {:?}",
                    s.id, s.policy, s.policy, known
                ),
            );
        }
        if s.interval.0.as_millis() < 10 {
            p.error(at.key("interval"), "interval must be at least 10ms");
        }
        if s.timeout.0.is_zero() {
            p.error(at.key("timeout"), "timeout must be more than zero");
        }
        check_kind_keys(s, &at, &mut p);
        match s.kind {
            SourceKind::ModbusTcp => check_modbus_tcp(config, s, &at, &mut p),
            SourceKind::ModbusRtu => check_modbus_rtu(config, s, &at, &mut p),
            SourceKind::File => check_file(s, &at, &mut p),
        }
        let points = config.points_of(s);
        let mut names = BTreeSet::new();
        for (j, pt) in points.iter().enumerate() {
            if !names.insert(pt.name.as_str()) {
                p.error(
                    at.key("points").idx(j).key("name"),
                    format!("duplicate point name {:?} in source {:?}", pt.name, s.id),
                );
            }
        }
        for tag in s.tags.keys() {
            if names.contains(tag.as_str()) {
                p.error(
                    at.key("tags").key(tag.as_str()),
                    format!(
                        "tag {tag:?} has the same name as a point of source {:?}",
                        s.id
                    ),
                );
            }
        }
        if let Some(policy) = compiled.get(s.policy.as_str()) {
            let fields = points
                .iter()
                .map(|pt| pt.name.as_str())
                .chain(s.tags.keys().map(String::as_str));
            for f in fields {
                if !policy.has_rule(f) {
                    p.warn(
                        at.key("policy"),
                        format!(
                            "field {f:?} of source {:?} has no rule in policy {:?}: it will be dropped (add a rule to send it)",
                            s.id, s.policy
                        ),
                    );
                }
            }
        }
    }
    p.0
}

fn check_gateway(config: &Config, p: &mut Problems) {
    let at = KeyPath::root().key("gateway");
    if let Err(msg) = check_identifier(&config.gateway.id) {
        p.error(at.key("id"), format!("gateway id {msg}"));
    }
    if config.gateway.state_dir.as_os_str().is_empty() {
        p.error(at.key("state_dir"), "state_dir must name a directory");
    }
}

/// Ids end up in file names at the platform and in certificate CNs: keep them plain.
pub fn check_identifier(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err(format!("{id:?} must be 1 to 64 characters long"));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{id:?} contains {bad:?}: use only ASCII letters, digits, '-', '_' and '.'"
        ));
    }
    if id.starts_with('.') {
        return Err(format!("{id:?} must not start with '.'"));
    }
    Ok(())
}

fn check_uplink(config: &Config, p: &mut Problems) {
    let at = KeyPath::root().key("uplink");
    let u = &config.uplink;
    if let Err(msg) = crate::uplink::Endpoint::parse(&u.url) {
        p.error(at.key("url"), msg);
    }
    for (key, path, private) in [
        ("ca", &u.ca, false),
        ("cert", &u.cert, false),
        ("key", &u.key, true),
        ("recipient", &u.recipient, false),
    ] {
        match std::fs::metadata(path) {
            Err(e) => p.error(
                at.key(key),
                format!("cannot read {key} file {}: {e}", path.display()),
            ),
            Ok(m) if !m.is_file() => {
                p.error(at.key(key), format!("{} is not a file", path.display()))
            }
            Ok(_) if private => {
                if let Err(msg) = crate::keys::check_private_mode(path) {
                    p.error(at.key(key), msg);
                }
            }
            Ok(_) => {}
        }
    }
    check_identity(config, p);
    if u.timeout.0.is_zero() {
        p.error(at.key("timeout"), "timeout must be more than zero");
    }
    if u.backoff_min.0.is_zero() || u.backoff_min > u.backoff_max {
        p.error(
            at.key("backoff_min"),
            "backoff_min must be more than zero and at most backoff_max",
        );
    }
    if !(1..=16).contains(&u.in_flight) {
        p.error(at.key("in_flight"), "in_flight must be from 1 to 16");
    }
    for (i, w) in u.windows.iter().enumerate() {
        if let Err(msg) = crate::uplink::Window::parse(w) {
            p.error(at.key("windows").idx(i), msg);
        }
    }
    if u.max_bytes_per_sec.is_some_and(|b| b.0 < 1024) {
        p.error(
            at.key("max_bytes_per_sec"),
            "max_bytes_per_sec must be at least 1KiB",
        );
    }
    if let Some(every) = u.every {
        if every.0.as_millis() < 100 {
            p.error(at.key("every"), "every must be at least 100ms");
        }
    }
}

fn check_audit(config: &Config, p: &mut Problems) {
    let at = KeyPath::root().key("audit");
    let a = &config.audit;
    let days = |d: &super::HumanDuration| d.0.as_secs() / 86_400;
    if days(&a.keep_processing) < super::MIN_KEEP_PROCESSING_DAYS {
        p.error(
            at.key("keep_processing"),
            format!(
                "processing records must be kept at least 3 years: use \"{}d\" or more",
                super::MIN_KEEP_PROCESSING_DAYS
            ),
        );
    }
    if days(&a.keep_security) < super::MIN_KEEP_SECURITY_DAYS {
        p.error(
            at.key("keep_security"),
            format!(
                "network and security records must be kept at least 6 months: use \"{}d\" or more",
                super::MIN_KEEP_SECURITY_DAYS
            ),
        );
    }
}

fn check_health(config: &Config, p: &mut Problems) {
    let Some(h) = &config.health else { return };
    let at = KeyPath::root().key("health");
    if h.listen.parse::<std::net::SocketAddr>().is_err() {
        p.error(
            at.key("listen"),
            format!(
                "listen {:?} must be ip:port, e.g. \"0.0.0.0:9443\"",
                h.listen
            ),
        );
    }
    if h.allow.is_empty() {
        p.error(at.key("allow"), "allow must list at least one client identity (certificate CN), e.g. [\"platform-health\"]");
    }
}

fn check_batch(config: &Config, p: &mut Problems) {
    let at = KeyPath::root().key("batch");
    let b = &config.batch;
    if !(1..=1_000_000).contains(&b.max_records) {
        p.error(
            at.key("max_records"),
            "max_records must be from 1 to 1000000",
        );
    }
    if !(1024..=64 << 20).contains(&b.max_bytes.0) {
        p.error(at.key("max_bytes"), "max_bytes must be from 1KiB to 64MiB");
    }
    if b.max_age.0.as_millis() < 100 {
        p.error(at.key("max_age"), "max_age must be at least 100ms");
    }
    let buf = &config.buffer;
    if buf.max_bytes.0 < b.max_bytes.0.saturating_mul(2) {
        p.error(
            KeyPath::root().key("buffer").key("max_bytes"),
            format!(
                "buffer.max_bytes ({}) must hold at least two batches of batch.max_bytes ({})",
                buf.max_bytes, b.max_bytes
            ),
        );
    }
}

fn check_modbus_tcp(config: &Config, s: &super::SourceConfig, at: &KeyPath, p: &mut Problems) {
    match s.address.as_deref() {
        None => p.error(
            at.key("address"),
            format!(
                "source {:?} of kind modbus-tcp needs address = \"host:port\"",
                s.id
            ),
        ),
        Some(a) => {
            if let Err(msg) = crate::collect::modbus::check_address(a) {
                p.error(at.key("address"), msg);
            }
        }
    }
    check_points(config, s, at, p);
}

/// A key of another kind of source is a mistake worth naming (serde cannot: the keys share
/// one table).
fn check_kind_keys(s: &super::SourceConfig, at: &KeyPath, p: &mut Problems) {
    let modbus = matches!(s.kind, SourceKind::ModbusTcp | SourceKind::ModbusRtu);
    let set: [(&str, bool, bool); 20] = [
        // (key, is set, applies to this kind)
        (
            "address",
            s.address.is_some(),
            s.kind == SourceKind::ModbusTcp,
        ),
        ("points", !s.points.is_empty(), modbus),
        ("profile", s.profile.is_some(), modbus),
        ("port", s.port.is_some(), s.kind == SourceKind::ModbusRtu),
        ("baud", s.baud.is_some(), s.kind == SourceKind::ModbusRtu),
        (
            "parity",
            s.parity.is_some(),
            s.kind == SourceKind::ModbusRtu,
        ),
        (
            "stop_bits",
            s.stop_bits.is_some(),
            s.kind == SourceKind::ModbusRtu,
        ),
        (
            "frame_gap",
            s.frame_gap.is_some(),
            s.kind == SourceKind::ModbusRtu,
        ),
        ("spool", s.spool.is_some(), s.kind == SourceKind::File),
        ("pattern", s.pattern.is_some(), s.kind == SourceKind::File),
        ("format", s.format.is_some(), s.kind == SourceKind::File),
        (
            "encoding",
            s.encoding != super::TextEncoding::Auto,
            s.kind == SourceKind::File,
        ),
        (
            "delimiter",
            s.delimiter.is_some(),
            s.kind == SourceKind::File,
        ),
        ("settle", s.settle.is_some(), s.kind == SourceKind::File),
        ("marker", s.marker.is_some(), s.kind == SourceKind::File),
        ("after", s.after.is_some(), s.kind == SourceKind::File),
        ("move_to", s.move_to.is_some(), s.kind == SourceKind::File),
        ("columns", !s.columns.is_empty(), s.kind == SourceKind::File),
        (
            "time_column",
            s.time_column.is_some(),
            s.kind == SourceKind::File,
        ),
        ("tz", s.tz.is_some(), s.kind == SourceKind::File),
    ];
    let kind = match s.kind {
        SourceKind::ModbusTcp => "modbus-tcp",
        SourceKind::ModbusRtu => "modbus-rtu",
        SourceKind::File => "file",
    };
    for (key, is_set, applies) in set {
        if is_set && !applies {
            p.error(
                at.key(key),
                format!("{key} does not apply to a source of kind {kind}: remove it"),
            );
        }
    }
}

fn check_points(config: &Config, s: &super::SourceConfig, at: &KeyPath, p: &mut Problems) {
    match &s.profile {
        Some(name) if !s.points.is_empty() => p.error(
            at.key("profile"),
            format!(
                "source {:?} has both points and profile = {name:?}: use one",
                s.id
            ),
        ),
        Some(name) if !config.profiles.contains_key(name) => {
            let known: Vec<&str> = config.profiles.keys().map(String::as_str).collect();
            p.error(
                at.key("profile"),
                format!("source {:?} names profile {name:?}, which is not defined under [profiles]; known: {known:?}", s.id),
            )
        }
        // A profile's own points are checked once, under [profiles].
        Some(_) => {}
        None if s.points.is_empty() => p.error(
            at.key("points"),
            format!(
                "source {:?} has no points to read (add points or a profile)",
                s.id
            ),
        ),
        None => plan_problems(&s.points, at, p),
    }
}

fn check_modbus_rtu(config: &Config, s: &super::SourceConfig, at: &KeyPath, p: &mut Problems) {
    match s.port.as_deref() {
        None | Some("") => p.error(
            at.key("port"),
            format!(
                "source {:?} of kind modbus-rtu needs port = \"/dev/ttyS1\" (the serial device)",
                s.id
            ),
        ),
        Some(_) => {}
    }
    if s.unit == 0 || s.unit > 247 {
        p.error(
            at.key("unit"),
            "unit must be from 1 to 247 on a serial line (0 is broadcast, which has no reply)",
        );
    }
    if let Some(b) = s.baud {
        if !(300..=921_600).contains(&b) {
            p.error(at.key("baud"), "baud must be from 300 to 921600");
        }
    }
    if let Some(sb) = s.stop_bits {
        if !(1..=2).contains(&sb) {
            p.error(at.key("stop_bits"), "stop_bits must be 1 or 2");
        }
    }
    // Sources on one port share the line: their settings must agree.
    if let Some(port) = &s.port {
        let first = config
            .sources
            .iter()
            .find(|o| o.kind == SourceKind::ModbusRtu && o.port.as_ref() == Some(port));
        if let Some(o) = first.filter(|o| o.id != s.id) {
            let line = |x: &super::SourceConfig| (x.baud, x.parity, x.stop_bits);
            if line(o) != line(s) {
                p.error(
                    at.key("port"),
                    format!(
                        "source {:?} shares port {port:?} with source {:?} but sets baud, parity or stop_bits differently: one bus has one setting",
                        s.id, o.id
                    ),
                );
            }
            if o.unit == s.unit {
                p.error(
                    at.key("unit"),
                    format!(
                        "source {:?} uses unit {} on port {port:?}, as does source {:?}: each device on a bus needs its own unit id",
                        s.id, s.unit, o.id
                    ),
                );
            }
        }
    }
    check_points(config, s, at, p);
}

fn check_file(s: &super::SourceConfig, at: &KeyPath, p: &mut Problems) {
    match &s.spool {
        None => p.error(
            at.key("spool"),
            format!(
                "source {:?} of kind file needs spool = \"/var/spool/shuyuan/<name>\" (the directory the export lands in)",
                s.id
            ),
        ),
        Some(dir) if !dir.is_dir() => p.warn(
            at.key("spool"),
            format!(
                "spool directory {} does not exist yet: the source reports an error until it does",
                dir.display()
            ),
        ),
        Some(_) => {}
    }
    if s.pattern.as_deref() == Some("") {
        p.error(
            at.key("pattern"),
            "pattern must not be empty (use \"*\" for every file)",
        );
    }
    if s.marker.as_deref() == Some("") {
        p.error(
            at.key("marker"),
            "marker must be a suffix such as \".done\"",
        );
    }
    if s.marker.is_some() && s.settle.is_some() {
        p.warn(at.key("settle"), "settle is not used when a marker is set");
    }
    match (s.after, &s.move_to) {
        (Some(super::AfterIngest::Move), None) => p.error(
            at.key("after"),
            "after = \"move\" needs move_to = \"<directory>\"",
        ),
        (Some(super::AfterIngest::Delete) | None, Some(_)) => p.error(
            at.key("move_to"),
            "move_to is used only with after = \"move\"",
        ),
        _ => {}
    }
    if let (Some(spool), Some(to)) = (&s.spool, &s.move_to) {
        if spool == to {
            p.error(
                at.key("move_to"),
                "move_to must not be the spool itself (files would be taken again)",
            );
        }
    }
    if let Err(errs) = crate::collect::file::Layout::from_config(s) {
        for (key, msg) in errs {
            p.error(at.key(key), msg);
        }
    }
}

fn plan_problems(points: &[super::PointConfig], at: &KeyPath, p: &mut Problems) {
    if let Err(errs) = ReadPlan::build(points) {
        for (rel, msg) in errs {
            let mut path = at.clone();
            path.0.extend(rel.0);
            p.error(path, msg);
        }
    }
}
/// The client certificate must hold the signing key and name this gateway, or the platform
/// refuses every batch. Checked only when both files could be read (else reported above).
fn check_identity(config: &Config, p: &mut Problems) {
    let u = &config.uplink;
    let at = KeyPath::root().key("uplink").key("cert");
    let (Ok(certs), Ok(signer)) = (
        crate::tls::load_certs(&u.cert),
        crate::keys::Signer::load(&u.key),
    ) else {
        if let Err(e) = crate::tls::load_certs(&u.cert) {
            if u.cert.is_file() {
                p.error(at, e.to_string());
            }
        }
        return;
    };
    match crate::tls::identity(&certs[0]) {
        Err(e) => p.error(at, format!("{}: {e}", u.cert.display())),
        Ok(id) => {
            if id.spki_der != signer.spki_der() {
                p.error(
                    at.clone(),
                    format!(
                        "{} is not the certificate of key {}",
                        u.cert.display(),
                        u.key.display()
                    ),
                );
            }
            if id.cn != config.gateway.id && check_identifier(&config.gateway.id).is_ok() {
                p.error(
                    at,
                    format!(
                        "certificate CN is {:?} but gateway.id is {:?}: they must be equal (the platform checks it)",
                        id.cn, config.gateway.id
                    ),
                );
            }
        }
    }
}

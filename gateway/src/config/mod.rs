//! The gateway's one TOML file: plain serde structs with named defaults and
//! `deny_unknown_fields`, loaded by [`load`], which also runs [`validate`] and reports every
//! problem at once as `FILE:LINE:COL: what is wrong`.
//!
//! Relative paths in the file (certificates, keys) are taken relative to the file's own
//! directory, so `/etc/shuyuan/gateway.toml` can say `ca = "certs/platform-ca.pem"`.

mod locate;
pub mod units;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use locate::Locator;
pub use units::{ByteSize, HumanDuration};
pub use validate::{check_identifier, validate, Problem, Severity};

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub uplink: UplinkConfig,
    #[serde(default)]
    pub batch: BatchConfig,
    #[serde(default)]
    pub buffer: BufferConfig,
    #[serde(default)]
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub policies: BTreeMap<String, PolicyConfig>,
    /// Device profiles: a point list written once and used by many sources.
    #[serde(default)]
    pub profiles: BTreeMap<String, ProfileConfig>,
    #[serde(default)]
    pub pseudonym: Option<PseudonymConfig>,
    #[serde(default)]
    pub status: StatusConfig,
    #[serde(default)]
    pub audit: AuditConfig,
    /// The platform's pull endpoint; off when absent.
    #[serde(default)]
    pub health: Option<HealthConfig>,
}

/// `[audit]`: how long the trail is kept. The regulation asks for processing records for 3
/// years and network/security records for at least 6 months; values below are refused.
/// Entries are removed oldest first, so security entries are kept as long as processing ones
/// (the chain must stay verifiable).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    #[serde(default = "default_keep_processing")]
    pub keep_processing: HumanDuration,
    #[serde(default = "default_keep_security")]
    pub keep_security: HumanDuration,
}

pub const MIN_KEEP_PROCESSING_DAYS: u64 = 1095;
pub const MIN_KEEP_SECURITY_DAYS: u64 = 183;

fn default_keep_processing() -> HumanDuration {
    HumanDuration::secs(MIN_KEEP_PROCESSING_DAYS * 86_400)
}
fn default_keep_security() -> HumanDuration {
    HumanDuration::secs(MIN_KEEP_SECURITY_DAYS * 86_400)
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            keep_processing: default_keep_processing(),
            keep_security: default_keep_security(),
        }
    }
}

impl AuditConfig {
    /// How long entries stay: the longer of the two.
    pub fn keep(&self) -> std::time::Duration {
        self.keep_processing.0.max(self.keep_security.0)
    }
}

/// `[health]`: HTTPS for the platform, mutual TLS, only listed identities.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `ip:port`, e.g. "0.0.0.0:9443".
    pub listen: String,
    /// Client certificate CNs (of the platform's CA) allowed to read health.
    pub allow: Vec<String>,
}

/// `[status]`: where `shuyuan status` finds the running daemon.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatusConfig {
    /// Unix socket, created 0660; `<state_dir>/status.sock` when not set.
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

impl Config {
    pub fn status_socket(&self) -> PathBuf {
        self.status
            .socket
            .clone()
            .unwrap_or_else(|| self.gateway.state_dir.join("status.sock"))
    }
}

impl Config {
    /// The points a source reads: its own, or its profile's.
    pub fn points_of<'a>(&'a self, s: &'a SourceConfig) -> &'a [PointConfig] {
        match &s.profile {
            Some(name) => self.profiles.get(name).map_or(&[], |p| p.points.as_slice()),
            None => &s.points,
        }
    }
}

/// The register map of a device model, shared by every source that names it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileConfig {
    pub points: Vec<PointConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Equals the CN of the gateway's client certificate.
    pub id: String,
    /// Where the SQLite outbox lives. Nothing raw is ever written here.
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// Batches go to `{url}/v1/batches`.
    pub url: String,
    /// Trust anchor for the platform's server certificate.
    pub ca: PathBuf,
    /// The gateway's client certificate (chain) and its private key (must be 0600).
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The platform's HPKE X25519 public key, PEM (SubjectPublicKeyInfo).
    pub recipient: PathBuf,
    /// Push on this period; without it, a batch is pushed as soon as it is sealed.
    #[serde(default)]
    pub every: Option<HumanDuration>,
    /// Push only inside these daily windows of local time, e.g. ["01:00-05:00"].
    #[serde(default)]
    pub windows: Vec<String>,
    /// Batches uploaded at once, each on its own connection (oldest first).
    #[serde(default = "default_in_flight")]
    pub in_flight: usize,
    /// A cap on upload bandwidth (metered links), e.g. "64KiB" per second.
    #[serde(default)]
    pub max_bytes_per_sec: Option<ByteSize>,
    /// One request's limit: connect, handshake, upload and answer.
    #[serde(default = "default_uplink_timeout")]
    pub timeout: HumanDuration,
    /// Backoff between failed attempts grows from `backoff_min` to at most `backoff_max`.
    #[serde(default = "default_backoff_min")]
    pub backoff_min: HumanDuration,
    #[serde(default = "default_backoff_max")]
    pub backoff_max: HumanDuration,
}

fn default_in_flight() -> usize {
    1
}
fn default_uplink_timeout() -> HumanDuration {
    HumanDuration::secs(30)
}
fn default_backoff_min() -> HumanDuration {
    HumanDuration::secs(1)
}
fn default_backoff_max() -> HumanDuration {
    HumanDuration::secs(300)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchConfig {
    #[serde(default = "default_max_records")]
    pub max_records: u32,
    #[serde(default = "default_batch_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default = "default_max_age")]
    pub max_age: HumanDuration,
}

fn default_max_records() -> u32 {
    5000
}
fn default_batch_bytes() -> ByteSize {
    ByteSize::mib(4)
}
fn default_max_age() -> HumanDuration {
    HumanDuration::secs(60)
}

impl Default for BatchConfig {
    fn default() -> Self {
        Self {
            max_records: default_max_records(),
            max_bytes: default_batch_bytes(),
            max_age: default_max_age(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// The most sealed bytes the outbox holds.
    #[serde(default = "default_buffer_bytes")]
    pub max_bytes: ByteSize,
    #[serde(default)]
    pub on_full: OnFull,
    /// Free space the outbox leaves on the state_dir's file system; below it, the buffer
    /// counts as full (on_full applies).
    #[serde(default = "default_min_free_disk")]
    pub min_free_disk: ByteSize,
}

fn default_min_free_disk() -> ByteSize {
    ByteSize::mib(64)
}

fn default_buffer_bytes() -> ByteSize {
    ByteSize::mib(2048)
}

impl Default for BufferConfig {
    fn default() -> Self {
        Self {
            max_bytes: default_buffer_bytes(),
            on_full: OnFull::default(),
            min_free_disk: default_min_free_disk(),
        }
    }
}

/// What the outbox does when `buffer.max_bytes` is reached.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Evict the oldest sealed batches (counted) so the newest data keeps flowing.
    #[default]
    DropOldest,
    /// Stop accepting new batches until the platform acks some; sources count what waits.
    Pause,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    ModbusTcp,
    /// Modbus RTU on a serial line (RS-485): sources naming the same `port` share one bus.
    ModbusRtu,
    /// Export files (CSV or JSON Lines) dropped into a spool directory.
    File,
}

/// One data source. Kind-specific keys are optional here and required by validation, so
/// that serde keeps exact line numbers for every key.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub id: String,
    pub kind: SourceKind,
    /// The name of a table under `[policies]`.
    pub policy: String,
    /// modbus-tcp: `host:port` of the device or its gateway.
    #[serde(default)]
    pub address: Option<String>,
    /// Modbus unit (slave) id.
    #[serde(default = "default_unit")]
    pub unit: u8,
    #[serde(default = "default_interval")]
    pub interval: HumanDuration,
    /// Per request: a device that does not answer in time counts as a failed poll.
    #[serde(default = "default_source_timeout")]
    pub timeout: HumanDuration,
    /// Fixed fields added to every record of this source (they pass the policy too).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub points: Vec<PointConfig>,
    /// Or: the name of a table under `[profiles]` whose points this source reads.
    #[serde(default)]
    pub profile: Option<String>,

    /// modbus-rtu: the serial device, e.g. "/dev/ttyS1" or "/dev/ttyUSB0".
    #[serde(default)]
    pub port: Option<String>,
    /// modbus-rtu line settings (every source on one port must agree): 9600 baud, 8 data
    /// bits, even parity and 1 stop bit unless set (the Modbus serial line default).
    #[serde(default)]
    pub baud: Option<u32>,
    #[serde(default)]
    pub parity: Option<Parity>,
    #[serde(default)]
    pub stop_bits: Option<u8>,
    /// modbus-rtu: quiet time kept on the bus before each request; 3.5 character times
    /// (at least 1.75ms) when not set.
    #[serde(default)]
    pub frame_gap: Option<HumanDuration>,

    /// file: the directory the business system exports into.
    #[serde(default)]
    pub spool: Option<PathBuf>,
    /// file: which names to take, e.g. "*.csv" ("*" when not set). Hidden files and names
    /// ending in .tmp, .part or the marker suffix are never taken.
    #[serde(default)]
    pub pattern: Option<String>,
    #[serde(default)]
    pub format: Option<FileFormat>,
    #[serde(default)]
    pub encoding: TextEncoding,
    /// file (csv): the field separator, "," when not set.
    #[serde(default)]
    pub delimiter: Option<char>,
    /// file: a file is complete when it has not changed for this long ("30s" when not set).
    #[serde(default)]
    pub settle: Option<HumanDuration>,
    /// file: or when a marker file `<name><marker>` exists, e.g. ".done" (then settle is not
    /// used). The marker goes with the file.
    #[serde(default)]
    pub marker: Option<String>,
    /// file: what happens to a file once its records are committed ("delete" when not set).
    #[serde(default)]
    pub after: Option<AfterIngest>,
    /// file: with after = "move", where ingested files go.
    #[serde(default)]
    pub move_to: Option<PathBuf>,
    /// file: typed columns; columns not listed pass as text (and meet the policy's default
    /// deny unless it has a rule for them).
    #[serde(default)]
    pub columns: Vec<ColumnConfig>,
    /// file: the column (by its field name) whose timestamp is the record's time; the
    /// ingest time when not set.
    #[serde(default)]
    pub time_column: Option<String>,
    /// file: the UTC offset of timestamps without one, "+08:00" when not set.
    #[serde(default)]
    pub tz: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Parity {
    None,
    Even,
    Odd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileFormat {
    Csv,
    Jsonl,
}

/// How export files are encoded. `auto`: a BOM decides; else UTF-8 when the text is valid
/// UTF-8, GB18030 (a superset of GBK) when not.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextEncoding {
    #[default]
    Auto,
    #[serde(alias = "utf8")]
    Utf8,
    Gbk,
    Gb18030,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AfterIngest {
    /// Overwritten with zeros, synced, then unlinked (see docs/operations.md for what that
    /// can and cannot promise on flash).
    Delete,
    /// Renamed into `move_to` (kept by the utility, outside the gateway's care).
    Move,
}

/// One typed column of an export file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    /// The field name in records (and in the policy).
    pub name: String,
    /// The column's name in the file's header (or the JSON key); `name` when not set.
    #[serde(default)]
    pub header: Option<String>,
    #[serde(rename = "type", default)]
    pub column_type: ColumnType,
    /// timestamp: a chrono format, e.g. "%Y-%m-%d %H:%M:%S" or "%Y%m%d"; common layouts
    /// are tried when not set.
    #[serde(default)]
    pub format: Option<String>,
    /// An empty cell makes the row bad (quarantined) instead of leaving the field out.
    #[serde(default)]
    pub required: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    #[default]
    String,
    Integer,
    /// Exact: the digits are carried as written (no binary floating point).
    Decimal,
    Timestamp,
    Bool,
}

fn default_unit() -> u8 {
    1
}
fn default_interval() -> HumanDuration {
    HumanDuration::secs(1)
}
fn default_source_timeout() -> HumanDuration {
    HumanDuration::secs(1)
}

/// One value read from a device.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PointConfig {
    pub name: String,
    pub register: RegisterKind,
    /// Zero-based protocol address (register 40101 is holding address 100).
    pub address: u16,
    #[serde(rename = "type")]
    pub data_type: DataType,
    /// Byte and word order of multi-register values; ABCD (big-endian) when absent.
    #[serde(default)]
    pub order: Option<WordOrder>,
    /// value * scale + offset, giving a float.
    #[serde(default)]
    pub scale: Option<f64>,
    #[serde(default)]
    pub offset: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterKind {
    Holding,
    Input,
    Coil,
    Discrete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataType {
    Bool,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F32,
    F64,
}

/// Byte order within a register and word order across registers, named by where the bytes
/// of the big-endian value `A B C D` land on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum WordOrder {
    #[default]
    ABCD,
    CDAB,
    BADC,
    DCBA,
}

/// A named de-identification policy: fields not listed are dropped.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRuleConfig>,
}

/// One field's rule. Options apply to one action each; validation refuses the others.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldRuleConfig {
    /// Optional here so that a graded field without an action gets its own message.
    #[serde(default)]
    pub action: Option<ActionKind>,
    pub grade: Grade,
    /// mask: characters kept at the start and the end; the rest become `mask_char`.
    #[serde(default)]
    pub keep_head: Option<usize>,
    #[serde(default)]
    pub keep_tail: Option<usize>,
    #[serde(default)]
    pub mask_char: Option<char>,
    /// pseudonymize: text put before the token, and the token's length in characters.
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub length: Option<usize>,
    /// generalize: an address to province / city / district, a date to day / month / year.
    #[serde(default)]
    pub level: Option<Level>,
    /// generalize: a number to the bucket between two bounds (ascending), e.g. ages.
    #[serde(default)]
    pub buckets: Option<Vec<f64>>,
    /// round: to this many decimals.
    #[serde(default)]
    pub decimals: Option<u32>,
    /// round: to the nearest multiple of this step (GPS degrees to a grid, e.g. 0.01).
    #[serde(default)]
    pub grid: Option<f64>,
}

impl FieldRuleConfig {
    /// A rule with only an action and a grade (the other options unset).
    pub fn new(action: ActionKind, grade: Grade) -> Self {
        Self {
            action: Some(action),
            grade,
            keep_head: None,
            keep_tail: None,
            mask_char: None,
            prefix: None,
            length: None,
            level: None,
            buckets: None,
            decimals: None,
            grid: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    Keep,
    Drop,
    Mask,
    Pseudonymize,
    Generalize,
    Round,
    Scrub,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Province,
    City,
    District,
    Day,
    Month,
    Year,
}

/// `[pseudonym]`: the per-deployment secret that keys pseudonyms (made by `shuyuan keys init`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PseudonymConfig {
    pub key: PathBuf,
}

/// Classification grade of a field, lowest to highest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Grade {
    Public,
    Internal,
    Personal,
    /// Sensitive personal information (GB/T 35273): never leaves in clear.
    Sensitive,
}

/// Why a configuration could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Every problem found, each already rendered as `FILE:LINE:COL: message`.
    #[error("{}", render(.problems))]
    Invalid { problems: Vec<String> },
}

fn render(problems: &[String]) -> String {
    problems.join("\n")
}

/// A loaded and validated config, with the warnings validation found.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub path: PathBuf,
    pub warnings: Vec<String>,
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    load_str(&text, path)
}

/// Reads and parses a config file without the validation pass (no file or certificate
/// checks): for the commands that only need to find the state directory or the status socket
/// (status, audit, outbox, push, purge), which must work on a box whose keys are gone or
/// broken.
pub fn load_unchecked(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut config: Config = parse_toml(&text, path, &Locator::new(&text))?;
    resolve_paths(&mut config, path.parent().unwrap_or(Path::new(".")));
    Ok(config)
}

/// Deserialises TOML text, turning a syntax or schema error into `FILE:LINE:COL: message`.
/// Shared by the gateway's and the receiver's config files.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
    locator: &Locator<'_>,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, col) = e
            .span()
            .map(|s| locator.line_col(s.start))
            .unwrap_or((1, 1));
        ConfigError::Invalid {
            problems: vec![format!(
                "{}:{line}:{col}: {}",
                path.display(),
                e.message().trim_end()
            )],
        }
    })
}

/// Parses and validates config text as if read from `path` (which anchors relative paths
/// and names the file in messages).
pub fn load_str(text: &str, path: &Path) -> Result<Loaded, ConfigError> {
    let shown = path.display().to_string();
    let locator = Locator::new(text);
    let mut config: Config = parse_toml(text, path, &locator)?;
    let base = path.parent().unwrap_or(Path::new("."));
    resolve_paths(&mut config, base);
    let problems = validate(&config);
    let (errors, warnings): (Vec<_>, Vec<_>) = problems
        .into_iter()
        .partition(|p| p.severity == Severity::Error);
    let show = |p: &Problem| {
        let (line, col) = locator.locate(&p.path);
        format!("{shown}:{line}:{col}: {}", p.message)
    };
    if !errors.is_empty() {
        return Err(ConfigError::Invalid {
            problems: errors.iter().map(show).collect(),
        });
    }
    Ok(Loaded {
        config,
        path: path.to_path_buf(),
        warnings: warnings
            .iter()
            .map(|p| format!("warning: {}", show(p)))
            .collect(),
    })
}

fn resolve_paths(config: &mut Config, base: &Path) {
    let u = &mut config.uplink;
    for p in [&mut u.ca, &mut u.cert, &mut u.key, &mut u.recipient] {
        *p = base.join(&*p);
    }
    config.gateway.state_dir = base.join(&config.gateway.state_dir);
    if let Some(p) = &mut config.pseudonym {
        p.key = base.join(&p.key);
    }
    if let Some(s) = &mut config.status.socket {
        *s = base.join(&*s);
    }
    for s in &mut config.sources {
        for p in [&mut s.spool, &mut s.move_to].into_iter().flatten() {
            *p = base.join(&*p);
        }
    }
}

/// A path into the config document, such as `sources[2].points[0].type`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Seg>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

impl KeyPath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn key(&self, k: impl Into<String>) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Key(k.into()));
        Self(v)
    }

    pub fn idx(&self, i: usize) -> Self {
        let mut v = self.0.clone();
        v.push(Seg::Index(i));
        Self(v)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.0.iter().enumerate() {
            match s {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

//! Command-line interface: subcommands, logging set-up, signal handling and exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use tokio_util::sync::CancellationToken;

use shuyuan::config::{self, ConfigError};

/// Exit code for a configuration that cannot be used (EX_USAGE).
const EXIT_CONFIG: u8 = 64;
const DEFAULT_LOG: &str = "info";
/// In state_dir while `shuyuan run` runs, for `shuyuan push`.
const PID_FILE: &str = "shuyuan.pid";

type MakeDevice = fn() -> std::sync::Arc<shuyuan::sim::Device>;
type StepDevice = fn(&shuyuan::sim::Device, u64);

#[derive(Parser)]
#[command(
    name = "shuyuan",
    version,
    about = "Shuyuan (数源) edge gateway: collect, de-identify, seal and push public-utility data"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway daemon.
    Run {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file: exit 0, or print FILE:LINE:COL: problems and exit 64.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a simulated pump station, a receiver and the gateway, all on loopback.
    Demo {
        /// How long to run (Ctrl-C stops earlier).
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Keep certificates, SQLite files and receiver output in this directory.
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// Run the reference platform receiver.
    Receive {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Serve simulated Modbus TCP devices, to try a config without hardware.
    Simulate {
        /// Number of devices, on consecutive ports from --listen.
        #[arg(long, default_value_t = 1)]
        devices: u16,
        /// Address of the first device (port 0 picks free ports).
        #[arg(long, default_value = "127.0.0.1:5020")]
        listen: std::net::SocketAddr,
        /// pump: the demo's pump station; load: 100 changing holding registers.
        #[arg(long, value_enum, default_value_t = Profile::Pump)]
        profile: Profile,
    },
    /// Certificates and keys.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// One screen for a technician: sources, buffer, uplink, policy counts. Exit 0 OK,
    /// 1 DEGRADED, 2 DOWN (or not running).
    Status {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
        /// Refresh in place every 2 seconds until Ctrl-C.
        #[arg(long, conflicts_with = "json")]
        watch: bool,
        /// With --watch: stop after this many screens.
        #[arg(long, requires = "watch")]
        count: Option<u32>,
    },
    /// Destroy the buffered batches and the key material (gateway key, pseudonym key) for
    /// good, leaving only the audit trail with the destruction record. Stop the daemon first.
    Purge {
        #[arg(long, short)]
        config: PathBuf,
        /// Required: this cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Ask the running gateway to upload now, whatever its schedule (it gets SIGUSR1).
    Push {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Look at and act on the queue of sealed batches (for example quarantined ones).
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// The audit trail: list entries, verify the hash chain.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The pseudonym key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Review de-identification policies.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
}

#[derive(Subcommand)]
enum OutboxCommand {
    /// Every batch waiting in the outbox, oldest first, with its state and last error.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Put a quarantined batch back in the queue (after the platform was fixed).
    Retry {
        #[arg(long, short)]
        config: PathBuf,
        seq: u64,
    },
    /// Destroy a batch for good; its records are counted as dropped by the operator.
    Drop {
        #[arg(long, short)]
        config: PathBuf,
        seq: u64,
        /// Required: dropping cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// The export files that file sources took (newest first): state, records, bad rows;
    /// with --bad, the rows of one file (hash prefix) that could not be read, by line.
    Files {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, value_name = "SHA256_PREFIX")]
        bad: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Entries after an id, oldest first.
    List {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long, default_value_t = 1000)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
    /// Check every entry's hash and link; name the first one that does not fit (exit 1).
    Verify {
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create the per-deployment pseudonym key (32 random bytes, file mode 0600). Point
    /// [pseudonym] key at it. A new key changes every pseudonym: that is how keys rotate.
    Init {
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Show, field by field, what comes in and what would leave: for a sample file (CSV
    /// with a header row, or JSON Lines; UTF-8 or GBK) or, without --input, one live poll.
    Preview {
        #[arg(long, short)]
        config: PathBuf,
        /// The source whose policy to apply (and, without --input, to poll).
        #[arg(long, conflicts_with = "policy")]
        source: Option<String>,
        /// A policy by name, for samples of a source not configured yet.
        #[arg(long)]
        policy: Option<String>,
        #[arg(long)]
        input: Option<PathBuf>,
        /// At most this many records.
        #[arg(long, default_value_t = 5)]
        limit: usize,
        /// JSON for scripts.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Profile {
    Pump,
    Load,
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Make a development PKI: CA, platform server cert, gateway and health client certs,
    /// and the platform's HPKE key pair (private keys 0600).
    DevPki {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "GW-DEV-0001")]
        gateway_id: String,
        /// Extra DNS names or IPs for the platform server certificate.
        #[arg(long)]
        host: Vec<String>,
    },
    /// Make this gateway's key here (P-256, 0600; it never leaves the device) and a
    /// certificate signing request with the gateway id as CN, for the platform's CA.
    Request {
        #[arg(long)]
        id: String,
        /// A directory without a key in it (for a renewal, e.g. /etc/shuyuan/certs/next).
        #[arg(long)]
        out: PathBuf,
    },
    /// Check the certificate the CA issued (chain to the platform's CA, key, CN = gateway.id,
    /// dates) and swap it in atomically; a running gateway reloads it without a restart.
    Install {
        #[arg(long, short)]
        config: PathBuf,
        #[arg(long)]
        cert: PathBuf,
        /// Intermediate certificates (and the root, which is skipped) from the CA.
        #[arg(long)]
        chain: Option<PathBuf>,
        /// The key `certs request` made, to move in with the certificate (renewal with a
        /// new key); the configured key is kept when absent.
        #[arg(long)]
        key: Option<PathBuf>,
        /// The CA to check against; uplink.ca when absent.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Lab only: sign a request with a CA's certificate and key (the platform's CA does this
    /// in production).
    DevSign {
        #[arg(long)]
        ca_cert: PathBuf,
        #[arg(long)]
        ca_key: PathBuf,
        #[arg(long)]
        csr: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: i64,
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own progress; its log shows only what needs attention.
    let default = if matches!(cli.command, Command::Demo { .. }) {
        "warn"
    } else {
        DEFAULT_LOG
    };
    init_logging(cli.log_format, default);
    match run(cli.command) {
        Ok(code) => code,
        Err(e) => {
            if let Some(ConfigError::Invalid { problems }) = e.downcast_ref::<ConfigError>() {
                for p in problems {
                    eprintln!("{p}");
                }
                return ExitCode::from(EXIT_CONFIG);
            }
            eprintln!("error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHUYUAN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    // Colour only on a terminal: journald and log files get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A token that fires on SIGTERM or SIGINT.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{signal, SignalKind};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let t = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        t.cancel();
    });
    Ok(token)
}

fn run(cmd: Command) -> anyhow::Result<ExitCode> {
    match cmd {
        Command::Check { config } => {
            let loaded = config::load(&config)?;
            for w in &loaded.warnings {
                eprintln!("{w}");
            }
            println!(
                "{}: OK ({} sources, {} policies)",
                config.display(),
                loaded.config.sources.len(),
                loaded.config.policies.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Run { config } => {
            let loaded = config::load(&config)?;
            for w in &loaded.warnings {
                tracing::warn!("{w}");
            }
            let state_dir = loaded.config.gateway.state_dir.clone();
            std::fs::create_dir_all(&state_dir)
                .with_context(|| format!("cannot create {}", state_dir.display()))?;
            let pid_file = state_dir.join(PID_FILE);
            std::fs::write(&pid_file, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write {}", pid_file.display()))?;
            let outcome = runtime()?.block_on(async {
                let stop = shutdown_on_signals()?;
                let push = std::sync::Arc::new(tokio::sync::Notify::new());
                let mut usr1 =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
                        .context("cannot watch SIGUSR1")?;
                let p = push.clone();
                tokio::spawn(async move {
                    while usr1.recv().await.is_some() {
                        tracing::info!("push requested (SIGUSR1)");
                        p.notify_one();
                    }
                });
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
                        .context("cannot watch SIGHUP")?;
                let notifier = shuyuan::notify::Notifier::from_env();
                let mut current = loaded.config;
                // SIGHUP: a new configuration (and certificates and keys) is checked first; a bad
                // one is reported and the running one kept. A good one replaces it the way a
                // stop does, without the exit: the open batch is sealed and committed, and the
                // new run continues from the store (buffered batches stay where they are).
                loop {
                    let run_stop = stop.child_token();
                    let mut run = tokio::spawn({
                        let (cfg, run_stop, push) = (current.clone(), run_stop.clone(), push.clone());
                        async move {
                            shuyuan::daemon::run_with(&cfg, run_stop, Default::default(), push).await
                        }
                    });
                    let next = loop {
                        tokio::select! {
                            _ = stop.cancelled() => break None,
                            // The run ended by itself: a start-up error, which ends the process.
                            r = &mut run => return r.context("gateway task")?,
                            _ = hup.recv() => {}
                        }
                        tracing::info!(config = %config.display(), "SIGHUP: reloading the configuration");
                        match config::load(&config) {
                            Ok(l) => {
                                for w in &l.warnings {
                                    tracing::warn!("{w}");
                                }
                                break Some(l.config);
                            }
                            Err(e) => tracing::error!(
                                "the new configuration is not valid; the running one stays:\n{e}"
                            ),
                        }
                    };
                    if next.is_none() {
                        notifier.stopping();
                    } else {
                        notifier.reloading();
                    }
                    run_stop.cancel();
                    run.await.context("gateway task")??;
                    match next {
                        Some(c) => current = c,
                        None => break,
                    }
                }
                anyhow::Ok(())
            });
            let _ = std::fs::remove_file(&pid_file);
            outcome?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Push { config } => {
            let pid = signal_daemon(&config, "-USR1")?;
            println!("asked the running gateway (pid {pid}) to push now");
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo { seconds, dir } => {
            runtime()?.block_on(async {
                let stop = shutdown_on_signals()?;
                shuyuan::demo::run(shuyuan::demo::DemoOptions { seconds, dir }, stop).await
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Receive { config } => {
            let cfg = shuyuan::receiver::ReceiverConfig::load(&config)?;
            runtime()?.block_on(async {
                let stop = shutdown_on_signals()?;
                let r = shuyuan::receiver::Receiver::bind(&cfg).await?;
                tracing::info!(addr = %r.local_addr()?, out = %cfg.out_dir.display(), "receiver listening");
                r.serve(stop).await;
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Simulate {
            devices,
            listen,
            profile,
        } => {
            runtime()?.block_on(async {
                let stop = shutdown_on_signals()?;
                let (make, step): (MakeDevice, StepDevice) = match profile {
                    Profile::Pump => (shuyuan::sim::pump_station, shuyuan::sim::pump_station_step),
                    Profile::Load => (shuyuan::sim::load_device, shuyuan::sim::load_device_step),
                };
                let fleet: Vec<_> = (0..devices).map(|_| make()).collect();
                let addrs =
                    shuyuan::sim::serve_fleet(listen, fleet.clone(), step, stop.clone()).await?;
                for (i, a) in addrs.iter().enumerate() {
                    println!("device {} modbus-tcp {a}", i + 1);
                }
                stop.cancelled().await;
                let served: u64 = fleet.iter().map(|d| d.served()).sum();
                println!("served {served} read requests");
                anyhow::Ok(())
            })?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Outbox { command } => outbox_command(command),
        Command::Purge { config, yes } => {
            let cfg = config::load_unchecked(&config)?;
            if !yes {
                anyhow::bail!("purge destroys every buffered batch and the gateway's keys for good; add --yes to confirm");
            }
            if runtime()?
                .block_on(shuyuan::status::fetch(&cfg.status_socket()))
                .is_some()
            {
                anyhow::bail!("the gateway is running: stop it first (systemctl stop shuyuan)");
            }
            let mut keys = vec![cfg.uplink.key.clone()];
            keys.extend(cfg.pseudonym.as_ref().map(|p| p.key.clone()));
            let p = shuyuan::outbox::admin::purge(&cfg.gateway.state_dir, &keys)
                .map_err(anyhow::Error::msg)?;
            println!(
                "purged: {} batches ({} records, {} bytes) destroyed; key files destroyed: {}; the destruction is recorded in the audit trail",
                p.batches,
                p.records,
                p.bytes,
                if p.key_files.is_empty() { "none found".to_string() } else { p.key_files.join(", ") }
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Status {
            config,
            json,
            watch: false,
            ..
        } => status_command(&config, json),
        Command::Status { config, count, .. } => {
            // Bounded by Ctrl-C, or by --count for scripts.
            let mut code = ExitCode::SUCCESS;
            for _ in 0..count.unwrap_or(u32::MAX) {
                print!("\x1b[2J\x1b[H");
                code = status_command(&config, false)?;
                std::thread::sleep(std::time::Duration::from_secs(2));
            }
            Ok(code)
        }
        Command::Audit { command } => audit_command(command),
        Command::Keys {
            command: KeysCommand::Init { out },
        } => {
            let key = shuyuan::policy::PseudonymKey::init(&out).map_err(anyhow::Error::msg)?;
            println!(
                "pseudonym key written to {} (mode 0600), key id {}",
                out.display(),
                key.id()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Policy {
            command:
                PolicyCommand::Preview {
                    config,
                    source,
                    policy,
                    input,
                    limit,
                    json,
                },
        } => {
            preview(&config, source, policy, input, limit, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            command:
                CertsCommand::DevPki {
                    out,
                    gateway_id,
                    host,
                },
        } => {
            config::check_identifier(&gateway_id).map_err(anyhow::Error::msg)?;
            let pki = shuyuan::pki::dev_pki(&out, &gateway_id, &host)?;
            println!(
                "dev PKI written to {} (gateway id {gateway_id}); private keys are 0600",
                pki.dir.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            command: CertsCommand::Request { id, out },
        } => {
            let r = shuyuan::enrol::request(&id, &out)?;
            println!(
                "key {} (0600, stays on this device)\nrequest {} (CN {id}): send it to the platform's CA, then:\n  shuyuan certs install --config /etc/shuyuan/gateway.toml --cert <issued.pem> --chain <chain.pem> --key {}",
                r.key.display(),
                r.csr.display(),
                r.key.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            command:
                CertsCommand::Install {
                    config: cfg_path,
                    cert,
                    chain,
                    key,
                    ca,
                },
        } => {
            let cfg = config::load_unchecked(&cfg_path)?;
            let u = &cfg.uplink;
            let installed = shuyuan::enrol::install(&shuyuan::enrol::Install {
                gateway_id: &cfg.gateway.id,
                ca: ca.as_deref().unwrap_or(&u.ca),
                cert: &cert,
                chain: chain.as_deref(),
                new_key: key.as_deref(),
                cert_at: &u.cert,
                key_at: &u.key,
            })?;
            println!(
                "installed {} (valid {} more days){}",
                u.cert.display(),
                installed.days_left,
                if key.is_some() {
                    format!(" with its key {}", u.key.display())
                } else {
                    String::new()
                }
            );
            match signal_daemon(&cfg_path, "-HUP") {
                Ok(pid) => println!("the running gateway (pid {pid}) reloads it now"),
                Err(e) => println!("({e}: the new certificate is used at the next start)"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            command:
                CertsCommand::DevSign {
                    ca_cert,
                    ca_key,
                    csr,
                    days,
                    out,
                },
        } => {
            let pem = shuyuan::enrol::dev_sign(&ca_cert, &ca_key, &csr, days)?;
            std::fs::write(&out, pem).with_context(|| format!("cannot write {}", out.display()))?;
            println!("signed {} → {} ({days} days)", csr.display(), out.display());
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Sends `signal` to the daemon running with `config` (found by its pid file); its pid.
fn signal_daemon(config: &std::path::Path, signal: &str) -> anyhow::Result<u32> {
    let pid_file = config::load_unchecked(config)?
        .gateway
        .state_dir
        .join(PID_FILE);
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|t| t.trim().parse().ok())
        .with_context(|| {
            format!(
                "no running gateway: {} is missing (is shuyuan run going?)",
                pid_file.display()
            )
        })?;
    // A stale pid file must not make us signal some other process.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if !String::from_utf8_lossy(&cmdline).contains("shuyuan") {
        anyhow::bail!(
            "no running gateway: process {pid} from {} is not shuyuan (stale file)",
            pid_file.display()
        );
    }
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .context("cannot run kill")?;
    if !status.success() {
        anyhow::bail!("could not signal process {pid}");
    }
    Ok(pid)
}

fn preview(
    config: &std::path::Path,
    source: Option<String>,
    policy: Option<String>,
    input: Option<PathBuf>,
    limit: usize,
    json: bool,
) -> anyhow::Result<()> {
    use shuyuan::policy::{preview, Policy, PseudonymKey};
    let loaded = config::load(config)?;
    let cfg = &loaded.config;
    let src = match &source {
        Some(id) => Some(cfg.sources.iter().find(|s| &s.id == id).with_context(|| {
            let ids: Vec<&str> = cfg.sources.iter().map(|s| s.id.as_str()).collect();
            format!("no source {id:?} in {}; sources: {ids:?}", config.display())
        })?),
        None => None,
    };
    let policy_name = match (&policy, src) {
        (Some(p), _) => p.clone(),
        (None, Some(s)) => s.policy.clone(),
        (None, None) => anyhow::bail!("say which policy to apply: --source ID or --policy NAME"),
    };
    let pcfg = cfg
        .policies
        .get(&policy_name)
        .with_context(|| format!("no policy {policy_name:?} in {}", config.display()))?;
    let key = match &cfg.pseudonym {
        Some(p) => Some(std::sync::Arc::new(
            PseudonymKey::load(&p.key).map_err(anyhow::Error::msg)?,
        )),
        None => None,
    };
    let compiled = Policy::compile(pcfg, key.as_ref())
        .map_err(|e| anyhow::anyhow!("policy {policy_name:?}: {e:?}"))?;
    let label = source.clone().unwrap_or_else(|| "sample".into());
    let records = match (&input, src) {
        (Some(path), _) => {
            let sample = shuyuan::collect::sample::read(path, src, &label, limit)
                .map_err(anyhow::Error::msg)?;
            for b in &sample.bad {
                eprintln!("row not read: {b}");
            }
            sample.records
        }
        (None, Some(s)) if s.kind == shuyuan::config::SourceKind::File => anyhow::bail!(
            "source {:?} reads files: give --input with one of its export files",
            s.id
        ),
        (None, Some(s)) if s.kind == shuyuan::config::SourceKind::ModbusRtu => {
            let rec = runtime()?
                .block_on(shuyuan::collect::rtu::RtuBus::poll_once(cfg, s))
                .map_err(anyhow::Error::msg)?;
            vec![rec]
        }
        (None, Some(s)) => {
            let stats = std::sync::Arc::default();
            let plan = shuyuan::collect::modbus::Plans::default()
                .of(cfg, s)
                .map_err(anyhow::Error::msg)?;
            let m = shuyuan::collect::modbus::ModbusTcpSource::from_config(s, plan, stats)
                .map_err(anyhow::Error::msg)?;
            let rec = runtime()?
                .block_on(m.poll_once())
                .map_err(anyhow::Error::msg)?;
            vec![rec]
        }
        (None, None) => anyhow::bail!("--policy needs --input SAMPLE (a CSV or JSON Lines file)"),
    };
    let view = preview::build(&policy_name, &compiled, &records);
    if json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        use std::io::IsTerminal;
        print!("{}", view.render(std::io::stdout().is_terminal()));
    }
    Ok(())
}

fn outbox_command(cmd: OutboxCommand) -> anyhow::Result<ExitCode> {
    use shuyuan::outbox::admin;
    let dir = |config: &std::path::Path| -> anyhow::Result<PathBuf> {
        Ok(config::load_unchecked(config)?.gateway.state_dir)
    };
    match cmd {
        OutboxCommand::List { config, json } => {
            let rows = admin::list(&dir(&config)?).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else if rows.is_empty() {
                println!(
                    "the outbox is empty: everything sealed has been acknowledged by the platform"
                );
            } else {
                println!(
                    "{:>20}  {:<24}  {:>7}  {:>9}  {:<11}  {:>8}  last error",
                    "seq", "sealed (UTC)", "records", "bytes", "state", "attempts"
                );
                for r in &rows {
                    println!(
                        "{:>20}  {:<24}  {:>7}  {:>9}  {:<11}  {:>8}  {}",
                        r.seq,
                        shuyuan::timefmt::rfc3339_ms(r.created_ms),
                        r.records,
                        r.bytes,
                        r.state,
                        r.attempts,
                        r.last_error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        OutboxCommand::Retry { config, seq } => {
            admin::retry(&dir(&config)?, seq).map_err(anyhow::Error::msg)?;
            println!(
                "batch {seq} is queued again; the running gateway sends it with the next push"
            );
        }
        OutboxCommand::Drop { config, seq, yes } => {
            if !yes {
                anyhow::bail!(
                    "dropping batch {seq} destroys its records for good; add --yes to confirm"
                );
            }
            let n = admin::drop_batch(&dir(&config)?, seq).map_err(anyhow::Error::msg)?;
            println!("batch {seq} dropped ({n} records), counted as dropped by the operator");
        }
        OutboxCommand::Files {
            config,
            bad: Some(prefix),
            limit,
            json,
        } => {
            let rows =
                admin::file_bad_rows(&dir(&config)?, &prefix, limit).map_err(anyhow::Error::msg)?;
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(sha, line, reason)| serde_json::json!({ "sha256": sha, "line": line, "reason": reason }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if rows.is_empty() {
                println!("no unreadable rows recorded for files {prefix}…");
            } else {
                for (sha, line, reason) in &rows {
                    println!("{}  line {line:>8}  {reason}", &sha[..12.min(sha.len())]);
                }
            }
        }
        OutboxCommand::Files {
            config,
            bad: None,
            limit,
            json,
        } => {
            let files = admin::files(&dir(&config)?, limit).map_err(anyhow::Error::msg)?;
            if json {
                let v: Vec<_> = files
                    .iter()
                    .map(|f| {
                        serde_json::json!({
                            "sha256": f.sha256, "source": f.source, "name": f.name, "bytes": f.bytes,
                            "state": f.state.name(), "first_seq": f.first_seq, "last_seq": f.last_seq,
                            "rows_bad": f.rows_bad, "started_ms": f.started_ms, "done_ms": f.done_ms,
                            "note": f.note,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else if files.is_empty() {
                println!("no export files taken yet");
            } else {
                println!(
                    "{:<12}  {:<16}  {:<10}  {:>9}  {:>8}  {:<24}  file",
                    "sha256", "source", "state", "records", "bad rows", "started (UTC)"
                );
                for f in &files {
                    let records = f
                        .last_seq
                        .map(|l| (l + 1).saturating_sub(f.first_seq).to_string())
                        .unwrap_or_else(|| "…".into());
                    println!(
                        "{:<12}  {:<16}  {:<10}  {:>9}  {:>8}  {:<24}  {}{}",
                        &f.sha256[..12.min(f.sha256.len())],
                        f.source,
                        f.state.name(),
                        records,
                        f.rows_bad,
                        shuyuan::timefmt::rfc3339_ms(f.started_ms),
                        f.name,
                        f.note
                            .as_deref()
                            .map(|n| format!("  ({n})"))
                            .unwrap_or_default()
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn audit_command(cmd: AuditCommand) -> anyhow::Result<ExitCode> {
    use shuyuan::outbox::admin;
    match cmd {
        AuditCommand::List {
            config,
            after,
            limit,
            json,
        } => {
            let dir = config::load_unchecked(&config)?.gateway.state_dir;
            let entries = admin::audit_list(&dir, after, limit).map_err(anyhow::Error::msg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                for e in &entries {
                    println!(
                        "{:>8}  {}  {:<18} {}",
                        e.id,
                        shuyuan::timefmt::rfc3339_ms(e.ts_ms),
                        e.kind,
                        e.detail
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        AuditCommand::Verify { config } => {
            let dir = config::load_unchecked(&config)?.gateway.state_dir;
            match admin::audit_verify(&dir).map_err(anyhow::Error::msg)? {
                Ok(n) => {
                    println!("audit chain OK: {n} entries, each linked to the one before");
                    Ok(ExitCode::SUCCESS)
                }
                Err((id, why)) => {
                    println!("audit chain BROKEN at entry {id}: {why}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

fn status_command(config_path: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    use shuyuan::status::{fetch, render, Health};
    use std::io::IsTerminal;
    let cfg = config::load_unchecked(config_path)?;
    let socket = cfg.status_socket();
    let snap = runtime()?.block_on(fetch(&socket));
    match snap {
        Some(s) => {
            let (state, _) = s.health();
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print!("{}", render(&s, std::io::stdout().is_terminal()));
            }
            Ok(ExitCode::from(match state {
                Health::Ok => 0,
                Health::Degraded => 1,
                Health::Down => 2,
            }))
        }
        None => {
            // Not running: say so in one line, then what the store can tell.
            let dir = &cfg.gateway.state_dir;
            let rows = shuyuan::outbox::admin::list(dir).unwrap_or_default();
            let bytes: u64 = rows.iter().map(|r| r.bytes).sum();
            let last_ack = shuyuan::outbox::admin::audit_list(dir, 0, usize::MAX)
                .unwrap_or_default()
                .into_iter()
                .rev()
                .find(|e| e.kind == "batches_acked")
                .map(|e| shuyuan::timefmt::rfc3339_ms(e.ts_ms));
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "gateway": cfg.gateway.id, "running": false, "buffer_batches": rows.len(), "buffer_bytes": bytes, "last_ack": last_ack })
                );
            } else {
                println!(
                    "{} — DOWN: the gateway is not running (no answer on {})",
                    cfg.gateway.id,
                    socket.display()
                );
                println!(
                    "buffer   {} batches, {} waiting; last upload acknowledged {}",
                    rows.len(),
                    config::ByteSize(bytes),
                    last_ack.as_deref().unwrap_or("never")
                );
            }
            Ok(ExitCode::from(2))
        }
    }
}

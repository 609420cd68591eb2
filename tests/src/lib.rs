//! Shared helpers for the end-to-end and fault tests: start a Modbus simulator, a reference
//! receiver and a gateway on loopback, each in its own temporary directory, and wait for
//! conditions with bounded polling.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use shuyuan::config::Config;
use shuyuan::pki::DevPki;
use shuyuan::receiver::{Receiver, ReceiverConfig, ReceiverStats};
use shuyuan::sim::Device;
use shuyuan::stats::Stats;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const GATEWAY_ID: &str = "GW-TEST-0001";

/// A temp dir with a dev PKI for [`GATEWAY_ID`].
pub struct World {
    pub dir: tempfile::TempDir,
    pub pki: DevPki,
}

impl World {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let pki =
            shuyuan::pki::dev_pki(&dir.path().join("certs"), GATEWAY_ID, &[]).expect("dev pki");
        Self { dir, pki }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

/// Serves one simulated device on 127.0.0.1; stops when the token fires.
pub async fn start_sim(device: Arc<Device>, stop: &CancellationToken) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind sim");
    let addr = l.local_addr().expect("sim addr");
    tokio::spawn(shuyuan::sim::serve(l, device, stop.clone()));
    addr
}

pub struct RunningReceiver {
    pub addr: SocketAddr,
    pub out_dir: PathBuf,
    pub stats: Arc<ReceiverStats>,
    pub stop: CancellationToken,
    pub task: JoinHandle<()>,
}

impl RunningReceiver {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Every record line the receiver wrote for a gateway, in file order.
    pub fn records(&self, gateway: &str) -> Vec<serde_json::Value> {
        let dir = self.out_dir.join(gateway);
        let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(Result::ok).map(|e| e.path()).collect(),
            Err(_) => return Vec::new(),
        };
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .expect("read output")
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .map(|l| serde_json::from_str(&l).expect("output line is JSON"))
            .collect()
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Starts the reference receiver of `world` on 127.0.0.1 (or on `listen`).
pub async fn start_receiver(world: &World, listen: Option<SocketAddr>) -> RunningReceiver {
    let p = &world.pki;
    let cfg = ReceiverConfig {
        listen: listen.map_or("127.0.0.1:0".into(), |a| a.to_string()),
        client_ca: p.ca(),
        cert: p.server_cert(),
        key: p.server_key(),
        hpke_key: p.hpke_private(),
        out_dir: world.path().join("received"),
    };
    let r = Receiver::bind(&cfg).await.expect("receiver binds");
    let addr = r.local_addr().expect("receiver addr");
    let stats = r.stats();
    let stop = CancellationToken::new();
    let task = tokio::spawn(r.serve(stop.clone()));
    RunningReceiver {
        addr,
        out_dir: cfg.out_dir,
        stats,
        stop,
        task,
    }
}

/// Writes a gateway config file into the world (paths relative to it) and loads it the way
/// `shuyuan run` does. `body` holds the [[sources]] and [policies] parts.
pub fn gateway_config(world: &World, url: &str, batch_age: &str, body: &str) -> Config {
    let text = format!(
        r#"[gateway]
id = "{GATEWAY_ID}"
state_dir = "state"

[uplink]
url = "{url}"
ca = "certs/platform-ca.pem"
cert = "certs/gateway.pem"
key = "certs/gateway.key"
recipient = "certs/platform-hpke.pub"
timeout = "5s"
backoff_min = "100ms"
backoff_max = "1s"

[batch]
max_records = 1000
max_age = "{batch_age}"

{body}
"#
    );
    let path = world.path().join("gateway.toml");
    std::fs::write(&path, text).expect("write config");
    match shuyuan::config::load(&path) {
        Ok(l) => l.config,
        Err(e) => panic!("test config invalid:\n{e}"),
    }
}

pub struct RunningGateway {
    pub stop: CancellationToken,
    pub stats: Arc<Stats>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

impl RunningGateway {
    /// Stops it the way SIGTERM does and waits for the drain.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

pub fn start_gateway(config: Config) -> RunningGateway {
    let stop = CancellationToken::new();
    let stats = Arc::new(Stats::default());
    let task = tokio::spawn({
        let (stop, stats) = (stop.clone(), stats.clone());
        async move { shuyuan::daemon::run(&config, stop, stats).await }
    });
    RunningGateway { stop, stats, task }
}

/// Polls `cond` every 50 ms until it holds or `limit` passes; returns whether it held.
pub async fn wait_until<F, Fut>(limit: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if cond().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An mTLS HTTP client presenting `cert`/`key`, trusting `ca`, for posting envelopes by hand.
pub fn client(ca: &Path, cert: &Path, key: &Path, url: &str) -> shuyuan::uplink::HttpClient {
    let tls = shuyuan::tls::client_config(ca, cert, key).expect("client tls");
    let ep = shuyuan::uplink::Endpoint::parse(url).expect("url");
    shuyuan::uplink::HttpClient::new(ep, tls, Duration::from_secs(5)).expect("client")
}

/// The `shuyuan` binary cargo built next to this test binary (`cargo test --workspace`
/// builds it for the product crate's own CLI tests).
pub fn shuyuan_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = dir.join("shuyuan");
    assert!(
        bin.exists(),
        "{} is missing: run the suite with cargo test --workspace (./test)",
        bin.display()
    );
    bin
}

/// Starts `shuyuan run --config <world>/gateway.toml` as a child process, stderr to `log`.
pub fn spawn_gateway_process(world: &World, log: &Path) -> std::process::Child {
    spawn_gateway_process_with(world, log, &[])
}

/// [`spawn_gateway_process`] with extra environment variables (systemd's, for example).
pub fn spawn_gateway_process_with(
    world: &World,
    log: &Path,
    env: &[(&str, &str)],
) -> std::process::Child {
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    std::process::Command::new(shuyuan_bin())
        .args(["run", "--config"])
        .arg(world.path().join("gateway.toml"))
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start gateway")
}

/// Starts `shuyuan receive` as a child process listening on `addr`, writing into the world's
/// `received/` directory.
pub fn spawn_receiver_process(world: &World, addr: SocketAddr, log: &Path) -> std::process::Child {
    let cfg = world.path().join("receiver.toml");
    std::fs::write(&cfg, shuyuan::demo::receiver_toml(&addr.to_string())).expect("receiver config");
    let err = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("log file");
    std::process::Command::new(shuyuan_bin())
        .args(["receive", "--config"])
        .arg(&cfg)
        .stdout(std::process::Stdio::null())
        .stderr(err)
        .spawn()
        .expect("start receiver")
}

/// Sends SIGTERM and waits for the process to exit (at most `limit`, then SIGKILL).
pub fn terminate(
    child: &mut std::process::Child,
    limit: Duration,
) -> Option<std::process::ExitStatus> {
    let _ = std::process::Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(st)) = child.try_wait() {
            return Some(st);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// A small deterministic generator for kill timings (xorshift), so a failing run can be
/// repeated with the same seed.
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    /// Uniform in [lo, hi).
    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        let span = hi.saturating_sub(lo).as_micros().max(1) as u64;
        lo + Duration::from_micros(self.0 % span)
    }
}

/// Rewrites the world's gateway.toml with `edit` and loads it again.
pub fn edit_gateway_config(world: &World, edit: impl FnOnce(String) -> String) -> Config {
    let path = world.path().join("gateway.toml");
    let text = edit(std::fs::read_to_string(&path).expect("gateway.toml"));
    std::fs::write(&path, text).expect("write config");
    match shuyuan::config::load(&path) {
        Ok(l) => l.config,
        Err(e) => panic!("test config invalid:\n{e}"),
    }
}

/// An HTTPS server with the platform's certificate that refuses every batch with `status`
/// (a platform whose validation rejects the data), for quarantine tests. Real TLS, real
/// client-certificate check; only the answer is fixed.
pub async fn start_refusing_platform(
    world: &World,
    addr: SocketAddr,
    status: u16,
    stop: &CancellationToken,
) {
    use http_body_util::{BodyExt, Full};
    let tls = shuyuan::tls::server_config(
        &world.pki.ca(),
        &world.pki.server_cert(),
        &world.pki.server_key(),
    )
    .expect("tls");
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let stop = stop.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = stop.cancelled() => break,
                r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| async move {
                        let _ = req.into_body().collect().await;
                        let mut r = hyper::Response::new(Full::new(bytes::Bytes::from_static(
                            b"{\"error\":\"schema check failed\"}",
                        )));
                        *r.status_mut() = hyper::StatusCode::from_u16(status)
                            .unwrap_or(hyper::StatusCode::BAD_REQUEST);
                        Ok::<_, std::convert::Infallible>(r)
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
}

/// A loopback address with a port nothing listens on (yet).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// `GET path` over mutual TLS to a gateway's health endpoint, verifying the gateway's
/// certificate by its id as DNS name. Returns the status and body, or the connection error.
pub async fn health_get(
    addr: SocketAddr,
    ca: &Path,
    cert: &Path,
    key: &Path,
    gateway_id: &str,
    path: &str,
) -> Result<(u16, String), String> {
    use http_body_util::{BodyExt, Empty};
    let tls = shuyuan::tls::client_config(ca, cert, key).map_err(|e| e.to_string())?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls::pki_types::ServerName::try_from(gateway_id.to_string())
        .map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, gateway_id)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Two connected pseudo-terminals made by socat: what one end writes the other reads, like
/// two RS-485 adapters on one cable. socat stops when this is dropped.
pub struct PtyPair {
    child: std::process::Child,
    pub a: PathBuf,
    pub b: PathBuf,
}

impl Drop for PtyPair {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `socat` with two linked ptys at `<dir>/tty-a` and `<dir>/tty-b`.
pub async fn pty_pair(dir: &Path) -> PtyPair {
    let (a, b) = (dir.join("tty-a"), dir.join("tty-b"));
    let child = std::process::Command::new("socat")
        .arg(format!("pty,raw,echo=0,link={}", a.display()))
        .arg(format!("pty,raw,echo=0,link={}", b.display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("socat (installed by .ci/run) starts");
    let pair = PtyPair { child, a, b };
    let up = wait_until(Duration::from_secs(10), || async {
        pair.a.exists() && pair.b.exists()
    })
    .await;
    assert!(up, "socat made no pty pair");
    pair
}

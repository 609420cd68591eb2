//! The reference platform receiver (`shuyuan receive`): an HTTPS server that admits only
//! clients with a certificate from the configured CA, checks that each envelope is signed by
//! the key of the certificate that sent it and names that certificate's CN as gateway id,
//! decrypts, deduplicates by (gateway id, seq), and appends the records as JSON Lines to
//! `<out>/<gateway-id>/<yyyy-mm-dd>.jsonl`. Used by tests, the demo and integrators as the
//! executable form of docs/protocol.md.

mod store;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::keys::HpkePrivateKey;
use crate::seal::{Envelope, SealError};
use crate::tls::Identity;
pub use store::{Persisted, Store};

/// The receiver's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// `ip:port` to listen on.
    pub listen: String,
    /// CA whose client certificates are admitted.
    pub client_ca: PathBuf,
    /// The platform's server certificate and key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The platform's HPKE private key (PKCS#8 X25519, 0600).
    pub hpke_key: PathBuf,
    /// Where records are written, and where the dedup database lives.
    pub out_dir: PathBuf,
}

impl ReceiverConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let mut cfg: Self =
            crate::config::parse_toml(&text, path, &crate::config::Locator::new(&text))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut cfg.client_ca,
            &mut cfg.cert,
            &mut cfg.key,
            &mut cfg.hpke_key,
            &mut cfg.out_dir,
        ] {
            *p = base.join(&*p);
        }
        Ok(cfg)
    }
}

/// Counters a test or the demo can read.
#[derive(Debug, Default)]
pub struct ReceiverStats {
    pub accepted: AtomicU64,
    pub duplicates: AtomicU64,
    pub rejected: AtomicU64,
    pub records: AtomicU64,
    pub handshakes_refused: AtomicU64,
}

struct Shared {
    store: Store,
    hpke: HpkePrivateKey,
    stats: Arc<ReceiverStats>,
}

/// The largest envelope accepted in one request.
pub const MAX_BODY: usize = 300 << 20;

pub struct Receiver {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    shared: Arc<Shared>,
}

impl Receiver {
    /// Loads keys, opens (and recovers) the store, binds the listener.
    pub async fn bind(cfg: &ReceiverConfig) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let tls = crate::tls::server_config(&cfg.client_ca, &cfg.cert, &cfg.key)?;
        let hpke = crate::keys::load_hpke_private(&cfg.hpke_key)?;
        std::fs::create_dir_all(&cfg.out_dir)
            .with_context(|| format!("{}: cannot create", cfg.out_dir.display()))?;
        let store = Store::open(&cfg.out_dir)?;
        let listener = TcpListener::bind(&cfg.listen)
            .await
            .with_context(|| format!("cannot listen on {}", cfg.listen))?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(tls),
            shared: Arc::new(Shared {
                store,
                hpke,
                stats: Arc::default(),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn stats(&self) -> Arc<ReceiverStats> {
        self.shared.stats.clone()
    }

    /// Serves until `shutdown` fires.
    pub async fn serve(self, shutdown: CancellationToken) {
        crate::mtls_server::serve(
            self.listener,
            self.acceptor,
            Platform(self.shared),
            shutdown,
        )
        .await;
    }
}

#[derive(Clone)]
struct Platform(Arc<Shared>);

impl crate::mtls_server::Handler for Platform {
    async fn handle(&self, req: Request<Incoming>, client: Arc<Identity>) -> Response<Full<Bytes>> {
        handle(req, &self.0, &client).await
    }

    fn refused(&self, peer: SocketAddr, why: String) {
        self.0.stats.handshakes_refused.fetch_add(1, Relaxed);
        tracing::warn!(%peer, "{why}");
    }
}

use crate::mtls_server::answer;

fn reject(shared: &Shared, status: StatusCode, gw: &str, why: String) -> Response<Full<Bytes>> {
    shared.stats.rejected.fetch_add(1, Relaxed);
    tracing::warn!(
        gateway = gw,
        status = status.as_u16(),
        "batch rejected: {why}"
    );
    answer(status, serde_json::json!({ "error": why }))
}

async fn handle(
    req: Request<Incoming>,
    shared: &Shared,
    ident: &Identity,
) -> Response<Full<Bytes>> {
    let gw = ident.cn.as_str();
    if req.uri().path() != "/v1/batches" {
        return answer(
            StatusCode::NOT_FOUND,
            serde_json::json!({ "error": "no such endpoint; batches go to POST /v1/batches" }),
        );
    }
    if req.method() != Method::POST {
        return answer(
            StatusCode::METHOD_NOT_ALLOWED,
            serde_json::json!({ "error": "use POST" }),
        );
    }
    if let Err(e) = crate::config::check_identifier(gw) {
        return reject(
            shared,
            StatusCode::FORBIDDEN,
            gw,
            format!("certificate CN is not a usable gateway id: {e}"),
        );
    }
    let idem = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return reject(
                shared,
                StatusCode::PAYLOAD_TOO_LARGE,
                gw,
                format!("cannot read body: {e}"),
            )
        }
    };
    let env = match Envelope::parse(&body) {
        Ok(e) => e,
        Err(e) => return reject(shared, StatusCode::BAD_REQUEST, gw, e.to_string()),
    };
    let h = &env.header;
    if h.gateway_id != gw {
        return reject(
            shared,
            StatusCode::FORBIDDEN,
            gw,
            format!(
                "envelope names gateway {:?} but the client certificate is {gw:?}",
                h.gateway_id
            ),
        );
    }
    let expected_key = format!("{gw}/{}", h.seq);
    if idem.as_deref().is_some_and(|k| k != expected_key) {
        return reject(
            shared,
            StatusCode::BAD_REQUEST,
            gw,
            format!("Idempotency-Key does not match the envelope (expected {expected_key})"),
        );
    }
    match env.verify(&ident.spki_der) {
        Ok(()) => {}
        Err(e @ SealError::SignerMismatch) => {
            return reject(shared, StatusCode::FORBIDDEN, gw, e.to_string())
        }
        Err(e) => return reject(shared, StatusCode::BAD_REQUEST, gw, e.to_string()),
    }
    let seq = h.seq;
    match shared.store.seen(gw, seq).await {
        Ok(true) => return duplicate(shared, gw, seq),
        Ok(false) => {}
        Err(e) => {
            return answer(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": e.to_string() }),
            )
        }
    }
    let plain = match env.open(&shared.hpke) {
        Ok(p) => p,
        Err(e) => return reject(shared, StatusCode::BAD_REQUEST, gw, e.to_string()),
    };
    if let Err(e) = check_lines(&plain, h.records) {
        return reject(shared, StatusCode::BAD_REQUEST, gw, e);
    }
    let date = crate::timefmt::utc_date(h.created_ms);
    match shared
        .store
        .persist(gw.to_owned(), seq, date, h.records, plain)
        .await
    {
        Ok(Persisted::Written) => {
            shared.stats.accepted.fetch_add(1, Relaxed);
            shared.stats.records.fetch_add(h.records.into(), Relaxed);
            tracing::debug!(gateway = gw, seq, records = h.records, "batch accepted");
            answer(
                StatusCode::OK,
                serde_json::json!({ "status": "accepted", "gateway": gw, "seq": seq, "records": h.records }),
            )
        }
        Ok(Persisted::Duplicate) => duplicate(shared, gw, seq),
        Err(e) => {
            tracing::error!(gateway = gw, seq, "cannot store batch: {e}");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({ "error": "storage failed; retry later" }),
            )
        }
    }
}

fn duplicate(shared: &Shared, gw: &str, seq: u64) -> Response<Full<Bytes>> {
    shared.stats.duplicates.fetch_add(1, Relaxed);
    answer(
        StatusCode::OK,
        serde_json::json!({ "status": "duplicate", "gateway": gw, "seq": seq }),
    )
}

/// Every line is a JSON object, and there are as many as the header says.
fn check_lines(plain: &[u8], records: u32) -> Result<(), String> {
    let mut n = 0u32;
    for (i, line) in plain.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        match serde_json::from_slice::<serde_json::Value>(line) {
            Ok(v) if v.is_object() => n += 1,
            _ => return Err(format!("line {} of the batch is not a JSON object", i + 1)),
        }
    }
    if n != records {
        return Err(format!("batch holds {n} records, header says {records}"));
    }
    if plain.last().is_some_and(|&b| b != b'\n') {
        return Err("batch does not end with a newline".into());
    }
    Ok(())
}

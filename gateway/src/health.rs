//! The platform's pull endpoint: HTTPS with the gateway's certificate, admitting only clients
//! with a certificate from the platform's CA whose CN is in `[health] allow`. Anything else is
//! refused and counted as a security event (and put on the audit trail).
//!
//! - `GET /v1/health`: the status snapshot (the same facts as `shuyuan status`) plus `state`
//!   and `reasons`;
//! - `GET /metrics`: the counters in Prometheus text format;
//! - `GET /v1/audit?after=N`: audit entries after id N (at most 1000), for the platform to
//!   archive and verify.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use tokio_util::sync::CancellationToken;

use crate::mtls_server::answer;
use crate::outbox::Outbox;
use crate::stats::Stats;
use crate::status::{Health, Snapshot};
use crate::tls::Identity;

#[derive(Clone)]
struct Endpoint {
    gateway: String,
    allow: Arc<Vec<String>>,
    stats: Arc<Stats>,
    outbox: Outbox,
    max_bytes: u64,
    started_ms: i64,
    refused: Arc<AtomicU64>,
}

/// Binds `listen` and serves until `shutdown`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    listen: &str,
    tls: Arc<rustls::ServerConfig>,
    allow: Vec<String>,
    gateway: String,
    stats: Arc<Stats>,
    outbox: Outbox,
    max_bytes: u64,
    shutdown: CancellationToken,
) -> anyhow::Result<SocketAddr> {
    use anyhow::Context as _;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("health endpoint cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    let ep = Endpoint {
        gateway,
        allow: Arc::new(allow),
        stats,
        outbox,
        max_bytes,
        started_ms: crate::timefmt::now_ms(),
        refused: Arc::default(),
    };
    tokio::spawn(crate::mtls_server::serve(
        listener,
        tokio_rustls::TlsAcceptor::from(tls),
        ep,
        shutdown,
    ));
    Ok(addr)
}

impl Endpoint {
    fn security_event(&self, what: String) {
        self.refused.fetch_add(1, Relaxed);
        tracing::warn!("health endpoint: {what}");
        let outbox = self.outbox.clone();
        tokio::spawn(async move {
            let _ = outbox
                .audit(
                    "security_refused",
                    serde_json::json!({ "endpoint": "health", "what": what }),
                )
                .await;
        });
    }

    async fn snapshot(&self) -> Snapshot {
        crate::status::snapshot(
            &self.gateway,
            self.started_ms,
            &self.stats,
            &self.outbox,
            self.max_bytes,
        )
        .await
    }
}

impl crate::mtls_server::Handler for Endpoint {
    async fn handle(&self, req: Request<Incoming>, client: Arc<Identity>) -> Response<Full<Bytes>> {
        if !self.allow.iter().any(|a| *a == client.cn) {
            self.security_event(format!("identity {:?} is not in [health] allow", client.cn));
            return answer(
                StatusCode::FORBIDDEN,
                serde_json::json!({ "error": "this identity may not read the gateway's health" }),
            );
        }
        if req.method() != Method::GET {
            return answer(
                StatusCode::METHOD_NOT_ALLOWED,
                serde_json::json!({ "error": "use GET" }),
            );
        }
        match req.uri().path() {
            "/v1/health" => {
                let s = self.snapshot().await;
                let (state, reasons) = s.health();
                let mut v = serde_json::to_value(&s).unwrap_or_default();
                v["state"] = serde_json::json!(match state {
                    Health::Ok => "OK",
                    Health::Degraded => "DEGRADED",
                    Health::Down => "DOWN",
                });
                v["reasons"] = serde_json::json!(reasons);
                v["security_events"] = serde_json::json!(self.refused.load(Relaxed));
                answer(StatusCode::OK, v)
            }
            "/metrics" => {
                let text = metrics(&self.snapshot().await, self.refused.load(Relaxed));
                let mut r = Response::new(Full::new(Bytes::from(text)));
                r.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            "/v1/audit" => {
                let after = req
                    .uri()
                    .query()
                    .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("after=")))
                    .and_then(|v| v.parse::<i64>().ok())
                    .unwrap_or(0);
                match self.outbox.audit_entries(after, 1000).await {
                    Ok(entries) => {
                        answer(StatusCode::OK, serde_json::json!({ "entries": entries }))
                    }
                    Err(e) => answer(
                        StatusCode::SERVICE_UNAVAILABLE,
                        serde_json::json!({ "error": e.to_string() }),
                    ),
                }
            }
            _ => answer(
                StatusCode::NOT_FOUND,
                serde_json::json!({ "error": "endpoints: /v1/health, /metrics, /v1/audit?after=N" }),
            ),
        }
    }

    fn refused(&self, peer: SocketAddr, why: String) {
        self.security_event(format!("{peer}: {why}"));
    }
}

/// Prometheus text exposition of the snapshot's counters.
pub fn metrics(s: &Snapshot, security_events: u64) -> String {
    let mut o = String::new();
    let mut m = |name: &str, kind: &str, help: &str, samples: Vec<(String, f64)>| {
        o += &format!("# HELP shuyuan_{name} {help}\n# TYPE shuyuan_{name} {kind}\n");
        for (labels, v) in samples {
            o += &format!("shuyuan_{name}{labels} {v}\n");
        }
    };
    let g = |v: u64| vec![(String::new(), v as f64)];
    let per_source = |f: &dyn Fn(&crate::status::SourceStatus) -> u64| {
        s.sources
            .iter()
            .map(|x| (format!("{{source=\"{}\"}}", x.id), f(x) as f64))
            .collect::<Vec<_>>()
    };
    m(
        "polls_ok_total",
        "counter",
        "Polls that returned every point.",
        per_source(&|x| x.polls_ok),
    );
    m(
        "polls_failed_total",
        "counter",
        "Polls that failed (timeout, exception, connection).",
        per_source(&|x| x.polls_failed),
    );
    m(
        "timeouts_total",
        "counter",
        "Modbus requests that timed out.",
        per_source(&|x| x.timeouts),
    );
    m(
        "crc_errors_total",
        "counter",
        "Modbus RTU replies with a bad CRC or from another unit.",
        per_source(&|x| x.crc_errors),
    );
    m(
        "files_ingested_total",
        "counter",
        "Export files whose records are all committed.",
        per_source(&|x| x.files_ingested),
    );
    m(
        "rows_bad_total",
        "counter",
        "Export rows that could not be read (recorded by file and line).",
        per_source(&|x| x.rows_bad),
    );
    m(
        "buffer_batches",
        "gauge",
        "Sealed batches waiting in the outbox.",
        g(s.buffer_batches),
    );
    m(
        "buffer_bytes",
        "gauge",
        "Sealed bytes waiting in the outbox.",
        g(s.buffer_bytes),
    );
    m(
        "buffer_max_bytes",
        "gauge",
        "The outbox quota.",
        g(s.buffer_max_bytes),
    );
    m(
        "quarantined_batches",
        "gauge",
        "Batches refused by the platform for good.",
        g(s.quarantined),
    );
    m(
        "records_lost_total",
        "counter",
        "Records lost to a full buffer or a stalled pipeline.",
        g(s.evicted_records + s.records_lost),
    );
    m(
        "upload_consecutive_failures",
        "gauge",
        "Failed uploads since the last success.",
        g(s.consecutive_failures),
    );
    m(
        "last_ack_timestamp_seconds",
        "gauge",
        "When the platform last acknowledged a batch.",
        vec![(String::new(), s.last_ack_ms as f64 / 1000.0)],
    );
    m(
        "fields_total",
        "counter",
        "Fields by what the policy did.",
        vec![
            ("{action=\"kept\"}".into(), s.fields_kept as f64),
            (
                "{action=\"deidentified\"}".into(),
                s.fields_deidentified as f64,
            ),
            ("{action=\"dropped\"}".into(), s.fields_dropped as f64),
            (
                "{action=\"without_rule\"}".into(),
                s.fields_without_rule as f64,
            ),
        ],
    );
    m(
        "security_events_total",
        "counter",
        "Refused handshakes and identities at the health endpoint.",
        g(security_events),
    );
    o
}

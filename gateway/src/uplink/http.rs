//! The uplink's HTTPS client: one kept-alive HTTP/1.1 connection over mutual TLS to the
//! platform, `POST {url}/v1/batches` with the envelope as body. Errors say whether a retry
//! can help.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;

/// `https://host[:port][/base]`: where batches go, as `{base}/v1/batches`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub batches_path: String,
    pub authority: String,
}

impl Endpoint {
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url.strip_prefix("https://").ok_or_else(|| {
            format!("url {url:?} must start with https:// (batches travel over mutual TLS only)")
        })?;
        let (authority, base) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let bad = || format!("url {url:?}: cannot read host and port");
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6.split_once(']').ok_or_else(bad)?;
            let port = match after.strip_prefix(':') {
                Some(p) => p.parse().map_err(|_| bad())?,
                None if after.is_empty() => 443,
                None => return Err(bad()),
            };
            (h.to_string(), port)
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), p.parse().map_err(|_| bad())?),
                None => (authority.to_string(), 443),
            }
        };
        if host.is_empty() || port == 0 || base.contains(['?', '#']) {
            return Err(bad());
        }
        Ok(Self {
            host,
            port,
            batches_path: format!("{base}/v1/batches"),
            authority: authority.to_string(),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    Accepted,
    Duplicate,
}

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Try again later (at the earliest after the given delay, when the platform said so).
    Later(Option<Duration>),
    /// The platform refused this batch for good: quarantine it.
    Never,
}

#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error("cannot connect to {0}")]
    Connect(String),
    #[error("TLS handshake with {0}")]
    Handshake(String),
    #[error("HTTP: {0}")]
    Http(String),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("platform answered {status}: {body}")]
    Status {
        status: u16,
        body: String,
        retry_after: Option<Duration>,
    },
    #[error("platform answered 200 with an unexpected body: {0}")]
    BadAnswer(String),
}

impl UplinkError {
    pub fn retry(&self) -> Retry {
        match self {
            UplinkError::Status {
                status,
                retry_after,
                ..
            } => match *status {
                401 | 403 | 408 | 429 => Retry::Later(*retry_after),
                400..=499 => Retry::Never,
                _ => Retry::Later(*retry_after),
            },
            _ => Retry::Later(None),
        }
    }
}

pub struct HttpClient {
    endpoint: Endpoint,
    connector: TlsConnector,
    server_name: ServerName<'static>,
    timeout: Duration,
    conn: Option<SendRequest<Full<Bytes>>>,
}

impl HttpClient {
    pub fn new(
        endpoint: Endpoint,
        tls: Arc<rustls::ClientConfig>,
        timeout: Duration,
    ) -> Result<Self, String> {
        let server_name = ServerName::try_from(endpoint.host.clone())
            .map_err(|_| format!("{:?} is not a valid server name", endpoint.host))?;
        Ok(Self {
            endpoint,
            connector: TlsConnector::from(tls),
            server_name,
            timeout,
            conn: None,
        })
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Forgets the connection (after an error, or to let an idle link go).
    pub fn disconnect(&mut self) {
        self.conn = None;
    }

    async fn connect(&mut self) -> Result<SendRequest<Full<Bytes>>, UplinkError> {
        let ep = &self.endpoint;
        let where_ = format!("{}:{}", ep.host, ep.port);
        let tcp = tokio::net::TcpStream::connect((ep.host.as_str(), ep.port))
            .await
            .map_err(|e| UplinkError::Connect(format!("{where_}: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let tls = self
            .connector
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| UplinkError::Handshake(format!("{where_}: {e}")))?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| UplinkError::Http(e.to_string()))?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the peer closes.
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Posts one envelope; the whole exchange is bounded by the configured timeout.
    pub async fn post_batch(
        &mut self,
        idempotency_key: &str,
        envelope: Bytes,
    ) -> Result<Ack, UplinkError> {
        let limit = self.timeout;
        match timeout(limit, self.exchange(idempotency_key, envelope)).await {
            Ok(r) => {
                if r.is_err() {
                    self.conn = None;
                }
                r
            }
            Err(_) => {
                self.conn = None;
                Err(UplinkError::Timeout(limit))
            }
        }
    }

    async fn exchange(&mut self, key: &str, envelope: Bytes) -> Result<Ack, UplinkError> {
        let mut sender = match self.conn.take() {
            Some(mut s) => match s.ready().await {
                Ok(()) => s,
                Err(_) => self.connect().await?,
            },
            None => self.connect().await?,
        };
        let req = Request::post(self.endpoint.batches_path.as_str())
            .header(hyper::header::HOST, self.endpoint.authority.as_str())
            .header(hyper::header::CONTENT_TYPE, "application/vnd.shuyuan.batch")
            .header("idempotency-key", key)
            .body(Full::new(envelope))
            .map_err(|e| UplinkError::Http(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| UplinkError::Http(e.to_string()))?;
        let status = resp.status();
        let retry_after = resp
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        let body = Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await
            .map_err(|e| UplinkError::Http(format!("reading the answer: {e}")))?
            .to_bytes();
        self.conn = Some(sender);
        let text = String::from_utf8_lossy(&body)
            .chars()
            .take(300)
            .collect::<String>();
        if status != StatusCode::OK {
            return Err(UplinkError::Status {
                status: status.as_u16(),
                body: text,
                retry_after,
            });
        }
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|_| UplinkError::BadAnswer(text.clone()))?;
        match v.get("status").and_then(|s| s.as_str()) {
            Some("accepted") => Ok(Ack::Accepted),
            Some("duplicate") => Ok(Ack::Duplicate),
            _ => Err(UplinkError::BadAnswer(text)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse_hosts_ports_and_base_paths() {
        let e = Endpoint::parse("https://ingest.example.gov.cn:8443").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.batches_path.as_str()),
            ("ingest.example.gov.cn", 8443, "/v1/batches")
        );
        let e = Endpoint::parse("https://[::1]:9000/city/").unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.batches_path.as_str()),
            ("::1", 9000, "/city/v1/batches")
        );
        assert_eq!(Endpoint::parse("https://h").unwrap().port, 443);
        assert!(Endpoint::parse("http://h:80")
            .unwrap_err()
            .contains("https://"));
        assert!(Endpoint::parse("https://h:notaport").is_err());
    }

    #[test]
    fn only_final_4xx_quarantine() {
        let st = |s| UplinkError::Status {
            status: s,
            body: String::new(),
            retry_after: None,
        };
        assert_eq!(st(400).retry(), Retry::Never);
        assert_eq!(st(413).retry(), Retry::Never);
        for s in [401, 403, 408, 429, 500, 503] {
            assert_eq!(st(s).retry(), Retry::Later(None), "{s}");
        }
    }
}

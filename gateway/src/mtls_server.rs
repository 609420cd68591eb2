//! The HTTPS server both the reference receiver and the health endpoint run: mutual TLS with
//! the client's certificate checked against a CA at the handshake, the client's identity read
//! once per connection, HTTP/1.1 by hyper. What a request gets is the [`Handler`]'s business.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::tls::Identity;

pub trait Handler: Clone + Send + Sync + 'static {
    fn handle(
        &self,
        req: Request<Incoming>,
        client: Arc<Identity>,
    ) -> impl Future<Output = Response<Full<Bytes>>> + Send;
    /// A client refused at the handshake (no certificate, another CA, a timeout).
    fn refused(&self, peer: SocketAddr, why: String);
}

/// Serves until `shutdown`; connections under way end with it.
pub async fn serve<H: Handler>(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handler: H,
    shutdown: CancellationToken,
) {
    let conns = tokio_util::task::TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (acceptor, handler, stop) = (acceptor.clone(), handler.clone(), shutdown.clone());
        conns.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve_conn(acceptor, handler, tcp, peer) => {}
            }
        });
    }
    conns.close();
    conns.wait().await;
}

async fn serve_conn<H: Handler>(
    acceptor: TlsAcceptor,
    handler: H,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
) {
    let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return handler.refused(peer, format!("TLS handshake refused: {e}")),
        Err(_) => return handler.refused(peer, "TLS handshake timed out".into()),
    };
    let ident = match tls.get_ref().1.peer_certificates().and_then(|c| c.first()) {
        Some(cert) => match crate::tls::identity(cert) {
            Ok(i) => Arc::new(i),
            Err(e) => return handler.refused(peer, format!("client certificate unusable: {e}")),
        },
        None => return, // the verifier requires one; nothing to serve otherwise
    };
    let svc = hyper::service::service_fn(move |req| {
        let (handler, ident) = (handler.clone(), ident.clone());
        async move { Ok::<_, std::convert::Infallible>(handler.handle(req, ident).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), svc)
        .await
    {
        tracing::debug!(%peer, "connection ended: {e}");
    }
}

/// A JSON answer.
pub fn answer(status: hyper::StatusCode, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

//! The HTTP endpoint: `GET /health`, `GET /ready`, `GET /metrics`.
//!
//! HTTP/1.1 only (hyper); anything else is 404, a method other than GET or
//! HEAD is 405. Connections are served as their own tasks; a slow scraper
//! holds nothing that clients need.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::cluster::Availability;
use crate::proxy::{Phase, Shared};

/// A bound HTTP listener, served by [`HttpEndpoint::run`].
pub struct HttpEndpoint {
    listener: TcpListener,
}

impl HttpEndpoint {
    pub async fn bind(addr: SocketAddr) -> std::io::Result<Self> {
        Ok(Self {
            listener: TcpListener::bind(addr).await?,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the proxy is gone (its phase channel closes); through a
    /// drain it keeps answering, `/ready` with 503.
    pub async fn run(self, shared: Arc<Shared>) {
        let mut phase = shared.phase.clone();
        loop {
            let accepted = tokio::select! {
                r = self.listener.accept() => r,
                r = phase.changed() => match r {
                    Ok(()) => continue,
                    Err(_) => return,
                },
            };
            let (stream, _) = match accepted {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP endpoint: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let shared = shared.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { Ok::<_, Infallible>(handle(&req, &shared)) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "HTTP endpoint: connection error");
                }
            });
        }
    }
}

fn handle(req: &Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into());
    }
    match req.uri().path() {
        "/health" => text(StatusCode::OK, "ok\n".into()),
        "/ready" => match readiness(shared) {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        "/metrics" => {
            let mut r = text(StatusCode::OK, super::render_metrics(shared));
            if let Ok(v) = "text/plain; version=0.0.4; charset=utf-8".parse() {
                r.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
            }
            r
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /health, /ready or /metrics\n".into(),
        ),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r
}

/// Whether this instance should receive clients: running (not draining),
/// and every database with replicas can reach its primary — or, with
/// `admin.ready_requires_primary = false`, has a replica in rotation.
pub fn readiness(shared: &Shared) -> Result<(), String> {
    if *shared.phase.borrow() != Phase::Running {
        return Err("draining".into());
    }
    let now = Instant::now();
    for (name, cluster) in shared.clusters().iter() {
        if cluster.primary_reachable(now) {
            continue;
        }
        let replica_up = (1..cluster.nodes().len()).any(|i| {
            matches!(
                cluster.availability(i, now),
                Availability::InRotation { .. }
            )
        });
        if shared.config().admin.ready_requires_primary || !replica_up {
            return Err(format!("the primary of database \"{name}\" is unreachable"));
        }
    }
    Ok(())
}

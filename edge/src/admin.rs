//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics`.
//!
//! Liveness says the process runs; readiness says it is connected to NATS
//! (and, on an edge, not draining). It must never block on anything but
//! the metrics render.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Says whether the process is ready for traffic.
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Installs the process-wide Prometheus recorder and returns its handle.
/// `switchyard_edge_delivery_latency_seconds` gets histogram buckets (not the
/// default summary) so dashboards and alerts can aggregate it across pods.
pub fn install_recorder() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full("switchyard_edge_delivery_latency_seconds".into()),
            LATENCY_BUCKETS,
        )?
        .install_recorder()
}

/// Delivery latency buckets, in seconds: 1 ms to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

/// Serves the admin endpoint on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, ready: ReadyCheck, metrics: PrometheusHandle, cancel: CancellationToken) {
    {
        let upkeep = {
            let metrics = metrics.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tick.tick() => metrics.run_upkeep(),
                    }
                }
            })
        };
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        continue;
                    }
                },
            };
            let ready = ready.clone();
            let metrics = metrics.clone();
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = match req.uri().path() {
                    "/healthz" => respond(StatusCode::OK, "ok\n"),
                    "/readyz" if ready() => respond(StatusCode::OK, "ready\n"),
                    "/readyz" => respond(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
                    "/metrics" => {
                        let mut r = respond(StatusCode::OK, metrics.render());
                        r.headers_mut().insert(
                            "content-type",
                            hyper::header::HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        r
                    }
                    _ => respond(StatusCode::NOT_FOUND, "not found\n"),
                };
                async move { Ok::<_, Infallible>(resp) }
            });
            tokio::spawn(async move {
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "admin connection ended with an error");
                }
            });
        }
        upkeep.abort();
    }
}

//! The admin HTTP endpoint: `/healthz`, `/readyz`, `/metrics`.
//!
//! Liveness says the process runs; readiness is whatever the tier's
//! [`ReadyCheck`] says. It must never block on anything but the metrics
//! render, and knows nothing of what the tier does.

use std::convert::Infallible;
use std::sync::Arc;

use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::respond;

/// Says whether the process is ready for traffic.
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

/// Installs the process-wide Prometheus recorder and returns its handle.
/// Each `(metric, buckets)` in `histograms` is rendered as a histogram with
/// those buckets (not the default summary), so dashboards and alerts can
/// aggregate it across pods.
pub fn install_recorder(
    histograms: &[(&str, &[f64])],
) -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    let mut builder = PrometheusBuilder::new();
    for (name, buckets) in histograms {
        builder = builder.set_buckets_for_metric(Matcher::Full((*name).to_string()), buckets)?;
    }
    builder.install_recorder()
}

/// Serves the admin endpoint on `listener` until `cancel` fires.
pub async fn serve(listener: TcpListener, ready: ReadyCheck, metrics: PrometheusHandle, cancel: CancellationToken) {
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

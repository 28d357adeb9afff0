//! A whole Switchyard on one machine for tests: a real nats-server, a router
//! and an edge in-process on ephemeral ports, and a producer helper.

use std::sync::OnceLock;

use anyhow::Result;
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::Value;
use switchyard_common::transcode::json_to_msgpack;
use switchyard_edge::{EdgeConfig, RunningEdge};
use switchyard_router::{RouterConfig, RunningRouter};

use crate::nats_server::NatsServer;

/// The HMAC secret test edges use.
pub const TEST_SECRET: &str = "test-secret-generated-for-this-run";

/// One Prometheus recorder per test process, shared by every embedded component.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .install_recorder()
                .expect("first recorder in this process")
        })
        .clone()
}

/// nats-server + router + edge.
pub struct Fleet {
    /// The NATS server (killed on drop).
    pub nats: NatsServer,
    /// The router.
    pub router: Option<RunningRouter>,
    /// The edge.
    pub edge: Option<RunningEdge>,
    /// A NATS client for producing events.
    pub producer: async_nats::Client,
}

impl Fleet {
    /// Starts everything with default settings.
    pub async fn start() -> Result<Fleet> {
        Fleet::start_with(|_| {}).await
    }

    /// Starts everything, letting the caller adjust the edge's config.
    pub async fn start_with(tweak_edge: impl FnOnce(&mut EdgeConfig)) -> Result<Fleet> {
        Fleet::start_custom(|_| {}, tweak_edge).await
    }

    /// Starts everything, letting the caller adjust the router's and the edge's config.
    pub async fn start_custom(
        tweak_router: impl FnOnce(&mut RouterConfig),
        tweak_edge: impl FnOnce(&mut EdgeConfig),
    ) -> Result<Fleet> {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_env("SWITCHYARD_LOG"))
            .with_test_writer()
            .try_init();
        let nats = NatsServer::start()?;
        let mut rc = RouterConfig::embedded(&nats.url());
        rc.metrics = Some(metrics_handle());
        tweak_router(&mut rc);
        let router = switchyard_router::start(rc).await?;
        let mut ec = EdgeConfig::embedded(&nats.url(), TEST_SECRET);
        ec.metrics = Some(metrics_handle());
        tweak_edge(&mut ec);
        let edge = switchyard_edge::start(ec).await?;
        let producer = async_nats::connect(nats.url()).await?;
        Ok(Fleet {
            nats,
            router: Some(router),
            edge: Some(edge),
            producer,
        })
    }

    /// Starts one more edge on the same NATS server (default settings).
    pub async fn start_edge(&self) -> Result<RunningEdge> {
        let mut ec = EdgeConfig::embedded(&self.nats.url(), TEST_SECRET);
        ec.metrics = Some(metrics_handle());
        Ok(switchyard_edge::start(ec).await?)
    }

    /// `ws://ADDR/ws` of the edge.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.edge.as_ref().expect("edge running").ws_addr)
    }

    /// `http://ADDR` of the edge's admin endpoint.
    pub fn edge_admin(&self) -> std::net::SocketAddr {
        self.edge.as_ref().expect("edge running").admin_addr
    }

    /// A token for `sub` valid for an hour, with extra claims.
    pub fn token(&self, sub: &str, extra: Value) -> String {
        crate::tokens::token(TEST_SECRET, sub, 3600, extra)
    }

    /// Connects `user` to the edge at `url` with a bearer token, resuming
    /// from `since` in `epoch` when given; the client and its `ready`.
    pub async fn connect(
        &self,
        url: &str,
        user: &str,
        resume: Option<(&str, u64)>,
    ) -> Result<(crate::ws_client::WsClient, Value)> {
        let opts = crate::ws_client::Connect {
            bearer: Some(self.token(user, serde_json::json!({}))),
            protocols: vec![],
            query: resume.map(|(epoch, since)| format!("epoch={epoch}&since={since}")),
        };
        let mut c = crate::ws_client::WsClient::connect(url, &opts)
            .await
            .map_err(|e| anyhow::anyhow!("{user}: {e:?}"))?;
        let ready = c.expect_op("ready").await?;
        Ok((c, ready))
    }

    /// Publishes a producer event given as JSON, encoded as MessagePack, on `sy.events.<subject_tail>`.
    pub async fn publish(&self, subject_tail: &str, event: &Value) -> Result<()> {
        let mut payload = Vec::new();
        json_to_msgpack(event, &mut payload);
        self.publish_raw(subject_tail, payload, false).await
    }

    /// Publishes raw bytes (MessagePack, or JSON with the Content-Type header).
    pub async fn publish_raw(&self, subject_tail: &str, payload: Vec<u8>, json: bool) -> Result<()> {
        let subject = format!("sy.events.{subject_tail}");
        if json {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Content-Type", "application/json; charset=utf-8");
            self.producer
                .publish_with_headers(subject, headers, payload.into())
                .await?;
        } else {
            self.producer.publish(subject, payload.into()).await?;
        }
        self.producer.flush().await?;
        Ok(())
    }

    /// Waits until the routers have handled everything published so far:
    /// after a JetStream-acknowledged fence (stored after everything this
    /// producer published before it), both event streams must be empty,
    /// since routers acknowledge (and so remove) an event only once its
    /// deliveries are out.
    pub async fn settle(&self) -> Result<()> {
        let js = async_nats::jetstream::new(self.producer.clone());
        let mut fence = Vec::new();
        json_to_msgpack(
            &serde_json::json!({"data": 0, "target": {"users": ["zz-fence"]}, "durable": false}),
            &mut fence,
        );
        js.publish("sy.events.fence", fence.into()).await?.await?;
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
        while tokio::time::Instant::now() < deadline {
            let mut left = 0;
            let subjects = switchyard_common::subject::Subjects::default();
            for shape in switchyard_common::subject::EventShape::ALL {
                left += js
                    .get_stream(subjects.events_stream(shape))
                    .await?
                    .cached_info()
                    .state
                    .messages;
            }
            // And the delivery stage has stored and sent every durable hand-off.
            left += js
                .get_stream(subjects.targets_stream())
                .await?
                .cached_info()
                .state
                .messages;
            if left == 0 {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        anyhow::bail!("the routers did not handle every event within 20 s")
    }

    /// Starts one more router on the same NATS server (an in-process one
    /// shares the test's metrics recorder).
    pub async fn start_router(&self, tweak: impl FnOnce(&mut RouterConfig)) -> Result<RunningRouter> {
        let mut rc = RouterConfig::embedded(&self.nats.url());
        rc.metrics = Some(metrics_handle());
        tweak(&mut rc);
        Ok(switchyard_router::start(rc).await?)
    }

    /// Stops router and edge (the NATS server stops on drop).
    pub async fn shutdown(mut self) {
        if let Some(e) = self.edge.take() {
            e.shutdown().await;
        }
        if let Some(r) = self.router.take() {
            r.shutdown().await;
        }
    }
}

/// Writes a self-signed certificate for `localhost` (basic constraints
/// CA:FALSE, as rustls wants) and its key into `dir`; their paths, for an
/// edge's `tls_cert` / `tls_key`, and the certificate itself (for a client's roots).
pub fn write_test_certificate(dir: &std::path::Path) -> Result<TestCertificate> {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_string()])?;
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok(TestCertificate {
        cert_path,
        key_path,
        der: cert.der().clone(),
    })
}

/// What [`write_test_certificate`] made.
pub struct TestCertificate {
    /// The PEM certificate file.
    pub cert_path: std::path::PathBuf,
    /// The PEM private key file.
    pub key_path: std::path::PathBuf,
    /// The certificate, for a client's root store.
    pub der: rustls::pki_types::CertificateDer<'static>,
}

impl TestCertificate {
    /// Makes an edge configuration serve WSS with this certificate.
    pub fn serve(&self, c: &mut EdgeConfig) {
        c.tls_cert = Some(self.cert_path.clone());
        c.tls_key = Some(self.key_path.clone().into());
    }
}

/// User partitions and log streams of a router with default settings.
pub const USER_PARTITIONS: u32 = 8;
/// See [`USER_PARTITIONS`].
pub const LOG_STREAMS: u32 = 4;

/// The log stream and subject holding `user`'s durable deliveries (default settings).
pub fn user_log(user: &str) -> (String, String) {
    let subjects = switchyard_common::subject::Subjects::default();
    let p = switchyard_common::fanout::user_partition(user, USER_PARTITIONS);
    (subjects.log_stream(p % LOG_STREAMS), subjects.deliver(p, user))
}

/// Durable deliveries stored in all log streams (default settings).
pub async fn stored_deliveries(js: &async_nats::jetstream::Context) -> Result<u64> {
    let subjects = switchyard_common::subject::Subjects::default();
    let mut n = 0;
    for g in 0..LOG_STREAMS {
        n += js
            .get_stream(subjects.log_stream(g))
            .await?
            .cached_info()
            .state
            .messages;
    }
    Ok(n)
}

/// The value of one series (`name{labels}` exactly as exported, or a bare
/// name) in a Prometheus text page; 0 when absent.
pub fn metric(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `GET path` on an HTTP endpoint (the admin ports): status and body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String)> {
    use anyhow::Context;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await?;
    let mut out = String::new();
    tokio::time::timeout(std::time::Duration::from_secs(10), s.read_to_string(&mut out)).await??;
    let status = out
        .split_whitespace()
        .nth(1)
        .context("no status line")?
        .parse()
        .context("bad status")?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out.as_str(), ""));
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked { dechunk(body)? } else { body.to_string() };
    Ok((status, body))
}

/// The body of a `Transfer-Encoding: chunked` response (nats-server's
/// monitoring endpoint sends larger pages so).
fn dechunk(mut rest: &str) -> Result<String> {
    use anyhow::Context;
    let mut body = String::new();
    loop {
        let (size, tail) = rest.split_once("\r\n").context("chunk size line")?;
        let size = usize::from_str_radix(size.trim(), 16).context("chunk size")?;
        if size == 0 {
            return Ok(body);
        }
        let chunk = tail.get(..size).context("chunk shorter than its size")?;
        body.push_str(chunk);
        rest = tail
            .get(size..)
            .and_then(|t| t.strip_prefix("\r\n"))
            .context("chunk end")?;
    }
}

//! A real 3-node (or n-node) nats-server cluster with JetStream on
//! loopback, the shape `k8s/nats.yaml` runs in production.
//!
//! Each node is a separate nats-server process with its own store
//! directory, client port, cluster port and monitoring port (all chosen up
//! front, so every node can list every other's cluster address in its
//! routes). [`NatsCluster::start`] returns once every node answers on its
//! client port and reports the same elected JetStream meta leader, so
//! clustered streams (replicas 3) can be created right away. Processes are
//! killed on drop; their logs are in [`NatsCluster::log_dir`].

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::nats_server::nats_server_binary;
use crate::processes::{free_ports, ChildProcess};

/// How long the cluster may take to form and elect a meta leader.
const FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// One node of the cluster.
#[derive(Debug)]
pub struct NatsNode {
    /// The nats-server process.
    pub process: ChildProcess,
    /// Client port on 127.0.0.1.
    pub port: u16,
    /// Monitoring (`/varz`, `/jsz`, `/healthz`) address.
    pub monitor: SocketAddr,
}

/// A running cluster; dropping it kills every node.
#[derive(Debug)]
pub struct NatsCluster {
    /// The nodes, `n1`, `n2`, ...
    pub nodes: Vec<NatsNode>,
    // Last field: removed after the nodes' processes were killed.
    dir: TempDir,
}

impl NatsCluster {
    /// Starts `size` clustered nodes with JetStream and waits until they
    /// agree on a meta leader.
    pub async fn start(size: usize) -> Result<NatsCluster> {
        let bin = nats_server_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("switchyard-nats-cluster-")
            .tempdir()
            .context("creating a temporary directory for the cluster")?;
        let ports = free_ports(size * 3)?;
        let routes = (0..size)
            .map(|i| format!("nats://127.0.0.1:{}", ports[size + i]))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes = Vec::with_capacity(size);
        for i in 0..size {
            let name = format!("n{}", i + 1);
            let store = dir.path().join(&name);
            let (client, cluster, http) = (ports[i], ports[size + i], ports[2 * size + i]);
            let args: Vec<String> = [
                "-a",
                "127.0.0.1",
                "-p",
                &client.to_string(),
                "-m",
                &http.to_string(),
                "-n",
                &name,
                "-js",
                "-sd",
                &store.to_string_lossy(),
                "--cluster_name",
                "switchyard-test",
                "--cluster",
                &format!("nats://127.0.0.1:{cluster}"),
                "--routes",
                &routes,
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let mut process = ChildProcess::new(&format!("nats-{name}"), &bin, &args, &[], dir.path());
            process.start()?;
            nodes.push(NatsNode {
                process,
                port: client,
                monitor: format!("127.0.0.1:{http}").parse()?,
            });
        }
        let mut cluster = NatsCluster { nodes, dir };
        cluster.wait_formed().await?;
        Ok(cluster)
    }

    /// Every node's client URL, comma separated (what `SWITCHYARD_NATS_URL` takes).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Where the nodes' logs (and stores) are.
    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Waits until every node runs, answers `/healthz` and names the same
    /// JetStream meta leader in `/jsz`.
    async fn wait_formed(&mut self) -> Result<()> {
        let deadline = Instant::now() + FORM_TIMEOUT;
        loop {
            let mut leaders = Vec::new();
            for node in &mut self.nodes {
                if !node.process.is_running()? {
                    return Err(node.process.failure("nats-server exited while the cluster was forming"));
                }
                leaders.push(meta_leader(node.monitor).await);
            }
            if let Some(Some(first)) = leaders.first() {
                if leaders.iter().all(|l| l.as_deref() == Some(first.as_str())) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                let first = &self.nodes[0].process;
                bail!(
                    "the cluster elected no common JetStream meta leader within {FORM_TIMEOUT:?} (seen: {leaders:?})\n{}",
                    first.failure("first node")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The meta leader a node reports in `/jsz`, if any.
async fn meta_leader(monitor: SocketAddr) -> Option<String> {
    let (status, body) = tokio::time::timeout(Duration::from_secs(2), crate::fleet::http_get(monitor, "/jsz"))
        .await
        .ok()?
        .ok()?;
    if status != 200 {
        return None;
    }
    let json: serde_json::Value = serde_json::from_str(&body).ok()?;
    json["meta_cluster"]["leader"]
        .as_str()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
}

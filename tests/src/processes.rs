//! Switchyard's own binaries as child processes, for fleet tests that need
//! what the in-process [`crate::fleet`] cannot give: several routers and
//! edges that can be stopped with a real SIGTERM (the edge's drain path in
//! `main.rs`) or killed with SIGKILL (a crash), and started again.
//!
//! The binaries are the ones cargo built next to the test executable
//! (`target/<profile>/switchyard-router`, `switchyard-edge`). Cargo builds
//! a package's binaries for `cargo test` only when that package has
//! integration tests: `router/tests/` and `edge/tests/binary.rs` make sure
//! `cargo test --workspace` builds both. Nothing here builds them; a
//! missing binary is an error that says how to build it.
//!
//! Every process gets a clean environment (only the `SWITCHYARD_*` settings
//! given here, plus `SWITCHYARD_LOG`), its output goes to a log file whose
//! tail is quoted in errors, and it is killed and reaped on drop. Ports are
//! chosen up front ([`free_ports`]) so a restarted process comes back on the
//! same addresses, like a pod behind a Service.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Lines of a process log quoted in errors.
const LOG_TAIL_LINES: usize = 40;
/// How long a process may take to report ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// `n` distinct free TCP ports on 127.0.0.1. The listeners are held until
/// all are picked, so the ports differ; another process could still take
/// one before it is used, which on loopback in a test run is unlikely.
pub fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("binding 127.0.0.1:0 to find a free port"))
        .collect::<Result<Vec<_>>>()?;
    listeners.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

/// Finds a workspace binary (`switchyard-router`, `switchyard-edge`) in the
/// directory cargo put it: the parent of the test executable's `deps/`.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the test executable")?;
    let dir = exe
        .parent()
        .filter(|d| d.ends_with("deps"))
        .and_then(Path::parent)
        .or_else(|| exe.parent())
        .ok_or_else(|| anyhow!("no directory around {}", exe.display()))?;
    let bin = dir.join(name);
    if bin.is_file() {
        Ok(bin)
    } else {
        bail!(
            "{name} not found at {}: `cargo test --workspace` builds it; when running only this \
             test, build it first with `cargo build -p switchyard-router -p switchyard-edge` \
             (same profile and target dir as the test)",
            bin.display()
        )
    }
}

/// A child process with a log file, killed on drop.
#[derive(Debug)]
pub struct ChildProcess {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
    /// Log size when the current run started, so errors quote only this run.
    log_offset: u64,
}

impl ChildProcess {
    /// Describes a process; nothing runs until [`ChildProcess::start`].
    /// `log_dir` receives `<name>.log`, appended to across restarts.
    pub fn new(name: &str, bin: &Path, args: &[String], env: &[(String, String)], log_dir: &Path) -> ChildProcess {
        ChildProcess {
            name: name.to_string(),
            bin: bin.to_path_buf(),
            args: args.to_vec(),
            env: env.to_vec(),
            log: log_dir.join(format!("{name}.log")),
            child: None,
            log_offset: 0,
        }
    }

    /// The name given at creation (used in logs and errors).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Starts the process (again, after it stopped), with a clean environment.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running()? {
            bail!("{} is already running", self.name);
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("opening {}", self.log.display()))?;
        self.log_offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let err = log.try_clone().context("duplicating a log handle")?;
        let mut cmd = Command::new(&self.bin);
        cmd.args(&self.args)
            .env_clear()
            .env("NO_COLOR", "1")
            .env("RUST_BACKTRACE", "1")
            .env(
                "SWITCHYARD_LOG",
                std::env::var("SWITCHYARD_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        self.child = Some(
            cmd.spawn()
                .with_context(|| format!("spawning {} ({})", self.name, self.bin.display()))?,
        );
        Ok(())
    }

    /// Whether the process is running (reaps it if it exited).
    pub fn is_running(&mut self) -> Result<bool> {
        match self.child.as_mut() {
            None => Ok(false),
            Some(child) => match child.try_wait().context("polling a child process")? {
                None => Ok(true),
                Some(_) => {
                    self.child = None;
                    Ok(false)
                }
            },
        }
    }

    /// Sends SIGTERM (Kubernetes' stop signal); the process keeps running
    /// until it exits by itself: see [`ChildProcess::wait_exit`].
    pub fn terminate(&self) -> Result<()> {
        self.signal(rustix::process::Signal::TERM)
    }

    /// SIGKILL, like a crash or an OOM kill, and reaps the process.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // `kill` fails only when the process already exited; `wait` reaps it either way.
            let _ = child.kill();
            child
                .wait()
                .with_context(|| format!("waiting for {} to exit", self.name))?;
        }
        Ok(())
    }

    /// Waits (polling, without blocking the async runtime) for the process
    /// to exit by itself, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let child = self
                .child
                .as_mut()
                .ok_or_else(|| anyhow!("{} is not running", self.name))?;
            if let Some(status) = child.try_wait().context("polling a child process")? {
                self.child = None;
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!("{} did not exit within {timeout:?}", self.name)));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `GET /readyz` on `admin` answers 200, failing early if
    /// the process exits.
    pub async fn wait_ready(&mut self, admin: SocketAddr) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if !self.is_running()? {
                return Err(self.failure(&format!("{} exited before it was ready", self.name)));
            }
            if let Ok(Ok((200, _))) =
                tokio::time::timeout(Duration::from_secs(2), crate::fleet::http_get(admin, "/readyz")).await
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.failure(&format!(
                    "{} was not ready on http://{admin}/readyz within {READY_TIMEOUT:?}",
                    self.name
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The last lines of this process's log (all runs).
    pub fn log_tail(&self, lines: usize) -> String {
        let text = read_from(&self.log, 0);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The log file (kept until the directory given at creation goes).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// An error quoting the tail of the current run's log.
    pub fn failure(&self, what: &str) -> anyhow::Error {
        let text = read_from(&self.log, self.log_offset);
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        anyhow!("{what}\nlog ({}), last lines:\n{tail}", self.log.display())
    }

    fn signal(&self, sig: rustix::process::Signal) -> Result<()> {
        let child = self
            .child
            .as_ref()
            .ok_or_else(|| anyhow!("{} is not running", self.name))?;
        let raw = i32::try_from(child.id()).context("pid out of range")?;
        let pid = rustix::process::Pid::from_raw(raw).ok_or_else(|| anyhow!("pid 0"))?;
        rustix::process::kill_process(pid, sig).with_context(|| format!("signalling {}", self.name))
    }
}

impl Drop for ChildProcess {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

/// A `switchyard-router` process.
#[derive(Debug)]
pub struct RouterProcess {
    /// The process.
    pub process: ChildProcess,
    /// Its admin endpoint (`/healthz`, `/readyz`, `/metrics`).
    pub admin: SocketAddr,
}

impl RouterProcess {
    /// Starts a router on `nats_url` (comma-separated URLs) with `settings`
    /// (`SWITCHYARD_*` pairs) and waits until it is ready.
    pub async fn start(name: &str, nats_url: &str, settings: &[(&str, &str)], log_dir: &Path) -> Result<RouterProcess> {
        let bin = workspace_binary("switchyard-router")?;
        let admin: SocketAddr = format!("127.0.0.1:{}", free_ports(1)?[0]).parse()?;
        let mut env = vec![
            ("SWITCHYARD_NATS_URL".to_string(), nats_url.to_string()),
            ("SWITCHYARD_ADMIN_LISTEN".to_string(), admin.to_string()),
        ];
        env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut process = ChildProcess::new(name, &bin, &[], &env, log_dir);
        process.start()?;
        process.wait_ready(admin).await?;
        Ok(RouterProcess { process, admin })
    }
}

/// A `switchyard-edge` process on fixed ports, so it comes back on the same
/// addresses after [`EdgeProcess::restart`].
#[derive(Debug)]
pub struct EdgeProcess {
    /// The process.
    pub process: ChildProcess,
    /// Where WebSocket clients connect.
    pub ws: SocketAddr,
    /// Its admin endpoint.
    pub admin: SocketAddr,
}

impl EdgeProcess {
    /// Starts an edge on `nats_url` verifying HS256 tokens with `secret`,
    /// with more `settings`, and waits until it is ready.
    pub async fn start(
        name: &str,
        nats_url: &str,
        secret: &str,
        settings: &[(&str, &str)],
        log_dir: &Path,
    ) -> Result<EdgeProcess> {
        let bin = workspace_binary("switchyard-edge")?;
        let ports = free_ports(2)?;
        let ws: SocketAddr = format!("127.0.0.1:{}", ports[0]).parse()?;
        let admin: SocketAddr = format!("127.0.0.1:{}", ports[1]).parse()?;
        let mut env = vec![
            ("SWITCHYARD_NATS_URL".to_string(), nats_url.to_string()),
            ("SWITCHYARD_LISTEN".to_string(), ws.to_string()),
            ("SWITCHYARD_ADMIN_LISTEN".to_string(), admin.to_string()),
            ("SWITCHYARD_JWT_SECRET".to_string(), secret.to_string()),
        ];
        env.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut process = ChildProcess::new(name, &bin, &[], &env, log_dir);
        process.start()?;
        process.wait_ready(admin).await?;
        Ok(EdgeProcess { process, ws, admin })
    }

    /// `ws://ADDR/ws`.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.ws)
    }

    /// What Kubernetes does to a pod being replaced: SIGTERM, wait for the
    /// drain to finish and the process to exit (at most `timeout`), then
    /// start it again on the same ports and wait until it is ready. Returns
    /// the exit status of the stopped run.
    pub async fn restart(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.process.terminate()?;
        let status = self.process.wait_exit(timeout).await?;
        // The listening port is free once the process is gone; a bind can
        // still race a TIME_WAIT socket on some kernels, so retry briefly.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            self.process.start()?;
            match self.process.wait_ready(self.admin).await {
                Ok(()) => return Ok(status),
                Err(e) if Instant::now() < deadline && !self.process.is_running()? => {
                    tracing::warn!(error = %e, "edge restart failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The file's contents from byte `offset` on (lossily decoded; empty on error).
fn read_from(path: &Path, offset: u64) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.read_to_end(&mut bytes);
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

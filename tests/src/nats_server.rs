//! A real `nats-server` process for integration tests.
//!
//! Switchyard's tests run against a real nats-server with JetStream, never a
//! mock: the router and edge depend on NATS semantics (subject matching, queue
//! groups, JetStream KV buckets, reconnects, persistence across restarts) that
//! a fake would only approximate, and the server version matters (Debian's
//! 2.9.10 cannot serve async-nats 0.51's KV bucket creation).
//! `scripts/install-nats.sh` installs the pinned 2.15.1 into `<repo>/.venv`;
//! it starts in well under a second, so each test can afford its own server.
//!
//! Each [`NatsServer`] gets its own temporary directory (JetStream store, log
//! file, ports file) and a free loopback port picked by nats-server itself
//! (`-p -1`, read back from the file written by `--ports_file_dir`), so tests
//! can run in parallel without port clashes. The process is killed when the
//! value is dropped. Its stdout and stderr go to a log file in the temporary
//! directory rather than the test output, and the tail of that log is part of
//! any start-up error.
//!
//! The module is deliberately synchronous (std only), so it works from plain
//! `#[test]`s as well as from async ones.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use tempfile::TempDir;

/// Environment variable naming the nats-server binary (set by `scripts/test.sh`).
const BIN_ENV: &str = "SWITCHYARD_NATS_SERVER";
/// How long one start attempt may take before we give up.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NatsServer::restart`] keeps retrying while the old port is busy.
const REBIND_TIMEOUT: Duration = Duration::from_secs(3);
/// Polling interval while waiting for the server.
const POLL: Duration = Duration::from_millis(10);
/// Lines of the server log quoted in errors.
const LOG_TAIL_LINES: usize = 40;
/// Oldest nats-server accepted (async-nats 0.51's KV needs a recent server).
const MIN_VERSION: (u64, u64) = (2, 10);
/// Name of the log file inside the server's temporary directory.
const LOG_FILE: &str = "nats-server.log";
/// What to tell the developer when no usable binary is found.
const INSTALL_HINT: &str = "run scripts/install-nats.sh (it installs nats-server 2.15.1 into \
                            <repo>/.venv), or set SWITCHYARD_NATS_SERVER to a nats-server binary";

/// A running `nats-server` (with JetStream) on `127.0.0.1`, owned by a test.
///
/// Start one with [`NatsServer::start`] and connect clients to
/// [`NatsServer::url`]. On drop the process is killed and reaped, and its
/// temporary directory (JetStream store included) is deleted.
#[derive(Debug)]
pub struct NatsServer {
    bin: PathBuf,
    child: Option<Child>,
    port: u16,
    /// The monitoring port (`/varz`, `/jsz`), chosen free at start and kept across restarts.
    monitor: u16,
    store: PathBuf,
    /// A configuration file (`-c`) and the environment it reads, if any.
    config: Option<(PathBuf, Vec<(String, String)>)>,
    // Last field: the directory is removed after `Drop::drop` killed the process.
    dir: TempDir,
}

/// What came of waiting for a freshly spawned server.
enum Startup {
    /// The server wrote its ports file: it listens on this client port.
    Listening(u16),
    /// The process exited before it was ready.
    Exited(ExitStatus),
}

impl NatsServer {
    /// Starts a new nats-server with JetStream on a free loopback port, with
    /// its own temporary store directory, and waits until it accepts TCP
    /// connections.
    ///
    /// The binary is `$SWITCHYARD_NATS_SERVER` if set, else
    /// `<workspace>/.venv/bin/nats-server` if present, else `nats-server` on
    /// `PATH`. Fails, quoting the tail of the server log, if the server exits
    /// or is not ready within 10 seconds.
    pub fn start() -> Result<NatsServer> {
        NatsServer::start_with_config(None)
    }

    /// Starts like [`NatsServer::start`], also reading the configuration
    /// file `config` (e.g. an authorization block) with environment `env`
    /// (nats-server resolves `$NAME` in it from there). Flags the harness
    /// passes (address, ports, JetStream store) override the file.
    pub fn start_with_config(config: Option<(&Path, &[(&str, &str)])>) -> Result<NatsServer> {
        let bin = nats_server_binary()?;
        let dir = tempfile::Builder::new()
            .prefix("switchyard-nats-")
            .tempdir()
            .context("creating a temporary directory for nats-server")?;
        let store = dir.path().join("js");
        for d in [store.clone(), dir.path().join("ports")] {
            fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
        }
        let monitor = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .context("choosing a monitoring port")?
            .port();
        let mut server = NatsServer {
            bin,
            child: None,
            port: 0,
            monitor,
            store,
            config: config.map(|(path, env)| {
                let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
                (path.to_path_buf(), env)
            }),
            dir,
        };
        // From here on an early return drops `server`, which kills the process.
        let deadline = Instant::now() + START_TIMEOUT;
        let log_offset = server.log_len();
        server.child = Some(server.spawn("-1")?);
        match server.wait_for_ports_file(deadline, log_offset)? {
            Startup::Listening(port) => server.port = port,
            Startup::Exited(status) => {
                let msg = format!("nats-server exited during start-up ({status})");
                return Err(server.failure(&msg, log_offset));
            }
        }
        server.wait_for_tcp(deadline, log_offset)?;
        Ok(server)
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port on `127.0.0.1`; it stays the same across
    /// [`restart`](Self::restart).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The monitoring endpoint (`-m`): `/varz`, `/jsz` and the rest.
    pub fn monitor_addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.monitor))
    }

    /// The JetStream store directory (`-sd`). It survives
    /// [`restart`](Self::restart) and is deleted on drop.
    pub fn store_dir(&self) -> &Path {
        &self.store
    }

    /// The file receiving the server's stdout and stderr, appended to across
    /// restarts. Useful when debugging a failing test.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join(LOG_FILE)
    }

    /// Kills the server process (SIGKILL, like a crash) and waits for it to
    /// exit, keeping the port and store directory so that
    /// [`restart`](Self::restart) can bring the same server back. Does
    /// nothing if it is already stopped.
    pub fn stop(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // `kill` only fails if the process already exited; `wait` reaps it either way.
            let _ = child.kill();
            child.wait().context("waiting for nats-server to exit")?;
        }
        // A killed server leaves its ports file behind: remove it so that a
        // later start can never read a stale one.
        if let Ok(entries) = fs::read_dir(self.ports_dir()) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Stops the server (if running) and starts it again on the same port
    /// with the same store directory, so JetStream data persists across the
    /// restart.
    ///
    /// Retries for a few seconds while the port is still busy, then waits
    /// until the server accepts TCP connections again.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        let port = self.port.to_string();
        let rebind_deadline = Instant::now() + REBIND_TIMEOUT;
        loop {
            let deadline = Instant::now() + START_TIMEOUT;
            let log_offset = self.log_len();
            self.child = Some(self.spawn(&port)?);
            match self.wait_for_ports_file(deadline, log_offset)? {
                Startup::Listening(p) if p == self.port => {
                    return self.wait_for_tcp(deadline, log_offset);
                }
                Startup::Listening(p) => {
                    let msg = format!("nats-server restarted on port {p}, not {}", self.port);
                    return Err(self.failure(&msg, log_offset));
                }
                Startup::Exited(status) => {
                    self.child = None;
                    let log = read_from(&self.log_path(), log_offset);
                    if log.contains("address already in use") && Instant::now() < rebind_deadline {
                        thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                    let msg = format!("nats-server exited while restarting on port {} ({status})", self.port);
                    return Err(self.failure(&msg, log_offset));
                }
            }
        }
    }

    fn ports_dir(&self) -> PathBuf {
        self.dir.path().join("ports")
    }

    /// Current size of the log file, so errors can quote only the latest run.
    fn log_len(&self) -> u64 {
        fs::metadata(self.log_path()).map(|m| m.len()).unwrap_or(0)
    }

    /// Spawns nats-server with `-p port_arg`, output appended to the log file.
    fn spawn(&self, port_arg: &str) -> Result<Child> {
        let log_path = self.log_path();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening {}", log_path.display()))?;
        let log_err = log.try_clone().context("duplicating the log file handle")?;
        let mut command = Command::new(&self.bin);
        if let Some((path, env)) = &self.config {
            command.arg("-c").arg(path).envs(env.iter().map(|(k, v)| (k, v)));
        }
        command
            .arg("-a")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(port_arg)
            .arg("-m")
            .arg(self.monitor.to_string())
            .arg("-js")
            .arg("-sd")
            .arg(&self.store)
            .arg("--ports_file_dir")
            .arg(self.ports_dir())
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .with_context(|| format!("spawning {}", self.bin.display()))
    }

    /// Waits for the ports file of the current process (named
    /// `<executable>_<pid>.ports`; nats-server writes it once its listeners
    /// are up) and returns the client port it lists.
    fn wait_for_ports_file(&mut self, deadline: Instant, log_offset: u64) -> Result<Startup> {
        let ports_dir = self.ports_dir();
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("nats-server is not running"))?;
        let suffix = format!("_{}.ports", child.id());
        loop {
            if let Some(status) = child.try_wait().context("polling nats-server")? {
                return Ok(Startup::Exited(status));
            }
            if let Some(port) = read_ports_file(&ports_dir, &suffix) {
                return Ok(Startup::Listening(port));
            }
            if Instant::now() >= deadline {
                let msg = format!(
                    "nats-server wrote no ports file in {} within {START_TIMEOUT:?}",
                    ports_dir.display()
                );
                return Err(self.failure(&msg, log_offset));
            }
            thread::sleep(POLL);
        }
    }

    /// Waits until a TCP connection to the client port succeeds.
    fn wait_for_tcp(&mut self, deadline: Instant, log_offset: u64) -> Result<()> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            let exited = match self.child.as_mut() {
                Some(child) => child.try_wait().context("polling nats-server")?,
                None => None,
            };
            if let Some(status) = exited {
                let msg = format!("nats-server exited before accepting connections ({status})");
                return Err(self.failure(&msg, log_offset));
            }
            if Instant::now() >= deadline {
                let msg = format!("nats-server did not accept connections on {addr} in time");
                return Err(self.failure(&msg, log_offset));
            }
            thread::sleep(POLL);
        }
    }

    /// Builds an error quoting the tail of the log written since `log_offset`.
    fn failure(&self, what: &str, log_offset: u64) -> anyhow::Error {
        let log = read_from(&self.log_path(), log_offset);
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
        anyhow!(
            "{what}\nbinary: {}\nlog ({}), last lines:\n{tail}",
            self.bin.display(),
            self.log_path().display()
        )
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// Reads the client port from `<dir>/*<suffix>`, if that file exists and is
/// complete: `{"nats":["nats://127.0.0.1:PORT"],...}`. A half-written file
/// reads as `None`; the caller polls again.
fn read_ports_file(dir: &Path, suffix: &str) -> Option<u16> {
    let path = fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(suffix))
    })?;
    let text = fs::read_to_string(path).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = json.get("nats")?.as_array()?.first()?.as_str()?;
    url.rsplit_once(':')?.1.parse().ok()
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

/// Finds the nats-server binary and checks its version, once per process.
pub fn nats_server_binary() -> Result<PathBuf> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            let bin = locate_binary()?;
            check_version(&bin)?;
            Ok(bin)
        })
        .clone()
        .map_err(|e| anyhow!(e))
}

/// `$SWITCHYARD_NATS_SERVER`, else `<workspace>/.venv/bin/nats-server`, else
/// `nats-server` on `PATH`.
fn locate_binary() -> Result<PathBuf, String> {
    if let Some(value) = std::env::var_os(BIN_ENV).filter(|v| !v.is_empty()) {
        let bin = PathBuf::from(value);
        return if bin.is_file() {
            Ok(bin)
        } else {
            Err(format!(
                "{BIN_ENV} is set to {}, which is not a file; {INSTALL_HINT}",
                bin.display()
            ))
        };
    }
    let venv_bin = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(".venv/bin/nats-server");
    if venv_bin.is_file() {
        return Ok(venv_bin);
    }
    if let Some(path) = std::env::var_os("PATH") {
        if let Some(bin) = std::env::split_paths(&path)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
        {
            return Ok(bin);
        }
    }
    Err(format!(
        "nats-server not found ({BIN_ENV} unset, no {}, none on PATH); {INSTALL_HINT}",
        venv_bin.display()
    ))
}

/// Rejects servers older than [`MIN_VERSION`] (e.g. a distribution's 2.9).
fn check_version(bin: &Path) -> Result<(), String> {
    let out = Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running {} --version: {e}; {INSTALL_HINT}", bin.display()))?;
    // Prints e.g. "nats-server: v2.15.1".
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let version = text.rsplit('v').next().unwrap_or_default();
    let mut parts = version.split('.').map(|p| p.parse::<u64>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) if (major, minor) >= MIN_VERSION => Ok(()),
        _ => Err(format!(
            "{} --version says {text:?}; need nats-server >= {}.{}; {INSTALL_HINT}",
            bin.display(),
            MIN_VERSION.0,
            MIN_VERSION.1
        )),
    }
}

//! The NATS side both tiers share: connecting with a bounded wait for the
//! first connection, opening or creating a KV bucket (several processes may
//! race to create it), and the typed storage setting of JetStream assets.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream::StorageType};

/// How long [`connect`] waits for the first connection before it returns
/// anyway (the client keeps retrying in the background).
pub const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);

/// Where JetStream keeps a stream or bucket. Parsed once from configuration
/// (`file` or `memory`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Storage {
    /// On disk: survives a NATS restart (the default).
    #[default]
    File,
    /// In memory: faster, lost when NATS restarts (tests, throwaway setups).
    Memory,
}

impl From<Storage> for StorageType {
    fn from(s: Storage) -> StorageType {
        match s {
            Storage::File => StorageType::File,
            Storage::Memory => StorageType::Memory,
        }
    }
}

/// Why NATS could not be connected to.
#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    /// The connection failed.
    #[error(transparent)]
    Connect(#[from] async_nats::ConnectError),
    /// The credentials file could not be read.
    #[error("cannot read the NATS credentials file")]
    Credentials(#[source] std::io::Error),
}

/// Connects with `options` to the URL(s) of `nats` (comma separated),
/// logging in as it says (user and password, from the settings or the
/// URL, or a credentials file), retrying the first connection in the
/// background, and waits up to [`FIRST_CONNECT_WAIT`] for it. A client that
/// is not connected by then is returned all the same: readiness reports it.
pub async fn connect(
    options: async_nats::ConnectOptions,
    nats: &crate::config::NatsArgs,
) -> Result<async_nats::Client, NatsConnectError> {
    let urls: Vec<&str> = nats.nats_url.split(',').map(str::trim).collect();
    let options = match (&nats.nats_creds, &nats.nats_user, user_in_url(&urls)) {
        (Some(path), _, _) => options
            .credentials_file(path)
            .await
            .map_err(NatsConnectError::Credentials)?,
        (None, Some(user), _) => {
            let password = nats
                .nats_password
                .as_ref()
                .map(|p| p.expose().clone())
                .unwrap_or_default();
            options.user_and_password(user.clone(), password)
        }
        // async-nats does not log in with the URL's user itself.
        (None, None, Some((user, password))) => options.user_and_password(user, password),
        (None, None, None) => options,
    };
    let client = options.retry_on_initial_connect().connect(urls).await?;
    let connected = async {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        while client.connection_state() != async_nats::connection::State::Connected {
            tick.tick().await;
        }
    };
    if tokio::time::timeout(FIRST_CONNECT_WAIT, connected).await.is_err() {
        tracing::warn!("not connected to NATS yet; continuing while the client retries");
    }
    Ok(client)
}

/// The first `user:password@` among `urls` (percent-decoding is left to
/// the operator: write the password as it is).
fn user_in_url(urls: &[&str]) -> Option<(String, String)> {
    urls.iter().find_map(|u| {
        let addr: async_nats::ServerAddr = u.parse().ok()?;
        let user = addr.username()?.to_string();
        Some((user, addr.password().unwrap_or_default().to_string()))
    })
}

/// Tries of [`open_or_create_kv`] before it gives up.
const KV_OPEN_TRIES: usize = 5;

/// A KV bucket could be neither opened nor created.
#[derive(Debug, thiserror::Error)]
#[error("cannot open or create the KV bucket {bucket}")]
pub struct KvOpenError {
    /// The bucket's name.
    pub bucket: String,
    /// The last creation failure.
    #[source]
    pub source: jetstream::context::CreateKeyValueError,
}

/// Opens the bucket `config` names, creating it with `config` when missing.
/// Several processes may race to create it; each try opens first, so the
/// loser of a race opens what the winner made.
pub async fn open_or_create_kv(js: &jetstream::Context, config: &kv::Config) -> Result<kv::Store, KvOpenError> {
    let mut tries = 0;
    loop {
        if let Ok(kv) = js.get_key_value(config.bucket.as_str()).await {
            return Ok(kv);
        }
        match js.create_key_value(config.clone()).await {
            Ok(kv) => return Ok(kv),
            Err(source) => {
                tries += 1;
                if tries >= KV_OPEN_TRIES {
                    return Err(KvOpenError {
                        bucket: config.bucket.clone(),
                        source,
                    });
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a revocation's delete marker stays after the revocation expires
/// (edges watching the bucket see it and forget the revocation).
const REVOCATION_MARKER_TTL: Duration = Duration::from_secs(300);

/// The token revocation bucket (application API `revoke`): one key per
/// revoked user or token, each written with its own TTL (when no token it
/// covers can still be valid), so the bucket holds no more than the
/// operator's longest token lifetime allows. Routers create it; an edge
/// that starts first creates the same.
pub fn revocation_bucket(name: String, storage: Storage, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: name,
        description: "Switchyard token revocations".into(),
        history: 1,
        num_replicas: replicas,
        storage: storage.into(),
        limit_markers: Some(REVOCATION_MARKER_TTL),
        ..Default::default()
    }
}

//! Token verification: who a connection's user is.
//!
//! Owns the JWT keys (an HMAC secret, a PEM public key, a JWKS file), the
//! choice of key for a token, the claim checks, and a bounded cache of tokens
//! already verified. Identity comes only from here: the user id is the
//! verified token's `sub`, never a frame field or a header the client sets,
//! and `sub` must be a safe user id because it becomes a NATS subject token.
//!
//! Must not: take a key from the token itself (`jwk`, `jku`, `x5u`, `x5c` in
//! the header are ignored; only `alg` and `kid` are read), accept `alg: none`
//! or any algorithm outside HS256/384/512, RS256 and ES256, accept an
//! algorithm whose kind of key is not configured (an HMAC token when only
//! public keys are, an RS256/ES256 token when only a secret is), or start a
//! task.
//!
//! Keys: HS256/384/512 use the secret. RS256 needs an RSA key of at least
//! 2048 bits and ES256 a P-256 key, from a PEM file (SPKI `PUBLIC KEY`, or
//! PKCS#1 `RSA PUBLIC KEY`; the kind is detected) or from a JWKS file. A
//! token with a `kid` is checked with the JWKS key of that `kid` when a JWKS
//! is configured (an unknown `kid` is refused, even with a PEM key
//! configured); a token without `kid` uses the PEM key when there is one,
//! else the JWKS's key when it holds exactly one (with several, `kid` is
//! required). JWKS entries for other uses or algorithms (`use: enc`, RS384,
//! P-384, ...) are skipped; a malformed RS256/ES256 entry makes the file
//! invalid.
//!
//! JWKS rotation, without a watcher task: at most once per
//! [`JWKS_CHECK_EVERY`], the verify that comes due stats the file (one
//! `metadata` call) and, when its modification time, length or inode changed,
//! reads and parses it inline (a small file, once per change; the other
//! verifies keep going with the current keys meanwhile). The new key set is
//! swapped in behind a `RwLock<Arc<_>>` held only to clone or replace the
//! `Arc`, and the cache is emptied: a rotation may be a revocation. A file
//! that cannot be read or parsed keeps the previous keys and logs a warning,
//! once per change of the file. The PEM key and the secret are read once.
//!
//! Cache: verified tokens, keyed by the SHA-256 of the token, so a reconnect
//! storm does not re-check every signature. Only successes are cached; an
//! entry expires at the token's `exp` (moka per-entry expiry, and checked
//! again on every hit against the verifier's clock), and an entry made with a
//! JWKS generation older than the current one is never returned.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, TryLockError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Header, Validation};
use moka::sync::Cache;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use switchyard_common::ids;

/// Verified tokens the cache holds by default.
pub const DEFAULT_CACHE_CAPACITY: u64 = 100_000;

/// How often the JWKS file is checked for a change, at most.
pub const JWKS_CHECK_EVERY: Duration = Duration::from_secs(1);

/// Smallest RSA modulus accepted, in bits.
const MIN_RSA_BITS: usize = 2048;

/// The claims the edge uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Claims {
    /// The user id (absent is refused by validation as a missing claim).
    #[serde(default)]
    pub sub: String,
    /// Expiry, unix seconds (absent is refused by validation as a missing claim).
    #[serde(default)]
    pub exp: u64,
    /// Not before, unix seconds, when present.
    #[serde(default)]
    pub nbf: Option<u64>,
    /// Issued at, unix seconds, when present (user revocations compare it).
    #[serde(default)]
    pub iat: Option<u64>,
    /// Token id, when present (token revocations name it).
    #[serde(default)]
    pub jti: Option<String>,
    /// Application roles, passed to rpc handlers.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Rooms the user may join (names or `prefix:*` patterns).
    #[serde(default)]
    pub rooms: Vec<String>,
}

impl Claims {
    /// What a revocation may name in this token.
    pub fn token_id(&self) -> crate::conn::TokenId {
        crate::conn::TokenId {
            iat: self.iat,
            jti: self.jti.as_deref().map(Box::from),
        }
    }
}

/// Why a token was refused.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No token was presented.
    #[error("missing token")]
    Missing,
    /// The token did not verify (signature, algorithm, shape, claims, time).
    #[error("invalid token: {0}")]
    Invalid(#[from] jsonwebtoken::errors::Error),
    /// The `sub` claim is not a valid user id.
    #[error("invalid sub claim")]
    BadSubject,
    /// The application revoked the token (application API `revoke`).
    #[error("revoked token")]
    Revoked,
    /// The token has no `kid` and the JWKS holds several keys.
    #[error("token without kid, and the key set holds several keys")]
    MissingKid,
    /// The token's `kid` names no key of the JWKS.
    #[error("unknown kid")]
    UnknownKid,
}

impl AuthError {
    /// A short label for the auth-failure metric.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Missing => "missing",
            AuthError::BadSubject => "bad_sub",
            AuthError::Revoked => "revoked",
            AuthError::MissingKid => "missing_kid",
            AuthError::UnknownKid => "unknown_kid",
            AuthError::Invalid(e) => match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::ImmatureSignature => "not_yet_valid",
                ErrorKind::InvalidSignature => "signature",
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
                    "algorithm"
                }
                ErrorKind::MissingRequiredClaim(_) => "missing_claim",
                ErrorKind::InvalidIssuer => "issuer",
                ErrorKind::InvalidAudience => "audience",
                _ => "invalid",
            },
        }
    }
}

/// Where the keys come from and what the claims must say.
#[derive(Clone)]
pub struct AuthSettings {
    /// HMAC secret for HS256/384/512 tokens (none: HMAC tokens are refused; empty is a config error).
    pub secret: Option<String>,
    /// PEM public key for RS256 (RSA, at least 2048 bits) or ES256 (P-256); read once (none: not used).
    pub public_key_pem: Option<PathBuf>,
    /// JWKS file with RS256/ES256 keys chosen by `kid`; re-read when it changes (none: not used).
    pub jwks: Option<PathBuf>,
    /// Required `iss` claim (none: `iss` not checked).
    pub issuer: Option<String>,
    /// Required `aud` claim (none: `aud` not checked).
    pub audience: Option<String>,
    /// Clock leeway for `exp` and `nbf`, in seconds (default 0).
    pub leeway_s: u64,
    /// Most verified tokens cached (default [`DEFAULT_CACHE_CAPACITY`]; 0 disables the cache).
    pub cache_capacity: u64,
}

impl Default for AuthSettings {
    fn default() -> Self {
        AuthSettings {
            secret: None,
            public_key_pem: None,
            jwks: None,
            issuer: None,
            audience: None,
            leeway_s: 0,
            cache_capacity: DEFAULT_CACHE_CAPACITY,
        }
    }
}

impl fmt::Debug for AuthSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthSettings")
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("public_key_pem", &self.public_key_pem)
            .field("jwks", &self.jwks)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_s", &self.leeway_s)
            .field("cache_capacity", &self.cache_capacity)
            .finish()
    }
}

/// Key material that cannot be used; the edge must not start with it.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// No secret, no PEM key and no JWKS.
    #[error("no JWT key configured: set a secret, a PEM public key or a JWKS file")]
    NoKey,
    /// The secret is the empty string.
    #[error("the JWT secret is empty")]
    EmptySecret,
    /// A key file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The PEM file holds no usable public key.
    #[error("{}: {problem}", path.display())]
    InvalidPublicKey {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: KeyProblem,
    },
    /// The JWKS file is not a JSON object with a `keys` array.
    #[error("{}: not a JWKS document: {source}", path.display())]
    InvalidJwks {
        /// The file.
        path: PathBuf,
        /// The JSON error.
        #[source]
        source: serde_json::Error,
    },
    /// An RS256/ES256 entry of the JWKS is malformed.
    #[error("{}: key {index} (kid {kid:?}): {problem}", path.display())]
    InvalidJwk {
        /// The file.
        path: PathBuf,
        /// Position of the key in `keys`, from 0.
        index: usize,
        /// Its `kid`, when it has one.
        kid: Option<String>,
        /// What is wrong with it.
        #[source]
        problem: KeyProblem,
    },
    /// Two usable keys share a `kid`.
    #[error("{}: two keys with kid {kid:?}", path.display())]
    DuplicateKid {
        /// The file.
        path: PathBuf,
        /// The shared `kid`.
        kid: String,
    },
    /// The JWKS holds no RS256 or ES256 signing key.
    #[error("{}: no RS256 or ES256 signing key in the JWKS", path.display())]
    NoUsableKey {
        /// The file.
        path: PathBuf,
    },
}

/// What is wrong with one configured public key (a PEM file or a JWKS entry).
#[derive(Debug, thiserror::Error)]
pub enum KeyProblem {
    /// The PEM holds a private key.
    #[error("a private key; configure the public key")]
    PrivateKey,
    /// The PEM holds no key we can use.
    #[error("not an RSA or EC P-256 public key in PEM (SPKI `PUBLIC KEY` or PKCS#1 `RSA PUBLIC KEY`)")]
    NotPublicKeyPem,
    /// An RSA key below the minimum size.
    #[error("RSA key of {bits} bits; at least {MIN_RSA_BITS} required")]
    RsaTooShort {
        /// The key's size.
        bits: usize,
    },
    /// The JWKS entry is not a JWK.
    #[error("not a JWK: {0}")]
    NotJwk(#[source] serde_json::Error),
    /// The JWK's RSA parameters make no key.
    #[error("invalid RSA key: {0}")]
    Rsa(#[source] Box<rsa::Error>),
    /// A JWK field is not base64url.
    #[error("{field}: {source}")]
    Base64 {
        /// The field (`n`, `e`, `x`, `y`).
        field: &'static str,
        /// The decoding error.
        #[source]
        source: base64::DecodeError,
    },
    /// EC coordinates of the wrong length.
    #[error("P-256 coordinates must be 32 bytes each")]
    CoordinateLength,
    /// EC coordinates off the curve.
    #[error("not a point on P-256")]
    NotOnCurve,
}

/// Verifies tokens for one edge. Shared by every connection; `verify` never blocks on a lock held across I/O.
pub struct Verifier {
    hmac: Option<DecodingKey>,
    pem: Option<PublicKey>,
    jwks: Option<JwksFile>,
    hmac_validation: Validation,
    rs256_validation: Validation,
    es256_validation: Validation,
    leeway_s: u64,
    cache: Option<Cache<[u8; 32], Arc<Cached>>>,
    clock: Clock,
}

impl Verifier {
    /// A verifier for the keys in `settings`; reads the PEM and JWKS files now.
    pub fn new(settings: &AuthSettings) -> Result<Verifier, AuthConfigError> {
        let secret = match settings.secret.as_deref() {
            Some("") => return Err(AuthConfigError::EmptySecret),
            secret => secret.map(str::as_bytes),
        };
        let pem = settings.public_key_pem.as_deref().map(load_pem).transpose()?;
        let jwks = settings.jwks.as_deref().map(JwksFile::open).transpose()?;
        if secret.is_none() && pem.is_none() && jwks.is_none() {
            return Err(AuthConfigError::NoKey);
        }
        Ok(Verifier::build(secret, pem, jwks, settings))
    }

    /// A verifier for HMAC tokens signed with `secret` only, with the default cache.
    pub fn hmac(secret: &[u8], issuer: Option<&str>, audience: Option<&str>, leeway_s: u64) -> Verifier {
        let settings = AuthSettings {
            issuer: issuer.map(str::to_string),
            audience: audience.map(str::to_string),
            leeway_s,
            ..AuthSettings::default()
        };
        Verifier::build(Some(secret), None, None, &settings)
    }

    fn build(secret: Option<&[u8]>, pem: Option<PublicKey>, jwks: Option<JwksFile>, s: &AuthSettings) -> Verifier {
        let validation = |algorithms: &[Algorithm]| {
            let mut v = Validation::new(algorithms[0]);
            v.algorithms = algorithms.to_vec();
            // exp and nbf are checked by `check_times`, against this verifier's clock.
            v.validate_exp = false;
            v.validate_nbf = false;
            v.leeway = 0;
            let mut required = vec!["exp", "sub"];
            match &s.issuer {
                Some(iss) => {
                    v.set_issuer(&[iss]);
                    required.push("iss");
                }
                None => v.iss = None,
            }
            match &s.audience {
                Some(aud) => {
                    v.set_audience(&[aud]);
                    required.push("aud");
                }
                None => v.validate_aud = false,
            }
            v.set_required_spec_claims(&required);
            v
        };
        let cache = (s.cache_capacity > 0).then(|| {
            Cache::builder()
                .max_capacity(s.cache_capacity)
                .expire_after(UntilExp)
                .build()
        });
        Verifier {
            hmac: secret.map(DecodingKey::from_secret),
            pem,
            jwks,
            hmac_validation: validation(&[Algorithm::HS256, Algorithm::HS384, Algorithm::HS512]),
            rs256_validation: validation(&[Algorithm::RS256]),
            es256_validation: validation(&[Algorithm::ES256]),
            leeway_s: s.leeway_s,
            cache,
            clock: Clock::System,
        }
    }

    /// Verifies a token and returns its claims (from the cache when this token verified before).
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let keys = self.jwks.as_ref().map(|jwks| {
            if jwks.refresh() {
                if let Some(cache) = &self.cache {
                    cache.invalidate_all();
                }
            }
            jwks.current()
        });
        let generation = keys.as_ref().map_or(0, |k| k.generation);
        let now = self.clock.now_s();
        let cached = self.cache.as_ref().map(|cache| (cache, token_hash(token)));
        if let Some((cache, hash)) = &cached {
            if let Some(hit) = cache.get(hash) {
                if hit.generation == generation && now < hit.claims.exp {
                    return Ok(hit.claims.clone());
                }
                cache.invalidate(hash);
            }
        }
        let claims = self.verify_signed(token, keys.as_deref(), now)?;
        if let Some((cache, hash)) = cached {
            // A token accepted within the leeway after its exp is not cached.
            if now < claims.exp {
                let entry = Cached {
                    claims: claims.clone(),
                    generation,
                    ttl: Duration::from_secs(claims.exp - now),
                };
                cache.insert(hash, Arc::new(entry));
            }
        }
        Ok(claims)
    }

    fn verify_signed(&self, token: &str, jwks: Option<&KeySet>, now: u64) -> Result<Claims, AuthError> {
        let header = decode_header(token)?;
        let (key, validation) = self.select(&header, jwks)?;
        let claims = jsonwebtoken::decode::<Claims>(token, key, validation)?.claims;
        check_times(&claims, now, self.leeway_s)?;
        if !ids::is_valid_user_id(&claims.sub) {
            return Err(AuthError::BadSubject);
        }
        Ok(claims)
    }

    /// The key and validation for a token's header, or why there is none.
    fn select<'a>(
        &'a self,
        header: &Header,
        jwks: Option<&'a KeySet>,
    ) -> Result<(&'a DecodingKey, &'a Validation), AuthError> {
        match header.alg {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let key = self.hmac.as_ref().ok_or_else(wrong_algorithm)?;
                Ok((key, &self.hmac_validation))
            }
            Algorithm::RS256 | Algorithm::ES256 => {
                let key = match (header.kid.as_deref(), jwks, &self.pem) {
                    (Some(kid), Some(set), _) => set.by_kid(kid).ok_or(AuthError::UnknownKid)?,
                    (None, _, Some(pem)) => pem,
                    (None, Some(set), None) => set.only().ok_or(AuthError::MissingKid)?,
                    // A PEM key has no kid to compare with.
                    (Some(_), None, Some(pem)) => pem,
                    (_, None, None) => return Err(wrong_algorithm()),
                };
                if key.alg != header.alg {
                    return Err(wrong_algorithm());
                }
                let validation = match key.alg {
                    Algorithm::RS256 => &self.rs256_validation,
                    _ => &self.es256_validation,
                };
                Ok((&key.key, validation))
            }
            _ => Err(wrong_algorithm()),
        }
    }

    #[cfg(test)]
    fn with_clock(mut self, now_s: Arc<AtomicU64>) -> Verifier {
        self.clock = Clock::Manual(now_s);
        self
    }

    #[cfg(test)]
    fn check_jwks_every(mut self, every: Duration) -> Verifier {
        if let Some(jwks) = &mut self.jwks {
            jwks.check_every_ms = every.as_millis() as u64;
        }
        self
    }
}

fn wrong_algorithm() -> AuthError {
    AuthError::Invalid(ErrorKind::InvalidAlgorithm.into())
}

/// The token's header; an `alg` jsonwebtoken does not know (`none` among them) counts as a wrong algorithm.
fn decode_header(token: &str) -> Result<Header, AuthError> {
    jsonwebtoken::decode_header(token).map_err(|e| {
        let names_an_alg = || {
            let encoded = token.split('.').next().unwrap_or_default();
            let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded)
                .unwrap_or_default();
            serde_json::from_slice::<serde_json::Value>(&json).is_ok_and(|h| h["alg"].is_string())
        };
        if matches!(e.kind(), ErrorKind::Json(_)) && names_an_alg() {
            wrong_algorithm()
        } else {
            AuthError::Invalid(e)
        }
    })
}

/// `exp` and `nbf` against `now`, with the leeway (the same rule as jsonwebtoken's).
fn check_times(claims: &Claims, now: u64, leeway_s: u64) -> Result<(), AuthError> {
    if claims.exp.saturating_add(leeway_s) < now {
        return Err(AuthError::Invalid(ErrorKind::ExpiredSignature.into()));
    }
    if claims.nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway_s)) {
        return Err(AuthError::Invalid(ErrorKind::ImmatureSignature.into()));
    }
    Ok(())
}

fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The wall clock `exp` and `nbf` are compared with; tests set it.
#[derive(Clone)]
enum Clock {
    System,
    #[cfg(test)]
    Manual(Arc<AtomicU64>),
}

impl Clock {
    fn now_s(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            #[cfg(test)]
            Clock::Manual(now) => now.load(Ordering::Relaxed),
        }
    }
}

/// A cached verification.
struct Cached {
    claims: Claims,
    /// The JWKS generation it was verified with (0 without a JWKS).
    generation: u64,
    /// Time to the token's `exp` when it was cached.
    ttl: Duration,
}

/// Expires each cache entry at its token's `exp`.
struct UntilExp;

impl moka::Expiry<[u8; 32], Arc<Cached>> for UntilExp {
    fn expire_after_create(&self, _key: &[u8; 32], value: &Arc<Cached>, _created_at: Instant) -> Option<Duration> {
        Some(value.ttl)
    }
}

/// A public key and the one algorithm it verifies.
struct PublicKey {
    alg: Algorithm,
    key: DecodingKey,
}

fn rsa_key(key: &rsa::RsaPublicKey) -> Result<PublicKey, KeyProblem> {
    use rsa::traits::PublicKeyParts;
    let bits = key.n().bits();
    if bits < MIN_RSA_BITS {
        return Err(KeyProblem::RsaTooShort { bits });
    }
    Ok(PublicKey {
        alg: Algorithm::RS256,
        key: DecodingKey::from_rsa_raw_components(&key.n().to_bytes_be(), &key.e().to_bytes_be()),
    })
}

fn ec_key(key: &p256::PublicKey) -> PublicKey {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    PublicKey {
        alg: Algorithm::ES256,
        key: DecodingKey::from_ec_der(key.to_encoded_point(false).as_bytes()),
    }
}

fn load_pem(path: &Path) -> Result<PublicKey, AuthConfigError> {
    use rsa::pkcs1::DecodeRsaPublicKey;
    use rsa::pkcs8::DecodePublicKey;
    let text = std::fs::read_to_string(path).map_err(|source| AuthConfigError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let invalid = |problem: KeyProblem| AuthConfigError::InvalidPublicKey {
        path: path.to_path_buf(),
        problem,
    };
    let pem = text.trim();
    if let Ok(key) = rsa::RsaPublicKey::from_public_key_pem(pem).or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem)) {
        return rsa_key(&key).map_err(invalid);
    }
    if let Ok(key) = p256::PublicKey::from_public_key_pem(pem) {
        return Ok(ec_key(&key));
    }
    Err(invalid(if pem.contains("PRIVATE KEY") {
        KeyProblem::PrivateKey
    } else {
        KeyProblem::NotPublicKeyPem
    }))
}

/// The usable keys of one version of the JWKS file.
struct KeySet {
    keys: Vec<(Option<String>, PublicKey)>,
    /// Counts loads of the file, from 1; cache entries from another generation are stale.
    generation: u64,
}

impl KeySet {
    /// The key named `kid`, or the only key when it has no kid.
    fn by_kid(&self, kid: &str) -> Option<&PublicKey> {
        self.keys
            .iter()
            .find(|(k, _)| k.as_deref() == Some(kid))
            .or(match self.keys.as_slice() {
                [only @ (None, _)] => Some(only),
                _ => None,
            })
            .map(|(_, key)| key)
    }

    /// The key, when there is exactly one.
    fn only(&self) -> Option<&PublicKey> {
        match self.keys.as_slice() {
            [(_, key)] => Some(key),
            _ => None,
        }
    }
}

/// What identifies one version of a file: a change of any part means it was rewritten.
#[derive(Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    dev_ino: (u64, u64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> FileStamp {
        #[cfg(unix)]
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            #[cfg(unix)]
            dev_ino: (meta.dev(), meta.ino()),
        }
    }
}

/// The JWKS file and the keys last loaded from it.
struct JwksFile {
    path: PathBuf,
    keys: RwLock<Arc<KeySet>>,
    /// The version of the file last read (loaded or refused); `None` when the last check could not stat it.
    /// Held only by the one verify doing a check (`try_lock`), never waited for.
    seen: Mutex<Option<FileStamp>>,
    /// Milliseconds since `origin` before which no check is due.
    next_check_ms: AtomicU64,
    origin: Instant,
    check_every_ms: u64,
}

impl JwksFile {
    fn open(path: &Path) -> Result<JwksFile, AuthConfigError> {
        let unreadable = |source| AuthConfigError::Unreadable {
            path: path.to_path_buf(),
            source,
        };
        // Stat before reading: a write in between is then seen as a change at the next check.
        let stamp = FileStamp::of(&std::fs::metadata(path).map_err(unreadable)?);
        let keys = load_jwks(path, 1)?;
        Ok(JwksFile {
            path: path.to_path_buf(),
            keys: RwLock::new(Arc::new(keys)),
            seen: Mutex::new(Some(stamp)),
            next_check_ms: AtomicU64::new(0),
            origin: Instant::now(),
            check_every_ms: JWKS_CHECK_EVERY.as_millis() as u64,
        })
    }

    fn current(&self) -> Arc<KeySet> {
        self.keys.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Reloads the keys when a check is due and the file changed; true when new keys were swapped in.
    fn refresh(&self) -> bool {
        let now_ms = self.origin.elapsed().as_millis() as u64;
        if now_ms < self.next_check_ms.load(Ordering::Relaxed) {
            return false;
        }
        let mut seen = match self.seen.try_lock() {
            Ok(seen) => seen,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => return false,
        };
        if now_ms < self.next_check_ms.load(Ordering::Relaxed) {
            return false;
        }
        self.next_check_ms
            .store(now_ms.saturating_add(self.check_every_ms), Ordering::Relaxed);
        let stamp = match std::fs::metadata(&self.path) {
            Ok(meta) => FileStamp::of(&meta),
            Err(e) => {
                if seen.take().is_some() {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot stat the JWKS file; keeping the current keys");
                }
                return false;
            }
        };
        if *seen == Some(stamp) {
            return false;
        }
        *seen = Some(stamp);
        let generation = self.current().generation + 1;
        match load_jwks(&self.path, generation) {
            Ok(keys) => {
                tracing::info!(path = %self.path.display(), keys = keys.keys.len(), generation, "JWKS reloaded");
                *self.keys.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(keys);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "JWKS reload failed; keeping the current keys");
                false
            }
        }
    }
}

fn load_jwks(path: &Path, generation: u64) -> Result<KeySet, AuthConfigError> {
    #[derive(Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let bytes = std::fs::read(path).map_err(|source| AuthConfigError::Unreadable {
        path: path.to_path_buf(),
        source,
    })?;
    let document: Document = serde_json::from_slice(&bytes).map_err(|source| AuthConfigError::InvalidJwks {
        path: path.to_path_buf(),
        source,
    })?;
    let mut keys: Vec<(Option<String>, PublicKey)> = Vec::new();
    for (index, value) in document.keys.into_iter().enumerate() {
        let kid = value.get("kid").and_then(|k| k.as_str()).map(str::to_string);
        let invalid = |problem: KeyProblem| AuthConfigError::InvalidJwk {
            path: path.to_path_buf(),
            index,
            kid: kid.clone(),
            problem,
        };
        let jwk: Jwk = serde_json::from_value(value).map_err(|e| invalid(KeyProblem::NotJwk(e)))?;
        let Some(key) = jwk_key(&jwk).map_err(invalid)? else {
            tracing::debug!(path = %path.display(), index, kid = ?kid, "JWKS key skipped: not an RS256/ES256 signing key");
            continue;
        };
        if let Some(kid) = &kid {
            if keys.iter().any(|(k, _)| k.as_ref() == Some(kid)) {
                return Err(AuthConfigError::DuplicateKid {
                    path: path.to_path_buf(),
                    kid: kid.clone(),
                });
            }
        }
        keys.push((kid, key));
    }
    if keys.is_empty() {
        return Err(AuthConfigError::NoUsableKey {
            path: path.to_path_buf(),
        });
    }
    if keys.len() > 1 && keys.iter().any(|(kid, _)| kid.is_none()) {
        tracing::warn!(path = %path.display(), "JWKS keys without kid in a set of several can never be used");
    }
    Ok(KeySet { keys, generation })
}

/// The key of an RS256 or ES256 signing JWK; `None` for a key of another kind or use.
fn jwk_key(jwk: &Jwk) -> Result<Option<PublicKey>, KeyProblem> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Ok(None);
    }
    if jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.iter().any(|op| matches!(op, KeyOperations::Verify)))
    {
        return Ok(None);
    }
    let declared = jwk.common.key_algorithm;
    match &jwk.algorithm {
        AlgorithmParameters::RSA(params) => {
            if declared.is_some_and(|alg| alg != KeyAlgorithm::RS256) {
                return Ok(None);
            }
            let n = b64url(&params.n, "n")?;
            let e = b64url(&params.e, "e")?;
            let key = rsa::RsaPublicKey::new(rsa::BigUint::from_bytes_be(&n), rsa::BigUint::from_bytes_be(&e))
                .map_err(|e| KeyProblem::Rsa(Box::new(e)))?;
            rsa_key(&key).map(Some)
        }
        AlgorithmParameters::EllipticCurve(params) => {
            if params.curve != EllipticCurve::P256 || declared.is_some_and(|alg| alg != KeyAlgorithm::ES256) {
                return Ok(None);
            }
            let x = b64url(&params.x, "x")?;
            let y = b64url(&params.y, "y")?;
            if x.len() != 32 || y.len() != 32 {
                return Err(KeyProblem::CoordinateLength);
            }
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let key = p256::PublicKey::from_sec1_bytes(&point).map_err(|_| KeyProblem::NotOnCurve)?;
            Ok(Some(ec_key(&key)))
        }
        _ => Ok(None),
    }
}

/// Base64url, with or without padding.
fn b64url(s: &str, field: &'static str) -> Result<Vec<u8>, KeyProblem> {
    use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode, GeneralPurposeConfig};
    const LENIENT: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    LENIENT.decode(s).map_err(|source| KeyProblem::Base64 { field, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey};
    use p256::pkcs8::EncodePrivateKey;
    use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
    use rsa::pkcs8::{EncodePublicKey, LineEnding};
    use rsa::traits::PublicKeyParts;
    use serde_json::json;
    use std::sync::OnceLock;

    fn now() -> u64 {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    /// Keys generated once per test run; no private key is committed. One RSA key only: generating one
    /// takes seconds in a debug build, so the tests that need a second key of the same kind use P-256.
    struct Keys {
        rsa: rsa::RsaPrivateKey,
        ec: [p256::ecdsa::SigningKey; 3],
    }

    fn keys() -> &'static Keys {
        static KEYS: OnceLock<Keys> = OnceLock::new();
        KEYS.get_or_init(|| {
            let mut rng = rand::rngs::OsRng;
            let mut ec = || p256::ecdsa::SigningKey::random(&mut rng);
            Keys {
                ec: [ec(), ec(), ec()],
                rsa: rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).unwrap(),
            }
        })
    }

    /// The token with its claims replaced by `body`, header and signature kept.
    fn tamper(token: &str, body: serde_json::Value) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        format!("{}.{}.{}", parts[0], b64(body.to_string().as_bytes()), parts[2])
    }

    fn header(alg: Algorithm, kid: Option<&str>) -> Header {
        let mut h = Header::new(alg);
        h.kid = kid.map(str::to_string);
        h
    }

    fn sign_hmac(claims: serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    fn sign_rsa(claims: serde_json::Value, key: &rsa::RsaPrivateKey, kid: Option<&str>) -> String {
        let der = key.to_pkcs1_der().unwrap();
        encode(
            &header(Algorithm::RS256, kid),
            &claims,
            &EncodingKey::from_rsa_der(der.as_bytes()),
        )
        .unwrap()
    }

    fn sign_ec(claims: serde_json::Value, key: &p256::ecdsa::SigningKey, kid: Option<&str>) -> String {
        let der = key.to_pkcs8_der().unwrap();
        encode(
            &header(Algorithm::ES256, kid),
            &claims,
            &EncodingKey::from_ec_der(der.as_bytes()),
        )
        .unwrap()
    }

    fn rsa_pem(key: &rsa::RsaPublicKey) -> String {
        key.to_public_key_pem(LineEnding::LF).unwrap()
    }

    fn ec_pem(key: &p256::ecdsa::SigningKey) -> String {
        p256::PublicKey::from(key.verifying_key())
            .to_public_key_pem(LineEnding::LF)
            .unwrap()
    }

    fn rsa_jwk(public: &rsa::RsaPublicKey, kid: Option<&str>) -> serde_json::Value {
        let mut jwk = json!({"kty":"RSA","use":"sig","alg":"RS256","n":b64(&public.n().to_bytes_be()),"e":b64(&public.e().to_bytes_be())});
        if let Some(kid) = kid {
            jwk["kid"] = json!(kid);
        }
        jwk
    }

    fn ec_jwk(key: &p256::ecdsa::SigningKey, kid: Option<&str>) -> serde_json::Value {
        let point = key.verifying_key().to_encoded_point(false);
        let mut jwk = json!({"kty":"EC","crv":"P-256","x":b64(point.x().unwrap()),"y":b64(point.y().unwrap())});
        if let Some(kid) = kid {
            jwk["kid"] = json!(kid);
        }
        jwk
    }

    fn claims(sub: &str) -> serde_json::Value {
        json!({"sub": sub, "exp": now() + 60})
    }

    /// A temp dir with one file in it.
    fn file(name: &str, contents: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        (dir, path)
    }

    fn jwks_doc(keys: &[serde_json::Value]) -> String {
        json!({ "keys": keys }).to_string()
    }

    fn with_pem(pem: &str) -> (tempfile::TempDir, Verifier) {
        let (dir, path) = file("key.pem", pem);
        let v = Verifier::new(&AuthSettings {
            public_key_pem: Some(path),
            ..AuthSettings::default()
        })
        .unwrap();
        (dir, v)
    }

    fn with_jwks(keys: &[serde_json::Value]) -> (tempfile::TempDir, Verifier) {
        let (dir, path) = file("jwks.json", &jwks_doc(keys));
        let v = Verifier::new(&AuthSettings {
            jwks: Some(path),
            ..AuthSettings::default()
        })
        .unwrap();
        (dir, v)
    }

    fn reason(r: Result<Claims, AuthError>) -> &'static str {
        r.unwrap_err().reason()
    }

    #[test]
    fn accepts_and_refuses() {
        let v = Verifier::hmac(b"k", None, None, 0);
        let good = sign_hmac(
            json!({"sub":"alice","exp":now()+60,"rooms":["desk:*"],"roles":["agent"]}),
            Algorithm::HS256,
            b"k",
        );
        let c = v.verify(&good).unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.rooms, vec!["desk:*"]);
        assert_eq!(c.roles, vec!["agent"]);
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            assert_eq!(v.verify(&sign_hmac(claims("alice"), alg, b"k")).unwrap().sub, "alice");
        }
        // aud is not checked when not configured.
        assert!(v
            .verify(&sign_hmac(
                json!({"sub":"alice","exp":now()+60,"aud":"x"}),
                Algorithm::HS256,
                b"k"
            ))
            .is_ok());
        assert_eq!(
            reason(v.verify(&sign_hmac(claims("alice"), Algorithm::HS256, b"other"))),
            "signature"
        );
        assert_eq!(
            reason(v.verify(&sign_hmac(json!({"sub":"alice","exp":now()-1}), Algorithm::HS256, b"k"))),
            "expired"
        );
        assert_eq!(
            reason(v.verify(&sign_hmac(json!({"exp":now()+60}), Algorithm::HS256, b"k"))),
            "missing_claim"
        );
        assert_eq!(
            reason(v.verify(&sign_hmac(json!({"sub":"alice"}), Algorithm::HS256, b"k"))),
            "missing_claim"
        );
        assert_eq!(
            reason(v.verify(&sign_hmac(
                json!({"sub":"alice","exp":now()+60,"nbf":now()+60}),
                Algorithm::HS256,
                b"k"
            ))),
            "not_yet_valid"
        );
        assert!(v
            .verify(&sign_hmac(json!({"sub":"alice","exp":"soon"}), Algorithm::HS256, b"k"))
            .is_err());
        assert!(v
            .verify(&sign_hmac(json!({"sub":"alice","exp":1.5e12}), Algorithm::HS256, b"k"))
            .is_err());
        assert_eq!(reason(v.verify("")), "missing");
        assert_eq!(reason(v.verify("garbage")), "invalid");
        assert_eq!(reason(v.verify("a.b.c")), "invalid");
    }

    #[test]
    fn alg_none_is_refused() {
        let (_dir, jwks) = with_jwks(&[rsa_jwk(&keys().rsa.to_public_key(), None)]);
        let hmac = Verifier::hmac(b"k", None, None, 0);
        for alg in ["none", "None", "NONE"] {
            let none = format!(
                "{}.{}.",
                b64(format!(r#"{{"alg":"{alg}","typ":"JWT"}}"#).as_bytes()),
                b64(format!(r#"{{"sub":"alice","exp":{}}}"#, now() + 60).as_bytes())
            );
            assert_eq!(reason(hmac.verify(&none)), "algorithm");
            assert_eq!(reason(jwks.verify(&none)), "algorithm");
        }
    }

    #[test]
    fn leeway() {
        let v = Verifier::hmac(b"k", None, None, 30);
        let t = now();
        assert!(v
            .verify(&sign_hmac(
                json!({"sub":"a","exp":t-10,"nbf":t+10}),
                Algorithm::HS256,
                b"k"
            ))
            .is_ok());
        assert_eq!(
            reason(v.verify(&sign_hmac(json!({"sub":"a","exp":t-60}), Algorithm::HS256, b"k"))),
            "expired"
        );
        assert_eq!(
            reason(v.verify(&sign_hmac(
                json!({"sub":"a","exp":t+600,"nbf":t+60}),
                Algorithm::HS256,
                b"k"
            ))),
            "not_yet_valid"
        );
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let (_dir, path) = file("key.pem", &rsa_pem(&keys().rsa.to_public_key()));
        let settings = AuthSettings {
            secret: Some("k".into()),
            public_key_pem: Some(path),
            issuer: Some("iss1".into()),
            audience: Some("aud1".into()),
            ..AuthSettings::default()
        };
        let v = Verifier::new(&settings).unwrap();
        let t = now() + 60;
        let ok = json!({"sub":"a","exp":t,"iss":"iss1","aud":"aud1"});
        assert!(v.verify(&sign_hmac(ok.clone(), Algorithm::HS256, b"k")).is_ok());
        assert!(v.verify(&sign_rsa(ok, &keys().rsa, None)).is_ok());
        // aud may also be an array holding the configured audience.
        let many = json!({"sub":"a","exp":t,"iss":"iss1","aud":["other","aud1"]});
        assert!(v.verify(&sign_hmac(many, Algorithm::HS256, b"k")).is_ok());
        for (bad, why) in [
            (json!({"sub":"a","exp":t,"iss":"iss2","aud":"aud1"}), "issuer"),
            (json!({"sub":"a","exp":t,"iss":"iss1","aud":"aud2"}), "audience"),
            (json!({"sub":"a","exp":t,"iss":"iss1"}), "missing_claim"),
            (json!({"sub":"a","exp":t,"aud":"aud1"}), "missing_claim"),
        ] {
            assert_eq!(
                reason(v.verify(&sign_hmac(bad.clone(), Algorithm::HS256, b"k"))),
                why,
                "{bad}"
            );
            assert_eq!(
                reason(v.verify(&sign_rsa(bad.clone(), &keys().rsa, None))),
                why,
                "{bad}"
            );
        }
    }

    #[test]
    fn hostile_subjects_are_refused() {
        let v = Verifier::hmac(b"k", None, None, 0);
        let long = "a".repeat(65);
        for sub in ["a.b", "*", ">", "a b", "", "-a", "a\n", "é", long.as_str()] {
            assert_eq!(
                reason(v.verify(&sign_hmac(claims(sub), Algorithm::HS256, b"k"))),
                "bad_sub",
                "{sub:?}"
            );
        }
        assert!(v
            .verify(&sign_hmac(claims(&"a".repeat(64)), Algorithm::HS256, b"k"))
            .is_ok());
        assert!(v.verify(&sign_hmac(claims("A_b-9"), Algorithm::HS256, b"k")).is_ok());
    }

    #[test]
    fn rs256_and_es256_with_a_pem_key() {
        let k = keys();
        let (_d1, rsa_v) = with_pem(&rsa_pem(&k.rsa.to_public_key()));
        let (_d2, pkcs1_v) = with_pem(&k.rsa.to_public_key().to_pkcs1_pem(LineEnding::LF).unwrap());
        let (_d3, ec_v) = with_pem(&ec_pem(&k.ec[0]));
        let rs = sign_rsa(claims("alice"), &k.rsa, None);
        let es = sign_ec(claims("bob"), &k.ec[0], None);
        assert_eq!(rsa_v.verify(&rs).unwrap().sub, "alice");
        assert_eq!(pkcs1_v.verify(&rs).unwrap().sub, "alice");
        assert_eq!(ec_v.verify(&es).unwrap().sub, "bob");
        // A kid is ignored by a PEM key.
        assert!(rsa_v.verify(&sign_rsa(claims("alice"), &k.rsa, Some("x"))).is_ok());
        // Wrong key, or claims changed under the signature: signature.
        assert_eq!(reason(rsa_v.verify(&tamper(&rs, claims("mallory")))), "signature");
        assert_eq!(reason(ec_v.verify(&tamper(&es, claims("mallory")))), "signature");
        assert_eq!(
            reason(ec_v.verify(&sign_ec(claims("bob"), &k.ec[1], None))),
            "signature"
        );
        // The key's kind decides the algorithm.
        assert_eq!(reason(rsa_v.verify(&es)), "algorithm");
        assert_eq!(reason(ec_v.verify(&rs)), "algorithm");
        // Only a secret configures HMAC.
        assert_eq!(
            reason(rsa_v.verify(&sign_hmac(claims("alice"), Algorithm::HS256, b"k"))),
            "algorithm"
        );
        // Other RSA algorithms are refused.
        let der = k.rsa.to_pkcs1_der().unwrap();
        for alg in [Algorithm::RS384, Algorithm::RS512, Algorithm::PS256] {
            let t = encode(
                &Header::new(alg),
                &claims("alice"),
                &EncodingKey::from_rsa_der(der.as_bytes()),
            )
            .unwrap();
            assert_eq!(reason(rsa_v.verify(&t)), "algorithm", "{alg:?}");
        }
    }

    #[test]
    fn public_key_tokens_refused_with_a_secret_only() {
        let v = Verifier::new(&AuthSettings {
            secret: Some("k".into()),
            ..AuthSettings::default()
        })
        .unwrap();
        assert_eq!(reason(v.verify(&sign_rsa(claims("a"), &keys().rsa, None))), "algorithm");
        assert_eq!(
            reason(v.verify(&sign_ec(claims("a"), &keys().ec[0], Some("k1")))),
            "algorithm"
        );
        assert!(v.verify(&sign_hmac(claims("a"), Algorithm::HS384, b"k")).is_ok());
    }

    #[test]
    fn rs256_and_es256_with_a_jwks() {
        let k = keys();
        let (_d1, rsa_v) = with_jwks(&[rsa_jwk(&k.rsa.to_public_key(), Some("r1"))]);
        let (_d2, ec_v) = with_jwks(&[ec_jwk(&k.ec[0], None)]);
        // A single-key set may be used without kid; with kid, the kid must match.
        assert!(rsa_v.verify(&sign_rsa(claims("a"), &k.rsa, Some("r1"))).is_ok());
        assert!(rsa_v.verify(&sign_rsa(claims("a"), &k.rsa, None)).is_ok());
        assert_eq!(
            reason(rsa_v.verify(&sign_rsa(claims("a"), &k.rsa, Some("r2")))),
            "unknown_kid"
        );
        assert!(ec_v.verify(&sign_ec(claims("a"), &k.ec[0], None)).is_ok());
        assert!(ec_v.verify(&sign_ec(claims("a"), &k.ec[0], Some("any"))).is_ok());
        assert_eq!(reason(ec_v.verify(&sign_ec(claims("a"), &k.ec[1], None))), "signature");
        assert_eq!(
            reason(rsa_v.verify(&sign_ec(claims("a"), &k.ec[0], Some("r1")))),
            "algorithm"
        );
        assert_eq!(
            reason(rsa_v.verify(&sign_hmac(claims("a"), Algorithm::HS256, b"k"))),
            "algorithm"
        );
    }

    #[test]
    fn jwks_with_several_keys_needs_the_kid() {
        let k = keys();
        let (_dir, v) = with_jwks(&[
            rsa_jwk(&k.rsa.to_public_key(), Some("r0")),
            ec_jwk(&k.ec[0], Some("e0")),
            ec_jwk(&k.ec[1], Some("e1")),
            // Skipped: an encryption key, and an EC key for another curve.
            json!({"kty":"RSA","use":"enc","kid":"x1","n":"AQAB","e":"AQAB"}),
            json!({"kty":"EC","crv":"P-384","kid":"x2","x":"AA","y":"AA"}),
        ]);
        assert!(v.verify(&sign_rsa(claims("a"), &k.rsa, Some("r0"))).is_ok());
        assert!(v.verify(&sign_ec(claims("a"), &k.ec[0], Some("e0"))).is_ok());
        assert!(v.verify(&sign_ec(claims("a"), &k.ec[1], Some("e1"))).is_ok());
        assert_eq!(
            reason(v.verify(&sign_ec(claims("a"), &k.ec[0], Some("e1")))),
            "signature"
        );
        assert_eq!(
            reason(v.verify(&sign_ec(claims("a"), &k.ec[2], Some("e0")))),
            "signature"
        );
        assert_eq!(
            reason(v.verify(&sign_rsa(claims("a"), &k.rsa, Some("nope")))),
            "unknown_kid"
        );
        assert_eq!(
            reason(v.verify(&sign_rsa(claims("a"), &k.rsa, Some("x1")))),
            "unknown_kid"
        );
        assert_eq!(reason(v.verify(&sign_rsa(claims("a"), &k.rsa, None))), "missing_kid");
        assert_eq!(reason(v.verify(&sign_ec(claims("a"), &k.ec[0], None))), "missing_kid");
        assert_eq!(
            reason(v.verify(&sign_ec(claims("a"), &k.ec[0], Some("r0")))),
            "algorithm"
        );
    }

    #[test]
    fn pem_and_jwks_together() {
        let k = keys();
        let (_d1, pem) = file("key.pem", &rsa_pem(&k.rsa.to_public_key()));
        let (_d2, jwks) = file("jwks.json", &jwks_doc(&[ec_jwk(&k.ec[1], Some("e1"))]));
        let v = Verifier::new(&AuthSettings {
            public_key_pem: Some(pem),
            jwks: Some(jwks),
            ..AuthSettings::default()
        })
        .unwrap();
        // Without kid: the PEM key; with a kid: the JWKS key of that kid, and no other.
        assert!(v.verify(&sign_rsa(claims("a"), &k.rsa, None)).is_ok());
        assert!(v.verify(&sign_ec(claims("a"), &k.ec[1], Some("e1"))).is_ok());
        assert_eq!(
            reason(v.verify(&sign_rsa(claims("a"), &k.rsa, Some("r0")))),
            "unknown_kid"
        );
        assert_eq!(reason(v.verify(&sign_ec(claims("a"), &k.ec[1], None))), "algorithm");
    }

    #[test]
    fn bad_key_files_are_typed_errors() {
        let k = keys();
        let new = |s: AuthSettings| Verifier::new(&s).err().expect("config error");
        let pem = |path: PathBuf| AuthSettings {
            public_key_pem: Some(path),
            ..AuthSettings::default()
        };
        let jwks = |path: PathBuf| AuthSettings {
            jwks: Some(path),
            ..AuthSettings::default()
        };
        assert!(matches!(new(AuthSettings::default()), AuthConfigError::NoKey));
        let empty = AuthSettings {
            secret: Some(String::new()),
            ..AuthSettings::default()
        };
        assert!(matches!(new(empty), AuthConfigError::EmptySecret));
        assert!(matches!(
            new(pem("/nonexistent/key.pem".into())),
            AuthConfigError::Unreadable { .. }
        ));
        assert!(matches!(
            new(jwks("/nonexistent/jwks.json".into())),
            AuthConfigError::Unreadable { .. }
        ));
        let (_d, garbage) = file(
            "key.pem",
            "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n",
        );
        assert!(matches!(new(pem(garbage)), AuthConfigError::InvalidPublicKey { .. }));
        let private = k.ec[0].to_pkcs8_pem(LineEnding::LF).unwrap();
        let (_d, private) = file("key.pem", &private);
        let e = new(pem(private));
        assert!(e.to_string().contains("private key"), "{e}");
        // Only the size is checked, so any odd 1024-bit modulus will do.
        let n = (rsa::BigUint::from(1u8) << 1023usize) + rsa::BigUint::from(1u8);
        let small = rsa::RsaPublicKey::new(n, rsa::BigUint::from(65_537u32)).unwrap();
        let (_d, small_pem) = file("key.pem", &rsa_pem(&small));
        assert!(new(pem(small_pem)).to_string().contains("1024 bits"));
        let (_d, small_jwks) = file("jwks.json", &jwks_doc(&[rsa_jwk(&small, Some("s"))]));
        assert!(matches!(new(jwks(small_jwks)), AuthConfigError::InvalidJwk { .. }));
        let (_d, not_json) = file("jwks.json", "{not json");
        assert!(matches!(new(jwks(not_json)), AuthConfigError::InvalidJwks { .. }));
        let (_d, no_keys) = file("jwks.json", r#"{"keys":[]}"#);
        assert!(matches!(new(jwks(no_keys)), AuthConfigError::NoUsableKey { .. }));
        let (_d, dup) = file(
            "jwks.json",
            &jwks_doc(&[rsa_jwk(&k.rsa.to_public_key(), Some("d")), ec_jwk(&k.ec[0], Some("d"))]),
        );
        assert!(matches!(new(jwks(dup)), AuthConfigError::DuplicateKid { .. }));
        let (_d, bad_point) = file(
            "jwks.json",
            &jwks_doc(&[json!({"kty":"EC","crv":"P-256","kid":"p","x":b64(&[1; 32]),"y":b64(&[2; 32])})]),
        );
        assert!(matches!(new(jwks(bad_point)), AuthConfigError::InvalidJwk { .. }));
        let (_d, bad_b64) = file(
            "jwks.json",
            &jwks_doc(&[json!({"kty":"RSA","kid":"b","n":"!!","e":"AQAB"})]),
        );
        assert!(matches!(new(jwks(bad_b64)), AuthConfigError::InvalidJwk { .. }));
    }

    #[test]
    fn cache_returns_the_same_claims_until_exp() {
        let t0 = now();
        let clock = Arc::new(AtomicU64::new(t0));
        let v = Verifier::hmac(b"k", None, None, 5).with_clock(clock.clone());
        let token = sign_hmac(
            json!({"sub":"alice","exp":t0+10,"roles":["r"],"rooms":["x:*"]}),
            Algorithm::HS256,
            b"k",
        );
        let first = v.verify(&token).unwrap();
        let cache = v.cache.as_ref().unwrap();
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 1);
        assert_eq!(v.verify(&token).unwrap(), first);
        // Failures are not cached.
        let bad = sign_hmac(claims("a.b"), Algorithm::HS256, b"k");
        assert!(v.verify(&bad).is_err());
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 1);
        // At exp the entry is not returned; the full check then applies (still within the leeway).
        clock.store(t0 + 10, Ordering::Relaxed);
        assert_eq!(v.verify(&token).unwrap(), first);
        cache.run_pending_tasks();
        assert_eq!(cache.entry_count(), 0, "a token past exp is not cached again");
        clock.store(t0 + 16, Ordering::Relaxed);
        assert_eq!(reason(v.verify(&token)), "expired");
    }

    #[test]
    fn cached_token_past_exp_is_refused() {
        let t0 = now();
        let clock = Arc::new(AtomicU64::new(t0));
        let v = Verifier::hmac(b"k", None, None, 0).with_clock(clock.clone());
        let token = sign_hmac(json!({"sub":"alice","exp":t0+1}), Algorithm::HS256, b"k");
        assert!(v.verify(&token).is_ok());
        assert!(v.verify(&token).is_ok());
        clock.store(t0 + 2, Ordering::Relaxed);
        assert_eq!(reason(v.verify(&token)), "expired");
    }

    #[test]
    fn cache_disabled() {
        let v = Verifier::new(&AuthSettings {
            secret: Some("k".into()),
            cache_capacity: 0,
            ..AuthSettings::default()
        })
        .unwrap();
        assert!(v.cache.is_none());
        let token = sign_hmac(claims("a"), Algorithm::HS256, b"k");
        assert_eq!(v.verify(&token).unwrap(), v.verify(&token).unwrap());
    }

    /// Replaces the file the way a deployment should (write aside, rename over), with a later mtime.
    fn replace(path: &Path, contents: &str) {
        let aside = path.with_extension("new");
        std::fs::write(&aside, contents).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&aside)
            .unwrap()
            .set_modified(SystemTime::now() + Duration::from_secs(5))
            .unwrap();
        std::fs::rename(&aside, path).unwrap();
    }

    #[test]
    fn jwks_rotation_without_restart() {
        let k = keys();
        let (_dir, path) = file("jwks.json", &jwks_doc(&[rsa_jwk(&k.rsa.to_public_key(), Some("a"))]));
        let v = Verifier::new(&AuthSettings {
            jwks: Some(path.clone()),
            ..AuthSettings::default()
        })
        .unwrap()
        .check_jwks_every(Duration::ZERO);
        let token_a = sign_rsa(claims("alice"), &k.rsa, Some("a"));
        let token_b = sign_ec(claims("bob"), &k.ec[0], Some("b"));
        assert!(v.verify(&token_a).is_ok());
        assert!(v.verify(&token_a).is_ok(), "cached");
        assert_eq!(reason(v.verify(&token_b)), "unknown_kid");

        replace(&path, &jwks_doc(&[ec_jwk(&k.ec[0], Some("b"))]));
        assert_eq!(v.verify(&token_b).unwrap().sub, "bob");
        assert_eq!(
            reason(v.verify(&token_a)),
            "unknown_kid",
            "the cached token A is gone with its key"
        );

        // Same kid, new key (an in-place rotation): the old token's signature no longer verifies.
        let token_b2 = sign_ec(claims("carol"), &k.ec[1], Some("b"));
        replace(&path, &jwks_doc(&[ec_jwk(&k.ec[1], Some("b"))]));
        assert_eq!(v.verify(&token_b2).unwrap().sub, "carol");
        assert_eq!(reason(v.verify(&token_b)), "signature");

        // A broken or missing file keeps the current keys.
        replace(&path, "{\"keys\": [");
        assert!(v.verify(&token_b2).is_ok());
        std::fs::remove_file(&path).unwrap();
        assert!(v.verify(&token_b2).is_ok());
        replace(&path, &jwks_doc(&[rsa_jwk(&k.rsa.to_public_key(), Some("a"))]));
        assert!(v.verify(&token_a).is_ok());
        assert_eq!(reason(v.verify(&token_b2)), "unknown_kid");
    }

    #[test]
    fn jwks_check_is_throttled() {
        let k = keys();
        let (_dir, path) = file("jwks.json", &jwks_doc(&[rsa_jwk(&k.rsa.to_public_key(), Some("a"))]));
        let v = Verifier::new(&AuthSettings {
            jwks: Some(path.clone()),
            ..AuthSettings::default()
        })
        .unwrap()
        .check_jwks_every(Duration::from_secs(3600));
        let token_a = sign_rsa(claims("alice"), &k.rsa, Some("a"));
        assert!(v.verify(&token_a).is_ok());
        replace(&path, &jwks_doc(&[ec_jwk(&k.ec[0], Some("b"))]));
        assert!(v.verify(&token_a).is_ok(), "no check before the interval passes");
    }

    /// Prints the cost of a verify with and without a cache hit. Meaningful in release:
    /// `cargo test --release -p switchyard-edge --lib auth::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore = "timing printout"]
    fn timing() {
        let k = keys();
        let (_d1, rsa_path) = file("rsa.pem", &rsa_pem(&k.rsa.to_public_key()));
        let (_d2, ec_path) = file("ec.pem", &ec_pem(&k.ec[0]));
        let (_d3, jwks_path) = file("jwks.json", &jwks_doc(&[rsa_jwk(&k.rsa.to_public_key(), Some("r1"))]));
        let both = AuthSettings {
            secret: Some("k".into()),
            public_key_pem: Some(rsa_path),
            jwks: Some(jwks_path),
            ..AuthSettings::default()
        };
        let ec = AuthSettings {
            public_key_pem: Some(ec_path),
            ..AuthSettings::default()
        };
        let body = json!({"sub":"alice","exp":now()+3600,"roles":["agent"],"rooms":["desk:*","team:7"]});
        let cases = [
            ("HS256", sign_hmac(body.clone(), Algorithm::HS256, b"k"), &both),
            ("RS256 pem", sign_rsa(body.clone(), &k.rsa, None), &both),
            ("RS256 jwks", sign_rsa(body.clone(), &k.rsa, Some("r1")), &both),
            ("ES256 pem", sign_ec(body.clone(), &k.ec[0], None), &ec),
        ];
        for (name, token, settings) in cases {
            for (label, capacity) in [("uncached", 0), ("cache hit", DEFAULT_CACHE_CAPACITY)] {
                let v = Verifier::new(&AuthSettings {
                    cache_capacity: capacity,
                    ..settings.clone()
                })
                .unwrap();
                v.verify(&token).unwrap();
                let n = 2000;
                let start = Instant::now();
                for _ in 0..n {
                    std::hint::black_box(v.verify(std::hint::black_box(&token)).unwrap());
                }
                let each = start.elapsed() / n;
                println!(
                    "{name:<11} {label:<9} {each:>10.1?} per verify ({} byte token)",
                    token.len()
                );
            }
        }
    }
}

//! Token verification: who a connection's user is.
//!
//! The user id is the verified token's `sub` and nothing else. `alg: none`
//! and any algorithm outside the HMAC family the secret supports are refused
//! before a signature is checked; `sub` must be a safe user id because it
//! becomes a NATS subject token.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use switchyard_common::ids;

/// The claims the edge uses.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Claims {
    /// The user id (absent is refused by validation as a missing claim).
    #[serde(default)]
    pub sub: String,
    /// Expiry, unix seconds (absent is refused by validation as a missing claim).
    #[serde(default)]
    pub exp: u64,
    /// Application roles, passed to rpc handlers.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Rooms the user may join (names or `prefix:*` patterns).
    #[serde(default)]
    pub rooms: Vec<String>,
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
}

impl AuthError {
    /// A short label for the auth-failure metric.
    pub fn reason(&self) -> &'static str {
        use jsonwebtoken::errors::ErrorKind;
        match self {
            AuthError::Missing => "missing",
            AuthError::BadSubject => "bad_sub",
            AuthError::Invalid(e) => match e.kind() {
                ErrorKind::ExpiredSignature => "expired",
                ErrorKind::InvalidSignature => "signature",
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => "algorithm",
                ErrorKind::MissingRequiredClaim(_) => "missing_claim",
                _ => "invalid",
            },
        }
    }
}

/// Verifies tokens for one edge.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// A verifier for HMAC tokens signed with `secret`.
    pub fn hmac(secret: &[u8], issuer: Option<&str>, audience: Option<&str>, leeway_s: u64) -> Verifier {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];
        validation.leeway = leeway_s;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if issuer.is_some() {
            required.push("iss");
        }
        if audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
        match issuer {
            Some(iss) => validation.set_issuer(&[iss]),
            None => validation.iss = None,
        }
        match audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        Verifier {
            key: DecodingKey::from_secret(secret),
            validation,
        }
    }

    /// Verifies a token and returns its claims.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)?;
        if !ids::is_valid_user_id(&data.claims.sub) {
            return Err(AuthError::BadSubject);
        }
        Ok(data.claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn sign(claims: serde_json::Value, alg: Algorithm, secret: &[u8]) -> String {
        encode(&Header::new(alg), &claims, &EncodingKey::from_secret(secret)).unwrap()
    }

    #[test]
    fn accepts_and_refuses() {
        let v = Verifier::hmac(b"k", None, None, 0);
        let good = sign(
            json!({"sub":"alice","exp":now()+60,"rooms":["desk:*"]}),
            Algorithm::HS256,
            b"k",
        );
        let c = v.verify(&good).unwrap();
        assert_eq!(c.sub, "alice");
        assert_eq!(c.rooms, vec!["desk:*"]);
        assert!(v
            .verify(&sign(json!({"sub":"alice","exp":now()+60}), Algorithm::HS512, b"k"))
            .is_ok());
        assert!(v
            .verify(&sign(
                json!({"sub":"alice","exp":now()+60,"aud":"x"}),
                Algorithm::HS256,
                b"k"
            ))
            .is_ok());
        assert_eq!(
            v.verify(&sign(json!({"sub":"alice","exp":now()+60}), Algorithm::HS256, b"other"))
                .unwrap_err()
                .reason(),
            "signature"
        );
        assert_eq!(
            v.verify(&sign(json!({"sub":"alice","exp":now()-1}), Algorithm::HS256, b"k"))
                .unwrap_err()
                .reason(),
            "expired"
        );
        assert_eq!(
            v.verify(&sign(json!({"exp":now()+60}), Algorithm::HS256, b"k"))
                .unwrap_err()
                .reason(),
            "missing_claim"
        );
        assert_eq!(
            v.verify(&sign(json!({"sub":"a.b","exp":now()+60}), Algorithm::HS256, b"k"))
                .unwrap_err()
                .reason(),
            "bad_sub"
        );
        assert!(v.verify(&sign(json!({"sub":"alice"}), Algorithm::HS256, b"k")).is_err());
        assert!(v
            .verify(&sign(
                json!({"sub":"alice","exp":now()+60,"nbf":now()+60}),
                Algorithm::HS256,
                b"k"
            ))
            .is_err());
        // alg: none, unsigned.
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let none = format!(
            "{}.{}.",
            b64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            b64.encode(format!(r#"{{"sub":"alice","exp":{}}}"#, now() + 60))
        );
        assert!(v.verify(&none).is_err());
        assert!(v.verify("").is_err());
        assert!(v.verify("garbage").is_err());
    }

    #[test]
    fn issuer_and_audience_when_configured() {
        let v = Verifier::hmac(b"k", Some("iss1"), Some("aud1"), 0);
        assert!(v
            .verify(&sign(
                json!({"sub":"a","exp":now()+60,"iss":"iss1","aud":"aud1"}),
                Algorithm::HS256,
                b"k"
            ))
            .is_ok());
        assert!(v
            .verify(&sign(
                json!({"sub":"a","exp":now()+60,"iss":"iss2","aud":"aud1"}),
                Algorithm::HS256,
                b"k"
            ))
            .is_err());
        assert!(v
            .verify(&sign(
                json!({"sub":"a","exp":now()+60,"iss":"iss1"}),
                Algorithm::HS256,
                b"k"
            ))
            .is_err());
    }
}

//! Requests from this edge to the router tier and to applications (rpc).
//!
//! Every request carries the connection's authenticated user id; nothing in
//! a client frame can change it. A backend that does not answer in time is
//! `unavailable`, never a hang.

use std::time::Duration;

use bytes::Bytes;
use switchyard_common::control::{self, ControlOp, ControlReply, ControlRequest};
use switchyard_common::subject::Subjects;
use switchyard_common::ErrorCode;

/// Why a backend request failed.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// Nobody answered, or not in time.
    #[error("no answer from {0}")]
    Unavailable(&'static str),
    /// The answer did not decode.
    #[error("undecodable answer from {0}")]
    BadReply(&'static str),
    /// The application answered with an error of its own.
    #[error("{message}")]
    Application {
        /// The application's code, passed on as given.
        code: String,
        /// The application's message.
        message: String,
    },
}

impl BackendError {
    /// The protocol code for a client `error` frame (applications pass their own).
    pub fn code(&self) -> &str {
        match self {
            BackendError::Unavailable(_) => ErrorCode::Unavailable.as_str(),
            BackendError::BadReply(_) => ErrorCode::Internal.as_str(),
            BackendError::Application { code, .. } => code,
        }
    }
}

/// The edge's view of the router tier and the applications.
#[derive(Clone)]
pub struct Backend {
    client: async_nats::Client,
    subjects: Subjects,
    timeout: Duration,
}

impl Backend {
    /// A backend over `client`.
    pub fn new(client: async_nats::Client, subjects: Subjects, timeout: Duration) -> Backend {
        Backend {
            client,
            subjects,
            timeout,
        }
    }

    async fn request(&self, subject: String, payload: Vec<u8>, who: &'static str) -> Result<Bytes, BackendError> {
        match tokio::time::timeout(self.timeout, self.client.request(subject, payload.into())).await {
            Ok(Ok(msg)) => Ok(msg.payload),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, who, "backend request failed");
                Err(BackendError::Unavailable(who))
            }
            Err(_) => Err(BackendError::Unavailable(who)),
        }
    }

    /// Sends a subscription change for `user` to the router tier.
    pub async fn control(
        &self,
        user: &str,
        rooms: &[String],
        roles: &[String],
        op: ControlOp,
    ) -> Result<ControlReply, BackendError> {
        let req = ControlRequest {
            user: user.to_string(),
            rooms: rooms.to_vec(),
            roles: roles.to_vec(),
            op,
        };
        let payload = self
            .request(self.subjects.control(), control::encode(&req), "router")
            .await?;
        control::decode(&payload).map_err(|_| BackendError::BadReply("router"))
    }

    /// Calls application method `method` for `user`; returns the reply's `data` as MessagePack bytes.
    pub async fn rpc(
        &self,
        user: &str,
        roles: &[String],
        method: &str,
        data: &rmpv::Value,
    ) -> Result<Vec<u8>, BackendError> {
        let request = rmpv::Value::Map(vec![
            (rmpv::Value::from("user"), rmpv::Value::from(user)),
            (
                rmpv::Value::from("roles"),
                rmpv::Value::Array(roles.iter().map(|r| rmpv::Value::from(r.as_str())).collect()),
            ),
            (rmpv::Value::from("data"), data.clone()),
        ]);
        let mut payload = Vec::new();
        rmpv::encode::write_value(&mut payload, &request).map_err(|_| BackendError::BadReply("application"))?;
        let reply = self.request(self.subjects.rpc(method), payload, "application").await?;
        let value = rmpv::decode::read_value_with_max_depth(&mut &reply[..], switchyard_common::value::MAX_DEPTH)
            .map_err(|_| BackendError::BadReply("application"))?;
        let Some(map) = value.as_map() else {
            return Err(BackendError::BadReply("application"));
        };
        if let Some(err) = switchyard_common::value::get(map, "error").and_then(|e| e.as_map()) {
            let field = |k| {
                switchyard_common::value::get(err, k)
                    .and_then(|v| v.as_str())
                    .unwrap_or("")
                    .to_string()
            };
            let code = field("code");
            return Err(BackendError::Application {
                code: if code.is_empty() {
                    ErrorCode::Internal.as_str().to_string()
                } else {
                    code
                },
                message: field("message"),
            });
        }
        let data = switchyard_common::value::get(map, "data")
            .cloned()
            .unwrap_or(rmpv::Value::Nil);
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &data).map_err(|_| BackendError::BadReply("application"))?;
        Ok(out)
    }
}

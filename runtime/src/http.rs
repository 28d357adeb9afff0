//! Small HTTP response helpers shared by the admin endpoint and the edge's
//! pre-upgrade HTTP handling. Plain functions over hyper types; no routing.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Response, StatusCode};

/// A response with `status` and `body` and no other headers.
pub fn respond(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r
}

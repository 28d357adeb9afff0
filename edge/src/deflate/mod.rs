//! permessage-deflate (RFC 7692): compressed data frames on connections
//! whose client offers it.
//!
//! Owns the whole extension and nothing else: the settings ([`settings`]),
//! reading the client's `Sec-WebSocket-Extensions` offers and choosing what
//! to answer ([`offer`]), and compressing and inflating message payloads
//! ([`codec`]). The upgrade (`server.rs`) asks [`offer::negotiate`] for an
//! [`offer::Agreed`]; the connection's writer (`conn.rs`) frames every data
//! frame through [`codec::put_data_frame`]; the reader (`wsread.rs`) hands
//! compressed messages to [`codec::inflate`].
//!
//! By default neither side keeps its LZ77 window between messages
//! (`server_no_context_takeover; client_no_context_takeover`): the edge then
//! compresses and inflates with one compressor and one decompressor per
//! thread, reset for every message, and a connection that negotiated
//! deflate holds no more memory than one that did not. Context takeover
//! (better ratios on streams of similar events, at the price of a
//! compressor per connection) is the operator's choice
//! (`SWITCHYARD_DEFLATE_CONTEXT_TAKEOVER`), and only for what the edge
//! sends: clients always reset, so inflating never needs per-connection
//! state.

pub mod codec;
pub mod offer;
pub mod settings;

pub use codec::{put_data_frame, FrameDeflater, InflateError};
pub use offer::{negotiate, Agreed};
pub use settings::DeflateSettings;

/// One live connection that negotiated permessage-deflate, counted in
/// `switchyard_edge_deflate_connections` (gauge) while it lives and in
/// `switchyard_edge_deflate_connections_total` once.
#[derive(Debug)]
pub struct Negotiated(());

impl Negotiated {
    /// Counts a connection in; it is counted out when the value drops.
    pub fn count() -> Negotiated {
        metrics::counter!("switchyard_edge_deflate_connections_total").increment(1);
        metrics::gauge!("switchyard_edge_deflate_connections").increment(1.0);
        Negotiated(())
    }
}

impl Drop for Negotiated {
    fn drop(&mut self) {
        metrics::gauge!("switchyard_edge_deflate_connections").decrement(1.0);
    }
}

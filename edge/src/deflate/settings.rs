//! The edge's permessage-deflate settings (`SWITCHYARD_DEFLATE*`), flattened
//! into [`crate::config::EdgeConfig`].

use clap::Args;

/// How the edge answers a permessage-deflate offer and compresses.
#[derive(Debug, Clone, Copy, Args)]
pub struct DeflateSettings {
    /// Accept permessage-deflate (RFC 7692) when a client offers it.
    #[arg(long = "deflate", env = "SWITCHYARD_DEFLATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub enabled: bool,
    /// Data frames whose payload is shorter than this go uncompressed, in
    /// bytes: below it, resetting the compressor costs more CPU than the
    /// few bytes deflate saves are worth (see docs/BENCHMARKS.md).
    #[arg(
        long = "deflate-min-bytes",
        env = "SWITCHYARD_DEFLATE_MIN_BYTES",
        default_value_t = 256
    )]
    pub min_bytes: usize,
    /// zlib compression level, 1 (fastest) to 9; 1 measured best for event frames.
    #[arg(long = "deflate-level", env = "SWITCHYARD_DEFLATE_LEVEL", default_value_t = 1)]
    pub level: u32,
    /// Keep the server's LZ77 window from one message to the next (unless the
    /// client asked otherwise): smaller frames, but a compressor of about
    /// 150 to 270 KiB per connection that negotiated deflate.
    #[arg(long = "deflate-context-takeover", env = "SWITCHYARD_DEFLATE_CONTEXT_TAKEOVER", default_value_t = false, action = clap::ArgAction::Set)]
    pub context_takeover: bool,
    /// The server's LZ77 window, log2 bytes (9 to 15), with context takeover:
    /// a smaller window makes each connection's compressor smaller.
    #[arg(
        long = "deflate-window-bits",
        env = "SWITCHYARD_DEFLATE_WINDOW_BITS",
        default_value_t = 15
    )]
    pub window_bits: u8,
}

/// A permessage-deflate setting out of range.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeflateSettingsError {
    /// Not a zlib level.
    #[error("SWITCHYARD_DEFLATE_LEVEL must be 1 to 9, not {0}")]
    Level(u32),
    /// Not a window zlib can use for raw deflate.
    #[error("SWITCHYARD_DEFLATE_WINDOW_BITS must be 9 to 15, not {0}")]
    WindowBits(u8),
}

impl Default for DeflateSettings {
    fn default() -> Self {
        DeflateSettings {
            enabled: true,
            min_bytes: 256,
            level: 1,
            context_takeover: false,
            window_bits: 15,
        }
    }
}

impl DeflateSettings {
    /// Checks what clap cannot.
    pub fn validate(&self) -> Result<(), DeflateSettingsError> {
        if !(1..=9).contains(&self.level) {
            return Err(DeflateSettingsError::Level(self.level));
        }
        if !(9..=15).contains(&self.window_bits) {
            return Err(DeflateSettingsError::WindowBits(self.window_bits));
        }
        Ok(())
    }
}

//! The WebSocket message reader (edge/src/wsread.rs) over arbitrary bytes,
//! on a current-thread runtime with the bytes as the stream. Messages are
//! read until the reader reports an error (at the latest the end of input)
//! or a close. Oracles: the reader terminates, never hands out more payload
//! than the input held, never a data message over the size limit, never a
//! control payload over 125 bytes, and text messages are valid UTF-8. The
//! first byte picks a small or the default limit (bit 0) and whether
//! permessage-deflate was negotiated (bit 1: RSV1 marks compressed
//! messages, inflated within the same limit).
#![no_main]

use std::sync::OnceLock;

use fastwebsockets::OpCode;
use libfuzzer_sys::fuzz_target;
use switchyard_edge::wsread::{Incoming, MessageReader};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_current_thread().build().expect("runtime"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, stream)) = data.split_first() else {
        return;
    };
    let max = if mode & 1 == 1 { 64 } else { 64 * 1024 };
    runtime().block_on(async {
        let mut reader = MessageReader::new(stream, max).with_deflate(mode & 2 == 2);
        let mut handed_out = 0usize;
        // Each frame consumes at least its 2 header bytes, so this many
        // reads exhaust the input; one more must be the error.
        for _ in 0..=stream.len() / 2 + 1 {
            match reader.read_message().await {
                Ok(Incoming::Message(op, payload)) => {
                    assert!(payload.len() <= max, "message of {} over {max}", payload.len());
                    if op == OpCode::Text {
                        assert!(std::str::from_utf8(&payload).is_ok(), "text that is not UTF-8");
                    }
                    // Inflated messages may be longer than what came in.
                    if mode & 2 == 0 {
                        handed_out += payload.len();
                    }
                }
                Ok(Incoming::Ping(p)) => {
                    assert!(p.len() <= 125, "ping payload of {}", p.len());
                    handed_out += p.len();
                }
                Ok(Incoming::Pong) => {}
                Ok(Incoming::Close(p)) => {
                    assert!(p.len() <= 125, "close payload of {}", p.len());
                    return;
                }
                Err(_) => return,
            }
            assert!(handed_out <= stream.len(), "more payload than input");
        }
        panic!("the reader did not stop at the end of the input");
    });
});

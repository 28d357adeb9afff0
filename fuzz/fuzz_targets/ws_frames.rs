//! The WebSocket frame reader (edge/src/wsread.rs) over arbitrary bytes, on
//! a current-thread runtime with the bytes as the stream. Frames are read
//! until the reader reports an error (at the latest the end of input).
//! Oracles: the reader terminates, never hands out more payload than the
//! input held, and never a data frame over the message size limit. The
//! first byte picks a small or the default limit.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchyard_edge::wsread::{FrameReader, Obligation};

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
        let mut reader = FrameReader::new(stream, max);
        let mut handed_out = 0usize;
        // Each frame consumes at least its 2 header bytes, so this many
        // reads exhaust the input; one more must be the error.
        for _ in 0..=stream.len() / 2 + 1 {
            match reader.read_frame().await {
                Ok((frame, obligation)) => {
                    // A close echo repeats the close frame's payload: a
                    // frame's bytes are counted once, an obligation's only
                    // when it comes alone (a pong, a refused close code).
                    let owed = match obligation {
                        Some(Obligation::Pong(p) | Obligation::CloseEcho(p)) => p.len(),
                        None => 0,
                    };
                    match frame {
                        Some(f) => {
                            assert!(f.payload.len() <= max, "frame of {} over {max}", f.payload.len());
                            handed_out += f.payload.len();
                        }
                        None => handed_out += owed,
                    }
                    assert!(handed_out <= stream.len(), "more payload than input");
                }
                Err(_) => return,
            }
        }
        panic!("the reader did not stop at the end of the input");
    });
});

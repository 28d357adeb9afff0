//! Client frames, both encodings (first byte: even MessagePack, odd JSON):
//! decoding never panics; a decoded `subscribe` goes through the router's
//! validation, and an accepted one lists at most 1024 filter values; a
//! decoded `rpc` payload relayed back as an `rpc_result` stays linear.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_common::client::{decode_client_frame, encode_rpc_result, ClientOp};
use switchyard_common::subscription::{Subscription, MAX_FILTER_VALUES};
use switchyard_common::transcode::json_len_bound;
use switchyard_common::Encoding;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, frame)) = data.split_first() else {
        return;
    };
    let enc = if mode & 1 == 1 {
        Encoding::Json
    } else {
        Encoding::MsgPack
    };
    let Ok(f) = decode_client_frame(enc, frame) else {
        return;
    };
    match f.op {
        ClientOp::Subscribe(raw) => {
            if let Ok(sub) = Subscription::from_raw(&raw) {
                let values: usize = sub.filters.values().map(Vec::len).sum();
                assert!(values <= MAX_FILTER_VALUES);
            }
        }
        ClientOp::Rpc { data, .. } => {
            let mut mp = Vec::new();
            rmpv::encode::write_value(&mut mp, &data).expect("vec write");
            let mut out = Vec::new();
            encode_rpc_result(Encoding::Json, f.id, &mp, &mut out);
            assert!(out.len() <= json_len_bound(mp.len() + 32));
        }
        _ => {}
    }
});

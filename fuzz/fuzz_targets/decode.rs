//! The decoder on arbitrary bytes, as the broker meets them: the in-place
//! `peek` a connection runs first, then `decode` on what it leaves. Neither
//! may panic, and `peek` may never accept a frame `decode` refuses.
#![no_main]

use bytes::BytesMut;
use kaelix_core::protocol::{decode, peek, Peek};
use libfuzzer_sys::fuzz_target;

/// Small, so that length checks are exercised as well as parsing.
const MAX_FRAME: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        match peek(&data[at..], MAX_FRAME) {
            Ok(Peek::Incomplete) | Err(_) => break,
            Ok(Peek::Publish(_, len)) | Ok(Peek::Deliver(_, len)) => {
                // What peek accepts, decode accepts too.
                let mut buf = BytesMut::from(&data[at..at + len]);
                assert!(matches!(decode(&mut buf, MAX_FRAME), Ok(Some(_))));
                at += len;
            }
            Ok(Peek::Other) => break,
        }
    }
    let mut buf = BytesMut::from(&data[at..]);
    while let Ok(Some(frame)) = decode(&mut buf, MAX_FRAME) {
        // A decoded frame encodes back without panicking.
        let _ = frame.to_bytes();
    }
});

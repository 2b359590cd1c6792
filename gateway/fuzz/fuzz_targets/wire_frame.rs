//! Any bytes from a peer as tunnel frames, datagrams and sync batches: decoding never panics,
//! and whatever decodes re-encodes to the same bytes.
#![no_main]

use gateway_core::wire::{Batch, Frame, decode_datagram};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = Frame::decode(data) {
        assert_eq!(frame.to_bytes(), data[..used].to_vec());
    }
    let _ = Frame::decode_body(data);
    let _ = decode_datagram(data);
    if let Ok(records) = Batch::decode_body(data) {
        assert!(records.windows(2).all(|w| w[0].seq < w[1].seq));
    }
});

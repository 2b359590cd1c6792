//! Any bytes from a peer as control-stream and enrollment messages, and any
//! text as an audit export: decoding never panics, and a message that decodes
//! re-encodes to one that decodes to the same value.
#![no_main]

use gateway_core::fleet::{self, EnrollAnswer, EnrollRequest, Message};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = fleet::decode::<Message>(data) {
        let bytes = fleet::encode(&m);
        assert_eq!(fleet::decode::<Message>(&bytes[4..]).ok(), Some(m));
    }
    let _ = fleet::decode::<EnrollRequest>(data);
    let _ = fleet::decode::<EnrollAnswer>(data);
    if let Ok(prefix) = <[u8; 4]>::try_from(data.get(..4).unwrap_or_default()) {
        let _ = fleet::body_len(prefix);
    }
    let _ = fleet::verify_export(&String::from_utf8_lossy(data));
});

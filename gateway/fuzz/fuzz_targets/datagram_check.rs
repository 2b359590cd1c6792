//! Any bytes as a UDP datagram of an `rtp` or `mpegts` service: the checks
//! never panic and a violation points inside the datagram.
#![no_main]

use gateway_core::sniff::datagram::{Datagram, check};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for proto in [
        Datagram::Rtp(&[]),
        Datagram::Rtp(&[96, 97]),
        Datagram::Mpegts(&[]),
        Datagram::Mpegts(&[0, 256]),
    ] {
        if let Err(v) = check(&proto, data) {
            assert!(v.offset <= data.len());
        }
    }
});

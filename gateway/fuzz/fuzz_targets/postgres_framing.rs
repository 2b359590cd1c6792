//! Any bytes as a PostgreSQL client's startup packet and typed messages:
//! framing never panics and never claims bytes it was not given.
#![no_main]

use gateway_core::sniff::postgres::{Read, message, startup};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(Read::Got(_, n)) = startup(data) {
        assert!(n <= data.len());
    }
    if let Ok(Read::Got(m, n)) = message(data, 1 << 20, 0) {
        assert!(n <= data.len() && m.body.len() + 5 == n);
    }
});

//! What the detectors read from outside the daemon: the kernel's NFLOG
//! messages and clamd's answers. Neither is trusted: parsing never panics,
//! and what comes out is bounded and printable.
#![no_main]

use gateway_core::detect::{clamd, nflog};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for d in nflog::parse(data) {
        assert!(d.protocol == 6 || d.protocol == 17);
    }
    let _ = nflog::ack(data);
    match clamd::parse_reply(data) {
        clamd::Reply::Found(name) => assert!(!name.is_empty() && name.len() <= 800 && !name.contains(' ')),
        clamd::Reply::Error(e) => assert!(e.chars().all(|c| !c.is_control())),
        clamd::Reply::Clean => {}
    }
    if let Some(v) = clamd::parse_version(data) {
        assert!(v.text.chars().all(|c| !c.is_control()));
    }
});

//! The level-3 application-protocol check: a client's requests and a server's
//! responses in any bytes and any pieces, with an `http_allow` list; released
//! bytes are always a prefix of the stream, and never a panic.
#![no_main]

use std::sync::Arc;

use gateway_core::config::{AppProtocol, HttpAllow};
use gateway_core::sniff::{Inspector, Rules};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let rules = Arc::new(Rules {
        allow_upgrade: selector & 1 == 1,
        sni: vec!["pension.jl.gov.cn".into()],
        http_allow: vec![HttpAllow {
            methods: vec!["GET".into()],
            paths: vec!["/reports/".into()],
        }],
    });
    let proto = if selector & 2 == 0 {
        AppProtocol::Http
    } else {
        AppProtocol::Tls
    };
    // Requests in pieces of the selector's size, then the same bytes as the
    // server's answers to what the requests asked.
    let piece = usize::from(selector >> 2).max(1);
    let mut requests = Inspector::requests(proto, rules);
    let mut responses = Inspector::responses();
    let mut out = Vec::new();
    for part in body.chunks(piece) {
        match requests.feed(part) {
            Ok(b) => out.extend(b),
            Err(_) => break,
        }
        for a in requests.take_asked() {
            let _ = responses.expect(a);
        }
    }
    assert!(body.starts_with(&out));
    let mut back = Vec::new();
    for part in body.chunks(piece) {
        match responses.feed(part) {
            Ok(b) => back.extend(b),
            Err(_) => break,
        }
    }
    assert!(body.starts_with(&back));
});

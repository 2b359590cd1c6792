//! Any bytes both ways through a read-only PostgreSQL session, cut into
//! reads at any points: it never panics, and the SQL classifier never
//! panics on any text.
#![no_main]

use gateway_core::sniff::postgres::read_only;
use gateway_core::sniff::postgres::session::{Rules, Session};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else {
        return;
    };
    let half = rest.len() / 2;
    let (client, server) = rest.split_at(half);
    let mut s = Session::new(Rules {
        read_only: true,
        max_message: 1 << 16,
    });
    let step = usize::from(cut).max(1);
    // The login first (the server's), then both ways in turns.
    let mut chunks = client.chunks(step).zip(server.chunks(step));
    for (c, sv) in &mut chunks {
        if s.server(sv, 0).is_err() || s.client(c, 0).is_err() {
            break;
        }
    }
    if let Ok(text) = std::str::from_utf8(client) {
        let _ = read_only::check(text);
    }
});

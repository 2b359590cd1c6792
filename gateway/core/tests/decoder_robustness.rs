//! The config decoder on hostile input: random edits of real configs never make
//! it panic, every diagnostic points inside the text, and a config is returned
//! exactly when there is no error. Value parsers round-trip through Display.
//! (The same property is fuzzed by gateway/fuzz's `config_load` target.)

use gateway_core::check;
use gateway_core::units::{ByteSize, Cidr, Date, format_duration, parse_duration};
use proptest::prelude::*;

const SEEDS: &[&str] = &[
    include_str!("../../../config/edge-extranet-l3.toml"),
    include_str!("../../../config/edge-intranet-classified.toml"),
    include_str!("../../../config/hub-extranet.toml"),
    include_str!("../../../tests/configs/bad/many-errors.toml"),
    include_str!("../../../tests/configs/bad/bad-references.toml"),
];

#[derive(Debug, Clone)]
enum Edit {
    Delete(usize, usize),
    Insert(usize, String),
    Truncate(usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    let text = prop_oneof![
        Just("[".to_owned()),
        Just("]]".to_owned()),
        Just("\"".to_owned()),
        Just("=".to_owned()),
        Just("\n[[zone]]\n".to_owned()),
        Just("\nlevel = 5\n".to_owned()),
        Just("é漢".to_owned()),
        "[ -~\n]{0,12}",
    ];
    prop_oneof![
        (any::<usize>(), 1usize..20).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), text).prop_map(|(at, s)| Edit::Insert(at, s)),
        any::<usize>().prop_map(Edit::Truncate),
    ]
}

fn char_boundary(s: &str, at: usize) -> usize {
    let mut at = at % (s.len() + 1);
    while !s.is_char_boundary(at) {
        at -= 1;
    }
    at
}

fn apply(mut s: String, edits: &[Edit]) -> String {
    for e in edits {
        match e {
            Edit::Delete(at, n) => {
                let a = char_boundary(&s, *at);
                let b = char_boundary(&s, a.saturating_add(*n).min(s.len()));
                s.replace_range(a..b.max(a), "");
            }
            Edit::Insert(at, text) => {
                let a = char_boundary(&s, *at);
                s.insert_str(a, text);
            }
            Edit::Truncate(at) => {
                let a = char_boundary(&s, *at);
                s.truncate(a);
            }
        }
    }
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn edited_configs_never_panic_and_errors_point_inside(seed in 0..SEEDS.len(), edits in prop::collection::vec(edit(), 1..6)) {
        let src = apply(SEEDS[seed].to_owned(), &edits);
        let checked = check::load(&src, Date::new(2026, 11, 26).expect("date"));
        let lines = u32::try_from(src.split('\n').count()).expect("lines");
        for d in &checked.diagnostics {
            prop_assert!(d.location.line >= 1 && d.location.line <= lines, "{d:?} in {lines} lines");
            prop_assert!(d.location.column >= 1);
            prop_assert!(!d.message.is_empty());
        }
        prop_assert_eq!(checked.config.is_some(), !checked.has_errors());
    }

    #[test]
    fn cidrs_round_trip(a in any::<u32>(), prefix in 0u8..=32) {
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix)) };
        let text = format!("{}/{prefix}", std::net::Ipv4Addr::from(a & mask));
        let net: Cidr = text.parse().expect("valid");
        prop_assert_eq!(net.to_string(), text);
    }

    #[test]
    fn sizes_round_trip(n in 1u64..1_000_000, unit in 0usize..5) {
        let b = ByteSize(n << (10 * unit));
        prop_assert_eq!(b.to_string().parse::<ByteSize>(), Ok(b));
    }

    #[test]
    fn durations_round_trip(ms in 1u64..10_000_000_000) {
        let d = std::time::Duration::from_millis(ms);
        prop_assert_eq!(parse_duration(&format_duration(d)), Ok(d));
    }

    #[test]
    fn dates_round_trip(days in -100_000i64..200_000) {
        let d = Date::from_days_since_epoch(days);
        prop_assert_eq!(d.to_string().parse::<Date>(), Ok(d));
    }
}

proptest! {
    /// The kernel's NFLOG messages and clamd's answers, as arbitrary bytes
    /// (the fuzz target detect_input goes further): never a panic, nothing
    /// unprintable out.
    #[test]
    fn detector_inputs_never_panic(data in prop::collection::vec(any::<u8>(), 0..600)) {
        use gateway_core::detect::{clamd, nflog};
        for d in nflog::parse(&data) {
            prop_assert!(d.protocol == 6 || d.protocol == 17);
        }
        if let clamd::Reply::Found(name) = clamd::parse_reply(&data) {
            prop_assert!(!name.chars().any(char::is_control));
        }
        if let Some(v) = clamd::parse_version(&data) {
            prop_assert!(!v.text.chars().any(char::is_control));
        }
    }
}

proptest! {
    /// Any datagram against the RTP and MPEG-TS checks: never a panic, and a
    /// violation points inside the datagram (or at its end).
    #[test]
    fn datagram_checks_never_panic(data in prop::collection::vec(any::<u8>(), 0..1400), pt in any::<u8>(), pid in 0u16..8192) {
        use gateway_core::sniff::datagram::{Datagram, check};
        for proto in [Datagram::Rtp(&[]), Datagram::Rtp(&[pt & 0x7f]), Datagram::Mpegts(&[]), Datagram::Mpegts(&[pid])] {
            if let Err(v) = check(&proto, &data) {
                prop_assert!(v.offset <= data.len());
            }
        }
    }
}

proptest! {
    /// Any bytes as a PostgreSQL client's first packet and its messages:
    /// never a panic; a packet read never claims more bytes than were given.
    #[test]
    fn postgres_framing_never_panics(data in prop::collection::vec(any::<u8>(), 0..600)) {
        use gateway_core::sniff::postgres::{Read, message, startup};
        if let Ok(Read::Got(_, n)) = startup(&data) {
            prop_assert!(n <= data.len());
        }
        if let Ok(Read::Got(m, n)) = message(&data, 1 << 20, 0) {
            prop_assert!(n <= data.len() && m.body.len() + 5 == n);
        }
    }
}

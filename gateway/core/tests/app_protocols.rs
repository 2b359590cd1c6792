//! The level-3 application protocols of UDP services (`rtp`, `mpegts`): the
//! keys that go with them, each mistake located.

mod common;

use gateway_core::config::compile::compile;

/// The shared level-3 edge, its channel replaced by a service `video` with
/// `service` (its line 31 is the first of `service`).
fn edge(service: &str) -> String {
    let base = common::level3_edge("");
    let head = base
        .split("[[channel]]")
        .next()
        .unwrap_or_default()
        .to_owned();
    format!(
        "{head}[[service]]\nname = \"video\"\nzone = \"lab\"\ntarget = \"10.1.0.5:5004\"\nallow = [\"extranet\"]\n{service}"
    )
}

fn errors(src: &str) -> Vec<String> {
    let (config, diags) = compile(src);
    assert!(config.is_none(), "refused");
    diags
        .iter()
        .filter(|d| d.is_error())
        .map(|d| format!("{} {}", d.location.line, d.message))
        .collect()
}

#[test]
fn rtp_and_mpegts_services_are_read_with_their_lists() {
    let (config, diags) = compile(&edge(
        "protocol = \"udp\"\napp_protocol = \"rtp\"\nrtp_payload_types = [96, 97]\nmax_violations = 10\n",
    ));
    let c = config.unwrap_or_else(|| panic!("{diags:?}"));
    let s = &c.edge().expect("edge").services[0];
    assert_eq!(s.rtp_payload_types, [96, 97]);
    assert_eq!(s.max_violations, 10);
    let (config, diags) = compile(&edge(
        "protocol = \"udp\"\napp_protocol = \"mpegts\"\nmpegts_pids = [0, 4096, 256]\n",
    ));
    let c = config.unwrap_or_else(|| panic!("{diags:?}"));
    let s = &c.edge().expect("edge").services[0];
    assert_eq!(
        (s.mpegts_pids.as_slice(), s.max_violations),
        (&[0, 4096, 256][..], 100)
    );
}

#[test]
fn each_mistake_is_located() {
    let e = errors(&edge("app_protocol = \"rtp\"\n"));
    assert!(
        e.iter()
            .any(|e| e.starts_with("31 ")
                && e.contains("rtp runs over UDP, but this service is tcp")),
        "{e:?}"
    );
    let e = errors(&edge(
        "protocol = \"udp\"\napp_protocol = \"rtp\"\nmpegts_pids = [256]\n",
    ));
    assert!(
        e.iter().any(|e| e.starts_with("33 ")
            && e.contains("mpegts_pids applies to app_protocol = \"mpegts\" only")),
        "{e:?}"
    );
    let e = errors(&edge(
        "protocol = \"udp\"\napp_protocol = \"mpegts\"\nmpegts_pids = [8192]\n",
    ));
    assert!(
        e.iter()
            .any(|e| e.contains("mpegts_pids: 8192 is not from 0 to 8191")),
        "{e:?}"
    );
    let e = errors(&edge(
        "protocol = \"udp\"\napp_protocol = \"rtp\"\nrtp_payload_types = [128]\n",
    ));
    assert!(
        e.iter()
            .any(|e| e.contains("rtp_payload_types: 128 is not from 0 to 127")),
        "{e:?}"
    );
    let e = errors(&edge("max_violations = 5\n"));
    assert!(
        e.iter()
            .any(|e| e.contains("max_violations applies to app_protocol")),
        "{e:?}"
    );
}

//! An alarm as a syslog message (RFC 5424), framed for TLS transport by
//! octet counting (RFC 5425 section 4.3): the four fields an assessor looks
//! for (source, attack type, target, time) and the rest as structured data.

use super::Alarm;

/// Facility 4: security/authorization messages.
const FACILITY: u8 = 4;

/// The structured-data id: `gwAlarm` under enterprise number 32473, the one
/// RFC 5612 reserves for documentation and examples (the project has none of
/// its own); collectors match on the name.
pub const SD_ID: &str = "gwAlarm@32473";

/// The syslog severity of an alarm's severity: critical is Alert (1), high
/// Critical (2), medium Warning (4), low Notice (5).
fn severity(s: &str) -> u8 {
    match s {
        "critical" => 1,
        "high" => 2,
        "medium" => 4,
        _ => 5,
    }
}

/// A PARAM-VALUE: `"`, `\` and `]` escaped with a backslash, control
/// characters dropped.
fn value(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().filter(|c| !c.is_control()) {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Printable US-ASCII without spaces, at most `max` characters, or `-`.
fn token(s: &str, max: usize) -> String {
    let t: String = s
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(max)
        .collect();
    if t.is_empty() { "-".into() } else { t }
}

/// The RFC 5424 message for `a`, sent by `hostname` (the node id) as process
/// `procid`.
pub fn message(a: &Alarm, hostname: &str, procid: u32) -> String {
    let pri = FACILITY * 8 + severity(&a.severity);
    let mut sd = format!("[{SD_ID}");
    let mut param = |name: &str, v: &str| {
        sd.push_str(&format!(" {name}=\"{}\"", value(v)));
    };
    param("id", &a.id);
    param("rule", &a.rule);
    param("severity", &a.severity);
    param("attack", &a.attack);
    param("direction", &a.direction);
    param("src", &a.source);
    param("srcPort", &a.port.to_string());
    if let Some(d) = &a.device {
        param("device", d);
    }
    param("target", &a.target);
    param("time", &a.time);
    param("action", &a.action);
    if let Some(u) = &a.banned_until {
        param("bannedUntil", u);
    }
    param("count", &a.count.to_string());
    param("windowMs", &a.window_ms.to_string());
    if let Some(s) = &a.signature {
        param("signature", s);
    }
    sd.push(']');
    format!(
        "<{pri}>1 {} {} gatewayd {procid} {} {sd} {} from {}:{} at {}: {}",
        token(&a.time, 64),
        token(hostname, 255),
        token(&a.rule, 32),
        a.attack,
        a.source,
        a.port,
        a.target
            .chars()
            .filter(|c| !c.is_control())
            .collect::<String>(),
        a.action
    )
}

/// Octet-counting framing: `LENGTH SP MESSAGE`.
pub fn framed(message: &str) -> Vec<u8> {
    let mut out = format!("{} ", message.len()).into_bytes();
    out.extend_from_slice(message.as_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alarm() -> Alarm {
        Alarm {
            id: "hub-1-19a-0f".into(),
            node: "hub-1".into(),
            rule: "D2.scan".into(),
            severity: "high".into(),
            attack: "scan".into(),
            direction: "inbound".into(),
            source: "192.0.2.1".into(),
            port: 40_000,
            device: None,
            target: "publish 10.0.0.1:443 \"x\"]\\".into(),
            time: "2026-12-01T17:50:01.123+08:00".into(),
            at_ms: 0,
            action: "ban".into(),
            banned_until: Some("2026-12-01T21:50:01.123+08:00".into()),
            count: 15,
            window_ms: 75_000,
            signature: None,
        }
    }

    #[test]
    fn the_message_has_the_header_and_the_fields_as_structured_data() {
        let m = message(&alarm(), "hub-1", 42);
        assert!(
            m.starts_with("<34>1 2026-12-01T17:50:01.123+08:00 hub-1 gatewayd 42 D2.scan [gwAlarm@32473 id=\"hub-1-19a-0f\""),
            "{m}"
        );
        assert!(m.contains(" src=\"192.0.2.1\" srcPort=\"40000\""), "{m}");
        assert!(
            m.contains(r#" target="publish 10.0.0.1:443 \"x\"\]\\""#),
            "{m}"
        );
        assert!(m.contains(" attack=\"scan\""), "{m}");
        assert!(
            m.ends_with("] scan from 192.0.2.1:40000 at publish 10.0.0.1:443 \"x\"]\\: ban"),
            "{m}"
        );
        let f = framed(&m);
        assert!(f.starts_with(format!("{} <34>", m.len()).as_bytes()));
    }

    #[test]
    fn severities_map_to_syslog_levels() {
        let mut a = alarm();
        for (s, pri) in [("critical", 33), ("high", 34), ("medium", 36), ("low", 37)] {
            a.severity = s.into();
            assert!(message(&a, "h", 1).starts_with(&format!("<{pri}>1 ")));
        }
    }
}

//! What ClamAV's daemon says, read without trusting it: the answer to
//! `zINSTREAM` (RFC-less, clamd(8)) and to `zVERSION`. Pure; the shell in
//! the daemon talks to the socket.

use crate::units::Date;

/// The most of an answer read: a verdict or a version line is far shorter.
pub const MAX_REPLY: usize = 4096;

/// clamd's verdict on a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `stream: OK`.
    Clean,
    /// `stream: NAME FOUND`: the signature's name.
    Found(String),
    /// Anything else: `... ERROR`, or an answer that is not one.
    Error(String),
}

/// Printable text of at most `max` characters (a signature name or an error
/// goes into audit records and alarms).
fn printable(s: &str, max: usize) -> String {
    s.chars().filter(|c| !c.is_control()).take(max).collect()
}

/// Reads clamd's answer to `zINSTREAM` (NUL-terminated with the `z` prefix).
pub fn parse_reply(raw: &[u8]) -> Reply {
    let raw = &raw[..raw.len().min(MAX_REPLY)];
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    let text = String::from_utf8_lossy(&raw[..end]);
    let text = text.trim();
    let Some(rest) = text.strip_prefix("stream:") else {
        return Reply::Error(printable(text, 200));
    };
    let rest = rest.trim();
    if rest == "OK" {
        return Reply::Clean;
    }
    if let Some(name) = rest.strip_suffix(" FOUND") {
        let name = printable(name.trim(), 200);
        if !name.is_empty() && !name.contains(' ') {
            return Reply::Found(name);
        }
    }
    Reply::Error(printable(rest, 200))
}

/// The engine and signature database clamd reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    /// `ClamAV 1.4.6/27473/Mon Dec  1 09:21:35 2026` as given (printable, capped).
    pub text: String,
    /// `ClamAV 1.4.6`.
    pub engine: String,
    /// The database's version, when it has one (official databases do).
    pub database: Option<u64>,
    /// When the database was built (Unix ms, read as UTC), when said.
    pub built_ms: Option<i64>,
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `Mon Dec  1 09:21:35 2026` as Unix ms (UTC).
fn ctime_ms(s: &str) -> Option<i64> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let [_, month, day, time, year] = parts.as_slice() else {
        return None;
    };
    let month = u8::try_from(MONTHS.iter().position(|m| m == month)? + 1).ok()?;
    let date = Date::new(year.parse().ok()?, month, day.parse().ok()?)?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    Some(date.days_since_epoch() * 86_400_000 + ((h * 60 + m) * 60 + sec) * 1000)
}

/// Reads clamd's answer to `zVERSION`.
pub fn parse_version(raw: &[u8]) -> Option<Version> {
    let raw = &raw[..raw.len().min(MAX_REPLY)];
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    let text = printable(String::from_utf8_lossy(&raw[..end]).trim(), 200);
    if !text.starts_with("ClamAV ") {
        return None;
    }
    let mut parts = text.splitn(3, '/');
    let engine = parts.next()?.to_owned();
    let database = parts.next().and_then(|d| d.parse().ok());
    let built_ms = parts.next().and_then(ctime_ms);
    Some(Version {
        text: text.clone(),
        engine,
        database,
        built_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_are_read_and_anything_else_is_an_error() {
        assert_eq!(parse_reply(b"stream: OK\0"), Reply::Clean);
        assert_eq!(
            parse_reply(b"stream: Win.Test.EICAR_HDB-1 FOUND\0"),
            Reply::Found("Win.Test.EICAR_HDB-1".into())
        );
        assert_eq!(
            parse_reply(b"INSTREAM size limit exceeded. ERROR\0"),
            Reply::Error("INSTREAM size limit exceeded. ERROR".into())
        );
        assert!(matches!(parse_reply(b""), Reply::Error(_)));
        assert!(matches!(
            parse_reply(b"stream: two words FOUND\0"),
            Reply::Error(_)
        ));
        assert!(matches!(parse_reply(b"stream:  FOUND\0"), Reply::Error(_)));
        // A name with control characters cannot forge an audit line.
        assert_eq!(
            parse_reply(b"stream: A\nB FOUND\0"),
            Reply::Found("AB".into())
        );
        let long = [b'x'; 10_000];
        assert!(matches!(parse_reply(&long), Reply::Error(e) if e.len() <= 200));
    }

    #[test]
    fn versions_with_and_without_a_database_date() {
        let v = parse_version(b"ClamAV 1.4.6/27473/Mon Dec  1 09:21:35 2026\0").expect("version");
        assert_eq!(v.engine, "ClamAV 1.4.6");
        assert_eq!(v.database, Some(27473));
        let day = Date::new(2026, 12, 1).expect("date").days_since_epoch();
        assert_eq!(
            v.built_ms,
            Some(day * 86_400_000 + (9 * 3600 + 21 * 60 + 35) * 1000)
        );
        let local = parse_version(b"ClamAV 1.4.6\0").expect("version");
        assert_eq!((local.database, local.built_ms), (None, None));
        assert_eq!(parse_version(b"nonsense"), None);
        assert_eq!(
            parse_version(b"ClamAV 1.4.6/1/Mon Foo 99 99:99:99 2026").map(|v| v.built_ms),
            Some(None)
        );
    }
}

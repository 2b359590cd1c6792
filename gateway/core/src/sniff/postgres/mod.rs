//! The PostgreSQL frontend/backend protocol (v3), framed and read without
//! trusting either side, for `app_protocol = "postgres"`: the startup packet
//! (protocol version, user, database; an SSLRequest, a GSSENCRequest or a
//! CancelRequest), then typed messages each with a length that must be
//! consistent and at most `pg_max_message`. Pure: bytes in, frames out; the
//! relay decides what to do with them.

pub mod read_only;
pub mod session;

/// The rule a login refusal names (pg_users, pg_databases, replication).
pub const LOGIN_RULE: &str = "R5.pg-login";

/// The protocol version a startup message must ask for (3.0).
pub const PROTOCOL_3: u32 = 196_608;
/// The code of an SSLRequest in place of a version.
pub const SSL_REQUEST: u32 = 80_877_103;
/// The code of a GSSENCRequest.
pub const GSSENC_REQUEST: u32 = 80_877_104;
/// The code of a CancelRequest.
pub const CANCEL_REQUEST: u32 = 80_877_102;
/// The largest startup packet read (the server's own limit is 10,000).
pub const MAX_STARTUP: usize = 10_000;

/// What a client's first packet is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Startup {
    /// A startup message: its parameters (user, database, options...).
    Start {
        /// `user`.
        user: String,
        /// `database` (the user's name when not given, as the server does).
        database: String,
        /// Every parameter, in order.
        params: Vec<(String, String)>,
    },
    /// Asks for TLS.
    Ssl,
    /// Asks for GSSAPI encryption.
    Gssenc,
    /// Cancels a query of another connection.
    Cancel,
}

/// Why bytes are not the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Byte offset in the stream.
    pub offset: u64,
    /// What is wrong.
    pub reason: String,
}

/// A whole packet, or not yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Read<T> {
    /// A packet and how many bytes it took.
    Got(T, usize),
    /// More bytes are needed.
    NeedMore,
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads the client's first packet from `buf` (bytes at stream offset 0).
///
/// # Errors
/// When it cannot be a startup packet.
pub fn startup(buf: &[u8]) -> Result<Read<Startup>, Violation> {
    let bad = |offset: u64, reason: &str| Violation {
        offset,
        reason: reason.to_owned(),
    };
    if buf.len() < 8 {
        return Ok(Read::NeedMore);
    }
    let len = be32(buf) as usize;
    if !(8..=MAX_STARTUP).contains(&len) {
        return Err(bad(0, "the startup packet's length is out of range"));
    }
    let code = be32(&buf[4..]);
    match code {
        SSL_REQUEST | GSSENC_REQUEST if len != 8 => {
            return Err(bad(0, "an SSLRequest or GSSENCRequest is 8 bytes"));
        }
        SSL_REQUEST => return Ok(Read::Got(Startup::Ssl, 8)),
        GSSENC_REQUEST => return Ok(Read::Got(Startup::Gssenc, 8)),
        CANCEL_REQUEST if len != 16 => return Err(bad(0, "a CancelRequest is 16 bytes")),
        CANCEL_REQUEST => {
            return if buf.len() < 16 {
                Ok(Read::NeedMore)
            } else {
                Ok(Read::Got(Startup::Cancel, 16))
            };
        }
        PROTOCOL_3 => {}
        _ => return Err(bad(4, "not protocol version 3.0")),
    }
    if buf.len() < len {
        return Ok(Read::NeedMore);
    }
    // Name, value pairs of NUL-terminated strings, then a final NUL.
    let body = &buf[8..len];
    let cstr = |from: usize| -> Option<(&[u8], usize)> {
        let end = body[from..].iter().position(|b| *b == 0)?;
        Some((&body[from..from + end], from + end + 1))
    };
    let mut params = Vec::new();
    let mut pos = 0;
    loop {
        let Some((name, next)) = cstr(pos) else {
            return Err(bad(
                8 + pos as u64,
                "the startup parameters do not end with a NUL",
            ));
        };
        if name.is_empty() {
            if next != body.len() {
                return Err(bad(
                    8 + pos as u64,
                    "bytes after the startup parameters' end",
                ));
            }
            break;
        }
        let Some((value, after)) = cstr(next) else {
            return Err(bad(8 + next as u64, "a startup parameter without a value"));
        };
        let (Ok(n), Ok(v)) = (std::str::from_utf8(name), std::str::from_utf8(value)) else {
            return Err(bad(8 + pos as u64, "a startup parameter that is not UTF-8"));
        };
        params.push((n.to_owned(), v.to_owned()));
        pos = after;
    }
    let get = |k: &str| params.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let Some(user) = get("user").filter(|u| !u.is_empty()) else {
        return Err(bad(8, "the startup message names no user"));
    };
    let database = get("database")
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    Ok(Read::Got(
        Startup::Start {
            user,
            database,
            params,
        },
        len,
    ))
}

/// Who may log in through a service, and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Login {
    /// Users allowed (none: any).
    pub users: Vec<String>,
    /// Databases allowed (none: any).
    pub databases: Vec<String>,
    /// `pg_read_only`: no replication connection, and the server session
    /// starts with [`READ_ONLY_SETTINGS`].
    pub read_only: bool,
}

/// The startup parameters a read-only service lets through (names compared
/// case-insensitively); a login with any other (`options`, a setting) is
/// refused, so a client cannot start its session with settings of its own.
pub const READ_ONLY_PARAMETERS: &[&str] = &[
    "user",
    "database",
    "application_name",
    "client_encoding",
    "datestyle",
    "timezone",
    "intervalstyle",
    "extra_float_digits",
    "search_path",
];

/// The settings a read-only service's server sessions start with, whatever
/// the client asked: writes refused by the server itself, and the statement
/// text lexed as the gateway's parser lexes it (backslashes literal in
/// strings; UTF-8, so no client encoding such as GBK or BIG5 can hide a
/// backslash inside a character the parser saw as two).
pub const READ_ONLY_SETTINGS: &[(&str, &str)] = &[
    ("default_transaction_read_only", "on"),
    ("standard_conforming_strings", "on"),
    ("client_encoding", "UTF8"),
];

/// Checks a startup message against `login`; the startup message to send
/// the server.
///
/// # Errors
/// Why the login is refused (for the client's FATAL error and the audit).
pub fn login(
    user: &str,
    database: &str,
    params: &[(String, String)],
    login: &Login,
) -> Result<Vec<u8>, String> {
    if !login.users.is_empty() && !login.users.iter().any(|u| u == user) {
        return Err(format!("user {user:?} is not in this service's pg_users"));
    }
    if !login.databases.is_empty() && !login.databases.iter().any(|d| d == database) {
        return Err(format!(
            "database {database:?} is not in this service's pg_databases"
        ));
    }
    let mut out: Vec<(&str, &str)> = Vec::new();
    for (k, v) in params {
        if login.read_only && k == "replication" {
            return Err("a replication connection through a read-only service".into());
        }
        if login.read_only
            && !READ_ONLY_PARAMETERS
                .iter()
                .any(|name| k.eq_ignore_ascii_case(name))
        {
            return Err(format!(
                "startup parameter {k:?} is not allowed through a read-only service"
            ));
        }
        // Setting names are case-insensitive to the server.
        if login.read_only
            && READ_ONLY_SETTINGS
                .iter()
                .any(|(name, _)| k.eq_ignore_ascii_case(name))
        {
            continue;
        }
        out.push((k, v));
    }
    if login.read_only {
        // Startup parameters other than user, database and options are
        // settings, applied after `options`: these last of all.
        out.extend(READ_ONLY_SETTINGS.iter().copied());
    }
    Ok(startup_message(&out))
}

/// A startup message (protocol 3.0) with `params`.
pub fn startup_message(params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = PROTOCOL_3.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut out = u32::try_from(body.len() + 4)
        .unwrap_or(u32::MAX)
        .to_be_bytes()
        .to_vec();
    out.extend(body);
    out
}

/// A typed message: its type byte and its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// `Q` (query), `P` (parse), `X` (terminate)...
    pub kind: u8,
    /// The body, after the length.
    pub body: &'a [u8],
}

/// Reads one typed message from `buf`, at most `max` bytes long.
///
/// # Errors
/// When its length is less than 4 or over `max`.
pub fn message(buf: &[u8], max: usize, offset: u64) -> Result<Read<Message<'_>>, Violation> {
    if buf.len() < 5 {
        return Ok(Read::NeedMore);
    }
    let len = be32(&buf[1..]) as usize;
    if len < 4 {
        return Err(Violation {
            offset: offset + 1,
            reason: "a message length under 4".into(),
        });
    }
    if len > max {
        return Err(Violation {
            offset: offset + 1,
            reason: format!("a {len}-byte message, more than pg_max_message ({max})"),
        });
    }
    if buf.len() < 1 + len {
        return Ok(Read::NeedMore);
    }
    Ok(Read::Got(
        Message {
            kind: buf[0],
            body: &buf[5..1 + len],
        },
        1 + len,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_packet(params: &[(&str, &str)]) -> Vec<u8> {
        startup_message(params)
    }

    #[test]
    fn a_login_is_checked_and_made_read_only() {
        let params = vec![
            ("user".to_owned(), "reports".to_owned()),
            ("database".to_owned(), "population".to_owned()),
            ("Client_Encoding".to_owned(), "GBK".to_owned()),
        ];
        let open = Login::default();
        let sent = login("reports", "population", &params, &open).expect("anyone");
        assert_eq!(startup(&sent).map(|r| matches!(r, Read::Got(..))), Ok(true));
        let strict = Login {
            users: vec!["reports".into()],
            databases: vec!["population".into()],
            read_only: true,
        };
        let sent = login("reports", "population", &params, &strict).expect("listed");
        let Ok(Read::Got(Startup::Start { params: p, .. }, _)) = startup(&sent) else {
            panic!("a startup message");
        };
        for (name, value) in READ_ONLY_SETTINGS {
            let set: Vec<_> = p
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .collect();
            assert_eq!(set.len(), 1, "{name}: {p:?}");
            assert_eq!(set[0].1, *value, "the client's own {name} is replaced");
        }
        assert!(login("admin", "population", &params, &strict).is_err());
        assert!(login("reports", "postgres", &params, &strict).is_err());
        let mut repl = params.clone();
        repl.push(("replication".into(), "database".into()));
        assert!(login("reports", "population", &repl, &strict).is_err());
        for (k, v) in [
            ("options", "-c standard_conforming_strings=off"),
            ("standard_conforming_strings", "off"),
            ("default_transaction_read_only", "off"),
            ("session_preload_libraries", "auto_explain"),
        ] {
            let mut p = params.clone();
            p.push((k.into(), v.into()));
            let e = login("reports", "population", &p, &strict).expect_err(k);
            assert!(e.contains("not allowed through a read-only service"), "{e}");
            assert!(
                login("reports", "population", &p, &open).is_ok(),
                "{k}: only read-only"
            );
        }
    }

    #[test]
    fn a_startup_message_gives_user_and_database() {
        let p = startup_packet(&[
            ("user", "reports"),
            ("database", "population"),
            ("application_name", "psql"),
        ]);
        let Ok(Read::Got(
            Startup::Start {
                user,
                database,
                params,
            },
            n,
        )) = startup(&p)
        else {
            panic!("{:?}", startup(&p));
        };
        assert_eq!(
            (user.as_str(), database.as_str(), n, params.len()),
            ("reports", "population", p.len(), 3)
        );
        let p = startup_packet(&[("user", "reports")]);
        assert!(
            matches!(startup(&p), Ok(Read::Got(Startup::Start { database, .. }, _)) if database == "reports")
        );
        assert_eq!(startup(&p[..10]), Ok(Read::NeedMore));
    }

    #[test]
    fn ssl_gssenc_and_cancel_requests_are_told_apart() {
        let ssl = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
        assert_eq!(startup(&ssl), Ok(Read::Got(Startup::Ssl, 8)));
        let gss = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
        assert_eq!(startup(&gss), Ok(Read::Got(Startup::Gssenc, 8)));
        let mut cancel = vec![0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e];
        cancel.extend([0; 8]);
        assert_eq!(startup(&cancel), Ok(Read::Got(Startup::Cancel, 16)));
    }

    #[test]
    fn garbage_and_oversized_startups_are_refused() {
        assert!(startup(b"GET / HTTP/1.1\r\n").is_err());
        assert!(
            startup(&[0, 0, 0xff, 0xff, 0, 3, 0, 0]).is_err(),
            "too long"
        );
        assert!(startup(&[0, 0, 0, 8, 0, 2, 0, 0]).is_err(), "protocol 2");
        let mut no_user = startup_packet(&[("database", "x")]);
        assert_eq!(
            startup(&no_user).expect_err("no user").reason,
            "the startup message names no user"
        );
        let n = no_user.len();
        no_user[n - 1] = b'x';
        assert!(startup(&no_user).is_err(), "no final NUL");
    }

    #[test]
    fn messages_are_framed_and_capped() {
        let mut q = vec![b'Q', 0, 0, 0, 14];
        q.extend_from_slice(b"SELECT 1;\0");
        let Ok(Read::Got(m, n)) = message(&q, 1 << 20, 0) else {
            panic!("a query");
        };
        assert_eq!((m.kind, m.body, n), (b'Q', &b"SELECT 1;\0"[..], 15));
        assert_eq!(message(&q[..6], 1 << 20, 0), Ok(Read::NeedMore));
        assert!(message(&[b'Q', 0, 0, 0, 3], 1 << 20, 0).is_err());
        let big = [b'Q', 0, 0x20, 0, 0];
        assert!(
            message(&big, 1 << 20, 100)
                .expect_err("too big")
                .reason
                .contains("pg_max_message")
        );
    }
}

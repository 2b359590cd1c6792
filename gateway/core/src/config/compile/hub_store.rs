//! `[hub] store` and `[hub.postgres]`: where a hub keeps its state.
//!
//! The connection string is libpq's `key = value` form, parsed here so that
//! `gatewayd check` finds every mistake before a hub starts; the engine builds
//! its driver's configuration from the checked [`PgStore`], never from the
//! text. A password is never accepted in the config (neither in `connect` nor
//! as a key): it comes from a file or the environment.

use super::*;

/// The most connections one hub's pool may hold.
const MAX_POOL: u32 = 1_000;
/// Connections of a hub's pool when `pool` is not given.
const DEFAULT_POOL: u32 = 8;
/// The PostgreSQL port when `port` is not given.
const DEFAULT_PORT: u16 = 5432;
/// Seconds one connection attempt may take when `connect_timeout` is not given.
const DEFAULT_CONNECT_TIMEOUT_S: u64 = 5;
/// The longest connection string read.
const MAX_CONNECT_LEN: usize = 4096;

/// One `key = value` of a libpq connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Param {
    /// The key.
    pub key: String,
    /// The value, unquoted.
    pub value: String,
}

/// Splits a libpq connection string (`host=a,b port=5432 dbname='x y'`):
/// keys and `=` with optional spaces around it; a value is a single-quoted
/// string (`\'` and `\\` escaped) or runs to the next space.
///
/// # Errors
/// What is wrong, and where (a byte offset into `text`).
pub fn conninfo(text: &str) -> Result<Vec<Param>, (usize, String)> {
    if text.len() > MAX_CONNECT_LEN {
        return Err((0, format!("longer than {MAX_CONNECT_LEN} bytes")));
    }
    let b = text.as_bytes();
    let mut i = 0;
    let mut out = Vec::new();
    let skip_space = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        if i == b.len() {
            return Ok(out);
        }
        let start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &text[start..i];
        if key.is_empty() {
            return Err((start, "a value without a key before it".into()));
        }
        skip_space(&mut i);
        if i == b.len() || b[i] != b'=' {
            return Err((start, format!("{key:?} has no \"=\" after it")));
        }
        i += 1;
        skip_space(&mut i);
        let mut value = Vec::new();
        if i < b.len() && b[i] == b'\'' {
            let open = i;
            i += 1;
            loop {
                match b.get(i) {
                    None => return Err((open, format!("the value of {key} has no closing '"))),
                    Some(b'\'') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') if i + 1 < b.len() => {
                        value.push(b[i + 1]);
                        i += 2;
                    }
                    Some(&c) => {
                        value.push(c);
                        i += 1;
                    }
                }
            }
        } else {
            while i < b.len() && !b[i].is_ascii_whitespace() {
                if b[i] == b'\\' && i + 1 < b.len() {
                    i += 1;
                }
                value.push(b[i]);
                i += 1;
            }
        }
        let value = String::from_utf8(value).map_err(|_| (start, "not UTF-8".to_owned()))?;
        if value.contains('\0') {
            return Err((start, format!("the value of {key} holds a NUL")));
        }
        out.push(Param {
            key: key.to_owned(),
            value,
        });
    }
}

/// What the connection string said, before files and secrets are added.
#[derive(Debug, Default)]
struct Connect {
    hosts: Vec<String>,
    ports: Vec<String>,
    dbname: Option<String>,
    user: Option<String>,
    sslmode: Option<String>,
    connect_timeout: Option<String>,
    application_name: Option<String>,
}

impl Compiler<'_> {
    /// `[hub] store` with `[hub.postgres]`; `Some(None)` for SQLite.
    pub(super) fn hub_store(&mut self, h: &RawHub) -> Option<Option<Box<PgStore>>> {
        let postgres = match &h.store {
            None => false,
            Some(s) => self.choice(s, "hub.store", &[("sqlite", false), ("postgres", true)])?,
        };
        match (&h.postgres, postgres) {
            (None, false) => return Some(None),
            (Some(p), false) => {
                self.error(
                    &p.span(),
                    "hub.postgres is set, but the hub keeps its state in SQLite",
                    "add store = \"postgres\" to [hub], or remove [hub.postgres]",
                );
                return None;
            }
            (None, true) => {
                let span = h.store.as_ref().map(Spanned::span).unwrap_or(0..0);
                self.error(
                    &span,
                    "hub.store = \"postgres\" needs a [hub.postgres] section",
                    "add [hub.postgres] with connect = \"host=... dbname=... user=...\" and ca",
                );
                return None;
            }
            (Some(_), true) => {}
        }
        for (key, s) in [("hub.registry", &h.registry), ("hub.sink", &h.sink)] {
            if let Some(s) = s {
                self.error(
                    &s.span(),
                    format!("{key} names a SQLite file, but the hub keeps its state in PostgreSQL"),
                    format!("remove {key}: with store = \"postgres\" the registry and the sink live in the database"),
                );
            }
        }
        let p = h.postgres.as_ref()?.get_ref();
        self.pg_store(p)
    }

    fn pg_store(&mut self, p: &RawPgStore) -> Option<Option<Box<PgStore>>> {
        let span = p.connect.span();
        if let Some(pw) = &p.password {
            self.error(
                &pw.span(),
                "hub.postgres.password: a password is never written in the config",
                "put it in a file readable by the daemon only and set password_file, or set password_env to the name of an environment variable",
            );
        }
        let params = match conninfo(p.connect.get_ref()) {
            Ok(v) => v,
            Err((at, message)) => {
                self.error(
                    &span,
                    format!("hub.postgres.connect: {message} (at byte {at})"),
                    "write libpq's key = value form: \"host=db1,db2 port=5432 dbname=gateway user=gatewayd\"",
                );
                return None;
            }
        };
        let mut c = Connect::default();
        let mut ok = true;
        for Param { key, value } in params {
            let slot = match key.as_str() {
                "host" => {
                    c.hosts = value.split(',').map(str::to_owned).collect();
                    continue;
                }
                "port" => {
                    c.ports = value.split(',').map(str::to_owned).collect();
                    continue;
                }
                "dbname" => &mut c.dbname,
                "user" => &mut c.user,
                "sslmode" => &mut c.sslmode,
                "connect_timeout" => &mut c.connect_timeout,
                "application_name" => &mut c.application_name,
                "target_session_attrs" => {
                    if value != "read-write" {
                        ok = false;
                        self.error(
                            &span,
                            format!("hub.postgres.connect: target_session_attrs={value}: a hub writes, so it must reach the server that accepts writes"),
                            "write target_session_attrs=read-write (the default), or leave it out",
                        );
                    }
                    continue;
                }
                "password" | "passfile" => {
                    ok = false;
                    self.error(
                        &span,
                        format!("hub.postgres.connect: {key} is never written in the config"),
                        "remove it; set password_file (a file readable by the daemon only) or password_env in [hub.postgres]",
                    );
                    continue;
                }
                "sslrootcert" => {
                    ok = false;
                    self.error(
                        &span,
                        "hub.postgres.connect: sslrootcert is set in [hub.postgres] as ca",
                        "remove sslrootcert; write ca = \"/etc/gatewayd/pg-ca.pem\" in [hub.postgres]",
                    );
                    continue;
                }
                other => {
                    ok = false;
                    self.error(
                        &span,
                        format!("hub.postgres.connect: unknown or unsupported parameter {other:?}"),
                        "the hub reads host, port, dbname, user, sslmode, target_session_attrs, connect_timeout and application_name",
                    );
                    continue;
                }
            };
            *slot = Some(value);
        }
        let hosts = self.pg_hosts(&span, &c);
        let need = |c: &mut Self, v: Option<String>, key: &str, example: &str| {
            let v = v.filter(|v| !v.is_empty());
            if v.is_none() {
                c.error(
                    &span,
                    format!("hub.postgres.connect: {key} is missing"),
                    format!("add {key}={example}"),
                );
            }
            v
        };
        let dbname = need(self, c.dbname.take(), "dbname", "gateway");
        let user = need(self, c.user.take(), "user", "gatewayd");
        let connect_timeout = match c.connect_timeout.as_deref() {
            None => Some(Duration::from_secs(DEFAULT_CONNECT_TIMEOUT_S)),
            Some(t) => match t.parse::<u64>() {
                Ok(s @ 1..=300) => Some(Duration::from_secs(s)),
                _ => {
                    self.error(
                        &span,
                        format!("hub.postgres.connect: connect_timeout={t} is not a number of seconds from 1 to 300"),
                        format!("write connect_timeout={DEFAULT_CONNECT_TIMEOUT_S}, or leave it out"),
                    );
                    None
                }
            },
        };
        let tls = self.pg_tls(p, &span, c.sslmode.as_deref(), hosts.as_deref());
        let password = self.pg_password(p);
        let pool = self.positive(p.pool.as_ref(), "hub.postgres.pool", DEFAULT_POOL);
        if let (Some(n), Some(s)) = (pool, &p.pool) {
            if n > MAX_POOL {
                self.error(
                    &s.span(),
                    format!("hub.postgres.pool: {n} connections is more than {MAX_POOL}"),
                    "a hub needs a few connections per core; PostgreSQL's max_connections is shared by every hub",
                );
                return None;
            }
        }
        if !ok {
            return None;
        }
        Some(Some(Box::new(PgStore {
            hosts: hosts?,
            dbname: dbname?,
            user: user?,
            tls: tls?,
            password: password?,
            pool: pool?,
            connect_timeout: connect_timeout?,
            application_name: c.application_name.unwrap_or_else(|| "gatewayd".to_owned()),
        })))
    }

    fn pg_hosts(&mut self, span: &Range<usize>, c: &Connect) -> Option<Vec<PgHost>> {
        if c.hosts.is_empty() {
            self.error(
                span,
                "hub.postgres.connect: host is missing",
                "add host=db1.example (several: host=db1,db2, the hub takes the one that accepts writes)",
            );
            return None;
        }
        let ports: Vec<u16> = match c.ports.as_slice() {
            [] => vec![DEFAULT_PORT; c.hosts.len()],
            ports => {
                let parsed: Option<Vec<u16>> = ports
                    .iter()
                    .map(|p| p.parse::<u16>().ok().filter(|p| *p > 0))
                    .collect();
                match parsed {
                    Some(p) if p.len() == 1 => vec![p[0]; c.hosts.len()],
                    Some(p) if p.len() == c.hosts.len() => p,
                    _ => {
                        self.error(
                            span,
                            format!(
                                "hub.postgres.connect: port={} is not one port, or one per host (host names {})",
                                c.ports.join(","),
                                c.hosts.len()
                            ),
                            "write port=5432, or port=5432,5433 for host=db1,db2",
                        );
                        return None;
                    }
                }
            }
        };
        let mut out = Vec::new();
        for (host, port) in c.hosts.iter().zip(ports) {
            if host.starts_with('/') {
                out.push(PgHost::Unix {
                    dir: PathBuf::from(host),
                    port,
                });
            } else if !host.is_empty()
                && host
                    .chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ".-_:".contains(ch))
            {
                out.push(PgHost::Tcp {
                    host: host.clone(),
                    port,
                });
            } else {
                self.error(
                    span,
                    format!("hub.postgres.connect: host {host:?} is not a host name, an address or a socket directory"),
                    "write a name (db1.gov.example), an address (10.1.2.3, fd00::5) or an absolute directory (/run/postgresql)",
                );
                return None;
            }
        }
        Some(out)
    }

    fn pg_tls(
        &mut self,
        p: &RawPgStore,
        span: &Range<usize>,
        sslmode: Option<&str>,
        hosts: Option<&[PgHost]>,
    ) -> Option<PgTlsMode> {
        match sslmode.unwrap_or("verify-full") {
            "verify-full" => {
                let Some(ca) = &p.ca else {
                    self.error(
                        span,
                        "hub.postgres: sslmode=verify-full (the default) needs the server's CA",
                        "add ca = \"/etc/gatewayd/pg-ca.pem\" to [hub.postgres] (the certificate the database server's certificate chains to)",
                    );
                    return None;
                };
                if hosts.is_some_and(|h| h.iter().any(|h| matches!(h, PgHost::Unix { .. }))) {
                    self.error(
                        span,
                        "hub.postgres.connect: a Unix socket does not carry TLS",
                        "write sslmode=disable for a socket on this machine, or connect by host name with TLS",
                    );
                    return None;
                }
                let ca = self.file(ca, "hub.postgres.ca")?;
                Some(PgTlsMode::VerifyFull { ca })
            }
            "disable" => {
                let remote: Vec<String> = hosts
                    .unwrap_or_default()
                    .iter()
                    .filter(|h| !h.is_local())
                    .map(|h| match h {
                        PgHost::Tcp { host, .. } => host.clone(),
                        PgHost::Unix { dir, .. } => dir.display().to_string(),
                    })
                    .collect();
                if !remote.is_empty() {
                    self.error(
                        span,
                        format!(
                            "hub.postgres.connect: sslmode=disable to {}: the registry and the sink would cross the network in clear",
                            remote.join(", ")
                        ),
                        "use sslmode=verify-full with ca (the default); disable is for a Unix socket or a loopback address only",
                    );
                    return None;
                }
                self.warning(
                    span,
                    "hub.postgres.connect: sslmode=disable: no TLS to the database (accepted for a Unix socket or a loopback address only)",
                    "use verify-full with ca when the database moves to another machine",
                );
                if let Some(ca) = &p.ca {
                    self.warning(
                        &ca.span(),
                        "hub.postgres.ca is not used with sslmode=disable",
                        "remove ca, or use sslmode=verify-full",
                    );
                }
                Some(PgTlsMode::Disable)
            }
            other => {
                let why = match other {
                    "allow" | "prefer" | "require" | "verify-ca" => {
                        "it does not check that the server is the one named in host"
                    }
                    _ => "it is not a libpq sslmode",
                };
                self.error(
                    span,
                    format!("hub.postgres.connect: sslmode={other} is refused: {why}"),
                    "write sslmode=verify-full (the default, with ca), or disable for a Unix socket or a loopback address",
                );
                None
            }
        }
    }

    fn pg_password(&mut self, p: &RawPgStore) -> Option<PgPassword> {
        match (&p.password_file, &p.password_env) {
            (Some(_), Some(e)) => {
                self.error(
                    &e.span(),
                    "hub.postgres: both password_file and password_env are set",
                    "keep one of them",
                );
                None
            }
            (Some(f), None) => self
                .file(f, "hub.postgres.password_file")
                .map(PgPassword::File),
            (None, Some(e)) => {
                let name = e.get_ref();
                let valid = !name.is_empty()
                    && !name.starts_with(|c: char| c.is_ascii_digit())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    self.error(
                        &e.span(),
                        format!("hub.postgres.password_env: {name:?} is not an environment variable's name"),
                        "write a name such as GATEWAYD_PG_PASSWORD (letters, digits, _)",
                    );
                    return None;
                }
                Some(PgPassword::Env(name.clone()))
            }
            (None, None) => Some(PgPassword::None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(s: &str) -> Vec<(String, String)> {
        conninfo(s)
            .expect("parses")
            .into_iter()
            .map(|p| (p.key, p.value))
            .collect()
    }

    #[test]
    fn connection_strings_split_as_libpq_does() {
        assert_eq!(
            kv("host=db1,db2  port = 5432 dbname='a b\\'c' user=x\\ y"),
            [
                ("host".into(), "db1,db2".into()),
                ("port".into(), "5432".into()),
                ("dbname".into(), "a b'c".into()),
                ("user".into(), "x y".into()),
            ]
        );
        assert_eq!(kv("   "), []);
        assert!(conninfo("host").is_err());
        assert!(conninfo("=x").is_err());
        assert!(conninfo("dbname='open").is_err());
        assert!(conninfo(&"a=b ".repeat(2000)).is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_text_is_split_or_refused_without_panicking(s in ".{0,200}") {
            let _ = conninfo(&s);
        }
    }
}

//! `[hub] store` and `[hub.postgres]`: a hub's state in PostgreSQL, each
//! mistake located, a password never accepted in the config.

use gateway_core::config::compile::compile;
use gateway_core::config::{PgHost, PgPassword, PgTlsMode};

/// A loopback hub whose `[hub]` ends with `extra` (line 12 on), then `tail`.
fn hub(extra: &str, tail: &str) -> String {
    format!(
        r#"[node]
id = "hub-01"
role = "hub"
state_dir = "/var/lib/gatewayd"
[hub]
listen = "127.0.0.1:7443"
api = "127.0.0.1:9443"
ca_cert = "/etc/gatewayd/ca.pem"
ca_key = "/etc/gatewayd/ca.key"
cert = "/etc/gatewayd/hub.pem"
key = "/etc/gatewayd/hub.key"
{extra}
[[zone]]
name = "extranet"
kind = "extranet"
level = 2
networks = ["127.0.0.0/24"]
[admin]
listen = "127.0.0.1:9601"
{tail}"#
    )
}

fn errors(src: &str) -> Vec<String> {
    let (config, diags) = compile(src);
    assert!(config.is_none(), "refused: {src}");
    diags
        .iter()
        .filter(|d| d.is_error())
        .map(|d| {
            format!(
                "{} {} | {}",
                d.location.line,
                d.message,
                d.hint.clone().unwrap_or_default()
            )
        })
        .collect()
}

fn pg(section: &str) -> String {
    hub(
        "store = \"postgres\"",
        &format!("[hub.postgres]\n{section}"),
    )
}

#[test]
fn sqlite_stays_the_default() {
    let (c, d) = compile(&hub("", ""));
    let c = c.unwrap_or_else(|| panic!("{d:?}"));
    assert!(c.hub().expect("hub").settings.postgres.is_none());
    let (c, d) = compile(&hub("store = \"sqlite\"", ""));
    assert!(c.is_some(), "{d:?}");
}

#[test]
fn a_host_list_with_tls_and_a_password_file_is_read() {
    let (c, d) = compile(&pg(
        "connect = \"host=db1.gov.example,db2.gov.example port=5432,5433 dbname=gateway user=gatewayd target_session_attrs=read-write connect_timeout=3\"\nca = \"/etc/gatewayd/pg-ca.pem\"\npassword_file = \"/etc/gatewayd/pg.password\"\npool = 16\n",
    ));
    let c = c.unwrap_or_else(|| panic!("{d:?}"));
    let s = c
        .hub()
        .expect("hub")
        .settings
        .postgres
        .as_deref()
        .expect("postgres");
    assert_eq!(
        s.hosts,
        [
            PgHost::Tcp {
                host: "db1.gov.example".into(),
                port: 5432
            },
            PgHost::Tcp {
                host: "db2.gov.example".into(),
                port: 5433
            },
        ]
    );
    assert_eq!(
        (s.dbname.as_str(), s.user.as_str(), s.pool),
        ("gateway", "gatewayd", 16)
    );
    assert_eq!(s.connect_timeout.as_secs(), 3);
    assert!(matches!(&s.tls, PgTlsMode::VerifyFull { ca } if ca.path.ends_with("pg-ca.pem")));
    assert!(matches!(&s.password, PgPassword::File(f) if f.path.ends_with("pg.password")));
    // The CA and the password file must exist when the hub runs.
    let paths: Vec<_> = c.runtime_paths().iter().map(|p| p.key).collect();
    assert!(paths.contains(&"hub.postgres.ca") && paths.contains(&"hub.postgres.password_file"));
}

#[test]
fn a_unix_socket_without_tls_is_accepted_with_a_warning() {
    let (c, d) = compile(&pg(
        "connect = \"host=/run/postgresql dbname=gateway user=gatewayd sslmode=disable\"\npassword_env = \"GATEWAYD_PG_PASSWORD\"\n",
    ));
    let c = c.unwrap_or_else(|| panic!("{d:?}"));
    let s = c
        .hub()
        .expect("hub")
        .settings
        .postgres
        .as_deref()
        .expect("postgres");
    assert_eq!(
        s.hosts,
        [PgHost::Unix {
            dir: "/run/postgresql".into(),
            port: 5432
        }]
    );
    assert_eq!(s.tls, PgTlsMode::Disable);
    assert_eq!(s.password, PgPassword::Env("GATEWAYD_PG_PASSWORD".into()));
    assert!(
        d.iter()
            .any(|d| !d.is_error() && d.message.contains("no TLS")),
        "{d:?}"
    );
}

#[test]
fn a_password_in_the_config_is_refused_wherever_it_is_written() {
    let e = errors(&pg(
        "connect = \"host=db1 dbname=gateway user=gatewayd password=secret\"\nca = \"/etc/gatewayd/pg-ca.pem\"\n",
    ));
    assert!(
        e.iter()
            .any(|e| e.starts_with("21 ") && e.contains("password is never written")),
        "{e:?}"
    );
    let e = errors(&pg(
        "connect = \"host=db1 dbname=gateway user=gatewayd\"\nca = \"/etc/gatewayd/pg-ca.pem\"\npassword = \"secret\"\n",
    ));
    assert!(
        e.iter().any(|e| e.starts_with("23 ")
            && e.contains("never written in the config")
            && e.contains("password_file")),
        "{e:?}"
    );
}

#[test]
fn tls_off_to_another_machine_and_weak_modes_are_refused() {
    let e = errors(&pg(
        "connect = \"host=10.1.2.3 dbname=gateway user=gatewayd sslmode=disable\"\n",
    ));
    assert!(
        e.iter()
            .any(|e| e.contains("sslmode=disable to 10.1.2.3") && e.contains("in clear")),
        "{e:?}"
    );
    let e = errors(&pg(
        "connect = \"host=db1 dbname=gateway user=gatewayd sslmode=require\"\nca = \"/etc/gatewayd/pg-ca.pem\"\n",
    ));
    assert!(
        e.iter().any(|e| e.contains("sslmode=require is refused")),
        "{e:?}"
    );
    let e = errors(&pg("connect = \"host=db1 dbname=gateway user=gatewayd\"\n"));
    assert!(
        e.iter().any(|e| e.contains("needs the server's CA")),
        "{e:?}"
    );
    let e = errors(&pg(
        "connect = \"host=db1 dbname=gateway user=gatewayd target_session_attrs=any\"\nca = \"/etc/gatewayd/pg-ca.pem\"\n",
    ));
    assert!(
        e.iter()
            .any(|e| e.contains("must reach the server that accepts writes")),
        "{e:?}"
    );
}

#[test]
fn each_mistake_of_the_section_is_located() {
    let e = errors(&pg(
        "connect = \"host=db1 user=gatewayd port=5432,5433,1 bogus=1\"\nca = \"ca.pem\"\npool = 0\n",
    ));
    for want in [
        "21 hub.postgres.connect: unknown or unsupported parameter \"bogus\"",
        "21 hub.postgres.connect: dbname is missing",
        "21 hub.postgres.connect: port=5432,5433,1 is not one port, or one per host",
        "22 hub.postgres.ca: \"ca.pem\" is not an absolute path",
        "23 hub.postgres.pool: 0 is not a positive number",
    ] {
        assert!(e.iter().any(|e| e.starts_with(want)), "{want}: {e:?}");
    }
    let e = errors(&pg("connect = \"host='db1\"\n"));
    assert!(e.iter().any(|e| e.contains("no closing '")), "{e:?}");
    // The section without the store, the store without the section, and
    // SQLite files with PostgreSQL.
    let e = errors(&hub(
        "",
        "[hub.postgres]\nconnect = \"host=db1 dbname=g user=u\"\n",
    ));
    assert!(
        e.iter().any(|e| e.contains("add store = \"postgres\"")),
        "{e:?}"
    );
    let e = errors(&hub("store = \"postgres\"", ""));
    assert!(
        e.iter()
            .any(|e| e.starts_with("12 ") && e.contains("needs a [hub.postgres] section")),
        "{e:?}"
    );
    let e = errors(&hub(
        "store = \"postgres\"\nregistry = \"/srv/fleet.sqlite\"",
        "[hub.postgres]\nconnect = \"host=/run/postgresql dbname=g user=u sslmode=disable\"\n",
    ));
    assert!(
        e.iter()
            .any(|e| e.starts_with("13 ") && e.contains("hub.registry names a SQLite file")),
        "{e:?}"
    );
    let e = errors(&hub("store = \"mysql\"", ""));
    assert!(
        e.iter()
            .any(|e| e.contains("hub.store: unknown value \"mysql\"")),
        "{e:?}"
    );
}

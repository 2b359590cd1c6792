//! A department's database through a level-3 `postgres` service (issue 17):
//! a real PostgreSQL 15 started by the test, reached with `psql` and
//! `pgbench` through a real hub and edge on loopback. Statements audited;
//! `pg_read_only` refusing writes with a readable error; `pg_users` and
//! `pg_databases`; an SSLRequest declined or TLS ended at the gateway;
//! garbage and oversized messages cutting the connection.
//!
//! Needs PostgreSQL 15 (`apt-get install postgresql-15`); skipped without it.

mod net;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use net::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = "/usr/lib/postgresql/15/bin";
/// The legacy zone of edge-b is 127.0.2.0/24: the database lives there.
const DB_HOST: &str = "127.0.2.20";

fn missing() -> Option<String> {
    let need = ["initdb", "postgres", "psql", "pgbench"];
    need.iter()
        .find(|b| !Path::new(BIN).join(b).exists())
        .map(|b| format!("{BIN}/{b} is not installed (apt-get install postgresql-15)"))
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// A command of the server's own (initdb, postgres): as user postgres when
/// the test runs as root (the server refuses root).
fn server_cmd(bin: &str) -> std::process::Command {
    let path = Path::new(BIN).join(bin);
    if is_root() {
        let mut c = std::process::Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        std::process::Command::new(path)
    }
}

/// A PostgreSQL 15 cluster in a temporary directory, on DB_HOST.
struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl Postgres {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("dir");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        for d in [&data, &sock] {
            std::fs::create_dir(d).expect("mkdir");
            if is_root() {
                let pg = nix::unistd::User::from_name("postgres")
                    .expect("users")
                    .expect("a postgres user (the package makes it)");
                std::os::unix::fs::chown(d, Some(pg.uid.as_raw()), Some(pg.gid.as_raw()))
                    .expect("chown");
            }
        }
        let ok = server_cmd("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("initdb");
        assert!(ok.success(), "initdb");
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all raw 127.0.0.0/8 trust\nhost all all 127.0.0.0/8 scram-sha-256\n",
        )
        .expect("hba");
        let port = std::net::TcpListener::bind(format!("{DB_HOST}:0"))
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        // pg_ctl waits until the server accepts connections (-w, at most
        // 30 s) and says why when it does not.
        let options = format!(
            "-k {} -c listen_addresses={DB_HOST} -p {port} -c fsync=off -c max_connections=40",
            sock.display()
        );
        let started = server_cmd("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(&data)
            .args(["-w", "-t", "30", "-o", &options, "-l"])
            .arg(sock.join("server.log"))
            .stdout(Stdio::null())
            .status()
            .expect("pg_ctl");
        assert!(
            started.success(),
            "PostgreSQL did not start: {}",
            std::fs::read_to_string(sock.join("server.log")).unwrap_or_default()
        );
        let pg = Postgres { dir, port };
        pg.sql(
            "postgres",
            "CREATE ROLE reports LOGIN PASSWORD 'reports-pw'; CREATE ROLE admin LOGIN PASSWORD 'admin-pw'; \
             CREATE ROLE raw LOGIN",
        );
        pg.sql("postgres", "CREATE DATABASE population OWNER reports");
        pg.sql(
            "population",
            "SET ROLE reports; CREATE TABLE people (id int PRIMARY KEY, name text); \
             INSERT INTO people VALUES (1, 'Li'), (2, 'Wang'), (3, 'Zhang'); \
             CREATE FUNCTION touch() RETURNS int LANGUAGE sql AS 'UPDATE people SET name = name RETURNING 1'; \
             GRANT SELECT ON people TO raw",
        );
        pg
    }

    fn sock(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn target(&self) -> SocketAddr {
        format!("{DB_HOST}:{}", self.port).parse().expect("addr")
    }

    /// psql straight to the server over its socket, as `user`.
    fn direct(&self, user: &str, db: &str, sql: &str) -> std::process::Output {
        std::process::Command::new(Path::new(BIN).join("psql"))
            .arg("-h")
            .arg(self.sock())
            .args(["-p", &self.port.to_string(), "-U", user, "-d", db])
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .expect("psql")
    }

    fn sql(&self, db: &str, sql: &str) -> String {
        let out = self.direct("postgres", db, sql);
        assert!(
            out.status.success(),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // An immediate shutdown of the whole cluster; pg_ctl waits for it
        // (at most 10 s).
        let _ = server_cmd("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "10"])
            .stdout(Stdio::null())
            .status();
    }
}

/// psql through the gateway at `at`, as `user` to `db`; (ok, stdout, stderr).
async fn psql(
    at: SocketAddr,
    user: &str,
    db: &str,
    ssl: &str,
    sql: &str,
) -> (bool, String, String) {
    psql_with(at, (user, db, ssl), &[], sql).await
}

/// [`psql`] with environment variables (`PGOPTIONS`, `PGCLIENTENCODING`).
async fn psql_with(
    at: SocketAddr,
    (user, db, ssl): (&str, &str, &str),
    env: &[(&str, &str)],
    sql: &str,
) -> (bool, String, String) {
    let password = if user == "admin" {
        "admin-pw"
    } else {
        "reports-pw"
    };
    let conn = format!(
        "host={} port={} user={user} dbname={db} sslmode={ssl} connect_timeout=10",
        at.ip(),
        at.port()
    );
    let out = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::process::Command::new(Path::new(BIN).join("psql"))
            .arg(conn)
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env("PGPASSWORD", password)
            .envs(env.iter().copied())
            .output(),
    )
    .await
    .expect("psql within 30 s")
    .expect("psql");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

/// A hub publishing edge-b's `population-db` (extra service keys `keys`) at
/// level 3; returns the publish address.
async fn level3(pki: &Pki, pg: &Postgres, keys: &'static str) -> (HubNode, EdgeNode, SocketAddr) {
    let hub = start_hub(pki, HubSpec::new("hub-01", 3, &["edge-b/population-db"])).await;
    let edge = start_edge(
        pki,
        EdgeSpec {
            services: vec![(
                "population-db",
                pg.target(),
                "\"extranet\"",
                Some("postgres"),
                None,
            )],
            service_keys: keys,
            ..EdgeSpec::new("edge-b", 2, 3, vec![hub.quic])
        },
    )
    .await;
    ready(&edge).await;
    let at = hub.publish[0];
    (hub, edge, at)
}

fn lines(edge: &EdgeNode, prefix: &str) -> Vec<String> {
    audit_lines(edge.state.path())
        .into_iter()
        .filter(|l| l.starts_with(prefix))
        .collect()
}

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_through_a_level3_postgres_service_is_audited_statement_by_statement() {
    if let Some(why) = missing() {
        println!("skipped: {why}");
        return;
    }
    let pg = Postgres::start();
    let pki = Pki::new();
    let (_hub, edge, at) = level3(&pki, &pg, "").await;
    let (ok, out, err) = psql(
        at,
        "reports",
        "population",
        "prefer",
        "SELECT count(*) FROM people",
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(
        out, "3",
        "the SSLRequest was declined and the login went on in the clear"
    );
    let (ok, _, err) = psql(
        at,
        "reports",
        "population",
        "disable",
        "INSERT INTO people VALUES (4, 'Zhao')",
    )
    .await;
    assert!(ok, "not read-only: writes pass ({err})");
    let (ok, _, err) = psql(at, "reports", "population", "require", "SELECT 1").await;
    assert!(!ok && err.contains("does not support SSL"), "{err}");
    let (ok, _, err) = psql(
        at,
        "reports",
        "population",
        "disable",
        "SELECT * FROM nowhere",
    )
    .await;
    assert!(!ok && err.contains("does not exist"), "{err}");
    wait_for("the statements audited", Duration::from_secs(5), || {
        lines(&edge, "pg.statement").len() >= 3
    })
    .await;
    let opened = lines(&edge, "relay.open");
    assert!(
        opened
            .iter()
            .any(|l| l.contains("user=\"reports\" database=\"population\"")),
        "{opened:?}"
    );
    assert!(!lines(&edge, "pg.login").is_empty());
    let st = lines(&edge, "pg.statement");
    let count = st
        .iter()
        .find(|l| l.contains("statement=\"SELECT count(*) FROM people\""))
        .unwrap_or_else(|| panic!("{st:?}"));
    assert!(
        count.contains(" ok [] ") && count.contains("rows=1 ") && count.contains("duration_ms="),
        "{count}"
    );
    assert!(
        count.contains(&sha256_hex("SELECT count(*) FROM people")),
        "{count}"
    );
    assert!(
        st.iter()
            .any(|l| l.contains("INSERT INTO people") && l.contains("rows=1 ")),
        "{st:?}"
    );
    assert!(
        st.iter()
            .any(|l| l.contains(" error [] ") && l.contains("sqlstate=42P01")),
        "a failed statement is audited with its SQLSTATE: {st:?}"
    );
    assert_eq!(pg.sql("population", "SELECT count(*) FROM people"), "4");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_service_refuses_writes_with_a_readable_error() {
    if let Some(why) = missing() {
        println!("skipped: {why}");
        return;
    }
    let pg = Postgres::start();
    let pki = Pki::new();
    let (_hub, edge, at) = level3(&pki, &pg, "pg_read_only = true\n").await;
    let (ok, out, err) = psql(
        at,
        "reports",
        "population",
        "prefer",
        "SELECT name FROM people ORDER BY id",
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "Li\nWang\nZhang");
    for sql in [
        "INSERT INTO people VALUES (9, 'x')",
        "UPDATE people SET name = 'x'",
        "DELETE FROM people",
        "CREATE TABLE stolen (x int)",
        "DROP TABLE people",
        "SELECT * FROM people FOR UPDATE",
        "SELECT 1; DELETE FROM people",
        "WITH d AS (DELETE FROM people RETURNING *) SELECT * FROM d",
        "SET default_transaction_read_only = off",
        "SELECT set_config('default_transaction_read_only', 'off', false)",
        "SELECT U&\"set\\005Fconfig\"('default_transaction_read_only', 'off', false)",
        "SELECT * FROM ts_stat('SELECT to_tsvector(set_config(''default_transaction_read_only'', ''off'', false))')",
        "EXPLAIN (ANALYSE) SELECT touch()",
        "SELECT ('SELECT to_tsvector(set_config(''default_transaction_read_only'', ''off'', false))'::text).ts_stat",
        "BEGIN",
    ] {
        let (ok, _, err) = psql(at, "reports", "population", "disable", sql).await;
        assert!(!ok, "{sql} was let through");
        assert!(
            err.contains("ERROR:  gateway: refused by R5.pg-read-only")
                && err.contains("read-only"),
            "{sql}: {err}"
        );
    }
    // A client cannot make the server lex a statement otherwise than the
    // parser did: with backslash escapes in strings (PostgreSQL would read a
    // SELECT and then a DELETE here), or a client encoding whose characters
    // can swallow a backslash (GBK).
    let (ok, _, err) = psql_with(
        at,
        ("reports", "population", "disable"),
        &[("PGOPTIONS", "-c standard_conforming_strings=off")],
        "SELECT 'a\\' , ' ; DELETE FROM people; --'",
    )
    .await;
    assert!(
        !ok && err
            .contains("startup parameter \"options\" is not allowed through a read-only service"),
        "{err}"
    );
    let (ok, out, err) = psql_with(
        at,
        ("reports", "population", "disable"),
        &[("PGCLIENTENCODING", "GBK")],
        "SELECT E'中\\' ; DELETE FROM people; --'",
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(
        out, "中' ; DELETE FROM people; --",
        "one SELECT of a string, as the parser read it"
    );
    // What the parser cannot see, the server refuses: the session is read-only.
    let (ok, _, err) = psql(at, "reports", "population", "disable", "SELECT touch()").await;
    assert!(!ok && err.contains("read-only transaction"), "{err}");
    // The extended protocol is held to the same rule.
    let script = pg.dir.path().join("write.sql");
    std::fs::write(&script, "INSERT INTO people VALUES (10, 'y');\n").expect("script");
    let bench = pgbench(
        at,
        &["-n", "-M", "extended", "-t", "1", "-f"],
        Some(&script),
    )
    .await;
    assert!(
        !bench.0 && bench.2.contains("R5.pg-read-only"),
        "{}\n{}",
        bench.1,
        bench.2
    );
    assert_eq!(pg.sql("population", "SELECT count(*) FROM people"), "3");
    assert_eq!(
        pg.sql(
            "population",
            "SELECT count(*) FROM pg_tables WHERE tablename = 'stolen'"
        ),
        "0"
    );
    wait_for("the refusals audited", Duration::from_secs(5), || {
        lines(&edge, "pg.refuse").len() >= 16
    })
    .await;
    let refused = lines(&edge, "pg.refuse");
    assert!(
        refused.iter().all(|l| l.contains("deny [R5.pg-read-only]")),
        "{refused:?}"
    );
    assert!(
        refused
            .iter()
            .any(|l| l.contains("statement=\"DELETE FROM people\"")
                && l.contains("DELETE is not a read")),
        "{refused:?}"
    );
}

/// pgbench through the gateway at `at` to `population` as reports, with
/// `args` (and a script file); (ok, stdout, stderr).
async fn pgbench(at: SocketAddr, args: &[&str], script: Option<&Path>) -> (bool, String, String) {
    let mut c = tokio::process::Command::new(Path::new(BIN).join("pgbench"));
    c.args([
        "-h",
        &at.ip().to_string(),
        "-p",
        &at.port().to_string(),
        "-U",
        "reports",
    ])
    .args(args);
    if let Some(s) = script {
        c.arg(s);
    }
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        c.arg("population").env("PGPASSWORD", "reports-pw").output(),
    )
    .await
    .expect("pgbench within 60 s")
    .expect("pgbench");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_select_only_runs_through_a_read_only_service_every_statement_audited() {
    if let Some(why) = missing() {
        println!("skipped: {why}");
        return;
    }
    let pg = Postgres::start();
    let init = std::process::Command::new(Path::new(BIN).join("pgbench"))
        .arg("-h")
        .arg(pg.sock())
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "reports",
            "-i",
            "-s",
            "1",
            "-q",
            "population",
        ])
        .output()
        .expect("pgbench -i");
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let pki = Pki::new();
    let (_hub, edge, at) = level3(&pki, &pg, "pg_read_only = true\n").await;
    for mode in ["simple", "extended", "prepared"] {
        let (ok, out, err) =
            pgbench(at, &["-n", "-S", "-M", mode, "-c", "2", "-t", "200"], None).await;
        assert!(ok, "{mode}: {out}\n{err}");
        assert!(
            out.contains("number of transactions actually processed: 400/400"),
            "{mode}: {out}"
        );
    }
    wait_for("every select audited", Duration::from_secs(10), || {
        lines(&edge, "pg.statement")
            .iter()
            .filter(|l| l.contains("SELECT abalance FROM pgbench_accounts WHERE aid = "))
            .count()
            >= 1200
    })
    .await;
    assert!(lines(&edge, "pg.refuse").is_empty(), "nothing refused");
    let metrics = http_get(edge.running.admin_addr, "GET", "/metrics").await.1;
    assert!(
        metrics.lines().any(|l| l
            .starts_with("gateway_pg_statements_total{service=\"population-db\",outcome=\"ok\"}")),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_outside_pg_users_and_pg_databases_are_refused_before_the_server() {
    if let Some(why) = missing() {
        println!("skipped: {why}");
        return;
    }
    let pg = Postgres::start();
    let pki = Pki::new();
    let keys = "pg_users = [\"reports\"]\npg_databases = [\"population\"]\n";
    let (_hub, edge, at) = level3(&pki, &pg, keys).await;
    let (ok, out, err) = psql(at, "reports", "population", "prefer", "SELECT 1").await;
    assert!(ok && out == "1", "{err}");
    let (ok, _, err) = psql(at, "admin", "population", "prefer", "SELECT 1").await;
    assert!(
        !ok && err.contains("user \"admin\" is not in this service's pg_users")
            && err.contains("R5.pg-login"),
        "{err}"
    );
    let (ok, _, err) = psql(at, "reports", "postgres", "prefer", "SELECT 1").await;
    assert!(!ok && err.contains("pg_databases"), "{err}");
    wait_for("the refused logins audited", Duration::from_secs(5), || {
        lines(&edge, "relay.refuse")
            .iter()
            .filter(|l| l.contains("[R5.pg-login]"))
            .count()
            >= 2
    })
    .await;
}

/// A raw client: the startup message for `user` to `population`.
fn startup(user: &str) -> Vec<u8> {
    gateway_core::sniff::postgres::startup_message(&[("user", user), ("database", "population")])
}

/// Reads until the connection ends (true) or `limit` passes (false).
async fn ends(s: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// Logs in as `raw` (trusted) and reads to the first ReadyForQuery.
async fn logged_in(at: SocketAddr) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(at).await.expect("connect");
    s.write_all(&startup("raw")).await.expect("startup");
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
            .await
            .expect("login within 10 s")
            .expect("read");
        assert!(n > 0, "the login ended: {seen:?}");
        seen.extend_from_slice(&buf[..n]);
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_oversized_messages_cut_the_connection() {
    if let Some(why) = missing() {
        println!("skipped: {why}");
        return;
    }
    let pg = Postgres::start();
    let pki = Pki::new();
    let (_hub, edge, at) = level3(&pki, &pg, "pg_max_message = \"64KiB\"\n").await;
    let cases: Vec<(&str, Vec<u8>, bool)> = vec![
        (
            "not a PostgreSQL startup",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            false,
        ),
        (
            "bytes after an SSLRequest",
            [&[0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f][..], &startup("raw")].concat(),
            false,
        ),
        ("more than pg_max_message", vec![b'Q', 0, 0x10, 0, 0], true),
        (
            "message type 'x' is not allowed here",
            vec![b'x', 0, 0, 0, 4],
            true,
        ),
        ("a message length under 4", vec![b'Q', 0, 0, 0, 1], true),
        (
            "a Query that is not one NUL-terminated string",
            [&[b'Q', 0, 0, 0, 17][..], b"SELECT 1\0DROP\0"].concat(),
            true,
        ),
    ];
    for (why, bytes, after_login) in &cases {
        let mut s = if *after_login {
            logged_in(at).await
        } else {
            tokio::net::TcpStream::connect(at).await.expect("connect")
        };
        s.write_all(bytes).await.expect("send");
        assert!(
            ends(&mut s, Duration::from_secs(10)).await,
            "{why}: not cut"
        );
        wait_for(why, Duration::from_secs(5), || {
            lines(&edge, "relay.refuse")
                .iter()
                .any(|l| l.contains("[R5.app-protocol]") && l.contains(why))
        })
        .await;
    }
    // A client that never finishes its startup is cut too.
    let mut s = tokio::net::TcpStream::connect(at).await.expect("connect");
    s.write_all(&[0, 0, 0, 40, 0, 3])
        .await
        .expect("half a startup");
    assert!(
        ends(&mut s, Duration::from_secs(20)).await,
        "a stalled startup is cut"
    );
    // The server is still well, and a proper client still gets through.
    let (ok, out, err) = psql(
        at,
        "reports",
        "population",
        "prefer",
        "SELECT count(*) FROM people",
    )
    .await;
    assert!(ok && out == "3", "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_ended_at_the_gateway_with_pg_tls_terminate() {
    if let Some(why) = missing() {
        println!("skipped: {why}");
        return;
    }
    let pg = Postgres::start();
    let pki = Pki::new();
    let (cert, key) = pki.issue("population-db");
    let keys: &'static str = Box::leak(
        format!(
            "pg_tls = \"terminate\"\npg_cert = \"{}\"\npg_key = \"{}\"\n",
            cert.display(),
            key.display()
        )
        .into_boxed_str(),
    );
    let (_hub, edge, at) = level3(&pki, &pg, keys).await;
    let (ok, out, err) = psql(at, "reports", "population", "require", "\\conninfo").await;
    assert!(
        ok && out.contains("SSL connection (protocol: TLSv1.3"),
        "{out}\n{err}"
    );
    let (ok, out, err) = psql(
        at,
        "reports",
        "population",
        "require",
        "SELECT count(*) FROM people",
    )
    .await;
    assert!(ok && out == "3", "{err}");
    let (ok, out, err) = psql(at, "reports", "population", "disable", "SELECT 1").await;
    assert!(
        ok && out == "1",
        "a client without TLS still gets through: {err}"
    );
    wait_for(
        "the statement over TLS audited",
        Duration::from_secs(5),
        || {
            lines(&edge, "pg.statement")
                .iter()
                .any(|l| l.contains("statement=\"SELECT count(*) FROM people\""))
        },
    )
    .await;
}

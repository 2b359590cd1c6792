//! The hub's connection to PostgreSQL over TLS (`sslmode=verify-full`, the
//! default) against a real server with `ssl = on`: the server's certificate
//! checked against `ca` and its name against the host; a password read from a
//! file only its owner may read. Skipped, saying why, without postgresql-15.

use std::time::Duration;

use gateway_core::config::{FilePath, PgHost, PgPassword, PgStore, PgTlsMode};
use gateway_core::diag::Location;
use gateway_store::postgres::Pg;
use gateway_store::postgres::cluster::{self, Cluster};

fn file(path: &std::path::Path, key: &'static str) -> FilePath {
    FilePath {
        path: path.to_owned(),
        key,
        loc: Location { line: 1, column: 1 },
    }
}

/// A CA, and a server certificate it signed for `localhost` only.
fn pki() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "test database CA");
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let server = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let cert = server.signed_by(&key, &issuer).expect("sign");
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

fn store(c: &Cluster, host: &str, ca: &std::path::Path, password: PgPassword) -> PgStore {
    PgStore {
        hosts: vec![PgHost::Tcp {
            host: host.into(),
            port: c.port,
        }],
        dbname: "hub".into(),
        user: "gatewayd".into(),
        tls: PgTlsMode::VerifyFull {
            ca: file(ca, "hub.postgres.ca"),
        },
        password,
        pool: 2,
        connect_timeout: Duration::from_secs(5),
        application_name: "tls-test".into(),
    }
}

#[tokio::test]
async fn verify_full_checks_the_servers_certificate_and_name() {
    use std::os::unix::fs::PermissionsExt;
    if let Some(why) = cluster::missing() {
        eprintln!("skipped: {why}");
        return;
    }
    let c = Cluster::start(false).expect("cluster");
    let (ca, cert, key) = pki();
    // TLS and a password required over TCP; trust only on the socket.
    c.enable_tls(
        &cert,
        &key,
        "local all all trust\nhostssl all gatewayd 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 reject\n",
    )
    .expect("tls on");
    c.sql(
        "postgres",
        "CREATE ROLE gatewayd LOGIN PASSWORD 'pg-secret'",
    )
    .expect("role");
    c.sql("postgres", "CREATE DATABASE hub OWNER gatewayd")
        .expect("db");
    let dir = tempfile::tempdir().expect("dir");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, &ca).expect("ca");
    let pw = dir.path().join("pg.password");
    std::fs::write(&pw, "pg-secret\n").expect("password");
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let password = PgPassword::File(file(&pw, "hub.postgres.password_file"));

    // The right name, the right CA, the password from the file: TLS is used.
    let pg = Pg::open(&store(&c, "localhost", &ca_file, password.clone()))
        .await
        .expect("verify-full to localhost");
    let client = pg.client().await.expect("client");
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .expect("query");
    assert!(row.get::<_, bool>(0), "the connection is encrypted");
    drop((client, pg));

    // The server's certificate does not name 127.0.0.1: refused.
    match Pg::open(&store(&c, "127.0.0.1", &ca_file, password.clone())).await {
        Err(e) => assert!(e.to_string().to_lowercase().contains("certificate"), "{e}"),
        Ok(_) => panic!("a certificate for another name was accepted"),
    }
    // Another CA: refused.
    let (other_ca, _, _) = pki();
    let other = dir.path().join("other-ca.pem");
    std::fs::write(&other, other_ca).expect("ca");
    match Pg::open(&store(&c, "localhost", &other, password.clone())).await {
        Err(e) => assert!(e.to_string().to_lowercase().contains("certificate"), "{e}"),
        Ok(_) => panic!("a server of another CA was accepted"),
    }
    // A password file others may read is refused before connecting.
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    match Pg::open(&store(&c, "localhost", &ca_file, password)).await {
        Err(e) => assert!(e.to_string().contains("chmod 600"), "{e}"),
        Ok(_) => panic!("a world-readable password file was used"),
    }
    // A link to the password file is not followed.
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let link = dir.path().join("pg.link");
    std::os::unix::fs::symlink(&pw, &link).expect("link");
    let linked = PgPassword::File(file(&link, "hub.postgres.password_file"));
    match Pg::open(&store(&c, "localhost", &ca_file, linked)).await {
        Err(e) => assert!(e.to_string().contains("symbolic link"), "{e}"),
        Ok(_) => panic!("a password file was read through a link"),
    }
    // No password at all: the server refuses, and says why.
    match Pg::open(&store(&c, "localhost", &ca_file, PgPassword::None)).await {
        Err(e) => assert!(e.to_string().contains("password"), "{e}"),
        Ok(_) => panic!("logged in without the password"),
    }
}

//! A throwaway PostgreSQL cluster for tests and benchmarks (feature
//! `test-cluster`): `initdb` in a temporary directory, `pg_ctl` to start and
//! stop it, a Unix socket and a loopback port. As root, the server's own
//! programs run as the `postgres` user (the server refuses root); the
//! package `postgresql-15` provides both.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use gateway_core::config::{PgHost, PgPassword, PgStore, PgTlsMode};

/// Where Debian's `postgresql-15` puts the server's programs.
pub const BIN: &str = "/usr/lib/postgresql/15/bin";

/// Why no cluster can be made here, if so (the test then says it skipped).
pub fn missing() -> Option<String> {
    ["initdb", "pg_ctl", "postgres", "psql"]
        .iter()
        .find(|b| !Path::new(BIN).join(b).exists())
        .map(|b| format!("{BIN}/{b} is not installed (apt-get install postgresql-15)"))
}

fn is_root() -> bool {
    // The effective uid, from /proc/self/status.
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn server_cmd(bin: &str) -> Command {
    let path = Path::new(BIN).join(bin);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

/// A running cluster, stopped (immediately) and removed when dropped.
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    /// Its TCP port on 127.0.0.1 (and its socket's name).
    pub port: u16,
}

impl Cluster {
    /// Makes and starts a cluster; `durable` keeps `fsync` and
    /// `synchronous_commit` on (benchmarks), else both are off (tests).
    ///
    /// # Errors
    /// What failed, with the server's log.
    pub fn start(durable: bool) -> Result<Cluster, String> {
        use std::os::unix::fs::PermissionsExt;
        let base = std::env::temp_dir();
        let dir = loop {
            let name = format!(
                "gw-pg-{}-{}",
                std::process::id(),
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos())
            );
            let d = base.join(name);
            if std::fs::create_dir(&d).is_ok() {
                break d;
            }
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| format!("a free port: {e}"))?
            .port();
        let c = Cluster { dir, port };
        std::fs::set_permissions(&c.dir, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())?;
        for d in [c.data(), c.socket_dir()] {
            std::fs::create_dir(&d).map_err(|e| e.to_string())?;
            if is_root() {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&d)
                    .status()
                    .map_err(|e| e.to_string())?;
                if !ok.success() {
                    return Err("chown postgres (is there a postgres user?)".into());
                }
            }
        }
        let ok = server_cmd("initdb")
            .arg("-D")
            .arg(c.data())
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("initdb: {e}"))?;
        if !ok.success() {
            return Err("initdb failed".into());
        }
        let durability = if durable {
            "-c fsync=on -c synchronous_commit=on"
        } else {
            "-c fsync=off -c synchronous_commit=off"
        };
        let conf = format!(
            "listen_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\nmax_connections = 100\n",
            c.port,
            c.socket_dir().display()
        );
        let mut all = std::fs::read_to_string(c.data().join("postgresql.conf")).unwrap_or_default();
        all.push_str(&conf);
        std::fs::write(c.data().join("postgresql.conf"), all).map_err(|e| e.to_string())?;
        c.pg_ctl_start(durability)?;
        Ok(c)
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// The directory of its Unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sock").join("server.log")).unwrap_or_default()
    }

    fn pg_ctl_start(&self, options: &str) -> Result<(), String> {
        std::fs::write(self.dir.join("options"), options).map_err(|e| e.to_string())?;
        let ok = server_cmd("pg_ctl")
            .arg("start")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "-o", options, "-l"])
            .arg(self.socket_dir().join("server.log"))
            .stdout(Stdio::null())
            .status()
            .map_err(|e| format!("pg_ctl: {e}"))?;
        if ok.success() {
            Ok(())
        } else {
            Err(format!("PostgreSQL did not start: {}", self.log()))
        }
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: a crash, as far
    /// as clients can tell; what was committed survives).
    pub fn stop_immediate(&self) {
        let _ = server_cmd("pg_ctl")
            .arg("stop")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "-t", "30"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// Starts it again after [`Cluster::stop_immediate`] (recovery runs).
    ///
    /// # Errors
    /// What failed, with the server's log.
    pub fn start_again(&self) -> Result<(), String> {
        let options = std::fs::read_to_string(self.dir.join("options")).unwrap_or_default();
        self.pg_ctl_start(&options)
    }

    /// Turns TLS on with the server certificate and key given (PEM) and
    /// replaces `pg_hba.conf` with `hba`; restarts the server.
    ///
    /// # Errors
    /// What failed, with the server's log.
    pub fn enable_tls(&self, cert_pem: &str, key_pem: &str, hba: &str) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        for (name, text) in [
            ("server.crt", cert_pem),
            ("server.key", key_pem),
            ("pg_hba.conf", hba),
        ] {
            let path = self.data().join(name);
            std::fs::write(&path, text).map_err(|e| e.to_string())?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| e.to_string())?;
            if is_root() {
                let ok = Command::new("chown")
                    .arg("postgres:postgres")
                    .arg(&path)
                    .status()
                    .map_err(|e| e.to_string())?;
                if !ok.success() {
                    return Err(format!("chown {name}"));
                }
            }
        }
        let mut conf =
            std::fs::read_to_string(self.data().join("postgresql.conf")).unwrap_or_default();
        conf.push_str("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\npassword_encryption = 'scram-sha-256'\n");
        std::fs::write(self.data().join("postgresql.conf"), conf).map_err(|e| e.to_string())?;
        self.stop_immediate();
        self.start_again()
    }

    /// Runs `sql` in database `db` as the superuser; its output.
    ///
    /// # Errors
    /// psql's error output.
    pub fn sql(&self, db: &str, sql: &str) -> Result<String, String> {
        let out = Command::new(Path::new(BIN).join("psql"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-X", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .map_err(|e| format!("psql: {e}"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(format!("{sql}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Makes database `name`.
    ///
    /// # Errors
    /// psql's error output.
    pub fn create_database(&self, name: &str) -> Result<(), String> {
        self.sql("postgres", &format!("CREATE DATABASE {name}"))
            .map(|_| ())
    }

    /// The `[hub.postgres]` of database `db`, over the Unix socket.
    pub fn store(&self, db: &str, pool: u32) -> PgStore {
        PgStore {
            hosts: vec![PgHost::Unix {
                dir: self.socket_dir(),
                port: self.port,
            }],
            dbname: db.to_owned(),
            user: "postgres".to_owned(),
            tls: PgTlsMode::Disable,
            password: PgPassword::None,
            pool,
            connect_timeout: Duration::from_secs(5),
            application_name: "gatewayd-test".to_owned(),
        }
    }
}

/// One cluster for the whole test process, started on first use (tests that
/// run every hub on PostgreSQL: `GW_HUB_STORE=postgres`). A static is never
/// dropped, so a watchdog process stops and removes it once this process has
/// ended, however it ended.
///
/// # Errors
/// Why the cluster could not be made (the first failure, every time).
pub fn shared() -> Result<&'static Cluster, String> {
    static SHARED: std::sync::OnceLock<Result<Cluster, String>> = std::sync::OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Some(why) = missing() {
                return Err(why);
            }
            let c = Cluster::start(false)?;
            let stop = format!(
                "{} {}/pg_ctl stop -D {} -m immediate -w -t 30",
                if is_root() { "runuser -u postgres --" } else { "" },
                BIN,
                c.data().display()
            );
            let script = format!(
                "while kill -0 {pid} 2>/dev/null; do sleep 1; done; {stop} >/dev/null 2>&1; rm -rf {dir}",
                pid = std::process::id(),
                dir = c.dir.display()
            );
            Command::new("setsid")
                .args(["sh", "-c", &script])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("the cluster's watchdog: {e}"))?;
            Ok(c)
        })
        .as_ref()
        .map_err(Clone::clone)
}

impl Cluster {
    /// The database of `key` (a hub's state directory, or a file hubs
    /// share): its name, and whether it was made now.
    ///
    /// # Errors
    /// psql's error output.
    pub fn database_for(&self, key: &str) -> Result<(String, bool), String> {
        static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = MAKING
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // FNV-1a: a stable name from the key.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in key.as_bytes() {
            h = (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
        let name = format!("t{h:016x}");
        let exists = self.sql(
            "postgres",
            &format!("SELECT count(*) FROM pg_database WHERE datname = '{name}'"),
        )? == "1";
        if !exists {
            self.create_database(&name)?;
        }
        Ok((name, !exists))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop_immediate();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

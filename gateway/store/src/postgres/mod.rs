//! The networked engine of the hub's storage traits: one PostgreSQL database
//! that any number of hubs share (`[hub] store = "postgres"`).
//!
//! - [`registry`]: [`PgRegistry`], the fleet registry.
//! - [`sink`]: [`PgSink`], the sink of channel records.
//! - [`schema`]: versioned migrations, applied at start under a lock.
//! - [`changes`]: the change log and the listener that wakes a hub when
//!   another one changed something.
//!
//! Connections come from a pool (deadpool-postgres) over tokio-postgres, with
//! TLS by rustls verifying the server's certificate and name
//! (`sslmode=verify-full`). Every write that must not be lost or doubled is
//! one transaction; rows another hub may change at the same moment are locked
//! (`SELECT ... FOR UPDATE`) before they are read, so READ COMMITTED (the
//! server's default) is enough and no transaction needs retrying by hand.
//!
//! Errors are sorted for the caller: a lost connection, a server shutting
//! down or failing over, a standby that refuses writes, a deadlock or a
//! serialisation failure, too many connections are
//! [`StoreError::Unavailable`] (retry later); anything else is
//! [`StoreError::Refused`].

pub mod changes;
#[cfg(feature = "test-cluster")]
pub mod cluster;
pub mod firmware;
pub mod import;
pub mod registry;
pub mod rollouts;
pub mod schema;
pub mod sink;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use gateway_core::config::{PgHost, PgPassword, PgStore, PgTlsMode};
use tokio_postgres::config::{SslMode, TargetSessionAttrs};

pub use registry::PgRegistry;
pub use sink::PgSink;

use crate::error::StoreError;
use crate::registry::RegistryError;

/// The longest a caller waits for a connection of the pool.
const POOL_WAIT: Duration = Duration::from_secs(10);

/// What a PostgreSQL failure means to the caller.
pub fn classify(e: &tokio_postgres::Error) -> StoreError {
    use tokio_postgres::error::SqlState as S;
    let text = match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => {
            // The driver's message, and what caused it (a TLS handshake's
            // reason, an I/O error).
            let mut text = e.to_string();
            let mut cause = std::error::Error::source(e);
            while let Some(c) = cause {
                text += &format!(": {c}");
                cause = c.source();
            }
            text
        }
    };
    let Some(code) = e.code() else {
        // No SQLSTATE: the connection failed or closed.
        return StoreError::Unavailable(text);
    };
    let class = &code.code()[..2];
    let retry = matches!(class, "08" | "53" | "57" | "58" | "40")
        || *code == S::READ_ONLY_SQL_TRANSACTION
        || *code == S::UNIQUE_VIOLATION;
    if retry {
        StoreError::Unavailable(text)
    } else {
        StoreError::Refused(text)
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        classify(&e)
    }
}

impl From<tokio_postgres::Error> for RegistryError {
    fn from(e: tokio_postgres::Error) -> Self {
        RegistryError::Store(classify(&e))
    }
}

impl From<deadpool_postgres::PoolError> for StoreError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => classify(&e),
            other => StoreError::Unavailable(format!("PostgreSQL pool: {other}")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for RegistryError {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        RegistryError::Store(e.into())
    }
}

/// Why the engine could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The password could not be read.
    #[error("hub.postgres: {0}")]
    Password(String),
    /// The CA file could not be read or holds no certificate.
    #[error("hub.postgres.ca {path}: {reason}")]
    Ca {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// TLS could not be set up.
    #[error("hub.postgres: TLS: {0}")]
    Tls(String),
    /// The database could not be reached or migrated.
    #[error("PostgreSQL: {0}")]
    Store(#[from] StoreError),
}

/// A handle on the shared database: a pool of connections, and where the
/// change listener signals. Cheap to clone.
#[derive(Clone)]
pub struct Pg {
    pool: Pool,
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// Woken when another hub (or this one) recorded a change.
    pub wake: Arc<tokio::sync::Notify>,
    /// After a failed connection attempt: no new attempt before this, and
    /// the next wait (doubling from 250 ms to 10 s).
    backoff: Arc<std::sync::Mutex<Backoff>>,
}

/// When the database may be tried again.
#[derive(Debug, Default)]
struct Backoff {
    until: Option<tokio::time::Instant>,
    next: Duration,
}

/// The first wait after a failed connection attempt.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
/// The longest.
const BACKOFF_MAX: Duration = Duration::from_secs(10);

impl std::fmt::Debug for Pg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pg")
            .field("status", &self.pool.status())
            .finish_non_exhaustive()
    }
}

/// `O_NOFOLLOW` and the `ELOOP` it fails with on a link (Linux; this crate
/// forbids `unsafe` and has no libc binding).
const O_NOFOLLOW: i32 = 0o400_000;
const ELOOP: i32 = 40;

/// Reads the password `how` names: the first line of a file that only its
/// owner may read, or an environment variable.
///
/// # Errors
/// When the file cannot be read, is readable by others, or the variable is
/// unset.
pub fn read_password(how: &PgPassword) -> Result<Option<String>, OpenError> {
    match how {
        PgPassword::None => Ok(None),
        PgPassword::Env(name) => match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Some(v)),
            _ => Err(OpenError::Password(format!(
                "password_env: the environment variable {name} is not set (set it in the unit's EnvironmentFile= or LoadCredential=)"
            ))),
        },
        PgPassword::File(f) => {
            use std::io::Read as _;
            use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
            let path = &f.path;
            let fail = |e: std::io::Error| {
                OpenError::Password(format!("password_file {}: {e}", path.display()))
            };
            // Not through a link, and judged by the file actually opened.
            let file = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(O_NOFOLLOW)
                .open(path)
                .map_err(|e| match e.raw_os_error() {
                    Some(ELOOP) => OpenError::Password(format!(
                        "password_file {}: is a symbolic link; name the file itself",
                        path.display()
                    )),
                    _ => fail(e),
                })?;
            let meta = file.metadata().map_err(fail)?;
            if !meta.is_file() {
                return Err(OpenError::Password(format!(
                    "password_file {}: not a regular file",
                    path.display()
                )));
            }
            if meta.mode() & 0o077 != 0 {
                return Err(OpenError::Password(format!(
                    "password_file {}: readable by group or others (mode {:o}); chmod 600 it",
                    path.display(),
                    meta.mode() & 0o777
                )));
            }
            if meta.len() > 4096 {
                return Err(OpenError::Password(format!(
                    "password_file {}: longer than 4096 bytes; it holds the password on its first line",
                    path.display()
                )));
            }
            let mut text = String::new();
            file.take(4097).read_to_string(&mut text).map_err(fail)?;
            let line = text.lines().next().unwrap_or_default().to_owned();
            if line.is_empty() {
                return Err(OpenError::Password(format!(
                    "password_file {}: the first line is empty",
                    path.display()
                )));
            }
            Ok(Some(line))
        }
    }
}

fn tls_config(tls: &PgTlsMode) -> Result<rustls::ClientConfig, OpenError> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    if let PgTlsMode::VerifyFull { ca } = tls {
        let path = ca.path.display().to_string();
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca.path)
            .and_then(Iterator::collect)
            .map_err(|e| OpenError::Ca {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(OpenError::Ca {
                path,
                reason: "holds no PEM certificate".into(),
            });
        }
        for c in certs {
            roots.add(c).map_err(|e| OpenError::Ca {
                path: path.clone(),
                reason: e.to_string(),
            })?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| OpenError::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// The driver's configuration for `s`.
fn driver_config(s: &PgStore, password: Option<&str>) -> tokio_postgres::Config {
    let mut c = tokio_postgres::Config::new();
    for h in &s.hosts {
        match h {
            PgHost::Tcp { host, port } => {
                c.host(host).port(*port);
            }
            PgHost::Unix { dir, port } => {
                c.host_path(dir).port(*port);
            }
        }
    }
    c.dbname(&s.dbname)
        .user(&s.user)
        .application_name(&s.application_name)
        .connect_timeout(s.connect_timeout)
        .keepalives(true)
        .keepalives_idle(Duration::from_secs(30))
        .target_session_attrs(TargetSessionAttrs::ReadWrite)
        .ssl_mode(match s.tls {
            PgTlsMode::VerifyFull { .. } => SslMode::Require,
            PgTlsMode::Disable => SslMode::Disable,
        });
    if let Some(p) = password {
        c.password(p);
    }
    c
}

impl Pg {
    /// Opens a pool on the database `s` names and migrates its schema.
    ///
    /// # Errors
    /// When the password or the CA cannot be read, or the database cannot be
    /// reached or migrated.
    pub async fn open(s: &PgStore) -> Result<Pg, OpenError> {
        let password = read_password(&s.password)?;
        let config = driver_config(s, password.as_deref());
        let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls_config(&s.tls)?);
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(s.pool as usize)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(s.connect_timeout))
            .recycle_timeout(Some(s.connect_timeout))
            .build()
            .map_err(|e| OpenError::Tls(e.to_string()))?;
        let pg = Pg {
            pool,
            config,
            tls,
            wake: Arc::new(tokio::sync::Notify::new()),
            backoff: Arc::default(),
        };
        let mut client = pg.client().await?;
        schema::migrate(&mut client).await?;
        drop(client);
        tokio::spawn(changes::listen(
            pg.config.clone(),
            pg.tls.clone(),
            Arc::downgrade(&pg.wake),
        ));
        Ok(pg)
    }

    /// A connection of the pool. After a connection attempt failed, callers
    /// are answered at once until the backoff has passed (250 ms, doubling to
    /// 10 s), so edges resending batches and operators retrying do not turn
    /// into a connection storm against a database that is down.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when none can be had within 10 s, or while
    /// backing off.
    pub async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let until = self
            .backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .until;
        if let Some(t) = until.filter(|t| *t > tokio::time::Instant::now()) {
            let left = t - tokio::time::Instant::now();
            return Err(StoreError::Unavailable(format!(
                "the database did not answer; the next attempt in {} ms",
                left.as_millis()
            )));
        }
        self.get().await
    }

    /// A connection, trying now; a failure starts or lengthens the backoff,
    /// a success ends it.
    async fn get(&self) -> Result<deadpool_postgres::Object, StoreError> {
        let got = self.pool.get().await;
        let mut b = self
            .backoff
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match got {
            Ok(c) => {
                *b = Backoff::default();
                Ok(c)
            }
            Err(e) => {
                let e: StoreError = e.into();
                if e.retry_later() {
                    let wait = if b.next.is_zero() {
                        BACKOFF_FIRST
                    } else {
                        b.next
                    };
                    b.until = Some(tokio::time::Instant::now() + wait);
                    b.next = (wait * 2).min(BACKOFF_MAX);
                }
                Err(e)
            }
        }
    }

    /// Whether the database answers now (for `/readyz`); tries even while
    /// backing off, and ends the backoff when it answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let c = self.get().await?;
        c.simple_query("SELECT 1").await?;
        Ok(())
    }
}

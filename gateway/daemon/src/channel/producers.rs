//! Who a producer is, for an `[[ingest]]` with `auth` set: a bearer token
//! checked against the tokens file (re-read when it changes, at most once a
//! second), or the verified client certificate of an HTTPS (`mtls`)
//! listener. The name goes into each `channel.accept` audit record and into
//! the receipts.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway_core::config::IngestAuth;
use gateway_core::producers::Tokens;

/// Largest tokens file read.
pub const MAX_TOKENS_FILE: u64 = 1 << 20;
/// How often a tokens file is looked at for changes.
const RECHECK: Duration = Duration::from_secs(1);

/// Reads a tokens file: not through a link, a regular file, writable by its
/// owner only, at most [`MAX_TOKENS_FILE`] bytes.
///
/// # Errors
/// What is wrong with the file, naming it.
pub fn read_tokens(path: &Path) -> Result<Tokens, String> {
    use std::io::Read as _;
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
    let at = |e: String| format!("{}: {e}", path.display());
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags())
        .open(path)
        .map_err(|e| at(e.to_string()))?;
    let meta = f.metadata().map_err(|e| at(e.to_string()))?;
    if !meta.is_file() {
        return Err(at("not a regular file".into()));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(at(format!(
            "writable by others (mode {:o}): anyone could add a producer; chmod 600 it",
            meta.mode() & 0o777
        )));
    }
    if meta.len() > MAX_TOKENS_FILE {
        return Err(at(format!("larger than {MAX_TOKENS_FILE} bytes")));
    }
    let mut text = String::new();
    f.take(MAX_TOKENS_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| at(e.to_string()))?;
    Tokens::parse(&text).map_err(|e| at(e.to_string()))
}

fn libc_flags() -> i32 {
    (nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
        .bits()
}

/// A file's identity, to tell that it changed.
/// (inode, size, mtime, ctime: a `chmod` changes it too).
type Stamp = (u64, u64, i64, i64, i64, i64);

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::symlink_metadata(path).ok()?;
    Some((
        m.ino(),
        m.len(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec(),
    ))
}

struct Loaded {
    stamp: Option<Stamp>,
    checked: Instant,
    tokens: Result<Arc<Tokens>, String>,
}

/// A tokens file, kept loaded.
pub struct TokenFile {
    path: PathBuf,
    loaded: Mutex<Loaded>,
}

impl TokenFile {
    /// Loads `path`; an unreadable or invalid file refuses every producer
    /// (and says why) until it is fixed.
    pub fn new(path: PathBuf) -> Self {
        let tokens = read_tokens(&path).map(Arc::new);
        if let Err(e) = &tokens {
            tracing::error!(error = %e, "Producer tokens unusable: every producer is refused until the file is fixed");
        }
        TokenFile {
            loaded: Mutex::new(Loaded {
                stamp: stamp(&path),
                checked: Instant::now(),
                tokens,
            }),
            path,
        }
    }

    /// The tokens now in force (re-read when the file changed).
    pub fn current(&self) -> Result<Arc<Tokens>, String> {
        let mut l = self
            .loaded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if l.checked.elapsed() >= RECHECK {
            l.checked = Instant::now();
            let now = stamp(&self.path);
            if now != l.stamp {
                l.stamp = now;
                l.tokens = read_tokens(&self.path).map(Arc::new);
                match &l.tokens {
                    Ok(t) => tracing::info!(
                        file = %self.path.display(),
                        producers = t.names().count(),
                        "Producer tokens reloaded"
                    ),
                    Err(e) => tracing::error!(error = %e, "Producer tokens unusable"),
                }
            }
        }
        l.tokens.clone()
    }
}

/// How one ingest listener knows its producers.
pub enum Producers {
    /// Anyone in the zone; no name.
    Anyone,
    /// Bearer tokens.
    Tokens(TokenFile),
    /// Client certificates (verified by the TLS handshake).
    Certificates,
}

/// Why a producer was not recognised.
pub enum Unknown {
    /// No credential, or a wrong one: 401.
    Credential(&'static str),
    /// The tokens file cannot be used: 503 (the operator's to fix).
    Unusable(String),
}

impl Producers {
    /// For an `[[ingest]]`'s `auth`.
    pub fn new(auth: &IngestAuth) -> Self {
        match auth {
            IngestAuth::None => Producers::Anyone,
            IngestAuth::Token { tokens } => Producers::Tokens(TokenFile::new(tokens.path.clone())),
            IngestAuth::Mtls { .. } => Producers::Certificates,
        }
    }

    /// The producer of a request: `None` when the listener takes anyone.
    ///
    /// # Errors
    /// [`Unknown`]: no valid credential.
    pub fn identify(
        &self,
        authorization: Option<&str>,
        cert: Option<&rustls_pki_types::CertificateDer<'static>>,
    ) -> Result<Option<String>, Unknown> {
        match self {
            Producers::Anyone => Ok(None),
            Producers::Tokens(file) => {
                let Some(bearer) = authorization.and_then(|a| {
                    a.strip_prefix("Bearer ")
                        .or_else(|| a.strip_prefix("bearer "))
                }) else {
                    return Err(Unknown::Credential(
                        "no producer token (send Authorization: Bearer gwp1.NAME.SECRET)",
                    ));
                };
                let tokens = file.current().map_err(Unknown::Unusable)?;
                tokens
                    .verify(bearer.trim())
                    .map(|n| Some(n.to_owned()))
                    .ok_or(Unknown::Credential(
                        "the producer token is not one this listener accepts",
                    ))
            }
            Producers::Certificates => {
                cert.and_then(certificate_name)
                    .map(Some)
                    .ok_or(Unknown::Credential(
                        "the client certificate names no producer (a DNS name or CN)",
                    ))
            }
        }
    }
}

/// The producer a verified client certificate names: its first DNS name, or
/// its common name, when that is a valid name.
pub fn certificate_name(cert: &rustls_pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let dns = parsed
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::DNSName(d) => Some((*d).to_owned()),
                _ => None,
            })
        });
    let name = dns.or_else(|| {
        parsed
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_owned)
    })?;
    gateway_core::units::check_name("producer", &name).ok()?;
    Some(name)
}

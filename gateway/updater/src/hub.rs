//! A version's bytes from the hub, through gatewayd: its admin listener
//! answers `GET /firmware/VERSION/PART` with the part, fetched from a hub
//! over the tunnel (the updater has no tunnel, no certificate and no network
//! access of its own). Nothing from there is trusted: the manifest's
//! signature is checked with the keys the image trusts, and every chunk and
//! boot file against the manifest, before anything is written.

use std::io::{Read, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use gateway_core::firmware::minisign::MAX_SIGNATURE_TEXT;
use gateway_core::firmware::{CHUNK_BYTES, MAX_MANIFEST_BYTES};

use crate::install::{Event, UpdateError, Updater, Waiting};
use crate::source::{BootFile, ChunkSource, Signed, SourceError};

/// The most of an answer's head read.
const MAX_HEAD: usize = 8192;
/// How long one part may take, whole (gatewayd itself gives the hub 60 s).
const TIMEOUT: Duration = Duration::from_secs(75);

/// Fetches `path` from gatewayd's admin listener at `admin`: the body of a
/// 200 answer, at most `limit` bytes.
///
/// # Errors
/// No answer, another status (with gatewayd's reason), an oversized body.
pub fn get(admin: SocketAddr, path: &str, limit: u64) -> Result<Vec<u8>, SourceError> {
    let err = |e: std::io::Error| SourceError(format!("gatewayd at {admin}: {e}"));
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(5)).map_err(err)?;
    s.set_read_timeout(Some(TIMEOUT)).map_err(err)?;
    s.set_write_timeout(Some(TIMEOUT)).map_err(err)?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .map_err(err)?;
    // The whole answer within TIMEOUT, however slowly it trickles.
    let deadline = std::time::Instant::now() + TIMEOUT;
    let cap = usize::try_from(limit)
        .unwrap_or(usize::MAX)
        .saturating_add(MAX_HEAD + 1);
    let mut raw = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    while raw.len() < cap {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(SourceError(format!(
                "gatewayd at {admin}: {path}: no whole answer within {} s",
                TIMEOUT.as_secs()
            )));
        }
        s.set_read_timeout(Some(left)).map_err(err)?;
        let want = buf.len().min(cap - raw.len());
        match s.read(&mut buf[..want]).map_err(err)? {
            0 => break,
            n => raw.extend_from_slice(&buf[..n]),
        }
    }
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Err(SourceError(format!(
            "gatewayd at {admin}: {path}: no HTTP answer"
        )));
    };
    if end > MAX_HEAD {
        return Err(SourceError(format!(
            "gatewayd at {admin}: {path}: head too long"
        )));
    }
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let body = raw.split_off(end + 4);
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        let why = String::from_utf8_lossy(&body[..body.len().min(512)])
            .trim()
            .to_owned();
        return Err(SourceError(format!("{path}: {status}: {why}")));
    }
    if body.len() as u64 > limit {
        return Err(SourceError(format!("{path}: over {limit} bytes")));
    }
    Ok(body)
}

/// A version on the hub, as a source of chunks.
pub struct HubSource {
    admin: SocketAddr,
    version: String,
    /// How many parts the kernel and initrd have.
    boot_parts: Option<[u64; 2]>,
    /// Chunks fetched from the hub (not copied from the running slot).
    pub fetched: usize,
}

impl HubSource {
    /// `version` through gatewayd's admin listener at `admin`.
    pub fn new(admin: SocketAddr, version: &str) -> Self {
        HubSource {
            admin,
            version: version.to_owned(),
            boot_parts: None,
            fetched: 0,
        }
    }

    fn part(&self, part: &str, limit: u64) -> Result<Vec<u8>, SourceError> {
        get(
            self.admin,
            &format!("/firmware/{}/{part}", self.version),
            limit,
        )
    }

    /// The version's manifest and signature.
    ///
    /// # Errors
    /// When they cannot be had now.
    pub fn signed(&self) -> Result<Signed, SourceError> {
        let manifest = self.part("manifest", MAX_MANIFEST_BYTES as u64)?;
        let signature = self.part("signature", MAX_SIGNATURE_TEXT as u64)?;
        Ok(Signed {
            manifest,
            signature: String::from_utf8(signature)
                .map_err(|_| SourceError("the signature is not UTF-8".into()))?,
        })
    }

    fn boot_parts(&mut self) -> Result<[u64; 2], SourceError> {
        if let Some(p) = self.boot_parts {
            return Ok(p);
        }
        let bytes = self.part("parts", 4096)?;
        let v: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| SourceError(format!("parts: {e}")))?;
        let n = |k: &str| {
            v[k].as_u64()
                .filter(|&n| n <= 1024)
                .ok_or_else(|| SourceError(format!("parts: no count of {k} parts")))
        };
        let p = [n("linux")?, n("initrd")?];
        self.boot_parts = Some(p);
        Ok(p)
    }
}

/// A kernel or initrd read part by part from the hub.
struct Parts<'a> {
    source: &'a HubSource,
    file: BootFile,
    next: u64,
    count: u64,
    buf: std::io::Cursor<Vec<u8>>,
}

impl Read for Parts<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        loop {
            let n = self.buf.read(out)?;
            if n > 0 || self.next >= self.count {
                return Ok(n);
            }
            let bytes = self
                .source
                .part(
                    &format!("{}/{:06}", self.file.name(), self.next),
                    CHUNK_BYTES,
                )
                .map_err(|e| std::io::Error::other(e.0))?;
            if bytes.is_empty() {
                return Err(std::io::Error::other("an empty part"));
            }
            self.next += 1;
            self.buf = std::io::Cursor::new(bytes);
        }
    }
}

impl ChunkSource for HubSource {
    fn chunk(&mut self, i: usize) -> Result<Vec<u8>, SourceError> {
        let bytes = self.part(&format!("root/{i:06}"), CHUNK_BYTES)?;
        self.fetched += 1;
        Ok(bytes)
    }

    fn boot_file(&mut self, file: BootFile) -> Result<Box<dyn Read + '_>, SourceError> {
        let counts = self.boot_parts()?;
        let count = match file {
            BootFile::Linux => counts[0],
            BootFile::Initrd => counts[1],
        };
        Ok(Box::new(Parts {
            source: self,
            file,
            next: 0,
            count,
            buf: std::io::Cursor::new(Vec::new()),
        }))
    }
}

/// A number in `[0, 1)` from the system's randomness (0 when it fails).
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b) {
        Ok(()) => f64::from(u32::from_be_bytes(b)) / (f64::from(u32::MAX) + 1.0),
        Err(_) => 0.0,
    }
}

/// Who hears [`fetch`]: the updater's events, and each retry's line.
pub type Listeners<'a> = (&'a mut dyn FnMut(&Event), &'a mut dyn FnMut(String));

/// Why [`fetch`] stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// This box will not install the version (a bad signature, a
    /// downgrade, another hardware model, the version running, one that
    /// rolled back here): the hub is told, and does not offer it again.
    #[error("{0}")]
    Refused(String),
    /// Not now (a config try runs, another update is staged or its outcome
    /// unreported): the next offer tries again.
    #[error("{0}")]
    Busy(String),
    /// Stopped (gave up on the hub, a disk error); what is written stays.
    #[error("{0}")]
    Stopped(String),
}

impl From<UpdateError> for FetchError {
    fn from(e: UpdateError) -> Self {
        match e {
            UpdateError::Refused(_)
            | UpdateError::Running(_)
            | UpdateError::NotNewer(..)
            | UpdateError::FailedBefore(_) => FetchError::Refused(e.to_string()),
            UpdateError::Busy(_) | UpdateError::ConfigState { .. } => {
                FetchError::Busy(e.to_string())
            }
            e => FetchError::Stopped(e.to_string()),
        }
    }
}

/// Whether a config try runs (the updater starts nothing while one does).
pub type Trying<'a> = &'a dyn Fn() -> Result<bool, UpdateError>;

/// What [`fetch`] did.
#[derive(Debug)]
pub struct Fetched {
    /// What the box waits for now (a reboot, once staged).
    pub waiting: Waiting,
    /// Chunks fetched from the hub.
    pub fetched: usize,
    /// Attempts, the first included.
    pub tries: usize,
}

/// Installs `version` from the hub through gatewayd at `admin`: the offer
/// (its signature checked, and that it is the version asked for), then every
/// chunk not in the slot yet. A part that cannot be had (the link dropped,
/// the hub restarted, gatewayd has no tunnel) or one that does not match the
/// manifest stops the attempt; the next goes on from what is written,
/// after a jittered wait doubling from 1 s to 30 s (back to 1 s after
/// progress),
/// until `give_up` has passed. `on` hears the updater's events, `say` each
/// retry.
///
/// # Errors
/// As [`FetchError`] says.
pub fn fetch(
    updater: &mut Updater,
    trying: Trying<'_>,
    (version, admin): (&str, SocketAddr),
    (retry, give_up): (bool, Duration),
    (on, say): Listeners<'_>,
) -> Result<Fetched, FetchError> {
    if gateway_core::firmware::version_numbers(version).is_none() {
        return Err(FetchError::Refused(format!(
            "version {version:?}: dotted numbers (1.4.2)"
        )));
    }
    let start = std::time::Instant::now();
    // Jittered, so boxes cut off by one hub's restart do not all come back
    // at the same second.
    let mut backoff =
        gateway_core::backoff::Backoff::between(Duration::from_secs(1), Duration::from_secs(30));
    let mut source = HubSource::new(admin, version);
    let mut tries = 0;
    loop {
        tries += 1;
        let before = source.fetched;
        let mut attempt = || {
            let signed = source.signed()?;
            let m = updater.offer(&signed, trying()?, retry)?;
            if m.version != version {
                // The hub's fault, not the version's: tried again later.
                return Err(UpdateError::Source(crate::source::SourceError(format!(
                    "asked for {version}, the hub sent {}'s manifest",
                    m.version
                ))));
            }
            updater.run(&mut source, on)
        };
        match attempt() {
            Ok(waiting) => {
                return Ok(Fetched {
                    waiting,
                    fetched: source.fetched,
                    tries,
                });
            }
            Err(e @ (UpdateError::Source(_) | UpdateError::Corrupt { .. })) => {
                if start.elapsed() >= give_up {
                    return Err(FetchError::Stopped(format!(
                        "{e}; gave up after {} s (what is written stays: fetch again to go on)",
                        start.elapsed().as_secs()
                    )));
                }
                if source.fetched > before {
                    backoff.reset();
                }
                let wait = backoff.next_delay(jitter());
                say(format!("{e}; trying again in {:.1} s", wait.as_secs_f64()));
                std::thread::sleep(wait);
            }
            Err(e) => return Err(e.into()),
        }
    }
}

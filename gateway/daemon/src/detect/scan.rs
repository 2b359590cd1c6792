//! Malware scanning of what crosses a channel (GB/T 22239-2019 8.1.3.4): a
//! [`Scanner`] takes a record's bytes and says clean, found (with the
//! signature) or refused. clamd is the first scanner: each record streamed
//! with `zINSTREAM` over its Unix or TCP socket, every step timed out, its
//! answer read by `gateway_core::detect::clamd`. Anything but a clean or a
//! found verdict refuses the record: scanning fails closed.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use gateway_core::config::{ClamdAddress, ScanSettings};
use gateway_core::detect::clamd::{self, Reply, Version};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::{info, warn};

use crate::node::clock::now_ms;

/// A scanner's verdict on one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No malicious code found.
    Clean,
    /// Malicious code: the signature's name.
    Found(String),
    /// The scanner refused it for good (over its size limit): refused.
    Refused(String),
    /// The scanner could not answer (down, timed out): refused, try later.
    Unavailable(String),
}

/// What a record's bytes are checked by.
pub trait Scanner: Send + Sync {
    /// Scans `data`.
    fn scan<'a>(&'a self, data: &'a [u8]) -> Pin<Box<dyn Future<Output = Verdict> + Send + 'a>>;
    /// The engine and signature database, as audit records name them
    /// (`ClamAV 1.4.6/27473`), or what is known of them.
    fn version(&self) -> String;
    /// Whether the scanner being unavailable is to be alarmed about now: at
    /// most once a minute while it stays so.
    fn down_alarm_due(&self) -> bool;
}

/// Bytes per INSTREAM chunk.
const CHUNK: usize = 64 << 10;
/// How often clamd's version (and so its database's) is asked again.
const VERSION_EVERY: Duration = Duration::from_secs(60);

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// clamd.
pub struct Clamd {
    address: ClamdAddress,
    timeout: Duration,
    max_db_age: Duration,
    database_dir: Option<PathBuf>,
    version: Mutex<Option<(Instant, Version)>>,
    down_alarmed: Mutex<Option<Instant>>,
}

impl Clamd {
    /// A client of the clamd `[scan]` names.
    pub fn new(s: &ScanSettings) -> Self {
        Self {
            address: s.clamd.clone(),
            timeout: s.timeout,
            max_db_age: s.max_db_age,
            database_dir: s.database_dir.clone(),
            version: Mutex::new(None),
            down_alarmed: Mutex::new(None),
        }
    }

    async fn connect(&self) -> std::io::Result<Box<dyn Stream>> {
        match &self.address {
            ClamdAddress::Unix(p) => Ok(Box::new(tokio::net::UnixStream::connect(p).await?)),
            ClamdAddress::Tcp(h) => Ok(Box::new(
                tokio::net::TcpStream::connect((h.host.as_str(), h.port.get())).await?,
            )),
        }
    }

    /// Reads a NUL-terminated answer, at most [`clamd::MAX_REPLY`] bytes.
    async fn answer(s: &mut Box<dyn Stream>) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 512];
        while !out.contains(&0) && out.len() < clamd::MAX_REPLY {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        Ok(out)
    }

    async fn instream(&self, data: &[u8]) -> std::io::Result<Reply> {
        let mut s = self.connect().await?;
        let mut sent = s.write_all(b"zINSTREAM\0").await;
        for chunk in data.chunks(CHUNK) {
            if sent.is_err() {
                break;
            }
            let len = u32::try_from(chunk.len()).unwrap_or(u32::MAX).to_be_bytes();
            sent = async {
                s.write_all(&len).await?;
                s.write_all(chunk).await
            }
            .await;
        }
        if sent.is_ok() {
            sent = s.write_all(&0u32.to_be_bytes()).await;
        }
        // Over its StreamMaxLength clamd answers and closes while we write:
        // its answer says why.
        let answer = Self::answer(&mut s).await;
        match (answer, sent) {
            (Ok(a), _) if !a.is_empty() => Ok(clamd::parse_reply(&a)),
            (Err(e), _) | (Ok(_), Err(e)) => Err(e),
            (Ok(_), Ok(())) => Err(std::io::Error::other("clamd closed without an answer")),
        }
    }

    async fn ask_version(&self) -> Option<Version> {
        let go = async {
            let mut s = self.connect().await.ok()?;
            s.write_all(b"zVERSION\0").await.ok()?;
            clamd::parse_version(&Self::answer(&mut s).await.ok()?)
        };
        tokio::time::timeout(self.timeout, go).await.ok().flatten()
    }

    fn known_version(&self) -> Option<Version> {
        self.version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(|(_, v)| v.clone())
    }

    /// Asks clamd's version when it is older than a minute (a reload of the
    /// database changes it).
    async fn refresh(&self) {
        let stale = self
            .version
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_none_or(|(at, _)| at.elapsed() >= VERSION_EVERY);
        if stale && let Some(v) = self.ask_version().await {
            *self
                .version
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((Instant::now(), v));
        }
    }

    /// The signature database's age (ms): by the newest file in
    /// `database_dir` when given, else by the date clamd reports.
    pub async fn db_age_ms(&self) -> Option<i64> {
        let built = match &self.database_dir {
            Some(dir) => newest_file_ms(dir.clone()).await,
            None => {
                self.refresh().await;
                self.known_version().and_then(|v| v.built_ms)
            }
        };
        built.map(|b| (now_ms() - b).max(0))
    }

    /// Checks the database's age now and then: a warning past `max_db_age`,
    /// and the age as a metric. Runs until `stop`.
    pub async fn watch(
        self: std::sync::Arc<Self>,
        metrics: std::sync::Arc<crate::admin::metrics::Metrics>,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let mut warned_at: Option<Instant> = None;
        loop {
            self.refresh().await;
            let age = self.db_age_ms().await;
            metrics.scan_db_age(age);
            let max = i64::try_from(self.max_db_age.as_millis()).unwrap_or(i64::MAX);
            let hourly = warned_at.is_none_or(|t| t.elapsed() >= Duration::from_secs(3600));
            match age {
                Some(a) if a > max && hourly => {
                    warn!(age_days = a / 86_400_000, max_days = max / 86_400_000, version = %self.version(),
                        "The malware signature database is older than scan.max_db_age: update it (freshclam, or the offline update procedure)");
                    warned_at = Some(Instant::now());
                }
                None if warned_at.is_none() => {
                    info!(version = %self.version(), "The signature database's age is unknown (set scan.database_dir to tell it by its files)");
                    warned_at = Some(Instant::now());
                }
                _ => {}
            }
            tokio::select! {
                () = tokio::time::sleep(VERSION_EVERY) => {}
                () = stop.cancelled() => return,
            }
        }
    }
}

/// The newest modification time (Unix ms) of a regular file in `dir`.
async fn newest_file_ms(dir: PathBuf) -> Option<i64> {
    tokio::task::spawn_blocking(move || {
        std::fs::read_dir(&dir)
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|e| {
                let m = e.metadata().ok()?;
                m.is_file().then_some(m.modified().ok()?)
            })
            .max()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
    })
    .await
    .ok()
    .flatten()
}

impl Scanner for Clamd {
    fn scan<'a>(&'a self, data: &'a [u8]) -> Pin<Box<dyn Future<Output = Verdict> + Send + 'a>> {
        Box::pin(async move {
            self.refresh().await;
            match tokio::time::timeout(self.timeout, self.instream(data)).await {
                Err(_) => Verdict::Unavailable(format!(
                    "clamd at {} gave no verdict within {} s",
                    self.address,
                    self.timeout.as_secs()
                )),
                Ok(Err(e)) => Verdict::Unavailable(format!("clamd at {}: {e}", self.address)),
                Ok(Ok(Reply::Clean)) => Verdict::Clean,
                Ok(Ok(Reply::Found(name))) => Verdict::Found(name),
                Ok(Ok(Reply::Error(e))) if e.contains("size limit") => Verdict::Refused(format!(
                    "clamd refused it: {e} (raise its StreamMaxLength, or lower the channel's max_record_bytes)"
                )),
                Ok(Ok(Reply::Error(e))) => Verdict::Unavailable(format!("clamd: {e}")),
            }
        })
    }

    fn down_alarm_due(&self) -> bool {
        let mut last = self
            .down_alarmed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = last.is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            *last = Some(Instant::now());
        }
        due
    }

    fn version(&self) -> String {
        match self.known_version() {
            Some(v) => match v.database {
                Some(db) => format!("{}/{db}", v.engine),
                None => v.engine,
            },
            None => format!("clamd at {}", self.address),
        }
    }
}

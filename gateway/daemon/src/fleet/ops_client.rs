//! `gatewayctl`'s client of the operators' API: HTTPS (rustls, the hub pinned
//! by its CA), one request per connection, the credential in a bearer header.
//! The same client reads the consumers' API with a consumer's certificate
//! instead ([`OpsClient::consumer`]).

use std::path::Path;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A request could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Bad settings (hub address, CA, credential).
    #[error("{0}")]
    Setup(String),
    /// The connection failed.
    #[error("cannot reach the hub at {0}: {1}")]
    Connect(String, String),
    /// The answer is not HTTP.
    #[error("the hub's answer is not HTTP: {0}")]
    Protocol(String),
}

/// A client of one hub's operators' API.
pub struct OpsClient {
    hub: String,
    name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    /// The operator's credential; none for a consumer (its certificate is).
    credential: Option<String>,
}

impl OpsClient {
    /// A client for `hub` (`HOST:PORT`), trusting `ca`, authenticating with the
    /// credential in the file `credentials`.
    ///
    /// # Errors
    /// When a file cannot be read or the hub address is malformed.
    pub fn new(hub: &str, ca: &Path, credentials: &Path) -> Result<Self, ClientError> {
        let name = server_name(hub)?;
        let tls = crate::tunnel::tls::ops_client(ca)
            .map_err(|e| ClientError::Setup(format!("--ca: {e}")))?;
        let credential = std::fs::read_to_string(credentials)
            .map_err(|e| {
                ClientError::Setup(format!("--credentials {}: {e}", credentials.display()))
            })?
            .trim()
            .to_owned();
        Ok(OpsClient {
            hub: hub.to_owned(),
            name,
            tls: tokio_rustls::TlsConnector::from(tls),
            credential: Some(credential),
        })
    }

    /// A client of the consumers' API at `hub`, trusting `ca`, presenting the
    /// consumer certificate `cert` with its key.
    ///
    /// # Errors
    /// When a file cannot be read or the hub address is malformed.
    pub fn consumer(hub: &str, ca: &Path, cert: &Path, key: &Path) -> Result<Self, ClientError> {
        let name = server_name(hub)?;
        let tls = crate::tunnel::tls::consumer_client(ca, cert, key)
            .map_err(|e| ClientError::Setup(e.to_string()))?;
        Ok(OpsClient {
            hub: hub.to_owned(),
            name,
            tls: tokio_rustls::TlsConnector::from(tls),
            credential: None,
        })
    }

    /// Sends one request; returns the status and the body.
    ///
    /// # Errors
    /// When the hub cannot be reached or does not answer HTTP.
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> Result<(u16, Vec<u8>), ClientError> {
        let err = |e: std::io::Error| ClientError::Connect(self.hub.clone(), e.to_string());
        let go = async {
            let tcp = tokio::net::TcpStream::connect(&self.hub)
                .await
                .map_err(err)?;
            let mut tls = self
                .tls
                .connect(self.name.clone(), tcp)
                .await
                .map_err(err)?;
            let (ctype, bytes) = body.unwrap_or(("application/json", b""));
            let auth = self
                .credential
                .as_ref()
                .map(|c| format!("Authorization: Bearer {c}\r\n"))
                .unwrap_or_default();
            let head = format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                self.hub,
                bytes.len()
            );
            tls.write_all(head.as_bytes()).await.map_err(err)?;
            tls.write_all(bytes).await.map_err(err)?;
            tls.flush().await.map_err(err)?;
            let mut raw = Vec::new();
            // A peer that closes without close_notify still sent its whole answer
            // (Content-Length or chunked framing says where it ends).
            if let Err(e) = tls.read_to_end(&mut raw).await {
                if raw.is_empty() {
                    return Err(err(e));
                }
            }
            parse(&raw)
        };
        tokio::time::timeout(Duration::from_secs(60), go)
            .await
            .map_err(|_| ClientError::Connect(self.hub.clone(), "no answer within 60 s".into()))?
    }
}

/// The TLS name of `HOST:PORT`.
fn server_name(hub: &str) -> Result<ServerName<'static>, ClientError> {
    let host = hub
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .ok_or_else(|| ClientError::Setup(format!("--hub {hub:?}: expected HOST:PORT")))?;
    ServerName::try_from(host.to_owned())
        .map_err(|e| ClientError::Setup(format!("--hub {hub:?}: {e}")))
}

fn parse(raw: &[u8]) -> Result<(u16, Vec<u8>), ClientError> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no header end".into()))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| ClientError::Protocol(head.lines().next().unwrap_or("").to_owned()))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| ClientError::Protocol("truncated chunk".into()))?;
        let size = usize::from_str_radix(
            String::from_utf8_lossy(&rest[..eol])
                .split(';')
                .next()
                .unwrap_or("")
                .trim(),
            16,
        )
        .map_err(|e| ClientError::Protocol(format!("chunk size: {e}")))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        let chunk = rest
            .get(..size)
            .ok_or_else(|| ClientError::Protocol("truncated chunk".into()))?;
        out.extend_from_slice(chunk);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn answers_parse_with_and_without_chunks() {
        let plain = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        assert_eq!(parse(plain).expect("plain"), (200, b"ok".to_vec()));
        let chunked = b"HTTP/1.1 403 Forbidden\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse(chunked).expect("chunked"), (403, b"abcde".to_vec()));
        assert!(parse(b"garbage").is_err());
    }
}

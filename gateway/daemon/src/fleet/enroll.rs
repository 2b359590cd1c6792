//! Enrollment, the edge's half (`gatewayd enroll`): a key made here, a
//! certificate request sent with the single-use token to the first hub that
//! answers, the certificate and key stored where `[uplink]` says. The hub's
//! half is [`super::hub::Fleet::enroll`].

use std::time::Duration;

use gateway_core::config::{Config, Role};
use gateway_core::fleet::{EnrollAnswer, EnrollRequest};

use super::{read_msg, write_msg};
use crate::tunnel::pki::{self, PkiError};
use crate::tunnel::tls;

/// Enrollment failed.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    /// A file or the key.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// TLS setup.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// No hub could be reached.
    #[error("no hub answered: {0}")]
    Unreachable(String),
    /// The hub refused.
    #[error("the hub refused the enrollment: {0}")]
    Refused(String),
}

/// Enrolls this box: makes a key here, sends a certificate request with the
/// token to the first hub that answers, and stores the certificate and key
/// where `[uplink]` says. Returns the hub that signed and the expiry (Unix ms).
///
/// # Errors
/// When no hub answers or the hub refuses.
pub async fn enroll(config: &Config, token: &str) -> Result<(String, i64), EnrollError> {
    let Role::Edge(e) = &config.role else {
        return Err(EnrollError::Refused(
            "only an edge enrolls; this config is a hub's".into(),
        ));
    };
    let id = config.node.id.clone();
    let (key_pem, csr_pem) = pki::new_request(&id)?;
    let client = tls::enroll_client(&super::edge::trust_path(
        &config.node.state_dir,
        &e.uplink.ca.path,
    ))?;
    let any: std::net::SocketAddr = ([0, 0, 0, 0], 0).into();
    let endpoint =
        quinn::Endpoint::client(any).map_err(|e| EnrollError::Unreachable(e.to_string()))?;
    let mut why = Vec::new();
    for hub in &e.uplink.hubs {
        let target = format!("{}:{}", hub.host, hub.port);
        let attempt = async {
            let addr = tokio::net::lookup_host(&target)
                .await
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| format!("cannot resolve {target}"))?;
            let conn = endpoint
                .connect_with(client.clone(), addr, &hub.host)
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let req = EnrollRequest {
                token: token.trim().to_owned(),
                device: id.clone(),
                csr_pem: csr_pem.clone(),
            };
            write_msg(&mut send, &req)
                .await
                .map_err(|e| e.to_string())?;
            let _ = send.finish();
            let answer: EnrollAnswer = read_msg(&mut recv).await.map_err(|e| e.to_string())?;
            conn.close(quinn::VarInt::from_u32(0), b"enrolled");
            Ok::<_, String>(answer)
        };
        match tokio::time::timeout(Duration::from_secs(15), attempt).await {
            Ok(Ok(EnrollAnswer::Issued { cert_pem })) => {
                let (_, not_after) = pki::validity(&cert_pem)
                    .ok_or_else(|| EnrollError::Refused("the certificate does not parse".into()))?;
                for file in [&e.uplink.key.path, &e.uplink.cert.path] {
                    if let Some(dir) = file.parent() {
                        std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
                            path: dir.to_owned(),
                            source,
                        })?;
                    }
                }
                pki::write_pair(&e.uplink.key.path, &key_pem, &e.uplink.cert.path, &cert_pem)?;
                endpoint.wait_idle().await;
                return Ok((hub.to_string(), not_after));
            }
            Ok(Ok(EnrollAnswer::Refused { reason })) => return Err(EnrollError::Refused(reason)),
            Ok(Err(e)) => why.push(format!("{hub}: {e}")),
            Err(_) => why.push(format!("{hub}: no answer within 15 s")),
        }
    }
    Err(EnrollError::Unreachable(why.join("; ")))
}

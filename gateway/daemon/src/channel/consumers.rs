//! Consumers: the applications that read the hub's sink, each identified by a
//! certificate the hub's CA issued it (`NAME.consumer`, client authentication
//! only), never by its address. The registry keeps each consumer's name and
//! the serial of its one certificate; the sink keeps its grants, which are its
//! cursors. A revoked consumer's grants go and its connections are closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use gateway_store::registry::{Registry, RegistryError};
use rustls_pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;

use super::hub_sink::SinkHandle;
use crate::node::clock::now_ms;
use crate::tunnel::pki;

/// Why a request is not a consumer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotConsumer {
    /// No client certificate.
    NoCertificate,
    /// A certificate of the hub's CA, but not a consumer's (a device's, a hub's).
    NotAConsumer,
    /// A consumer certificate the registry does not know, or a replaced one.
    Unknown(String),
    /// The consumer is revoked.
    Revoked(String),
}

impl NotConsumer {
    /// What to tell the client, and the audit.
    pub fn reason(&self) -> String {
        match self {
            NotConsumer::NoCertificate => {
                "no client certificate: present the consumer certificate the hub issued (curl --cert NAME.pem --key NAME.key)".into()
            }
            NotConsumer::NotAConsumer => {
                "the client certificate is not a consumer's (a device's or a hub's is not accepted here)".into()
            }
            NotConsumer::Unknown(name) => {
                format!("consumer {name}: this certificate is not the one the hub issued it")
            }
            NotConsumer::Revoked(name) => format!("consumer {name} is revoked"),
        }
    }

    /// The name the certificate claims, for the audit's detail.
    pub fn claimed(&self) -> &str {
        match self {
            NotConsumer::Unknown(n) | NotConsumer::Revoked(n) => n,
            _ => "",
        }
    }
}

/// The hub's consumers: who they are (registry), what they may read (the
/// sink's grants), and their open connections.
pub struct Consumers {
    registry: Arc<dyn Registry>,
    sink: SinkHandle,
    /// Per consumer with a connection open: the parent of its connections'
    /// closing tokens (a dropped connection's child token leaves by itself).
    live: Mutex<HashMap<String, CancellationToken>>,
}

impl Consumers {
    /// Consumers over the hub's registry and sink.
    pub fn new(registry: Arc<dyn Registry>, sink: SinkHandle) -> Arc<Self> {
        Arc::new(Consumers {
            registry,
            sink,
            live: Mutex::default(),
        })
    }

    /// The registry.
    pub fn registry(&self) -> &dyn Registry {
        &*self.registry
    }

    /// The sink.
    pub fn sink(&self) -> &SinkHandle {
        &self.sink
    }

    /// The closing token of a new connection: tied to the consumer its
    /// certificate names, so [`Consumers::close`] ends it.
    pub fn admit(&self, tls: &rustls::ServerConnection) -> CancellationToken {
        let name = tls
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(pki::consumer_of)
            .map(|(name, _)| name);
        let Some(name) = name else {
            return CancellationToken::new();
        };
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        // One entry per consumer that connected since the start: the names
        // come from certificates the hub's CA issued, so they are bounded.
        live.entry(name).or_default().child_token()
    }

    /// Closes every open connection of `name`.
    pub fn close(&self, name: &str) {
        let parent = self
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        if let Some(parent) = parent {
            parent.cancel();
        }
    }

    /// The consumer a request's verified certificate names, if the registry
    /// knows it by this very certificate and it is not revoked.
    ///
    /// # Errors
    /// [`NotConsumer`] saying which; the registry's failure apart.
    pub async fn identify(
        &self,
        cert: Option<&CertificateDer<'static>>,
    ) -> Result<Result<String, NotConsumer>, RegistryError> {
        let Some(cert) = cert else {
            return Ok(Err(NotConsumer::NoCertificate));
        };
        let Some((name, serial)) = pki::consumer_of(cert) else {
            return Ok(Err(NotConsumer::NotAConsumer));
        };
        let Some(row) = self.registry.consumer(name.clone()).await? else {
            return Ok(Err(NotConsumer::Unknown(name)));
        };
        if row.revoked_ms.is_some() {
            return Ok(Err(NotConsumer::Revoked(name)));
        }
        if row.serial != serial || row.not_after_ms < now_ms() {
            return Ok(Err(NotConsumer::Unknown(name)));
        }
        Ok(Ok(name))
    }
}

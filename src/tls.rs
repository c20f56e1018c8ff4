//! TLS for the listeners (rustls): server configurations from PEM files and optional client
//! certificate verification. Handshakes run in `listener`, one task per connection.

use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The `[tls]` settings.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain and private key: set both to serve TLS on every listener.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// PEM CA certificates: OTLP clients must present a certificate signed by one of them.
    pub client_ca_file: Option<PathBuf>,
    /// Serve the admin listener without TLS (e.g. for a local metrics scraper).
    pub plain_admin: bool,
}

impl TlsConfig {
    pub fn files(&self) -> Option<TlsFiles> {
        Some(TlsFiles {
            cert: self.cert_file.clone()?,
            key: self.key_file.clone()?,
            client_ca: self.client_ca_file.clone(),
        })
    }
}

/// Certificate files, as configured.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Clients must present a certificate signed by one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS cannot be set up (never retryable: the files must be fixed).
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("tls: {0}")]
    Config(String),
}

impl TlsError {
    pub fn is_retryable(&self) -> bool {
        false
    }
}

fn file_err(path: &std::path::Path, message: impl std::fmt::Display) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn certs(path: &std::path::Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

impl TlsFiles {
    /// A rustls server configuration; client certificates are required when `verify_clients`
    /// and a client CA is configured.
    pub fn server_config(
        &self,
        verify_clients: bool,
    ) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        crate::install_crypto_provider();
        let chain = certs(&self.cert)?;
        let key = PrivateKeyDer::from_pem_file(&self.key).map_err(|e| file_err(&self.key, e))?;
        let builder = rustls::ServerConfig::builder();
        let builder = match (&self.client_ca, verify_clients) {
            (Some(ca), true) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in certs(ca)? {
                    roots.add(c).map_err(|e| file_err(ca, e))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                    .build()
                    .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

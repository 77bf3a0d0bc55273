//! rustls configurations for mutual TLS 1.3 between fleet nodes.
//!
//! Servers require a client certificate chaining to the fleet CA and not on the revocation list;
//! clients verify the server's chain, revocation and fixed server name. Expired and not-yet-valid
//! certificates fail the handshake. One crypto provider (ring) is used everywhere, passed
//! explicitly, so no process-wide default is needed. 0-RTT is never enabled: early data could be
//! replayed, and every tidesync frame after the handshake may be a write.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme};

use super::pki;

/// ALPN protocol id of the tidesync sync protocol, version 1.
pub const ALPN: &[u8] = b"tidesync/1";

/// What a node needs for TLS: the fleet CA, its own certificate and key, and the revocation list.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The fleet CA certificate, PEM.
    pub ca_pem: String,
    /// This node's certificate, PEM.
    pub cert_pem: String,
    /// This node's private key, PEM.
    pub key_pem: String,
    /// Revocation lists, PEM (empty when none is configured).
    pub crl_pem: Option<String>,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A PEM input that does not parse.
    #[error("{what} is not valid PEM: {reason}")]
    Pem {
        /// Which input.
        what: &'static str,
        /// What the parser said.
        reason: String,
    },
    /// A PEM input with nothing of the expected kind in it.
    #[error("{what} holds no {kind}")]
    Empty {
        /// Which input.
        what: &'static str,
        /// What was expected.
        kind: &'static str,
    },
    /// rustls refused the configuration.
    #[error("tls: {0}")]
    Rustls(#[from] rustls::Error),
    /// The certificate verifier could not be built (e.g. a CRL that does not parse).
    #[error("certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(what: &'static str, pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem { what, reason: error.to_string() })?;
    if certs.is_empty() {
        return Err(TlsError::Empty { what, kind: "certificate" });
    }
    Ok(certs)
}

fn key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes())
        .map_err(|error| TlsError::Pem { what: "private key", reason: error.to_string() })
}

fn crls(credentials: &Credentials) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let Some(pem) = &credentials.crl_pem else { return Ok(Vec::new()) };
    CertificateRevocationListDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem { what: "revocation list", reason: error.to_string() })
}

fn roots(credentials: &Credentials) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs("fleet CA", &credentials.ca_pem)? {
        roots.add(cert)?;
    }
    Ok(Arc::new(roots))
}

/// A server configuration that requires and verifies client certificates.
pub fn server_config(credentials: &Credentials) -> Result<ServerConfig, TlsError> {
    let inner = WebPkiClientVerifier::builder_with_provider(roots(credentials)?, provider())
        .with_crls(crls(credentials)?)
        .build()?;
    let verifier = Arc::new(LoggingClientVerifier { inner });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs("certificate", &credentials.cert_pem)?, key(&credentials.key_pem)?)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.max_early_data_size = 0;
    Ok(config)
}

/// A client configuration that presents this node's certificate and verifies the server's.
pub fn client_config(credentials: &Credentials) -> Result<ClientConfig, TlsError> {
    let inner = WebPkiServerVerifier::builder_with_provider(roots(credentials)?, provider())
        .with_crls(crls(credentials)?)
        .build()?;
    let verifier = Arc::new(LoggingServerVerifier { inner });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs("certificate", &credentials.cert_pem)?, key(&credentials.key_pem)?)?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_early_data = false;
    Ok(config)
}

/// Why a peer's certificate was refused, in words for an operator: the tidesync identity it names
/// (when it parses) and what was wrong with it.
pub fn refusal(cert_der: &[u8], error: &rustls::Error) -> String {
    let holder = match pki::identity_of(cert_der) {
        Ok(identity) => format!("{identity}"),
        Err(_) => "a certificate without a tidesync identity".to_string(),
    };
    let reason = match error {
        rustls::Error::InvalidCertificate(cert_error) => match cert_error {
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                "it has expired".to_string()
            }
            rustls::CertificateError::NotValidYet | rustls::CertificateError::NotValidYetContext { .. } => {
                "it is not valid yet".to_string()
            }
            rustls::CertificateError::Revoked => "it is on the fleet revocation list".to_string(),
            rustls::CertificateError::UnknownIssuer => "it was not issued by the fleet CA".to_string(),
            rustls::CertificateError::UnknownRevocationStatus => {
                "no revocation list of its issuer covers it (not issued by the fleet CA?)".to_string()
            }
            rustls::CertificateError::ExpiredRevocationList
            | rustls::CertificateError::ExpiredRevocationListContext { .. } => {
                "the fleet revocation list has expired: issue a new one".to_string()
            }
            rustls::CertificateError::BadSignature => "its signature does not verify".to_string(),
            rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. } => {
                "it does not name the expected server".to_string()
            }
            other => format!("{other:?}"),
        },
        other => other.to_string(),
    };
    format!("refused {holder}: {reason}")
}

/// The webpki client verifier, plus a log line saying who was refused and why: rustls alone only
/// tells the peer, and an operator needs to see revoked or expired devices knocking.
#[derive(Debug)]
struct LoggingClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for LoggingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner.verify_client_cert(end_entity, intermediates, now).inspect_err(|error| {
            tracing::warn!(peer = "client", "tls: {}", refusal(end_entity, error));
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The webpki server verifier with the same log line as [`LoggingClientVerifier`].
#[derive(Debug)]
struct LoggingServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
}

impl ServerCertVerifier for LoggingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now).inspect_err(|error| {
            tracing::warn!(peer = "server", "tls: {}", refusal(end_entity, error));
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

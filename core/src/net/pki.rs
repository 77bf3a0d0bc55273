//! The fleet PKI: a fleet CA, certificates for devices, gateways and the cloud, and revocation
//! lists. Every certificate names its holder in a URI subject-alternative name
//! (`tidesync:device:NAME`, `tidesync:gateway:NAME`, `tidesync:cloud`), which is how a server learns
//! who a client is; servers also carry a fixed DNS name (`gateway.tidesync.invalid`,
//! `cloud.tidesync.invalid`) that clients verify, so any fleet gateway is accepted and nothing else.
//!
//! Times and serial numbers are passed in; key generation draws from the operating system.

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason, RevokedCertParams,
    SanType, SerialNumber,
};

use crate::event::{DeviceId, GatewayId, Millis, NameError};

/// DNS name every gateway's certificate carries and devices verify.
pub const GATEWAY_SERVER_NAME: &str = "gateway.tidesync.invalid";
/// DNS name the cloud's certificate carries and gateways verify.
pub const CLOUD_SERVER_NAME: &str = "cloud.tidesync.invalid";
const IDENTITY_PREFIX: &str = "tidesync:";

/// Who a certificate belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Identity {
    /// A device.
    Device(DeviceId),
    /// A gateway.
    Gateway(GatewayId),
    /// The cloud.
    Cloud,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identity::Device(device) => write!(f, "device {device}"),
            Identity::Gateway(gateway) => write!(f, "gateway {gateway}"),
            Identity::Cloud => write!(f, "cloud"),
        }
    }
}

impl Identity {
    fn uri(&self) -> String {
        match self {
            Identity::Device(device) => format!("{IDENTITY_PREFIX}device:{device}"),
            Identity::Gateway(gateway) => format!("{IDENTITY_PREFIX}gateway:{gateway}"),
            Identity::Cloud => format!("{IDENTITY_PREFIX}cloud"),
        }
    }

    fn from_uri(uri: &str) -> Result<Option<Identity>, PkiError> {
        let Some(rest) = uri.strip_prefix(IDENTITY_PREFIX) else { return Ok(None) };
        let identity = match rest.split_once(':') {
            Some(("device", name)) => Identity::Device(DeviceId::new(name)?),
            Some(("gateway", name)) => Identity::Gateway(GatewayId::new(name)?),
            None if rest == "cloud" => Identity::Cloud,
            _ => return Err(PkiError::NoIdentity),
        };
        Ok(Some(identity))
    }

    fn common_name(&self) -> String {
        match self {
            Identity::Device(device) => device.to_string(),
            Identity::Gateway(gateway) => gateway.to_string(),
            Identity::Cloud => "cloud".into(),
        }
    }
}

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen could not make or sign a certificate or key.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A certificate that does not parse.
    #[error("certificate does not parse: {0}")]
    Parse(String),
    /// A certificate without a tidesync identity.
    #[error("certificate names no tidesync identity (a URI SAN tidesync:device:NAME, tidesync:gateway:NAME or tidesync:cloud)")]
    NoIdentity,
    /// The identity's name is invalid.
    #[error("identity name: {0}")]
    Name(#[from] NameError),
    /// A time outside what X.509 can hold.
    #[error("time {0:?} is out of range")]
    Time(Millis),
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Random,
}

/// A certificate with its private key, both PEM.
#[derive(Clone, Debug)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8). Store with 0600 permissions.
    pub key_pem: String,
}

/// The fleet's certificate authority.
pub struct FleetCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
    key_pem: String,
}

impl std::fmt::Debug for FleetCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetCa").field("cert_pem", &self.cert_pem).finish_non_exhaustive()
    }
}

fn offset_time(at: Millis) -> Result<time::OffsetDateTime, PkiError> {
    let nanos = i128::from(at.0) * 1_000_000;
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos).map_err(|_| PkiError::Time(at))
}

impl FleetCa {
    /// A new CA for the fleet named `fleet`, valid from `not_before` to `not_after`.
    pub fn create(fleet: &str, not_before: Millis, not_after: Millis) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, format!("tidesync fleet CA {fleet}"));
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.not_before = offset_time(not_before)?;
        params.not_after = offset_time(not_after)?;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Ok(Self { issuer: Issuer::new(params, key), cert_pem: cert.pem(), key_pem })
    }

    /// Loads a CA saved with [`FleetCa::cert_pem`] and [`FleetCa::key_pem`].
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self { issuer, cert_pem: cert_pem.to_string(), key_pem: key_pem.to_string() })
    }

    /// The CA certificate, PEM: every node trusts it.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key, PEM. Keep it offline, 0600.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Issues a certificate for `identity` with serial number `serial`.
    pub fn issue(
        &self,
        identity: Identity,
        serial: u64,
        not_before: Millis,
        not_after: Millis,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, identity.common_name());
        params.distinguished_name = name;
        params.serial_number = Some(SerialNumber::from(serial.to_be_bytes().to_vec()));
        params.not_before = offset_time(not_before)?;
        params.not_after = offset_time(not_after)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.key_identifier_method = KeyIdMethod::Sha256;
        let uri = SanType::URI(identity.uri().try_into()?);
        params.subject_alt_names = match identity {
            Identity::Device(_) => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
                vec![uri]
            }
            Identity::Gateway(_) => {
                // A gateway is a server to its devices and a client of the cloud.
                params.extended_key_usages =
                    vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
                vec![uri, SanType::DnsName(GATEWAY_SERVER_NAME.try_into()?)]
            }
            Identity::Cloud => {
                params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
                vec![uri, SanType::DnsName(CLOUD_SERVER_NAME.try_into()?)]
            }
        };
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A revocation list naming `revoked_serials`, valid from `this_update` to `next_update`.
    pub fn revocation_list(
        &self,
        crl_number: u64,
        revoked_serials: &[u64],
        this_update: Millis,
        next_update: Millis,
    ) -> Result<String, PkiError> {
        let revoked_certs = revoked_serials
            .iter()
            .map(|serial| {
                Ok(RevokedCertParams {
                    serial_number: SerialNumber::from(serial.to_be_bytes().to_vec()),
                    revocation_time: offset_time(this_update)?,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
            })
            .collect::<Result<Vec<_>, PkiError>>()?;
        let params = CertificateRevocationListParams {
            this_update: offset_time(this_update)?,
            next_update: offset_time(next_update)?,
            crl_number: SerialNumber::from(crl_number.to_be_bytes().to_vec()),
            issuing_distribution_point: None,
            revoked_certs,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// A new device signing key: a 32-byte Ed25519 seed from the operating system's random number
/// generator (the one TLS uses). Write it with [`crate::auth::format_seed`], mode 0600.
pub fn signing_seed() -> Result<[u8; crate::auth::SEED_BYTES], PkiError> {
    let mut seed = [0u8; crate::auth::SEED_BYTES];
    rustls::crypto::ring::default_provider().secure_random.fill(&mut seed).map_err(|_| PkiError::Random)?;
    Ok(seed)
}

/// The tidesync identity a certificate (DER) names.
pub fn identity_of(cert_der: &[u8]) -> Result<Identity, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|error| PkiError::Parse(error.to_string()))?;
    let names = cert
        .subject_alternative_name()
        .map_err(|error| PkiError::Parse(error.to_string()))?
        .ok_or(PkiError::NoIdentity)?;
    for name in &names.value.general_names {
        if let x509_parser::extensions::GeneralName::URI(uri) = name {
            if let Some(identity) = Identity::from_uri(uri)? {
                return Ok(identity);
            }
        }
    }
    Err(PkiError::NoIdentity)
}

/// The serial number of a certificate (DER), as issued by [`FleetCa::issue`].
pub fn serial_of(cert_der: &[u8]) -> Result<u64, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|error| PkiError::Parse(error.to_string()))?;
    let bytes = cert.raw_serial();
    // DER may prefix a zero byte to keep the integer positive; more than 8 significant bytes are
    // not a serial we issued.
    let significant: Vec<u8> = bytes.iter().copied().skip_while(|byte| *byte == 0).collect();
    if significant.len() > 8 {
        return Err(PkiError::Parse(format!("serial number of {} bytes is not a fleet serial", bytes.len())));
    }
    Ok(significant.iter().fold(0u64, |serial, byte| (serial << 8) | u64::from(*byte)))
}

/// The DER bytes of the first certificate in `pem`.
pub fn first_cert_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| PkiError::Parse("no certificate in PEM".into()))?
        .map(|cert| cert.to_vec())
        .map_err(|error| PkiError::Parse(error.to_string()))
}

//! Offline identity: a private CA and the certificates it issues (rcgen).
//!
//! `gatewayd pki init --out DIR` writes `ca.pem` and `ca.key`; `gatewayd pki issue`
//! writes `ID.pem` and `ID.key`. The certificate's first DNS name is the node id:
//! the hub takes a device's id from it, never from what the device says. Private
//! keys are written with mode 0600, and [`check_key_file`] refuses to load one that
//! group or others can read.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// A PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Refusing to overwrite an existing key or certificate.
    #[error("{0} already exists; remove it first or write elsewhere with --out")]
    Exists(PathBuf),
    /// rcgen refused.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A node id or subject name is malformed.
    #[error("{0}")]
    BadName(String),
    /// A private key file is readable by group or others.
    #[error("{path} is readable by group or others (mode {mode:o}); run: chmod 600 {path}", path = .path.display())]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `contents` to a new file with `mode`, refusing to overwrite.
///
/// # Errors
/// When the file exists or cannot be written.
pub fn write_new(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    if path.exists() {
        return Err(PkiError::Exists(path.to_owned()));
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io(path))?;
    f.write_all(contents.as_bytes()).map_err(io(path))?;
    f.sync_all().map_err(io(path))
}

fn ca_params(name: &str) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.distinguished_name
        .push(DnType::OrganizationName, "gatewayd");
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ((y0, m0, d0), (y1, m1, d1)) = (ymd(-1), ymd(3650));
    p.not_before = rcgen::date_time_ymd(y0, m0, d0);
    p.not_after = rcgen::date_time_ymd(y1, m1, d1);
    Ok(p)
}

/// Midnight UTC, `offset` days from today. Certificates start a day early so a
/// box whose clock lags a little accepts them.
fn ymd(offset: i64) -> (i32, u8, u8) {
    let d = gateway_core::units::Date::from_unix_ms(crate::node::clock::now_ms()).add_days(offset);
    (d.year(), d.month(), d.day())
}

/// Creates a private CA in `out` (`ca.pem`, `ca.key`). Returns the files written.
///
/// # Errors
/// When a file exists already or cannot be written.
pub fn init(out: &Path, name: &str) -> Result<Vec<PathBuf>, PkiError> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let key = KeyPair::generate()?;
    let cert = ca_params(name)?.self_signed(&key)?;
    let (cert_path, key_path) = (out.join("ca.pem"), out.join("ca.key"));
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(vec![cert_path, key_path])
}

/// Issues a certificate for node `id` from the CA in `ca_dir`, with extra subject
/// names `sans` (DNS names or IP addresses, for hubs), valid `days`. Writes
/// `out/ID.pem` and `out/ID.key`; returns their paths.
///
/// # Errors
/// When the id is not a valid node id, the CA cannot be read, or a file exists.
pub fn issue(
    ca_dir: &Path,
    id: &str,
    sans: &[String],
    days: u32,
    out: &Path,
) -> Result<Vec<PathBuf>, PkiError> {
    let ((y0, m0, d0), (y1, m1, d1)) = (ymd(-1), ymd(i64::from(days)));
    let valid = (
        rcgen::date_time_ymd(y0, m0, d0),
        rcgen::date_time_ymd(y1, m1, d1),
    );
    issue_valid(ca_dir, id, sans, valid, out)
}

/// [`issue`] for a certificate valid from `since` ago until `left` from
/// now: short-lived ones, or ones already due for renewal, for tests and the
/// fleet simulator.
///
/// # Errors
/// As [`issue`].
pub fn issue_for(
    ca_dir: &Path,
    id: &str,
    (since, left): (Duration, Duration),
    out: &Path,
) -> Result<Vec<PathBuf>, PkiError> {
    let now = time::OffsetDateTime::now_utc();
    let valid = (now - since, now + left);
    issue_valid(ca_dir, id, &[], valid, out)
}

fn issue_valid(
    ca_dir: &Path,
    id: &str,
    sans: &[String],
    (not_before, not_after): (time::OffsetDateTime, time::OffsetDateTime),
    out: &Path,
) -> Result<Vec<PathBuf>, PkiError> {
    gateway_core::units::check_name("device", id)
        .map_err(|e| PkiError::BadName(format!("--id: {}; {}", e.message, e.hint)))?;
    let (ca_cert_path, ca_key_path) = (ca_dir.join("ca.pem"), ca_dir.join("ca.key"));
    check_key_file(&ca_key_path)?;
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(io(&ca_cert_path))?;
    let ca_key =
        KeyPair::from_pem(&std::fs::read_to_string(&ca_key_path).map_err(io(&ca_key_path))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;

    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, id);
    p.subject_alt_names.push(SanType::DnsName(id.try_into()?));
    for san in sans {
        let entry = match san.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(san.as_str().try_into().map_err(|_| {
                PkiError::BadName(format!(
                    "--san {san:?} is neither a DNS name nor an IP address"
                ))
            })?),
        };
        p.subject_alt_names.push(entry);
    }
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = not_before;
    p.not_after = not_after;
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let (cert_path, key_path) = (out.join(format!("{id}.pem")), out.join(format!("{id}.key")));
    write_new(&key_path, &key.serialize_pem(), 0o600)?;
    write_new(&cert_path, &cert.pem(), 0o644)?;
    Ok(vec![cert_path, key_path])
}

/// Refuses a private key file that group or others may read.
///
/// # Errors
/// [`PkiError::KeyPermissions`], or [`PkiError::Io`] when it cannot be examined.
pub fn check_key_file(path: &Path) -> Result<(), PkiError> {
    let mode = std::fs::metadata(path)
        .map_err(io(path))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o077 != 0 {
        return Err(PkiError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    Ok(())
}

/// The hub's CA, loaded to sign devices' certificate requests.
pub struct Signer {
    issuer: Issuer<'static, KeyPair>,
}

impl Signer {
    /// Loads the CA certificate and key (the key must be 0600).
    ///
    /// # Errors
    /// When a file cannot be read or is not a CA certificate and key.
    pub fn load(ca_cert: &Path, ca_key: &Path) -> Result<Self, PkiError> {
        check_key_file(ca_key)?;
        let pem = std::fs::read_to_string(ca_cert).map_err(io(ca_cert))?;
        let key = KeyPair::from_pem(&std::fs::read_to_string(ca_key).map_err(io(ca_key))?)?;
        Ok(Signer {
            issuer: Issuer::from_ca_cert_pem(&pem, key)?,
        })
    }

    /// Signs `csr_pem` for device `id`, valid `lifetime` from `now_ms` (started
    /// up to five minutes early, at most a quarter of the lifetime, for clocks
    /// that lag). Only the CSR's public key is taken: names, usages and validity
    /// are the hub's. Returns the certificate (PEM), its expiry (Unix ms) and
    /// its serial (hex, as [`serial_of_pem`] reads it).
    ///
    /// # Errors
    /// When the CSR does not parse, its signature does not verify, or it does
    /// not name `id`.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &str,
        now_ms: i64,
        lifetime: std::time::Duration,
    ) -> Result<(String, i64, String), PkiError> {
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let names_id = csr
            .params
            .subject_alt_names
            .iter()
            .any(|s| matches!(s, SanType::DnsName(n) if n.as_str() == id));
        if !names_id {
            return Err(PkiError::BadName(format!(
                "the certificate request does not name device {id}"
            )));
        }
        let life_ms = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX / 2);
        let early_ms = (life_ms / 4).min(300_000);
        let at = |ms: i64| {
            time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
                .map_err(|e| PkiError::BadName(format!("certificate time: {e}")))
        };
        let not_after_ms = now_ms + life_ms;
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, id);
        p.subject_alt_names.push(SanType::DnsName(id.try_into()?));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.not_before = at(now_ms - early_ms)?;
        p.not_after = at(not_after_ms)?;
        // Positive, so it reads back as written.
        let mut serial: [u8; 16] = rand::random();
        serial[0] &= 0x7f;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        csr.params = p;
        let cert = csr.signed_by(&self.issuer)?;
        Ok((
            cert.pem(),
            not_after_ms.div_euclid(1000) * 1000,
            serial_hex(&serial),
        ))
    }
}

/// The DNS name a consumer's certificate carries: `NAME.consumer`. A node id
/// has no dot, so no consumer certificate names a device or a hub, and no
/// device certificate names a consumer.
pub fn consumer_dns_name(name: &str) -> String {
    format!("{name}{CONSUMER_SUFFIX}")
}

/// What follows a consumer's name in its certificate's DNS name.
pub const CONSUMER_SUFFIX: &str = ".consumer";

impl Signer {
    /// Signs `csr_pem` for consumer `name`, valid `days` from `now_ms`. Only
    /// the CSR's public key is taken: the names (`NAME.consumer`), usage
    /// (client authentication only) and validity are the hub's. Returns the
    /// certificate (PEM), its expiry (Unix ms) and its serial (hex).
    ///
    /// # Errors
    /// When the CSR does not parse or its signature does not verify.
    pub fn sign_consumer(
        &self,
        csr_pem: &str,
        name: &str,
        now_ms: i64,
        days: u32,
    ) -> Result<(String, i64, String), PkiError> {
        gateway_core::units::check_name("consumer", name)
            .map_err(|e| PkiError::BadName(format!("name: {}; {}", e.message, e.hint)))?;
        let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
        let at = |ms: i64| {
            time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000))
                .map_err(|e| PkiError::BadName(format!("certificate time: {e}")))
        };
        let not_after_ms = now_ms + i64::from(days) * 86_400_000;
        let serial: [u8; 16] = rand::random();
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, name);
        p.distinguished_name
            .push(DnType::OrganizationalUnitName, "consumer");
        p.subject_alt_names
            .push(SanType::DnsName(consumer_dns_name(name).try_into()?));
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = at(now_ms - 300_000)?;
        p.not_after = at(not_after_ms)?;
        // The serial is positive DER: a leading zero bit, so it reads back as given.
        let mut serial = serial;
        serial[0] &= 0x7f;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        csr.params = p;
        let cert = csr.signed_by(&self.issuer)?;
        Ok((
            cert.pem(),
            not_after_ms.div_euclid(1000) * 1000,
            serial_hex(&serial),
        ))
    }
}

/// The serial (hex) of a certificate in PEM.
pub fn serial_of_pem(cert_pem: &str) -> Option<String> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    serial_of(&der)
}

/// The serial (hex) of a certificate.
pub fn serial_of(cert: &rustls_pki_types::CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    Some(serial_hex(parsed.raw_serial()))
}

/// Lowercase hex of a serial's bytes, leading zero bytes dropped (as x509
/// readers print it).
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let hex = gateway_core::hex::encode(&bytes[start..]);
    if hex.is_empty() { "00".into() } else { hex }
}

/// The consumer a verified client certificate names, and the certificate's
/// serial (hex): `None` when it is not a consumer's.
pub fn consumer_of(cert: &rustls_pki_types::CertificateDer<'_>) -> Option<(String, String)> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert).ok()?;
    let san = parsed.subject_alternative_name().ok()??;
    let name = san.value.general_names.iter().find_map(|n| match n {
        x509_parser::extensions::GeneralName::DNSName(d) => d.strip_suffix(CONSUMER_SUFFIX),
        _ => None,
    })?;
    gateway_core::units::check_name("consumer", name).ok()?;
    Some((name.to_owned(), serial_hex(parsed.raw_serial())))
}

/// A new key and a certificate request for consumer `name`: (key PEM, CSR PEM).
///
/// # Errors
/// When `name` is not a valid name.
pub fn new_consumer_request(name: &str) -> Result<(String, String), PkiError> {
    gateway_core::units::check_name("consumer", name)
        .map_err(|e| PkiError::BadName(format!("name: {}; {}", e.message, e.hint)))?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, name);
    p.subject_alt_names
        .push(SanType::DnsName(consumer_dns_name(name).try_into()?));
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// A new key for device `id` and a certificate request for it: (key PEM, CSR PEM).
///
/// # Errors
/// When `id` is not a valid DNS name.
pub fn new_request(id: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, id);
    p.subject_alt_names.push(SanType::DnsName(id.try_into()?));
    let csr = p.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// The SHA-256 fingerprint (lowercase hex of the DER) of every certificate
/// in `pem` (a CA file or bundle), in the file's order; what a box reports
/// it trusts, and what `pki bundle` prints.
pub fn fingerprints(pem: &str) -> Vec<String> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|der| {
            gateway_core::hex::encode(ring::digest::digest(&ring::digest::SHA256, &der).as_ref())
        })
        .collect()
}

/// The most certificates a bundle holds (a rotation needs two or three).
pub const MAX_BUNDLE: usize = 8;

/// Writes `out` (mode 0644, never over an existing file) holding the CA
/// certificates of `certs` in that order (the first is the one a hub signs
/// with); returns their fingerprints. Each file must hold CA certificates
/// only, and no certificate may be listed twice.
///
/// # Errors
/// A file that cannot be read, holds no certificate or one that is not a
/// CA, a duplicate, more than [`MAX_BUNDLE`], or `out` exists.
pub fn bundle(certs: &[PathBuf], out: &Path) -> Result<Vec<String>, PkiError> {
    let mut text = String::new();
    let mut seen: Vec<String> = Vec::new();
    for path in certs {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        if meta.len() > 1 << 20 {
            return Err(PkiError::BadName(format!(
                "{}: over 1 MiB, not a CA certificate",
                path.display()
            )));
        }
        let pem = std::fs::read_to_string(path).map_err(io(path))?;
        let (one, fps) = checked_bundle(&pem)
            .map_err(|e| PkiError::BadName(format!("{}: {e}", path.display())))?;
        if let Some(fp) = fps.iter().find(|f| seen.contains(f)) {
            return Err(PkiError::BadName(format!(
                "{}: CA {fp} is already in the bundle",
                path.display()
            )));
        }
        seen.extend(fps);
        text += &one;
    }
    if seen.len() > MAX_BUNDLE {
        return Err(PkiError::BadName(format!(
            "{} CA certificates: a bundle holds at most {MAX_BUNDLE}",
            seen.len()
        )));
    }
    write_new(out, &text, 0o644)?;
    Ok(seen)
}

/// Checks a CA bundle's text: one to [`MAX_BUNDLE`] certificates, each a
/// CA's, none twice, nothing else taken. Returns the certificates alone, as
/// PEM, and their fingerprints.
///
/// # Errors
/// What is wrong, for a message.
pub fn checked_bundle(pem: &str) -> Result<(String, Vec<String>), String> {
    use rustls_pki_types::pem::PemObject as _;
    let ders: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| e.to_string())?;
    if ders.is_empty() {
        return Err("no certificate in the file".into());
    }
    if ders.len() > MAX_BUNDLE {
        return Err(format!(
            "{} CA certificates: a bundle holds at most {MAX_BUNDLE}",
            ders.len()
        ));
    }
    let mut text = String::new();
    let mut seen = Vec::new();
    for der in ders {
        let ca = x509_parser::parse_x509_certificate(&der)
            .map(|(_, c)| c.is_ca())
            .unwrap_or(false);
        if !ca {
            return Err(
                "holds a certificate that is not a CA's (give the ca.pem of each `pki init` directory)"
                    .into(),
            );
        }
        let fp =
            gateway_core::hex::encode(ring::digest::digest(&ring::digest::SHA256, &der).as_ref());
        if seen.contains(&fp) {
            return Err(format!("CA {fp} is in it twice"));
        }
        seen.push(fp);
        text += &pem_of(&rustls_pki_types::CertificateDer::from(der.to_vec()));
    }
    Ok((text, seen))
}

/// Signs a CA bundle for the boxes with the CA's key (`ca_key`, ECDSA P-256
/// as `pki init` makes): hex of the signature over
/// [`gateway_core::fleet::ca_bundle_signed`].
///
/// # Errors
/// The key does not parse or cannot sign.
pub fn sign_ca_bundle(ca_key_pem: &str, pem: &str, issued_ms: i64) -> Result<String, String> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(ca_key_pem.as_bytes())
        .map_err(|e| format!("the CA key: {e}"))?;
    let rng = ring::rand::SystemRandom::new();
    let pair = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        der.secret_pkcs8_der(),
        &rng,
    )
    .map_err(|e| format!("the CA key is not an ECDSA P-256 key: {e}"))?;
    let sig = pair
        .sign(&rng, &gateway_core::fleet::ca_bundle_signed(pem, issued_ms))
        .map_err(|_| "the CA key cannot sign".to_owned())?;
    Ok(gateway_core::hex::encode(sig.as_ref()))
}

/// Checks a CA bundle a hub sent: it is a bundle ([`checked_bundle`]), one
/// of the CAs in `trusted_pem` (what the box trusts now) signed it, and that
/// CA is in it (the box keeps trusting its signer). Returns the signer's
/// fingerprint and the bundle's.
///
/// # Errors
/// What does not hold, for the log and the audit.
pub fn verify_ca_bundle(
    trusted_pem: &str,
    pem: &str,
    issued_ms: i64,
    sig_hex: &str,
) -> Result<(String, Vec<String>), String> {
    use rustls_pki_types::pem::PemObject as _;
    if pem.len() > gateway_core::fleet::MAX_CA_BUNDLE_BYTES {
        return Err(format!(
            "{} bytes: a bundle is at most {}",
            pem.len(),
            gateway_core::fleet::MAX_CA_BUNDLE_BYTES
        ));
    }
    let (_, fps) = checked_bundle(pem)?;
    let sig = gateway_core::hex::decode(sig_hex).ok_or("the signature is not hex")?;
    let message = gateway_core::fleet::ca_bundle_signed(pem, issued_ms);
    for der in rustls_pki_types::CertificateDer::pem_slice_iter(trusted_pem.as_bytes())
        .filter_map(Result::ok)
        .take(MAX_BUNDLE)
    {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(&der) else {
            continue;
        };
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            cert.public_key().subject_public_key.data.as_ref(),
        );
        if key.verify(&message, &sig).is_ok() {
            let fp = gateway_core::hex::encode(
                ring::digest::digest(&ring::digest::SHA256, &der).as_ref(),
            );
            if !fps.contains(&fp) {
                return Err(format!(
                    "it leaves out CA {fp}, which signed it: a box keeps trusting the CA it has"
                ));
            }
            return Ok((fp, fps));
        }
    }
    Err("no CA this box trusts signed it".into())
}

/// Standard base64 with padding (RFC 4648 4), for PEM.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// One certificate as PEM (only the certificate: whatever else the source
/// file held, a private key pasted in by mistake, is never copied).
fn pem_of(der: &rustls_pki_types::CertificateDer<'_>) -> String {
    let b64 = base64(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out += std::str::from_utf8(chunk).unwrap_or_default();
        out.push('\n');
    }
    out += "-----END CERTIFICATE-----\n";
    out
}

/// A certificate's validity (Unix ms): (not before, not after).
pub fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    use rustls_pki_types::pem::PemObject as _;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let v = cert.validity();
    Some((
        v.not_before.timestamp() * 1000,
        v.not_after.timestamp() * 1000,
    ))
}

/// Replaces `path` with `contents` atomically (a temporary file in the same
/// directory, synced, renamed over it), with `mode`.
///
/// # Errors
/// When the directory is not writable.
pub fn write_replace(path: &Path, contents: &str, mode: u32) -> Result<(), PkiError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    rename_synced(&tmp, path)
}

/// Renames `from` over `to` and syncs the directory, so the rename survives a
/// power cut.
fn rename_synced(from: &Path, to: &Path) -> Result<(), PkiError> {
    std::fs::rename(from, to).map_err(io(to))?;
    if let Some(dir) = to.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Where one file of a key pair waits, complete, before it replaces `path`.
fn staged(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".next");
    name.into()
}

/// Replaces a private key and its certificate as one pair. Both are first
/// staged complete (`KEY.next`, then `CERT.next`, each written atomically and
/// synced); only then does each replace the file in use, key first. A crash on
/// the way is finished (or undone) by [`recover_pair`] at the next start, so a
/// power cut during renewal never leaves a key with a certificate that is not
/// its own.
///
/// # Errors
/// When the directory is not writable.
pub fn write_pair(key: &Path, key_pem: &str, cert: &Path, cert_pem: &str) -> Result<(), PkiError> {
    write_replace(&staged(key), key_pem, 0o600)?;
    write_replace(&staged(cert), cert_pem, 0o644)?;
    rename_synced(&staged(key), key)?;
    rename_synced(&staged(cert), cert)
}

/// Finishes a [`write_pair`] that a crash interrupted. A staged certificate
/// means the pair was complete: what is staged is installed. A staged key
/// alone means the certificate never arrived: the key is discarded and the
/// pair in use stays. Returns what was done, for the log.
///
/// # Errors
/// When a staged file cannot be renamed or removed.
pub fn recover_pair(key: &Path, cert: &Path) -> Result<Option<&'static str>, PkiError> {
    let (next_key, next_cert) = (staged(key), staged(cert));
    match (next_key.exists(), next_cert.exists()) {
        (true, true) => {
            rename_synced(&next_key, key)?;
            rename_synced(&next_cert, cert)?;
            Ok(Some(
                "installed the renewed key and certificate staged before a crash",
            ))
        }
        (false, true) => {
            rename_synced(&next_cert, cert)?;
            Ok(Some(
                "installed the renewed certificate staged before a crash",
            ))
        }
        (true, false) => {
            std::fs::remove_file(&next_key).map_err(io(&next_key))?;
            Ok(Some(
                "discarded a key staged without its certificate; the pair in use stays",
            ))
        }
        (false, false) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(p: &Path) -> String {
        std::fs::read_to_string(p).unwrap_or_default()
    }

    #[test]
    fn base64_is_rfc_4648s() {
        for (raw, b64) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
        ] {
            assert_eq!(base64(raw.as_bytes()), b64);
        }
    }

    #[test]
    fn a_bundle_holds_ca_certificates_once_each_and_nothing_else() {
        let d = tempfile::tempdir().expect("dir");
        let (old, new) = (d.path().join("old"), d.path().join("new"));
        init(&old, "old CA").expect("old");
        init(&new, "new CA").expect("new");
        let out = d.path().join("bundle.pem");
        let fps = bundle(&[new.join("ca.pem"), old.join("ca.pem")], &out).expect("bundle");
        assert_eq!(fps.len(), 2);
        assert_ne!(fps[0], fps[1]);
        let text = read(&out);
        assert_eq!(fingerprints(&text), fps, "the new CA first, as given");
        assert_eq!(fingerprints(&read(&new.join("ca.pem"))), fps[..1]);
        assert!(!text.contains("PRIVATE KEY"));
        // Never over an existing file; never twice the same CA; never a key
        // or a device certificate.
        assert!(matches!(
            bundle(&[new.join("ca.pem")], &out),
            Err(PkiError::Exists(_))
        ));
        let again = d.path().join("again.pem");
        assert!(bundle(&[new.join("ca.pem"), new.join("ca.pem")], &again).is_err());
        let mixed = d.path().join("mixed.pem");
        std::fs::write(
            &mixed,
            read(&new.join("ca.key")) + &read(&old.join("ca.pem")),
        )
        .expect("write");
        let fp = bundle(&[mixed], &again).expect("only the certificate is taken");
        assert!(
            !read(&again).contains("PRIVATE KEY"),
            "a key pasted in is not copied"
        );
        assert_eq!(fp, fps[1..]);
        issue(&new, "edge-a", &[], 1, d.path()).expect("issue");
        let err =
            bundle(&[d.path().join("edge-a.pem")], &d.path().join("x.pem")).expect_err("not a CA");
        assert!(err.to_string().contains("not a CA"), "{err}");
    }

    #[test]
    fn a_ca_bundle_is_taken_only_signed_by_a_trusted_ca_that_it_keeps() {
        let d = tempfile::tempdir().expect("dir");
        let (old, new, rogue) = (
            d.path().join("old"),
            d.path().join("new"),
            d.path().join("r"),
        );
        init(&old, "old CA").expect("old");
        init(&new, "new CA").expect("new");
        init(&rogue, "rogue CA").expect("rogue");
        let (old_pem, new_pem) = (read(&old.join("ca.pem")), read(&new.join("ca.pem")));
        let both = old_pem.clone() + &new_pem;
        let (both, fps) = checked_bundle(&both).expect("bundle");
        let sign = |dir: &Path, pem: &str, at: i64| {
            sign_ca_bundle(&read(&dir.join("ca.key")), pem, at).expect("sign")
        };
        // Signed by the CA the box trusts, which it holds: taken.
        let sig = sign(&old, &both, 7);
        let (signer, got) = verify_ca_bundle(&old_pem, &both, 7, &sig).expect("taken");
        assert_eq!((signer, got), (fps[0].clone(), fps.clone()));
        // The same signature over another time, another text, or checked
        // by a box trusting another CA: refused.
        assert!(verify_ca_bundle(&old_pem, &both, 8, &sig).is_err());
        let swapped = checked_bundle(&(new_pem.clone() + &old_pem)).expect("b").0;
        assert!(verify_ca_bundle(&old_pem, &swapped, 7, &sig).is_err());
        assert!(verify_ca_bundle(&new_pem, &both, 7, &sig).is_err());
        // A rogue CA's bundle, even one holding the trusted CA: refused.
        let with_rogue = checked_bundle(&(old_pem.clone() + &read(&rogue.join("ca.pem"))))
            .expect("b")
            .0;
        let err = verify_ca_bundle(&old_pem, &with_rogue, 7, &sign(&rogue, &with_rogue, 7))
            .expect_err("rogue");
        assert!(err.contains("no CA this box trusts"), "{err}");
        // One that leaves out its signer: refused (the box would strand).
        let new_only = checked_bundle(&new_pem).expect("b").0;
        let err = verify_ca_bundle(&old_pem, &new_only, 7, &sign(&old, &new_only, 7))
            .expect_err("left out");
        assert!(err.contains("leaves out"), "{err}");
        // Bad hex, a device certificate, too many bytes: refused.
        assert!(verify_ca_bundle(&old_pem, &both, 7, "zz").is_err());
        issue(&old, "edge-a", &[], 1, d.path()).expect("issue");
        assert!(checked_bundle(&read(&d.path().join("edge-a.pem"))).is_err());
        let huge = both.clone() + &" ".repeat(gateway_core::fleet::MAX_CA_BUNDLE_BYTES);
        assert!(verify_ca_bundle(&old_pem, &huge, 7, &sig).is_err());
    }

    /// A directory holding the pair in use ("old key", "old cert").
    fn old_pair() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (key, cert) = (dir.path().join("edge.key"), dir.path().join("edge.pem"));
        write_replace(&key, "old key", 0o600).expect("key");
        write_replace(&cert, "old cert", 0o644).expect("cert");
        (dir, key, cert)
    }

    #[test]
    fn a_pair_replaces_both_files_and_leaves_nothing_staged() {
        let (dir, key, cert) = old_pair();
        write_pair(&key, "new key", &cert, "new cert").expect("pair");
        assert_eq!(
            (read(&key).as_str(), read(&cert).as_str()),
            ("new key", "new cert")
        );
        let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
        assert_eq!(recover_pair(&key, &cert).expect("recover"), None);
    }

    /// Every point a crash can stop `write_pair` at (after its 1st, 2nd and
    /// 3rd step; the 4th is the end): recovery always yields a matching pair,
    /// the new one as soon as both halves were staged.
    #[test]
    fn recovery_after_a_crash_at_each_step_yields_a_matching_pair() {
        for crash_after in 1..=3 {
            let (_dir, key, cert) = old_pair();
            write_replace(&staged(&key), "new key", 0o600).expect("step 1");
            if crash_after >= 2 {
                write_replace(&staged(&cert), "new cert", 0o644).expect("step 2");
            }
            if crash_after >= 3 {
                rename_synced(&staged(&key), &key).expect("step 3");
            }
            let done = recover_pair(&key, &cert).expect("recover");
            assert!(done.is_some(), "step {crash_after}: nothing recovered");
            let pair = (read(&key), read(&cert));
            let want = if crash_after == 1 {
                ("old key", "old cert")
            } else {
                ("new key", "new cert")
            };
            assert_eq!(
                (pair.0.as_str(), pair.1.as_str()),
                want,
                "crash after step {crash_after}"
            );
            assert!(!staged(&key).exists() && !staged(&cert).exists());
            assert_eq!(recover_pair(&key, &cert).expect("again"), None);
        }
    }
}

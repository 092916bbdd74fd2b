//! TLS for the device listeners (wss and QUIC share one certificate), and development
//! certificates.
//!
//! The crypto provider is *ring*, named explicitly rather than left to rustls's process-wide
//! default, so that no other crate in the tree can change which one Pigeon uses.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The certificate chain file could not be read or holds no certificate.
    #[error("certificate file {path}: {message}")]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The key file could not be read or holds no private key.
    #[error("key file {path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the pair (a key that does not match the certificate, say).
    #[error("TLS configuration: {0}")]
    Config(String),
    /// A development certificate could not be generated or written.
    #[error("development certificate: {0}")]
    Generate(String),
}

/// The crypto provider of every TLS configuration in Pigeon.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads a PEM certificate chain.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let failed = |message: String| TlsError::Certificate {
        path: path.to_owned(),
        message,
    };
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|error| failed(error.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| failed(error.to_string()))?;
    if certificates.is_empty() {
        return Err(failed("no certificate in the file".into()));
    }
    Ok(certificates)
}

/// A server configuration from PEM files, offering the ALPN protocols given. `tls13_only`
/// is for QUIC, which requires TLS 1.3.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
    tls13_only: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let certificates = load_certificates(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|error| TlsError::Key {
        path: key.to_owned(),
        message: error.to_string(),
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider());
    let builder = if tls13_only {
        builder.with_protocol_versions(&[&rustls::version::TLS13])
    } else {
        builder.with_safe_default_protocol_versions()
    }
    .map_err(|error| TlsError::Config(error.to_string()))?;
    let mut config = builder
        .with_no_client_auth()
        .with_single_cert(certificates, key_der)
        .map_err(|error| TlsError::Config(error.to_string()))?;
    config.alpn_protocols = alpn.iter().map(|protocol| protocol.to_vec()).collect();
    Ok(config)
}

/// Where `pigeon cert --dev` wrote its files.
#[derive(Clone, Debug)]
pub struct DevCertificateFiles {
    /// The development CA's certificate: what clients trust (`--ca`).
    pub ca: PathBuf,
    /// The server certificate, signed by the CA.
    pub cert: PathBuf,
    /// The server certificate's private key.
    pub key: PathBuf,
}

/// Writes a development CA and a server certificate it signed, valid for `localhost`,
/// `127.0.0.1` and `::1`, into `dir`: `ca.pem`, `cert.pem`, `key.pem`. For trying wss and
/// QUIC on one machine, never for production.
pub fn write_dev_certificate(dir: &Path) -> Result<DevCertificateFiles, TlsError> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let failed = |error: &dyn std::fmt::Display| TlsError::Generate(error.to_string());

    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| failed(&e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Pigeon development CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(|e| failed(&e))?;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| failed(&e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let mut params = CertificateParams::new(names).map_err(|e| failed(&e))?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Pigeon development server");
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().map_err(|e| failed(&e))?;
    let cert = params.signed_by(&key, &issuer).map_err(|e| failed(&e))?;

    std::fs::create_dir_all(dir).map_err(|e| failed(&e))?;
    let files = DevCertificateFiles {
        ca: dir.join("ca.pem"),
        cert: dir.join("cert.pem"),
        key: dir.join("key.pem"),
    };
    std::fs::write(&files.ca, ca_cert.pem()).map_err(|e| failed(&e))?;
    std::fs::write(&files.cert, cert.pem()).map_err(|e| failed(&e))?;
    std::fs::write(&files.key, key.serialize_pem()).map_err(|e| failed(&e))?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dev_certificate_loads_as_a_server_config() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_dev_certificate(dir.path()).expect("generate");
        server_config(&files.cert, &files.key, &[b"http/1.1"], false).expect("wss config");
        server_config(&files.cert, &files.key, &[pigeon_proto::ALPN], true).expect("quic config");
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = write_dev_certificate(dir.path()).expect("generate");
        let missing = dir.path().join("missing.pem");
        let error = server_config(&missing, &files.key, &[], false).expect_err("missing");
        assert!(error.to_string().contains("missing.pem"), "{error}");
        // A key that is not the certificate's.
        let error = server_config(&files.ca, &files.key, &[], false).expect_err("mismatch");
        assert!(matches!(error, TlsError::Config(_)), "{error}");
        let error = server_config(&files.cert, &files.cert, &[], false).expect_err("no key");
        assert!(error.to_string().contains("cert.pem"), "{error}");
    }
}

//! The cluster CA and each node's identity. Peers talk QUIC with TLS 1.3 and verify each other
//! both ways against the cluster CA: a peer without a certificate from it gets no manifest and no
//! piece. On a single host the CA is generated in the data directory; a cluster ships one CA to
//! every node.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The name every node's certificate carries and every client verifies: the cluster, not a host.
pub const SERVER_NAME: &str = "peer.starling.cluster";
/// QUIC ALPN for the peer protocol.
pub const ALPN: &[u8] = b"starling/1";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cluster CA files in {}: {detail}; remove them to generate a new CA, or install the cluster's", dir.display())]
    BadCa { dir: PathBuf, detail: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed: {0}")]
    Config(String),
    #[error("not a PEM private key: {0}")]
    BadKey(String),
    #[error("the CA key does not belong to the CA certificate")]
    KeyMismatch,
}

/// A certificate chain and key a node presents, and the CA it trusts.
#[derive(Clone, Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub ca: CertificateDer<'static>,
}

pub struct ClusterCa {
    /// The issuer used for signing (for a reloaded CA: re-signed, same subject and key).
    cert: rcgen::Certificate,
    key: KeyPair,
    /// The CA certificate exactly as distributed: the trust anchor every node holds.
    der: CertificateDer<'static>,
    pem: String,
}

impl ClusterCa {
    pub fn generate() -> Result<ClusterCa, TlsError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Starling cluster CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let (der, pem) = (cert.der().clone(), cert.pem());
        Ok(ClusterCa {
            cert,
            key,
            der,
            pem,
        })
    }

    /// Loads `dir/ca.pem` and `dir/ca.key`, or creates them (key mode 0600) if neither exists.
    ///
    /// Creation is crash-safe: each file is written under a temporary name, synced and renamed,
    /// the key first and the certificate last. A key without a certificate is therefore an
    /// interrupted creation (no node can have trusted it yet) and is replaced; a certificate
    /// without its key is an error.
    pub fn load_or_create(dir: &Path) -> Result<ClusterCa, TlsError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| TlsError::Io { op, path, source }
        };
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => {
                let cert = std::fs::read_to_string(&cert_path).map_err(io("read", &cert_path))?;
                let key = std::fs::read_to_string(&key_path).map_err(io("read", &key_path))?;
                ClusterCa::from_pem(&cert, &key).map_err(|e| TlsError::BadCa {
                    dir: dir.into(),
                    detail: e.to_string(),
                })
            }
            (false, _) => {
                let ca = ClusterCa::generate()?;
                std::fs::create_dir_all(dir).map_err(io("create", dir))?;
                let key_tmp = dir.join("ca.key.tmp");
                let _ = std::fs::remove_file(&key_tmp);
                write_private(&key_tmp, ca.key.serialize_pem().as_bytes())
                    .map_err(io("write", &key_tmp))?;
                std::fs::rename(&key_tmp, &key_path).map_err(io("rename", &key_path))?;
                let cert_tmp = dir.join("ca.pem.tmp");
                write_synced(&cert_tmp, ca.pem.as_bytes()).map_err(io("write", &cert_tmp))?;
                std::fs::rename(&cert_tmp, &cert_path).map_err(io("rename", &cert_path))?;
                Ok(ca)
            }
            (true, false) => Err(TlsError::BadCa {
                dir: dir.into(),
                detail: "ca.pem is there but ca.key is missing".into(),
            }),
        }
    }

    /// The CA from its PEM certificate and key; a key that is not the certificate's is
    /// [`TlsError::KeyMismatch`] (every certificate it issued would fail to verify).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::BadKey(e.to_string()))?;
        let params = CertificateParams::from_ca_cert_pem(cert_pem)?;
        // Re-signing the same subject with the same key reproduces an issuer that the
        // certificates it signs chain to; the stored certificate stays the trust anchor.
        let cert = params.self_signed(&key)?;
        let der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| TlsError::Config("no certificate in the CA PEM".into()))?
            .map_err(|e| TlsError::Config(format!("CA PEM: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| TlsError::Config(format!("CA certificate: {e}")))?;
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(TlsError::KeyMismatch);
        }
        Ok(ClusterCa {
            cert,
            key,
            der,
            pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> String {
        self.pem.clone()
    }

    /// A fresh key and certificate for a node, valid as both server and client.
    pub fn issue(&self, node: &str) -> Result<Identity, TlsError> {
        let mut params = CertificateParams::new(vec![SERVER_NAME.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, node);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Identity {
            chain: vec![cert.der().clone()],
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            ))),
            ca: self.der.clone(),
        })
    }
}

impl ClusterCa {
    /// A TLS server certificate for `host` (a DNS name or an IP address) signed by this CA,
    /// with the CA in its chain: what the intercepting proxy presents for that host.
    pub fn issue_server(&self, host: &str) -> Result<Identity, TlsError> {
        let mut params = CertificateParams::new(vec![host.to_string()])?;
        params.distinguished_name.push(DnType::CommonName, host);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(Identity {
            chain: vec![cert.der().clone(), self.der.clone()],
            key: Arc::new(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
                key.serialize_der(),
            ))),
            ca: self.der.clone(),
        })
    }
}

fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_all()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(id: &Identity) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(id.ca.clone())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(Arc::new(roots))
}

/// Server side: TLS 1.3, client certificates required and verified against the cluster CA.
pub fn server_config(id: &Identity) -> Result<quinn::ServerConfig, TlsError> {
    let cfg_err = |e: rustls::Error| TlsError::Config(e.to_string());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots(id)?, provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(id.chain.clone(), id.key.clone_key())
        .map_err(cfg_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ServerConfig::with_crypto(Arc::new(quic)))
}

/// Client side: TLS 1.3, the server verified against the cluster CA, our certificate presented.
pub fn client_config(id: &Identity) -> Result<quinn::ClientConfig, TlsError> {
    let cfg_err = |e: rustls::Error| TlsError::Config(e.to_string());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(cfg_err)?
        .with_root_certificates(roots(id)?)
        .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
        .map_err(cfg_err)?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok(quinn::ClientConfig::new(Arc::new(quic)))
}

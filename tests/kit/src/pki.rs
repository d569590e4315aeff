//! A throw-away certificate authority for TLS tests: a CA, and a server
//! certificate for `localhost` / `127.0.0.1` signed by it, as PEM files.

use std::path::{Path, PathBuf};

use anyhow::Result;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

/// PEM files of a CA and of one server and one client certificate it signed.
pub struct Pki {
    /// The CA certificate.
    pub ca: PathBuf,
    /// Server certificate for `localhost` and `127.0.0.1`.
    pub server_cert: PathBuf,
    /// Its private key.
    pub server_key: PathBuf,
    /// A client certificate (for mutual TLS).
    pub client_cert: PathBuf,
    /// Its private key.
    pub client_key: PathBuf,
}

impl Pki {
    /// Generates the CA and certificates into `dir`.
    ///
    /// # Errors
    /// Key generation or I/O.
    pub fn generate(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "saga test CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let leaf = |names: Vec<String>, name: &str| -> Result<(PathBuf, PathBuf)> {
            let key = KeyPair::generate()?;
            let cert = CertificateParams::new(names)?.signed_by(&key, &ca)?;
            let (c, k) = (
                dir.join(format!("{name}.pem")),
                dir.join(format!("{name}-key.pem")),
            );
            std::fs::write(&c, cert.pem())?;
            std::fs::write(&k, key.serialize_pem())?;
            Ok((c, k))
        };
        let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()], "server")?;
        let (client_cert, client_key) = leaf(vec!["saga-client".into()], "client")?;
        let ca_path = dir.join("ca.pem");
        std::fs::write(&ca_path, ca.pem())?;
        Ok(Pki {
            ca: ca_path,
            server_cert,
            server_key,
            client_cert,
            client_key,
        })
    }
}

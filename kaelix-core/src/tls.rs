//! TLS for clients, and reading PEM files for both sides.
//!
//! ```no_run
//! # fn main() -> kaelix_core::Result<()> {
//! use kaelix_core::client::ClientOptions;
//! use kaelix_core::tls::ClientTls;
//!
//! let tls = ClientTls::builder()
//!     .ca_file("ca.pem")?                       // trust the broker's CA
//!     .server_name("broker.example.com")        // the name in its certificate
//!     .client_cert_files("me.pem", "me.key")?   // mutual TLS, when required
//!     .build()?;
//! let options = ClientOptions { tls: Some(tls), ..ClientOptions::default() };
//! # let _ = options; Ok(()) }
//! ```
//!
//! Without a CA file the operating system's trusted roots are used.

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};

use crate::error::{Error, Result};

/// The crypto provider both sides use (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificates in a PEM file, in file order. An empty file, or one
/// without a certificate, is an error.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| pem_error(path, "certificate", e))?;
    if certs.is_empty() {
        return Err(Error::Tls(format!(
            "{}: no PEM certificate in the file",
            path.display()
        )));
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| pem_error(path, "private key", e))
}

/// A root store holding every certificate of a PEM bundle.
pub fn read_roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| {
            Error::Tls(format!(
                "{}: not a usable CA certificate: {e}",
                path.display()
            ))
        })?;
    }
    Ok(roots)
}

fn pem_error(path: &Path, what: &str, err: rustls::pki_types::pem::Error) -> Error {
    use rustls::pki_types::pem::Error as Pem;
    match err {
        Pem::Io(err) => Error::Tls(format!("{}: cannot read the {what}: {err}", path.display())),
        Pem::NoItemsFound => Error::Tls(format!("{}: no PEM {what} in the file", path.display())),
        other => Error::Tls(format!("{}: not a PEM {what}: {other:?}", path.display())),
    }
}

/// How a client speaks TLS to the broker: whom it trusts, the name it
/// expects in the broker's certificate, and its own certificate for mutual
/// TLS. Cheap to clone.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field(
                "client_cert",
                &self.config.client_auth_cert_resolver.has_certs(),
            )
            .finish()
    }
}

impl ClientTls {
    /// Starts a [`ClientTlsBuilder`].
    pub fn builder() -> ClientTlsBuilder {
        ClientTlsBuilder::default()
    }

    /// Trusts the CAs in `ca_file` and nothing else; the broker's
    /// certificate must name the address connected to (or see
    /// [`ClientTlsBuilder::server_name`]).
    pub fn from_ca_file(ca_file: impl AsRef<Path>) -> Result<ClientTls> {
        Self::builder().ca_file(ca_file)?.build()
    }

    /// The rustls configuration.
    pub fn config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// The name checked against the broker's certificate: the one set, or
    /// else the IP address connected to.
    pub fn server_name_for(&self, peer: std::net::IpAddr) -> ServerName<'static> {
        self.server_name
            .clone()
            .unwrap_or(ServerName::IpAddress(peer.into()))
    }
}

/// Builds a [`ClientTls`].
#[derive(Default)]
pub struct ClientTlsBuilder {
    roots: Option<RootCertStore>,
    server_name: Option<String>,
    identity: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
}

impl ClientTlsBuilder {
    /// Trusts the CA certificates of a PEM bundle (added to those of
    /// earlier calls). Without any, the system's roots are trusted.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Result<Self> {
        let added = read_roots(path.as_ref())?;
        self.roots
            .get_or_insert_with(RootCertStore::empty)
            .roots
            .extend(added.roots);
        Ok(self)
    }

    /// Trusts one CA certificate given as PEM text.
    pub fn ca_pem(mut self, pem: &[u8]) -> Result<Self> {
        let roots = self.roots.get_or_insert_with(RootCertStore::empty);
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert = cert.map_err(|e| Error::Tls(format!("not a PEM certificate: {e:?}")))?;
            roots
                .add(cert)
                .map_err(|e| Error::Tls(format!("not a usable CA certificate: {e}")))?;
        }
        Ok(self)
    }

    /// The name the broker's certificate must carry (a DNS name or an IP
    /// address). Without one, the IP address connected to is checked.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// The client's certificate chain and key, for brokers that require
    /// mutual TLS.
    pub fn client_cert_files(
        mut self,
        cert: impl AsRef<Path>,
        key: impl AsRef<Path>,
    ) -> Result<Self> {
        self.identity = Some((read_certs(cert.as_ref())?, read_key(key.as_ref())?));
        Ok(self)
    }

    /// The client's certificate chain and key as PEM text.
    pub fn client_cert_pem(mut self, cert: &[u8], key: &[u8]) -> Result<Self> {
        let certs = CertificateDer::pem_slice_iter(cert)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::Tls(format!("not a PEM certificate: {e:?}")))?;
        let key = PrivateKeyDer::from_pem_slice(key)
            .map_err(|e| Error::Tls(format!("not a PEM private key: {e:?}")))?;
        self.identity = Some((certs, key));
        Ok(self)
    }

    /// Checks what was given and builds the configuration.
    pub fn build(self) -> Result<ClientTls> {
        let roots = match self.roots {
            Some(roots) => roots,
            None => system_roots()?,
        };
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Tls(e.to_string()))?
            .with_root_certificates(roots);
        let config = match self.identity {
            Some((certs, key)) => builder
                .with_client_auth_cert(certs, key)
                .map_err(|e| Error::Tls(format!("client certificate: {e}")))?,
            None => builder.with_no_client_auth(),
        };
        let server_name = match self.server_name {
            Some(name) => Some(
                ServerName::try_from(name.clone())
                    .map_err(|_| Error::Tls(format!("{name:?} is not a DNS name or IP address")))?,
            ),
            None => None,
        };
        Ok(ClientTls {
            config: Arc::new(config),
            server_name,
        })
    }
}

fn system_roots() -> Result<RootCertStore> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        return Err(Error::Tls(
            "no trusted CA certificates: give a CA file (the system's store is empty or unreadable)"
                .into(),
        ));
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_file_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let err = read_certs(&empty).unwrap_err().to_string();
        assert!(err.contains("empty.pem") && err.contains("no PEM"), "{err}");
        let err = read_key(&dir.path().join("missing.key"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("missing.key") && err.contains("cannot read"),
            "{err}"
        );
    }

    #[test]
    fn a_generated_ca_and_identity_build_a_client_config() {
        let ca = rcgen::generate_simple_self_signed(vec!["ca.test".into()]).unwrap();
        let me = rcgen::generate_simple_self_signed(vec!["me.test".into()]).unwrap();
        let tls = ClientTls::builder()
            .ca_pem(ca.cert.pem().as_bytes())
            .unwrap()
            .server_name("broker.test")
            .client_cert_pem(
                me.cert.pem().as_bytes(),
                me.signing_key.serialize_pem().as_bytes(),
            )
            .unwrap()
            .build()
            .unwrap();
        assert!(tls.config().client_auth_cert_resolver.has_certs());
        assert_eq!(
            tls.server_name_for([127, 0, 0, 1].into()),
            ServerName::try_from("broker.test").unwrap()
        );
        let err = ClientTls::builder()
            .server_name("not a name!")
            .ca_pem(ca.cert.pem().as_bytes())
            .unwrap()
            .build();
        assert!(err.is_err());
    }
}

//! TLS for client connections: the acceptor built from `[security.tls]`,
//! swapped whole when the certificate files or the configuration change.
//!
//! New connections take the acceptor in force when they arrive; open ones
//! keep the session they made. A certificate that does not load (bad PEM,
//! a key that does not match, expired) is refused with a log line and a
//! metric, and the last good acceptor stays.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use kaelix_core::config::{FileWatch, TlsConfig};
use kaelix_core::tls::{provider, read_certs, read_key, read_roots};
use parking_lot::Mutex;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;

use crate::broker::Inner;

/// Quiet time after the last change to a certificate file before it is
/// read: a rotation writes the certificate and the key one after the other.
const SETTLE: Duration = Duration::from_millis(300);

/// The acceptor in force and how it got there.
#[derive(Default)]
pub(crate) struct TlsState {
    acceptor: ArcSwapOption<TlsAcceptor>,
    /// The files watched, and the watch; replaced when the paths change.
    watch: Mutex<Option<(Vec<PathBuf>, FileWatch)>>,
    pub(crate) loaded: AtomicU64,
    pub(crate) refused: AtomicU64,
    /// When the certificate in force expires, in seconds since the epoch
    /// (0 without one).
    pub(crate) not_after: AtomicI64,
}

/// What a certificate file says about itself, for the logs.
struct Loaded {
    acceptor: TlsAcceptor,
    subject: String,
    not_after: i64,
}

impl TlsState {
    /// The acceptor for a new connection; `None` serves plain TCP.
    pub(crate) fn acceptor(&self) -> Option<Arc<TlsAcceptor>> {
        self.acceptor.load_full()
    }

    /// Applies `config`: builds and swaps in a new acceptor (or none when
    /// TLS is off). On failure the acceptor in force stays and the reason
    /// is returned.
    pub(crate) fn apply(&self, config: &TlsConfig, cause: &str) -> Result<(), String> {
        if !config.enabled {
            if self.acceptor.swap(None).is_some() {
                tracing::warn!(
                    cause,
                    "TLS switched off: new connections are served in plain TCP"
                );
            }
            self.not_after.store(0, Ordering::Relaxed);
            return Ok(());
        }
        match build(config) {
            Ok(loaded) => {
                let days = (loaded.not_after - now_secs()) / 86_400;
                self.acceptor.store(Some(Arc::new(loaded.acceptor)));
                self.not_after.store(loaded.not_after, Ordering::Relaxed);
                self.loaded.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    cause,
                    cert = %config.cert_path.display(),
                    subject = %loaded.subject,
                    expires_in_days = days,
                    mutual = !config.client_ca_path.as_os_str().is_empty(),
                    "TLS certificate loaded; new connections use it"
                );
                Ok(())
            }
            Err(reason) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                let keeping = if self.acceptor.load().is_some() {
                    "the certificate in force stays"
                } else {
                    "no certificate is in force"
                };
                tracing::error!(cause, "TLS certificate refused, {keeping}: {reason}");
                Err(reason)
            }
        }
    }

    /// Watches the files `config` names (or stops watching when TLS is
    /// off); each change reloads them from the broker's running
    /// configuration.
    pub(crate) fn watch(&self, config: &TlsConfig, broker: Weak<Inner>) {
        let mut slot = self.watch.lock();
        if !config.enabled {
            *slot = None;
            return;
        }
        let paths: Vec<PathBuf> = [&config.cert_path, &config.key_path, &config.client_ca_path]
            .into_iter()
            .filter(|p| !p.as_os_str().is_empty())
            .cloned()
            .collect();
        if slot.as_ref().is_some_and(|(watched, _)| *watched == paths) {
            return;
        }
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        let watch = FileWatch::new(&refs, SETTLE, move || {
            let Some(inner) = broker.upgrade() else {
                return;
            };
            let running = inner.live.running();
            let _ = inner
                .tls
                .apply(&running.security.tls, "certificate files changed");
        });
        match watch {
            Ok(watch) => *slot = Some((paths, watch)),
            Err(err) => {
                *slot = None;
                tracing::warn!(
                    error = %err,
                    "cannot watch the TLS files: rotate certificates with SIGHUP or a configuration reload"
                );
            }
        }
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn build(config: &TlsConfig) -> Result<Loaded, String> {
    let certs = read_certs(&config.cert_path).map_err(|e| e.to_string())?;
    let key = read_key(&config.key_path).map_err(|e| e.to_string())?;
    let (subject, not_after) = check_validity(&certs[0], &config.cert_path)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?;
    let builder = if config.client_ca_path.as_os_str().is_empty() {
        builder.with_no_client_auth()
    } else {
        let roots = read_roots(&config.client_ca_path).map_err(|e| e.to_string())?;
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| format!("{}: {e}", config.client_ca_path.display()))?;
        builder.with_client_cert_verifier(verifier)
    };
    let server = builder.with_single_cert(certs, key).map_err(|e| {
        format!(
            "{} with {}: {e}",
            config.cert_path.display(),
            config.key_path.display()
        )
    })?;
    Ok(Loaded {
        acceptor: TlsAcceptor::from(Arc::new(server)),
        subject,
        not_after,
    })
}

/// The leaf's subject and expiry; a certificate outside its validity
/// period is refused rather than served.
fn check_validity(leaf: &CertificateDer<'_>, path: &Path) -> Result<(String, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| format!("{}: not an X.509 certificate: {e}", path.display()))?;
    let validity = cert.validity();
    let now = now_secs();
    let not_before = validity.not_before.timestamp();
    let not_after = validity.not_after.timestamp();
    if now > not_after {
        return Err(format!(
            "{}: the certificate expired at {}",
            path.display(),
            validity.not_after
        ));
    }
    if now < not_before {
        return Err(format!(
            "{}: the certificate is not valid before {}",
            path.display(),
            validity.not_before
        ));
    }
    Ok((cert.subject().to_string(), not_after))
}

/// The identity a verified client certificate carries: its subject's
/// common name, or else its first DNS, e-mail or URI alternative name.
pub(crate) fn certificate_identity(leaf: &CertificateDer<'_>) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
    if let Some(cn) = cert
        .subject()
        .iter_common_name()
        .find_map(|cn| cn.as_str().ok())
        .filter(|cn| !cn.is_empty())
    {
        return Some(cn.to_string());
    }
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|name| match name {
        GeneralName::DNSName(n) | GeneralName::RFC822Name(n) | GeneralName::URI(n) => {
            Some((*n).to_string())
        }
        _ => None,
    })
}

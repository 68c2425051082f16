//! Certificates made in the test: a CA, server certificates it signs for
//! 127.0.0.1 and localhost, and client certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// A CA whose certificate is `ca.pem` in `dir`.
pub struct Pki {
    pub dir: PathBuf,
    ca: CertifiedIssuer<'static, KeyPair>,
    ca_file: PathBuf,
}

/// A certificate and its key as files.
#[derive(Clone)]
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn
}

impl Pki {
    pub fn new(dir: &Path, ca_name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name = name(ca_name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("key"))
            .expect("CA certificate");
        let ca_file = dir.join(format!("{ca_name}.pem"));
        std::fs::write(&ca_file, ca.pem()).expect("write CA");
        Pki {
            dir: dir.to_path_buf(),
            ca,
            ca_file,
        }
    }

    /// The CA certificate's file.
    pub fn ca_path(&self) -> PathBuf {
        self.ca_file.clone()
    }

    /// A server certificate for 127.0.0.1 and localhost, written as
    /// `<file>.pem` and `<file>.key`.
    pub fn server(&self, file: &str, cn: &str) -> Issued {
        self.issue(
            file,
            cn,
            &["127.0.0.1", "localhost"],
            &[ExtendedKeyUsagePurpose::ServerAuth],
            None,
        )
    }

    /// A client certificate whose common name is `cn`.
    pub fn client(&self, file: &str, cn: &str) -> Issued {
        self.issue(file, cn, &[], &[ExtendedKeyUsagePurpose::ClientAuth], None)
    }

    /// A cluster node's certificate: for 127.0.0.1 and localhost, good
    /// both for serving and for connecting.
    pub fn node(&self, file: &str, cn: &str) -> Issued {
        self.issue(
            file,
            cn,
            &["127.0.0.1", "localhost"],
            &[
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            None,
        )
    }

    /// A server certificate that expired in 2020.
    pub fn expired_server(&self, file: &str) -> Issued {
        self.issue(
            file,
            "expired",
            &["127.0.0.1", "localhost"],
            &[ExtendedKeyUsagePurpose::ServerAuth],
            Some((2020, 1, 1)),
        )
    }

    fn issue(
        &self,
        file: &str,
        cn: &str,
        sans: &[&str],
        usages: &[ExtendedKeyUsagePurpose],
        not_after: Option<(i32, u8, u8)>,
    ) -> Issued {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(sans).expect("params");
        params.distinguished_name = name(cn);
        params.extended_key_usages = usages.to_vec();
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let key = KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.ca).expect("sign");
        let issued = Issued {
            cert: self.dir.join(format!("{file}.pem")),
            key: self.dir.join(format!("{file}.key")),
        };
        std::fs::write(&issued.cert, cert.pem()).expect("write certificate");
        std::fs::write(&issued.key, key.serialize_pem()).expect("write key");
        issued
    }
}

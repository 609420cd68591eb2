//! `shuyuan certs dev-pki`: a complete development PKI made with rcgen, for the demo, tests
//! and integrators trying the gateway without a real CA. Production gateways enrol with the
//! platform's CA instead (see certs/README.md).

use std::path::{Path, PathBuf};

use rcgen::{
    date_time_ymd, BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

use crate::keys::{generate_hpke_pair, write_private};

/// The files a dev PKI consists of.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
}

impl DevPki {
    pub fn ca(&self) -> PathBuf {
        self.dir.join("platform-ca.pem")
    }
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("platform-server.pem")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("platform-server.key")
    }
    pub fn gateway_cert(&self) -> PathBuf {
        self.dir.join("gateway.pem")
    }
    pub fn gateway_key(&self) -> PathBuf {
        self.dir.join("gateway.key")
    }
    pub fn health_cert(&self) -> PathBuf {
        self.dir.join("health-client.pem")
    }
    pub fn health_key(&self) -> PathBuf {
        self.dir.join("health-client.key")
    }
    pub fn hpke_public(&self) -> PathBuf {
        self.dir.join("platform-hpke.pub")
    }
    pub fn hpke_private(&self) -> PathBuf {
        self.dir.join("platform-hpke.key")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn write(path: &Path, data: &str, private: bool) -> Result<(), PkiError> {
    let r = if private {
        write_private(path, data.as_bytes())
    } else {
        std::fs::write(path, data)
    };
    r.map_err(|source| PkiError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn validity(p: &mut CertificateParams, years: i32) {
    let today = crate::timefmt::utc_date(crate::timefmt::now_ms());
    let year: i32 = today.get(..4).and_then(|y| y.parse().ok()).unwrap_or(2026);
    p.not_before = date_time_ymd(year - 1, 1, 1);
    p.not_after = date_time_ymd(year + years, 1, 1);
}

/// Client or server leaf certificate params.
fn leaf(
    cn: &str,
    sans: Vec<String>,
    usage: Vec<ExtendedKeyUsagePurpose>,
) -> Result<CertificateParams, PkiError> {
    let mut p = CertificateParams::new(sans)?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.distinguished_name
        .push(DnType::OrganizationName, "Shuyuan dev PKI");
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = usage;
    validity(&mut p, 2);
    Ok(p)
}

/// Writes a CA, the platform's server certificate (for localhost and `extra_hosts`), a
/// gateway client certificate with CN = `gateway_id`, a health client certificate with
/// CN = `platform-health`, and the platform's HPKE key pair into `dir`. Keys are 0600.
pub fn dev_pki(dir: &Path, gateway_id: &str, extra_hosts: &[String]) -> Result<DevPki, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.display().to_string(),
        source,
    })?;
    let pki = DevPki {
        dir: dir.to_path_buf(),
    };

    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.distinguished_name
        .push(DnType::CommonName, "Shuyuan dev platform CA");
    ca.distinguished_name
        .push(DnType::OrganizationName, "Shuyuan dev PKI");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut ca, 10);
    let ca_cert = ca.self_signed(&ca_key)?;
    write(&pki.ca(), &ca_cert.pem(), false)?;
    write(&dir.join("platform-ca.key"), &ca_key.serialize_pem(), true)?;
    let issuer = Issuer::from_params(&ca, &ca_key);

    let mut hosts = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    hosts.extend(extra_hosts.iter().cloned());
    let leaves = [
        (
            "platform-server",
            hosts,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            pki.server_cert(),
            pki.server_key(),
        ),
        (
            // The gateway also serves its health endpoint with this certificate: the
            // platform verifies it by the gateway id as DNS name.
            gateway_id,
            vec![gateway_id.to_string()],
            vec![
                ExtendedKeyUsagePurpose::ClientAuth,
                ExtendedKeyUsagePurpose::ServerAuth,
            ],
            pki.gateway_cert(),
            pki.gateway_key(),
        ),
        (
            "platform-health",
            vec![],
            vec![ExtendedKeyUsagePurpose::ClientAuth],
            pki.health_cert(),
            pki.health_key(),
        ),
    ];
    for (cn, sans, usage, cert_path, key_path) in leaves {
        let key = KeyPair::generate()?;
        let cert = leaf(cn, sans, usage)?.signed_by(&key, &issuer)?;
        write(&cert_path, &cert.pem(), false)?;
        write(&key_path, &key.serialize_pem(), true)?;
    }

    let (sk, pk) = generate_hpke_pair();
    write(&pki.hpke_private(), &sk, true)?;
    write(&pki.hpke_public(), &pk, false)?;
    Ok(pki)
}

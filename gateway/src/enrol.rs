//! The gateway certificate's life: `certs request` makes the key on the device (P-256, 0600;
//! it never leaves) and a CSR with the gateway id as CN for the platform's CA; `certs install`
//! checks what the CA sent back (chain to the trusted CA, key match, CN, dates, client
//! authentication) and swaps it in atomically; the running daemon is then told to reload.
//! `certs dev-sign` stands in for the platform's CA in a lab (and the tests).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{CertificateDer, UnixTime};

use crate::keys::write_private;
use crate::tls::{identity, load_certs};

#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    #[error("{path}: {what}")]
    File { path: String, what: String },
    #[error("{0}")]
    Refused(String),
}

fn file(path: &Path, what: impl std::fmt::Display) -> EnrolError {
    EnrolError::File {
        path: path.display().to_string(),
        what: what.to_string(),
    }
}

/// What `request` wrote.
pub struct Requested {
    pub key: PathBuf,
    pub csr: PathBuf,
}

/// Makes `out/gateway.key` (0600) and `out/gateway.csr` for `id`. An existing key is never
/// overwritten: a renewal goes to a fresh directory, and `install --key` moves it in.
pub fn request(id: &str, out: &Path) -> Result<Requested, EnrolError> {
    crate::config::check_identifier(id)
        .map_err(|m| EnrolError::Refused(format!("gateway id {m}")))?;
    std::fs::create_dir_all(out).map_err(|e| file(out, format!("cannot create: {e}")))?;
    let key_path = out.join("gateway.key");
    if key_path.exists() {
        return Err(file(
            &key_path,
            "a key is already there: request into an empty directory (for a renewal, e.g. /etc/shuyuan/certs/next), then install with --key",
        ));
    }
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| EnrolError::Refused(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(vec![id.to_string()])
        .map_err(|e| EnrolError::Refused(e.to_string()))?;
    params.distinguished_name.push(DnType::CommonName, id);
    let csr = params
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| EnrolError::Refused(format!("cannot make the request: {e}")))?;
    write_private(&key_path, key.serialize_pem().as_bytes())
        .map_err(|e| file(&key_path, format!("cannot write: {e}")))?;
    let csr_path = out.join("gateway.csr");
    std::fs::write(&csr_path, csr).map_err(|e| file(&csr_path, format!("cannot write: {e}")))?;
    Ok(Requested {
        key: key_path,
        csr: csr_path,
    })
}

/// Signs a CSR with a CA's certificate and key (a lab's stand-in for the platform's CA):
/// a client-and-server certificate for the CSR's names, valid from a day ago for `days`.
pub fn dev_sign(
    ca_cert: &Path,
    ca_key: &Path,
    csr: &Path,
    days: i64,
) -> Result<String, EnrolError> {
    let read =
        |p: &Path| std::fs::read_to_string(p).map_err(|e| file(p, format!("cannot read: {e}")));
    let key = KeyPair::from_pem(&read(ca_key)?).map_err(|e| file(ca_key, e))?;
    let issuer = Issuer::from_ca_cert_pem(&read(ca_cert)?, key).map_err(|e| file(ca_cert, e))?;
    let mut req =
        CertificateSigningRequestParams::from_pem(&read(csr)?).map_err(|e| file(csr, e))?;
    // Whole days, UTC midnight: from yesterday to `days` from today (0: already expired).
    let now = crate::timefmt::now_ms();
    let (y, m, d) = ymd(now - 86_400_000);
    req.params.not_before = rcgen::date_time_ymd(y, m, d);
    let (y, m, d) = ymd(now + days.max(0) * 86_400_000);
    req.params.not_after = rcgen::date_time_ymd(y, m, d);
    req.params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    req.params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ClientAuth,
        ExtendedKeyUsagePurpose::ServerAuth,
    ];
    let cert = req
        .signed_by(&issuer)
        .map_err(|e| EnrolError::Refused(format!("cannot sign: {e}")))?;
    Ok(cert.pem())
}

/// The UTC date of `ms` as (year, month, day).
fn ymd(ms: i64) -> (i32, u8, u8) {
    let d = crate::timefmt::utc_date(ms);
    let part = |r: std::ops::Range<usize>| d.get(r).and_then(|x| x.parse().ok()).unwrap_or(1);
    (part(0..4), part(5..7) as u8, part(8..10) as u8)
}

/// What to install and where.
pub struct Install<'a> {
    pub gateway_id: &'a str,
    /// The CA the certificate must chain to (the platform's).
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub chain: Option<&'a Path>,
    /// The key made by `request`; the configured key when None.
    pub new_key: Option<&'a Path>,
    /// Where the config says the certificate and the key live.
    pub cert_at: &'a Path,
    pub key_at: &'a Path,
}

/// What was installed.
#[derive(Debug)]
pub struct Installed {
    pub not_after_unix: i64,
    pub days_left: i64,
}

/// Checks the certificate and swaps it (and a new key) in.
pub fn install(i: &Install<'_>) -> Result<Installed, EnrolError> {
    let leaf = load_certs(i.cert).map_err(|e| EnrolError::Refused(e.to_string()))?;
    let mut intermediates: Vec<CertificateDer<'static>> = leaf[1..].to_vec();
    if let Some(chain) = i.chain {
        intermediates.extend(load_certs(chain).map_err(|e| EnrolError::Refused(e.to_string()))?);
    }
    let end = &leaf[0];
    let id = identity(end).map_err(|e| file(i.cert, e))?;
    if id.cn != i.gateway_id {
        return Err(EnrolError::Refused(format!(
            "{}: the certificate is for CN {:?}, but this gateway is {:?} (gateway.id)",
            i.cert.display(),
            id.cn,
            i.gateway_id
        )));
    }
    let key_path = i.new_key.unwrap_or(i.key_at);
    let signer =
        crate::keys::Signer::load(key_path).map_err(|e| EnrolError::Refused(e.to_string()))?;
    if signer.spki_der() != id.spki_der {
        return Err(EnrolError::Refused(format!(
            "{}: the certificate is not for the key {} (was the request made with another key?)",
            i.cert.display(),
            key_path.display()
        )));
    }
    // Chain, dates and client authentication, as the platform will check them.
    let mut roots = rustls::RootCertStore::empty();
    for c in load_certs(i.ca).map_err(|e| EnrolError::Refused(e.to_string()))? {
        roots.add(c).map_err(|e| file(i.ca, e))?;
    }
    // Roots the CA sent along are not intermediates.
    intermediates.retain(|c| !roots.roots.iter().any(|r| is_same_subject(c, r)));
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        crate::tls::provider(),
    )
    .build()
    .map_err(|e| EnrolError::Refused(e.to_string()))?;
    verifier
        .verify_client_cert(end, &intermediates, UnixTime::now())
        .map_err(|e| {
            EnrolError::Refused(format!(
                "{}: not accepted against the CA {}: {e}",
                i.cert.display(),
                i.ca.display()
            ))
        })?;
    let days_left = (id.not_after_unix - crate::timefmt::now_ms() / 1000).div_euclid(86_400);

    // Swap: each file is written beside its target, synced, then renamed over it, so a
    // reader sees the old file or the new one, never half of one. The old ones stay as
    // `*.previous` to put back by hand.
    let mut pem = String::new();
    for c in std::iter::once(end).chain(intermediates.iter()) {
        pem += &crate::keys::pem_encode("CERTIFICATE", c.as_ref());
    }
    if let Some(k) = i.new_key {
        let bytes = std::fs::read(k).map_err(|e| file(k, format!("cannot read: {e}")))?;
        keep_previous(i.key_at)?;
        swap(i.key_at, &bytes, true)?;
    }
    keep_previous(i.cert_at)?;
    swap(i.cert_at, pem.as_bytes(), false)?;
    Ok(Installed {
        not_after_unix: id.not_after_unix,
        days_left,
    })
}

fn is_same_subject(a: &CertificateDer<'_>, b: &rustls::pki_types::TrustAnchor<'_>) -> bool {
    x509_parser::parse_x509_certificate(a.as_ref())
        .map(|(_, x)| x.subject().as_raw() == b.subject.as_ref())
        .unwrap_or(false)
}

fn keep_previous(path: &Path) -> Result<(), EnrolError> {
    if path.exists() {
        let prev = path.with_extension(format!(
            "{}previous",
            path.extension()
                .map(|e| format!("{}.", e.to_string_lossy()))
                .unwrap_or_default()
        ));
        std::fs::copy(path, &prev).map_err(|e| file(&prev, format!("cannot keep a copy: {e}")))?;
    }
    Ok(())
}

fn swap(path: &Path, bytes: &[u8], private: bool) -> Result<(), EnrolError> {
    let tmp = path.with_extension("installing");
    let _ = std::fs::remove_file(&tmp);
    let w = if private {
        write_private(&tmp, bytes)
    } else {
        std::fs::write(&tmp, bytes)
    };
    w.map_err(|e| file(&tmp, format!("cannot write: {e}")))?;
    // The daemon runs as its own user: a file replaced by root keeps its owner.
    if let Ok(m) = std::fs::metadata(path) {
        use std::os::unix::fs::MetadataExt;
        let _ = std::os::unix::fs::chown(&tmp, Some(m.uid()), Some(m.gid()));
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(|e| file(&tmp, format!("cannot sync: {e}")))?;
    std::fs::rename(&tmp, path).map_err(|e| file(path, format!("cannot replace: {e}")))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

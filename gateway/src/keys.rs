//! Key files: the gateway's ECDSA P-256 signing key (its certificate key) and the platform's
//! HPKE X25519 key pair, as PEM; private files are created 0600 and refused when readable by
//! group or others. No function here logs or formats key material.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use base64::Engine as _;
use hpke::{Deserializable, Serializable};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{PrivateKeyDer, SubjectPublicKeyInfoDer};
use sha2::{Digest, Sha256};

/// The KEM of the sealing suite.
pub type Kem = hpke::kem::X25519HkdfSha256;
pub type HpkePublicKey = <Kem as hpke::Kem>::PublicKey;
pub type HpkePrivateKey = <Kem as hpke::Kem>::PrivateKey;

const X25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
];
const X25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x04, 0x22, 0x04, 0x20,
];
/// SubjectPublicKeyInfo header of an uncompressed P-256 point (id-ecPublicKey, prime256v1).
const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("{path}: cannot read key file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: String, what: String },
    #[error("{0}")]
    Mode(String),
}

fn invalid(path: &Path, what: impl Into<String>) -> KeyError {
    KeyError::Invalid {
        path: path.display().to_string(),
        what: what.into(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    fs::read(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Refuses a private key file that group or others can read or write.
pub fn check_private_mode(path: &Path) -> Result<(), String> {
    let meta = fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "private key {} has mode {mode:04o}: it must be readable by its owner only; fix with: chmod 600 {}",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Writes a file readable by its owner only (created 0600, replaced atomically).
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp-new");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    fs::rename(&tmp, path)
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The gateway's signing key: the private key of its client certificate.
pub struct Signer {
    key: EcdsaKeyPair,
    rng: SystemRandom,
    key_id: [u8; 32],
}

impl Signer {
    /// Loads a PKCS#8 P-256 key from PEM, refusing a file others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        check_private_mode(path).map_err(KeyError::Mode)?;
        let pem = read(path)?;
        let der = match PrivateKeyDer::from_pem_slice(&pem) {
            Ok(PrivateKeyDer::Pkcs8(der)) => der,
            Ok(_) => {
                return Err(invalid(
                    path,
                    "the key is not PKCS#8; convert it with: openssl pkcs8 -topk8 -nocrypt -in OLD -out NEW",
                ))
            }
            Err(_) => return Err(invalid(path, "no PEM private key found")),
        };
        Self::from_pkcs8(der.secret_pkcs8_der()).map_err(|what| invalid(path, what))
    }

    pub fn from_pkcs8(der: &[u8]) -> Result<Self, String> {
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, der, &rng)
            .map_err(|e| format!("not an ECDSA P-256 key the gateway can use ({e})"))?;
        let key_id = key_id_of_spki(&p256_spki(key.public_key().as_ref()));
        Ok(Self { key, rng, key_id })
    }

    /// SHA-256 of the signer's SubjectPublicKeyInfo DER: what the envelope names.
    pub fn key_id(&self) -> [u8; 32] {
        self.key_id
    }

    pub fn spki_der(&self) -> Vec<u8> {
        p256_spki(self.key.public_key().as_ref())
    }

    /// An ASN.1 DER ECDSA-P256-SHA256 signature.
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        self.key
            .sign(&self.rng, msg)
            .map(|s| s.as_ref().to_vec())
            .map_err(|_| "ECDSA signing failed".to_string())
    }
}

fn p256_spki(point: &[u8]) -> Vec<u8> {
    let mut v = P256_SPKI_PREFIX.to_vec();
    v.extend_from_slice(point);
    v
}

pub fn key_id_of_spki(spki_der: &[u8]) -> [u8; 32] {
    Sha256::digest(spki_der).into()
}

/// Generates an HPKE X25519 key pair as (private PKCS#8 PEM, public SPKI PEM).
pub fn generate_hpke_pair() -> (String, String) {
    let (sk, pk) = <Kem as hpke::Kem>::gen_keypair();
    hpke_pems(&sk, &pk)
}

pub fn hpke_pems(sk: &HpkePrivateKey, pk: &HpkePublicKey) -> (String, String) {
    let mut private = X25519_PKCS8_PREFIX.to_vec();
    private.extend_from_slice(&sk.to_bytes());
    let mut public = X25519_SPKI_PREFIX.to_vec();
    public.extend_from_slice(&pk.to_bytes());
    (
        pem_encode("PRIVATE KEY", &private),
        pem_encode("PUBLIC KEY", &public),
    )
}

pub fn load_hpke_public(path: &Path) -> Result<HpkePublicKey, KeyError> {
    let pem = read(path)?;
    let der = SubjectPublicKeyInfoDer::from_pem_slice(&pem)
        .map_err(|_| invalid(path, "no PEM PUBLIC KEY found"))?;
    let raw = der
        .as_ref()
        .strip_prefix(&X25519_SPKI_PREFIX[..])
        .filter(|r| r.len() == 32)
        .ok_or_else(|| invalid(path, "not an X25519 public key (OID 1.3.101.110)"))?;
    HpkePublicKey::from_bytes(raw).map_err(|_| invalid(path, "invalid X25519 public key"))
}

pub fn load_hpke_private(path: &Path) -> Result<HpkePrivateKey, KeyError> {
    check_private_mode(path).map_err(KeyError::Mode)?;
    let pem = read(path)?;
    let der = match PrivateKeyDer::from_pem_slice(&pem) {
        Ok(PrivateKeyDer::Pkcs8(d)) => d,
        _ => return Err(invalid(path, "no PEM PKCS#8 PRIVATE KEY found")),
    };
    let raw = der
        .secret_pkcs8_der()
        .strip_prefix(&X25519_PKCS8_PREFIX[..])
        .filter(|r| r.len() == 32)
        .ok_or_else(|| invalid(path, "not an X25519 private key (OID 1.3.101.110)"))?;
    HpkePrivateKey::from_bytes(raw).map_err(|_| invalid(path, "invalid X25519 private key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hpke_pem_round_trip_and_private_mode_enforced() {
        let dir = tempfile::tempdir().unwrap();
        let (sk_pem, pk_pem) = generate_hpke_pair();
        let sk_path = dir.path().join("k.key");
        let pk_path = dir.path().join("k.pub");
        write_private(&sk_path, sk_pem.as_bytes()).unwrap();
        fs::write(&pk_path, pk_pem).unwrap();
        let sk = load_hpke_private(&sk_path).unwrap();
        let pk = load_hpke_public(&pk_path).unwrap();
        let (_, derived) = hpke_pems(&sk, &pk);
        assert_eq!(derived, fs::read_to_string(&pk_path).unwrap());

        fs::set_permissions(&sk_path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_hpke_private(&sk_path).err().unwrap().to_string();
        assert!(err.contains("chmod 600"), "{err}");
    }
}

//! The sealed envelope (docs/protocol.md is its specification): JSON Lines compressed with
//! zstd, encrypted with HPKE (RFC 9180 base mode, X25519 / HKDF-SHA256 / AES-256-GCM) to the
//! platform's public key with the header as AAD, and signed with ECDSA P-256 / SHA-256 by the
//! gateway's certificate key. Sealing needs only the platform's *public* key: the gateway
//! cannot open what it buffered.
//!
//! Layout (all integers big-endian):
//! ```text
//! "SHYB" | version u8 | header_len u16 | header | ct_len u32 | ct | sig_len u16 | sig
//! header = suite u8 | compression u8 | seq u64 | created_ms i64 | records u32 |
//!          plaintext_len u32 | signer_key_id [32] | enc_len u16 | enc | id_len u8 | gateway_id |
//!          pk_len u8 | pseudonym_key_id
//! AAD    = bytes from "SHYB" to the end of header
//! signed = bytes from "SHYB" to the end of ct
//! ```

use hpke::aead::AesGcm256;
use hpke::kdf::HkdfSha256;
use hpke::{Deserializable, OpModeR, OpModeS, Serializable};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_ASN1};

use crate::keys::{key_id_of_spki, HpkePrivateKey, HpkePublicKey, Kem, Signer};

pub const MAGIC: &[u8; 4] = b"SHYB";
pub const VERSION: u8 = 1;
/// HPKE base X25519-HKDF-SHA256 / HKDF-SHA256 / AES-256-GCM, ECDSA P-256 SHA-256 (DER).
pub const SUITE_X25519_AES256GCM_P256: u8 = 1;
pub const COMPRESSION_ZSTD: u8 = 1;
/// HPKE `info`: binds the key schedule to this protocol and version.
pub const HPKE_INFO: &[u8] = b"shuyuan/v1 batch";
/// The largest plaintext a receiver will inflate (a guard against compression bombs).
pub const MAX_PLAINTEXT: u32 = 256 << 20;
const PREFIX: usize = 4 + 1 + 2;
const P256_SPKI_PREFIX_LEN: usize = 26;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("malformed envelope: {0}")]
    Malformed(String),
    #[error("unsupported envelope version {0} (this build reads version 1)")]
    Version(u8),
    #[error("unsupported suite {0}")]
    Suite(u8),
    #[error("the envelope names a different signing key than the sender's certificate")]
    SignerMismatch,
    #[error("signature does not verify: the envelope was altered or not signed by this sender")]
    BadSignature,
    #[error("cannot decrypt: not sealed to this platform key, or altered")]
    Decrypt,
    #[error("decompressed content is wrong: {0}")]
    Content(String),
    #[error("cannot seal: {0}")]
    Seal(String),
}

fn malformed(what: impl Into<String>) -> SealError {
    SealError::Malformed(what.into())
}

/// The header's fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub suite: u8,
    pub compression: u8,
    pub seq: u64,
    pub created_ms: i64,
    pub records: u32,
    pub plaintext_len: u32,
    pub signer_key_id: [u8; 32],
    pub enc: Vec<u8>,
    pub gateway_id: String,
    /// Id of the key that made the pseudonyms in this batch; empty when none is configured.
    pub pseudonym_key_id: String,
}

/// What the sealer needs to know of a batch besides its body.
#[derive(Debug, Clone)]
pub struct BatchMeta<'a> {
    pub gateway_id: &'a str,
    pub seq: u64,
    pub created_ms: i64,
    pub records: u32,
    pub pseudonym_key_id: &'a str,
}

/// Seals a JSON Lines body into an envelope.
pub fn seal(
    body: &[u8],
    meta: &BatchMeta<'_>,
    recipient: &HpkePublicKey,
    signer: &Signer,
    zstd_level: i32,
) -> Result<Vec<u8>, SealError> {
    let plaintext_len = u32::try_from(body.len())
        .ok()
        .filter(|&n| n <= MAX_PLAINTEXT)
        .ok_or_else(|| SealError::Seal("batch body larger than 256 MiB".into()))?;
    let id = meta.gateway_id.as_bytes();
    let id_len = u8::try_from(id.len())
        .map_err(|_| SealError::Seal("gateway id longer than 255 bytes".into()))?;
    let compressed = compress(body, zstd_level)?;
    let (encapped, mut ctx) =
        hpke::setup_sender::<AesGcm256, HkdfSha256, Kem>(&OpModeS::Base, recipient, HPKE_INFO)
            .map_err(|e| SealError::Seal(format!("HPKE setup: {e}")))?;
    let enc = encapped.to_bytes();

    let mut out = Vec::with_capacity(compressed.len() + 256);
    out.extend_from_slice(MAGIC);
    out.push(VERSION);
    out.extend_from_slice(&[0, 0]); // header_len, filled below
    out.push(SUITE_X25519_AES256GCM_P256);
    out.push(COMPRESSION_ZSTD);
    out.extend_from_slice(&meta.seq.to_be_bytes());
    out.extend_from_slice(&meta.created_ms.to_be_bytes());
    out.extend_from_slice(&meta.records.to_be_bytes());
    out.extend_from_slice(&plaintext_len.to_be_bytes());
    out.extend_from_slice(&signer.key_id());
    out.extend_from_slice(&(enc.len() as u16).to_be_bytes());
    out.extend_from_slice(&enc);
    out.push(id_len);
    out.extend_from_slice(id);
    let pk = meta.pseudonym_key_id.as_bytes();
    let pk_len = u8::try_from(pk.len())
        .map_err(|_| SealError::Seal("pseudonym key id longer than 255 bytes".into()))?;
    out.push(pk_len);
    out.extend_from_slice(pk);
    let header_len = (out.len() - PREFIX) as u16;
    out[5..7].copy_from_slice(&header_len.to_be_bytes());

    let ct = ctx
        .seal(&compressed, &out)
        .map_err(|e| SealError::Seal(format!("AEAD: {e}")))?;
    let ct_len =
        u32::try_from(ct.len()).map_err(|_| SealError::Seal("ciphertext too large".into()))?;
    out.extend_from_slice(&ct_len.to_be_bytes());
    out.extend_from_slice(&ct);
    let sig = signer.sign(&out).map_err(SealError::Seal)?;
    out.extend_from_slice(&(sig.len() as u16).to_be_bytes());
    out.extend_from_slice(&sig);
    Ok(out)
}

/// zstd with a 128 KiB window: JSON Lines repeat within a few records, so a larger window
/// gains little ratio and costs the gateway megabytes of compression tables per batch.
fn compress(body: &[u8], level: i32) -> Result<Vec<u8>, SealError> {
    let err = |e: std::io::Error| SealError::Seal(format!("zstd: {e}"));
    let mut c = zstd::bulk::Compressor::new(level).map_err(err)?;
    c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(17))
        .map_err(err)?;
    c.compress(body).map_err(err)
}

/// A parsed, not yet verified envelope borrowing the received bytes.
#[derive(Debug)]
pub struct Envelope<'a> {
    pub header: Header,
    aad: &'a [u8],
    signed: &'a [u8],
    ct: &'a [u8],
    sig: &'a [u8],
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], SealError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.buf.len())
            .ok_or_else(|| {
                malformed(format!(
                    "truncated in {what} at byte {} (need {n} bytes, {} left)",
                    self.pos,
                    self.buf.len() - self.pos
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], SealError> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self, what: &str) -> Result<u8, SealError> {
        Ok(self.array::<1>(what)?[0])
    }
    fn u16(&mut self, what: &str) -> Result<u16, SealError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, SealError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
}

impl<'a> Envelope<'a> {
    pub fn parse(buf: &'a [u8]) -> Result<Self, SealError> {
        let mut c = Cursor { buf, pos: 0 };
        if c.take(4, "magic")? != MAGIC {
            return Err(malformed("not a Shuyuan batch (magic is not \"SHYB\")"));
        }
        let version = c.u8("version")?;
        if version != VERSION {
            return Err(SealError::Version(version));
        }
        let header_len = usize::from(c.u16("header_len")?);
        let header_bytes = c.take(header_len, "header")?;
        let aad = &buf[..c.pos];
        let header = parse_header(header_bytes)?;
        let ct_len = c.u32("ct_len")? as usize;
        let ct = c.take(ct_len, "ciphertext")?;
        let signed = &buf[..c.pos];
        let sig_len = usize::from(c.u16("sig_len")?);
        let sig = c.take(sig_len, "signature")?;
        if c.pos != buf.len() {
            return Err(malformed(format!(
                "{} unexpected bytes after the signature",
                buf.len() - c.pos
            )));
        }
        Ok(Self {
            header,
            aad,
            signed,
            ct,
            sig,
        })
    }

    /// Checks that the envelope names `spki_der`'s key and that the signature verifies.
    pub fn verify(&self, spki_der: &[u8]) -> Result<(), SealError> {
        if key_id_of_spki(spki_der) != self.header.signer_key_id {
            return Err(SealError::SignerMismatch);
        }
        let point = spki_der
            .get(P256_SPKI_PREFIX_LEN..)
            .ok_or(SealError::SignerMismatch)?;
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, point)
            .verify(self.signed, self.sig)
            .map_err(|_| SealError::BadSignature)
    }

    /// Decrypts and decompresses the body. Call [`Envelope::verify`] first.
    pub fn open(&self, sk: &HpkePrivateKey) -> Result<Vec<u8>, SealError> {
        let enc = <Kem as hpke::Kem>::EncappedKey::from_bytes(&self.header.enc)
            .map_err(|_| malformed("enc is not an X25519 public key"))?;
        let compressed = hpke::single_shot_open::<AesGcm256, HkdfSha256, Kem>(
            &OpModeR::Base,
            sk,
            &enc,
            HPKE_INFO,
            self.ct,
            self.aad,
        )
        .map_err(|_| SealError::Decrypt)?;
        let want = self.header.plaintext_len as usize;
        let body = zstd::bulk::decompress(&compressed, want)
            .map_err(|e| SealError::Content(format!("zstd: {e}")))?;
        if body.len() != want {
            return Err(SealError::Content(format!(
                "{} bytes, header says {want}",
                body.len()
            )));
        }
        Ok(body)
    }
}

fn parse_header(h: &[u8]) -> Result<Header, SealError> {
    let mut c = Cursor { buf: h, pos: 0 };
    let suite = c.u8("suite")?;
    if suite != SUITE_X25519_AES256GCM_P256 {
        return Err(SealError::Suite(suite));
    }
    let compression = c.u8("compression")?;
    if compression != COMPRESSION_ZSTD {
        return Err(malformed(format!("unknown compression {compression}")));
    }
    let seq = u64::from_be_bytes(c.array("seq")?);
    let created_ms = i64::from_be_bytes(c.array("created_ms")?);
    let records = c.u32("records")?;
    let plaintext_len = c.u32("plaintext_len")?;
    if plaintext_len > MAX_PLAINTEXT {
        return Err(malformed(format!(
            "plaintext_len {plaintext_len} exceeds the 256 MiB limit"
        )));
    }
    let signer_key_id = c.array("signer_key_id")?;
    let enc_len = usize::from(c.u16("enc_len")?);
    let enc = c.take(enc_len, "enc")?.to_vec();
    let id_len = usize::from(c.u8("id_len")?);
    let gateway_id = std::str::from_utf8(c.take(id_len, "gateway_id")?)
        .map_err(|_| malformed("gateway_id is not UTF-8"))?
        .to_owned();
    let pk_len = usize::from(c.u8("pk_len")?);
    let pseudonym_key_id = std::str::from_utf8(c.take(pk_len, "pseudonym_key_id")?)
        .map_err(|_| malformed("pseudonym_key_id is not UTF-8"))?
        .to_owned();
    if c.pos != h.len() {
        return Err(malformed("header_len does not match the header's fields"));
    }
    Ok(Header {
        suite,
        compression,
        seq,
        created_ms,
        records,
        plaintext_len,
        signer_key_id,
        enc,
        gateway_id,
        pseudonym_key_id,
    })
}

/// Derives an HPKE key pair from seed bytes (RFC 9180 DeriveKeyPair), for test vectors.
pub fn derive_hpke_keypair(ikm: &[u8]) -> (HpkePrivateKey, HpkePublicKey) {
    <Kem as hpke::Kem>::derive_keypair(ikm)
}

/// A self-describing test vector (the format of docs/vectors/batch-v1.json): a fresh
/// envelope with everything an independent implementation needs to check it.
pub fn test_vector(
    body: &str,
    meta: &BatchMeta<'_>,
    signer: &Signer,
) -> Result<serde_json::Value, SealError> {
    let (sk, pk) = derive_hpke_keypair(VECTOR_SEED);
    let records = body.lines().count() as u32;
    let meta = BatchMeta {
        records,
        ..meta.clone()
    };
    let env = seal(body.as_bytes(), &meta, &pk, signer, 1)?;
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    Ok(serde_json::json!({
        "description": "Shuyuan batch envelope v1 test vector: see docs/protocol.md",
        "hpke_info": std::str::from_utf8(HPKE_INFO).unwrap_or_default(),
        "recipient_private_key_hex": hex(&sk.to_bytes()),
        "recipient_public_key_hex": hex(&pk.to_bytes()),
        "signer_spki_der_hex": hex(&signer.spki_der()),
        "signer_key_id_hex": hex(&signer.key_id()),
        "envelope_hex": hex(&env),
        "expected": {
            "gateway_id": meta.gateway_id,
            "seq": meta.seq,
            "created_ms": meta.created_ms,
            "records": records,
            "pseudonym_key_id": meta.pseudonym_key_id,
            "plaintext_len": body.len(),
            "plaintext": body,
        }
    }))
}

/// The seed of the test vectors' recipient key (RFC 9180 DeriveKeyPair input).
pub const VECTOR_SEED: &[u8] = b"shuyuan protocol test vector v1";

#[cfg(test)]
mod tests;

//! Pseudonyms: a keyed HMAC-SHA256 of the value under a per-deployment secret, written as a
//! short base32 token. The same value under the same key always gives the same token, so the
//! platform can join records across batches and across gateways that share a key; without
//! the key, a token cannot be reversed by enumerating ID or phone numbers (which an unkeyed
//! hash can: there are only about 10^11 mobile numbers).
//!
//! Key file (`shuyuan keys init`), 0600: the line `shuyuan-pseudonym-key v1` then 64 hex
//! digits. The key id, `SHA-256("shuyuan/pseudonym-key-id/v1" || key)[..8]` in hex, travels
//! in each batch header so the platform knows which key made the tokens (rotation: make a
//! new key; its id changes).

use std::path::Path;

use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

const HEADER: &str = "shuyuan-pseudonym-key v1";
const DOMAIN: &[u8] = b"shuyuan/pseudonym/v1\0";
const BASE32: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz234567";
/// Characters of a token when the rule does not say: 100 bits.
pub const DEFAULT_LENGTH: usize = 20;

pub struct PseudonymKey {
    key: hmac::Key,
    id: String,
}

impl std::fmt::Debug for PseudonymKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key itself.
        f.debug_struct("PseudonymKey")
            .field("id", &self.id)
            .finish()
    }
}

fn key_id(raw: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(b"shuyuan/pseudonym-key-id/v1");
    h.update(raw);
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl PseudonymKey {
    pub fn from_bytes(raw: &[u8; 32]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, raw),
            id: key_id(raw),
        }
    }

    /// Reads a key file, refusing one that group or others can read.
    pub fn load(path: &Path) -> Result<Self, String> {
        crate::keys::check_private_mode(path)?;
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read pseudonym key {}: {e}", path.display()))?;
        let mut lines = text.lines();
        let bad = || {
            format!(
                "{} is not a pseudonym key file (make one with: shuyuan keys init --out {})",
                path.display(),
                path.display()
            )
        };
        if lines.next().map(str::trim) != Some(HEADER) {
            return Err(bad());
        }
        let hex = lines.next().map(str::trim).ok_or_else(bad)?;
        if hex.len() != 64 {
            return Err(bad());
        }
        let mut raw = [0u8; 32];
        for (i, b) in raw.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16)
                .map_err(|_| bad())?;
        }
        Ok(Self::from_bytes(&raw))
    }

    /// Creates a new random key file (0600); refuses to overwrite one.
    pub fn init(path: &Path) -> Result<Self, String> {
        if path.exists() {
            return Err(format!(
                "{} exists: a new key changes every pseudonym; move the old file away first if that is what you want",
                path.display()
            ));
        }
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let mut raw = [0u8; 32];
        SystemRandom::new()
            .fill(&mut raw)
            .map_err(|_| "no system randomness".to_string())?;
        let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        crate::keys::write_private(path, format!("{HEADER}\n{hex}\n").as_bytes())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        Ok(Self::from_bytes(&raw))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// `prefix` + the first `length` base32 characters of HMAC-SHA256(key, domain || value).
    pub fn token(&self, value: &str, prefix: &str, length: usize) -> String {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(DOMAIN);
        ctx.update(value.as_bytes());
        let tag = ctx.sign();
        let mut out = String::with_capacity(prefix.len() + length);
        out.push_str(prefix);
        let (mut acc, mut bits) = (0u32, 0u32);
        for &b in tag.as_ref() {
            acc = (acc << 8) | u32::from(b);
            bits += 8;
            while bits >= 5 && out.len() < prefix.len() + length {
                bits -= 5;
                out.push(char::from(BASE32[((acc >> bits) & 31) as usize]));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stable_per_key_and_differ_across_keys() {
        let a = PseudonymKey::from_bytes(&[1; 32]);
        let b = PseudonymKey::from_bytes(&[2; 32]);
        let t = a.token("110101199003077777", "p_", 20);
        assert_eq!(t, a.token("110101199003077777", "p_", 20));
        assert_eq!(t.len(), 22);
        assert!(t.starts_with("p_"));
        assert_ne!(t, b.token("110101199003077777", "p_", 20));
        assert_ne!(t, a.token("110101199003077778", "p_", 20));
        assert_ne!(a.id(), b.id());
        assert_eq!(a.id().len(), 16);
    }

    #[test]
    fn key_files_round_trip_and_are_private() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pseudonym.key");
        let made = PseudonymKey::init(&p).unwrap();
        let loaded = PseudonymKey::load(&p).unwrap();
        assert_eq!(made.id(), loaded.id());
        assert_eq!(made.token("x", "", 16), loaded.token("x", "", 16));
        assert!(PseudonymKey::init(&p).unwrap_err().contains("exists"));
        assert!(!format!("{loaded:?}").contains(&std::fs::read_to_string(&p).unwrap()[25..40]));
    }
}

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};

use super::*;

fn signer() -> Signer {
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
        .unwrap();
    Signer::from_pkcs8(pkcs8.as_ref()).unwrap()
}

fn meta() -> BatchMeta<'static> {
    BatchMeta {
        gateway_id: "GW-1",
        seq: 7,
        created_ms: 1_700_000_000_000,
        records: 2,
        pseudonym_key_id: "",
    }
}

const BODY: &[u8] = b"{\"a\":1}\n{\"a\":2}\n";

#[test]
fn round_trip_restores_header_and_body() {
    let (sk, pk) = derive_hpke_keypair(b"k");
    let s = signer();
    let env = seal(BODY, &meta(), &pk, &s, 1).unwrap();
    let e = Envelope::parse(&env).unwrap();
    assert_eq!(e.header.seq, 7);
    assert_eq!(e.header.gateway_id, "GW-1");
    assert_eq!(e.header.records, 2);
    assert_eq!(e.header.plaintext_len as usize, BODY.len());
    assert_eq!(e.header.signer_key_id, s.key_id());
    e.verify(&s.spki_der()).unwrap();
    assert_eq!(e.open(&sk).unwrap(), BODY);
    // The plaintext does not appear in the envelope.
    assert!(!env.windows(7).any(|w| w == b"{\"a\":1}"));
}

#[test]
fn any_flipped_byte_is_caught() {
    let (sk, pk) = derive_hpke_keypair(b"k");
    let s = signer();
    let env = seal(BODY, &meta(), &pk, &s, 1).unwrap();
    for i in 0..env.len() {
        let mut bad = env.clone();
        bad[i] ^= 0x01;
        let outcome = Envelope::parse(&bad).and_then(|e| {
            e.verify(&s.spki_der())?;
            e.open(&sk)
        });
        assert!(outcome.is_err(), "flip at byte {i} went unnoticed");
    }
}

#[test]
fn tampered_header_and_ciphertext_fail_signature_before_decryption() {
    let (sk, pk) = derive_hpke_keypair(b"k");
    let s = signer();
    let env = seal(BODY, &meta(), &pk, &s, 1).unwrap();
    let mut hdr = env.clone();
    hdr[9] ^= 0xff; // inside seq
    assert_eq!(
        Envelope::parse(&hdr).unwrap().verify(&s.spki_der()),
        Err(SealError::BadSignature)
    );
    let mut ct = env.clone();
    let ct_at = env.len() - 80;
    ct[ct_at] ^= 0xff;
    let e = Envelope::parse(&ct).unwrap();
    assert!(e.verify(&s.spki_der()).is_err());
    // Even without the signature check, AES-GCM refuses the altered ciphertext.
    assert!(e.open(&sk).is_err());
}

#[test]
fn wrong_keys_are_named() {
    let (_, pk) = derive_hpke_keypair(b"k");
    let (other_sk, _) = derive_hpke_keypair(b"other");
    let s = signer();
    let env = seal(BODY, &meta(), &pk, &s, 1).unwrap();
    let e = Envelope::parse(&env).unwrap();
    assert_eq!(
        e.verify(&signer().spki_der()),
        Err(SealError::SignerMismatch)
    );
    assert_eq!(e.open(&other_sk), Err(SealError::Decrypt));
}

#[test]
fn truncation_and_garbage_are_malformed_not_panics() {
    let (_, pk) = derive_hpke_keypair(b"k");
    let env = seal(BODY, &meta(), &pk, &signer(), 1).unwrap();
    for n in 0..env.len() {
        assert!(Envelope::parse(&env[..n]).is_err());
    }
    let mut long = env.clone();
    long.push(0);
    assert!(matches!(
        Envelope::parse(&long),
        Err(SealError::Malformed(_))
    ));
    let mut v2 = env;
    v2[4] = 2;
    assert_eq!(Envelope::parse(&v2).unwrap_err(), SealError::Version(2));
}

#[test]
fn protocol_md_test_vector_opens() {
    let v: serde_json::Value =
        serde_json::from_str(include_str!("../../../docs/vectors/batch-v1.json")).unwrap();
    let hexs = |k: &str| hex::decode(v[k].as_str().unwrap()).unwrap();
    let sk = <crate::keys::HpkePrivateKey as Deserializable>::from_bytes(&hexs(
        "recipient_private_key_hex",
    ))
    .unwrap();
    let env_bytes = hexs("envelope_hex");
    let e = Envelope::parse(&env_bytes).unwrap();
    let x = &v["expected"];
    assert_eq!(e.header.gateway_id, x["gateway_id"].as_str().unwrap());
    assert_eq!(e.header.seq, x["seq"].as_u64().unwrap());
    assert_eq!(e.header.created_ms, x["created_ms"].as_i64().unwrap());
    assert_eq!(e.header.records as u64, x["records"].as_u64().unwrap());
    assert_eq!(
        e.header.pseudonym_key_id,
        x["pseudonym_key_id"].as_str().unwrap()
    );
    e.verify(&hexs("signer_spki_der_hex")).unwrap();
    let body = e.open(&sk).unwrap();
    assert_eq!(
        std::str::from_utf8(&body).unwrap(),
        x["plaintext"].as_str().unwrap()
    );
    // The recipient key really is the one derived as documented.
    let (_, pk) = derive_hpke_keypair(b"shuyuan protocol test vector v1");
    assert_eq!(
        hex::encode(pk.to_bytes()),
        v["recipient_public_key_hex"].as_str().unwrap()
    );
}

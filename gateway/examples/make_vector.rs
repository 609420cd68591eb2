//! Writes docs/vectors/batch-v1.json: a sealed envelope with everything an independent
//! implementation needs to check it (the recipient's private key, the signer's public key,
//! the expected header fields and plaintext). Run: cargo run -p shuyuan --example make_vector

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use shuyuan::keys::Signer;
use shuyuan::seal::{self, BatchMeta, Envelope};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    use hpke::Serializable;
    let (sk, pk) = seal::derive_hpke_keypair(b"shuyuan protocol test vector v1");
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &SystemRandom::new())
        .map_err(|_| "keygen")?;
    let signer = Signer::from_pkcs8(pkcs8.as_ref())?;
    let body = concat!(
        "{\"source\":\"pump-station-3\",\"ts\":\"2026-11-25T01:00:00.000Z\",\"seq\":1,\"fields\":{\"flow_m3h\":118.5,\"meter_id\":\"WTR-*********17\",\"station\":\"和平区3号泵站\"}}\n",
        "{\"source\":\"pump-station-3\",\"ts\":\"2026-11-25T01:00:01.000Z\",\"seq\":2,\"fields\":{\"flow_m3h\":118.7,\"meter_id\":\"WTR-*********17\",\"station\":\"和平区3号泵站\"}}\n",
    );
    let meta = BatchMeta {
        gateway_id: "GW-TJ-WATER-0001",
        seq: 42,
        created_ms: 1_795_568_400_000,
        records: 2,
    };
    let env = seal::seal(body.as_bytes(), &meta, &pk, &signer, 1)?;
    let parsed = Envelope::parse(&env)?;
    parsed.verify(&signer.spki_der())?;
    assert_eq!(parsed.open(&sk)?, body.as_bytes());
    let v = serde_json::json!({
        "description": "Shuyuan batch envelope v1 test vector: see docs/protocol.md",
        "hpke_info": "shuyuan/v1 batch",
        "recipient_private_key_hex": hex::encode(sk.to_bytes()),
        "recipient_public_key_hex": hex::encode(pk.to_bytes()),
        "signer_spki_der_hex": hex::encode(signer.spki_der()),
        "signer_key_id_hex": hex::encode(signer.key_id()),
        "envelope_hex": hex::encode(&env),
        "expected": {
            "gateway_id": meta.gateway_id,
            "seq": meta.seq,
            "created_ms": meta.created_ms,
            "records": meta.records,
            "plaintext_len": body.len(),
            "plaintext": body,
        }
    });
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors/batch-v1.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}

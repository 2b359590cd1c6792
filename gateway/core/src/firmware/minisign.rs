//! minisign's public keys and signatures (ed25519), read and checked as
//! `minisign -V` does: the signature over the file (its BLAKE2b-512 hash for
//! the default `ED` kind, the file itself for the legacy `Ed` kind), then the
//! global signature over that signature and the trusted comment, so the
//! comment cannot be swapped. The untrusted comment is never looked at.
//! Every length is checked before anything is decoded.

use base64::Engine as _;

/// A signature file is a few hundred bytes; anything longer is refused unread.
pub const MAX_SIGNATURE_TEXT: usize = 4096;

/// A trusted public key: its 8-byte id and the ed25519 key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    id: [u8; 8],
    key: [u8; 32],
}

/// A parsed signature file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    prehashed: bool,
    key_id: [u8; 8],
    signature: [u8; 64],
    trusted_comment: String,
    global: [u8; 64],
}

/// What is wrong with a key or a signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The text is not in minisign's format.
    #[error("not a minisign {0}")]
    Format(&'static str),
    /// No trusted key has the signature's key id.
    #[error("signed by key {0}, which is not one of the trusted keys")]
    UnknownKey(String),
    /// The signature does not match the file.
    #[error("the signature does not match the file")]
    Mismatch,
    /// The global signature does not match the trusted comment.
    #[error("the trusted comment was changed after signing")]
    Comment,
}

/// A key id as minisign prints it (upper-case hex of the little-endian number).
fn key_id_text(id: &[u8; 8]) -> String {
    id.iter().rev().map(|b| format!("{b:02X}")).collect()
}

fn decode<const N: usize>(line: &str, what: &'static str) -> Result<[u8; N], Error> {
    // Base64 of N bytes is at most 4 * ceil(N / 3) characters.
    if line.len() > N.div_ceil(3) * 4 {
        return Err(Error::Format(what));
    }
    base64::engine::general_purpose::STANDARD
        .decode(line.trim())
        .ok()
        .and_then(|v| <[u8; N]>::try_from(v).ok())
        .ok_or(Error::Format(what))
}

impl PublicKey {
    /// A public key file (`untrusted comment:` line, then the key) or the key
    /// line alone.
    ///
    /// # Errors
    /// It is not a minisign ed25519 public key.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if text.len() > 1024 {
            return Err(Error::Format("public key"));
        }
        let line = text
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("untrusted comment:"))
            .ok_or(Error::Format("public key"))?;
        let raw: [u8; 42] = decode(line, "public key")?;
        if &raw[..2] != b"Ed" {
            return Err(Error::Format("public key"));
        }
        let mut id = [0; 8];
        id.copy_from_slice(&raw[2..10]);
        let mut key = [0; 32];
        key.copy_from_slice(&raw[10..]);
        Ok(PublicKey { id, key })
    }

    /// A key from its parts (tests, and keys made in code).
    pub fn from_parts(id: [u8; 8], key: [u8; 32]) -> Self {
        PublicKey { id, key }
    }

    /// Its id, as minisign prints it.
    pub fn id(&self) -> String {
        key_id_text(&self.id)
    }

    fn check(&self, message: &[u8], signature: &[u8]) -> bool {
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, self.key)
            .verify(message, signature)
            .is_ok()
    }
}

impl Signature {
    /// A `.minisig` file: untrusted comment, signature, trusted comment,
    /// global signature.
    ///
    /// # Errors
    /// It is not in minisign's format.
    pub fn parse(text: &str) -> Result<Self, Error> {
        if text.len() > MAX_SIGNATURE_TEXT {
            return Err(Error::Format("signature"));
        }
        let mut lines = text.lines();
        let untrusted = lines.next().ok_or(Error::Format("signature"))?;
        if !untrusted.starts_with("untrusted comment:") {
            return Err(Error::Format("signature"));
        }
        let sig_line = lines.next().ok_or(Error::Format("signature"))?;
        let comment = lines
            .next()
            .and_then(|l| l.strip_prefix("trusted comment: "))
            .ok_or(Error::Format("signature (its trusted comment)"))?;
        let global_line = lines
            .next()
            .ok_or(Error::Format("signature (its global signature)"))?;
        let raw: [u8; 74] = decode(sig_line, "signature")?;
        let prehashed = match &raw[..2] {
            b"ED" => true,
            b"Ed" => false,
            _ => return Err(Error::Format("signature (an unknown algorithm)")),
        };
        let mut key_id = [0; 8];
        key_id.copy_from_slice(&raw[2..10]);
        let mut signature = [0; 64];
        signature.copy_from_slice(&raw[10..]);
        Ok(Signature {
            prehashed,
            key_id,
            signature,
            trusted_comment: comment.to_owned(),
            global: decode(global_line, "signature (its global signature)")?,
        })
    }

    /// The trusted comment (minisign puts the signing time and file name in
    /// it; nothing here reads the time).
    pub fn trusted_comment(&self) -> &str {
        &self.trusted_comment
    }

    /// Checks the signature over `message` with the trusted key of its id.
    ///
    /// # Errors
    /// No trusted key of that id, the signature does not match, or the
    /// trusted comment was changed.
    pub fn verify(&self, message: &[u8], trusted: &[PublicKey]) -> Result<(), Error> {
        let key = trusted
            .iter()
            .find(|k| k.id == self.key_id)
            .ok_or_else(|| Error::UnknownKey(key_id_text(&self.key_id)))?;
        let ok = if self.prehashed {
            use blake2::Digest as _;
            key.check(&blake2::Blake2b512::digest(message), &self.signature)
        } else {
            key.check(message, &self.signature)
        };
        if !ok {
            return Err(Error::Mismatch);
        }
        let mut global = self.signature.to_vec();
        global.extend_from_slice(self.trusted_comment.as_bytes());
        if !key.check(&global, &self.global) {
            return Err(Error::Comment);
        }
        Ok(())
    }
}

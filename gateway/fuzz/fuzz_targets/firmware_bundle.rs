//! Any bytes as a firmware bundle's manifest and signature, as a hub or a
//! download would hand them to a box: parsing and checking never panic, and
//! nothing verifies against a key that did not sign it.
#![no_main]

use gateway_core::firmware::{self, PublicKey, Signature};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = PublicKey::parse(&text);
    let (sig, manifest) = match text.split_once("\n\n") {
        Some((s, m)) => (s.to_owned(), m.as_bytes().to_vec()),
        None => (text.to_string(), data.to_vec()),
    };
    let _ = Signature::parse(&sig);
    let key = PublicKey::from_parts([0; 8], [7; 32]);
    assert!(firmware::verify(&manifest, &sig, &[key]).is_err());
    let _ = firmware::version_numbers(&text);
});

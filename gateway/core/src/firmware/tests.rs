use base64::Engine as _;
use proptest::prelude::*;

use super::*;

/// A signing key in code, writing minisign's formats (what `image/build.sh`
/// gets from `minisign -S`; the interop test below checks the two agree).
struct Signer {
    id: [u8; 8],
    pair: ring::signature::Ed25519KeyPair,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

impl Signer {
    fn new(seed: u8) -> Self {
        Signer {
            id: [seed, 1, 2, 3, 4, 5, 6, 7],
            pair: ring::signature::Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).expect("key"),
        }
    }

    fn public(&self) -> PublicKey {
        use ring::signature::KeyPair as _;
        let mut key = [0; 32];
        key.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey::from_parts(self.id, key)
    }

    fn public_file(&self) -> String {
        use ring::signature::KeyPair as _;
        let mut raw = b"Ed".to_vec();
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(self.pair.public_key().as_ref());
        format!("untrusted comment: minisign public key\n{}\n", b64(&raw))
    }

    fn sign(&self, message: &[u8], prehashed: bool, comment: &str) -> String {
        use blake2::Digest as _;
        let signed = if prehashed {
            blake2::Blake2b512::digest(message).to_vec()
        } else {
            message.to_vec()
        };
        let sig = self.pair.sign(&signed);
        let mut raw = if prehashed {
            b"ED".to_vec()
        } else {
            b"Ed".to_vec()
        };
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(sig.as_ref());
        let mut global = sig.as_ref().to_vec();
        global.extend_from_slice(comment.as_bytes());
        format!(
            "untrusted comment: signature from minisign secret key\n{}\ntrusted comment: {comment}\n{}\n",
            b64(&raw),
            b64(self.pair.sign(&global).as_ref())
        )
    }
}

fn sha(bytes: &[u8]) -> String {
    crate::hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

/// A root image of 2.5 chunks and its manifest.
fn bundle(version: &str, security_version: u64) -> (Vec<u8>, Manifest) {
    let root: Vec<u8> = (0..(CHUNK_BYTES * 5 / 2))
        .map(|i| (i % 251) as u8)
        .collect();
    let m = Manifest {
        format: FORMAT.into(),
        version: version.into(),
        security_version,
        hardware: vec!["qemu-x86_64".into(), "g2".into()],
        min_from_version: "1.0".into(),
        kernel_sha256: sha(b"kernel"),
        initrd_sha256: sha(b"initrd"),
        root_bytes: root.len() as u64,
        chunks: root.chunks(CHUNK_BYTES as usize).map(sha).collect(),
    };
    (root, m)
}

fn installed(version: &str, security_version: u64) -> Installed {
    Installed {
        version: version.into(),
        security_version,
        hardware: "g2".into(),
    }
}

#[test]
fn a_manifest_signed_by_a_trusted_key_is_read_and_nothing_else_is() {
    let (current, next, other) = (Signer::new(1), Signer::new(2), Signer::new(3));
    let trusted = [current.public(), next.public()];
    let (_, m) = bundle("1.2.0", 3);
    let text = serde_json::to_vec(&m).expect("json");
    // Either trusted key, either kind of signature: read.
    for (s, prehashed) in [(&current, true), (&next, true), (&current, false)] {
        let sig = s.sign(&text, prehashed, "timestamp:1\tfile:manifest.json");
        assert_eq!(verify(&text, &sig, &trusted), Ok(m.clone()));
    }
    // Another key: refused, naming its id.
    let sig = other.sign(&text, true, "t");
    let err = verify(&text, &sig, &trusted).expect_err("untrusted");
    assert!(
        matches!(&err, Refused::Signature(minisign::Error::UnknownKey(id)) if *id == other.public().id()),
        "{err}"
    );
    // A changed byte of the manifest, or of the trusted comment: refused.
    let sig = current.sign(&text, true, "timestamp:1");
    let mut changed = text.clone();
    changed[10] ^= 1;
    assert_eq!(
        verify(&changed, &sig, &trusted),
        Err(Refused::Signature(minisign::Error::Mismatch))
    );
    let swapped = sig.replace("timestamp:1", "timestamp:2");
    assert_eq!(
        verify(&text, &swapped, &trusted),
        Err(Refused::Signature(minisign::Error::Comment))
    );
    // A key file parses as the key it holds.
    assert_eq!(
        PublicKey::parse(&current.public_file()),
        Ok(current.public())
    );
}

#[test]
fn a_signed_manifest_that_does_not_hold_together_is_refused() {
    let s = Signer::new(1);
    let (_, m) = bundle("1.2.0", 3);
    let cases: Vec<(Manifest, &str)> = vec![
        (
            Manifest {
                format: "gw-firmware-9".into(),
                ..m.clone()
            },
            "format",
        ),
        (
            Manifest {
                version: "1.x".into(),
                ..m.clone()
            },
            "version",
        ),
        (
            Manifest {
                chunks: m.chunks[..2].to_vec(),
                ..m.clone()
            },
            "chunk hashes",
        ),
        (
            Manifest {
                root_bytes: 0,
                ..m.clone()
            },
            "chunk hashes",
        ),
        (
            Manifest {
                kernel_sha256: "00".into(),
                ..m.clone()
            },
            "kernel_sha256",
        ),
        (
            Manifest {
                hardware: vec![],
                ..m.clone()
            },
            "hardware",
        ),
    ];
    for (bad, needle) in cases {
        let text = serde_json::to_vec(&bad).expect("json");
        let err = verify(&text, &s.sign(&text, true, "t"), &[s.public()]).expect_err(needle);
        assert!(
            matches!(&err, Refused::Manifest(why) if why.contains(needle)),
            "{needle}: {err}"
        );
    }
}

#[test]
fn installing_refuses_a_downgrade_other_hardware_and_too_old_a_box() {
    let (_, m) = bundle("1.2.0", 3);
    assert_eq!(m.may_install(&installed("1.1.7", 3)), Ok(()));
    assert_eq!(m.may_install(&installed("1.0", 2)), Ok(()));
    assert!(matches!(
        m.may_install(&installed("1.3.0", 4)),
        Err(Refused::Downgrade {
            got: 3,
            recorded: 4,
            ..
        })
    ));
    assert!(matches!(
        m.may_install(&Installed {
            hardware: "g1".into(),
            ..installed("1.1", 3)
        }),
        Err(Refused::Hardware { .. })
    ));
    assert!(matches!(
        m.may_install(&installed("0.9.9", 0)),
        Err(Refused::TooOld { .. })
    ));
    // Numbers compare as numbers, not as text.
    assert_eq!(
        Manifest {
            min_from_version: "1.9".into(),
            ..m.clone()
        }
        .may_install(&installed("1.10", 3)),
        Ok(())
    );
}

#[test]
fn a_version_has_one_spelling() {
    assert_eq!(version_numbers("1.4.2"), Some(vec![1, 4, 2]));
    assert_eq!(version_numbers("0.10"), Some(vec![0, 10]));
    for bad in [
        "", "+2", "1.+2", "1.02", "01", "1..2", "1.", " 1", "1-2", "1.2a",
    ] {
        assert_eq!(version_numbers(bad), None, "{bad:?}");
    }
    // An entry name splits at its counter only: `gw-+2.conf` is no entry.
    assert!(super::boot::Entry::parse("gw-+2.conf").is_none());
    assert!(super::boot::Entry::parse("gw-1.02+3.conf").is_none());
}

#[test]
fn chunks_are_checked_by_length_and_hash() {
    let (root, m) = bundle("1.2.0", 3);
    let chunks: Vec<&[u8]> = root.chunks(CHUNK_BYTES as usize).collect();
    assert_eq!(m.chunk_count(), 3);
    for (i, c) in chunks.iter().enumerate() {
        assert!(m.chunk_ok(i, c), "chunk {i}");
    }
    assert_eq!(m.chunk_len(2), Some(CHUNK_BYTES / 2));
    assert_eq!(m.chunk_len(3), None);
    let mut tampered = chunks[1].to_vec();
    tampered[5] ^= 0x80;
    assert!(!m.chunk_ok(1, &tampered));
    assert!(
        !m.chunk_ok(0, chunks[1]),
        "the right bytes at the wrong place"
    );
    assert!(!m.chunk_ok(2, &chunks[2][..10]), "a short chunk");
    assert!(!m.chunk_ok(9, chunks[0]));
}

#[test]
fn oversized_or_garbled_input_is_refused_before_it_is_decoded() {
    let s = Signer::new(1);
    let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
    assert!(matches!(
        verify(&big, &s.sign(&big, true, "t"), &[s.public()]),
        Err(Refused::Manifest(_))
    ));
    for text in [
        "",
        "untrusted comment: x\n",
        "untrusted comment: x\nRWQ\ntrusted comment: t\nAAAA\n",
        &"A".repeat(minisign::MAX_SIGNATURE_TEXT + 1),
    ] {
        assert!(Signature::parse(text).is_err(), "{text:?}");
    }
    assert!(PublicKey::parse("RWQ=").is_err());
}

proptest! {
    #[test]
    fn signature_and_key_parsers_never_panic(text in ".{0,600}") {
        let _ = Signature::parse(&text);
        let _ = PublicKey::parse(&text);
    }

    #[test]
    fn a_changed_signature_line_never_verifies(at in 0usize..100, bit in 0u8..8) {
        let s = Signer::new(4);
        let msg = b"manifest";
        let sig = s.sign(msg, true, "t");
        let line = sig.lines().nth(1).expect("line").to_owned();
        let mut raw = base64::engine::general_purpose::STANDARD.decode(&line).expect("b64");
        let i = at % raw.len();
        raw[i] ^= 1 << bit;
        let changed = sig.replace(&line, &b64(&raw));
        let verdict = Signature::parse(&changed).and_then(|p| p.verify(msg, &[s.public()]));
        prop_assert!(verdict.is_err());
    }
}

/// Debian's `minisign` checks what [`Signer`] writes, and what it signs is
/// read here (skipped where the package is not installed; CI installs it).
#[test]
fn debian_minisign_and_this_code_agree() {
    let dir = std::env::temp_dir().join(format!("gw-minisign-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let run = |args: &[&str]| {
        std::process::Command::new("minisign")
            .args(args)
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .output()
    };
    if run(&["-v"]).is_err() {
        eprintln!("skipped: minisign is not installed (apt-get install minisign)");
        return;
    }
    let (_, m) = bundle("1.2.0", 3);
    let text = serde_json::to_vec(&m).expect("json");
    std::fs::write(dir.join("manifest.json"), &text).expect("write");
    // This code's signature, checked by minisign.
    let s = Signer::new(7);
    std::fs::write(dir.join("ours.pub"), s.public_file()).expect("pub");
    std::fs::write(
        dir.join("manifest.json.minisig"),
        s.sign(&text, true, "timestamp:1\tfile:manifest.json\thashed"),
    )
    .expect("sig");
    let out = run(&["-V", "-p", "ours.pub", "-m", "manifest.json"]).expect("minisign");
    assert!(out.status.success(), "{out:?}");
    // minisign's own key and signature, read here.
    let _ = std::fs::remove_file(dir.join("manifest.json.minisig"));
    let out = run(&["-G", "-W", "-f", "-p", "theirs.pub", "-s", "theirs.key"]).expect("minisign");
    assert!(out.status.success(), "{out:?}");
    let out = run(&["-S", "-s", "theirs.key", "-m", "manifest.json"]).expect("minisign");
    assert!(out.status.success(), "{out:?}");
    let key = PublicKey::parse(&std::fs::read_to_string(dir.join("theirs.pub")).expect("pub"))
        .expect("their key");
    let sig = std::fs::read_to_string(dir.join("manifest.json.minisig")).expect("sig");
    assert_eq!(verify(&text, &sig, &[key]), Ok(m));
    let _ = std::fs::remove_dir_all(&dir);
}

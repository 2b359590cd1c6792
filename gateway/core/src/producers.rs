//! Producers' tokens for an `[[ingest]]` with `auth = "token"`: each token is
//! `gwp1.NAME.HEX` (32 random bytes), given to one producer application; the
//! edge keeps only its SHA-256 in the tokens file, one `NAME DIGEST` line per
//! producer (`gatewayd producer add` writes them).

use crate::fleet::Secret;

/// Prefix of producer tokens.
pub const PRODUCER_KIND: &str = "gwp1";

/// Most producers in one tokens file.
pub const MAX_PRODUCERS: usize = 10_000;

/// A tokens file: producer names and their tokens' digests, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tokens {
    entries: Vec<(String, String)>,
}

/// A line of a tokens file that is not `NAME DIGEST`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct TokensError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong, and how to fix it.
    pub message: String,
}

impl Tokens {
    /// Parses a tokens file: `NAME DIGEST` lines (the digest 64 hex digits),
    /// `#` comments and blank lines.
    ///
    /// # Errors
    /// The first bad line: a bad name, a digest that is not SHA-256 hex, a
    /// name twice, more than [`MAX_PRODUCERS`].
    pub fn parse(text: &str) -> Result<Tokens, TokensError> {
        let mut entries: Vec<(String, String)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |message: String| TokensError { line, message };
            let l = raw.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            let mut words = l.split_whitespace();
            let (Some(name), Some(digest), None) = (words.next(), words.next(), words.next())
            else {
                return Err(bad(
                    "expected NAME DIGEST (gatewayd producer add writes these lines)".into(),
                ));
            };
            crate::units::check_name("producer", name)
                .map_err(|e| bad(format!("{}; {}", e.message, e.hint)))?;
            if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad(format!(
                    "the digest of {name:?} is not 64 hex digits (a SHA-256)"
                )));
            }
            if entries.iter().any(|(n, _)| n == name) {
                return Err(bad(format!("producer {name:?} is listed twice")));
            }
            if entries.len() >= MAX_PRODUCERS {
                return Err(bad(format!("more than {MAX_PRODUCERS} producers")));
            }
            entries.push((name.to_owned(), digest.to_ascii_lowercase()));
        }
        Ok(Tokens { entries })
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut out = String::from(
            "# Producer tokens of an [[ingest]] listener (auth = \"token\"): NAME SHA256-OF-TOKEN.\n# Written by gatewayd producer add/remove; the tokens themselves are not kept here.\n",
        );
        for (name, digest) in &self.entries {
            out.push_str(&format!("{name} {digest}\n"));
        }
        out
    }

    /// The producers' names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// Adds (or replaces) `name`'s token digest.
    pub fn set(&mut self, name: &str, digest: String) {
        match self.entries.iter_mut().find(|(n, _)| n == name) {
            Some(e) => e.1 = digest,
            None => self.entries.push((name.to_owned(), digest)),
        }
    }

    /// Removes `name`; whether it was there.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.entries.len();
        self.entries.retain(|(n, _)| n != name);
        self.entries.len() != before
    }

    /// The producer a bearer token belongs to: its name, when the token is a
    /// producer token whose digest is the one listed for that name.
    pub fn verify(&self, bearer: &str) -> Option<&str> {
        let secret = Secret::parse(PRODUCER_KIND, bearer)?;
        let (name, digest) = self.entries.iter().find(|(n, _)| *n == secret.owner)?;
        let got = secret.digest();
        // Compared in full whatever differs first.
        let same = got.len() == digest.len()
            && got
                .bytes()
                .zip(digest.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        same.then_some(name.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(name: &str, fill: char) -> Secret {
        Secret {
            kind: PRODUCER_KIND,
            owner: name.into(),
            secret: std::iter::repeat_n(fill, 64).collect(),
        }
    }

    #[test]
    fn a_token_names_its_producer_only_when_its_digest_is_listed() {
        let (a, b) = (token("pension-app", 'a'), token("hr-app", 'b'));
        let mut t = Tokens::default();
        t.set("pension-app", a.digest());
        t.set("hr-app", b.digest());
        let t = Tokens::parse(&t.render()).expect("round trip");
        assert_eq!(t.verify(&a.to_text()), Some("pension-app"));
        assert_eq!(t.verify(&b.to_text()), Some("hr-app"));
        // Another secret under a listed name, a name not listed, junk.
        assert_eq!(t.verify(&token("pension-app", 'c').to_text()), None);
        assert_eq!(t.verify(&token("other", 'a').to_text()), None);
        assert_eq!(t.verify("gwp1.pension-app.zz"), None);
        assert_eq!(t.verify(""), None);
        let mut t = t;
        assert!(t.remove("hr-app"));
        assert_eq!(t.verify(&b.to_text()), None);
    }

    #[test]
    fn a_bad_line_is_named() {
        for (text, line, what) in [
            ("a 1234\n", 1, "64 hex"),
            ("# c\n\nbad name! 00\n", 3, "NAME DIGEST"),
            (
                &format!("x {0}\nx {0}\n", "0".repeat(64)) as &str,
                2,
                "twice",
            ),
            ("only-a-name\n", 1, "NAME DIGEST"),
        ] {
            let e = Tokens::parse(text).expect_err(text);
            assert_eq!(e.line, line, "{text}");
            assert!(e.message.contains(what), "{e}");
        }
    }
}

//! What a channel record says, checked by real parsers with limits, and the
//! denied keywords matched against what the data says rather than how it is
//! spelled. Pure: bytes in, a verdict out.
//!
//! Formats:
//! - JSON: serde_json, plus no duplicate keys in an object and nesting at most
//!   [`MAX_DEPTH`]; lone surrogates are refused by the parser.
//! - XML: roxmltree, well-formed, no DTD (so no external entities and no
//!   entity expansion), at most [`MAX_XML_NODES`] nodes.
//! - CSV: RFC 4180 quoting, the same number of fields on every line, no
//!   control bytes but tab, CR and LF.
//! - Text: UTF-8 without control characters but tab, CR and LF.
//!
//! Keywords ([`Keywords`]) are matched in the decoded text: JSON string values
//! *and keys* after unescaping, XML character data, CDATA and attribute values
//! after entity decoding, CSV fields, the whole text. Both sides are
//! normalised: compatibility decomposition (NFKD: full-width letters,
//! ligatures), combining marks and default-ignorable code points (zero-width
//! characters, soft hyphen, variation selectors, bidi controls) removed,
//! whitespace removed, full case folding. So `"\u0073ecret"`, `&#115;ecret`,
//! `ｓｅｃｒｅｔ`, `se\u{200B}cret`, `secr\u{0301}et`, `机 密` all match
//! `secret` or `机密`. Not caught: anything encoded inside the data (base64,
//! hex, URL encoding, compression), a keyword split across two JSON strings
//! or two CSV fields, homoglyphs from another script (Cyrillic `с` for Latin
//! `c`), and raw records (`application/octet-stream`) beyond their bytes read
//! as UTF-8 where they are.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use unicode_normalization::UnicodeNormalization as _;

use crate::config::Format;

/// Deepest JSON nesting accepted.
pub const MAX_DEPTH: usize = 64;
/// Most XML nodes accepted.
pub const MAX_XML_NODES: u32 = 100_000;

/// Why a record is not what it declares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed {
    /// Where: `line L, column C` or `byte N`.
    pub at: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Malformed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (at {})", self.message, self.at)
    }
}

fn at_line(line: usize, column: usize) -> String {
    format!("line {line}, column {column}")
}

/// Checks `body` against `format` and returns the text pieces the data says
/// (for keyword matching).
///
/// # Errors
/// [`Malformed`] with the place and the reason.
pub fn parse(format: Format, body: &[u8]) -> Result<Vec<String>, Malformed> {
    check(format, body, true)
}

/// [`parse`], collecting the text pieces only when `collect` (a channel
/// without keywords needs only the verdict).
///
/// # Errors
/// [`Malformed`] with the place and the reason.
pub fn check(format: Format, body: &[u8], collect: bool) -> Result<Vec<String>, Malformed> {
    if format == Format::Raw {
        return Ok(vec![String::from_utf8_lossy(body).into_owned()]);
    }
    let text = std::str::from_utf8(body).map_err(|e| Malformed {
        at: format!("byte {}", e.valid_up_to()),
        message: format!("a {} record must be UTF-8", format.as_str()),
    })?;
    match format {
        Format::Json => json(text, collect),
        Format::Xml => xml(text),
        Format::Csv => csv(text),
        Format::Text => plain(text),
        Format::Raw => unreachable!("handled above"),
    }
}

fn control_ok(c: char) -> bool {
    !c.is_control() || matches!(c, '\t' | '\r' | '\n')
}

fn plain(text: &str) -> Result<Vec<String>, Malformed> {
    if let Some((i, c)) = text.char_indices().find(|(_, c)| !control_ok(*c)) {
        return Err(Malformed {
            at: format!("byte {i}"),
            message: format!("control character U+{:04X} in text", u32::from(c)),
        });
    }
    Ok(vec![text.to_owned()])
}

/// JSON through serde_json with a visitor that refuses duplicate keys and
/// deep nesting, and collects every string and key.
fn json(text: &str, collect: bool) -> Result<Vec<String>, Malformed> {
    let mut out = Vec::new();
    let mut de = serde_json::Deserializer::from_str(text);
    let seed = Collect {
        out: &mut out,
        depth: 0,
        collect,
    };
    let located = |e: serde_json::Error| Malformed {
        at: at_line(e.line(), e.column()),
        message: format!("not valid JSON: {}", strip_position(&e.to_string())),
    };
    seed.deserialize(&mut de).map_err(located)?;
    de.end().map_err(located)?;
    Ok(out)
}

/// serde_json's message without its own " at line L column C".
fn strip_position(s: &str) -> &str {
    s.rfind(" at line ").map_or(s, |i| &s[..i])
}

struct Collect<'a> {
    out: &'a mut Vec<String>,
    depth: usize,
    collect: bool,
}

impl<'de> DeserializeSeed<'de> for Collect<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Collect<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, v: &str) -> Result<(), E> {
        if self.collect {
            self.out.push(v.to_owned());
        }
        Ok(())
    }
    fn visit_string<E>(self, v: String) -> Result<(), E> {
        if self.collect {
            self.out.push(v);
        }
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
        }
        while seq
            .next_element_seed(Collect {
                out: self.out,
                depth,
                collect: self.collect,
            })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let depth = self.depth + 1;
        if depth > MAX_DEPTH {
            return Err(de::Error::custom(format!(
                "nested deeper than {MAX_DEPTH} levels"
            )));
        }
        let mut keys = std::collections::HashSet::new();
        while let Some(k) = map.next_key::<String>()? {
            if !keys.insert(k.clone()) {
                return Err(de::Error::custom(format!(
                    "duplicate key {:?}",
                    crate::refusals::peer_text(&k)
                )));
            }
            if self.collect {
                self.out.push(k);
            }
            map.next_value_seed(Collect {
                out: self.out,
                depth,
                collect: self.collect,
            })?;
        }
        Ok(())
    }
}

fn xml(text: &str) -> Result<Vec<String>, Malformed> {
    let opt = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: MAX_XML_NODES,
    };
    let doc = roxmltree::Document::parse_with_options(text, opt).map_err(|e| {
        let pos = e.pos();
        Malformed {
            at: at_line(pos.row as usize, pos.col as usize),
            message: format!("not well-formed XML: {e}"),
        }
    })?;
    let mut out = Vec::new();
    for n in doc.descendants() {
        if n.is_text() {
            if let Some(t) = n.text() {
                out.push(t.to_owned());
            }
        }
        if n.is_element() {
            out.extend(n.attributes().map(|a| a.value().to_owned()));
        }
    }
    Ok(out)
}

/// RFC 4180: fields separated by commas, quoted with `"` (doubled inside),
/// records by CRLF or LF; every record has as many fields as the first.
fn csv(text: &str) -> Result<Vec<String>, Malformed> {
    let mut fields = Vec::new();
    let (mut line, mut col) = (1usize, 0usize);
    let mut width: Option<usize> = None;
    let mut in_record = 0usize;
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let bad = |line, col, message: String| Malformed {
        at: at_line(line, col),
        message,
    };
    let mut end_record = |in_record: &mut usize, line: usize| -> Result<(), Malformed> {
        match width {
            None => width = Some(*in_record),
            Some(w) if w != *in_record => {
                return Err(bad(
                    line,
                    1,
                    format!("{} fields where the first line has {w}", *in_record),
                ));
            }
            Some(_) => {}
        }
        *in_record = 0;
        Ok(())
    };
    while let Some(c) = chars.next() {
        col += 1;
        if !control_ok(c) {
            return Err(bad(
                line,
                col,
                format!("control character U+{:04X} in CSV", u32::from(c)),
            ));
        }
        match c {
            '"' if field.is_empty() => {
                // A quoted field, to its closing quote.
                loop {
                    match chars.next() {
                        None => return Err(bad(line, col, "a quoted field is not closed".into())),
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                            col += 2;
                        }
                        Some('"') => {
                            col += 1;
                            break;
                        }
                        Some(c) if !control_ok(c) => {
                            return Err(bad(
                                line,
                                col,
                                format!("control character U+{:04X} in CSV", u32::from(c)),
                            ));
                        }
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                                col = 0;
                            } else {
                                col += 1;
                            }
                            field.push(c);
                        }
                    }
                }
                match chars.peek() {
                    None | Some(',' | '\r' | '\n') => {}
                    Some(_) => {
                        return Err(bad(
                            line,
                            col + 1,
                            "text after a quoted field's closing quote".into(),
                        ));
                    }
                }
            }
            '"' => return Err(bad(line, col, "a quote inside an unquoted field".into())),
            ',' => {
                fields.push(std::mem::take(&mut field));
                in_record += 1;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\r' | '\n' => {
                fields.push(std::mem::take(&mut field));
                in_record += 1;
                end_record(&mut in_record, line)?;
                line += 1;
                col = 0;
            }
            c => field.push(c),
        }
    }
    if !field.is_empty() || in_record > 0 {
        fields.push(field);
        in_record += 1;
        end_record(&mut in_record, line)?;
    }
    Ok(fields)
}

/// Default-ignorable code points (Unicode's `Default_Ignorable_Code_Point`).
fn ignorable(c: char) -> bool {
    matches!(u32::from(c),
        0x00AD | 0x034F | 0x061C | 0x115F..=0x1160 | 0x17B4..=0x17B5 | 0x180B..=0x180F
        | 0x200B..=0x200F | 0x202A..=0x202E | 0x2060..=0x206F | 0x3164 | 0xFE00..=0xFE0F
        | 0xFEFF | 0xFFA0 | 0xFFF0..=0xFFF8 | 0x1BCA0..=0x1BCA3 | 0x1D173..=0x1D17A
        | 0xE0000..=0xE0FFF)
}

/// The form text and keywords are compared in: NFKD, without combining marks,
/// default-ignorable code points and whitespace, case-folded.
pub fn normalise(s: &str) -> String {
    let stripped: String = s
        .nfkd()
        .filter(|c| {
            !unicode_normalization::char::is_combining_mark(*c)
                && !ignorable(*c)
                && !c.is_whitespace()
        })
        .collect();
    caseless::default_case_fold_str(&stripped)
}

/// A channel's denied keywords, normalised once.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keywords {
    words: Vec<(String, String)>,
}

impl Keywords {
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// `deny_keywords` as configured.
    pub fn new(words: &[String]) -> Self {
        Keywords {
            words: words
                .iter()
                .map(|w| (w.clone(), normalise(w)))
                .filter(|(_, n)| !n.is_empty())
                .collect(),
        }
    }

    /// The first keyword (as configured) that one of `pieces` contains.
    pub fn find<'a>(&'a self, pieces: &[String]) -> Option<&'a str> {
        if self.words.is_empty() {
            return None;
        }
        for p in pieces {
            let n = normalise(p);
            if let Some((w, _)) = self.words.iter().find(|(_, k)| n.contains(k.as_str())) {
                return Some(w);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn found(format: Format, body: &str) -> Option<String> {
        let k = Keywords::new(&["secret".into(), "机密".into()]);
        let pieces = parse(format, body.as_bytes()).expect("parses");
        k.find(&pieces).map(str::to_owned)
    }

    #[test]
    fn keywords_are_found_however_they_are_spelled() {
        for (format, body) in [
            (Format::Json, r#"{"a": "\u0073ecret"}"#),
            (Format::Json, r#"{"\u673a\u5bc6": 1}"#),
            (Format::Json, r#"["ＳＥＣＲＥＴ"]"#),
            (Format::Json, "[\"se\u{200B}cret\"]"),
            (Format::Json, "[\"sec\u{00AD}ret\"]"),
            (Format::Json, "[\"secr\u{0301}et\"]"),
            (Format::Json, r#"["机 密"]"#),
            (Format::Xml, "<a>&#115;ecret</a>"),
            (Format::Xml, "<a b=\"SE&#x43;RET\"/>"),
            (Format::Xml, "<a><![CDATA[top secret]]></a>"),
            (Format::Csv, "a,b\r\n1,\"se\"\"cret\"\"\"\r\n"),
            (Format::Csv, "a,b\n1,Secret\n"),
            (Format::Text, "this is S E C R E T"),
        ] {
            let got = found(format, body);
            if body.contains("se\"\"cret") {
                // A quote inside the word: not the word.
                assert_eq!(got, None, "{body}");
            } else {
                assert!(got.is_some(), "{format:?} {body:?} passed");
            }
        }
        assert_eq!(found(Format::Json, r#"{"a": "public"}"#), None);
    }

    #[test]
    fn formats_are_parsed_for_real_and_refusals_say_where() {
        let bad = |format, body: &str| parse(format, body.as_bytes()).expect_err(body);
        let e = bad(Format::Json, r#"{"a": 1, "a": 2}"#);
        assert!(e.message.contains("duplicate key"), "{e}");
        // A lone surrogate: serde_json refuses it ("unexpected end of hex escape").
        let e = bad(Format::Json, r#"["\ud800"]"#);
        assert!(e.message.contains("not valid JSON"), "{e}");
        let e = bad(Format::Json, r#"["\udc00x"]"#);
        assert!(e.message.contains("not valid JSON"), "{e}");
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        let e = bad(Format::Json, &deep);
        assert!(e.message.contains("deeper than 64"), "{e}");
        assert!(
            parse(
                Format::Json,
                format!("{}{}", "[".repeat(64), "]".repeat(64)).as_bytes()
            )
            .is_ok()
        );
        let e = bad(Format::Xml, "<not really xml at all ))) {{");
        assert!(e.message.contains("not well-formed"), "{e}");
        assert!(e.at.starts_with("line 1"), "{e}");
        let e = bad(
            Format::Xml,
            "<!DOCTYPE a [<!ENTITY x SYSTEM \"file:///etc/passwd\">]><a>&x;</a>",
        );
        assert!(e.message.contains("not well-formed"), "{e}");
        let e = bad(Format::Xml, "<a></b>");
        assert!(e.at.starts_with("line 1"), "{e}");
        let e = bad(Format::Csv, "a,b\n1\u{1}2,3\n");
        assert!(e.message.contains("control character"), "{e}");
        assert_eq!(e.at, "line 2, column 2");
        let e = bad(Format::Csv, "a,b\n1,2,3\n");
        assert!(
            e.message.contains("3 fields where the first line has 2"),
            "{e}"
        );
        let e = bad(Format::Csv, "a,\"b\n");
        assert!(e.message.contains("not closed"), "{e}");
        let e = bad(Format::Text, "bell\u{7}");
        assert!(e.message.contains("U+0007"), "{e}");
        assert!(parse(Format::Csv, b"a,\"b, \"\"c\"\"\"\r\n1,2\r\n").is_ok());
        assert!(parse(Format::Xml, b"<?xml version=\"1.0\"?><a x=\"1\">t</a>").is_ok());
    }

    proptest! {
        /// Normalising twice is normalising once.
        #[test]
        fn normalisation_is_idempotent(s in ".{0,40}") {
            let once = normalise(&s);
            prop_assert_eq!(normalise(&once), once);
        }

        /// A keyword with ignorable characters, spaces and case changes put
        /// anywhere inside it, in a JSON string, is still found.
        #[test]
        fn a_disguised_keyword_in_json_is_found(
            splits in proptest::collection::vec((0usize..6, 0usize..4), 0..4),
            upper in any::<bool>(),
        ) {
            let mut word: Vec<String> = "secret".chars().map(String::from).collect();
            let noise = ["\u{200B}", "\u{00AD}", " ", "\u{FE0F}"];
            for (at, n) in splits {
                word[at].push_str(noise[n]);
            }
            let mut w = word.concat();
            if upper { w = w.to_uppercase(); }
            let body = serde_json::to_string(&vec![format!("x{w}y")]).expect("json");
            prop_assert!(found(Format::Json, &body).is_some(), "{}", body);
        }

        /// Any bytes: a verdict, never a panic.
        #[test]
        fn any_bytes_parse_or_are_refused(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            for f in [Format::Json, Format::Xml, Format::Csv, Format::Text, Format::Raw] {
                let _ = parse(f, &b);
            }
        }
    }
}

//! Device labels and the selectors operators pick devices with
//! (`gatewayctl devices list --selector 'city=changchun,ring in (canary,early),!retired,state=offline'`).
//!
//! A selector is requirements joined by commas, all of which a device must
//! meet:
//! - on labels: `k=v` (or `k==v`), `k!=v` (also true without `k`),
//!   `k in (a,b)`, `k notin (a,b)`, `k` (has it), `!k` (has it not);
//! - on state: `state=online|offline|revoked|never-seen` (also `!=`, `in`),
//!   `config=drift|in-sync`, `cert-expires<72h` (or `>`).
//!
//! Label keys are lower-case (`[a-z0-9][a-z0-9._-]*`, at most 63), values
//! `[A-Za-z0-9][A-Za-z0-9._-]*` (at most 63); `state`, `config` and
//! `cert-expires` are not label keys. Input is bounded before parsing
//! (1,024 bytes, 32 requirements, 64 values in a set).

use std::collections::BTreeMap;
use std::fmt;

use crate::units::parse_duration;

/// The longest selector read.
pub const MAX_LEN: usize = 1024;
/// The most requirements in one selector.
pub const MAX_REQUIREMENTS: usize = 32;
/// The most values in one `in (...)` set.
pub const MAX_SET: usize = 64;
/// The longest label key or value.
pub const MAX_LABEL: usize = 63;
/// The most labels one device carries.
pub const MAX_LABELS: usize = 32;

/// Keys that name a device's state, not a label.
pub const RESERVED: [&str; 3] = ["state", "config", "cert-expires"];

/// The states a device is listed in.
pub const STATES: [&str; 4] = ["online", "offline", "revoked", "never-seen"];

/// Why a label or selector is refused: what, where (byte offset), how to fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} (at byte {at}); {hint}")]
pub struct SelectorError {
    /// Byte offset into the text.
    pub at: usize,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: String,
}

fn err(at: usize, message: impl Into<String>, hint: impl Into<String>) -> SelectorError {
    SelectorError {
        at,
        message: message.into(),
        hint: hint.into(),
    }
}

/// Whether `key` may be a label key.
///
/// # Errors
/// What is wrong with it.
pub fn check_key(key: &str) -> Result<(), String> {
    let ok = !key.is_empty()
        && key.len() <= MAX_LABEL
        && key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && key
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if !ok {
        return Err(format!(
            "label key {key:?}: lower-case letters, digits, '.', '_' and '-', starting with a letter or digit, at most {MAX_LABEL}"
        ));
    }
    if RESERVED.contains(&key) {
        return Err(format!(
            "label key {key:?} names a device's state; choose another key"
        ));
    }
    Ok(())
}

/// Whether `value` may be a label value.
///
/// # Errors
/// What is wrong with it.
pub fn check_value(value: &str) -> Result<(), String> {
    let ok = !value.is_empty()
        && value.len() <= MAX_LABEL
        && value.starts_with(|c: char| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "label value {value:?}: letters, digits, '.', '_' and '-', starting with a letter or digit, at most {MAX_LABEL}"
        ))
    }
}

/// Parses `k=v` (a label to set) or `k-` (a label to remove).
///
/// # Errors
/// What is wrong with it.
pub fn parse_assignment(s: &str) -> Result<(String, Option<String>), String> {
    if let Some(key) = s.strip_suffix('-').filter(|k| !k.contains('=')) {
        check_key(key)?;
        return Ok((key.to_owned(), None));
    }
    let Some((k, v)) = s.split_once('=') else {
        return Err(format!(
            "{s:?}: write KEY=VALUE to set a label, KEY- to remove one"
        ));
    };
    check_key(k)?;
    check_value(v)?;
    Ok((k.to_owned(), Some(v.to_owned())))
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    /// `k=v`
    Eq(String, String),
    /// `k!=v`
    Ne(String, String),
    /// `k in (a,b)`
    In(String, Vec<String>),
    /// `k notin (a,b)`
    NotIn(String, Vec<String>),
    /// `k`
    Has(String),
    /// `!k`
    Lacks(String),
    /// `state=...`, `state!=...`, `state in (...)`: the device's state is
    /// (or, with `negated`, is not) one of these.
    State {
        /// Whether it must not be.
        negated: bool,
        /// The states.
        states: Vec<String>,
    },
    /// `config=drift` (`true`) or `config=in-sync` (`false`).
    Drift(bool),
    /// `cert-expires<D` (`true`: within D) or `cert-expires>D`, in ms.
    CertExpires {
        /// Within (`<`) or beyond (`>`).
        within: bool,
        /// D in milliseconds.
        ms: i64,
    },
}

/// A parsed selector: every requirement must hold.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector(pub Vec<Requirement>);

/// What a selector is matched against.
#[derive(Debug, Clone, Copy)]
pub struct Facts<'a> {
    /// The device's labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Its state (one of [`STATES`]).
    pub state: &'a str,
    /// Whether its applied config differs from the desired one.
    pub drift: bool,
    /// How long its certificate has left (ms; negative: expired), if known.
    pub cert_left_ms: Option<i64>,
}

impl Selector {
    /// Whether a device with `facts` is selected.
    pub fn matches(&self, f: &Facts<'_>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Eq(k, v) => f.labels.get(k) == Some(v),
            Requirement::Ne(k, v) => f.labels.get(k) != Some(v),
            Requirement::In(k, vs) => f.labels.get(k).is_some_and(|x| vs.contains(x)),
            Requirement::NotIn(k, vs) => f.labels.get(k).is_none_or(|x| !vs.contains(x)),
            Requirement::Has(k) => f.labels.contains_key(k),
            Requirement::Lacks(k) => !f.labels.contains_key(k),
            Requirement::State { negated, states } => {
                states.iter().any(|s| s == f.state) != *negated
            }
            Requirement::Drift(d) => f.drift == *d,
            Requirement::CertExpires { within, ms } => match f.cert_left_ms {
                Some(left) if *within => left < *ms,
                Some(left) => left > *ms,
                None => false,
            },
        })
    }

    /// Parses a selector; the empty text selects every device.
    ///
    /// # Errors
    /// The first mistake, located.
    pub fn parse(text: &str) -> Result<Selector, SelectorError> {
        if text.len() > MAX_LEN {
            return Err(err(
                0,
                format!("the selector is longer than {MAX_LEN} bytes"),
                "select with fewer requirements; labels can group devices",
            ));
        }
        let mut out = Vec::new();
        let mut p = Parser { s: text, i: 0 };
        p.space();
        if p.done() {
            return Ok(Selector(out));
        }
        loop {
            if out.len() == MAX_REQUIREMENTS {
                return Err(err(
                    p.i,
                    format!("more than {MAX_REQUIREMENTS} requirements"),
                    "select with fewer requirements",
                ));
            }
            out.push(p.requirement()?);
            p.space();
            if p.done() {
                return Ok(Selector(out));
            }
            if !p.eat(",") {
                return Err(err(
                    p.i,
                    format!("expected ',' before {:?}", p.rest_word()),
                    "join requirements with commas: city=changchun,ring=canary",
                ));
            }
            p.space();
        }
    }
}

/// One label test the registry runs on its label table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelTest {
    /// The key.
    pub key: String,
    /// The values it must (or must not) have; empty: any value.
    pub values: Vec<String>,
    /// Whether a label with `key` (and one of `values`) must be there (`true`)
    /// or must not.
    pub present: bool,
}

/// The part of a selector the registry checks on its stored columns, so a
/// query reads only the rows that may match. Every device the selector picks
/// passes it; the hub then checks the whole selector on what it reads
/// (whether a box is online lives in the hub's memory).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stored {
    /// No device can match (states that exclude each other).
    pub nothing: bool,
    /// `Some(true)`: revoked devices only; `Some(false)`: not revoked.
    pub revoked: Option<bool>,
    /// Only devices the registry holds no heartbeat of.
    pub no_heartbeat: bool,
    /// `Some(true)`: only devices whose applied config is older than the
    /// newest pushed one; `Some(false)`: only the others.
    pub drift: Option<bool>,
    /// Label tests, all of which must hold.
    pub labels: Vec<LabelTest>,
    /// The certificate ends before this (Unix ms).
    pub cert_before_ms: Option<i64>,
    /// The certificate ends after this (Unix ms).
    pub cert_after_ms: Option<i64>,
}

impl Stored {
    /// Whether nothing is filtered (every row is read).
    pub fn is_empty(&self) -> bool {
        *self == Stored::default()
    }

    /// The same test in memory, over what the registry stores of a device:
    /// its labels, whether it is revoked, whether a heartbeat is stored,
    /// whether its config drifts, and when its certificate ends. The
    /// registry's queries must agree with it.
    pub fn admits(
        &self,
        labels: &BTreeMap<String, String>,
        (revoked, heartbeat, drift): (bool, bool, bool),
        cert_not_after_ms: Option<i64>,
    ) -> bool {
        !self.nothing
            && self.revoked.is_none_or(|r| r == revoked)
            && self.drift.is_none_or(|d| d == drift)
            && !(self.no_heartbeat && heartbeat)
            && self.labels.iter().all(|t| {
                let has = labels
                    .get(&t.key)
                    .is_some_and(|v| t.values.is_empty() || t.values.contains(v));
                has == t.present
            })
            && self
                .cert_before_ms
                .is_none_or(|b| cert_not_after_ms.is_some_and(|t| t < b))
            && self
                .cert_after_ms
                .is_none_or(|a| cert_not_after_ms.is_some_and(|t| t > a))
    }
}

impl Selector {
    /// What of this selector the registry can check, at `now_ms`.
    pub fn stored(&self, now_ms: i64) -> Stored {
        let mut out = Stored::default();
        let mut states: Vec<&str> = STATES.to_vec();
        for r in &self.0 {
            let test = |key: &String, values: &[String], present: bool| LabelTest {
                key: key.clone(),
                values: values.to_vec(),
                present,
            };
            match r {
                Requirement::Eq(k, v) => out.labels.push(test(k, std::slice::from_ref(v), true)),
                Requirement::Ne(k, v) => out.labels.push(test(k, std::slice::from_ref(v), false)),
                Requirement::In(k, vs) => out.labels.push(test(k, vs, true)),
                Requirement::NotIn(k, vs) => out.labels.push(test(k, vs, false)),
                Requirement::Has(k) => out.labels.push(test(k, &[], true)),
                Requirement::Lacks(k) => out.labels.push(test(k, &[], false)),
                Requirement::State { negated, states: s } => {
                    states.retain(|x| s.iter().any(|y| y == x) != *negated);
                }
                Requirement::Drift(d) => {
                    if out.drift.is_some_and(|x| x != *d) {
                        out.nothing = true;
                    }
                    out.drift = Some(*d);
                }
                Requirement::CertExpires { within, ms } => {
                    let at = now_ms.saturating_add(*ms);
                    if *within {
                        out.cert_before_ms = Some(out.cert_before_ms.map_or(at, |b| b.min(at)));
                    } else {
                        out.cert_after_ms = Some(out.cert_after_ms.map_or(at, |a| a.max(at)));
                    }
                }
            }
        }
        // A revoked device is listed revoked whatever else; one never seen
        // has no heartbeat stored (one that is online may have none yet).
        if states.is_empty() {
            out.nothing = true;
        } else if states == ["revoked"] {
            out.revoked = Some(true);
        } else if !states.contains(&"revoked") {
            out.revoked = Some(false);
            out.no_heartbeat = states == ["never-seen"];
        }
        out
    }
}

struct Parser<'a> {
    s: &'a str,
    i: usize,
}

impl Parser<'_> {
    fn done(&self) -> bool {
        self.i >= self.s.len()
    }

    fn rest(&self) -> &str {
        &self.s[self.i..]
    }

    fn rest_word(&self) -> String {
        self.rest().chars().take(16).collect()
    }

    fn space(&mut self) {
        while self.rest().starts_with(' ') {
            self.i += 1;
        }
    }

    fn eat(&mut self, t: &str) -> bool {
        if self.rest().starts_with(t) {
            self.i += t.len();
            true
        } else {
            false
        }
    }

    /// A key or value: the characters labels may hold.
    fn word(&mut self) -> &str {
        let start = self.i;
        let len = self
            .rest()
            .find(|c: char| !(c.is_ascii_alphanumeric() || "._-".contains(c)))
            .unwrap_or(self.rest().len());
        self.i += len;
        &self.s[start..self.i]
    }

    fn value(&mut self) -> Result<String, SelectorError> {
        self.space();
        let at = self.i;
        let v = self.word().to_owned();
        check_value(&v).map_err(|m| err(at, m, "write the value after the operator"))?;
        Ok(v)
    }

    fn set(&mut self) -> Result<Vec<String>, SelectorError> {
        self.space();
        if !self.eat("(") {
            return Err(err(self.i, "expected '(' after in", "write k in (a,b)"));
        }
        let mut vs = Vec::new();
        loop {
            if vs.len() == MAX_SET {
                return Err(err(
                    self.i,
                    format!("more than {MAX_SET} values in a set"),
                    "label the devices instead",
                ));
            }
            vs.push(self.value()?);
            self.space();
            if self.eat(")") {
                return Ok(vs);
            }
            if !self.eat(",") {
                return Err(err(
                    self.i,
                    "expected ',' or ')' in the set",
                    "write k in (a,b)",
                ));
            }
        }
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        let at = self.i;
        if self.eat("!") {
            let k = self.word().to_owned();
            check_key(&k).map_err(|m| err(at + 1, m, "write !KEY: devices without that label"))?;
            return Ok(Requirement::Lacks(k));
        }
        let key = self.word().to_owned();
        if key.is_empty() {
            return Err(err(
                at,
                format!("expected a label key, found {:?}", self.rest_word()),
                "write KEY=VALUE, KEY!=VALUE, KEY in (A,B), KEY or !KEY",
            ));
        }
        if key == "cert-expires" {
            let within = if self.eat("<") {
                true
            } else if self.eat(">") {
                false
            } else {
                return Err(err(
                    self.i,
                    "cert-expires takes < or >",
                    "write cert-expires<72h",
                ));
            };
            let d_at = self.i;
            let d = self.word().to_owned();
            let ms = parse_duration(&d)
                .map_err(|e| err(d_at, format!("cert-expires: {}", e.message), e.hint))?
                .as_millis();
            return Ok(Requirement::CertExpires {
                within,
                ms: i64::try_from(ms).unwrap_or(i64::MAX),
            });
        }
        self.space();
        let (negated, values) = if self.eat("!=") {
            (Some(true), vec![self.value()?])
        } else if self.eat("==") || self.eat("=") {
            (Some(false), vec![self.value()?])
        } else if self.rest().starts_with("notin") && !key.is_empty() {
            self.i += 5;
            (Some(true), self.set()?)
        } else if self.rest().starts_with("in") {
            self.i += 2;
            (Some(false), self.set()?)
        } else {
            (None, vec![])
        };
        match (key.as_str(), negated) {
            ("state", Some(negated)) => {
                if let Some(bad) = values.iter().find(|v| !STATES.contains(&v.as_str())) {
                    return Err(err(
                        at,
                        format!("state {bad:?} is not a device state"),
                        format!("states: {}", STATES.join(", ")),
                    ));
                }
                Ok(Requirement::State {
                    negated,
                    states: values,
                })
            }
            ("config", Some(negated)) if values.len() == 1 => {
                let drift = match values[0].as_str() {
                    "drift" => true,
                    "in-sync" => false,
                    other => {
                        return Err(err(
                            at,
                            format!("config {other:?} is not a config state"),
                            "write config=drift or config=in-sync",
                        ));
                    }
                };
                Ok(Requirement::Drift(drift != negated))
            }
            ("state" | "config", _) => Err(err(
                at,
                format!("{key} is a device's state, compared with = or !="),
                "write state=offline or config=drift",
            )),
            (_, negated) => {
                check_key(&key).map_err(|m| err(at, m, "write a label key"))?;
                Ok(match (negated, values.len()) {
                    (None, _) => Requirement::Has(key),
                    (Some(false), 1) if !self.s[at..self.i].contains('(') => {
                        Requirement::Eq(key, values.into_iter().next().unwrap_or_default())
                    }
                    (Some(true), 1) if !self.s[at..self.i].contains('(') => {
                        Requirement::Ne(key, values.into_iter().next().unwrap_or_default())
                    }
                    (Some(false), _) => Requirement::In(key, values),
                    (Some(true), _) => Requirement::NotIn(key, values),
                })
            }
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            match r {
                Requirement::Eq(k, v) => write!(f, "{k}={v}")?,
                Requirement::Ne(k, v) => write!(f, "{k}!={v}")?,
                Requirement::In(k, vs) => write!(f, "{k} in ({})", vs.join(","))?,
                Requirement::NotIn(k, vs) => write!(f, "{k} notin ({})", vs.join(","))?,
                Requirement::Has(k) => write!(f, "{k}")?,
                Requirement::Lacks(k) => write!(f, "!{k}")?,
                Requirement::State { negated, states } => {
                    let op = if *negated { "notin" } else { "in" };
                    write!(f, "state {op} ({})", states.join(","))?;
                }
                Requirement::Drift(d) => {
                    write!(f, "config={}", if *d { "drift" } else { "in-sync" })?;
                }
                Requirement::CertExpires { within, ms } => {
                    write!(
                        f,
                        "cert-expires{}{}s",
                        if *within { '<' } else { '>' },
                        ms / 1000
                    )?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn sel(s: &str) -> Selector {
        Selector::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn requirements_on_labels_and_state() {
        let l = labels(&[("city", "changchun"), ("ring", "canary"), ("model", "g2")]);
        let f = Facts {
            labels: &l,
            state: "offline",
            drift: true,
            cert_left_ms: Some(3_600_000),
        };
        for (s, want) in [
            ("", true),
            ("city=changchun", true),
            ("city==changchun", true),
            ("city=jilin", false),
            ("city!=jilin", true),
            ("dept!=x", true),
            ("ring in (canary, early)", true),
            ("ring in (early)", false),
            ("ring notin (early)", true),
            ("dept notin (x)", true),
            ("model", true),
            ("!model", false),
            ("!retired", true),
            ("state=offline", true),
            ("state!=offline", false),
            ("state in (online,revoked)", false),
            ("config=drift", true),
            ("config!=drift", false),
            ("config=in-sync", false),
            ("cert-expires<72h", true),
            ("cert-expires>72h", false),
            ("city=changchun, ring=canary ,!retired,state=offline", true),
            ("city=changchun,ring=early", false),
        ] {
            assert_eq!(sel(s).matches(&f), want, "{s}");
        }
        let unknown = Facts {
            cert_left_ms: None,
            ..f
        };
        assert!(!sel("cert-expires<72h").matches(&unknown));
    }

    #[test]
    fn mistakes_are_located_with_a_hint() {
        for (s, at, needle) in [
            ("city=", 5, "label value"),
            ("City=x", 0, "label key"),
            ("city=changchun ring=canary", 15, "expected ','"),
            ("ring in canary", 8, "expected '('"),
            ("ring in (a b)", 11, "expected ','"),
            ("state=asleep", 0, "not a device state"),
            ("config=maybe", 0, "not a config state"),
            ("cert-expires=3h", 12, "takes < or >"),
            ("cert-expires<soon", 13, "cert-expires"),
            ("=x", 0, "expected a label key"),
            ("!State", 1, "label key"),
            ("state", 0, "compared with"),
        ] {
            let e = Selector::parse(s).expect_err(s);
            assert_eq!(e.at, at, "{s}: {e}");
            assert!(e.message.contains(needle), "{s}: {e}");
            assert!(!e.hint.is_empty());
        }
        assert!(Selector::parse(&"a,".repeat(600)).is_err());
        assert!(Selector::parse(&vec!["a"; 40].join(",")).is_err());
    }

    #[test]
    fn the_stored_part_narrows_by_state() {
        let at = |t: &str| Selector::parse(t).expect(t).stored(0);
        assert_eq!(at("state=revoked").revoked, Some(true));
        assert_eq!(at("state=online").revoked, Some(false));
        assert!(!at("state=online").no_heartbeat);
        assert!(at("state=never-seen").no_heartbeat);
        assert_eq!(at("state in (revoked,online)").revoked, None);
        assert!(at("state=online,state=offline").nothing);
        assert_eq!(
            at("cert-expires<1h,cert-expires<2h").cert_before_ms,
            Some(3_600_000)
        );
        assert!(at("").is_empty());
        assert_eq!(at("config=drift").drift, Some(true));
        assert!(at("config=drift,config=in-sync").nothing);
    }

    #[test]
    fn assignments_set_and_remove() {
        assert_eq!(
            parse_assignment("city=changchun"),
            Ok(("city".into(), Some("changchun".into())))
        );
        assert_eq!(parse_assignment("ring-"), Ok(("ring".into(), None)));
        assert!(parse_assignment("state=online").is_err());
        assert!(parse_assignment("city").is_err());
        assert!(parse_assignment("city=a b").is_err());
        assert!(parse_assignment("city=\"x\"").is_err());
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_is_refused(s in ".{0,80}") {
            let _ = Selector::parse(&s);
        }

        #[test]
        fn a_selector_reads_back_as_itself(
            reqs in proptest::collection::vec(
                (0u8..6, "[a-z][a-z0-9]{0,6}", proptest::collection::vec("[a-z0-9][a-z0-9]{0,6}", 1..4)),
                1..6,
            )
        ) {
            let reqs: Vec<Requirement> = reqs
                .into_iter()
                .filter(|(_, k, _)| !RESERVED.contains(&k.as_str()) && k != "in" && k != "notin")
                .map(|(kind, k, vs)| match kind {
                    0 => Requirement::Eq(k, vs[0].clone()),
                    1 => Requirement::Ne(k, vs[0].clone()),
                    2 => Requirement::In(k, vs),
                    3 => Requirement::NotIn(k, vs),
                    4 => Requirement::Has(k),
                    _ => Requirement::Lacks(k),
                })
                .collect();
            let s = Selector(reqs);
            let text = s.to_string();
            proptest::prop_assert_eq!(Selector::parse(&text).map_err(|e| e.to_string()), Ok(s), "{}", text);
        }

        /// The registry's part of a selector never drops a device the whole
        /// selector picks, and on labels alone it is the whole selector.
        #[test]
        fn the_stored_part_keeps_every_device_the_selector_picks(
            text in proptest::collection::vec(
                proptest::sample::select(vec![
                    "a=x", "a!=x", "a in (x,y)", "a notin (y)", "a", "!a", "b=x", "!b",
                    "state=online", "state=offline", "state=revoked", "state=never-seen",
                    "state!=revoked", "state in (offline,never-seen)", "state in (revoked,online)",
                    "state!=online", "config=drift", "config=in-sync", "cert-expires<72h", "cert-expires>1h",
                ]),
                0..5,
            ),
            a in proptest::option::of(proptest::sample::select(vec!["x", "y", "z"])),
            b in proptest::option::of(proptest::sample::select(vec!["x", "y"])),
            revoked: bool,
            heartbeat: bool,
            online: bool,
            drift: bool,
            cert_left_h in proptest::option::of(-10i64..200),
        ) {
            let sel = Selector::parse(&text.join(",")).expect("valid");
            let now = 1_000_000_000_000i64;
            let mut l = BTreeMap::new();
            if let Some(v) = a { l.insert("a".to_owned(), v.to_owned()); }
            if let Some(v) = b { l.insert("b".to_owned(), v.to_owned()); }
            // As the hub decides a device's state.
            let state = if revoked {
                "revoked"
            } else if online {
                "online"
            } else if !heartbeat {
                "never-seen"
            } else {
                "offline"
            };
            let cert_left_ms = cert_left_h.map(|h| h * 3_600_000);
            let facts = Facts { labels: &l, state, drift, cert_left_ms };
            let stored = sel.stored(now);
            let admitted = stored.admits(&l, (revoked, heartbeat, drift), cert_left_ms.map(|c| now + c));
            if sel.matches(&facts) {
                proptest::prop_assert!(admitted, "{} dropped {:?}", sel, facts);
            }
            let labels_only = sel.0.iter().all(|r| !matches!(r,
                Requirement::State { .. } | Requirement::CertExpires { .. }));
            if labels_only {
                proptest::prop_assert_eq!(admitted, sel.matches(&facts));
            }
        }
    }
}

//! Config templates: a config file with `{{ name }}` placeholders, rendered
//! for one device from its variables, strictly:
//! - a placeholder without a value, or a value the template never uses, is an
//!   error naming the variable and the template's line;
//! - a value cannot change the TOML around it: inside a `"..."` string it is
//!   escaped as TOML escapes; inside a `'...'` string it may not hold `'` or a
//!   line break; outside a string it must be one bare scalar (a number, a
//!   boolean, a date: letters, digits, `.`, `:`, `+`, `-`, `_`);
//! - names are `[a-z_][a-z0-9_]*`; a `{{` without its `}}` is an error.
//!
//! Bounded: templates of at most 1 MiB, 256 variables, values of 4 KiB.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The largest template read.
pub const MAX_TEMPLATE: usize = 1 << 20;
/// The most variables of one device.
pub const MAX_VARIABLES: usize = 256;
/// The longest value.
pub const MAX_VALUE: usize = 4096;

/// One mistake of a template or of a device's variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateError {
    /// The template's line (1-based; 0 for a variable the template never uses).
    pub line: usize,
    /// The column of the placeholder (1-based; 0 as for `line`).
    pub column: usize,
    /// The variable concerned, if any.
    pub variable: Option<String>,
    /// What is wrong, and how to fix it.
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line > 0 {
            write!(f, "line {}:{}: ", self.line, self.column)?;
        }
        f.write_str(&self.message)
    }
}

fn valid_name(n: &str) -> bool {
    n.starts_with(|c: char| c.is_ascii_lowercase() || c == '_')
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// Where a placeholder sits in its line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Context {
    Bare,
    Basic,
    Literal,
    Comment,
}

/// The context at byte `at` of `line` (strings do not span lines here:
/// multi-line strings are not templated).
fn context(line: &str, at: usize) -> Context {
    let mut ctx = Context::Bare;
    let mut chars = line[..at].chars();
    while let Some(c) = chars.next() {
        ctx = match (ctx, c) {
            (Context::Bare, '#') => return Context::Comment,
            (Context::Bare, '"') => Context::Basic,
            (Context::Bare, '\'') => Context::Literal,
            (Context::Basic, '\\') => {
                chars.next();
                Context::Basic
            }
            (Context::Basic, '"') | (Context::Literal, '\'') => Context::Bare,
            (c, _) => c,
        };
    }
    ctx
}

fn escape_basic(v: &str) -> String {
    let mut o = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if c.is_control() => o.push_str(&format!("\\u{:04X}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

/// The variables `template` uses, in order of first use.
///
/// # Errors
/// Its malformed placeholders.
pub fn variables(template: &str) -> Result<Vec<String>, Vec<TemplateError>> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    let mut errors = Vec::new();
    for (n, line) in template.lines().enumerate() {
        for p in placeholders(line) {
            match p {
                Ok((_, _, name)) => {
                    if seen.insert(name.to_owned()) {
                        out.push(name.to_owned());
                    }
                }
                Err((col, message)) => errors.push(TemplateError {
                    line: n + 1,
                    column: col + 1,
                    variable: None,
                    message,
                }),
            }
        }
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// A placeholder of a line: (start, end, name), or (column, why it is not one).
type Placeholder<'a> = Result<(usize, usize, &'a str), (usize, String)>;

/// The placeholders of one line.
fn placeholders(line: &str) -> Vec<Placeholder<'_>> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = line[from..].find("{{") {
        let start = from + i;
        let Some(j) = line[start + 2..].find("}}") else {
            out.push(Err((
                start,
                "a placeholder opened with {{ is not closed with }} on its line".into(),
            )));
            return out;
        };
        let end = start + 2 + j + 2;
        let name = line[start + 2..end - 2].trim();
        if valid_name(name) {
            out.push(Ok((start, end, name)));
        } else {
            out.push(Err((
                start,
                format!(
                    "{{{{ {name} }}}} is not a variable name (lower-case letters, digits and _, not starting with a digit)"
                ),
            )));
        }
        from = end;
    }
    out
}

/// Renders `template` with `vars`.
///
/// # Errors
/// Every mistake: malformed placeholders, variables without a value, values
/// the template never uses, values that would change the TOML around them.
pub fn render(
    template: &str,
    vars: &BTreeMap<String, String>,
) -> Result<String, Vec<TemplateError>> {
    let mut errors = Vec::new();
    if template.len() > MAX_TEMPLATE {
        return Err(vec![TemplateError {
            line: 0,
            column: 0,
            variable: None,
            message: format!("the template is larger than {MAX_TEMPLATE} bytes"),
        }]);
    }
    if vars.len() > MAX_VARIABLES {
        return Err(vec![TemplateError {
            line: 0,
            column: 0,
            variable: None,
            message: format!("more than {MAX_VARIABLES} variables"),
        }]);
    }
    let mut used = BTreeSet::new();
    let mut out = String::with_capacity(template.len());
    for (n, line) in template.split_inclusive('\n').enumerate() {
        let mut last = 0;
        for p in placeholders(line) {
            let (start, end, name) = match p {
                Ok(p) => p,
                Err((col, message)) => {
                    errors.push(TemplateError {
                        line: n + 1,
                        column: col + 1,
                        variable: None,
                        message,
                    });
                    continue;
                }
            };
            out.push_str(&line[last..start]);
            last = end;
            let at = |message: String| TemplateError {
                line: n + 1,
                column: start + 1,
                variable: Some(name.to_owned()),
                message,
            };
            used.insert(name.to_owned());
            let Some(value) = vars.get(name) else {
                errors.push(at(format!(
                    "variable {name} has no value for this device; set it with gatewayctl devices vars DEVICE {name}=VALUE"
                )));
                continue;
            };
            if value.len() > MAX_VALUE {
                errors.push(at(format!(
                    "variable {name}: longer than {MAX_VALUE} bytes"
                )));
                continue;
            }
            match context(line, start) {
                Context::Basic => out.push_str(&escape_basic(value)),
                Context::Literal => {
                    if value.contains(['\'', '\n', '\r']) {
                        errors.push(at(format!(
                            "variable {name}: its value holds ' or a line break, which a '...' string cannot; write the placeholder inside \"...\""
                        )));
                    } else {
                        out.push_str(value);
                    }
                }
                Context::Bare => {
                    let bare = !value.is_empty()
                        && value
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || ".:+-_".contains(c));
                    if bare {
                        out.push_str(value);
                    } else {
                        errors.push(at(format!(
                            "variable {name}: {value:?} is not one bare TOML value (a number, true/false, a date); quote the placeholder (\"{{{{ {name} }}}}\") for text"
                        )));
                    }
                }
                Context::Comment => out.push_str(&value.replace(['\n', '\r'], " ")),
            }
        }
        out.push_str(&line[last..]);
    }
    for name in vars.keys().filter(|k| !used.contains(*k)) {
        errors.push(TemplateError {
            line: 0,
            column: 0,
            variable: Some(name.clone()),
            message: format!(
                "variable {name} is set for this device but the template does not use it (a misspelt name?)"
            ),
        });
    }
    if errors.is_empty() {
        Ok(out)
    } else {
        Err(errors)
    }
}

/// The variable every template may use without a device setting it: the
/// device's id.
pub const DEVICE_VARIABLE: &str = "device";

/// Renders `template` for one device: its variables that the template uses,
/// and [`DEVICE_VARIABLE`] for its id (a device's variables may serve several
/// templates, so those this one does not use are not errors here; a
/// placeholder without a value is).
///
/// # Errors
/// As [`render`].
pub fn render_for_device(
    template: &str,
    device: &str,
    vars: &BTreeMap<String, String>,
) -> Result<String, Vec<TemplateError>> {
    let used = variables(template)?;
    let mut mine: BTreeMap<String, String> = used
        .iter()
        .filter_map(|n| vars.get(n).map(|v| (n.clone(), v.clone())))
        .collect();
    if used.iter().any(|n| n == DEVICE_VARIABLE) {
        mine.insert(DEVICE_VARIABLE.to_owned(), device.to_owned());
    }
    render(template, &mine)
}

/// Checks one variable a device is given: its name and its value's length.
///
/// # Errors
/// What is wrong, and how to fix it.
pub fn check_variable(name: &str, value: &str) -> Result<(), String> {
    if !valid_name(name) || name.len() > 64 {
        return Err(format!(
            "variable {name:?}: a name is lower-case letters, digits and _, not starting with a digit, at most 64 characters"
        ));
    }
    if name == DEVICE_VARIABLE {
        return Err(format!(
            "variable {DEVICE_VARIABLE}: set by the hub (the device's id), not by operators"
        ));
    }
    if value.len() > MAX_VALUE {
        return Err(format!("variable {name}: longer than {MAX_VALUE} bytes"));
    }
    Ok(())
}

/// Checks that `template` is TOML once its placeholders stand for values
/// ([`symbolic`]): the mistake with its line, if not.
///
/// # Errors
/// The TOML error, located.
pub fn check_toml(template: &str) -> Result<(), TemplateError> {
    let s = symbolic(template);
    match toml::from_str::<toml::Table>(&s) {
        Ok(_) => Ok(()),
        Err(e) => {
            let (line, column) = e.span().map_or((0, 0), |span| {
                let before = &s[..span.start.min(s.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                (line, column)
            });
            Err(TemplateError {
                line,
                column,
                variable: None,
                message: format!("not TOML: {}", e.message()),
            })
        }
    }
}

/// Reads a file of a device's variables: TOML `name = value` lines, each
/// value a string, a number, a boolean or a date (kept as written).
///
/// # Errors
/// The first mistake, located.
pub fn parse_vars_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let table: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (k, v) in table {
        let value = match v {
            toml::Value::String(s) => s,
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => d.to_string(),
            _ => {
                return Err(format!(
                    "{k}: a variable's value is a string, a number, a boolean or a date"
                ));
            }
        };
        check_variable(&k, &value)?;
        out.push((k, value));
    }
    if out.len() > MAX_VARIABLES {
        return Err(format!("more than {MAX_VARIABLES} variables"));
    }
    Ok(out)
}

/// The template with every placeholder standing for itself, as TOML that
/// parses wherever the template's own would: inside a string the placeholder
/// stays as text, outside one it becomes the string `"{{ name }}"`. Two
/// versions of a template are compared this way (which sections a change
/// touches) before any device's values are known.
pub fn symbolic(template: &str) -> String {
    let mut out = String::with_capacity(template.len());
    for line in template.split_inclusive('\n') {
        let mut last = 0;
        for p in placeholders(line) {
            let Ok((start, end, name)) = p else {
                continue;
            };
            out.push_str(&line[last..start]);
            last = end;
            match context(line, start) {
                Context::Bare => {
                    out.push_str("\"{{ ");
                    out.push_str(name);
                    out.push_str(" }}\"");
                }
                _ => out.push_str(&line[start..end]),
            }
        }
        out.push_str(&line[last..]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect()
    }

    #[test]
    fn values_fill_their_placeholders() {
        let t = "[node]\nid = \"{{ id }}\"\n[[zone]]\nlevel = {{level}}\nnetworks = ['{{ net }}']\n# for {{ id }}\n";
        let got = render(
            t,
            &vars(&[("id", "jl-0001"), ("level", "3"), ("net", "10.1.0.0/16")]),
        )
        .expect("render");
        assert_eq!(
            got,
            "[node]\nid = \"jl-0001\"\n[[zone]]\nlevel = 3\nnetworks = ['10.1.0.0/16']\n# for jl-0001\n"
        );
        assert_eq!(variables(t).expect("vars"), ["id", "level", "net"]);
    }

    #[test]
    fn missing_unknown_and_malformed_are_errors_with_lines() {
        let t = "a = \"{{ x }}\"\nb = {{ y }}\nc = {{ Bad }}\nd = {{ z\n";
        let e = render(t, &vars(&[("x", "1"), ("extra", "2")])).expect_err("strict");
        let found: Vec<(usize, Option<&str>)> =
            e.iter().map(|e| (e.line, e.variable.as_deref())).collect();
        assert!(found.contains(&(2, Some("y"))), "{e:?}");
        assert!(found.contains(&(3, None)), "{e:?}");
        assert!(found.contains(&(4, None)), "{e:?}");
        assert!(found.contains(&(0, Some("extra"))), "{e:?}");
    }

    #[test]
    fn a_value_cannot_inject_toml() {
        let evil = "x\"\n[admin]\nlisten = \"0.0.0.0:1";
        let got = render("id = \"{{ id }}\"\n", &vars(&[("id", evil)])).expect("escaped");
        let v: toml::Table = toml::from_str(&got).expect("still TOML");
        assert_eq!(v["id"].as_str(), Some(evil));
        assert_eq!(v.len(), 1);
        assert!(render("id = '{{ id }}'\n", &vars(&[("id", "a'b")])).is_err());
        assert!(render("level = {{ l }}\n", &vars(&[("l", "3\n[admin]")])).is_err());
        assert!(render("level = {{ l }}\n", &vars(&[("l", "\"x\"")])).is_err());
    }

    #[test]
    fn a_device_gets_its_id_and_only_the_variables_the_template_uses() {
        let t = "[node]\nid = \"{{ device }}\"\nx = \"{{ a }}\"\n";
        let got =
            render_for_device(t, "jl-7", &vars(&[("a", "1"), ("other", "2")])).expect("render");
        assert_eq!(got, "[node]\nid = \"jl-7\"\nx = \"1\"\n");
        let e = render_for_device(t, "jl-7", &vars(&[])).expect_err("a has no value");
        assert_eq!(e[0].variable.as_deref(), Some("a"));
        assert_eq!(e[0].line, 3);
        assert!(check_variable("device", "x").is_err());
        assert!(check_variable("Bad", "x").is_err());
        assert!(check_variable("ok_1", &"x".repeat(MAX_VALUE + 1)).is_err());
        assert!(check_variable("ok_1", "10.0.0.1").is_ok());
        let file = parse_vars_file("hub = \"10.0.0.1:4433\"\nlevel = 3\n").expect("vars");
        assert_eq!(
            file,
            [
                ("hub".into(), "10.0.0.1:4433".into()),
                ("level".into(), "3".into())
            ]
        );
        assert!(parse_vars_file("x = [1]\n").is_err());
        assert!(parse_vars_file("device = \"x\"\n").is_err());
    }

    #[test]
    fn the_symbolic_form_parses_where_the_template_would() {
        let t = "[node]\nid = \"{{ id }}\"\n[[zone]]\nlevel = {{ level }}\nnetworks = ['{{ net }}', {{ n2 }}]\n";
        let s = symbolic(t);
        let v: toml::Table = toml::from_str(&s).expect("TOML");
        assert_eq!(v["node"]["id"].as_str(), Some("{{ id }}"));
        assert_eq!(v["zone"][0]["level"].as_str(), Some("{{ level }}"));
        assert_eq!(v["zone"][0]["networks"][1].as_str(), Some("{{ n2 }}"));
        assert!(check_toml(t).is_ok());
        let e = check_toml("a = 1\nb = = {{ x }}\n").expect_err("bad");
        assert_eq!(e.line, 2);
    }

    proptest::proptest! {
        #[test]
        fn any_value_in_a_basic_string_stays_that_string(v in "\\PC{0,40}|[\"\\\\\n\r\t]{0,10}") {
            let got = render("k = \"{{ v }}\"\n", &vars(&[("v", &v)])).expect("render");
            let t: toml::Table = toml::from_str(&got).expect("TOML");
            proptest::prop_assert_eq!(t["k"].as_str(), Some(v.as_str()));
            proptest::prop_assert_eq!(t.len(), 1);
        }

        #[test]
        fn any_template_renders_or_is_refused(t in ".{0,120}", v in ".{0,20}") {
            let _ = render(&t, &vars(&[("v", &v)]));
        }
    }
}

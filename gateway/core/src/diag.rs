//! Diagnostics: located errors and warnings about a configuration file.
//!
//! Every diagnostic names the file, the line and column (1-based, counted in
//! characters), what is wrong and, where we know it, how to fix it. Boundary-rule
//! diagnostics also carry the id of the rule (see `docs/policy.md`).

use std::fmt;
use std::ops::Range;

use serde::Serialize;

use crate::rule::RuleId;

/// How bad a diagnostic is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The configuration is refused.
    Error,
    /// The configuration is accepted, but something needs attention.
    Warning,
}

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize)]
pub struct Location {
    /// 1-based line number.
    pub line: u32,
    /// 1-based column, counted in characters.
    pub column: u32,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// Maps byte offsets of a source text to lines and columns.
#[derive(Debug, Clone)]
pub struct LineIndex<'a> {
    src: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    /// Indexes `src`.
    pub fn new(src: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(src.match_indices('\n').map(|(i, _)| i + 1));
        Self { src, line_starts }
    }

    /// The location of byte `offset` (clamped to the end of the text).
    pub fn locate(&self, offset: usize) -> Location {
        let offset = offset.min(self.src.len());
        let line = self.line_starts.partition_point(|&s| s <= offset) - 1;
        let start = self.line_starts[line];
        let column = self
            .src
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        Location {
            line: u32::try_from(line + 1).unwrap_or(u32::MAX),
            column: u32::try_from(column + 1).unwrap_or(u32::MAX),
        }
    }

    /// The location of the start of `span`.
    pub fn locate_span(&self, span: &Range<usize>) -> Location {
        self.locate(span.start)
    }
}

/// One finding about a configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Diagnostic {
    /// Error or warning.
    pub severity: Severity,
    /// The boundary rule behind it, if any.
    pub rule: Option<RuleId>,
    /// Where in the file.
    pub location: Location,
    /// What is wrong.
    pub message: String,
    /// How to fix it.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// An error at `location`.
    pub fn error(location: Location, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            rule: None,
            location,
            message: message.into(),
            hint: None,
        }
    }

    /// A warning at `location`.
    pub fn warning(location: Location, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(location, message)
        }
    }

    /// Adds how to fix it.
    #[must_use]
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Names the boundary rule behind it.
    #[must_use]
    pub fn rule(mut self, rule: RuleId) -> Self {
        self.rule = Some(rule);
        self
    }

    /// Whether it refuses the configuration.
    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// Renders it for a terminal, prefixed with `file`.
    pub fn render(&self, file: &str) -> String {
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let rule = self.rule.map(|r| format!("[{r}]")).unwrap_or_default();
        let mut out = format!("{kind}{rule}: {file}:{}: {}", self.location, self.message);
        if let Some(hint) = &self.hint {
            out.push_str("\n  hint: ");
            out.push_str(hint);
        }
        out
    }
}

/// Sorts diagnostics by position, errors before warnings at the same place.
pub fn sort(diags: &mut [Diagnostic]) {
    diags.sort_by(|a, b| {
        (a.location, a.severity, &a.message).cmp(&(b.location, b.severity, &b.message))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_lines_and_columns() {
        let idx = LineIndex::new("ab\ncdé\nf");
        assert_eq!(idx.locate(0), Location { line: 1, column: 1 });
        assert_eq!(idx.locate(1), Location { line: 1, column: 2 });
        assert_eq!(idx.locate(3), Location { line: 2, column: 1 });
        // 'é' is two bytes: the column counts characters.
        assert_eq!(idx.locate(7), Location { line: 2, column: 4 });
        assert_eq!(idx.locate(8), Location { line: 3, column: 1 });
        assert_eq!(idx.locate(100), Location { line: 3, column: 2 });
    }
}

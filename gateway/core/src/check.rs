//! A configuration as the daemon accepts it: the TOML text compiled into
//! checked types ([`crate::config`]), then the boundary rules applied
//! ([`crate::policy::check_config`]). This module sits above both, so the config
//! model knows nothing of the policy engine.

use crate::config::{Config, compile};
use crate::diag::{self, Diagnostic};
use crate::units::Date;

/// The result of reading a configuration: the config, if it has no error, and
/// every diagnostic found.
#[derive(Debug, Clone)]
pub struct Checked {
    /// Present when there is no error.
    pub config: Option<Config>,
    /// Errors and warnings, sorted by position.
    pub diagnostics: Vec<Diagnostic>,
    /// Whether the boundary rules were applied: they need a config without
    /// errors in its values and references.
    pub rules_checked: bool,
}

impl Checked {
    /// Whether the configuration is refused.
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// Reads a configuration from TOML text and applies every check, the boundary
/// rules included, as of `today` (assessment validity).
pub fn load(src: &str, today: Date) -> Checked {
    let (config, mut diagnostics) = compile::compile(src);
    let rules_checked = config.is_some();
    let config = config.and_then(|config| {
        diagnostics.extend(crate::policy::check_config(&config, today));
        let ok = !diagnostics.iter().any(Diagnostic::is_error);
        ok.then_some(config)
    });
    diag::sort(&mut diagnostics);
    Checked {
        config,
        diagnostics,
        rules_checked,
    }
}

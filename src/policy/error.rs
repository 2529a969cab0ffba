//! Policy errors that point at the file, line and key an operator has to fix.

use std::fmt;
use std::path::{Path, PathBuf};

/// One problem in one policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: PathBuf,
    /// 1-based line, when the problem can be tied to one.
    pub line: Option<usize>,
    /// Dotted key path such as `targets.db-prod-1.host_key`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in a policy directory; a policy is used only when this is empty.
#[derive(Debug, Clone, Default)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

impl std::error::Error for PolicyErrors {}

/// Collects errors for one file, translating byte spans into line numbers.
pub struct Reporter<'a> {
    pub file: &'a Path,
    pub text: &'a str,
    pub errors: &'a mut Vec<PolicyError>,
}

impl Reporter<'_> {
    /// Records a problem at byte `span_start` of the file (or nowhere in particular).
    pub fn error(
        &mut self,
        span_start: Option<usize>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(PolicyError {
            file: self.file.to_path_buf(),
            line: span_start.map(|offset| line_of(self.text, offset)),
            key: key.into(),
            message: message.into(),
        });
    }
}
/// Renders a TOML error as `line N: message`, so operators find the spot.
pub fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message();
    match err.span() {
        Some(span) => format!("line {}: {message}", line_of(text, span.start)),
        None => message.to_string(),
    }
}

/// The 1-based line number of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

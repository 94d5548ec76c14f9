//! Errors of checkpoint reading and writing; every one names the file at fault.

use crate::pickle::PickleError;

/// A key-by-key comparison of a state dict against the model, reported all at once.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyReport {
    /// Keys the model needs that the file lacks.
    pub missing: Vec<String>,
    /// Keys in the file the model does not have.
    pub unexpected: Vec<String>,
    /// (key, shape the model expects, shape found).
    pub misshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Keys the file holds more than once (after stripping `model.`/`module.`): which one
    /// would win is not the file's to decide silently.
    pub duplicated: Vec<String>,
}

impl KeyReport {
    /// No problem found.
    pub fn is_clean(&self) -> bool {
        self.missing.is_empty()
            && self.unexpected.is_empty()
            && self.misshaped.is_empty()
            && self.duplicated.is_empty()
    }
}

impl std::fmt::Display for KeyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.missing.is_empty() {
            writeln!(f, "  missing keys ({}):", self.missing.len())?;
            for k in &self.missing {
                writeln!(f, "    {k}")?;
            }
        }
        if !self.unexpected.is_empty() {
            writeln!(f, "  unexpected keys ({}):", self.unexpected.len())?;
            for k in &self.unexpected {
                writeln!(f, "    {k}")?;
            }
        }
        if !self.duplicated.is_empty() {
            writeln!(
                f,
                "  keys given more than once ({}):",
                self.duplicated.len()
            )?;
            for k in &self.duplicated {
                writeln!(f, "    {k}")?;
            }
        }
        if !self.misshaped.is_empty() {
            writeln!(f, "  wrongly shaped keys ({}):", self.misshaped.len())?;
            for (k, want, got) in &self.misshaped {
                writeln!(f, "    {k}: model expects {want:?}, file has {got:?}")?;
            }
        }
        Ok(())
    }
}

/// Anything that can go wrong reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File system error.
    #[error("{path}: {cause}")]
    Io { path: String, cause: std::io::Error },
    /// Pickle content refused or corrupt.
    #[error("{path}: {cause}")]
    Pickle { path: String, cause: PickleError },
    /// Anything else wrong with the file's structure or contents.
    #[error("{path}: {message}")]
    Format { path: String, message: String },
    /// A tensor to be written holds NaN or ±∞.
    #[error("tensor {0} holds NaN or infinite values: refusing to write a checkpoint of it")]
    NonFinite(String),
    /// The state dict does not match the model.
    #[error("{path}: the state dict does not match the model configuration:\n{report}")]
    Keys { path: String, report: KeyReport },
}

impl CheckpointError {
    pub(crate) fn format(path: &str, message: impl Into<String>) -> Self {
        Self::Format {
            path: path.to_string(),
            message: message.into(),
        }
    }
}

//! The choice of solver and its parameters, as a config value: a bare name (`"broyden"`) takes
//! the solver's defaults, a table (`{ kind = "broyden", max_pairs = 8 }`) sets parameters.

use super::{anderson, broyden, fixed_point, FixedPointMap, Solution, SolverOptions};
use candle_core::{Result, Tensor};
use serde::de::{self, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A solver with its own parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum SolverKind {
    /// Limited-memory "good" Broyden (official).
    Broyden {
        /// Cap on stored (u, v) pairs; oldest pairs are dropped first. None: threshold.
        max_pairs: Option<usize>,
        /// Cap on the bytes of stored pairs.
        max_history_bytes: Option<usize>,
    },
    /// Anderson acceleration.
    Anderson {
        /// History size m.
        m: usize,
        /// Tikhonov regularisation λ.
        lambda: f64,
        /// Mixing β.
        beta: f64,
    },
    /// Damped fixed-point iteration z ← τ f(z) + (1 − τ) z.
    FixedPoint {
        /// Damping τ.
        tau: f64,
    },
}

/// A solver parameter's value, as a config writes it.
#[derive(PartialEq)]
enum Parameter {
    Count(usize),
    Real(f64),
}

/// The names a config may use.
const NAMES: &str = "broyden, anderson, fixed_point";

impl SolverKind {
    /// The official solver with its official parameters (history as long as the threshold).
    pub const BROYDEN: SolverKind = SolverKind::Broyden {
        max_pairs: None,
        max_history_bytes: None,
    };

    /// Parses `broyden`, `anderson`, `fixed_point` (or the official `naive`) with default
    /// parameters.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "broyden" => Self::BROYDEN,
            "anderson" => Self::Anderson {
                m: anderson::default_m(),
                lambda: anderson::default_lambda(),
                beta: anderson::default_beta(),
            },
            "fixed_point" | "naive" => Self::FixedPoint {
                tau: fixed_point::default_tau(),
            },
            _ => return None,
        })
    }

    /// The solver's name in configs and statistics.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Broyden { .. } => "broyden",
            Self::Anderson { .. } => "anderson",
            Self::FixedPoint { .. } => "fixed_point",
        }
    }

    /// The parameters by name, unset caps left out.
    fn parameters(&self) -> Vec<(&'static str, Parameter)> {
        use Parameter::{Count, Real};
        match *self {
            Self::Broyden {
                max_pairs,
                max_history_bytes,
            } => [
                ("max_pairs", max_pairs),
                ("max_history_bytes", max_history_bytes),
            ]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, Count(v))))
            .collect(),
            Self::Anderson { m, lambda, beta } => {
                vec![
                    ("m", Count(m)),
                    ("lambda", Real(lambda)),
                    ("beta", Real(beta)),
                ]
            }
            Self::FixedPoint { tau } => vec![("tau", Real(tau))],
        }
    }

    /// Sets one parameter by name; the message names what is wrong.
    fn set(&mut self, key: &str, value: f64) -> std::result::Result<(), String> {
        let count = |v: f64| {
            (v.is_finite() && v >= 1.0 && v.fract() == 0.0 && v <= 2f64.powi(53))
                .then_some(v as usize)
                .ok_or_else(|| format!("{key} = {v} must be a positive whole number"))
        };
        let name = self.name();
        match (self, key) {
            (Self::Broyden { max_pairs, .. }, "max_pairs") => *max_pairs = Some(count(value)?),
            (
                Self::Broyden {
                    max_history_bytes, ..
                },
                "max_history_bytes",
            ) => *max_history_bytes = Some(count(value)?),
            (Self::Anderson { m, .. }, "m") => *m = count(value)?,
            (Self::Anderson { lambda, .. }, "lambda") => *lambda = value,
            (Self::Anderson { beta, .. }, "beta") => *beta = value,
            (Self::FixedPoint { tau }, "tau") => *tau = value,
            (this, _) => {
                let known: Vec<&str> = match this {
                    Self::Broyden { .. } => vec!["max_pairs", "max_history_bytes"],
                    Self::Anderson { .. } => vec!["m", "lambda", "beta"],
                    Self::FixedPoint { .. } => vec!["tau"],
                };
                return Err(format!(
                    "solver '{name}' has no parameter '{key}' (its parameters: {})",
                    known.join(", ")
                ));
            }
        }
        Ok(())
    }

    /// Checks the parameters are usable; the message names the one at fault.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let name = self.name();
        match *self {
            Self::Broyden { .. } => Ok(()),
            Self::Anderson { lambda, beta, .. } => {
                if !(lambda.is_finite() && lambda >= 0.0) {
                    return Err(format!("{name}.lambda = {lambda} must be finite and ≥ 0"));
                }
                if !(beta > 0.0 && beta <= 1.0) {
                    return Err(format!("{name}.beta = {beta} must be in (0, 1]"));
                }
                Ok(())
            }
            Self::FixedPoint { tau } if !(tau > 0.0 && tau <= 1.0) => {
                Err(format!("{name}.tau = {tau} must be in (0, 1]"))
            }
            Self::FixedPoint { .. } => Ok(()),
        }
    }

    /// Runs this solver from `z0`.
    pub fn solve(
        &self,
        f: &mut dyn FixedPointMap,
        z0: &Tensor,
        opts: &SolverOptions,
    ) -> Result<Solution> {
        match *self {
            Self::Broyden {
                max_pairs,
                max_history_bytes,
            } => broyden::solve(
                f,
                z0,
                opts,
                &broyden::BroydenOptions {
                    max_pairs,
                    max_history_bytes,
                },
            ),
            Self::Anderson { m, lambda, beta } => {
                anderson::solve(f, z0, opts, &anderson::AndersonOptions { m, lambda, beta })
            }
            Self::FixedPoint { tau } => fixed_point::solve(f, z0, opts, tau),
        }
    }
}

impl fmt::Display for SolverKind {
    /// The name, with the parameters that differ from the defaults: `broyden(max_pairs = 8)`.
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(self.name())?;
        let defaults = Self::from_name(self.name())
            .map(|d| d.parameters())
            .unwrap_or_default();
        let changed: Vec<String> = self
            .parameters()
            .into_iter()
            .filter(|p| !defaults.contains(p))
            .map(|(key, value)| match value {
                Parameter::Count(n) => format!("{key} = {n}"),
                Parameter::Real(x) => format!("{key} = {x}"),
            })
            .collect();
        if !changed.is_empty() {
            write!(f, "({})", changed.join(", "))?;
        }
        Ok(())
    }
}

impl Serialize for SolverKind {
    /// A bare name when every parameter is the default, else a table.
    fn serialize<S: Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        if Self::from_name(self.name()).as_ref() == Some(self) {
            return s.serialize_str(self.name());
        }
        let parameters = self.parameters();
        let mut map = s.serialize_map(Some(parameters.len() + 1))?;
        map.serialize_entry("kind", self.name())?;
        for (key, value) in parameters {
            match value {
                Parameter::Count(n) => map.serialize_entry(key, &(n as u64))?,
                Parameter::Real(x) => map.serialize_entry(key, &x)?,
            }
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for SolverKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct KindVisitor;
        impl<'de> Visitor<'de> for KindVisitor {
            type Value = SolverKind;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(
                    f,
                    "a solver name ({NAMES}) or a table with `kind` and its parameters"
                )
            }

            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<SolverKind, E> {
                SolverKind::from_name(v)
                    .ok_or_else(|| E::custom(format!("unknown solver '{v}'; expected {NAMES}")))
            }

            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<SolverKind, A::Error> {
                let mut kind: Option<String> = None;
                let mut parameters: Vec<(String, f64)> = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "kind" {
                        kind = Some(map.next_value()?);
                    } else {
                        let value = map.next_value::<f64>()?;
                        parameters.push((key, value));
                    }
                }
                let kind = kind.ok_or_else(|| de::Error::missing_field("kind"))?;
                let mut solver = self.visit_str::<A::Error>(&kind)?;
                for (key, value) in parameters {
                    solver.set(&key, value).map_err(de::Error::custom)?;
                }
                solver.validate().map_err(de::Error::custom)?;
                Ok(solver)
            }
        }
        d.deserialize_any(KindVisitor)
    }
}

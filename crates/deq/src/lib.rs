//! The DEQ engine: fixed-point solvers, implicit backward and Jacobian tools for a batched state
//! (B, D). It knows nothing about images; f is any closure or [`solver::FixedPointMap`].

pub mod backward;
pub mod jacobian;
pub mod solver;

pub use backward::{adjoint, BackwardMode, GraphVjp};
pub use solver::{
    Coupling, FixedPointMap, SampleStatus, Solution, SolverKind, SolverOptions, SolverStats,
    StopMode,
};

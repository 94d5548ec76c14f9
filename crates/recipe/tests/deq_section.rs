//! The `[deq]` section reaches the engine typed: solver names or tables with parameters, every
//! solver option settable, bad values refused with the key named.

use mdeq_recipe::presets::PRESETS;
use mdeq_recipe::{ConfigError, ExperimentConfig, SolverKind};

/// cifar-tiny's TOML with its `[deq]` solver lines replaced by `deq_lines`.
fn with_solvers(deq_lines: &str) -> String {
    PRESETS[0]
        .1
        .replace("f_solver = \"broyden\"\nb_solver = \"broyden\"", deq_lines)
}

fn parse(text: &str) -> Result<ExperimentConfig, ConfigError> {
    ExperimentConfig::from_toml_str(text, "x.toml")
}

#[test]
fn solver_tables_set_every_parameter_and_reach_the_runtime() -> mdeq_testkit::Result {
    let cfg = parse(&with_solvers(
        "f_solver = { kind = \"broyden\", max_pairs = 8, max_history_bytes = 100000000 }\n\
         b_solver = { kind = \"anderson\", m = 4, lambda = 0.01, beta = 0.5 }\n\
         fallback = [\"fixed_point\", { kind = \"fixed_point\", tau = 0.25 }]",
    ))?;
    let rt = cfg.deq.runtime();
    assert_eq!(
        rt.forward_chain,
        vec![
            SolverKind::Broyden {
                max_pairs: Some(8),
                max_history_bytes: Some(100_000_000),
            },
            SolverKind::FixedPoint { tau: 1.0 },
            SolverKind::FixedPoint { tau: 0.25 },
        ]
    );
    assert_eq!(
        rt.backward_solver,
        SolverKind::Anderson {
            m: 4,
            lambda: 0.01,
            beta: 0.5
        }
    );
    assert_eq!((rt.forward.threshold, rt.backward.threshold), (18, 20));
    // The table survives the TOML a checkpoint embeds; default parameters print as a bare name.
    let text = cfg.to_toml_string();
    assert_eq!(parse(&text)?, cfg);
    assert!(text.contains("max_history_bytes = 100000000"), "{text}");
    assert!(text.contains("\"fixed_point\""), "{text}");
    Ok(())
}

#[test]
fn solver_mistakes_are_errors_naming_the_solver_and_key() -> mdeq_testkit::Result {
    for (lines, expected) in [
        ("f_solver = \"broyd\"", "unknown solver 'broyd'"),
        (
            "f_solver = { kind = \"broyden\", m = 3 }",
            "solver 'broyden' has no parameter 'm'",
        ),
        (
            "f_solver = { kind = \"broyden\", max_pairs = 0 }",
            "max_pairs = 0 must be a positive whole number",
        ),
        (
            "f_solver = { kind = \"broyden\", max_pairs = 2.5 }",
            "max_pairs = 2.5 must be a positive whole number",
        ),
        ("f_solver = { max_pairs = 3 }", "missing field `kind`"),
        (
            "b_solver = { kind = \"fixed_point\", tau = 1.5 }",
            "fixed_point.tau = 1.5 must be in (0, 1]",
        ),
    ] {
        let err = mdeq_testkit::error_text(lines, parse(&with_solvers(lines)))?;
        assert!(err.contains(expected), "{lines}: {err}");
    }
    Ok(())
}

#[test]
fn solver_settings_out_of_range_are_refused_with_the_key_named() -> mdeq_testkit::Result {
    let base = PRESETS[0].1;
    for (from, to, expected) in [
        ("eps = 0.001", "eps = nan", "deq.eps = NaN"),
        ("eps = 0.001", "eps = -1.0", "deq.eps = -1"),
        ("f_thres = 18", "f_thres = 0", "deq.f_thres = 0"),
        (
            "b_thres = 20",
            "b_thres = 1000000000",
            "deq.b_thres = 1000000000",
        ),
        (
            "rand_f_thres_delta = 2",
            "rand_f_thres_delta = 18",
            "deq.rand_f_thres_delta = 18",
        ),
    ] {
        assert!(base.contains(from), "the preset has no '{from}'");
        let err = mdeq_testkit::error_text(to, parse(&base.replace(from, to)))?;
        assert!(err.contains(expected), "{to}: {err}");
    }
    Ok(())
}

#[test]
fn omitted_deq_keys_take_the_one_default() -> mdeq_testkit::Result {
    // Without the solver lines, the section falls back to `DeqConfig::default()`.
    let cfg = parse(&with_solvers(""))?;
    let defaults = mdeq_recipe::DeqConfig::default();
    assert_eq!(cfg.deq.f_solver, defaults.f_solver);
    assert_eq!(cfg.deq.b_solver, SolverKind::BROYDEN);
    assert_eq!(cfg.deq.compact_batch, defaults.compact_batch);
    Ok(())
}

//! Data-parallel training under `mpirun`, driven as a user would: two ranks on this machine
//! against one process, on the Fashion-MNIST recipe. It needs a build with `--features mpi`
//! and Open MPI's `mpirun` (apt-get install libopenmpi-dev openmpi-bin); without either it says
//! so and passes, and CI runs it with both (.ci/run).

use mdeq_testkit::{scratch_dir, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Why this machine cannot run the test, if it cannot.
fn unavailable() -> Option<String> {
    if !cfg!(feature = "mpi") {
        return Some("this test binary was built without `--features mpi`".into());
    }
    if Command::new("mpirun").arg("--version").output().is_err() {
        return Some("no mpirun on PATH (apt-get install openmpi-bin)".into());
    }
    if !Path::new(FASHION_MNIST).exists() {
        return Some(format!(
            "no {FASHION_MNIST} (apt-get install dataset-fashion-mnist)"
        ));
    }
    None
}

macro_rules! require_mpi {
    () => {
        if let Some(why) = unavailable() {
            eprintln!("skipped: {why}");
            return Ok(());
        }
    };
}

fn mdeq() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mdeq"));
    c.env("RAYON_NUM_THREADS", "1");
    c
}

/// `mpirun -np <ranks> mdeq …`: one core and one thread per rank.
fn mpirun(ranks: usize) -> Command {
    let mut c = Command::new("mpirun");
    c.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .args(["--oversubscribe", "-np", &ranks.to_string()])
        .args(["-x", "RAYON_NUM_THREADS=1"])
        .arg(env!("CARGO_BIN_EXE_mdeq"));
    c
}

/// The main recipe with its last 3 of 20 steps in DEQ mode, each with the Jacobian penalty, and
/// the implicit backward in place of its phantom one, so that the unrolled cell, the Broyden
/// solves of both directions, dropout masks and penalty probes all meet the split batch. Not more DEQ steps: training in DEQ mode amplifies
/// rounding-level differences about tenfold per step (one process with the native and with
/// the portable kernels, float64, differs by 1e-4 in its weights after 10 DEQ steps), so no two
/// runs that sum in different orders agree to 1e-5 for long.
fn recipe(dir: &Path, batch_norm: &str) -> mdeq_testkit::Result<PathBuf> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/fashion-mnist-tiny.toml"),
    )?;
    let text = text
        .replace("pretrain_steps = 940", "pretrain_steps = 17")
        .replace("backward = { mode = \"phantom\", k = 5, tau = 0.6 }\n", "")
        .replace(
            "jac_loss_weight = 2.0\njac_loss_freq = 0.2",
            &format!("jac_loss_weight = 1.0\njac_loss_freq = 1.0\nbatch_norm = \"{batch_norm}\""),
        );
    anyhow_ensure(
        text.contains("pretrain_steps = 17")
            && text.contains("jac_loss_freq = 1.0")
            && !text.contains("backward ="),
        "the recipe's pretrain_steps, Jacobian penalty or backward moved",
    )?;
    let path = dir.join(format!("recipe-{batch_norm}.toml"));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn anyhow_ensure(ok: bool, what: &str) -> mdeq_testkit::Result {
    mdeq_testkit::ensure!(ok, "{what}");
    Ok(())
}

/// The flags of every run. Float64: a float32 training step is ill-conditioned at the 1e-4
/// level here (one process with the native and the portable kernels differs that much after
/// one step), so two float32 runs that merely sum in another order cannot agree to 1e-5; in
/// float64 the same amplification leaves ~1e-12.
fn train_args(recipe: &Path, out: &Path, steps: usize) -> Vec<String> {
    [
        "train",
        "--config",
        &recipe.display().to_string(),
        "--out",
        &out.display().to_string(),
        "--max-steps",
        &steps.to_string(),
        "--batch-size",
        "64",
        "--log-every",
        "1",
        "--eval-limit",
        "256",
        "--seed",
        "5",
        "--device",
        "cpu",
        "--dtype",
        "f64",
    ]
    .map(String::from)
    .to_vec()
}

fn run(mut c: Command, what: &str) -> mdeq_testkit::Result<String> {
    let out = c.output().with_context(|| format!("starting {what}"))?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    mdeq_testkit::ensure!(out.status.success(), "{what} failed:\n{stderr}");
    Ok(stderr)
}

/// Per-step losses from a run's metrics.jsonl.
fn losses(out: &Path) -> mdeq_testkit::Result<Vec<f64>> {
    let text = std::fs::read_to_string(out.join("metrics.jsonl"))?;
    let mut v = Vec::new();
    for line in text.lines() {
        let json: Value = serde_json::from_str(line)?;
        if json["kind"] == "step" {
            v.push(json["loss"].as_f64().context("a step without loss")?);
        }
    }
    Ok(v)
}

fn weights(out: &Path) -> mdeq_testkit::Result<Vec<(String, candle_core::Tensor)>> {
    let path = out.join("checkpoint-last.safetensors");
    let mut v: Vec<_> = candle_core::safetensors::load(&path, &candle_core::Device::Cpu)?
        .into_iter()
        .filter(|(k, _)| {
            !k.starts_with("optim.") && !k.contains("running_") && !k.contains("num_batches")
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(v)
}

/// Two runs agree: per-step losses within 1e-5 relative, every parameter within 1e-5 of the
/// reference's largest magnitude.
fn assert_same_run(got: &Path, want: &Path, what: &str) -> mdeq_testkit::Result {
    let (a, b) = (losses(got)?, losses(want)?);
    mdeq_testkit::ensure!(
        a.len() == b.len() && a.len() == 20,
        "{what}: {} vs {} steps",
        a.len(),
        b.len()
    );
    for (step, (x, y)) in a.iter().zip(&b).enumerate() {
        let rel = (x - y).abs() / y.abs();
        mdeq_testkit::ensure!(
            rel <= 1e-5,
            "{what}: step {} loss {x} vs {y} ({rel:.1e})",
            step + 1
        );
    }
    let (wa, wb) = (weights(got)?, weights(want)?);
    mdeq_testkit::ensure!(
        wa.len() == wb.len() && !wa.is_empty(),
        "{what}: parameter sets differ"
    );
    for ((ka, ta), (kb, tb)) in wa.iter().zip(&wb) {
        mdeq_testkit::ensure!(ka == kb, "{what}: {ka} vs {kb}");
        let rel = mdeq_testkit::max_rel(ta, tb)?;
        mdeq_testkit::ensure!(rel <= 1e-5, "{what}: {ka} differs by {rel:.1e}");
    }
    Ok(())
}

// Synchronised BatchNorm, sharded batches, global dropout masks and probes, and the averaged
// gradient make two ranks of 32 rows the same run as one process of 64.
#[test]
fn two_ranks_train_as_one_process() -> mdeq_testkit::Result {
    require_mpi!();
    let dir = scratch_dir("mpi-global")?;
    let config = recipe(&dir, "global")?;
    let mut one = mdeq();
    one.args(train_args(&config, &dir.join("one"), 20));
    run(one, "one process")?;
    let mut two = mpirun(2);
    two.args(train_args(&config, &dir.join("two"), 20));
    let stderr = run(two, "mpirun -np 2")?;
    mdeq_testkit::ensure!(stderr.contains("data-parallel over 2 ranks"), "{stderr}");
    assert_same_run(&dir.join("two"), &dir.join("one"), "2 ranks vs 1 process")?;
    // Rank 0 alone wrote: one metrics file, one set of checkpoints, one events file.
    let events = std::fs::read_dir(dir.join("two"))?
        .filter(|e| {
            e.as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().contains("tfevents"))
        })
        .count();
    mdeq_testkit::ensure!(events == 1, "{events} TensorBoard event files");
    Ok(())
}

// Per-replica BatchNorm (the official DataParallel behaviour) over two ranks is one process
// whose batch is processed in two micro-batches, each normalised by its own statistics.
#[test]
fn per_replica_batch_norm_equals_two_micro_batches() -> mdeq_testkit::Result {
    require_mpi!();
    let dir = scratch_dir("mpi-replica")?;
    let config = recipe(&dir, "per_replica")?;
    let mut one = mdeq();
    one.args(train_args(&config, &dir.join("one"), 20))
        .args(["--micro-batches", "2"]);
    run(one, "one process, two micro-batches")?;
    let mut two = mpirun(2);
    two.args(train_args(&config, &dir.join("two"), 20));
    run(two, "mpirun -np 2")?;
    assert_same_run(&dir.join("two"), &dir.join("one"), "per-replica BatchNorm")
}

// A run of two ranks resumes in one process, where it left off.
#[test]
fn a_two_rank_run_resumes_in_one_process() -> mdeq_testkit::Result {
    require_mpi!();
    let dir = scratch_dir("mpi-resume")?;
    let config = recipe(&dir, "global")?;
    let mut straight = mdeq();
    straight.args(train_args(&config, &dir.join("straight"), 20));
    run(straight, "one process")?;
    let mut two = mpirun(2);
    two.args(train_args(&config, &dir.join("split"), 12));
    run(two, "mpirun -np 2, 12 steps")?;
    let mut rest = mdeq();
    rest.args(train_args(&config, &dir.join("split"), 20))
        .arg("--resume");
    let stderr = run(rest, "one process resuming")?;
    mdeq_testkit::ensure!(stderr.contains("at step 12"), "{stderr}");
    assert_same_run(
        &dir.join("split"),
        &dir.join("straight"),
        "resumed with 1 of 2 ranks",
    )
}

// A rank that dies (SIGKILL: out of memory, a lost node) ends the job with a message naming it,
// well within 30 s, instead of leaving the other rank waiting in a collective.
#[test]
fn a_killed_rank_ends_the_job_with_a_clear_error() -> mdeq_testkit::Result {
    require_mpi!();
    let dir = scratch_dir("mpi-kill")?;
    let config = recipe(&dir, "global")?;
    let out = dir.join("run");
    let mut job = mpirun(2);
    job.args(train_args(&config, &out, 100_000))
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = job.spawn()?;
    // Wait until training runs (a logged step), then kill one rank.
    let started = Instant::now();
    while losses(&out).map_or(true, |l| l.is_empty()) {
        mdeq_testkit::ensure!(
            started.elapsed() < Duration::from_secs(120),
            "no step logged in 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ranks =
        std::fs::read_to_string(format!("/proc/{}/task/{}/children", child.id(), child.id()))?;
    let victim = ranks
        .split_whitespace()
        .last()
        .context("mpirun has no children")?;
    let killed = Instant::now();
    Command::new("kill").args(["-KILL", victim]).status()?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if killed.elapsed() > Duration::from_secs(30) {
            child.kill()?;
            mdeq_testkit::bail!("the job still ran 30 s after one rank was killed");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().context("stderr")?, &mut stderr)?;
    mdeq_testkit::ensure!(
        !status.success(),
        "the job succeeded after a rank was killed"
    );
    mdeq_testkit::ensure!(
        stderr.contains("rank") && (stderr.contains("signal 9") || stderr.contains("Killed")),
        "no message names the killed rank:\n{stderr}"
    );
    eprintln!(
        "job ended {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    Ok(())
}

// An error on one rank (here rank 0 cannot create its output folder; the other rank is already
// waiting for it in a collective) ends every rank at once with a message naming the rank and
// the cause, instead of a hang.
#[test]
fn an_error_on_one_rank_ends_every_rank_naming_it() -> mdeq_testkit::Result {
    require_mpi!();
    let dir = scratch_dir("mpi-error")?;
    let config = recipe(&dir, "global")?;
    let blocker = dir.join("not-a-folder");
    std::fs::write(&blocker, "a file where the output folder should go")?;
    let mut job = mpirun(2);
    job.args(train_args(&config, &blocker.join("run"), 20));
    let started = Instant::now();
    let out = job.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    mdeq_testkit::ensure!(!out.status.success(), "the job succeeded:\n{stderr}");
    mdeq_testkit::ensure!(
        stderr.contains("error on rank 0 of 2") && stderr.contains("not-a-folder"),
        "no message names the rank and the folder:\n{stderr}"
    );
    mdeq_testkit::ensure!(
        started.elapsed() < Duration::from_secs(30),
        "the job took {:.0} s to end",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

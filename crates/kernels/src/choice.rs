//! Which kernels run: ours (`native`: the fast CPU kernels on the CPU) or `portable`, exactly the
//! composition of candle's stock ops that every other device (CUDA) runs. `portable` on the CPU
//! is how the GPU code path is tested on a machine without a GPU.
//!
//! The choice is made once per command (`mdeq … --kernels`) and holds for the thread that runs
//! it: the kernels are free functions called from deep inside the model's layers, so it travels
//! as scoped thread state ([`with_kernels`]) rather than as an argument through every layer. Each
//! entry point decides on its calling thread (the model, the solvers and the training step run on
//! one), so two tests on two threads may use two choices at once. Without a scope the process
//! default applies: `MDEQ_KERNELS=native|portable`, else `native`.

use std::cell::Cell;
use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

/// The kernel family the entry points of this crate dispatch to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum KernelChoice {
    /// The fastest kernels for the device: this crate's CPU kernels on the CPU, candle's ops
    /// elsewhere.
    #[default]
    Native,
    /// candle's stock ops on every device: on the CPU, the very composition the CUDA path runs.
    Portable,
}

impl KernelChoice {
    /// Every choice, for help texts and tests.
    pub const ALL: [KernelChoice; 2] = [KernelChoice::Native, KernelChoice::Portable];

    /// The choice's name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Native => "native",
            Self::Portable => "portable",
        }
    }
}

impl fmt::Display for KernelChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for KernelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown kernel choice {s:?} (expected native or portable)"))
    }
}

/// The environment variable that sets the process default.
pub const KERNELS_ENV: &str = "MDEQ_KERNELS";

thread_local! {
    static SCOPED: Cell<Option<KernelChoice>> = const { Cell::new(None) };
}

/// The process default: `MDEQ_KERNELS`, read once; an unknown value is reported once and
/// ignored rather than silently taken for `native`.
fn process_default() -> KernelChoice {
    static DEFAULT: OnceLock<KernelChoice> = OnceLock::new();
    *DEFAULT.get_or_init(|| match std::env::var(KERNELS_ENV) {
        Ok(v) => v.parse().unwrap_or_else(|e| {
            eprintln!("warning: {KERNELS_ENV}: {e}; using native kernels");
            KernelChoice::Native
        }),
        Err(_) => KernelChoice::Native,
    })
}

/// The kernels that entry points called on this thread dispatch to now.
pub fn active_kernels() -> KernelChoice {
    SCOPED.with(|c| c.get()).unwrap_or_else(process_default)
}

/// Runs `f` with `choice` active on this thread, and restores what was active before (also when
/// `f` panics).
pub fn with_kernels<R>(choice: KernelChoice, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<KernelChoice>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SCOPED.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SCOPED.with(|c| c.replace(Some(choice))));
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_sets_the_choice_for_its_thread_only_and_restores_it() {
        let outside = active_kernels();
        with_kernels(KernelChoice::Portable, || {
            assert_eq!(active_kernels(), KernelChoice::Portable);
            with_kernels(KernelChoice::Native, || {
                assert_eq!(active_kernels(), KernelChoice::Native)
            });
            assert_eq!(active_kernels(), KernelChoice::Portable);
            let other = std::thread::spawn(active_kernels).join().unwrap();
            assert_eq!(other, outside, "another thread keeps the process default");
        });
        assert_eq!(active_kernels(), outside);
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for k in KernelChoice::ALL {
            assert_eq!(k.name().parse::<KernelChoice>(), Ok(k));
        }
        let e = "cuda".parse::<KernelChoice>().unwrap_err();
        assert!(e.contains("\"cuda\"") && e.contains("portable"), "{e}");
    }
}

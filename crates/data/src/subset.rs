//! Part of a dataset: the validation samples held out of a training set, and what remains.

use crate::{DataError, Dataset, Sample};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::sync::Arc;

/// The samples `indices` of `inner`, in that order.
pub struct Subset {
    inner: Arc<dyn Dataset>,
    indices: Vec<usize>,
}

impl Subset {
    /// The samples `indices` of `inner` (each below its length).
    pub fn new(inner: Arc<dyn Dataset>, indices: Vec<usize>) -> Self {
        debug_assert!(indices.iter().all(|&i| i < inner.len()));
        Self { inner, indices }
    }
}

impl Dataset for Subset {
    fn len(&self) -> usize {
        self.indices.len()
    }

    fn channels(&self) -> usize {
        self.inner.channels()
    }

    fn num_classes(&self) -> usize {
        self.inner.num_classes()
    }

    fn get(&self, i: usize) -> Result<Sample, DataError> {
        self.inner.get(self.indices[i])
    }

    fn describe(&self, i: usize) -> String {
        self.inner.describe(self.indices[i])
    }
}

/// Seed of the held-out split: fixed, so that every run of a recipe, whatever its training
/// seed, validates on the same samples and runs compare.
pub const HOLDOUT_SEED: u64 = 0x005e_ed0f_7a11;

/// Splits `0..n` into the `held_out` samples of a seeded shuffle and the rest, each in
/// ascending order: (kept, held out).
pub fn holdout(n: usize, held_out: usize) -> (Vec<usize>, Vec<usize>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(HOLDOUT_SEED));
    let (held, kept) = order.split_at(held_out.min(n));
    let (mut held, mut kept) = (held.to_vec(), kept.to_vec());
    held.sort_unstable();
    kept.sort_unstable();
    (kept, held)
}

#[cfg(test)]
mod tests {
    use super::holdout;

    #[test]
    fn the_split_is_a_partition_fixed_across_calls() {
        let (kept, held) = holdout(100, 10);
        assert_eq!((kept.len(), held.len()), (90, 10));
        let mut all: Vec<usize> = kept.iter().chain(&held).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..100).collect::<Vec<_>>());
        assert_eq!(holdout(100, 10).1, held);
        assert_ne!(
            held,
            (0..10).collect::<Vec<_>>(),
            "held-out samples are drawn, not the first"
        );
    }
}

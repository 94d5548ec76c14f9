//! Each rank's share of a global batch: the rows a single process would have given the same
//! samples, cut into `size` equal consecutive parts, so that N ranks together see exactly what
//! one process sees, step for step.

use std::ops::Range;

/// Part `part` of `parts` equal parts of every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Which part (the rank).
    pub part: usize,
    /// How many parts (the world size).
    pub parts: usize,
}

impl Shard {
    /// The whole batch (a single process).
    pub const WHOLE: Shard = Shard { part: 0, parts: 1 };

    /// Part `part` of `parts`.
    pub fn new(part: usize, parts: usize) -> Self {
        assert!(parts > 0 && part < parts, "shard {part} of {parts}");
        Self { part, parts }
    }

    /// The rows of a batch of `rows` that are this part's, or why the batch cannot be split
    /// evenly (ranks given unequal rows would weight their samples unequally in the averaged
    /// gradient and in BatchNorm's statistics).
    pub fn rows(&self, rows: usize) -> Result<Range<usize>, String> {
        if !rows.is_multiple_of(self.parts) {
            return Err(format!(
                "a batch of {rows} samples does not split evenly over {} ranks",
                self.parts
            ));
        }
        let each = rows / self.parts;
        Ok(self.part * each..(self.part + 1) * each)
    }
}

#[cfg(test)]
mod tests {
    use super::Shard;

    #[test]
    fn parts_tile_the_batch_in_order() {
        let parts: Vec<_> = (0..4).map(|r| Shard::new(r, 4).rows(64).unwrap()).collect();
        assert_eq!(parts, vec![0..16, 16..32, 32..48, 48..64]);
        assert_eq!(Shard::WHOLE.rows(7).unwrap(), 0..7);
    }

    #[test]
    fn an_uneven_batch_is_an_error_naming_both_numbers() {
        let e = Shard::new(0, 3).rows(64).unwrap_err();
        assert!(e.contains("64") && e.contains("3 ranks"), "{e}");
    }
}

//! The gradient all-reduce of a training step: every rank's gradients concatenated into a few
//! flat buckets, each summed over the ranks in one collective call, divided by the world size
//! and cut back into the parameters' shapes — a handful of large messages per step instead of
//! one per tensor, which is what keeps latency out of the step.

use crate::collective::Reduce;
use crate::world::World;
use candle_core::{Result, Tensor};
use std::time::Instant;

/// The largest bucket, in bytes (PyTorch DDP's default bucket size).
pub const BUCKET_BYTES: usize = 25 << 20;

/// What one gradient all-reduce moved and how long it took.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct AllReduceStats {
    /// Bytes all-reduced (each rank's contribution).
    pub bytes: usize,
    /// Collective calls made (buckets).
    pub calls: usize,
    /// Wall time of the calls, including concatenation and splitting.
    pub seconds: f64,
}

/// Replaces every gradient by its mean over the ranks. A parameter without a gradient (None)
/// has none on every rank (the ranks run the same graph) and is left alone. Buckets hold whole
/// tensors of at most `bucket_bytes` together (a larger tensor is a bucket of its own).
pub fn average_gradients(
    world: &World,
    grads: &mut [Option<Tensor>],
    bucket_bytes: usize,
) -> Result<AllReduceStats> {
    let mut stats = AllReduceStats::default();
    if !world.is_distributed() {
        return Ok(stats);
    }
    let started = Instant::now();
    let scale = 1.0 / world.size() as f64;
    let present: Vec<usize> = (0..grads.len()).filter(|&i| grads[i].is_some()).collect();
    let mut start = 0;
    while start < present.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < present.len() {
            let g = grads[present[end]].as_ref().expect("present");
            let size = g.elem_count() * g.dtype().size_in_bytes();
            if end > start && bytes + size > bucket_bytes {
                break;
            }
            bytes += size;
            end += 1;
        }
        let members = &present[start..end];
        let flat: Vec<Tensor> = members
            .iter()
            .map(|&i| grads[i].as_ref().expect("present").flatten_all())
            .collect::<Result<_>>()?;
        let summed = world.all_reduce(&Tensor::cat(&flat, 0)?, Reduce::Sum)?;
        let mean = (summed * scale)?;
        let mut offset = 0;
        for &i in members {
            let g = grads[i].as_ref().expect("present");
            let n = g.elem_count();
            let shape = g.shape().clone();
            grads[i] = Some(mean.narrow(0, offset, n)?.reshape(shape)?);
            offset += n;
        }
        stats.bytes += bytes;
        stats.calls += 1;
        start = end;
    }
    stats.seconds = started.elapsed().as_secs_f64();
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::average_gradients;
    use crate::testing::Copies;
    use crate::World;
    use candle_core::{DType, Device, Tensor};
    use std::sync::Arc;

    // Three ranks that all hold the same gradients sum to three times them, so the mean is the
    // gradient itself: what comes back must be each input, in its own shape and place.
    #[test]
    fn buckets_cut_back_into_every_tensor_in_place() -> mdeq_testkit::Result {
        let copies = Arc::new(Copies::new(3));
        let world = World::new(0, 3, 0, copies.clone());
        let dev = Device::Cpu;
        let f32_values = |t: Tensor| t.to_dtype(DType::F32).map(Some);
        let originals = vec![
            f32_values(mdeq_testkit::hashed((4, 3), 1)?)?,
            None,
            f32_values(mdeq_testkit::hashed(5, 2)?)?,
            f32_values(mdeq_testkit::hashed((2, 2, 2), 3)?)?,
            Some(Tensor::new(&[7f32], &dev)?),
        ];
        let mut grads = originals.clone();
        // 64 bytes: 12 floats (48 B) + 5 floats would be 68 B, so the first bucket is one tensor.
        let stats = average_gradients(&world, &mut grads, 64)?;
        assert_eq!(stats.calls, 2, "buckets [12], [5, 8, 1] floats");
        assert_eq!(copies.calls(), 2);
        assert_eq!(stats.bytes, (12 + 5 + 8 + 1) * 4);
        for (got, want) in grads.iter().zip(&originals) {
            match (got, want) {
                (None, None) => {}
                (Some(g), Some(w)) => {
                    assert_eq!(g.dims(), w.dims());
                    assert!(mdeq_testkit::max_rel(g, w)? < 1e-6);
                }
                _ => panic!("a gradient appeared or vanished"),
            }
        }
        Ok(())
    }

    #[test]
    fn a_single_process_makes_no_call() -> mdeq_testkit::Result {
        let mut grads = vec![Some(mdeq_testkit::hashed(3, 1)?)];
        let stats = average_gradients(&World::single(), &mut grads, 1 << 20)?;
        assert_eq!(stats.calls, 0);
        Ok(())
    }
}

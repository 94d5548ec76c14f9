//! Batch compaction: once some samples have converged (and are frozen), f is evaluated on the
//! remaining rows only, when the map says its rows do not interact
//! ([`FixedPointMap::apply_rows`]). Frozen rows take the value f had at their frozen iterate,
//! which is where the solvers keep them.

use super::FixedPointMap;
use candle_core::{Device, Result, Tensor};

/// Row indices as a u32 tensor (the index type candle's `index_select` takes).
fn row_index(rows: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
    Tensor::from_vec(v, rows.len(), device)
}

/// f(x) for the whole batch. `previous` is f at the previous iterate, whose frozen rows equal
/// this iterate's; when given and the map can be restricted, only the `active` rows are
/// evaluated. Returns f(x) and the number of rows f was evaluated on.
pub fn evaluate(
    f: &mut dyn FixedPointMap,
    x: &Tensor,
    active: &[bool],
    previous: Option<&Tensor>,
) -> Result<(Tensor, usize)> {
    let batch = active.len();
    let (live, frozen): (Vec<usize>, Vec<usize>) = (0..batch).partition(|&b| active[b]);
    let previous = match previous {
        Some(p) if !frozen.is_empty() => p,
        _ => return Ok((f.apply(x)?, batch)),
    };
    if live.is_empty() {
        return Ok((previous.clone(), 0));
    }
    let device = x.device();
    let live_index = row_index(&live, device)?;
    let Some(f_live) = f.apply_rows(&x.index_select(&live_index, 0)?, &live_index)? else {
        return Ok((f.apply(x)?, batch));
    };
    // Stack [f(live rows); previous frozen rows] and put every row back in its place.
    let f_frozen = previous.index_select(&row_index(&frozen, device)?, 0)?;
    let stacked = Tensor::cat(&[&f_live, &f_frozen], 0)?;
    let mut place = vec![0usize; batch];
    for (k, &b) in live.iter().chain(&frozen).enumerate() {
        place[b] = k;
    }
    Ok((
        stacked.index_select(&row_index(&place, device)?, 0)?,
        live.len(),
    ))
}

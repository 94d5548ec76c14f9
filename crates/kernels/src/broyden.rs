//! One limited-memory Broyden update (reference §3.2) in one fused pass per sample: from the
//! step's two iterates and residuals and the stored pairs, the new pair (u, vᵀ) and the next
//! iterate. Composed from candle ops the same algebra is about twenty full passes over the
//! (B, D) state, each a fresh tensor on one thread — on the TINY model that bookkeeping cost more
//! than half a cell evaluation per solver step. Here each sample's row is one work item, its
//! history vectors are read twice (dot products, then updates), and every dot product is
//! accumulated in float64.

use crate::element::{check_operands, fast_path, with_cpu_slices, Element};
use crate::low_rank::{low_rank_apply, low_rank_apply_many};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use crate::reduce::dot;
use candle_core::{DType, Device, Result, Tensor};
use multiversion::multiversion;

/// What happens to the history when the new pair is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryChange {
    /// The pair is appended.
    Append,
    /// The pair replaces the oldest (the history is at its cap).
    ReplaceOldest,
    /// No history is kept (cap 0): the operator stays −I.
    Discard,
}

/// The step's iterates and residuals: x (previous), x_new, g = f(x) − x and g_new.
#[derive(Debug, Clone, Copy)]
pub struct BroydenStep<'a> {
    /// The previous iterate.
    pub x: &'a Tensor,
    /// The current iterate.
    pub x_new: &'a Tensor,
    /// The previous residual.
    pub g: &'a Tensor,
    /// The current residual.
    pub g_new: &'a Tensor,
}

/// The stored pairs of M = −I + Σ_k u_k v_kᵀ (oldest first), and what storing the new pair does.
#[derive(Debug, Clone, Copy)]
pub struct Pairs<'a> {
    /// u_k.
    pub us: &'a [&'a Tensor],
    /// v_k.
    pub vs: &'a [&'a Tensor],
    /// Append, replace the oldest, or keep no history.
    pub change: HistoryChange,
}

/// The new pair and the next iterate.
#[derive(Debug, Clone)]
pub struct BroydenUpdate {
    /// u = (Δx − M Δg) / ⟨vᵀ, Δg⟩, NaN entries zeroed.
    pub u: Tensor,
    /// vᵀ = Δxᵀ M, NaN entries zeroed.
    pub vt: Tensor,
    /// x_new − mask ⊙ M' g_new, with M' the operator after the history change.
    pub x_next: Tensor,
}

/// One Broyden update of the inverse-Jacobian estimate held by `pairs`; `mask` (B, 1) is 1 for
/// the samples still moving, 0 for frozen ones.
pub fn broyden_update(step: BroydenStep, pairs: Pairs, mask: &Tensor) -> Result<BroydenUpdate> {
    let Pairs { us, vs, change } = pairs;
    let x = step.x;
    let operands = [step.x_new, step.g, step.g_new].into_iter();
    let (rows, d) = check_operands(
        "broyden_update",
        x,
        operands.chain(us.iter().copied()).chain(vs.iter().copied()),
    )?;
    if us.len() != vs.len() || mask.dims() != [rows, 1] {
        candle_core::bail!(
            "broyden_update: {} u, {} v, mask {:?} for {rows} rows",
            us.len(),
            vs.len(),
            mask.dims()
        );
    }
    if change == HistoryChange::ReplaceOldest && us.is_empty() {
        candle_core::bail!("broyden_update: no oldest pair to replace");
    }
    if !fast_path(x) {
        return composed(step, pairs, mask);
    }
    let keep: Vec<bool> = mask
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .iter()
        .map(|&m| m != 0.0)
        .collect();
    let all: Vec<Tensor> = [x, step.x_new, step.g, step.g_new]
        .into_iter()
        .chain(us.iter().copied())
        .chain(vs.iter().copied())
        .map(Tensor::contiguous)
        .collect::<Result<_>>()?;
    let refs: Vec<&Tensor> = all.iter().collect();
    let shape = Fused {
        pairs: us.len(),
        rows,
        d,
        change,
        keep: &keep,
    };
    let [u, vt, x_next] = match x.dtype() {
        DType::F32 => with_cpu_slices::<f32, _>(&refs, |s| to_tensors(shape.run(s), rows, d))?,
        _ => with_cpu_slices::<f64, _>(&refs, |s| to_tensors(shape.run(s), rows, d))?,
    }?;
    Ok(BroydenUpdate { u, vt, x_next })
}

/// The same from candle ops: the GPU path, and the reference the fused kernel is tested against.
pub fn composed(step: BroydenStep, pairs: Pairs, mask: &Tensor) -> Result<BroydenUpdate> {
    let Pairs { us, vs, change } = pairs;
    let dot = |a: &Tensor, b: &Tensor| (a * b)?.sum_keepdim(1);
    let nan_to_zero = |t: &Tensor| t.eq(t)?.where_cond(t, &t.zeros_like()?);
    let dx = (step.x_new - step.x)?;
    let dg = (step.g_new - step.g)?;
    // vᵀ = Δxᵀ M = −Δx + Σ (Δx · u_k) v_k; M Δg and M g_new share one pass over the history.
    let vt = low_rank_apply(&dx, vs, us)?;
    let [m_dg, m_g]: [Tensor; 2] = low_rank_apply_many(&[&dg, step.g_new], us, vs)?
        .try_into()
        .map_err(|_| candle_core::Error::Msg("low_rank_apply_many: not two products".into()))?;
    let u = (&dx - m_dg)?.broadcast_div(&dot(&vt, &dg)?)?;
    let (u, vt) = (nan_to_zero(&u)?, nan_to_zero(&vt)?);
    let m_g_next = match change {
        HistoryChange::Append => (m_g + u.broadcast_mul(&dot(&vt, step.g_new)?)?)?,
        HistoryChange::ReplaceOldest => {
            let us: Vec<&Tensor> = us[1..].iter().copied().chain([&u]).collect();
            let vs: Vec<&Tensor> = vs[1..].iter().copied().chain([&vt]).collect();
            low_rank_apply(step.g_new, &us, &vs)?
        }
        HistoryChange::Discard => m_g,
    };
    let x_next = (step.x_new - m_g_next.broadcast_mul(&mask.to_dtype(step.x.dtype())?)?)?;
    Ok(BroydenUpdate { u, vt, x_next })
}

/// The fused kernel's problem size and choices.
struct Fused<'a> {
    pairs: usize,
    rows: usize,
    d: usize,
    change: HistoryChange,
    /// Per row: still moving (mask 1).
    keep: &'a [bool],
}

impl Fused<'_> {
    /// `s` holds x, x_new, g, g_new, then the u's, then the v's.
    fn run<T: Element>(&self, s: &[&[T]]) -> [Vec<T>; 3] {
        let (rows, d, k) = (self.rows, self.d, self.pairs);
        let (x, xn, g, gn) = (s[0], s[1], s[2], s[3]);
        let (us, vs) = (&s[4..4 + k], &s[4 + k..4 + 2 * k]);
        // Every element of the three outputs is written below, row by row.
        let mut outs: [Vec<T>; 3] = [
            uninit_vec(rows * d),
            uninit_vec(rows * d),
            uninit_vec(rows * d),
        ];
        let [pu, pv, px] = outs.each_mut().map(|o| Shared(o.as_mut_ptr()));
        // The pairs that stay in M' (for M' g_new): all, or all but the oldest.
        let first_kept = usize::from(self.change == HistoryChange::ReplaceOldest);
        for_each_chunk(rows, |range| {
            let mut scratch = Scratch {
                dx: vec![T::ZERO; d],
                dg: vec![T::ZERO; d],
                m_dg: vec![T::ZERO; d],
                c_u_dx: vec![0f64; k],
                c_v_dg: vec![0f64; k],
                c_v_g: vec![0f64; k],
            };
            for r in range {
                let span = r * d..(r + 1) * d;
                // SAFETY: row r of every output is owned by this work item.
                let out = unsafe { [pu.slice(r * d, d), pv.slice(r * d, d), px.slice(r * d, d)] };
                let input = [
                    &x[span.clone()],
                    &xn[span.clone()],
                    &g[span.clone()],
                    &gn[span.clone()],
                ];
                let u_rows: Vec<&[T]> = us.iter().map(|u| &u[span.clone()]).collect();
                let v_rows: Vec<&[T]> = vs.iter().map(|v| &v[span.clone()]).collect();
                let coeffs = Coefficients {
                    first_kept,
                    with_new_pair: self.change != HistoryChange::Discard,
                    moving: self.keep[r],
                };
                update_row(input, &u_rows, &v_rows, out, &mut scratch, coeffs);
            }
        });
        outs
    }
}

/// One work item's row buffers.
struct Scratch<T> {
    dx: Vec<T>,
    dg: Vec<T>,
    m_dg: Vec<T>,
    c_u_dx: Vec<f64>,
    c_v_dg: Vec<f64>,
    c_v_g: Vec<f64>,
}

/// Per-row choices of the update.
#[derive(Clone, Copy)]
struct Coefficients {
    /// Index of the oldest pair that stays in M'.
    first_kept: usize,
    /// The new pair enters M'.
    with_new_pair: bool,
    /// The sample still moves (mask 1).
    moving: bool,
}

/// One sample's update: `input` = x, x_new, g, g_new rows; `out` = u, vᵀ, x_next rows.
#[multiversion(targets = "simd")]
fn update_row<T: Element>(
    input: [&[T]; 4],
    us: &[&[T]],
    vs: &[&[T]],
    out: [&mut [T]; 3],
    s: &mut Scratch<T>,
    c: Coefficients,
) {
    let [x, xn, g, gn] = input;
    let [u, vt, xo] = out;
    let d = x.len();
    for i in 0..d {
        s.dx[i] = T::from_f64(xn[i].to_f64() - x[i].to_f64());
        s.dg[i] = T::from_f64(gn[i].to_f64() - g[i].to_f64());
    }
    for (j, (uj, vj)) in us.iter().zip(vs).enumerate() {
        s.c_u_dx[j] = dot(uj, &s.dx);
        s.c_v_dg[j] = dot(vj, &s.dg);
        s.c_v_g[j] = dot(vj, gn);
    }
    // vᵀ = −Δx + Σ ⟨u_j, Δx⟩ v_j;  M Δg = −Δg + Σ ⟨v_j, Δg⟩ u_j;  M' g (into xo) likewise.
    for i in 0..d {
        vt[i] = T::from_f64(-s.dx[i].to_f64());
        s.m_dg[i] = T::from_f64(-s.dg[i].to_f64());
        xo[i] = T::from_f64(-gn[i].to_f64());
    }
    for (j, (uj, vj)) in us.iter().zip(vs).enumerate() {
        let (a, b) = (T::from_f64(s.c_u_dx[j]), T::from_f64(s.c_v_dg[j]));
        let cg = T::from_f64(if j >= c.first_kept { s.c_v_g[j] } else { 0.0 });
        for i in 0..d {
            vt[i] += a * vj[i];
            s.m_dg[i] += b * uj[i];
            xo[i] += cg * uj[i];
        }
    }
    let denom = dot(vt, &s.dg);
    for i in 0..d {
        let ui = (s.dx[i].to_f64() - s.m_dg[i].to_f64()) / denom;
        u[i] = T::from_f64(if ui.is_nan() { 0.0 } else { ui });
        if vt[i].to_f64().is_nan() {
            vt[i] = T::ZERO;
        }
    }
    let c_new = T::from_f64(if c.with_new_pair { dot(vt, gn) } else { 0.0 });
    // x_new + mask·(−M' g): a frozen sample keeps x_new (as x_new + 0·update does, NaN included).
    let m = T::from_f64(if c.moving { 1.0 } else { 0.0 });
    for i in 0..d {
        let mut m_g = xo[i];
        m_g += c_new * u[i];
        xo[i] = T::from_f64(xn[i].to_f64() - (m_g * m).to_f64());
    }
}

fn to_tensors<T: candle_core::WithDType>(
    outs: [Vec<T>; 3],
    rows: usize,
    d: usize,
) -> Result<[Tensor; 3]> {
    let [u, vt, x_next] = outs;
    let t = |v: Vec<T>| Tensor::from_vec(v, (rows, d), &Device::Cpu);
    Ok([t(u)?, t(vt)?, t(x_next)?])
}

//! Limited-memory "good" Broyden's inverse-Jacobian estimate M = −I + Σ_k u_k v_kᵀ per sample
//! (reference §3.2) and its update: from the step's two iterates and residuals, the new pair
//! (u, vᵀ) and the next iterate.
//!
//! Composed from candle ops the update is about twenty full passes over the (B, D) state, each a
//! fresh tensor on one thread, and every pair a fresh allocation. The native path keeps the pairs
//! in one buffer allocated when the solve starts, each sample's pairs side by side
//! (`[B][cap][u, v][D]`, see `ring_offset`), and reads each pair from memory once per step: the
//! sweep that takes pair j's dot products also adds pair j−1's terms, whose vectors are still in
//! L2. Each sample's row is one work item and every dot product is accumulated in float64.

use crate::element::{check_operands, fast_path, with_cpu_slices, Element};
use crate::low_rank::{low_rank_apply, low_rank_apply_many};
use crate::parallel::{for_each_chunk, uninit_vec, Shared};
use crate::reduce::{dot, LANES};
use candle_core::{DType, Device, Result, Tensor};
use multiversion::multiversion;
use std::collections::VecDeque;

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

/// What happens to the history when the new pair is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HistoryChange {
    /// The pair is appended.
    Append,
    /// The pair replaces the oldest (the history is at its cap).
    ReplaceOldest,
    /// No history is kept (cap 0): the operator stays −I.
    Discard,
}

/// The stored pairs of M, at most `cap` of them, the oldest dropped first.
pub struct BroydenHistory {
    rows: usize,
    d: usize,
    dtype: DType,
    cap: usize,
    len: usize,
    /// Ring slot of the oldest pair (native stores).
    oldest: usize,
    store: Store,
}

enum Store {
    /// `[rows][cap][u, v][d]`, slots filled in ring order.
    F32(Vec<f32>),
    F64(Vec<f64>),
    /// (u, vᵀ) tensors, oldest first: other devices and the portable kernels.
    Tensors(VecDeque<(Tensor, Tensor)>),
}

impl BroydenHistory {
    /// An empty history (M = −I) for states shaped and typed like `like` (B, D), holding at
    /// most `cap` pairs. The native store is allocated here, once for the whole solve.
    pub fn new(like: &Tensor, cap: usize) -> Result<Self> {
        let (rows, d) = like.dims2()?;
        let elements = rows
            .checked_mul(cap)
            .and_then(|n| n.checked_mul(2 * d))
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "a Broyden history of {cap} pairs of {rows}x{d} states overflows"
                ))
            })?;
        // Every slot is written before it is read: a pair is stored before it is counted.
        let store = match like.dtype() {
            DType::F32 if fast_path(like) => Store::F32(uninit_vec(elements)),
            DType::F64 if fast_path(like) => Store::F64(uninit_vec(elements)),
            _ => Store::Tensors(VecDeque::with_capacity(cap)),
        };
        Ok(Self {
            rows,
            d,
            dtype: like.dtype(),
            cap,
            len: 0,
            oldest: 0,
            store,
        })
    }

    /// Pairs stored.
    pub fn pairs(&self) -> usize {
        self.len
    }

    /// What storing one more pair will do.
    fn change_for_next_push(&self) -> HistoryChange {
        if self.cap == 0 {
            HistoryChange::Discard
        } else if self.len == self.cap {
            HistoryChange::ReplaceOldest
        } else {
            HistoryChange::Append
        }
    }

    /// Ring slot of pair `j` (0 the oldest).
    fn slot(&self, j: usize) -> usize {
        (self.oldest + j) % self.cap.max(1)
    }

    /// One Broyden update: stores the new pair u = (Δx − M Δg) / ⟨vᵀ, Δg⟩, vᵀ = Δxᵀ M (NaN
    /// entries zeroed; the oldest pair goes at the cap) and returns the next iterate
    /// x_new − M' g_new, where M' is the updated operator. Samples not `moving` (frozen) stay at
    /// x_new.
    pub fn update(&mut self, step: BroydenStep, moving: &[bool]) -> Result<Tensor> {
        let (rows, d) = check_operands("broyden_update", step.x, [step.x_new, step.g, step.g_new])?;
        if (rows, d) != (self.rows, self.d) || step.x.dtype() != self.dtype || moving.len() != rows
        {
            candle_core::bail!(
                "broyden_update: a ({rows}, {d}) {:?} step with {} mask entries for a history of \
                 ({}, {}) {:?}",
                step.x.dtype(),
                moving.len(),
                self.rows,
                self.d,
                self.dtype
            );
        }
        let change = self.change_for_next_push();
        // The ring's slots, oldest pair first, and the one the new pair goes to.
        let slots: Vec<usize> = (0..self.len).map(|j| self.slot(j)).collect();
        let target = match change {
            HistoryChange::Append => Some(self.slot(self.len)),
            HistoryChange::ReplaceOldest => Some(self.oldest),
            HistoryChange::Discard => None,
        };
        let ring = Ring {
            rows,
            d,
            cap: self.cap,
            slots: &slots,
            target,
            change,
            moving,
        };
        let x_next = match &mut self.store {
            Store::Tensors(pairs) => {
                let mask: Vec<f64> = moving.iter().map(|&m| f64::from(u8::from(m))).collect();
                let mask = Tensor::from_vec(mask, (rows, 1), step.x.device())?;
                let (u, vt, x_next) = composed(step, pairs, change, &mask)?;
                match change {
                    HistoryChange::Discard => {}
                    HistoryChange::ReplaceOldest => {
                        pairs.pop_front();
                        pairs.push_back((u, vt));
                    }
                    HistoryChange::Append => pairs.push_back((u, vt)),
                }
                x_next
            }
            Store::F32(buf) => ring.update(step, buf)?,
            Store::F64(buf) => ring.update(step, buf)?,
        };
        match change {
            HistoryChange::Append => self.len += 1,
            HistoryChange::ReplaceOldest => self.oldest = (self.oldest + 1) % self.cap,
            HistoryChange::Discard => {}
        }
        Ok(x_next)
    }

    /// M x per sample: the current inverse-Jacobian estimate applied to `x` (B, D).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let pairs = self.pair_tensors()?;
        let (us, vs): (Vec<&Tensor>, Vec<&Tensor>) = pairs.iter().map(|(u, v)| (u, v)).unzip();
        low_rank_apply(x, &us, &vs)
    }

    /// The stored (u, vᵀ), oldest first, as tensors.
    pub fn pair_tensors(&self) -> Result<Vec<(Tensor, Tensor)>> {
        fn gather<T: Element + candle_core::WithDType>(
            buf: &[T],
            h: &BroydenHistory,
        ) -> Result<Vec<(Tensor, Tensor)>> {
            (0..h.len)
                .map(|j| {
                    let slot = h.slot(j);
                    let half = |which: usize| -> Result<Tensor> {
                        let v: Vec<T> = (0..h.rows)
                            .flat_map(|r| {
                                let at = ring_offset(r, slot, which, h.cap, h.d);
                                buf[at..at + h.d].iter().copied()
                            })
                            .collect();
                        Tensor::from_vec(v, (h.rows, h.d), &Device::Cpu)
                    };
                    Ok((half(0)?, half(1)?))
                })
                .collect()
        }
        match &self.store {
            Store::F32(buf) => gather(buf, self),
            Store::F64(buf) => gather(buf, self),
            Store::Tensors(pairs) => Ok(pairs.iter().cloned().collect()),
        }
    }
}

/// The update from candle ops: the GPU path, and the reference the native kernel is tested
/// against. Returns u, vᵀ and the next iterate.
fn composed(
    step: BroydenStep,
    pairs: &VecDeque<(Tensor, Tensor)>,
    change: HistoryChange,
    mask: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (us, vs): (Vec<&Tensor>, Vec<&Tensor>) = pairs.iter().map(|(u, v)| (u, v)).unzip();
    let dot = |a: &Tensor, b: &Tensor| (a * b)?.sum_keepdim(1);
    let nan_to_zero = |t: &Tensor| t.eq(t)?.where_cond(t, &t.zeros_like()?);
    let dx = (step.x_new - step.x)?;
    let dg = (step.g_new - step.g)?;
    // vᵀ = Δxᵀ M = −Δx + Σ (Δx · u_k) v_k; M Δg and M g_new share one pass over the history.
    let vt = low_rank_apply(&dx, &vs, &us)?;
    let [m_dg, m_g]: [Tensor; 2] = low_rank_apply_many(&[&dg, step.g_new], &us, &vs)?
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
    Ok((u, vt, x_next))
}

/// Where row `r`'s half `which` (0: u, 1: vᵀ) of the pair in ring slot `slot` starts, in a ring of
/// `cap` pairs of width `d`.
fn ring_offset(r: usize, slot: usize, which: usize, cap: usize, d: usize) -> usize {
    ((r * cap + slot) * 2 + which) * d
}

/// One native update's problem size and choices.
struct Ring<'a> {
    rows: usize,
    d: usize,
    cap: usize,
    /// The ring slots of the stored pairs, oldest first.
    slots: &'a [usize],
    /// Where the new pair goes (None: discarded).
    target: Option<usize>,
    change: HistoryChange,
    moving: &'a [bool],
}

impl Ring<'_> {
    /// The update of the ring `buf` by `step`; returns the next iterate.
    fn update<T: Element + candle_core::WithDType>(
        &self,
        step: BroydenStep,
        buf: &mut [T],
    ) -> Result<Tensor> {
        let operands: Vec<Tensor> = [step.x, step.x_new, step.g, step.g_new]
            .into_iter()
            .map(Tensor::contiguous)
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = operands.iter().collect();
        with_cpu_slices::<T, _>(&refs, |s| self.run(s, buf))?
    }

    /// `s` holds x, x_new, g, g_new; `buf` is the ring. Returns the next iterate.
    fn run<T: Element + candle_core::WithDType>(
        &self,
        s: &[&[T]],
        buf: &mut [T],
    ) -> Result<Tensor> {
        let (rows, d, cap) = (self.rows, self.d, self.cap);
        let (x, xn, g, gn) = (s[0], s[1], s[2], s[3]);
        // Every element of the next iterate is written below, row by row.
        let mut x_next: Vec<T> = uninit_vec(rows * d);
        let px = Shared(x_next.as_mut_ptr());
        let ring = Shared(buf.as_mut_ptr());
        // The pairs that stay in M' (for M' g_new): all, or all but the oldest.
        let first_kept = usize::from(self.change == HistoryChange::ReplaceOldest);
        for_each_chunk(rows, |range| {
            let mut scratch = Scratch::new(d);
            // Written in full by every row's update before they are copied out.
            let (mut u_row, mut vt_row) = (uninit_vec::<T>(d), uninit_vec::<T>(d));
            for r in range {
                let span = r * d..(r + 1) * d;
                let at = |slot: usize, which: usize| ring_offset(r, slot, which, cap, d);
                // SAFETY: row r's part of the ring and of x_next belong to this work item; the
                // stored pairs are only read here, and the target slot is written after.
                let (u_rows, v_rows): (Vec<&[T]>, Vec<&[T]>) = self
                    .slots
                    .iter()
                    .map(|&slot| unsafe { (ring.read(at(slot, 0), d), ring.read(at(slot, 1), d)) })
                    .unzip();
                let out = unsafe { px.slice(r * d, d) };
                let input = [
                    &x[span.clone()],
                    &xn[span.clone()],
                    &g[span.clone()],
                    &gn[span],
                ];
                let coeffs = Coefficients {
                    first_kept,
                    with_new_pair: self.change != HistoryChange::Discard,
                    moving: self.moving[r],
                };
                update_row(
                    input,
                    &u_rows,
                    &v_rows,
                    [&mut u_row, &mut vt_row, out],
                    &mut scratch,
                    coeffs,
                );
                // The reads end here: the target may be the oldest pair's slot.
                drop((u_rows, v_rows));
                if let Some(slot) = self.target {
                    // SAFETY: row r's slots belong to this work item, and nothing reads them now.
                    unsafe {
                        ring.slice(at(slot, 0), d).copy_from_slice(&u_row);
                        ring.slice(at(slot, 1), d).copy_from_slice(&vt_row);
                    }
                }
            }
        });
        Tensor::from_vec(x_next, (rows, d), &Device::Cpu)
    }
}

/// One work item's row buffers, each written in full by a row's update before it is read.
struct Scratch<T> {
    dx: Vec<T>,
    dg: Vec<T>,
    m_dg: Vec<T>,
}

impl<T: Element> Scratch<T> {
    fn new(d: usize) -> Self {
        Self {
            dx: uninit_vec(d),
            dg: uninit_vec(d),
            m_dg: uninit_vec(d),
        }
    }
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
///
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
    let (xn, g, gn) = (&xn[..d], &g[..d], &gn[..d]);
    let (u, vt, xo) = (&mut u[..d], &mut vt[..d], &mut xo[..d]);
    let (dx, dg, m_dg) = (&mut s.dx[..d], &mut s.dg[..d], &mut s.m_dg[..d]);
    // Differences and negations in T: one rounding, as the f64 round trip gave.
    for ((dx, dg), ((x, xn), (g, gn))) in dx
        .iter_mut()
        .zip(dg.iter_mut())
        .zip(x.iter().zip(xn).zip(g.iter().zip(gn)))
    {
        *dx = *xn - *x;
        *dg = *gn - *g;
    }
    // vᵀ = −Δx + Σ ⟨u_j, Δx⟩ v_j;  M Δg = −Δg + Σ ⟨v_j, Δg⟩ u_j;  M' g (into xo) likewise.
    for ((vt, m), (xo, ((dx, dg), gn))) in vt
        .iter_mut()
        .zip(m_dg.iter_mut())
        .zip(xo.iter_mut().zip(dx.iter().zip(dg.iter()).zip(gn)))
    {
        *vt = -*dx;
        *m = -*dg;
        *xo = -*gn;
    }
    // One sweep per pair: pair j−1's terms of the three sums (its vectors still in L2 from the
    // sweep before) together with pair j's three dot products (its vectors streaming in from
    // memory), so the history is fetched once per step and the fetch never waits for the sums.
    // Each element's sums add the pairs' terms in the order they were stored.
    let mut pending: Option<Terms<T>> = None;
    for j in 0..=us.len() {
        let next = us.get(j).zip(vs.get(j)).map(|(u, v)| (&u[..d], &v[..d]));
        let dots = sweep(
            [&mut *vt, &mut *m_dg, &mut *xo],
            pending.take(),
            next,
            [dx, dg, gn],
        );
        if let (Some((u, v)), Some([c_u_dx, c_v_dg, c_v_g])) = (next, dots) {
            pending = Some(Terms {
                u,
                v,
                a: T::from_f64(c_u_dx),
                b: T::from_f64(c_v_dg),
                c: T::from_f64(if j >= c.first_kept { c_v_g } else { 0.0 }),
            });
        }
    }
    // u = (Δx − M Δg) / ⟨vᵀ, Δg⟩ and vᵀ with NaN zeroed, and ⟨vᵀ, g_new⟩ in the same pass (the
    // lanes and tail of `dot`, so the sum is the one `dot` would give).
    let body = d - d % LANES;
    let inverse = 1.0 / dot(vt, dg);
    let mut lanes = [0f64; LANES];
    let clean = |v: f64| if v.is_nan() { 0.0 } else { v };
    for (((uc, vc), (xc, mc)), gc) in u
        .chunks_exact_mut(LANES)
        .zip(vt.chunks_exact_mut(LANES))
        .zip(dx.chunks_exact(LANES).zip(m_dg.chunks_exact(LANES)))
        .zip(gn.chunks_exact(LANES))
    {
        for l in 0..LANES {
            uc[l] = T::from_f64(clean((xc[l].to_f64() - mc[l].to_f64()) * inverse));
            let v = clean(vc[l].to_f64());
            vc[l] = T::from_f64(v);
            lanes[l] += v * gc[l].to_f64();
        }
    }
    for i in body..d {
        u[i] = T::from_f64(clean((dx[i].to_f64() - m_dg[i].to_f64()) * inverse));
        vt[i] = T::from_f64(clean(vt[i].to_f64()));
    }
    let c_new = T::from_f64(if c.with_new_pair {
        lanes.iter().sum::<f64>() + dot(&vt[body..], &gn[body..])
    } else {
        0.0
    });
    // x_new + mask·(−M' g): a frozen sample keeps x_new (as x_new + 0·update does, NaN included).
    let m = T::from_f64(if c.moving { 1.0 } else { 0.0 });
    for (xo, (u, xn)) in xo.iter_mut().zip(u.iter().zip(xn)) {
        let mut m_g = *xo;
        m_g += c_new * *u;
        *xo = *xn - m_g * m;
    }
}

/// A stored pair and its coefficients in vᵀ (a, on v), M Δg (b, on u) and M' g_new (c, on u).
struct Terms<'a, T> {
    u: &'a [T],
    v: &'a [T],
    a: T,
    b: T,
    c: T,
}

/// One pass over a row: adds `add`'s terms to `sums` = vᵀ, M Δg, M' g_new, and returns
/// ⟨u, Δx⟩, ⟨v, Δg⟩, ⟨v, g_new⟩ of the pair `dots` (`rhs` = Δx, Δg, g_new) in f64 — each in the
/// lanes and order of [`dot`], so it equals `dot` of the same vectors.
#[inline(always)]
fn sweep<T: Element>(
    sums: [&mut [T]; 3],
    add: Option<Terms<T>>,
    dots: Option<(&[T], &[T])>,
    rhs: [&[T]; 3],
) -> Option<[f64; 3]> {
    let [vt, m, xo] = sums;
    let d = vt.len();
    let (m, xo) = (&mut m[..d], &mut xo[..d]);
    let [dx, dg, gn] = rhs.map(|r| &r[..d]);
    let add_terms =
        |range: std::ops::Range<usize>, t: &Terms<T>, vt: &mut [T], m: &mut [T], xo: &mut [T]| {
            let (u, v) = (&t.u[range.clone()], &t.v[range.clone()]);
            for ((vt, m), (xo, (u, v))) in vt[range.clone()]
                .iter_mut()
                .zip(m[range.clone()].iter_mut())
                .zip(xo[range].iter_mut().zip(u.iter().zip(v)))
            {
                *vt += t.a * *v;
                *m += t.b * *u;
                *xo += t.c * *u;
            }
        };
    let Some((u, v)) = dots else {
        if let Some(t) = &add {
            add_terms(0..d, t, vt, m, xo);
        }
        return None;
    };
    let body = d - d % LANES;
    let (mut a, mut b, mut e) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    for start in (0..body).step_by(LANES) {
        let span = start..start + LANES;
        if let Some(t) = &add {
            add_terms(span.clone(), t, vt, m, xo);
        }
        let (uc, vc) = (&u[span.clone()], &v[span.clone()]);
        let (xc, gc, nc) = (&dx[span.clone()], &dg[span.clone()], &gn[span]);
        for l in 0..LANES {
            let (ul, vl) = (uc[l].to_f64(), vc[l].to_f64());
            a[l] += ul * xc[l].to_f64();
            b[l] += vl * gc[l].to_f64();
            e[l] += vl * nc[l].to_f64();
        }
    }
    if let Some(t) = &add {
        add_terms(body..d, t, vt, m, xo);
    }
    // The elements past the last full lane group: `dot` of the tails is that sum.
    let tail = |p: &[T], q: &[T]| dot(&p[body..], &q[body..]);
    Some([
        a.iter().sum::<f64>() + tail(u, dx),
        b.iter().sum::<f64>() + tail(v, dg),
        e.iter().sum::<f64>() + tail(v, gn),
    ])
}

//! What the fused GroupNorm and BatchNorm kernels share: the float64 gradient sums, and the candle
//! ops that wrap a normalisation's forward (x [, γ, β]) → y and its
//! backward (x [, γ], dy) → dx ‖ dγ ‖ dβ.

use crate::element::Element;
use crate::reduce::LANES;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// (Σ dy, Σ dy·x̂) in f64 with x̂ = (x − mean)·rstd, in [`LANES`] partial sums each.
#[inline(always)]
pub(crate) fn grad_sums<T: Element>(dy: &[T], x: &[T], mean: f64, rstd: f64) -> (f64, f64) {
    let (mut s_dy, mut s_dyx) = ([0f64; LANES], [0f64; LANES]);
    let (dc, xc) = (dy.chunks_exact(LANES), x.chunks_exact(LANES));
    let (mut a, mut b) = (0f64, 0f64);
    for (d, v) in dc.remainder().iter().zip(xc.remainder()) {
        a += d.to_f64();
        b += d.to_f64() * (v.to_f64() - mean) * rstd;
    }
    for (d, v) in dc.zip(xc) {
        for l in 0..LANES {
            let d = d[l].to_f64();
            s_dy[l] += d;
            s_dyx[l] += d * (v[l].to_f64() - mean) * rstd;
        }
    }
    (a + s_dy.iter().sum::<f64>(), b + s_dyx.iter().sum::<f64>())
}

/// A fused normalisation over (B, C, H, W) with optional per-channel (γ, β).
pub(crate) trait FusedNorm: Copy + Send + Sync + 'static {
    /// Name of its candle ops.
    const NAME: &'static str;
    /// y from x.
    fn forward<T: Element>(&self, x: &[T], affine: Option<(&[T], &[T])>, l: &Layout) -> Vec<T>;
    /// dx followed by dγ and dβ (2·C values), from x, γ and dy.
    fn backward<T: Element>(&self, x: &[T], gamma: Option<&[T]>, dy: &[T], l: &Layout) -> Vec<T>;
    /// True when `forward` ends in a ReLU: autograd then masks dy by y > 0 before `backward`.
    fn ends_in_relu(&self) -> bool {
        false
    }
}

/// dy masked by the ReLU the forward ended in, if it did.
fn through_relu<N: FusedNorm>(norm: &N, y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if norm.ends_in_relu() {
        crate::relu::relu_grad(y, dy)?.contiguous()
    } else {
        dy.contiguous()
    }
}

macro_rules! for_float {
    ($s:expr, $t:ident => $body:expr) => {
        match $s {
            CpuStorage::F32(_) => {
                type $t = f32;
                $body
            }
            CpuStorage::F64(_) => {
                type $t = f64;
                $body
            }
            _ => candle_core::bail!("fused normalisation: f32 and f64 only"),
        }
    };
}

/// The forward op of a [`FusedNorm`]: x (CustomOp1) or x, γ, β (CustomOp3).
pub(crate) struct Forward<N>(pub N);

/// The backward op of a [`FusedNorm`]: x, dy (CustomOp2) or x, γ, dy (CustomOp3).
pub(crate) struct Backward<N>(pub N);

/// dx from the packed dx ‖ dγ ‖ dβ.
fn unpack_dx(grads: &Tensor, x: &Tensor) -> Result<Tensor> {
    grads.narrow(0, 0, x.elem_count())?.reshape(x.shape())
}

impl<N: FusedNorm> CustomOp1 for Forward<N> {
    fn name(&self) -> &'static str {
        N::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = for_float!(s, T => T::storage(self.0.forward(T::slice(s, l)?, None, l)));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let grads = x.apply_op2_no_bwd(&through_relu(&self.0, y, dy)?, &Backward(self.0))?;
        Ok(Some(unpack_dx(&grads, x)?))
    }
}

impl<N: FusedNorm> CustomOp3 for Forward<N> {
    fn name(&self) -> &'static str {
        N::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let c = l1.shape().dims4()?.1;
        if l2.shape().elem_count() != c || l3.shape().elem_count() != c {
            candle_core::bail!("{}: affine parameters must have {c} entries", N::NAME);
        }
        let out = for_float!(s1, T => {
            let affine = Some((T::slice(s2, l2)?, T::slice(s3, l3)?));
            T::storage(self.0.forward(T::slice(s1, l1)?, affine, l1))
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dy = through_relu(&self.0, y, dy)?;
        let grads = x.apply_op3_no_bwd(gamma, &dy, &Backward(self.0))?;
        let (n, c) = (x.elem_count(), gamma.elem_count());
        let dgamma = grads.narrow(0, n, c)?.reshape(gamma.shape())?;
        let dbeta = grads.narrow(0, n + c, c)?.reshape(beta.shape())?;
        Ok((
            Some(unpack_dx(&grads, x)?),
            gamma.track_op().then_some(dgamma),
            beta.track_op().then_some(dbeta),
        ))
    }
}

impl<N: FusedNorm> Backward<N> {
    fn run(
        &self,
        x: (&CpuStorage, &Layout),
        gamma: Option<(&CpuStorage, &Layout)>,
        dy: (&CpuStorage, &Layout),
    ) -> Result<(CpuStorage, Shape)> {
        let n = dy.1.shape().elem_count();
        let c = dy.1.shape().dims4()?.1;
        let out = for_float!(x.0, T => {
            let gamma = match gamma {
                Some((s, l)) => Some(T::slice(s, l)?),
                None => None,
            };
            T::storage(self.0.backward(T::slice(x.0, x.1)?, gamma, T::slice(dy.0, dy.1)?, dy.1))
        });
        Ok((out, Shape::from(n + 2 * c)))
    }
}

impl<N: FusedNorm> CustomOp2 for Backward<N> {
    fn name(&self) -> &'static str {
        N::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), None, (s2, l2))
    }
}

impl<N: FusedNorm> CustomOp3 for Backward<N> {
    fn name(&self) -> &'static str {
        N::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run((s1, l1), Some((s2, l2)), (s3, l3))
    }
}

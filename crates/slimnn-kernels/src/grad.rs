//! Backward kernels of training graphs: activation derivatives (`dy * f'(x)`), softmax and
//! log-softmax backward over rows, layer-norm backward (dx plus the per-column sums for
//! dscale / dbias) and the scatter-add of a gather's gradient.
//!
//! Bodies are generic over the crate's `Simd` lanes like [`crate::rows`] (scalar, AVX2,
//! AVX-512, chosen from the tier), sequential; callers split rows over threads. [`reference`]
//! holds f64 scalar counterparts for the property tests.

use crate::cpu::{self, CpuTier};
use crate::error::{check_tier, KernelError};
use crate::math;
use crate::rows::tiered;
use crate::simd::Simd;

const KERNEL: &str = "grad";

/// The activations whose derivative has a fast kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradActivation {
    /// 1 for `x > 0`, else 0.
    Relu,
    /// `Φ(x) + x φ(x)` of the exact (erf) GELU.
    GeluErf,
    /// Derivative of `0.5 x (1 + tanh(k (x + 0.044715 x^3)))`.
    GeluTanh,
    /// `1 - tanh(x)^2`.
    Tanh,
    /// `σ(x) (1 - σ(x))`.
    Sigmoid,
    /// `2 / sqrt(pi) e^(-x^2)` (GELU left as its erf decomposition).
    Erf,
}

/// Element-wise functions that appear unfused in training graphs (a GELU whose intermediate
/// values the backward pass reads stays `x / sqrt 2 -> Erf -> ...`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastUnary {
    Erf,
    Exp,
    Tanh,
    Sigmoid,
}

/// Sum of the lanes (through memory: these kernels call it once per row).
#[inline(always)]
unsafe fn hsum<S: Simd>(v: S) -> f32 {
    let mut buf = [0f32; 16];
    v.store(buf.as_mut_ptr());
    buf[..S::LANES].iter().sum()
}

/// `σ(z) σ(-z)` = `σ'(z)`, without the cancellation of `s (1 - s)` at large `|z|`.
#[inline(always)]
unsafe fn sigmoid_slope<S: Simd>(z: S) -> (S, S) {
    let one = S::splat(1.0);
    let sp = one.div(one.add(math::exp(S::zero().sub(z))));
    let sn = one.div(one.add(math::exp(z)));
    (sp, sp.mul(sn))
}

#[inline(always)]
unsafe fn derivative<S: Simd>(act: GradActivation, x: S) -> S {
    match act {
        // Handled by the caller (a comparison, which `Simd` does not have).
        GradActivation::Relu => S::zero(),
        GradActivation::GeluErf => {
            let half = S::splat(0.5);
            let cdf = half.mul_add(math::erf(x.mul(S::splat(std::f32::consts::FRAC_1_SQRT_2))), half);
            // 1 / sqrt(2 pi)
            let pdf = S::splat(0.398_942_3).mul(math::exp(S::splat(-0.5).mul(x.mul(x))));
            x.mul_add(pdf, cdf)
        }
        GradActivation::GeluTanh => {
            // 0.5 (1 + tanh u) = σ(2u) and 0.5 (1 - tanh² u) = 2 σ(2u) σ(-2u).
            const K: f32 = 0.797_884_6;
            let x2 = x.mul(x);
            let u2 = S::splat(2.0 * K).mul(x.mul(S::splat(0.044_715).mul_add(x2, S::splat(1.0))));
            let (s, slope) = sigmoid_slope(u2);
            let du = S::splat(K).mul(S::splat(3.0 * 0.044_715).mul_add(x2, S::splat(1.0)));
            x.mul(S::splat(2.0).mul(slope)).mul_add(du, s)
        }
        GradActivation::Tanh => {
            // 1 - tanh² x = 4 σ(2x) σ(-2x).
            let (_, slope) = sigmoid_slope(x.add(x));
            S::splat(4.0).mul(slope)
        }
        GradActivation::Sigmoid => sigmoid_slope(x).1,
        // 2 / sqrt(pi)
        GradActivation::Erf => S::splat(std::f32::consts::FRAC_2_SQRT_PI).mul(math::exp(S::zero().sub(x.mul(x)))),
    }
}

#[inline(always)]
unsafe fn unary_value<S: Simd>(f: FastUnary, x: S) -> S {
    let one = S::splat(1.0);
    match f {
        FastUnary::Erf => math::erf(x),
        FastUnary::Exp => math::exp(x),
        // tanh x = 2 σ(2x) - 1 = (1 - e^-2x) / (1 + e^-2x), through σ of either sign so the
        // exponent never overflows: tanh |x| from e^(-2|x|), sign restored.
        FastUnary::Tanh => {
            let e = math::exp(S::splat(-2.0).mul(x.abs()));
            one.sub(e).div(one.add(e)).with_sign_of(x)
        }
        FastUnary::Sigmoid => one.div(one.add(math::exp(S::zero().sub(x)))),
    }
}

#[inline(always)]
unsafe fn unary_body<S: Simd>(x: *const f32, out: *mut f32, len: usize, f: FastUnary) {
    let full = len - len % S::LANES;
    let mut i = 0;
    while i < full {
        unary_value(f, S::load(x.add(i))).store(out.add(i));
        i += S::LANES;
    }
    for j in full..len {
        *out.add(j) = unary_value(f, *x.add(j));
    }
}

tiered!(fn unary_tier(x: *const f32, out: *mut f32, len: usize, f: FastUnary) => unary_body);

/// `out = f(x)` element-wise (erf within 1e-6 absolute, exp within a few ulp).
pub fn unary(f: FastUnary, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    unary_with(cpu::tier(), f, x, out)
}

/// [`unary`] with the kernels of `tier`.
pub fn unary_with(tier: CpuTier, f: FastUnary, x: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    check_tier(tier)?;
    if x.len() != out.len() {
        return Err(KernelError::shape(KERNEL, format!("x {}, out {} values", x.len(), out.len())));
    }
    unary_tier(tier, x.as_ptr(), out.as_mut_ptr(), out.len(), f);
    Ok(())
}

#[inline(always)]
unsafe fn activation_grad_body<S: Simd>(x: *const f32, dy: *const f32, out: *mut f32, len: usize, act: GradActivation) {
    let full = len - len % S::LANES;
    let mut i = 0;
    while i < full {
        let d = derivative(act, S::load(x.add(i)));
        d.mul(S::load(dy.add(i))).store(out.add(i));
        i += S::LANES;
    }
    for j in full..len {
        *out.add(j) = derivative(act, *x.add(j)) * *dy.add(j);
    }
}

tiered!(fn activation_grad_tier(x: *const f32, dy: *const f32, out: *mut f32, len: usize, act: GradActivation) => activation_grad_body);

/// `out = dy * f'(x)` element-wise.
pub fn activation_grad(act: GradActivation, x: &[f32], dy: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    activation_grad_with(cpu::tier(), act, x, dy, out)
}

/// [`activation_grad`] with the kernels of `tier`.
pub fn activation_grad_with(
    tier: CpuTier,
    act: GradActivation,
    x: &[f32],
    dy: &[f32],
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_tier(tier)?;
    if x.len() != out.len() || dy.len() != out.len() {
        return Err(KernelError::shape(KERNEL, format!("x {}, dy {}, out {} values", x.len(), dy.len(), out.len())));
    }
    if act == GradActivation::Relu {
        // A select the compiler vectorises; the forward is x for x >= 0 only above 0 here
        // (slope 0 at 0, as the reference's UnaryGrad).
        for ((o, &xv), &g) in out.iter_mut().zip(x).zip(dy) {
            *o = if xv > 0.0 { g } else { 0.0 };
        }
        return Ok(());
    }
    activation_grad_tier(tier, x.as_ptr(), dy.as_ptr(), out.as_mut_ptr(), out.len(), act);
    Ok(())
}

#[inline(always)]
unsafe fn softmax_grad_body<S: Simd>(y: *const f32, dy: *const f32, out: *mut f32, rows: usize, n: usize, log: bool) {
    let full = n - n % S::LANES;
    for r in 0..rows {
        let (y, dy, out) = (y.add(r * n), dy.add(r * n), out.add(r * n));
        // softmax: s = Σ dy y, dx = y (dy - s); log-softmax: s = Σ dy, dx = dy - e^y s.
        let mut acc = S::zero();
        let mut j = 0;
        while j < full {
            let g = S::load(dy.add(j));
            acc = if log { acc.add(g) } else { g.mul_add(S::load(y.add(j)), acc) };
            j += S::LANES;
        }
        let mut s = hsum(acc);
        for j in full..n {
            s += if log { *dy.add(j) } else { *dy.add(j) * *y.add(j) };
        }
        let vs = S::splat(s);
        let mut j = 0;
        while j < full {
            let (yv, g) = (S::load(y.add(j)), S::load(dy.add(j)));
            let dx = if log { g.sub(math::exp(yv).mul(vs)) } else { yv.mul(g.sub(vs)) };
            dx.store(out.add(j));
            j += S::LANES;
        }
        for j in full..n {
            let (yv, g) = (*y.add(j), *dy.add(j));
            *out.add(j) = if log { g - math::exp(yv) * s } else { yv * (g - s) };
        }
    }
}

tiered!(fn softmax_grad_tier(y: *const f32, dy: *const f32, out: *mut f32, rows: usize, n: usize, log: bool) => softmax_grad_body);

/// Softmax (or, with `log`, log-softmax) backward over rows of `n`: `y` is the forward
/// output, `dy` its gradient.
pub fn softmax_grad(y: &[f32], dy: &[f32], n: usize, log: bool, out: &mut [f32]) -> Result<(), KernelError> {
    softmax_grad_with(cpu::tier(), y, dy, n, log, out)
}

/// [`softmax_grad`] with the kernels of `tier`.
pub fn softmax_grad_with(
    tier: CpuTier,
    y: &[f32],
    dy: &[f32],
    n: usize,
    log: bool,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_tier(tier)?;
    if y.len() != out.len()
        || dy.len() != out.len()
        || (n == 0 && !out.is_empty())
        || !out.len().is_multiple_of(n.max(1))
    {
        return Err(KernelError::shape(
            KERNEL,
            format!("softmax grad: y {}, dy {}, out {}, rows of {n}", y.len(), dy.len(), out.len()),
        ));
    }
    if let Some(rows) = out.len().checked_div(n) {
        softmax_grad_tier(tier, y.as_ptr(), dy.as_ptr(), out.as_mut_ptr(), rows, n, log);
    }
    Ok(())
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn layer_norm_grad_body<S: Simd>(
    x: *const f32,
    scale: *const f32,
    dy: *const f32,
    dx: *mut f32,
    dscale: *mut f32,
    dbias: *mut f32,
    rows: usize,
    n: usize,
    eps: f32,
) {
    let full = n - n % S::LANES;
    let inv_n = 1.0 / n as f64;
    for r in 0..rows {
        let (x, dy, dx) = (x.add(r * n), dy.add(r * n), dx.add(r * n));
        // Mean and variance around the first value (no cancellation for rows far from 0).
        let x0 = *x;
        let v0 = S::splat(x0);
        let (mut s1, mut s2) = (S::zero(), S::zero());
        let mut j = 0;
        while j < full {
            let d = S::load(x.add(j)).sub(v0);
            s1 = s1.add(d);
            s2 = d.mul_add(d, s2);
            j += S::LANES;
        }
        let (mut t1, mut t2) = (hsum(s1) as f64, hsum(s2) as f64);
        for j in full..n {
            let d = (*x.add(j) - x0) as f64;
            t1 += d;
            t2 += d * d;
        }
        let shift = t1 * inv_n;
        let var = (t2 * inv_n - shift * shift).max(0.0);
        let mean = S::splat((x0 as f64 + shift) as f32);
        let rstd = (1.0 / (var + eps as f64).sqrt()) as f32;
        let vr = S::splat(rstd);
        // Σ g and Σ g x̂ with g = dy scale; the column sums for dscale and dbias.
        let (mut sg, mut sgx) = (S::zero(), S::zero());
        let mut j = 0;
        while j < full {
            let xh = S::load(x.add(j)).sub(mean).mul(vr);
            let g = S::load(dy.add(j));
            let gs = g.mul(S::load(scale.add(j)));
            sg = sg.add(gs);
            sgx = gs.mul_add(xh, sgx);
            g.mul_add(xh, S::load(dscale.add(j))).store(dscale.add(j));
            S::load(dbias.add(j)).add(g).store(dbias.add(j));
            j += S::LANES;
        }
        let (mut tg, mut tgx) = (hsum(sg), hsum(sgx));
        let mean0 = (x0 as f64 + shift) as f32;
        for j in full..n {
            let xh = (*x.add(j) - mean0) * rstd;
            let g = *dy.add(j);
            let gs = g * *scale.add(j);
            tg += gs;
            tgx += gs * xh;
            *dscale.add(j) += g * xh;
            *dbias.add(j) += g;
        }
        // dx = rstd (g - mean(g) - x̂ mean(g x̂)).
        let (mg, mgx) = ((tg as f64 * inv_n) as f32, (tgx as f64 * inv_n) as f32);
        let (vmg, vmgx) = (S::splat(mg), S::splat(mgx));
        let mut j = 0;
        while j < full {
            let xh = S::load(x.add(j)).sub(mean).mul(vr);
            let gs = S::load(dy.add(j)).mul(S::load(scale.add(j)));
            gs.sub(vmg).sub(xh.mul(vmgx)).mul(vr).store(dx.add(j));
            j += S::LANES;
        }
        for j in full..n {
            let xh = (*x.add(j) - mean0) * rstd;
            let gs = *dy.add(j) * *scale.add(j);
            *dx.add(j) = (gs - mg - xh * mgx) * rstd;
        }
    }
}

tiered!(fn layer_norm_grad_tier(x: *const f32, scale: *const f32, dy: *const f32, dx: *mut f32, dscale: *mut f32, dbias: *mut f32, rows: usize, n: usize, eps: f32) => layer_norm_grad_body);

/// Layer-norm backward over rows of `n` (normalised as [`crate::rows::layer_norm`]): writes
/// `dx` and ADDS the rows' `Σ dy x̂` to `dscale` and `Σ dy` to `dbias` (`n` values each), so
/// row blocks on several threads can keep partial sums.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_grad(
    x: &[f32],
    scale: &[f32],
    dy: &[f32],
    n: usize,
    eps: f32,
    dx: &mut [f32],
    dscale: &mut [f32],
    dbias: &mut [f32],
) -> Result<(), KernelError> {
    layer_norm_grad_with(cpu::tier(), x, scale, dy, n, eps, dx, dscale, dbias)
}

/// [`layer_norm_grad`] with the kernels of `tier`.
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_grad_with(
    tier: CpuTier,
    x: &[f32],
    scale: &[f32],
    dy: &[f32],
    n: usize,
    eps: f32,
    dx: &mut [f32],
    dscale: &mut [f32],
    dbias: &mut [f32],
) -> Result<(), KernelError> {
    check_tier(tier)?;
    let ok = x.len() == dx.len()
        && dy.len() == dx.len()
        && scale.len() == n
        && dscale.len() == n
        && dbias.len() == n
        && (n > 0 || dx.is_empty())
        && dx.len().is_multiple_of(n.max(1));
    if !ok {
        return Err(KernelError::shape(
            KERNEL,
            format!(
                "layer norm grad: x {}, dy {}, dx {}, scale {}, dscale {}, dbias {}, rows of {n}",
                x.len(),
                dy.len(),
                dx.len(),
                scale.len(),
                dscale.len(),
                dbias.len()
            ),
        ));
    }
    if let Some(rows) = dx.len().checked_div(n) {
        layer_norm_grad_tier(
            tier,
            x.as_ptr(),
            scale.as_ptr(),
            dy.as_ptr(),
            dx.as_mut_ptr(),
            dscale.as_mut_ptr(),
            dbias.as_mut_ptr(),
            rows,
            n,
            eps,
        );
    }
    Ok(())
}

/// The gradient of a gather along axis 0 of a `[rows, inner]` table: ADDS row `dy[i]` into
/// `out[idx[i]]` (negative indices count from the end). `out` holds `rows * inner` values.
pub fn gather_grad(idx: &[i64], dy: &[f32], inner: usize, out: &mut [f32]) -> Result<(), KernelError> {
    let rows = out.len().checked_div(inner).unwrap_or(0);
    if dy.len() != idx.len() * inner || !out.len().is_multiple_of(inner.max(1)) {
        return Err(KernelError::shape(
            KERNEL,
            format!("gather grad: {} indices, dy {}, rows of {inner}", idx.len(), dy.len()),
        ));
    }
    for (i, &ix) in idx.iter().enumerate() {
        let r = if ix < 0 { ix + rows as i64 } else { ix };
        if r < 0 || r >= rows as i64 {
            return Err(KernelError::shape(KERNEL, format!("gather grad: index {ix} is out of range for {rows} rows")));
        }
        let dst = &mut out[r as usize * inner..(r as usize + 1) * inner];
        for (d, &g) in dst.iter_mut().zip(&dy[i * inner..(i + 1) * inner]) {
            *d += g;
        }
    }
    Ok(())
}

/// Scalar f64 references.
pub mod reference {
    use super::GradActivation;

    fn erf(x: f64) -> f64 {
        // Abramowitz & Stegun 7.1.26 is too coarse for a reference; a series / continued
        // fraction pair accurate to ~1e-15.
        if x.abs() < 2.5 {
            let (mut term, mut sum, mut k) = (x, x, 0.0);
            loop {
                k += 1.0;
                term *= -x * x / k;
                let add = term / (2.0 * k + 1.0);
                sum += add;
                if add.abs() < 1e-17 {
                    break;
                }
            }
            sum * 2.0 / std::f64::consts::PI.sqrt()
        } else {
            let ax = x.abs();
            // Lentz continued fraction for erfc.
            let mut f = ax;
            for k in (1..60).rev() {
                f = ax + (k as f64 / 2.0) / f;
            }
            let erfc = (-ax * ax).exp() / (f * std::f64::consts::PI.sqrt());
            (1.0 - erfc).copysign(x)
        }
    }

    pub fn derivative(act: GradActivation, x: f32) -> f64 {
        let x = x as f64;
        let sigmoid = |z: f64| 1.0 / (1.0 + (-z).exp());
        match act {
            GradActivation::Relu => f64::from(u8::from(x > 0.0)),
            GradActivation::GeluErf => {
                0.5 * (1.0 + erf(x / 2f64.sqrt())) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
            }
            GradActivation::GeluTanh => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                let t = (k * (x + 0.044715 * x * x * x)).tanh();
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
            }
            GradActivation::Tanh => 1.0 - x.tanh().powi(2),
            GradActivation::Sigmoid => sigmoid(x) * sigmoid(-x),
            GradActivation::Erf => 2.0 / std::f64::consts::PI.sqrt() * (-x * x).exp(),
        }
    }

    pub fn unary(f: super::FastUnary, x: f32) -> f64 {
        let x = x as f64;
        match f {
            super::FastUnary::Erf => erf(x),
            super::FastUnary::Exp => x.exp(),
            super::FastUnary::Tanh => x.tanh(),
            super::FastUnary::Sigmoid => 1.0 / (1.0 + (-x).exp()),
        }
    }

    pub fn softmax_grad(y: &[f32], dy: &[f32], log: bool) -> Vec<f64> {
        let s: f64 = if log {
            dy.iter().map(|&g| g as f64).sum()
        } else {
            dy.iter().zip(y).map(|(&g, &v)| g as f64 * v as f64).sum()
        };
        y.iter()
            .zip(dy)
            .map(|(&v, &g)| if log { g as f64 - (v as f64).exp() * s } else { v as f64 * (g as f64 - s) })
            .collect()
    }

    /// `(dx, Σ dy x̂, Σ dy)` of one row.
    pub fn layer_norm_grad(x: &[f32], scale: &[f32], dy: &[f32], eps: f32) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + eps as f64).sqrt();
        let xh: Vec<f64> = x.iter().map(|&v| (v as f64 - mean) * rstd).collect();
        let g: Vec<f64> = dy.iter().zip(scale).map(|(&d, &s)| d as f64 * s as f64).collect();
        let mg = g.iter().sum::<f64>() / n;
        let mgx = g.iter().zip(&xh).map(|(a, b)| a * b).sum::<f64>() / n;
        let dx = g.iter().zip(&xh).map(|(gi, xi)| rstd * (gi - mg - xi * mgx)).collect();
        let ds = dy.iter().zip(&xh).map(|(&d, xi)| d as f64 * xi).collect();
        let db = dy.iter().map(|&d| d as f64).collect();
        (dx, ds, db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn close(got: f32, want: f64, tol: f64) -> bool {
        (got as f64 - want).abs() <= tol * (1.0 + want.abs())
    }

    #[test]
    fn activation_grads_match_reference_every_tier() {
        let x: Vec<f32> = (0..2003).map(|i| (i as f32 - 1001.0) / 90.0).chain([0.0, -0.0, 30.0, -30.0]).collect();
        let dy: Vec<f32> = (0..x.len()).map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0).collect();
        for tier in cpu::supported_tiers() {
            for act in [
                GradActivation::Relu,
                GradActivation::GeluErf,
                GradActivation::GeluTanh,
                GradActivation::Tanh,
                GradActivation::Sigmoid,
                GradActivation::Erf,
            ] {
                let mut out = vec![f32::NAN; x.len()];
                activation_grad_with(tier, act, &x, &dy, &mut out).unwrap();
                for i in 0..x.len() {
                    let want = reference::derivative(act, x[i]) * dy[i] as f64;
                    assert!(close(out[i], want, 2e-6), "{tier} {act:?} x={}: got {}, want {want}", x[i], out[i]);
                }
            }
        }
        assert!(activation_grad(GradActivation::Tanh, &[0.0; 3], &[0.0; 2], &mut [0.0; 3]).is_err());
    }

    #[test]
    fn unary_maps_match_reference_every_tier() {
        let x: Vec<f32> = (0..2003).map(|i| (i as f32 - 1001.0) / 90.0).chain([0.0, -0.0, 60.0, -60.0]).collect();
        for tier in cpu::supported_tiers() {
            for f in [FastUnary::Erf, FastUnary::Exp, FastUnary::Tanh, FastUnary::Sigmoid] {
                let mut out = vec![f32::NAN; x.len()];
                unary_with(tier, f, &x, &mut out).unwrap();
                for i in 0..x.len() {
                    let want = reference::unary(f, x[i]);
                    let tol = if f == FastUnary::Exp { 4e-7 * want } else { 1e-6 };
                    assert!(
                        (out[i] as f64 - want).abs() <= tol,
                        "{tier} {f:?} x={}: got {}, want {want}",
                        x[i],
                        out[i]
                    );
                }
            }
        }
    }

    #[test]
    fn gather_grad_scatter_adds() {
        let mut out = vec![0.0; 6];
        gather_grad(&[2, -1, 0], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, &mut out).unwrap();
        assert_eq!(out, [5.0, 6.0, 0.0, 0.0, 4.0, 6.0]);
        assert!(gather_grad(&[3], &[1.0, 2.0], 2, &mut out).is_err());
        assert!(gather_grad(&[0], &[1.0], 2, &mut out).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn softmax_grad_matches_reference(rows in 1usize..5, n in 1usize..70, log: bool, seed in 0u32..1000) {
            let f = |i: usize, s: u32| (((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) % 2000) as f32 / 1000.0 - 1.0;
            // y: a real (log-)softmax output so the identities hold at their scale.
            let mut y = vec![0.0f32; rows * n];
            for r in 0..rows {
                let z: Vec<f64> = (0..n).map(|j| f(r * n + j, seed) as f64 * 3.0).collect();
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                for j in 0..n {
                    y[r * n + j] = if log { (z[j] - lse) as f32 } else { (z[j] - lse).exp() as f32 };
                }
            }
            let dy: Vec<f32> = (0..rows * n).map(|i| f(i, seed + 7)).collect();
            for tier in cpu::supported_tiers() {
                let mut out = vec![f32::NAN; rows * n];
                softmax_grad_with(tier, &y, &dy, n, log, &mut out).unwrap();
                for r in 0..rows {
                    let want = reference::softmax_grad(&y[r * n..(r + 1) * n], &dy[r * n..(r + 1) * n], log);
                    for j in 0..n {
                        prop_assert!(close(out[r * n + j], want[j], 1e-5), "{} [{r},{j}] {} vs {}", tier, out[r * n + j], want[j]);
                    }
                }
            }
        }

        #[test]
        fn layer_norm_grad_matches_reference(rows in 1usize..6, n in 1usize..80, offset in -50.0f32..50.0, seed in 0u32..1000) {
            let f = |i: usize, s: u32| (((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) % 2000) as f32 / 1000.0 - 1.0;
            let x: Vec<f32> = (0..rows * n).map(|i| f(i, seed) * 2.0 + offset).collect();
            let dy: Vec<f32> = (0..rows * n).map(|i| f(i, seed + 1)).collect();
            let scale: Vec<f32> = (0..n).map(|i| f(i, seed + 2) + 1.5).collect();
            let eps = 1e-5;
            for tier in cpu::supported_tiers() {
                let mut dx = vec![f32::NAN; rows * n];
                let (mut ds, mut db) = (vec![0.5f32; n], vec![-0.5f32; n]);
                layer_norm_grad_with(tier, &x, &scale, &dy, n, eps, &mut dx, &mut ds, &mut db).unwrap();
                let (mut wds, mut wdb) = (vec![0.5f64; n], vec![-0.5f64; n]);
                for r in 0..rows {
                    let s = r * n..(r + 1) * n;
                    let (wdx, rds, rdb) = reference::layer_norm_grad(&x[s.clone()], &scale, &dy[s], eps);
                    for j in 0..n {
                        // dx sums n terms of size ~rstd; relative to that scale.
                        prop_assert!(close(dx[r * n + j], wdx[j], 2e-4), "{} dx[{r},{j}] {} vs {}", tier, dx[r * n + j], wdx[j]);
                        wds[j] += rds[j];
                        wdb[j] += rdb[j];
                    }
                }
                for j in 0..n {
                    prop_assert!(close(ds[j], wds[j], 1e-4) && close(db[j], wdb[j], 1e-5), "{} col {j}", tier);
                }
            }
        }
    }
}

//! Vectorised transcendental functions and activations, generic over [`Simd`] so the scalar,
//! AVX2 and AVX-512 tiers share one body (and therefore one accuracy).
//!
//! Accuracy (checked in the tests against f64 references): `exp` within 2 ulp in its domain, `erf`
//! within 1e-6 absolute over all of f32.

use crate::simd::Simd;

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split so that `n * LN2_HI` is exact for |n| < 2^9 (Cephes).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
// exp clamps its argument here: e^88 and e^-87 are still normal f32 values and keep `pow2i`
// inside its exponent range.
const EXP_MAX: f32 = 88.0;
const EXP_MIN: f32 = -87.0;

/// `e^x` (inputs clamped to `[-87, 88]`; NaN propagates).
///
/// # Safety
/// `S`'s target features must be available (see [`Simd`]).
#[inline(always)]
pub(crate) unsafe fn exp<S: Simd>(x: S) -> S {
    // `lo.max(x)` returns x when x is NaN (minps/maxps return the second operand on NaN).
    let x = S::splat(EXP_MAX).min(S::splat(EXP_MIN).max(x));
    let n = x.mul(S::splat(LOG2E)).round();
    let r = n.mul_add(S::splat(-LN2_HI), x);
    let r = n.mul_add(S::splat(-LN2_LO), r);
    // Cephes expf: e^r = 1 + r + r^2 * P(r) on |r| <= ln2/2.
    let mut p = S::splat(1.987_569_2e-4);
    p = p.mul_add(r, S::splat(1.398_199_9e-3));
    p = p.mul_add(r, S::splat(8.333_452e-3));
    p = p.mul_add(r, S::splat(4.166_579_6e-2));
    p = p.mul_add(r, S::splat(1.666_666_5e-1));
    p = p.mul_add(r, S::splat(0.5));
    let e = p.mul_add(r.mul(r), r.add(S::splat(1.0)));
    e.mul(n.pow2i())
}

/// The error function, max abs error about 5e-7 over all of f32: `x P(x^2) / Q(x^2)` on
/// `|x| <= 4` (erf(4) is 1 to 1.5e-8), a rational fit of degrees 13/8 made for slimnn (weighted
/// least squares refined toward minimax). It needs no `exp` and half the operations of the
/// Abramowitz-Stegun form, which made GELU the costliest part of a fused FFN epilogue.
///
/// # Safety
/// `S`'s target features must be available (see [`Simd`]).
#[inline(always)]
pub(crate) unsafe fn erf<S: Simd>(x: S) -> S {
    const P: [f32; 7] =
        [1.128_378_6, 0.216_155_01, 0.052_730_98, 0.004_387_377_8, 1.577_986_8e-4, -1.998_056_2e-6, 1.914_896_3e-8];
    const Q: [f32; 5] = [1.0, 0.524_889_47, 0.121_717_86, 0.015_742_186, 0.001_120_900_6];
    // NaN propagates: `max` returns its second operand when either is NaN.
    let x = S::splat(4.0).min(S::splat(-4.0).max(x));
    let t = x.mul(x);
    let mut p = S::splat(P[6]);
    for &c in P[..6].iter().rev() {
        p = p.mul_add(t, S::splat(c));
    }
    let mut q = S::splat(Q[4]);
    for &c in Q[..4].iter().rev() {
        q = q.mul_add(t, S::splat(c));
    }
    x.mul(p).div(q)
}

/// `x * sigmoid(z)` = `x / (1 + e^-z)`.
#[inline(always)]
unsafe fn mul_sigmoid<S: Simd>(x: S, z: S) -> S {
    x.div(S::splat(1.0).add(exp(S::zero().sub(z))))
}

/// GELU with the exact erf form: `0.5 x (1 + erf(x / sqrt 2))`.
///
/// # Safety
/// `S`'s target features must be available (see [`Simd`]).
#[inline(always)]
pub(crate) unsafe fn gelu_erf<S: Simd>(x: S) -> S {
    let half_x = x.mul(S::splat(0.5));
    let e = erf(x.mul(S::splat(std::f32::consts::FRAC_1_SQRT_2)));
    half_x.mul_add(e, half_x)
}

/// GELU with the tanh approximation: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`,
/// computed as `x * sigmoid(2u)` (the same function, without tanh's cancellation).
///
/// # Safety
/// `S`'s target features must be available (see [`Simd`]).
#[inline(always)]
pub(crate) unsafe fn gelu_tanh<S: Simd>(x: S) -> S {
    // 2 * sqrt(2/pi) and 2 * sqrt(2/pi) * 0.044715.
    const C1: f32 = 1.595_769;
    const C3: f32 = 0.071_354_816;
    let x2 = x.mul(x);
    let z = x.mul(S::splat(C3).mul_add(x2, S::splat(C1)));
    mul_sigmoid(x, z)
}

/// SiLU (swish): `x * sigmoid(x)`.
///
/// # Safety
/// `S`'s target features must be available (see [`Simd`]).
#[inline(always)]
pub(crate) unsafe fn silu<S: Simd>(x: S) -> S {
    mul_sigmoid(x, x)
}

/// `act` on one vector, chosen at run time (for epilogues that finish tiles in registers).
///
/// # Safety
/// `S`'s target features must be available (see [`Simd`]).
#[inline(always)]
pub(crate) unsafe fn activate<S: Simd>(x: S, act: crate::gemm::Activation) -> S {
    use crate::gemm::Activation;
    // NaN propagates: min/max return their second operand when either is NaN.
    match act {
        Activation::None => x,
        Activation::Relu => S::zero().max(x),
        Activation::Clip { min, max } => S::splat(max).min(S::splat(min).max(x)),
        Activation::GeluErf => gelu_erf(x),
        Activation::GeluTanh => gelu_tanh(x),
        Activation::Silu => silu(x),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CpuTier;
    use crate::reference;

    /// Applies `f` instantiated for `tier` to every element of `xs`.
    fn map_tier(tier: CpuTier, xs: &[f32], f: Func) -> Vec<f32> {
        let mut out = vec![0.0; xs.len()];
        match tier {
            #[cfg(target_arch = "x86_64")]
            CpuTier::Avx512 | CpuTier::Amx => {
                // SAFETY: the caller only passes supported tiers.
                unsafe { map_avx512(xs, &mut out, f) }
            }
            #[cfg(target_arch = "x86_64")]
            CpuTier::Avx2 => {
                // SAFETY: the caller only passes supported tiers.
                unsafe { map_avx2(xs, &mut out, f) }
            }
            _ => {
                // SAFETY: f32 lanes need no target feature.
                unsafe { map_generic::<f32>(xs, &mut out, f) }
            }
        }
        out
    }

    #[derive(Clone, Copy)]
    enum Func {
        Exp,
        Erf,
        GeluErf,
        GeluTanh,
        Silu,
    }

    #[inline(always)]
    unsafe fn map_generic<S: Simd>(xs: &[f32], out: &mut [f32], f: Func) {
        assert_eq!(xs.len() % S::LANES, 0);
        for (x, o) in xs.chunks_exact(S::LANES).zip(out.chunks_exact_mut(S::LANES)) {
            // SAFETY: both chunks hold exactly LANES values; features are the caller's contract.
            unsafe {
                let v = S::load(x.as_ptr());
                let r = match f {
                    Func::Exp => exp(v),
                    Func::Erf => erf(v),
                    Func::GeluErf => gelu_erf(v),
                    Func::GeluTanh => gelu_tanh(v),
                    Func::Silu => silu(v),
                };
                r.store(o.as_mut_ptr());
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn map_avx512(xs: &[f32], out: &mut [f32], f: Func) {
        // SAFETY: avx512f is enabled on this function.
        unsafe { map_generic::<std::arch::x86_64::__m512>(xs, out, f) }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn map_avx2(xs: &[f32], out: &mut [f32], f: Func) {
        // SAFETY: avx2 and fma are enabled on this function.
        unsafe { map_generic::<std::arch::x86_64::__m256>(xs, out, f) }
    }

    /// A dense grid over [-lim, lim] plus specials, padded to a multiple of 16 lanes.
    fn grid(lim: f32, steps: usize) -> Vec<f32> {
        let mut xs: Vec<f32> = (0..=steps).map(|i| -lim + 2.0 * lim * i as f32 / steps as f32).collect();
        xs.extend([0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 100.0, -100.0, 1e30, -1e30]);
        while !xs.len().is_multiple_of(16) {
            xs.push(0.5);
        }
        xs
    }

    #[test]
    fn erf_max_abs_error_below_1e6_every_tier() {
        let xs = grid(7.0, 200_000);
        for tier in crate::cpu::supported_tiers() {
            let ys = map_tier(tier, &xs, Func::Erf);
            let mut worst = (0.0f64, 0.0f32);
            for (&x, &y) in xs.iter().zip(&ys) {
                let err = (y as f64 - reference::erf(x as f64)).abs();
                if err > worst.0 {
                    worst = (err, x);
                }
            }
            assert!(worst.0 <= 1e-6, "{tier}: erf error {} at x = {}", worst.0, worst.1);
            assert_eq!(ys[xs.len() - 1], ys[xs.len() - 1]); // no NaN from padding
        }
    }

    #[test]
    fn erf_hand_values() {
        // erf(0.5), erf(1), erf(2) from tables.
        let xs = [0.5f32, 1.0, 2.0, -1.0, 0.0, 10.0, -10.0, 3.0];
        let mut padded = xs.to_vec();
        padded.resize(16, 0.0);
        for tier in crate::cpu::supported_tiers() {
            let ys = map_tier(tier, &padded, Func::Erf);
            let want = [0.520_499_9, 0.842_700_8, 0.995_322_3, -0.842_700_8, 0.0, 1.0, -1.0, 0.999_977_9];
            for i in 0..xs.len() {
                assert!((ys[i] - want[i]).abs() < 1e-6, "{tier} erf({}) = {}", xs[i], ys[i]);
            }
        }
    }

    #[test]
    fn exp_relative_error_small() {
        let xs = grid(87.0, 100_000);
        for tier in crate::cpu::supported_tiers() {
            let ys = map_tier(tier, &xs, Func::Exp);
            for (&x, &y) in xs.iter().zip(&ys) {
                let want = (x as f64).clamp(EXP_MIN as f64, EXP_MAX as f64).exp();
                let rel = (y as f64 - want).abs() / want;
                assert!(rel < 3e-7, "{tier}: exp({x}) = {y}, want {want}");
            }
        }
    }

    #[test]
    fn nan_propagates() {
        let mut xs = vec![f32::NAN; 16];
        xs[1] = 1.0;
        for tier in crate::cpu::supported_tiers() {
            for f in [Func::Exp, Func::Erf, Func::GeluErf, Func::GeluTanh, Func::Silu] {
                let ys = map_tier(tier, &xs, f);
                assert!(ys[0].is_nan(), "{tier}");
                assert!(ys[1].is_finite(), "{tier}");
            }
        }
    }

    #[test]
    fn activations_match_f64() {
        let xs = grid(12.0, 20_000);
        for tier in crate::cpu::supported_tiers() {
            for (f, r) in [
                (Func::GeluErf, reference::gelu_erf as fn(f64) -> f64),
                (Func::GeluTanh, reference::gelu_tanh),
                (Func::Silu, reference::silu),
            ] {
                let ys = map_tier(tier, &xs, f);
                for (&x, &y) in xs.iter().zip(&ys) {
                    let want = r(x as f64);
                    let err = (y as f64 - want).abs();
                    assert!(err <= 2e-6 * (1.0 + want.abs()), "{tier}: f({x}) = {y}, want {want}");
                }
            }
        }
    }

    #[test]
    fn activation_hand_values() {
        let mut xs = vec![1.0f32, -1.0, 0.0, 3.0];
        xs.resize(16, 0.0);
        for tier in crate::cpu::supported_tiers() {
            let g = map_tier(tier, &xs, Func::GeluErf);
            // 0.5 * (1 + erf(1/sqrt2)) = 0.8413447
            assert!((g[0] - 0.841_344_7).abs() < 1e-6, "{tier}");
            assert!((g[1] + 0.158_655_3).abs() < 1e-6, "{tier}");
            assert_eq!(g[2], 0.0);
            let s = map_tier(tier, &xs, Func::Silu);
            // 1 / (1 + e^-1) = 0.7310586
            assert!((s[0] - 0.731_058_6).abs() < 1e-6, "{tier}");
            assert!((s[3] - 2.857_722_3).abs() < 1e-5, "{tier}");
            let t = map_tier(tier, &xs, Func::GeluTanh);
            // 0.5 * (1 + tanh(0.7978846 * 1.044715)) = 0.8411920
            assert!((t[0] - 0.841_192).abs() < 1e-6, "{tier}: {}", t[0]);
        }
    }
}

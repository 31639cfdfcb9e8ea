//! Activation quantization to u8, ONNX semantics: `q = saturate(round_half_even(x / scale) +
//! zero)`, with the range of a dynamic quantization widened to include 0 (so 0 is exact):
//! `scale = (max(x, 0) - min(x, 0)) / 255` (1 when that is 0), `zero = round(-min / scale)`
//! clamped to `[0, 255]` (ONNX `DynamicQuantizeLinear`, bit for bit). NaN inputs are ignored
//! by the range and quantize to 0.

use crate::cpu::{self, CpuTier};
use crate::error::{check_tier, KernelError};

const KERNEL: &str = "quantize";

fn check_len(a: usize, b: usize) -> Result<(), KernelError> {
    if a != b {
        return Err(KernelError::shape(KERNEL, format!("input has {a} values, output {b}")));
    }
    Ok(())
}

/// Scale and zero point of the range `[lo, hi]` (which includes 0).
pub fn dynamic_params(lo: f32, hi: f32) -> (f32, u8) {
    let scale = if hi == lo { 1.0 } else { (hi - lo) / 255.0 };
    let zero = (0.0 - lo / scale).clamp(0.0, 255.0).round_ties_even();
    (scale, zero as u8)
}

/// Dynamic per-tensor quantization of `x` into `out`; returns `(scale, zero)`.
pub fn quantize_dynamic_u8(x: &[f32], out: &mut [u8]) -> Result<(f32, u8), KernelError> {
    quantize_dynamic_u8_with(cpu::tier(), x, out)
}

/// [`quantize_dynamic_u8`] with the lanes of `tier`.
pub fn quantize_dynamic_u8_with(tier: CpuTier, x: &[f32], out: &mut [u8]) -> Result<(f32, u8), KernelError> {
    check_tier(tier)?;
    check_len(x.len(), out.len())?;
    let (lo, hi) = min_max(tier, x);
    let (scale, zero) = dynamic_params(lo, hi);
    quantize(tier, x, scale, zero, out);
    Ok((scale, zero))
}

/// Dynamic per-row quantization of `x` (rows of `n`): each row gets its own scale and zero.
pub fn quantize_rows_u8(
    x: &[f32],
    n: usize,
    out: &mut [u8],
    scales: &mut [f32],
    zeros: &mut [i32],
) -> Result<(), KernelError> {
    quantize_rows_u8_with(cpu::tier(), x, n, out, scales, zeros)
}

/// [`quantize_rows_u8`] with the lanes of `tier`.
pub fn quantize_rows_u8_with(
    tier: CpuTier,
    x: &[f32],
    n: usize,
    out: &mut [u8],
    scales: &mut [f32],
    zeros: &mut [i32],
) -> Result<(), KernelError> {
    check_tier(tier)?;
    check_len(x.len(), out.len())?;
    let rows = x.len().checked_div(n).unwrap_or(0);
    if n * rows != x.len() || scales.len() < rows || zeros.len() < rows {
        return Err(KernelError::shape(
            KERNEL,
            format!("{} values are not rows of {n}, or fewer than that many scales/zeros", x.len()),
        ));
    }
    // Ranges and parameters for a group of rows first, then the group's quantization: each
    // row's reduction and divisions are a chain of latencies, and rows taken one at a time
    // waited on theirs (128 x 384: 9.6 -> 7.9 µs in `cargo bench --bench qgemm -- quantize_rows`).
    const GROUP: usize = 8;
    for r0 in (0..rows).step_by(GROUP) {
        let group = r0..(r0 + GROUP).min(rows);
        for r in group.clone() {
            let (lo, hi) = min_max(tier, &x[r * n..(r + 1) * n]);
            let (scale, zero) = dynamic_params(lo, hi);
            scales[r] = scale;
            zeros[r] = zero as i32;
        }
        for r in group {
            quantize(tier, &x[r * n..(r + 1) * n], scales[r], zeros[r] as u8, &mut out[r * n..(r + 1) * n]);
        }
    }
    Ok(())
}

/// Static quantization with a given scale (positive, finite) and zero point.
pub fn quantize_u8(x: &[f32], scale: f32, zero: u8, out: &mut [u8]) -> Result<(), KernelError> {
    quantize_u8_with(cpu::tier(), x, scale, zero, out)
}

/// [`quantize_u8`] with the lanes of `tier`.
pub fn quantize_u8_with(tier: CpuTier, x: &[f32], scale: f32, zero: u8, out: &mut [u8]) -> Result<(), KernelError> {
    check_tier(tier)?;
    check_len(x.len(), out.len())?;
    if !(scale.is_finite() && scale > 0.0) {
        return Err(KernelError::shape(KERNEL, format!("scale {scale} is not a positive finite number")));
    }
    quantize(tier, x, scale, zero, out);
    Ok(())
}

/// `out = (q - zero) * scale`.
pub fn dequantize_u8(q: &[u8], scale: f32, zero: u8, out: &mut [f32]) -> Result<(), KernelError> {
    check_len(q.len(), out.len())?;
    let z = zero as i32;
    #[cfg(target_arch = "x86_64")]
    if cpu::tier() >= CpuTier::Avx2 {
        #[target_feature(enable = "avx2")]
        unsafe fn run(q: &[u8], scale: f32, z: i32, out: &mut [f32]) {
            for (o, &v) in out.iter_mut().zip(q) {
                *o = (v as i32 - z) as f32 * scale;
            }
        }
        // SAFETY: the tier vouches for AVX2.
        unsafe { run(q, scale, z, out) };
        return Ok(());
    }
    for (o, &v) in out.iter_mut().zip(q) {
        *o = (v as i32 - z) as f32 * scale;
    }
    Ok(())
}

/// Scalar reference of the quantization of one value.
#[inline]
pub fn quantize_one(v: f32, scale: f32, zero: u8) -> u8 {
    ((v / scale).round_ties_even() + zero as f32).clamp(0.0, 255.0) as u8
}

/// `(min(x, 0), max(x, 0))`, NaN ignored.
fn min_max(tier: CpuTier, x: &[f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    match tier {
        // SAFETY: the caller checked the tier.
        CpuTier::Avx512 | CpuTier::Amx => return unsafe { x86::min_max_avx512(x) },
        CpuTier::Avx2 => return unsafe { x86::min_max_avx2(x) },
        CpuTier::Generic => {}
    }
    let _ = tier;
    min_max_scalar(x)
}

fn min_max_scalar(x: &[f32]) -> (f32, f32) {
    x.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

fn quantize(tier: CpuTier, x: &[f32], scale: f32, zero: u8, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    match tier {
        // SAFETY: the caller checked the tier and the lengths.
        CpuTier::Avx512 | CpuTier::Amx => return unsafe { x86::quantize_avx512(x, scale, zero, out) },
        CpuTier::Avx2 => return unsafe { x86::quantize_avx2(x, scale, zero, out) },
        CpuTier::Generic => {}
    }
    let _ = tier;
    for (o, &v) in out.iter_mut().zip(x) {
        *o = quantize_one(v, scale, zero);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{min_max_scalar, quantize_one};
    use std::arch::x86_64::*;

    /// Quotients beyond this saturate anyway; clamping first keeps the float-to-int conversion
    /// in range (and maps NaN to the low end, as the scalar cast does).
    const LIMIT: f32 = 512.0;

    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn min_max_avx512(x: &[f32]) -> (f32, f32) {
        // Four independent accumulator pairs: one pair waits on min/max latency every vector.
        let (mut lo, mut hi) = ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4]);
        let blocks = x.chunks_exact(64);
        let rest = blocks.remainder();
        for b in blocks {
            for u in 0..4 {
                let v = _mm512_loadu_ps(b.as_ptr().add(16 * u));
                // min/max return the second operand when either is NaN: NaN lanes keep lo/hi.
                lo[u] = _mm512_min_ps(v, lo[u]);
                hi[u] = _mm512_max_ps(v, hi[u]);
            }
        }
        let chunks = rest.chunks_exact(16);
        let tail = chunks.remainder();
        for c in chunks {
            let v = _mm512_loadu_ps(c.as_ptr());
            lo[0] = _mm512_min_ps(v, lo[0]);
            hi[0] = _mm512_max_ps(v, hi[0]);
        }
        let lo = _mm512_min_ps(_mm512_min_ps(lo[0], lo[1]), _mm512_min_ps(lo[2], lo[3]));
        let hi = _mm512_max_ps(_mm512_max_ps(hi[0], hi[1]), _mm512_max_ps(hi[2], hi[3]));
        let (l, h) = min_max_scalar(tail);
        (_mm512_reduce_min_ps(lo).min(l), _mm512_reduce_max_ps(hi).max(h))
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn min_max_avx2(x: &[f32]) -> (f32, f32) {
        let (mut lo, mut hi) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            let v = _mm256_loadu_ps(c.as_ptr());
            lo = _mm256_min_ps(v, lo);
            hi = _mm256_max_ps(v, hi);
        }
        let (mut l, mut h) = min_max_scalar(rest);
        let (mut ls, mut hs) = ([0f32; 8], [0f32; 8]);
        _mm256_storeu_ps(ls.as_mut_ptr(), lo);
        _mm256_storeu_ps(hs.as_mut_ptr(), hi);
        for (a, b) in ls.iter().zip(&hs) {
            l = l.min(*a);
            h = h.max(*b);
        }
        (l, h)
    }

    /// Quotients `x * (1 / scale)` within this of a half-integer are redone with the division:
    /// elsewhere the product rounds to the same integer as `x / scale` (they differ by at most
    /// ~3 ulp, under 2^-13 for the |quotients| <= 512 that do not saturate).
    const NEAR_HALF: f32 = 1.0 / 4096.0;

    /// `round_half_even(x / scale)` for 16 values, as i32 (`i32::MIN` for NaN and quotients
    /// below -LIMIT; quotients above LIMIT give LIMIT).
    ///
    /// A division per vector costs ~16 cycles on Intel cores: multiply by the reciprocal and
    /// divide only the lanes where that could round differently (~1 in 2000): those whose
    /// product lies within NEAR_HALF of a half-integer (`vreduceps` gives `d - round(d)`).
    #[inline(always)]
    unsafe fn quotients_avx512(v: __m512, s: __m512, inv: __m512, fast: bool) -> __m512i {
        let d = if fast {
            let d = _mm512_mul_ps(v, inv);
            let frac = _mm512_abs_ps(_mm512_reduce_ps::<{ _MM_FROUND_TO_NEAREST_INT }>(d));
            let redo = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(frac, _mm512_set1_ps(0.5 - NEAR_HALF));
            if redo != 0 {
                _mm512_mask_div_ps(d, redo, v, s)
            } else {
                d
            }
        } else {
            _mm512_div_ps(v, s)
        };
        // Only the upper end needs clamping: below, the conversion's overflow value (i32::MIN)
        // saturates to 0 like the quotient would. `d` second, so NaN passes through to it.
        // The default rounding mode (MXCSR) is round-half-even.
        _mm512_cvtps_epi32(_mm512_min_ps(_mm512_set1_ps(LIMIT), d))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512dq")]
    pub(super) unsafe fn quantize_avx512(x: &[f32], scale: f32, zero: u8, out: &mut [u8]) {
        let s = _mm512_set1_ps(scale);
        let inv = 1.0 / scale;
        let fast = inv.is_normal();
        let inv = _mm512_set1_ps(inv);
        // 64 values per step: two saturating packs (i32 -> i16 -> u8) clamp to [0, 255] with
        // far fewer instructions than per-vector clamps and narrowing stores. The packs work
        // within 128-bit lanes, so the bytes end in (lane, vector) order; one permute restores
        // them.
        let z16 = _mm512_set1_epi16(zero as i16);
        let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
        let n64 = x.len() / 64 * 64;
        for i in (0..n64).step_by(64) {
            let p = x.as_ptr().add(i);
            let r: [__m512i; 4] =
                std::array::from_fn(|u| quotients_avx512(_mm512_loadu_ps(p.add(16 * u)), s, inv, fast));
            let w0 = _mm512_adds_epi16(_mm512_packs_epi32(r[0], r[1]), z16);
            let w1 = _mm512_adds_epi16(_mm512_packs_epi32(r[2], r[3]), z16);
            let bytes = _mm512_permutexvar_epi32(order, _mm512_packus_epi16(w0, w1));
            _mm512_storeu_si512(out.as_mut_ptr().add(i) as *mut __m512i, bytes);
        }
        let z = _mm512_set1_epi32(zero as i32);
        let n16 = x.len() / 16 * 16;
        for i in (n64..n16).step_by(16) {
            let r = _mm512_add_epi32(quotients_avx512(_mm512_loadu_ps(x.as_ptr().add(i)), s, inv, fast), z);
            let r = _mm512_max_epi32(r, _mm512_setzero_si512());
            _mm_storeu_si128(out.as_mut_ptr().add(i) as *mut __m128i, _mm512_cvtusepi32_epi8(r));
        }
        for i in n16..x.len() {
            out[i] = quantize_one(x[i], scale, zero);
        }
    }

    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn quantize_avx2(x: &[f32], scale: f32, zero: u8, out: &mut [u8]) {
        let s = _mm256_set1_ps(scale);
        let z = _mm256_set1_epi32(zero as i32);
        let (lim_lo, lim_hi) = (_mm256_set1_ps(-LIMIT), _mm256_set1_ps(LIMIT));
        let gather = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let n = x.len() / 8 * 8;
        for i in (0..n).step_by(8) {
            let d = _mm256_div_ps(_mm256_loadu_ps(x.as_ptr().add(i)), s);
            let d = _mm256_min_ps(_mm256_max_ps(d, lim_lo), lim_hi);
            let r = _mm256_add_epi32(_mm256_cvtps_epi32(d), z);
            // Saturating packs clamp to [0, 255]; bytes 0-3 of each 128-bit lane hold the
            // lane's four values.
            let p = _mm256_packus_epi16(_mm256_packus_epi32(r, r), _mm256_setzero_si256());
            let p = _mm256_permutevar8x32_epi32(p, gather);
            _mm_storel_epi64(out.as_mut_ptr().add(i) as *mut __m128i, _mm256_castsi256_si128(p));
        }
        for i in n..x.len() {
            out[i] = quantize_one(x[i], scale, zero);
        }
    }
}

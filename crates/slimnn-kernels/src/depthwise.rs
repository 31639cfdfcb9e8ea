//! Depthwise convolution on channels-last (`[h, w, c]`) images.
//!
//! Channels-last, the channels of one pixel are contiguous, so a vector holds one tap for
//! `LANES` channels and the weights of a tap are one vector: each output pixel is `kh * kw`
//! FMAs with no shuffles, whatever the stride or plane size (NCHW planes of 7x7 or 14x14 leave
//! vectors mostly empty, and stride 2 there needs de-interleaving). A block of `P` output pixels
//! shares each weight load, so the loop issues about one load per FMA. Taps outside the image
//! are zero; blocks that touch the border check each tap, the rest do not.

use crate::cpu::CpuTier;
use crate::error::{check_tier, KernelError};
use crate::rows::tiered;
use crate::simd::Simd;
use std::ops::Range;

const KERNEL: &str = "depthwise_nhwc";

/// Output pixels per interior block: the weight vector of a tap is loaded once per block.
const P: usize = 8;

pub use crate::qgemm::dw::DwGeom;

impl DwGeom {
    /// Output columns `ox` whose taps all fall inside the image.
    fn interior_cols(&self) -> Range<usize> {
        interior_outputs(self.w, self.pl, self.kw, self.sw, self.ow)
    }

    /// Kernel rows `ky` whose input row falls inside the image for output row `oy`.
    fn rows_inside(&self, oy: usize) -> Range<usize> {
        taps_inside(self.h, self.pt, self.kh, self.sh, oy)
    }
}

/// Along one axis of `size` inputs with `pad` before them, a kernel of `k` taps at `stride`:
/// the outputs (of `outs`) whose taps all fall inside the input.
pub(crate) fn interior_outputs(size: usize, pad: usize, k: usize, stride: usize, outs: usize) -> Range<usize> {
    let lo = pad.div_ceil(stride);
    let hi = if size + pad >= k { (size + pad - k) / stride + 1 } else { 0 };
    lo.min(outs)..hi.clamp(lo.min(outs), outs)
}

/// Along the same axis, the taps of output `o` that fall inside the input.
pub(crate) fn taps_inside(size: usize, pad: usize, k: usize, stride: usize, o: usize) -> Range<usize> {
    let first = (o * stride) as isize - pad as isize;
    let lo = (-first).max(0) as usize;
    let hi = (size as isize - first).clamp(0, k as isize) as usize;
    lo.min(hi)..hi
}

/// `out[oy][ox][ch] = clamp(bias[ch] + Σ x[oy sh + ky - pt][ox sw + kx - pl][ch] · w[ky][kx][ch])`
/// for the output rows `rows` of `g`; `out` holds just those rows, `w` is `[kh, kw, c]`,
/// `clamp` an optional `(lo, hi)` (ReLU6 and the like). Sequential; callers split rows over
/// threads.
#[allow(clippy::too_many_arguments)]
pub fn depthwise_nhwc(
    tier: CpuTier,
    g: &DwGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
    rows: Range<usize>,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_tier(tier)?;
    let fits = g.sh > 0
        && g.sw > 0
        && x.len() == g.h * g.w * g.c
        && w.len() == g.kh * g.kw * g.c
        && bias.is_none_or(|b| b.len() == g.c)
        && rows.start <= rows.end
        && rows.end <= g.oh
        && out.len() == rows.len() * g.ow * g.c;
    if !fits {
        return Err(KernelError::shape(KERNEL, format!("{g:?}, rows {rows:?}, x {}, out {}", x.len(), out.len())));
    }
    with_job(*g, x, w, bias, g.c, clamp, |job| dw_tiered(tier, job, rows.start, rows.end, out.as_mut_ptr()));
    Ok(())
}

/// The checked operands of one depthwise or direct ([`crate::direct`]) convolution call, with
/// geometry `G`.
pub(crate) struct ConvJob<G> {
    pub(crate) g: G,
    pub(crate) x: *const f32,
    pub(crate) w: *const f32,
    /// `channels` biases (zeros when the call has none).
    pub(crate) b: *const f32,
    pub(crate) lo: f32,
    pub(crate) hi: f32,
    pub(crate) clamp: bool,
}

type Job = ConvJob<DwGeom>;

/// `body` on the job for checked operands; a missing bias reads as `channels` zeros and a
/// missing clamp as `(-inf, inf)`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn with_job<G, R>(
    g: G,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    channels: usize,
    clamp: Option<(f32, f32)>,
    body: impl FnOnce(&ConvJob<G>) -> R,
) -> R {
    let zeros;
    let bias = match bias {
        Some(b) => b,
        None => {
            zeros = vec![0.0; channels];
            &zeros
        }
    };
    let (lo, hi) = clamp.unwrap_or((f32::NEG_INFINITY, f32::INFINITY));
    body(&ConvJob { g, x: x.as_ptr(), w: w.as_ptr(), b: bias.as_ptr(), lo, hi, clamp: clamp.is_some() })
}

tiered! {
    /// [`dw_rows`] with the lanes of `tier`.
    fn dw_tiered(job: &Job, oy0: usize, oy1: usize, out: *mut f32) => dw_rows
}

/// Whole vectors of channels with `S`, the rest one lane at a time.
///
/// # Safety
/// `job`'s pointers are valid for its geometry (checked by [`depthwise_nhwc`]) and `out` for
/// rows `oy0..oy1`.
#[inline(always)]
unsafe fn dw_rows<S: Simd>(job: &Job, oy0: usize, oy1: usize, out: *mut f32) {
    let whole = job.g.c / S::LANES * S::LANES;
    dw_channels::<S>(job, oy0, oy1, 0..whole, out);
    if whole < job.g.c {
        dw_channels::<f32>(job, oy0, oy1, whole..job.g.c, out);
    }
}

/// Output rows `oy0..oy1` for channels `chans` (a multiple of `S::LANES` long), with the
/// interior kernel for this filter width where there is one (stride 1: at stride 2 the
/// specialised loop measured slower than the generic one).
#[inline(always)]
unsafe fn dw_channels<S: Simd>(job: &Job, oy0: usize, oy1: usize, chans: Range<usize>, out: *mut f32) {
    match (job.g.kw, job.g.sw) {
        (3, 1) => dw_rows_k::<S, 3, 1>(job, oy0, oy1, chans, out),
        (5, 1) => dw_rows_k::<S, 5, 1>(job, oy0, oy1, chans, out),
        _ => dw_rows_k::<S, 0, 0>(job, oy0, oy1, chans, out),
    }
}

/// [`dw_channels`] for filters `KW` wide at stride `SW` (`KW == 0`: any, read from the
/// geometry): the border columns (some taps outside the image) in checked blocks, the interior
/// in unchecked blocks of [`P`] pixels, then 4, 2 and 1.
#[inline(always)]
unsafe fn dw_rows_k<S: Simd, const KW: usize, const SW: usize>(
    job: &Job,
    oy0: usize,
    oy1: usize,
    chans: Range<usize>,
    out: *mut f32,
) {
    let g = &job.g;
    let inner = g.interior_cols();
    for oy in oy0..oy1 {
        let row = Row { oy, kys: g.rows_inside(oy), chans: chans.clone(), out: out.add((oy - oy0) * g.ow * g.c) };
        for border in [0..inner.start, inner.end..g.ow] {
            for ox0 in border.clone().step_by(BORDER) {
                pixels::<S, BORDER, true>(job, &row, ox0, BORDER.min(border.end - ox0));
            }
        }
        let mut ox0 = inner.start;
        while ox0 + P <= inner.end {
            interior::<S, P, KW, SW>(job, &row, ox0);
            ox0 += P;
        }
        if ox0 + 4 <= inner.end {
            interior::<S, 4, KW, SW>(job, &row, ox0);
            ox0 += 4;
        }
        if ox0 + 2 <= inner.end {
            interior::<S, 2, KW, SW>(job, &row, ox0);
            ox0 += 2;
        }
        if ox0 < inner.end {
            interior::<S, 1, KW, SW>(job, &row, ox0);
        }
    }
}

/// `N` interior output pixels from `ox0` of `row`, every channel block. With `KW` and `SW`
/// known, each input vector of a kernel row is loaded once and feeds every pixel whose window
/// covers it (up to `KW` FMAs), the row's `KW` weights held in registers: about half a load
/// per FMA instead of one.
#[inline(always)]
unsafe fn interior<S: Simd, const N: usize, const KW: usize, const SW: usize>(job: &Job, row: &Row, ox0: usize) {
    if KW == 0 {
        return pixels::<S, N, false>(job, row, ox0, N);
    }
    let g = &job.g;
    let c = g.c;
    let col0 = ox0 * SW - g.pl;
    let (lo, hi) = (S::splat(job.lo), S::splat(job.hi));
    for cb in row.chans.clone().step_by(S::LANES) {
        let mut acc = [S::load(job.b.add(cb)); N];
        for ky in row.kys.clone() {
            let w = job.w.add(ky * KW * c + cb);
            let mut wv = [S::zero(); KW];
            for (kx, v) in wv.iter_mut().enumerate() {
                *v = S::load(w.add(kx * c));
            }
            let mut x = job.x.add(((row.oy * g.sh + ky - g.pt) * g.w + col0) * c + cb);
            for i in 0..(N - 1) * SW + KW {
                let v = S::load(x);
                for (kx, wk) in wv.iter().enumerate() {
                    if i >= kx && (i - kx) % SW == 0 && (i - kx) / SW < N {
                        let p = (i - kx) / SW;
                        acc[p] = v.mul_add(*wk, acc[p]);
                    }
                }
                x = x.add(c);
            }
        }
        let mut o = row.out.add(ox0 * c + cb);
        for a in acc {
            let v = if job.clamp { a.max(lo).min(hi) } else { a };
            v.store(o);
            o = o.add(c);
        }
    }
}

/// Border pixels per checked block (a border is `pl / sw` or so pixels wide).
const BORDER: usize = 4;

/// One output row: its kernel rows inside the image, the channels to compute, where it goes.
struct Row {
    oy: usize,
    kys: Range<usize>,
    chans: Range<usize>,
    out: *mut f32,
}

/// `np <= N` output pixels from `ox0` of `row`, every channel block. `CHECKED` blocks skip taps
/// outside the image and pixels past `np`; unchecked ones have all `N` pixels' taps inside.
#[inline(always)]
unsafe fn pixels<S: Simd, const N: usize, const CHECKED: bool>(job: &Job, row: &Row, ox0: usize, np: usize) {
    let g = &job.g;
    let c = g.c;
    // Pixel p's leftmost tap is column `col0 + p sw`, `step` floats after pixel p - 1's.
    let col0 = (ox0 * g.sw) as isize - g.pl as isize;
    let step = (g.sw * c) as isize;
    let (lo, hi) = (S::splat(job.lo), S::splat(job.hi));
    for cb in row.chans.clone().step_by(S::LANES) {
        let mut acc = [S::load(job.b.add(cb)); N];
        for ky in row.kys.clone() {
            let x = job.x.add((row.oy * g.sh + ky - g.pt) * g.w * c + cb);
            let w = job.w.add(ky * g.kw * c + cb);
            for kx in 0..g.kw {
                let wv = S::load(w.add(kx * c));
                let first = col0 + kx as isize;
                if CHECKED {
                    for (p, a) in acc.iter_mut().enumerate() {
                        let ix = first + (p * g.sw) as isize;
                        if p < np && ix >= 0 && ix < g.w as isize {
                            *a = S::load(x.offset(ix * c as isize)).mul_add(wv, *a);
                        }
                    }
                } else {
                    let xp = x.offset(first * c as isize);
                    for (p, a) in acc.iter_mut().enumerate() {
                        *a = S::load(xp.offset(p as isize * step)).mul_add(wv, *a);
                    }
                }
            }
        }
        let mut o = row.out.add(ox0 * c + cb);
        for a in acc.iter().take(np) {
            let v = if job.clamp { a.max(lo).min(hi) } else { *a };
            v.store(o);
            o = o.add(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference;
    use proptest::prelude::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn geom(c: usize, h: usize, w: usize, k: usize, s: usize, pad: usize) -> DwGeom {
        let (oh, ow) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
        DwGeom { c, h, w, kh: k, kw: k, sh: s, sw: s, pt: pad, pl: pad, oh, ow }
    }

    fn check(g: DwGeom, bias: bool, clamp: Option<(f32, f32)>, split: usize, seed: u64) {
        let x = values(g.h * g.w * g.c, seed);
        let w = values(g.kh * g.kw * g.c, seed + 1);
        let b = values(g.c, seed + 2);
        let b = bias.then_some(&b[..]);
        let want = reference::depthwise_nhwc(&g, &x, &w, b, clamp);
        for tier in CpuTier::ALL.into_iter().filter(|t| t.is_supported()) {
            let mut got = vec![f32::NAN; want.len()];
            let cut = split.min(g.oh);
            let (top, bottom) = got.split_at_mut(cut * g.ow * g.c);
            depthwise_nhwc(tier, &g, &x, &w, b, clamp, 0..cut, top).unwrap();
            depthwise_nhwc(tier, &g, &x, &w, b, clamp, cut..g.oh, bottom).unwrap();
            for (i, (&gv, &wv)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-5 * (1.0 + wv.abs());
                assert!((gv as f64 - wv).abs() <= tol, "{tier:?} {g:?} at {i}: {gv} vs {wv}");
            }
        }
    }

    #[test]
    fn efficientnet_shapes_match_reference() {
        check(geom(32, 112, 112, 3, 1, 1), true, Some((0.0, 6.0)), 50, 1);
        check(geom(96, 112, 112, 3, 2, 1), true, Some((0.0, 6.0)), 20, 2);
        check(geom(144, 56, 56, 5, 2, 2), true, Some((0.0, 6.0)), 7, 3);
        check(geom(240, 28, 28, 3, 2, 1), true, None, 3, 4);
        check(geom(672, 14, 14, 5, 1, 2), false, Some((0.0, 6.0)), 13, 5);
        check(geom(1152, 7, 7, 3, 1, 1), true, Some((0.0, 6.0)), 0, 6);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn matches_reference(
            c in 1usize..40, h in 1usize..20, w in 1usize..20, k in 1usize..6,
            s in 1usize..4, pad in 0usize..3, bias in any::<bool>(), clamp in any::<bool>(),
            split in 0usize..20, seed in 0u64..1000,
        ) {
            let pad = pad.min(k - 1);
            prop_assume!(h + 2 * pad >= k && w + 2 * pad >= k);
            check(geom(c, h, w, k, s, pad), bias, clamp.then_some((-0.5, 0.7)), split, seed);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let g = geom(4, 5, 5, 3, 1, 1);
        let (x, w) = (vec![0.0; 100], vec![0.0; 36]);
        let mut out = vec![0.0; 100];
        assert!(depthwise_nhwc(CpuTier::Generic, &g, &x, &w, None, None, 0..5, &mut out).is_ok());
        assert!(depthwise_nhwc(CpuTier::Generic, &g, &x[1..], &w, None, None, 0..5, &mut out).is_err());
        assert!(depthwise_nhwc(CpuTier::Generic, &g, &x, &w, Some(&[0.0; 3]), None, 0..5, &mut out).is_err());
        assert!(depthwise_nhwc(CpuTier::Generic, &g, &x, &w, None, None, 0..6, &mut out).is_err());
        assert!(depthwise_nhwc(CpuTier::Generic, &g, &x, &w, None, None, 1..5, &mut out).is_err());
    }
}

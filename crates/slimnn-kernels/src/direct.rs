//! Direct convolution of an NCHW image with few channels into channels-last output: a CNN's
//! stem (3 input channels, 3x3 to 7x7, stride 2).
//!
//! As im2col + GEMM, such a layer has K = `c_in * kh * kw` of 27 to 147, and gathering the
//! columns costs as much as the products: EfficientNet-lite0's 3 -> 32 stem took 0.36-0.42 ms
//! that way on one core, about half of it the gather. Here a block of output pixels holds
//! two vectors of output channels each in registers, and every tap costs the block its weight
//! vectors (shared by the pixels) and one broadcast input value per pixel; the inputs are read
//! in place. Blocks whose taps all fall inside the image run unchecked, border pixels check
//! each tap.

use crate::cpu::CpuTier;
use crate::depthwise::{interior_outputs, taps_inside, with_job, ConvJob};
use crate::error::{check_tier, KernelError};
use crate::rows::tiered;
use crate::simd::Simd;
use std::ops::Range;

const KERNEL: &str = "conv_direct_nhwc";

/// Vectors of output channels per block: with [`PIXELS`] pixels, 24 accumulators.
const NV: usize = 2;
/// Output pixels per interior block.
const PIXELS: usize = 12;

/// One image's convolution: `c_in` planes of `h x w` in, `oh x ow` pixels of `c_out` out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectGeom {
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    /// Top and left padding (the bottom and right follow from `oh`, `ow`).
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
}

impl DirectGeom {
    /// Output columns whose taps all fall inside the image.
    fn interior_cols(&self) -> Range<usize> {
        interior_outputs(self.w, self.pl, self.kw, self.sw, self.ow)
    }

    /// Kernel rows whose input row falls inside the image for output row `oy`.
    fn rows_inside(&self, oy: usize) -> Range<usize> {
        taps_inside(self.h, self.pt, self.kh, self.sh, oy)
    }
}

/// `out[oy][ox][co] = clamp(bias[co] + Σ x[ci][oy sh + ky - pt][ox sw + kx - pl] · w[ci][ky][kx][co])`
/// for output rows `rows` of `g`; `x` is NCHW (`[c_in, h, w]`), `w` is `[c_in, kh, kw, c_out]`,
/// `out` holds just those rows channels-last, `clamp` an optional `(lo, hi)`. Sequential;
/// callers split rows over threads.
#[allow(clippy::too_many_arguments)]
pub fn conv_direct_nhwc(
    tier: CpuTier,
    g: &DirectGeom,
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
        && x.len() == g.c_in * g.h * g.w
        && w.len() == g.c_in * g.kh * g.kw * g.c_out
        && bias.is_none_or(|b| b.len() == g.c_out)
        && rows.start <= rows.end
        && rows.end <= g.oh
        && out.len() == rows.len() * g.ow * g.c_out;
    if !fits {
        return Err(KernelError::shape(KERNEL, format!("{g:?}, rows {rows:?}, x {}, out {}", x.len(), out.len())));
    }
    with_job(*g, x, w, bias, g.c_out, clamp, |job| direct_tiered(tier, job, rows.start, rows.end, out.as_mut_ptr()));
    Ok(())
}

type Job = ConvJob<DirectGeom>;

tiered! {
    /// [`direct_rows`] with the lanes of `tier`.
    fn direct_tiered(job: &Job, oy0: usize, oy1: usize, out: *mut f32) => direct_rows
}

/// Output channels in blocks of [`NV`] vectors of `S`, then single vectors, then one lane at
/// a time.
///
/// # Safety
/// `job`'s pointers are valid for its geometry (checked by [`conv_direct_nhwc`]) and `out` for
/// rows `oy0..oy1`.
#[inline(always)]
unsafe fn direct_rows<S: Simd>(job: &Job, oy0: usize, oy1: usize, out: *mut f32) {
    let c = job.g.c_out;
    let pairs = c / (NV * S::LANES) * NV * S::LANES;
    let whole = c / S::LANES * S::LANES;
    for cb in (0..pairs).step_by(NV * S::LANES) {
        channel_block::<S, NV>(job, oy0, oy1, cb, out);
    }
    for cb in (pairs..whole).step_by(S::LANES) {
        channel_block::<S, 1>(job, oy0, oy1, cb, out);
    }
    for cb in whole..c {
        channel_block::<f32, 1>(job, oy0, oy1, cb, out);
    }
}

/// Output rows `oy0..oy1` for the `V` vectors of channels from `cb`: border pixels one by one
/// (checked), the interior in blocks of [`PIXELS`], then 4 and 1.
#[inline(always)]
unsafe fn channel_block<S: Simd, const V: usize>(job: &Job, oy0: usize, oy1: usize, cb: usize, out: *mut f32) {
    let g = &job.g;
    let inner = g.interior_cols();
    for oy in oy0..oy1 {
        let row = Row { oy, kys: g.rows_inside(oy), cb, out: out.add((oy - oy0) * g.ow * g.c_out) };
        for ox in (0..inner.start).chain(inner.end..g.ow) {
            pixels::<S, V, 1, true>(job, &row, ox);
        }
        let mut ox = inner.start;
        while ox + PIXELS <= inner.end {
            pixels::<S, V, PIXELS, false>(job, &row, ox);
            ox += PIXELS;
        }
        while ox + 4 <= inner.end {
            pixels::<S, V, 4, false>(job, &row, ox);
            ox += 4;
        }
        while ox < inner.end {
            pixels::<S, V, 1, false>(job, &row, ox);
            ox += 1;
        }
    }
}

/// One output row: its kernel rows inside the image, the first channel, where the row goes.
struct Row {
    oy: usize,
    kys: Range<usize>,
    cb: usize,
    out: *mut f32,
}

/// `N` output pixels from `ox0`, `V` vectors of channels from `row.cb`. `CHECKED` pixels
/// skip taps outside the image; unchecked ones have every tap inside.
#[inline(always)]
unsafe fn pixels<S: Simd, const V: usize, const N: usize, const CHECKED: bool>(job: &Job, row: &Row, ox0: usize) {
    let g = &job.g;
    let (co, plane) = (g.c_out, g.h * g.w);
    let col0 = (ox0 * g.sw) as isize - g.pl as isize;
    let mut acc = [[S::zero(); V]; N];
    for a in acc.iter_mut() {
        for (j, v) in a.iter_mut().enumerate() {
            *v = S::load(job.b.add(row.cb + j * S::LANES));
        }
    }
    for ci in 0..g.c_in {
        for ky in row.kys.clone() {
            let x = job.x.add(ci * plane + (row.oy * g.sh + ky - g.pt) * g.w);
            let w = job.w.add(((ci * g.kh + ky) * g.kw) * co + row.cb);
            for kx in 0..g.kw {
                let first = col0 + kx as isize;
                if CHECKED && (first < 0 || first >= g.w as isize) {
                    continue;
                }
                let mut wv = [S::zero(); V];
                for (j, v) in wv.iter_mut().enumerate() {
                    *v = S::load(w.add(kx * co + j * S::LANES));
                }
                for (p, a) in acc.iter_mut().enumerate() {
                    let xv = S::splat(*x.offset(first + (p * g.sw) as isize));
                    for (v, &wj) in a.iter_mut().zip(&wv) {
                        *v = xv.mul_add(wj, *v);
                    }
                }
            }
        }
    }
    let (lo, hi) = (S::splat(job.lo), S::splat(job.hi));
    for (p, a) in acc.iter().enumerate() {
        let o = row.out.add((ox0 + p) * co + row.cb);
        for (j, &v) in a.iter().enumerate() {
            let v = if job.clamp { v.max(lo).min(hi) } else { v };
            v.store(o.add(j * S::LANES));
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

    /// `(pt, pb)` padding of rows (and columns) as given.
    fn geom(c_in: usize, hw: usize, c_out: usize, k: usize, s: usize, (pt, pb): (usize, usize)) -> DirectGeom {
        let o = (hw + pt + pb - k) / s + 1;
        DirectGeom { c_in, h: hw, w: hw, c_out, kh: k, kw: k, sh: s, sw: s, pt, pl: pt, oh: o, ow: o }
    }

    fn check(g: DirectGeom, bias: bool, clamp: Option<(f32, f32)>, split: usize, seed: u64) {
        let x = values(g.c_in * g.h * g.w, seed);
        let w = values(g.c_in * g.kh * g.kw * g.c_out, seed + 1);
        let b = values(g.c_out, seed + 2);
        let b = bias.then_some(&b[..]);
        let want = reference::conv_direct_nhwc(&g, &x, &w, b, clamp);
        for tier in CpuTier::ALL.into_iter().filter(|t| t.is_supported()) {
            let mut got = vec![f32::NAN; want.len()];
            let cut = split.min(g.oh);
            let (top, bottom) = got.split_at_mut(cut * g.ow * g.c_out);
            conv_direct_nhwc(tier, &g, &x, &w, b, clamp, 0..cut, top).unwrap();
            conv_direct_nhwc(tier, &g, &x, &w, b, clamp, cut..g.oh, bottom).unwrap();
            for (i, (&gv, &wv)) in got.iter().zip(&want).enumerate() {
                let tol = 1e-5 * (1.0 + wv.abs());
                assert!((gv as f64 - wv).abs() <= tol, "{tier:?} {g:?} at {i}: {gv} vs {wv}");
            }
        }
    }

    #[test]
    fn stems_match_reference() {
        // EfficientNet (TF "same": no top padding, one row below), MobileNet, ResNet.
        check(geom(3, 224, 32, 3, 2, (0, 1)), true, Some((0.0, 6.0)), 50, 1);
        check(geom(3, 224, 32, 3, 2, (1, 1)), false, None, 111, 2);
        check(geom(3, 224, 64, 7, 2, (3, 3)), true, Some((0.0, f32::INFINITY)), 3, 3);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        #[test]
        fn matches_reference(
            c_in in 1usize..5, hw in 1usize..30, c_out in 1usize..72, k in 1usize..8,
            s in 1usize..4, pt in 0usize..4, pb in 0usize..4, bias in any::<bool>(), clamp in any::<bool>(),
            split in 0usize..20, seed in 0u64..1000,
        ) {
            let (pt, pb) = (pt.min(k - 1), pb.min(k - 1));
            prop_assume!(hw + pt + pb >= k);
            check(geom(c_in, hw, c_out, k, s, (pt, pb)), bias, clamp.then_some((-0.5, 0.7)), split, seed);
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let g = geom(3, 5, 16, 3, 1, (1, 1));
        let (x, w) = (vec![0.0; 75], vec![0.0; 432]);
        let mut out = vec![0.0; 400];
        assert!(conv_direct_nhwc(CpuTier::Generic, &g, &x, &w, None, None, 0..5, &mut out).is_ok());
        assert!(conv_direct_nhwc(CpuTier::Generic, &g, &x[1..], &w, None, None, 0..5, &mut out).is_err());
        assert!(conv_direct_nhwc(CpuTier::Generic, &g, &x, &w[1..], None, None, 0..5, &mut out).is_err());
        assert!(conv_direct_nhwc(CpuTier::Generic, &g, &x, &w, Some(&[0.0; 3]), None, 0..5, &mut out).is_err());
        assert!(conv_direct_nhwc(CpuTier::Generic, &g, &x, &w, None, None, 0..6, &mut out).is_err());
        assert!(conv_direct_nhwc(CpuTier::Generic, &g, &x, &w, None, None, 1..5, &mut out).is_err());
    }
}

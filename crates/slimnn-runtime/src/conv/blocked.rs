//! Depthwise convolutions on narrow planes, 16 channels at a time (AVX-512).
//!
//! With fewer than 16 outputs per row, a vector of one channel's outputs is mostly padding and
//! every channel pays the plane's setup: EfficientNet's 7x7 and 14x14 layers ran at 7-20
//! GMAC/s that way. Here a block of 16 channels is transposed so that one vector holds the 16
//! channels of one pixel (`[pixel][16]`, zero-bordered), every tap is one multiply-add per
//! output pixel with a vector of the block's 16 weights, and the outputs are transposed back.
//! Each output still adds its taps in `(ky, kx)` order from the bias, so results equal the
//! per-plane kernels' bit for bit.

use super::ConvGeom;

/// Channels per block: one AVX-512 register of f32.
pub(super) const BLOCK: usize = 16;

/// Whether a depthwise convolution of this geometry runs blocked: the per-plane kernels write
/// whole 16-output vectors per row, so narrow planes waste most of each.
pub(super) fn suits(g: &ConvGeom) -> bool {
    g.ow < 16 && g.kh * g.kw <= 64
}

/// Weights `[c][taps]` as `[c / 16 blocks][taps][16]`, zero past the last channel.
pub(super) fn pack_weights(w: &[f32], c: usize, taps: usize) -> Vec<f32> {
    let blocks = c.div_ceil(BLOCK);
    let mut out = vec![0.0; blocks * taps * BLOCK];
    for ch in 0..c {
        let (b, lane) = (ch / BLOCK, ch % BLOCK);
        for t in 0..taps {
            out[(b * taps + t) * BLOCK + lane] = w[ch * taps + t];
        }
    }
    out
}

/// One block of channels: what it reads and writes.
pub(super) struct Block<'a> {
    pub geom: &'a ConvGeom,
    /// The block's input planes (`lanes` of them, `h * w` each).
    pub x: &'a [f32],
    /// `[taps][16]` weights.
    pub w: &'a [f32],
    /// Per-channel bias, `lanes` of them.
    pub bias: Option<&'a [f32]>,
    pub clamp: Option<(f32, f32)>,
    /// Channels in this block (16 but for the last).
    pub lanes: usize,
}

#[cfg(target_arch = "x86_64")]
pub(super) use x86::run_block;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Block, BLOCK};
    use slimnn_kernels::matmul::x86::transpose_16x16;
    use std::arch::x86_64::*;

    /// Scratch for the transposed input (zero border kept between blocks of one geometry) and
    /// output of one block.
    pub struct Scratch {
        input: Vec<f32>,
        output: Vec<f32>,
        geom: Option<super::ConvGeom>,
    }

    thread_local! {
        static SCRATCH: std::cell::RefCell<Scratch> =
            const { std::cell::RefCell::new(Scratch { input: Vec::new(), output: Vec::new(), geom: None }) };
    }

    /// Runs one block into `out` (its `lanes` output planes).
    ///
    /// # Safety
    /// AVX-512 F on the host.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn run_block(b: &Block, out: &mut [f32]) {
        let g = b.geom;
        assert!(b.lanes >= 1 && b.lanes <= BLOCK && b.x.len() == b.lanes * g.h * g.w);
        assert!(out.len() == b.lanes * g.oh * g.ow && b.w.len() == g.kh * g.kw * BLOCK);
        let (ph, pw) = ((g.oh - 1) * g.sh + g.kh, (g.ow - 1) * g.sw + g.kw);
        SCRATCH.with(|s| {
            let mut own = Scratch { input: Vec::new(), output: Vec::new(), geom: None };
            let mut held = s.try_borrow_mut();
            let s = held.as_deref_mut().unwrap_or(&mut own);
            if s.geom != Some(*g) {
                s.input.clear();
                s.input.resize(ph * pw * BLOCK + BLOCK, 0.0);
                s.geom = Some(*g);
            }
            // Room for whole 16-pixel groups when transposing back.
            let out_len = (g.oh * g.ow).div_ceil(BLOCK) * BLOCK * BLOCK;
            s.output.resize(out_len + BLOCK, 0.0);
            // Both from a 64-byte boundary: each pixel's vector then sits in one cache line.
            let input = &mut aligned(&mut s.input)[..ph * pw * BLOCK];
            pack_input(b, ph, pw, input);
            let output = &mut aligned(&mut s.output)[..out_len];
            compute(b, pw, input, output);
            unpack_output(b, output, out);
        })
    }

    /// `v` from its first 64-byte boundary (`v` has 16 values to spare).
    fn aligned(v: &mut [f32]) -> &mut [f32] {
        let skip = v.as_ptr().align_offset(64).min(BLOCK);
        &mut v[skip..]
    }

    /// The block's planes into `[ph][pw][16]` (interior only; the border stays zero).
    #[inline(always)]
    unsafe fn pack_input(b: &Block, ph: usize, pw: usize, dst: &mut [f32]) {
        let g = b.geom;
        let hw = g.h * g.w;
        let (mut iy, mut ix) = (0, 0);
        for p0 in (0..hw).step_by(BLOCK) {
            let n = BLOCK.min(hw - p0);
            let mask = if n == BLOCK { 0xffff } else { (1u16 << n) - 1 };
            let mut v: [__m512; BLOCK] = std::array::from_fn(|c| {
                if c < b.lanes {
                    _mm512_maskz_loadu_ps(mask, b.x.as_ptr().add(c * hw + p0))
                } else {
                    _mm512_setzero_ps()
                }
            });
            transpose_16x16(&mut v);
            for pixel in v.iter().take(n) {
                let (py, px) = (iy + g.pt, ix + g.pl);
                if py < ph && px < pw {
                    _mm512_storeu_ps(dst.as_mut_ptr().add((py * pw + px) * BLOCK), *pixel);
                }
                ix += 1;
                if ix == g.w {
                    ix = 0;
                    iy += 1;
                }
            }
        }
    }

    /// `[oh * ow][16]` outputs: bias, every tap in `(ky, kx)` order, clamp.
    #[inline(always)]
    unsafe fn compute(b: &Block, pw: usize, src: &[f32], dst: &mut [f32]) {
        let g = b.geom;
        let mut ox0 = 0;
        while ox0 < g.ow {
            // Up to 8 outputs of a row at once (8 accumulators; 14-wide rows in two 7s).
            let runs = (g.ow - ox0).div_ceil(8);
            let n = (g.ow - ox0).div_ceil(runs);
            match n {
                8 => row_runs::<8>(b, pw, src, dst, ox0),
                7 => row_runs::<7>(b, pw, src, dst, ox0),
                6 => row_runs::<6>(b, pw, src, dst, ox0),
                5 => row_runs::<5>(b, pw, src, dst, ox0),
                4 => row_runs::<4>(b, pw, src, dst, ox0),
                3 => row_runs::<3>(b, pw, src, dst, ox0),
                2 => row_runs::<2>(b, pw, src, dst, ox0),
                _ => row_runs::<1>(b, pw, src, dst, ox0),
            }
            ox0 += n;
        }
    }

    /// Outputs `ox0 .. ox0 + X` of every row.
    #[inline(always)]
    unsafe fn row_runs<const X: usize>(b: &Block, pw: usize, src: &[f32], dst: &mut [f32], ox0: usize) {
        let g = b.geom;
        let mask = if b.lanes == BLOCK { 0xffff } else { (1u16 << b.lanes) - 1 };
        let bias = b.bias.map_or(_mm512_setzero_ps(), |v| _mm512_maskz_loadu_ps(mask, v.as_ptr()));
        let clamp = b.clamp.map(|(lo, hi)| (_mm512_set1_ps(lo), _mm512_set1_ps(hi)));
        let (s, w) = (src.as_ptr(), b.w.as_ptr());
        for oy in 0..g.oh {
            let mut acc = [bias; X];
            for ky in 0..g.kh {
                let row = s.add(((oy * g.sh + ky) * pw + ox0 * g.sw) * BLOCK);
                for kx in 0..g.kw {
                    let wv = _mm512_loadu_ps(w.add((ky * g.kw + kx) * BLOCK));
                    let p = row.add(kx * BLOCK);
                    for (x, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(wv, _mm512_loadu_ps(p.add(x * g.sw * BLOCK)), *a);
                    }
                }
            }
            let o = dst.as_mut_ptr().add((oy * g.ow + ox0) * BLOCK);
            for (x, a) in acc.iter().enumerate() {
                // max then min: a NaN sum becomes lo, as the per-plane kernels do.
                let v = clamp.map_or(*a, |(lo, hi)| _mm512_min_ps(_mm512_max_ps(*a, lo), hi));
                _mm512_storeu_ps(o.add(x * BLOCK), v);
            }
        }
    }

    /// `[oh * ow][16]` back to the block's `lanes` output planes.
    #[inline(always)]
    unsafe fn unpack_output(b: &Block, src: &[f32], out: &mut [f32]) {
        let ohw = b.geom.oh * b.geom.ow;
        for p0 in (0..ohw).step_by(BLOCK) {
            let n = BLOCK.min(ohw - p0);
            let mask = if n == BLOCK { 0xffff } else { (1u16 << n) - 1 };
            // `src` has whole 16-pixel groups; the rows past `ohw` are never stored.
            let mut v: [__m512; BLOCK] = std::array::from_fn(|i| _mm512_loadu_ps(src.as_ptr().add((p0 + i) * BLOCK)));
            transpose_16x16(&mut v);
            for (c, plane) in v.iter().take(b.lanes).enumerate() {
                _mm512_mask_storeu_ps(out.as_mut_ptr().add(c * ohw + p0), mask, *plane);
            }
        }
    }
}

//! bf16 products with f32 accumulation: B packed as bf16 pairs, A rounded to bf16 per call.
//!
//! The layout follows AVX-512 BF16's `vdpbf16ps`, which adds `a[2i]·b[2i] + a[2i+1]·b[2i+1]`
//! into f32 lane `i`: a packed panel row holds, for each of its NR columns, the pair
//! `(B[2p][j], B[2p+1][j])` in one 32-bit slot, and A is converted to rows of pairs. Both are
//! then `ceil(k/2)`-deep f32-sized matrices, so the f32 driver's blocking, threading and
//! epilogues apply unchanged with `k' = ceil(k/2)`.
//!
//! Rounding is to nearest even, denormal inputs flushed to zero (as the hardware conversion
//! does); products of two bf16 values are exact in f32, so the only differences from an f32
//! GEMM on the rounded inputs are the summation order and the f32 additions.

#![allow(clippy::too_many_arguments)] // kernel signatures: raw pointers and strides, kept flat for speed

use super::kernels::{epilogue_body, Prefetch, TileEpilogue, TileKernel};
use super::Par;
use crate::cpu::{self, CpuTier};
use rayon::prelude::*;

/// Whether bf16 products run on a native dot-product instruction here (AVX-512 BF16 under
/// the active tier); elsewhere they run on scalar code and f32 is faster.
pub fn native() -> bool {
    native_for(cpu::tier())
}

/// Whether `tier`'s bf16 kernel is the AVX-512 BF16 one on this host.
pub(crate) fn native_for(tier: CpuTier) -> bool {
    tier >= CpuTier::Avx512 && cpu::features().avx512bf16
}

/// `x` rounded to the nearest bf16 (ties to even), as raw bits; NaN stays NaN (quiet) and
/// denormals become zero of the same sign.
pub fn round_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    if x.is_subnormal() {
        return ((bits >> 16) & 0x8000) as u16;
    }
    let rounded = bits.wrapping_add(0x7fff + ((bits >> 16) & 1));
    (rounded >> 16) as u16
}

/// The f32 value of bf16 bits.
pub fn bf16_to_f32(bits: u16) -> f32 {
    half::bf16::from_bits(bits).to_f32()
}

/// The bf16 value in the high (`high`) or low half of a 32-bit slot, as f32.
pub(crate) fn slot_half(slot: f32, high: bool) -> f32 {
    bf16_to_f32((slot.to_bits() >> if high { 16 } else { 0 }) as u16)
}

/// Two bf16 values in one 32-bit slot, `lo` first in memory.
#[inline]
pub(crate) fn pair(lo: f32, hi: f32) -> f32 {
    f32::from_bits(round_bf16_bits(lo) as u32 | ((round_bf16_bits(hi) as u32) << 16))
}

/// One packed panel row of bf16 pairs: `out[j] = (lo[j], hi[j])` rounded, zero past `lo.len()`
/// (and for a missing `hi` row). Only called where [`native_for`] `tier` holds, with `out.len()`
/// a multiple of 16 and `hi`, when given, as long as `lo`.
pub(crate) fn pack_pair_row(tier: CpuTier, lo: &[f32], hi: Option<&[f32]>, out: &mut [f32]) {
    let lengths_ok = out.len().is_multiple_of(16) && lo.len() <= out.len() && hi.is_none_or(|h| h.len() == lo.len());
    assert!(native_for(tier) && lengths_ok);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX-512 F, BW and BF16 are present (`native_for`); lengths checked above.
    unsafe {
        x86::pack_pair_row(lo, hi, out)
    }
}

/// Converts `m` rows of A (`k` values each, stride `lda`) to rows of `ceil(k/2)` bf16 pairs in
/// `out` (stride `ceil(k/2)`), the odd tail paired with zero.
pub(crate) fn convert_a(m: usize, k: usize, a: &[f32], lda: usize, out: &mut [f32], tier: CpuTier, par: Par<'_>) {
    convert_rows(m, k, a, lda, out, k.div_ceil(2).max(1), par, |row, dst| convert_row(row, dst, tier));
}

/// Converts `m` rows of A (`k` values each, stride `lda`) with `convert` into rows of `width`
/// slots in `out`.
pub(crate) fn convert_rows(
    m: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    out: &mut [f32],
    width: usize,
    par: Par<'_>,
    convert: impl Fn(&[f32], &mut [f32]) + Sync + Send,
) {
    const ROWS_PER_TASK: usize = 64;
    run_chunks(&mut out[..m * width], ROWS_PER_TASK * width, m, par, |(r, dst)| {
        for (i, row) in dst.chunks_exact_mut(width).enumerate() {
            convert(&a[(r * ROWS_PER_TASK + i) * lda..][..k], row);
        }
    });
}

/// Runs `f` on each `chunk`-slot piece of `out` (with its index), over the pool's threads where
/// there are at least 64 `rows` per thread: for large batches a conversion of A reads tens of
/// MB, too much to leave to the calling thread alone.
pub(crate) fn run_chunks(
    out: &mut [f32],
    chunk: usize,
    rows: usize,
    par: Par<'_>,
    f: impl Fn((usize, &mut [f32])) + Sync + Send,
) {
    let threads = par.threads().min(rows / 64);
    if threads <= 1 {
        return out.chunks_mut(chunk).enumerate().for_each(f);
    }
    let mut run = move || out.par_chunks_mut(chunk).enumerate().for_each(&f);
    match par {
        Par::Pool(pool) => pool.install(run),
        _ => run(),
    }
}

/// One row of `k` values to `ceil(k/2)` pairs.
pub(crate) fn convert_row(row: &[f32], dst: &mut [f32], tier: CpuTier) {
    #[cfg(target_arch = "x86_64")]
    if native_for(tier) {
        // SAFETY: AVX-512 BF16 and BW are present (native_for); `dst` has room for
        // ceil(k/2) slots.
        return unsafe { x86::convert_row(row, dst) };
    }
    let _ = tier;
    for (p, slot) in dst.iter_mut().enumerate() {
        let lo = row[2 * p];
        let hi = row.get(2 * p + 1).copied().unwrap_or(0.0);
        *slot = pair(lo, hi);
    }
}

/// The portable bf16 kernel for a tier's tile shape: plain loops over the pairs (the
/// reference the native kernel is tested against, and the path on hosts without BF16).
pub(crate) struct ScalarBf16<const MR: usize, const NR: usize>;

impl<const MR: usize, const NR: usize> TileKernel for ScalarBf16<MR, NR> {
    const MR: usize = MR;
    const NR: usize = NR;
    const LANES: usize = 1;
    const MC: usize = MR * 16;
    const KC: usize = 256;
    const NC_PANELS: usize = 16;

    unsafe fn tile(
        mr: usize,
        width: usize,
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
        _pf: Prefetch,
        ep: *const TileEpilogue,
    ) {
        for i in 0..mr {
            for j in 0..width {
                let mut acc = 0.0f32;
                for p in 0..kc {
                    let (x, y) = (*a.add(i * lda + p), *b.add(p * NR + j));
                    // vdpbf16ps's order: the odd pair first.
                    acc += slot_half(x, true) * slot_half(y, true);
                    acc += slot_half(x, false) * slot_half(y, false);
                }
                let cp = c.add(i * ldc + j);
                *cp = if load_c { *cp + acc } else { acc };
            }
        }
        if !ep.is_null() {
            epilogue_body::<f32>(mr, width, c, ldc, &*ep);
        }
    }

    unsafe fn epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
        epilogue_body::<f32>(rows, cols, c, ldc, ep)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{AmxBf16, Avx512Bf16};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kernels::{prefetch_tile, store_tile, tile_dispatch, Avx512};
    use super::*;
    use crate::amx;
    use crate::simd::Simd;
    use std::arch::x86_64::*;

    /// Rounds one row to bf16 pairs, 32 values per conversion.
    ///
    /// # Safety
    /// AVX-512 F, BW and BF16 must be present; `dst.len() >= ceil(row.len() / 2)`.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn convert_row(row: &[f32], dst: &mut [f32]) {
        let k = row.len();
        let (src, out) = (row.as_ptr(), dst.as_mut_ptr().cast::<u16>());
        let mut p = 0;
        while p + 32 <= k {
            let v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src.add(p + 16)), _mm512_loadu_ps(src.add(p)));
            _mm512_storeu_si512(out.add(p).cast(), std::mem::transmute::<__m512bh, __m512i>(v));
            p += 32;
        }
        if p < k {
            // The tail: masked loads read zeros past the row; the store covers whole pairs.
            let rest = k - p;
            let lo_mask: __mmask16 = if rest >= 16 { 0xffff } else { (1u16 << rest) - 1 };
            let hi_mask: __mmask16 = if rest > 16 { ((1u32 << (rest - 16)) - 1) as u16 } else { 0 };
            let lo = _mm512_maskz_loadu_ps(lo_mask, src.add(p));
            let hi = _mm512_maskz_loadu_ps(hi_mask, src.add(p + 16));
            let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo));
            let slots = rest.div_ceil(2) * 2;
            let store_mask: __mmask32 = if slots >= 32 { u32::MAX } else { (1u32 << slots) - 1 };
            _mm512_mask_storeu_epi16(out.add(p).cast(), store_mask, v);
        }
    }

    /// See [`super::pack_pair_row`]: two rows rounded by one conversion, interleaved by a word
    /// permute.
    ///
    /// # Safety
    /// AVX-512 F, BW and BF16 must be present; lengths as [`super::pack_pair_row`] checks.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub(super) unsafe fn pack_pair_row(lo: &[f32], hi: Option<&[f32]>, out: &mut [f32]) {
        // Word i of the result takes word INTERLEAVE[i] of [lo x16 | hi x16].
        let interleave = _mm512_set_epi16(
            31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17,
            1, 16, 0,
        );
        let w = lo.len();
        for j in (0..out.len()).step_by(16) {
            let mask: __mmask16 = if j >= w {
                0
            } else if w - j >= 16 {
                0xffff
            } else {
                (1u16 << (w - j)) - 1
            };
            let l = _mm512_maskz_loadu_ps(mask, lo.as_ptr().wrapping_add(j));
            let h = match hi {
                Some(h) => _mm512_maskz_loadu_ps(mask, h.as_ptr().wrapping_add(j)),
                None => _mm512_setzero_ps(),
            };
            let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(h, l));
            _mm512_storeu_si512(out.as_mut_ptr().add(j).cast(), _mm512_permutexvar_epi16(interleave, both));
        }
    }

    /// AVX-512 BF16 kernels: the f32 kernels' 8 x 48 tile and blocking, `vdpbf16ps` for the
    /// FMA (two multiply-adds per lane and instruction).
    pub(crate) struct Avx512Bf16;

    /// `MR x 16*NV` tile: per pair step 3 panel loads and 8 broadcasts feed 24 `vdpbf16ps`.
    ///
    /// # Safety
    /// As [`TileKernel::tile`] with `mr = MR`, `width = 16 * NV`, on an AVX-512 BF16 host.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn avx512_bf16_tile<const MR: usize, const NV: usize>(
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
        pf: Prefetch,
        ep: *const TileEpilogue,
    ) {
        prefetch_tile::<__m512, MR, NV>(c, ldc, ep);
        let mut acc = [[_mm512_setzero_ps(); NV]; MR];
        let (mut ap, mut bp) = (a.cast::<i32>(), b);
        for p in 0..kc {
            let mut bv = [_mm512_setzero_ps(); NV];
            for (j, v) in bv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(bp.add(j * 16));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*ap.add(i * lda)));
                for (x, &bj) in row.iter_mut().zip(&bv) {
                    *x = _mm512_dpbf16_ps(*x, av, std::mem::transmute::<__m512, __m512bh>(bj));
                }
            }
            ap = ap.add(1);
            bp = bp.add(Avx512::NR);
            if p < pf.lines {
                __m512::prefetch_l2(pf.at.wrapping_add(16 * p));
            }
        }
        store_tile(&acc, c, ldc, load_c, ep);
    }

    impl TileKernel for Avx512Bf16 {
        const MR: usize = Avx512::MR;
        const NR: usize = Avx512::NR;
        const LANES: usize = Avx512::LANES;
        const MC: usize = Avx512::MC;
        const KC: usize = Avx512::KC;
        const NC_PANELS: usize = Avx512::NC_PANELS;

        unsafe fn tile(
            mr: usize,
            width: usize,
            kc: usize,
            a: *const f32,
            lda: usize,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            load_c: bool,
            pf: Prefetch,
            ep: *const TileEpilogue,
        ) {
            tile_dispatch!(
                avx512_bf16_tile,
                mr,
                width / Self::LANES,
                [1, 2, 3],
                [1, 2, 3, 4, 5, 6, 7, 8],
                (kc, a, lda, b, c, ldc, load_c, pf, ep)
            )
        }

        unsafe fn epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
            Avx512::epilogue(rows, cols, c, ldc, ep)
        }
    }

    /// AMX-BF16 tiles (`tdpbf16ps`) on the AVX-512 packing (NR = 48: three 16-column B tiles
    /// side by side): a 32-row tile runs as a 2 x 2 block of C tiles plus a 2 x 1 block for
    /// the last 16 columns, a 16-row one as 1 x 3; the f32 tile goes through a store in L1,
    /// then C is added (for later K blocks) and the AVX-512 epilogue applied.
    pub(crate) struct AmxBf16;

    /// The 32 x 48 f32 block the tiles store.
    #[repr(C, align(64))]
    struct AmxAcc([f32; 32 * 48]);

    /// A K tail of fewer than 16 slots, zero-padded to one tile step.
    #[repr(C, align(64))]
    struct AmxTail<const N: usize>([f32; N]);

    /// # Safety
    /// As [`TileKernel::tile`] for [`AmxBf16`]; AMX-BF16 granted, AVX-512 F/BW/VL/DQ present.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn amx_bf16_tile(
        mr: usize,
        width: usize,
        kc: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
        pf: Prefetch,
        ep: *const TileEpilogue,
    ) {
        const NR: usize = 48;
        const LDB: usize = NR * 4;
        for l in 0..pf.lines {
            _mm_prefetch::<_MM_HINT_T1>(pf.at.wrapping_add(l * 16) as *const i8);
        }
        let two = mr > 16;
        let rows = if two { 32 } else { 16 };
        // The tiles read 16 or 32 whole rows of A: other row counts read a padded copy.
        let padded: Vec<f32>;
        let (a, lda) = if mr == rows {
            (a, lda)
        } else {
            let mut p = vec![0f32; rows * kc];
            for r in 0..mr {
                std::ptr::copy_nonoverlapping(a.add(r * lda), p.as_mut_ptr().add(r * kc), kc);
            }
            padded = p;
            (padded.as_ptr(), kc)
        };
        let (kb, tail) = (kc / 16, kc % 16);
        let mut at = AmxTail([0f32; 32 * 16]);
        let mut bt = AmxTail([0f32; 16 * NR]);
        if tail > 0 {
            for r in 0..rows {
                std::ptr::copy_nonoverlapping(a.add(r * lda + kb * 16), at.0.as_mut_ptr().add(r * 16), tail);
            }
            std::ptr::copy_nonoverlapping(b.add(kb * 16 * NR), bt.0.as_mut_ptr(), tail * NR);
        }
        let (ab, bb) = (a as *const u8, b as *const u8);
        let (atp, btp) = (at.0.as_ptr() as *const u8, bt.0.as_ptr() as *const u8);
        let mut acc = AmxAcc([0f32; 32 * 48]);
        let accp = acc.0.as_mut_ptr() as *mut u8;
        amx::configure();
        amx::zero_acc();
        if two {
            amx::bf16_2x2(kb, ab, lda * 4, bb, LDB);
            if tail > 0 {
                amx::bf16_2x2(1, atp, 64, btp, LDB);
            }
            amx::store_2x2(accp, LDB);
            if width > 32 {
                amx::zero_acc();
                amx::bf16_2x1(kb, ab, lda * 4, bb.add(128), LDB);
                if tail > 0 {
                    amx::bf16_2x1(1, atp, 64, btp.add(128), LDB);
                }
                amx::store_2x1(accp.add(128), LDB);
            }
        } else {
            amx::bf16_1x3(kb, ab, lda * 4, bb, LDB);
            if tail > 0 {
                amx::bf16_1x3(1, atp, 64, btp, LDB);
            }
            amx::store_1x3(accp, LDB);
        }
        for r in 0..mr {
            for v in (0..width).step_by(16) {
                let mut x = _mm512_load_ps(acc.0.as_ptr().add(r * NR + v));
                let cp = c.add(r * ldc + v);
                if load_c {
                    x = _mm512_add_ps(x, _mm512_loadu_ps(cp));
                }
                _mm512_storeu_ps(cp, x);
            }
        }
        if !ep.is_null() {
            Avx512::epilogue(mr, width, c, ldc, &*ep);
        }
    }

    impl TileKernel for AmxBf16 {
        const MR: usize = 32;
        const NR: usize = Avx512::NR;
        const LANES: usize = Avx512::LANES;
        const MC: usize = 128;
        const KC: usize = 192;
        const NC_PANELS: usize = 16;

        unsafe fn tile(
            mr: usize,
            width: usize,
            kc: usize,
            a: *const f32,
            lda: usize,
            b: *const f32,
            c: *mut f32,
            ldc: usize,
            load_c: bool,
            pf: Prefetch,
            ep: *const TileEpilogue,
        ) {
            const { assert!(Avx512::NR == 48 && Avx512::LANES == 16) };
            amx_bf16_tile(mr, width, kc, a, lda, b, c, ldc, load_c, pf, ep)
        }

        unsafe fn epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
            Avx512::epilogue(rows, cols, c, ldc, ep)
        }
    }
}

//! Register-blocked micro-kernels (`<isa>_sgemm_<mr>x<nr>`) and the tile epilogue, one set per
//! tier, all instantiated from the generic bodies below.
//!
//! A micro-kernel computes an `mr x NR` tile of C from `mr` rows of A read in place (row-major,
//! stride `lda`; each element is broadcast) and one packed `kc x NR` panel of B, with the
//! accumulators held in registers for the whole `kc` loop.

#![allow(clippy::too_many_arguments)] // kernel signatures: raw pointers and strides, kept flat for speed

use super::Activation;
use crate::cpu::CpuTier;
use crate::math;
use crate::simd::Simd;

/// Cache lines of the B block used after this one, which a tile pulls into L2 while it runs.
///
/// Weights streamed from memory arrive in time only when the lines of a block are spread over
/// all of the tiles that use the block before it: front-loaded onto the first few tiles, the
/// requests queued up and MiniLM's GEMMs ran 6-9% slower with cold weights.
#[derive(Clone, Copy)]
pub(crate) struct Prefetch {
    /// The first line (any address: prefetches never fault).
    pub at: *const f32,
    /// Consecutive lines from `at`.
    pub lines: usize,
}

impl Prefetch {
    /// Lines per four k steps that cover `lines` in `kc` steps: 1, 2 or 4 (at least one, so
    /// the kernels' loops need no branch).
    #[inline(always)]
    pub fn per_four_steps(self, kc: usize) -> usize {
        match (4 * self.lines).div_ceil(kc.max(1)) {
            0 | 1 => 1,
            2 => 2,
            _ => 4,
        }
    }
}

/// Epilogue operands with raw pointers already offset to a tile's first row and column.
#[derive(Clone, Copy)]
pub(crate) struct TileEpilogue {
    /// Bias for the tile's first column, or null.
    pub bias: *const f32,
    /// Row bias for the tile's first row, or null.
    pub row_bias: *const f32,
    pub act: Activation,
    /// Residual at the tile's first element, or null.
    pub res: *const f32,
    pub res_ld: usize,
}

/// The kernels and blocking parameters of one tier.
pub(crate) trait TileKernel {
    /// Rows of a full micro-tile.
    const MR: usize;
    /// Columns of a micro-tile: the packed panel width.
    const NR: usize;
    /// f32 lanes per vector: tiles narrower than NR are computed `LANES` columns at a time.
    const LANES: usize;
    /// Rows of A per cache block (a multiple of MR).
    const MC: usize;
    /// Depth of one K block: every tile of an MC block reuses one `KC x NR` panel of B (from
    /// L1 or L2), and C is read and written once per K block.
    const KC: usize;
    /// Panels of B per N block: the `MC x NC_PANELS*NR` block of C stays in L2 across K blocks.
    const NC_PANELS: usize;
    /// Slots of A per slot row of B: the tile of rows `ir..` at K block `pc` starts at
    /// `a + ir * lda + pc * A_DEPTH_SCALE`. 1 for A read by rows; 16 where A is laid out in
    /// groups of 16 rows, one tile after another ([`super::bf16x6`]).
    const A_DEPTH_SCALE: usize = 1;

    /// `C[0..mr][0..width] = (load_c ? C : 0) + A[0..mr][0..kc] * B[0..kc][0..width]`, where B
    /// is a packed panel (rows of NR values), prefetching about `pf.lines` lines from `pf.at`
    /// into L2 on the way, spread over the k loop. A non-null `ep` finishes the tile (bias,
    /// activation, residual) before it is stored.
    ///
    /// # Safety
    /// The tier must be supported by the host; `1 <= mr <= MR`; `width` a multiple of LANES
    /// in `LANES..=NR`; `a` valid for `mr` rows of `kc` values at stride `lda`; `b` valid for
    /// `kc * NR` values; `c` valid for `mr` rows of `width` values at stride `ldc`; a non-null
    /// `ep` valid as for [`TileKernel::epilogue`] with `rows = mr`, `cols = width`.
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
    );

    /// Applies bias, activation and residual to a finished `rows x cols` tile of C in place.
    ///
    /// # Safety
    /// The tier must be supported; `c` valid for `rows` rows of `cols` values at stride `ldc`;
    /// non-null `ep.bias` valid for `cols` values; non-null `ep.res` valid for `rows` rows of
    /// `cols` values at stride `ep.res_ld`.
    unsafe fn epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue);
}

/// `(MR, NR)` of `tier`'s f32 micro-kernel.
pub(crate) fn tile_shape(tier: CpuTier) -> (usize, usize) {
    match tier {
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx512 | CpuTier::Amx => (Avx512::MR, Avx512::NR),
        #[cfg(target_arch = "x86_64")]
        CpuTier::Avx2 => (Avx2::MR, Avx2::NR),
        _ => (Generic::MR, Generic::NR),
    }
}

/// The micro-kernel body: `MR x (NV * S::LANES)` accumulators over the first `NV` vectors of
/// each `NR`-wide row of the B panel.
///
/// # Safety
/// As [`TileKernel::tile`] with `mr = MR` and `width = NV * S::LANES`, inside code where
/// `S`'s features are enabled.
#[inline(always)]
unsafe fn kernel_body<S: Simd, const MR: usize, const NV: usize, const NR: usize>(
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
    prefetch_tile::<S, MR, NV>(c, ldc, ep);
    let mut acc = [[S::zero(); NV]; MR];
    let mut ap = a;
    let mut bp = b;
    let per_four = pf.per_four_steps(kc);
    let mut pf = pf.at;
    // Four k steps per iteration: the rows' addresses are computed once for all four (the
    // address arithmetic otherwise competes with the FMAs for ports).
    for _ in 0..kc / 4 {
        for u in 0..4 {
            let mut bv = [S::zero(); NV];
            for (j, v) in bv.iter_mut().enumerate() {
                *v = S::load(bp.add(u * NR + j * S::LANES));
            }
            for (i, row) in acc.iter_mut().enumerate() {
                let av = S::splat(*ap.add(i * lda + u));
                for (x, &bj) in row.iter_mut().zip(&bv) {
                    *x = av.mul_add(bj, *x);
                }
            }
        }
        ap = ap.add(4);
        bp = bp.add(4 * NR);
        for l in 0..per_four {
            S::prefetch_l2(pf.wrapping_add(16 * l));
        }
        pf = pf.wrapping_add(16 * per_four);
    }
    for _ in 0..kc % 4 {
        let mut bv = [S::zero(); NV];
        for (j, v) in bv.iter_mut().enumerate() {
            *v = S::load(bp.add(j * S::LANES));
        }
        for (i, row) in acc.iter_mut().enumerate() {
            let av = S::splat(*ap.add(i * lda));
            for (x, &bj) in row.iter_mut().zip(&bv) {
                *x = av.mul_add(bj, *x);
            }
        }
        ap = ap.add(1);
        bp = bp.add(NR);
        S::prefetch_l2(pf);
        pf = pf.wrapping_add(16);
    }
    store_tile(&acc, c, ldc, load_c, ep);
}

/// Starts pulling a tile's C (and residual) towards L1: they are read or written only after
/// the k loop.
///
/// # Safety
/// As [`TileKernel::tile`] (prefetches never fault, but `ep` is dereferenced when non-null).
#[inline(always)]
pub(crate) unsafe fn prefetch_tile<S: Simd, const MR: usize, const NV: usize>(
    c: *const f32,
    ldc: usize,
    ep: *const TileEpilogue,
) {
    for i in 0..MR {
        for j in 0..NV {
            S::prefetch(c.add(i * ldc + j * S::LANES));
        }
    }
    if !ep.is_null() && !(*ep).res.is_null() {
        for i in 0..MR {
            for j in 0..NV {
                S::prefetch((*ep).res.add(i * (*ep).res_ld + j * S::LANES));
            }
        }
    }
}

/// Stores the accumulators of an `MR x NV`-vector tile: `C = (load_c ? C : 0) + acc`, finished
/// by a non-null `ep` in registers.
///
/// # Safety
/// As [`TileKernel::tile`] with `mr = MR` and `width = NV * S::LANES`.
#[inline(always)]
pub(crate) unsafe fn store_tile<S: Simd, const MR: usize, const NV: usize>(
    acc: &[[S; NV]; MR],
    c: *mut f32,
    ldc: usize,
    load_c: bool,
    ep: *const TileEpilogue,
) {
    for (i, row) in acc.iter().enumerate() {
        for (j, &x) in row.iter().enumerate() {
            let p = c.add(i * ldc + j * S::LANES);
            let mut v = if load_c { x.add(S::load(p)) } else { x };
            if !ep.is_null() {
                v = finish(v, &*ep, i, j * S::LANES);
            }
            v.store(p);
        }
    }
}

/// The epilogue on one vector of accumulators still in registers: row `i`, column `j` of the
/// tile (reloading a stored tile to finish it cost ~7% at K = 384).
#[inline(always)]
unsafe fn finish<S: Simd>(mut v: S, ep: &TileEpilogue, i: usize, j: usize) -> S {
    if !ep.bias.is_null() {
        v = v.add(S::load(ep.bias.add(j)));
    }
    if !ep.row_bias.is_null() {
        v = v.add(S::splat(*ep.row_bias.add(i)));
    }
    v = match ep.act {
        Activation::None => v,
        Activation::Relu => act::<S, ACT_RELU>(v, 0.0, 0.0),
        Activation::Clip { min, max } => act::<S, ACT_CLIP>(v, min, max),
        Activation::GeluErf => act::<S, ACT_GELU_ERF>(v, 0.0, 0.0),
        Activation::GeluTanh => act::<S, ACT_GELU_TANH>(v, 0.0, 0.0),
        Activation::Silu => act::<S, ACT_SILU>(v, 0.0, 0.0),
    };
    if !ep.res.is_null() {
        v = v.add(S::load(ep.res.add(i * ep.res_ld + j)));
    }
    v
}

/// The epilogue body (see [`TileKernel::epilogue`]).
#[inline(always)]
pub(crate) unsafe fn epilogue_body<S: Simd>(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
    match ep.act {
        Activation::None => rows_apply::<S, ACT_NONE>(rows, cols, c, ldc, ep, 0.0, 0.0),
        Activation::Relu => rows_apply::<S, ACT_RELU>(rows, cols, c, ldc, ep, 0.0, 0.0),
        Activation::Clip { min, max } => rows_apply::<S, ACT_CLIP>(rows, cols, c, ldc, ep, min, max),
        Activation::GeluErf => rows_apply::<S, ACT_GELU_ERF>(rows, cols, c, ldc, ep, 0.0, 0.0),
        Activation::GeluTanh => rows_apply::<S, ACT_GELU_TANH>(rows, cols, c, ldc, ep, 0.0, 0.0),
        Activation::Silu => rows_apply::<S, ACT_SILU>(rows, cols, c, ldc, ep, 0.0, 0.0),
    }
}

const ACT_NONE: u8 = 0;
const ACT_RELU: u8 = 1;
const ACT_CLIP: u8 = 2;
const ACT_GELU_ERF: u8 = 3;
const ACT_GELU_TANH: u8 = 4;
const ACT_SILU: u8 = 5;

#[inline(always)]
unsafe fn act<S: Simd, const A: u8>(x: S, lo: f32, hi: f32) -> S {
    // NaN propagates: min/max return their second operand when either is NaN.
    match A {
        ACT_RELU => S::zero().max(x),
        ACT_CLIP => S::splat(hi).min(S::splat(lo).max(x)),
        ACT_GELU_ERF => math::gelu_erf(x),
        ACT_GELU_TANH => math::gelu_tanh(x),
        ACT_SILU => math::silu(x),
        _ => x,
    }
}

#[inline(always)]
unsafe fn step<S: Simd, const A: u8>(
    c: *mut f32,
    bias: *const f32,
    row_bias: *const f32,
    res: *const f32,
    lo: f32,
    hi: f32,
) {
    let mut v = S::load(c);
    if !bias.is_null() {
        v = v.add(S::load(bias));
    }
    if !row_bias.is_null() {
        v = v.add(S::splat(*row_bias));
    }
    v = act::<S, A>(v, lo, hi);
    if !res.is_null() {
        v = v.add(S::load(res));
    }
    v.store(c);
}

#[inline(always)]
unsafe fn rows_apply<S: Simd, const A: u8>(
    rows: usize,
    cols: usize,
    c: *mut f32,
    ldc: usize,
    ep: &TileEpilogue,
    lo: f32,
    hi: f32,
) {
    let at = |p: *const f32, j: usize| if p.is_null() { p } else { p.add(j) };
    for r in 0..rows {
        let crow = c.add(r * ldc);
        let rrow = at(ep.res, r * ep.res_ld);
        let rb = at(ep.row_bias, r);
        let mut j = 0;
        while j + S::LANES <= cols {
            step::<S, A>(crow.add(j), at(ep.bias, j), rb, at(rrow, j), lo, hi);
            j += S::LANES;
        }
        // The tail goes through the one-lane instantiation of the same math.
        while j < cols {
            step::<f32, A>(crow.add(j), at(ep.bias, j), rb, at(rrow, j), lo, hi);
            j += 1;
        }
    }
}

/// Calls `$f::<MR, NV>$args` for runtime `mr` and `nv` drawn from the listed values.
macro_rules! tile_dispatch {
    ($f:ident, $mr:expr, $nv:expr, [$($n:literal),*], $mrs:tt, $args:tt) => {
        match $nv {
            $( $n => tile_dispatch!(@mr $f, $n, $mr, $mrs, $args), )*
            _ => unreachable!("tile of {} vectors", $nv),
        }
    };
    (@mr $f:ident, $n:literal, $mr:expr, [$($m:literal),*], $args:tt) => {
        match $mr {
            $( $m => $f::<$m, $n> $args, )*
            _ => unreachable!("tile of {} rows", $mr),
        }
    };
}

pub(crate) use tile_dispatch;

/// Portable kernels: plain f32 code the compiler may auto-vectorise for the baseline ISA.
pub(crate) struct Generic;

/// The portable micro-kernel: 4 rows x 8 columns.
///
/// # Safety
/// As [`TileKernel::tile`] with `mr = 4`, `width = 8`.
unsafe fn scalar_sgemm_4x8(
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
    kernel_body::<f32, 4, 8, 8>(kc, a, lda, b, c, ldc, load_c, pf, ep)
}

/// Edge tiles: `MR x NV` with `MR <= 4`, `NV <= 8`.
unsafe fn scalar_sgemm_tile<const MR: usize, const NV: usize>(
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
    kernel_body::<f32, MR, NV, 8>(kc, a, lda, b, c, ldc, load_c, pf, ep)
}

impl TileKernel for Generic {
    const MR: usize = 4;
    const NR: usize = 8;
    const LANES: usize = 1;
    const MC: usize = 64;
    const KC: usize = 256;
    const NC_PANELS: usize = 64;

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
        if mr == Self::MR && width == Self::NR {
            scalar_sgemm_4x8(kc, a, lda, b, c, ldc, load_c, pf, ep)
        } else {
            tile_dispatch!(
                scalar_sgemm_tile,
                mr,
                width,
                [1, 2, 3, 4, 5, 6, 7, 8],
                [1, 2, 3, 4],
                (kc, a, lda, b, c, ldc, load_c, pf, ep)
            )
        }
    }

    unsafe fn epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
        epilogue_body::<f32>(rows, cols, c, ldc, ep)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{Avx2, Avx512};

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::*;
    use std::arch::x86_64::{__m256, __m512};

    /// AVX2 + FMA kernels.
    pub(crate) struct Avx2;

    /// The AVX2 micro-kernel: 6 rows x 16 columns (12 ymm accumulators).
    ///
    /// # Safety
    /// As [`TileKernel::tile`] with `mr = 6`, `width = 16`, on an AVX2+FMA host.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_sgemm_6x16(
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
        kernel_body::<__m256, 6, 2, 16>(kc, a, lda, b, c, ldc, load_c, pf, ep)
    }

    /// Edge tiles: `MR x 8*NV` with `MR <= 6`, `NV <= 2`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_sgemm_tile<const MR: usize, const NV: usize>(
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
        kernel_body::<__m256, MR, NV, 16>(kc, a, lda, b, c, ldc, load_c, pf, ep)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn avx2_epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
        epilogue_body::<__m256>(rows, cols, c, ldc, ep)
    }

    impl TileKernel for Avx2 {
        const MR: usize = 6;
        const NR: usize = 16;
        const LANES: usize = 8;
        const MC: usize = 144;
        const KC: usize = 256;
        const NC_PANELS: usize = 32;

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
            if mr == Self::MR && width == Self::NR {
                avx2_sgemm_6x16(kc, a, lda, b, c, ldc, load_c, pf, ep)
            } else {
                tile_dispatch!(
                    avx2_sgemm_tile,
                    mr,
                    width / Self::LANES,
                    [1, 2],
                    [1, 2, 3, 4, 5, 6],
                    (kc, a, lda, b, c, ldc, load_c, pf, ep)
                )
            }
        }

        unsafe fn epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
            avx2_epilogue(rows, cols, c, ldc, ep)
        }
    }

    /// AVX-512 kernels (also used by the AMX tier: AMX has no f32 multiply).
    pub(crate) struct Avx512;

    /// One row of one k step of the 8 x 48 kernel: broadcast A's value at `$addr` (plus `$u`
    /// steps) into `zmm$t` and multiply-add it with the three panel vectors in zmm24-26 into
    /// the row's accumulators.
    #[rustfmt::skip]
    macro_rules! row_8x48 {
        ($t:literal, $addr:literal, $u:literal, $c0:literal, $c1:literal, $c2:literal) => {
            concat!(
                "vbroadcastss zmm", $t, ", dword ptr [", $addr, " + ", $u, "*4]\n",
                "vfmadd231ps zmm", $c0, ", zmm24, zmm", $t, "\n",
                "vfmadd231ps zmm", $c1, ", zmm25, zmm", $t, "\n",
                "vfmadd231ps zmm", $c2, ", zmm26, zmm", $t, "\n",
            )
        };
    }

    /// One k step of the 8 x 48 kernel, `$u` steps into the current group of four: three panel
    /// loads, then eight rows. Rows of A are addressed from three bases (rows 0, 3 and 6) plus
    /// `l` (the row stride in bytes) times 1, 2 or 4, so no address is recomputed in the loop.
    #[rustfmt::skip]
    macro_rules! step_8x48 {
        ($u:literal) => {
            concat!(
                "vmovups zmm24, [{b} + ", $u, "*192]\n",
                "vmovups zmm25, [{b} + ", $u, "*192 + 64]\n",
                "vmovups zmm26, [{b} + ", $u, "*192 + 128]\n",
                row_8x48!(27, "{a0}", $u, 0, 1, 2),
                row_8x48!(28, "{a0} + {l}", $u, 3, 4, 5),
                row_8x48!(29, "{a0} + {l}*2", $u, 6, 7, 8),
                row_8x48!(30, "{a3}", $u, 9, 10, 11),
                row_8x48!(27, "{a0} + {l}*4", $u, 12, 13, 14),
                row_8x48!(28, "{a3} + {l}*2", $u, 15, 16, 17),
                row_8x48!(29, "{a6}", $u, 18, 19, 20),
                row_8x48!(30, "{a3} + {l}*4", $u, 21, 22, 23),
            )
        };
    }

    /// The AVX-512 micro-kernel: 8 rows x 48 columns (24 zmm accumulators; per k step 3 panel
    /// loads and 8 broadcasts feed 24 FMAs).
    ///
    /// The k loop is written in assembly: compiled from [`kernel_body`] it recomputed row
    /// addresses with extra integer instructions each iteration and ran at 83-85% of the FMA
    /// peak on L1-resident operands, against 90% for this loop (Xeon with AMX, 2026-11-23).
    /// C is prefetched only before the last 32 k steps (`kernel_body` does it first, and the
    /// streaming panel of B evicted it again). Both changes took hot 128 x 384 x 768 from
    /// 171-172 to 180-181 GFLOP/s on one core (`--example gemm_shape`).
    ///
    /// # Safety
    /// As [`TileKernel::tile`] with `mr = 8`, `width = 48`, on an AVX-512F host.
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_sgemm_8x48(
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
        let mut acc = [[<__m512 as Simd>::zero(); 3]; 8];
        // `$kc` k steps from `$a` (row 0 of A), `$b` (the panel) and `$pf` (lines to prefetch).
        macro_rules! k_loop {
            ($kc:expr, $a:expr, $b:expr, $pf:expr, $acc:ident, $prefetch:literal) => {
                std::arch::asm!(
                    "test {n4}, {n4}",
                    "jz 3f",
                    "2:",
                    step_8x48!(0),
                    step_8x48!(1),
                    step_8x48!(2),
                    step_8x48!(3),
                    $prefetch,
                    "add {a0}, 16",
                    "add {a3}, 16",
                    "add {a6}, 16",
                    "add {b}, 768",
                    "dec {n4}",
                    "jnz 2b",
                    "3:",
                    "test {n1}, {n1}",
                    "jz 5f",
                    "4:",
                    step_8x48!(0),
                    "prefetcht1 [{pf}]",
                    "add {pf}, 64",
                    "add {a0}, 4",
                    "add {a3}, 4",
                    "add {a6}, 4",
                    "add {b}, 192",
                    "dec {n1}",
                    "jnz 4b",
                    "5:",
                    n4 = inout(reg) $kc / 4 => _,
                    n1 = inout(reg) $kc % 4 => _,
                    a0 = inout(reg) $a => _,
                    a3 = inout(reg) $a.wrapping_add(3 * lda) => _,
                    a6 = inout(reg) $a.wrapping_add(6 * lda) => _,
                    l = in(reg) lda * 4,
                    b = inout(reg) $b => _,
                    pf = inout(reg) $pf => _,
                    inout("zmm0") $acc[0][0],
                    inout("zmm1") $acc[0][1],
                    inout("zmm2") $acc[0][2],
                    inout("zmm3") $acc[1][0],
                    inout("zmm4") $acc[1][1],
                    inout("zmm5") $acc[1][2],
                    inout("zmm6") $acc[2][0],
                    inout("zmm7") $acc[2][1],
                    inout("zmm8") $acc[2][2],
                    inout("zmm9") $acc[3][0],
                    inout("zmm10") $acc[3][1],
                    inout("zmm11") $acc[3][2],
                    inout("zmm12") $acc[4][0],
                    inout("zmm13") $acc[4][1],
                    inout("zmm14") $acc[4][2],
                    inout("zmm15") $acc[5][0],
                    inout("zmm16") $acc[5][1],
                    inout("zmm17") $acc[5][2],
                    inout("zmm18") $acc[6][0],
                    inout("zmm19") $acc[6][1],
                    inout("zmm20") $acc[6][2],
                    inout("zmm21") $acc[7][0],
                    inout("zmm22") $acc[7][1],
                    inout("zmm23") $acc[7][2],
                    out("zmm24") _,
                    out("zmm25") _,
                    out("zmm26") _,
                    out("zmm27") _,
                    out("zmm28") _,
                    out("zmm29") _,
                    out("zmm30") _,
                    options(nostack, readonly),
                );
            };
        }
        // C is pulled into L1 only for the last k steps: fetched at the start, the streaming
        // panel of B would evict it again before the tile is stored.
        let tail = kc.min(32);
        let head = kc - tail;
        let per_four = pf.per_four_steps(kc);
        // Where the tail's prefetches start: the head loop issues `per_four` lines per four
        // steps and one per step after its last whole group.
        let pf_tail = pf.at.wrapping_add(16 * (head / 4 * per_four + head % 4));
        // One instantiation of both loops per prefetch density.
        macro_rules! both {
            ($prefetch:literal) => {{
                // SAFETY: the caller guarantees 8 rows of `kc` values of A at stride `lda` and
                // `kc` rows of 48 values of B; the loops read only those (prefetches never
                // fault).
                k_loop!(head, a, b, pf.at, acc, $prefetch);
                prefetch_tile::<__m512, 8, 3>(c, ldc, ep);
                k_loop!(tail, a.add(head), b.add(head * 48), pf_tail, acc, $prefetch);
            }};
        }
        match per_four {
            1 => both!("prefetcht1 [{pf}]\nadd {pf}, 64"),
            2 => both!("prefetcht1 [{pf}]\nprefetcht1 [{pf} + 64]\nadd {pf}, 128"),
            _ => both!(
                "prefetcht1 [{pf}]\nprefetcht1 [{pf} + 64]\nprefetcht1 [{pf} + 128]\nprefetcht1 [{pf} + 192]\nadd {pf}, 256"
            ),
        }
        store_tile(&acc, c, ldc, load_c, ep);
    }

    /// Edge tiles: `MR x 16*NV` with `MR <= 8`, `NV <= 3`.
    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_sgemm_tile<const MR: usize, const NV: usize>(
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
        kernel_body::<__m512, MR, NV, 48>(kc, a, lda, b, c, ldc, load_c, pf, ep)
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn avx512_epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
        epilogue_body::<__m512>(rows, cols, c, ldc, ep)
    }

    impl TileKernel for Avx512 {
        const MR: usize = 8;
        const NR: usize = 48;
        const LANES: usize = 16;
        const MC: usize = 128;
        const KC: usize = 384;
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
            if mr == Self::MR && width == Self::NR {
                avx512_sgemm_8x48(kc, a, lda, b, c, ldc, load_c, pf, ep)
            } else {
                tile_dispatch!(
                    avx512_sgemm_tile,
                    mr,
                    width / Self::LANES,
                    [1, 2, 3],
                    [1, 2, 3, 4, 5, 6, 7, 8],
                    (kc, a, lda, b, c, ldc, load_c, pf, ep)
                )
            }
        }

        unsafe fn epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
            avx512_epilogue(rows, cols, c, ldc, ep)
        }
    }
}

//! f32 products on AMX-BF16 tiles, as accurate as f32 FMAs: every f32 value is split into three
//! bf16 parts, `x = hi + mid + lo` (exact for normal values: 8 + 8 + 8 significant bits), and
//! the six part products at or above 2^-24 relative (`hi·hi`, `hi·mid`, `mid·hi`, `mid·mid`,
//! `hi·lo`, `lo·hi`) are accumulated in f32 (XLA's `BF16_BF16_F32_X6` algorithm). The three
//! dropped ones (`mid·lo`, `lo·mid`, `lo·lo`) are below 2^-22 of `|a·b|`. A product of two bf16
//! values is exact in f32 and `tdpbf16ps` adds each one to its f32 accumulator with one
//! rounding, so the result differs from an f32 GEMM's only by where the roundings fall.
//!
//! The AMX tile rate (`tdpbf16ps`: 16 x 16 x 32 multiply-adds) is ~15x the AVX-512 FMA rate per
//! core, so six products per multiply still leave ~2.5x the FMA kernel's ceiling.
//!
//! Layout: both operands are `ceil(k/32)` tile steps (K padded with zeros). In a step, each part
//! of the 32 K values is 16 bf16 pairs (`(x[2p], x[2p+1])` in slot `p`, the pairs `tdpbf16ps`
//! reads). The AMX kernel reads 16 x 16-slot tiles that lie whole in 1 KB (a tile load at a
//! 192-byte row stride ran slower): B's panels are 32 columns wide and a panel step holds its
//! six tiles (hi, mid, lo x two 16-column tiles) one after another, and A is converted per call
//! into groups of 16 rows, each step's three tiles one after another ([`Layout::Tiles`]). The portable kernels read
//! rows: 48 slot rows per step, 16 each for hi, mid and lo ([`Layout::Rows`]). The f32 driver's
//! blocking, threading and epilogues run over the slots, with K blocks of whole steps.
//!
//! `hi` is `x` truncated to bf16 (rounding could overflow to infinity near `f32::MAX`); `mid` and
//! `lo` round to nearest even. Infinities and NaN keep only their `hi` part; subnormal parts
//! become zero, as the tiles read them.

#![allow(clippy::too_many_arguments)] // kernel signatures: raw pointers and strides, kept flat for speed

use super::bf16::{bf16_to_f32, round_bf16_bits, slot_half};
use super::kernels::{epilogue_body, Prefetch, TileEpilogue, TileKernel};
use super::Par;
use crate::cpu::{self, CpuTier};

/// K values per tile step (16 bf16 pairs).
pub const STEP: usize = 32;
/// Slot rows per tile step: 16 pair rows each for the hi, mid and lo parts.
pub const STEP_ROWS: usize = 48;
/// Panel width of B in [`Layout::Tiles`]: two 16-column tiles (the AMX kernel's 1 x 2 blocks).
pub const TILE_NR: usize = 32;

/// Whether f32 GEMMs can run as bf16 parts on tiles here: the `amx` tier is active.
pub fn native() -> bool {
    cpu::tier() == CpuTier::Amx
}

/// Slot rows for `k` values: whole tile steps.
pub fn slot_rows(k: usize) -> usize {
    k.div_ceil(STEP) * STEP_ROWS
}

/// The bf16 bits of `x`'s three parts, `[hi, mid, lo]` (see the module doc).
pub fn split3(x: f32) -> [u16; 3] {
    if !x.is_finite() {
        return [round_bf16_bits(x), 0, 0];
    }
    let hi = f32::from_bits(x.to_bits() & 0xffff_0000);
    let r1 = x - hi;
    let mid = round_bf16_bits(r1);
    let lo = round_bf16_bits(r1 - bf16_to_f32(mid));
    [round_bf16_bits(hi), mid, lo]
}

/// How the parts are laid out for a tier's kernel (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Layout {
    Rows,
    Tiles,
}

impl Layout {
    pub(crate) fn of(tier: CpuTier) -> Layout {
        if cfg!(target_arch = "x86_64") && tier == CpuTier::Amx {
            Layout::Tiles
        } else {
            Layout::Rows
        }
    }

    /// Slots between the parts of one value, and between tile steps, along a row of A.
    fn a_strides(self) -> (usize, usize) {
        match self {
            Layout::Rows => (16, STEP_ROWS),
            Layout::Tiles => (256, 16 * STEP_ROWS),
        }
    }

    /// Slots of A for `m` rows of `k` values: tiles take whole pairs of 16-row groups (the AMX
    /// kernel's 32-row blocks).
    pub(crate) fn a_len(self, m: usize, k: usize) -> usize {
        match self {
            Layout::Rows => m * slot_rows(k),
            Layout::Tiles => m.next_multiple_of(32) * slot_rows(k),
        }
    }

    /// The first slot of row `i` of A (`rows` = [`slot_rows`] per row).
    fn a_row(self, i: usize, rows: usize) -> usize {
        match self {
            Layout::Rows => i * rows,
            Layout::Tiles => (i / 16) * 16 * rows + (i % 16) * 16,
        }
    }

    /// The slot of part `q` of value `kk` in row `i` of A, and whether it is the slot's high half.
    #[cfg(test)]
    pub(crate) fn a_slot(self, i: usize, rows: usize, kk: usize, q: usize) -> (usize, bool) {
        let (part, step) = self.a_strides();
        (self.a_row(i, rows) + (kk / STEP) * step + q * part + (kk % STEP) / 2, kk % 2 == 1)
    }

    /// The slot of part `q` of value `kk` in column `jj` of a B panel `nr` wide (a multiple of
    /// 16 for tiles: the step's tiles go part by part, each part's column tiles in order).
    pub(crate) fn b_slot(self, nr: usize, kk: usize, q: usize, jj: usize) -> (usize, bool) {
        let (s, p) = (kk / STEP, (kk % STEP) / 2);
        let slot = match self {
            Layout::Rows => (s * STEP_ROWS + 16 * q + p) * nr + jj,
            Layout::Tiles => s * STEP_ROWS * nr + (q * nr / 16 + jj / 16) * 256 + p * 16 + jj % 16,
        };
        (slot, kk % 2 == 1)
    }
}

/// Sets one half of a slot to `bits`.
#[inline]
pub(crate) fn set_half(slot: &mut f32, high: bool, bits: u16) {
    let old = slot.to_bits();
    let new = if high { (old & 0xffff) | ((bits as u32) << 16) } else { (old & 0xffff_0000) | bits as u32 };
    *slot = f32::from_bits(new);
}

/// Converts `m` rows of A (`k` values each, stride `lda`) to their parts in `out` (at least
/// [`Layout::a_len`] slots) in `tier`'s layout, over the pool's threads for large batches.
pub(crate) fn convert_a(m: usize, k: usize, a: &[f32], lda: usize, out: &mut [f32], tier: CpuTier, par: Par<'_>) {
    let layout = Layout::of(tier);
    let rows = slot_rows(k);
    // Units of 16 rows (whole tile groups), converted as one `16 * rows`-slot chunk each.
    let out = &mut out[..layout.a_len(m, k)];
    let convert = |(u, dst): (usize, &mut [f32])| {
        for i in 0..16 {
            let r = u * 16 + i;
            let base = layout.a_row(i, rows);
            if r < m {
                convert_row(&a[r * lda..][..k], &mut dst[base..], layout, tier);
            } else if layout == Layout::Tiles {
                for (s, q) in (0..rows / STEP_ROWS).flat_map(|s| (0..3).map(move |q| (s, q))) {
                    let at = base + s * 16 * STEP_ROWS + q * 256;
                    dst[at..at + 16].fill(0.0);
                }
            }
        }
    };
    super::bf16::run_chunks(out, 16 * rows, m, par, convert);
}

/// One row of `k` values to its parts, from `dst[0]` on in `layout`'s strides.
fn convert_row(row: &[f32], dst: &mut [f32], layout: Layout, tier: CpuTier) {
    let (part, step) = layout.a_strides();
    let steps = row.len().div_ceil(STEP);
    assert!(steps == 0 || dst.len() >= (steps - 1) * step + 2 * part + 16);
    #[cfg(target_arch = "x86_64")]
    if tier >= CpuTier::Avx512 && cpu::features().avx512bf16 {
        // SAFETY: AVX-512 F, BW, DQ and BF16 are present; `dst` holds every step (checked).
        return unsafe { x86::convert_row(row, dst.as_mut_ptr(), part, step) };
    }
    let _ = tier;
    for s in 0..steps {
        for q in 0..3 {
            dst[s * step + q * part..][..16].fill(0.0);
        }
    }
    for (kk, &x) in row.iter().enumerate() {
        let (at, high) = (kk / STEP * step + (kk % STEP) / 2, kk % 2 == 1);
        for (q, bits) in split3(x).into_iter().enumerate() {
            set_half(&mut dst[at + q * part], high, bits);
        }
    }
}

/// The portable kernel for a tier's tile shape: the six part products per value pair, in
/// plain loops (the reference the tile kernel is tested against).
pub(crate) struct ScalarBf16x6<const MR: usize, const NR: usize>;

impl<const MR: usize, const NR: usize> TileKernel for ScalarBf16x6<MR, NR> {
    const MR: usize = MR;
    const NR: usize = NR;
    const LANES: usize = 1;
    const MC: usize = MR * 16;
    const KC: usize = 4 * STEP_ROWS;
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
        // (A part, B part) of the six products.
        const PAIRS: [(usize, usize); 6] = [(0, 0), (1, 0), (2, 0), (1, 1), (0, 1), (0, 2)];
        for i in 0..mr {
            for j in 0..width {
                // hi·hi apart from the five smaller products, so that the roundings of the
                // large sum are an f32 dot product's.
                let (mut big, mut small) = (0.0f32, 0.0f32);
                for s in (0..kc).step_by(STEP_ROWS) {
                    for (qa, qb) in PAIRS {
                        let acc = if qa + qb == 0 { &mut big } else { &mut small };
                        for p in 0..16 {
                            let x = *a.add(i * lda + s + 16 * qa + p);
                            let y = *b.add((s + 16 * qb + p) * Self::NR + j);
                            *acc += slot_half(x, false) * slot_half(y, false);
                            *acc += slot_half(x, true) * slot_half(y, true);
                        }
                    }
                }
                let acc = big + small;
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
pub(crate) use x86::AmxBf16x6;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::super::kernels::Avx512;
    use super::*;
    use crate::amx;
    use std::arch::asm;
    use std::arch::x86_64::*;

    /// See [`super::convert_row`]: 32 values per tile step, three conversions; part `q` of step
    /// `s` goes to `out + s * step + q * part`.
    ///
    /// # Safety
    /// AVX-512 F, BW, DQ and BF16 must be present; `out` valid for every step's three parts.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512bf16")]
    pub(super) unsafe fn convert_row(row: &[f32], out: *mut f32, part: usize, step: usize) {
        let k = row.len();
        let src = row.as_ptr();
        let top = _mm512_set1_epi32(0xffff_0000u32 as i32);
        // The three parts of 16 values: hi as f32 (truncated; whole for infinities and NaN)
        // and the remainders after hi and after mid.
        let parts = |x: __m512| {
            let odd = _mm512_fpclass_ps_mask::<0x99>(x); // NaN or infinity
            let hi = _mm512_mask_mov_ps(_mm512_castsi512_ps(_mm512_and_si512(_mm512_castps_si512(x), top)), odd, x);
            let r1 = _mm512_maskz_sub_ps(!odd, x, hi);
            let mid = _mm512_cvtneps_pbh(r1);
            let mid_f = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(std::mem::transmute::<
                __m256bh,
                __m256i,
            >(mid))));
            (hi, r1, _mm512_sub_ps(r1, mid_f))
        };
        let mut p = 0;
        let mut o = out;
        while p < k {
            let rest = k - p;
            let lo_mask: __mmask16 = if rest >= 16 { 0xffff } else { (1u16 << rest) - 1 };
            let hi_mask: __mmask16 = if rest >= 32 {
                0xffff
            } else if rest > 16 {
                ((1u32 << (rest - 16)) - 1) as u16
            } else {
                0
            };
            let (h0, m0, l0) = parts(_mm512_maskz_loadu_ps(lo_mask, src.add(p)));
            let (h1, m1, l1) = parts(_mm512_maskz_loadu_ps(hi_mask, src.wrapping_add(p + 16)));
            for (q, (x0, x1)) in [(h0, h1), (m0, m1), (l0, l1)].into_iter().enumerate() {
                let v = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(x1, x0));
                _mm512_storeu_si512(o.add(part * q).cast(), v);
            }
            p += STEP;
            o = o.add(step);
        }
    }

    /// The AMX kernel: a 32 x 32 tile of C as a 2 x 2 block of C tiles ([`steps_2x2`]).
    pub(crate) struct AmxBf16x6;

    /// A 32 x 32 f32 block for partial tiles.
    #[repr(C, align(64))]
    struct Block([f32; 32 * TILE_NR]);

    /// `steps` tile steps of a 32 x 32 block: tmm0 / tmm1 (rows 0-15, columns 0-15 / 16-31),
    /// tmm2 / tmm3 (rows 16-31) += the six part products. Every tile is 1 KB whole (row stride
    /// 64 bytes): the hi, mid and lo parts of A's rows 0-15 at `a`, `a + 1024`, `a + 2048` (3 KB
    /// a step), of rows 16-31 likewise at `a2`; B's part q, column tile c at `b + 1024 (2q + c)`
    /// (6 KB a step).
    ///
    /// The products go in groups of four, one per accumulator, each group one (A part, B part)
    /// pair: a `tdpbf16ps` waits ~4 issue slots for the one before it on the same accumulator,
    /// so fewer accumulators (a 1 x 2 or 1 x 3 block, each loading fewer tiles per product)
    /// ran at 25-40% of the tile rate. The pairs go hh, hm, mm, mh, lh, hl, so consecutive
    /// groups share one operand: 16 tile loads a step for 24 products.
    ///
    /// After each group, four lines from `pf` go to L2: 96 lines a 4-step K block, the share of
    /// the next B block for one of four row tiles (a sentence's 128 rows), or twice the share
    /// of more. Weights stream from L3 or memory, and the hardware prefetchers alone left the
    /// tiles waiting: 128 x 384 x 1152 with B cycling through 64 MB went from 235 to 295-312
    /// GFLOP/s. Issued all at a tile's start instead, the lines held the tiles back.
    #[inline(always)]
    unsafe fn steps_2x2(steps: usize, a: *const u8, a2: *const u8, b: *const u8, pf: *const u8) {
        macro_rules! group {
            () => {
                concat!(
                    "tdpbf16ps tmm0, tmm4, tmm6\n",
                    "tdpbf16ps tmm1, tmm4, tmm7\n",
                    "tdpbf16ps tmm2, tmm5, tmm6\n",
                    "tdpbf16ps tmm3, tmm5, tmm7\n",
                    "prefetcht1 [{p}]\n",
                    "prefetcht1 [{p} + 64]\n",
                    "prefetcht1 [{p} + 128]\n",
                    "prefetcht1 [{p} + 192]\n",
                    "add {p}, 256\n",
                )
            };
        }
        asm!(
            "2:",
            "tileloadd tmm4, [{a} + {s}*1]",
            "tileloadd tmm6, [{b} + {s}*1]",
            "tileloadd tmm7, [{b} + {s}*1 + 1024]",
            "tileloadd tmm5, [{a2} + {s}*1]",
            group!(), // hi.hi
            "tileloadd tmm6, [{b} + {s}*1 + 2048]",
            "tileloadd tmm7, [{b} + {s}*1 + 3072]",
            group!(), // hi.mid
            "tileloadd tmm4, [{a} + {s}*1 + 1024]",
            "tileloadd tmm5, [{a2} + {s}*1 + 1024]",
            group!(), // mid.mid
            "tileloadd tmm6, [{b} + {s}*1]",
            "tileloadd tmm7, [{b} + {s}*1 + 1024]",
            group!(), // mid.hi
            "tileloadd tmm4, [{a} + {s}*1 + 2048]",
            "tileloadd tmm5, [{a2} + {s}*1 + 2048]",
            group!(), // lo.hi
            "tileloadd tmm4, [{a} + {s}*1]",
            "tileloadd tmm6, [{b} + {s}*1 + 4096]",
            "tileloadd tmm7, [{b} + {s}*1 + 5120]",
            "tileloadd tmm5, [{a2} + {s}*1]",
            group!(), // hi.lo
            "add {a}, 3072",
            "add {a2}, 3072",
            "add {b}, 6144",
            "dec {n}",
            "jnz 2b",
            n = inout(reg) steps => _,
            a = inout(reg) a => _,
            a2 = inout(reg) a2 => _,
            b = inout(reg) b => _,
            p = inout(reg) pf => _,
            s = in(reg) 64usize,
            options(nostack, readonly),
        );
    }

    /// tmm0-3 from the 32 x 32 f32 block at `c` (row stride `ldc` bytes), or zero.
    #[inline(always)]
    unsafe fn init_acc(c: *const u8, ldc: usize, load: bool) {
        if load {
            asm!(
                "tileloadd tmm0, [{c} + {ldc}*1]",
                "tileloadd tmm1, [{c} + {ldc}*1 + 64]",
                "tileloadd tmm2, [{c2} + {ldc}*1]",
                "tileloadd tmm3, [{c2} + {ldc}*1 + 64]",
                c = in(reg) c,
                c2 = in(reg) c.add(16 * ldc),
                ldc = in(reg) ldc,
                options(nostack, readonly),
            );
        } else {
            amx::zero_acc();
        }
    }

    /// The step loop from zeroed accumulators (the speed probe below).
    #[cfg(test)]
    pub(super) unsafe fn bench_steps(steps: usize, a: *const u8, a2: *const u8, b: *const u8) {
        init_acc(a, 0, false);
        steps_2x2(steps, a, a2, b, b);
    }

    /// # Safety
    /// As [`TileKernel::tile`] for [`AmxBf16x6`] (`kc` a multiple of [`STEP_ROWS`], A in
    /// [`Layout::Tiles`] with whole groups of 32 rows); AMX granted, AVX-512 F/BW/VL/DQ present.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    unsafe fn amx_bf16x6_tile(
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
        const NR: usize = TILE_NR;
        let steps = kc / STEP_ROWS;
        amx::configure();
        // Uninitialised: a partial tile's block is written by the tile store before it is read
        // (zeroing 4 KB per tile cost more than the store).
        let mut block = std::mem::MaybeUninit::<Block>::uninit();
        let bp = block.as_mut_ptr() as *mut f32;
        // Whole tiles go straight to C; partial ones through `block`.
        let direct = mr == 32 && width == NR;
        let (cp, ldc_b) = if direct {
            (c as *mut u8, ldc * 4)
        } else {
            if load_c {
                for r in 0..mr {
                    std::ptr::copy_nonoverlapping(c.add(r * ldc), bp.add(r * NR), width);
                }
            }
            (bp as *mut u8, NR * 4)
        };
        init_acc(cp, ldc_b, load_c);
        if steps > 0 {
            steps_2x2(steps, a as *const u8, a.add(16 * lda) as *const u8, b as *const u8, pf.at as *const u8);
        }
        amx::store_2x2(cp, ldc_b);
        if !direct {
            for r in 0..mr {
                std::ptr::copy_nonoverlapping(bp.add(r * NR), c.add(r * ldc), width);
            }
        }
        if !ep.is_null() {
            Avx512::epilogue(mr, width, c, ldc, &*ep);
        }
    }

    impl TileKernel for AmxBf16x6 {
        const MR: usize = 32;
        const NR: usize = TILE_NR;
        const LANES: usize = Avx512::LANES;
        // Four steps per K block: a panel's 24 KB block stays in L1 for every row tile. With B
        // prefetched, streaming it once per 256 rows costs less than keeping 1,024 rows of A
        // and C in L2 (1,024 x 384 x 1536 from L3: 209 GFLOP/s at MC 1,024, 277-324 at 256).
        const MC: usize = 256;
        const KC: usize = 4 * STEP_ROWS;
        const NC_PANELS: usize = 8;
        const A_DEPTH_SCALE: usize = 16;

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
            const { assert!(Avx512::LANES == 16) };
            amx_bf16x6_tile(mr, width, kc, a, lda, b, c, ldc, load_c, pf, ep)
        }

        unsafe fn epilogue(rows: usize, cols: usize, c: *mut f32, ldc: usize, ep: &TileEpilogue) {
            Avx512::epilogue(rows, cols, c, ldc, ep)
        }
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod speed {
    use super::*;
    use std::time::Instant;

    /// `cargo test --release -p slimnn-kernels --lib x6_speed -- --ignored --nocapture`: the
    /// `tdpbf16ps` register-only rate, then the 2 x 2 step loop alone on 64-byte aligned
    /// operands (A hot, B cycling through 8 blocks in L2), in f32-equivalent GFLOP/s. Operand
    /// values matter: constant bit patterns with zero halves ran ~25% faster than random ones.
    #[test]
    #[ignore]
    fn x6_speed() {
        if cpu::tier() != CpuTier::Amx {
            return;
        }
        let iters = 2_000_000usize;
        let ones = [0x3fu8; 1024];
        let t = Instant::now();
        // SAFETY: AMX granted (tier); the loads read a 1 KB buffer.
        unsafe {
            crate::amx::configure();
            std::arch::asm!(
                "tileloadd tmm4, [{a} + {s}*1]",
                "tileloadd tmm5, [{a} + {s}*1]",
                "tileloadd tmm6, [{a} + {s}*1]",
                "tileloadd tmm7, [{a} + {s}*1]",
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                "2:",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "dec {n}",
                "jnz 2b",
                a = in(reg) ones.as_ptr(),
                s = in(reg) 64usize,
                n = inout(reg) iters => _,
                options(nostack),
            );
        }
        let ns = t.elapsed().as_secs_f64() * 1e9 / (4 * iters) as f64;
        eprintln!("tdpbf16ps, operands in tiles: {ns:.2} ns each ({:.0} f32-equivalent GFLOP/s)", 16384.0 / 6.0 / ns);
        let mut seed = 1u64;
        let mut random = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            // Two normal bf16 values in [-1, -0.5] or [0.5, 1].
            f32::from_bits(((seed >> 32) as u32 & 0x807f_807f) | 0x3f00_3f00)
        };
        let (steps, blocks) = (12, 8);
        let aligned = |v: &Vec<f32>| v.as_ptr().align_offset(64);
        let a: Vec<f32> = (0..32 * steps * STEP_ROWS + 16).map(|_| random()).collect();
        let b: Vec<f32> = (0..steps * STEP_ROWS * TILE_NR * blocks + 16).map(|_| random()).collect();
        let (a0, b0) = (&a[aligned(&a)..], &b[aligned(&b)..]);
        let reps = 20_000;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for r in 0..reps {
                let bp = b0.as_ptr().wrapping_add((r % blocks) * steps * STEP_ROWS * TILE_NR);
                // SAFETY: AMX granted (tier); the buffers hold `steps` steps of both row groups
                // and of every B block.
                unsafe {
                    let a2 = a0.as_ptr().add(16 * steps * STEP_ROWS);
                    x86::bench_steps(steps, a0.as_ptr() as *const u8, a2 as *const u8, bp as *const u8);
                }
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let flops = reps as f64 * steps as f64 * 2.0 * 32.0 * TILE_NR as f64 * STEP as f64;
        eprintln!("2 x 2 steps, random operands: {:.0} f32-equivalent GFLOP/s", flops / best / 1e9);
    }
}

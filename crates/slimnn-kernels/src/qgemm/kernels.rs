//! `u8 x i8 -> i32` micro-kernels (`<isa>_qgemm_<mr>x<nr>`): an `mr x NR` tile of exact i32
//! sums over `kq` groups of 4 K values, A read in place (each row's 4 bytes broadcast to every
//! lane), B one packed panel. The optional `tail` holds each row's last partial group,
//! zero-padded, whose B group follows the `kq` full ones.

use super::QKernel;

/// `(mr, kq, a, lda, tail, b, out)`: `out` receives `mr` rows of NR i32 at stride NR.
pub(crate) type TileFn = unsafe fn(usize, usize, *const u8, usize, *const u32, *const u8, *mut i32);

pub(crate) fn tile_fn(k: QKernel) -> TileFn {
    match k {
        #[cfg(target_arch = "x86_64")]
        QKernel::Avx512Vnni => x86::avx512_vnni_qgemm_8x48,
        #[cfg(target_arch = "x86_64")]
        QKernel::AvxVnni => x86::avx_vnni_qgemm_6x16,
        #[cfg(target_arch = "x86_64")]
        QKernel::Avx2 => x86::avx2_qgemm_4x16,
        _ => scalar_qgemm_4x16,
    }
}

/// Reads row `i`'s group `q` (4 bytes) of A.
#[inline(always)]
unsafe fn a_group(a: *const u8, lda: usize, i: usize, q: usize) -> u32 {
    (a.add(i * lda + 4 * q) as *const u32).read_unaligned()
}

/// The portable kernel: 4 x 16.
///
/// # Safety
/// `mr <= 4`; `a` valid for `mr` rows of `4 kq` bytes at stride `lda`; `tail` null or valid
/// for `mr` values; `b` a packed panel of NR = 16 covering `kq` (+1 with a tail) groups; `out`
/// valid for `4 x 16` values.
pub(crate) unsafe fn scalar_qgemm_4x16(
    mr: usize,
    kq: usize,
    a: *const u8,
    lda: usize,
    tail: *const u32,
    b: *const u8,
    out: *mut i32,
) {
    const NR: usize = 16;
    let groups = kq + usize::from(!tail.is_null());
    let mut acc = [[0i32; NR]; 4];
    for q in 0..groups {
        let bq = b.add(q * NR * 4);
        for (i, row) in acc.iter_mut().enumerate().take(mr) {
            let av = if q < kq { a_group(a, lda, i, q) } else { *tail.add(i) }.to_le_bytes();
            for (j, x) in row.iter_mut().enumerate() {
                for (t, &ab) in av.iter().enumerate() {
                    *x += ab as i32 * (*bq.add(j * 4 + t) as i8) as i32;
                }
            }
        }
    }
    for (i, row) in acc.iter().enumerate().take(mr) {
        std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(i * NR), NR);
    }
}

/// How a fused tile finishes f32 outputs: `c[i, j] = act(((acc - za[i] cs[j]) sa[i] sb[j]) +
/// bias[j]) + res[i, j]` for `cols` columns from the tile's first.
pub(crate) struct F32Finish {
    pub c: *mut f32,
    pub ldc: usize,
    pub cols: usize,
    pub col_sums: *const i32,
    /// One value, or one per column when `b_scale_per_col`.
    pub b_scale: *const f32,
    pub b_scale_per_col: bool,
    /// Null for none.
    pub bias: *const f32,
    /// Null for none.
    pub res: *const f32,
    pub res_ld: usize,
    /// Outlier channels ([`super::Outliers`]): the tile's first row of values (null for
    /// none), and the weight rows from the panel's first column.
    pub ox: *const f32,
    pub ox_ld: usize,
    pub ow: *const f32,
    pub ow_ld: usize,
    pub ok: usize,
    pub za: [i32; 8],
    pub sa: [f32; 8],
    pub act: crate::gemm::Activation,
}

#[cfg(target_arch = "x86_64")]
pub(crate) use x86::avx512_vnni_qgemm_8x48_f32;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{a_group, F32Finish};
    use std::arch::x86_64::*;

    /// Calls `$body::<MR>` (or `$body::<MR, $extra>`) for a runtime `mr` in `1..=max`.
    macro_rules! by_rows {
        ($body:ident::<_, $extra:tt>, $mr:expr, [$($m:literal),*], $args:tt) => {
            match $mr {
                $( $m => $body::<$m, $extra> $args, )*
                _ => unreachable!("tile of {} rows", $mr),
            }
        };
        ($body:ident, $mr:expr, [$($m:literal),*], $args:tt) => {
            match $mr {
                $( $m => $body::<$m> $args, )*
                _ => unreachable!("tile of {} rows", $mr),
            }
        };
    }

    /// The exact i32 sums of an `MR x 48` tile, left in registers.
    #[inline(always)]
    unsafe fn vnni512_acc<const MR: usize>(
        kq: usize,
        a: *const u8,
        lda: usize,
        tail: *const u32,
        b: *const u8,
    ) -> [[__m512i; 3]; MR] {
        const NR: usize = 48;
        let mut acc = [[_mm512_setzero_si512(); 3]; MR];
        #[inline(always)]
        unsafe fn step<const MR: usize>(acc: &mut [[__m512i; 3]; MR], bq: *const u8, a: impl Fn(usize) -> u32) {
            let bv = [
                _mm512_load_si512(bq as *const _),
                _mm512_load_si512(bq.add(64) as *const _),
                _mm512_load_si512(bq.add(128) as *const _),
            ];
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_epi32(a(i) as i32);
                for (x, &bj) in row.iter_mut().zip(&bv) {
                    *x = _mm512_dpbusd_epi32(*x, av, bj);
                }
            }
        }
        // The full groups, then the tail as a separate step: a branch in the loop keeps the
        // accumulators out of registers at opt-level 2.
        for q in 0..kq {
            step(&mut acc, b.add(q * NR * 4), |i| a_group(a, lda, i, q));
        }
        if !tail.is_null() {
            step(&mut acc, b.add(kq * NR * 4), |i| *tail.add(i));
        }
        acc
    }

    #[inline(always)]
    unsafe fn vnni512_body<const MR: usize>(
        kq: usize,
        a: *const u8,
        lda: usize,
        tail: *const u32,
        b: *const u8,
        out: *mut i32,
    ) {
        let acc = vnni512_acc::<MR>(kq, a, lda, tail, b);
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm512_store_si512(out.add(i * 48 + v * 16) as *mut _, *x);
            }
        }
    }

    /// The tile finished in registers: zero-point correction, scales, bias, activation and
    /// residual, stored as f32 (storing i32 sums and finishing them in a second pass cost
    /// about a fifth of the time at K = 384).
    /// `OUTLIERS` compiles the outlier-channel terms in, so the plain epilogue's code stays as
    /// it was without them.
    #[inline(always)]
    unsafe fn vnni512_f32_body<const MR: usize, const OUTLIERS: bool>(
        kq: usize,
        a: *const u8,
        lda: usize,
        tail: *const u32,
        b: *const u8,
        f: &F32Finish,
    ) {
        let acc = vnni512_acc::<MR>(kq, a, lda, tail, b);
        for v in 0..3 {
            let j = v * 16;
            if j >= f.cols {
                break;
            }
            let mask: __mmask16 = if f.cols - j >= 16 { 0xffff } else { (1u16 << (f.cols - j)) - 1 };
            let cs = _mm512_maskz_loadu_epi32(mask, f.col_sums.add(j) as *const _);
            let sb = match f.b_scale_per_col {
                true => _mm512_maskz_loadu_ps(mask, f.b_scale.add(j)),
                false => _mm512_set1_ps(*f.b_scale),
            };
            let bias = match f.bias.is_null() {
                true => _mm512_setzero_ps(),
                false => _mm512_maskz_loadu_ps(mask, f.bias.add(j)),
            };
            for (i, row) in acc.iter().enumerate() {
                let corr = _mm512_mullo_epi32(_mm512_set1_epi32(f.za[i]), cs);
                let x = _mm512_cvtepi32_ps(_mm512_sub_epi32(row[v], corr));
                // Multiply, then add: the graph's own order (Cast, Mul, Add), so results match it exactly.
                let mut y = _mm512_mul_ps(x, _mm512_mul_ps(_mm512_set1_ps(f.sa[i]), sb));
                if OUTLIERS {
                    for t in 0..f.ok {
                        let w = _mm512_maskz_loadu_ps(mask, f.ow.add(t * f.ow_ld + j));
                        y = _mm512_fmadd_ps(_mm512_set1_ps(*f.ox.add(i * f.ox_ld + t)), w, y);
                    }
                }
                y = _mm512_add_ps(y, bias);
                y = crate::math::activate(y, f.act);
                if !f.res.is_null() {
                    y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(mask, f.res.add(i * f.res_ld + j)));
                }
                _mm512_mask_storeu_ps(f.c.add(i * f.ldc + j), mask, y);
            }
        }
    }

    /// AVX-512 VNNI 8 x 48 with the f32 epilogue fused (see [`F32Finish`]).
    ///
    /// # Safety
    /// As [`avx512_vnni_qgemm_8x48`]; `f`'s pointers valid for `mr` rows and `f.cols <= 48`
    /// columns.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")]
    pub(crate) unsafe fn avx512_vnni_qgemm_8x48_f32(
        mr: usize,
        kq: usize,
        a: *const u8,
        lda: usize,
        tail: *const u32,
        b: *const u8,
        f: &F32Finish,
    ) {
        if f.ox.is_null() {
            by_rows!(vnni512_f32_body::<_, false>, mr, [1, 2, 3, 4, 5, 6, 7, 8], (kq, a, lda, tail, b, f))
        } else {
            by_rows!(vnni512_f32_body::<_, true>, mr, [1, 2, 3, 4, 5, 6, 7, 8], (kq, a, lda, tail, b, f))
        }
    }

    /// AVX-512 VNNI: 8 x 48 (24 zmm accumulators, 3 panel vectors).
    ///
    /// # Safety
    /// As `scalar_qgemm_4x16` with `mr <= 8`, NR = 48, a 64-byte aligned panel and `out`, on a
    /// host with AVX-512 F/BW and VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    pub(crate) unsafe fn avx512_vnni_qgemm_8x48(
        mr: usize,
        kq: usize,
        a: *const u8,
        lda: usize,
        tail: *const u32,
        b: *const u8,
        out: *mut i32,
    ) {
        by_rows!(vnni512_body, mr, [1, 2, 3, 4, 5, 6, 7, 8], (kq, a, lda, tail, b, out))
    }

    #[inline(always)]
    unsafe fn vnni256_body<const MR: usize>(
        kq: usize,
        a: *const u8,
        lda: usize,
        tail: *const u32,
        b: *const u8,
        out: *mut i32,
    ) {
        const NR: usize = 16;
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        #[inline(always)]
        unsafe fn step<const MR: usize>(acc: &mut [[__m256i; 2]; MR], bq: *const u8, a: impl Fn(usize) -> u32) {
            let bv = [_mm256_load_si256(bq as *const _), _mm256_load_si256(bq.add(32) as *const _)];
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_epi32(a(i) as i32);
                for (x, &bj) in row.iter_mut().zip(&bv) {
                    *x = _mm256_dpbusd_avx_epi32(*x, av, bj);
                }
            }
        }
        for q in 0..kq {
            step(&mut acc, b.add(q * NR * 4), |i| a_group(a, lda, i, q));
        }
        if !tail.is_null() {
            step(&mut acc, b.add(kq * NR * 4), |i| *tail.add(i));
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm256_storeu_si256(out.add(i * NR + v * 8) as *mut _, *x);
            }
        }
    }

    /// AVX-VNNI: 6 x 16 (12 ymm accumulators).
    ///
    /// # Safety
    /// As `scalar_qgemm_4x16` with `mr <= 6`, a 32-byte aligned panel, on a host with AVX2 and
    /// AVX-VNNI.
    #[target_feature(enable = "avx2,avxvnni")]
    pub(crate) unsafe fn avx_vnni_qgemm_6x16(
        mr: usize,
        kq: usize,
        a: *const u8,
        lda: usize,
        tail: *const u32,
        b: *const u8,
        out: *mut i32,
    ) {
        by_rows!(vnni256_body, mr, [1, 2, 3, 4, 5, 6], (kq, a, lda, tail, b, out))
    }

    #[inline(always)]
    unsafe fn avx2_body<const MR: usize>(
        kq: usize,
        a: *const u8,
        lda: usize,
        tail: *const u32,
        b: *const u8,
        out: *mut i32,
    ) {
        const NR: usize = 16;
        // vpmaddubsw adds two u8 x i8 products into an i16 with saturation: 255 * -128 * 2
        // does not fit. With A = lo + 128 hi (lo < 128, hi in {0, 1}) neither part's pair sum
        // can saturate; the hi part is weighted by 128 when widened to i32.
        let low7 = _mm256_set1_epi8(0x7f);
        let one8 = _mm256_set1_epi8(1);
        let ones16 = _mm256_set1_epi16(1);
        let w128 = _mm256_set1_epi16(128);
        let mut acc = [[_mm256_setzero_si256(); 2]; MR];
        let consts = [low7, one8, ones16, w128];
        #[inline(always)]
        unsafe fn step<const MR: usize>(
            acc: &mut [[__m256i; 2]; MR],
            bq: *const u8,
            [low7, one8, ones16, w128]: [__m256i; 4],
            a: impl Fn(usize) -> u32,
        ) {
            let bv = [_mm256_load_si256(bq as *const _), _mm256_load_si256(bq.add(32) as *const _)];
            for (i, row) in acc.iter_mut().enumerate() {
                let av = _mm256_set1_epi32(a(i) as i32);
                let lo = _mm256_and_si256(av, low7);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<7>(av), one8);
                for (x, &bj) in row.iter_mut().zip(&bv) {
                    let plo = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, bj), ones16);
                    let phi = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, bj), w128);
                    *x = _mm256_add_epi32(*x, _mm256_add_epi32(plo, phi));
                }
            }
        }
        for q in 0..kq {
            step(&mut acc, b.add(q * NR * 4), consts, |i| a_group(a, lda, i, q));
        }
        if !tail.is_null() {
            step(&mut acc, b.add(kq * NR * 4), consts, |i| *tail.add(i));
        }
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm256_storeu_si256(out.add(i * NR + v * 8) as *mut _, *x);
            }
        }
    }

    /// AVX2: 4 x 16 with the saturation-free split of A.
    ///
    /// # Safety
    /// As `scalar_qgemm_4x16` with a 32-byte aligned panel, on a host with AVX2.
    #[target_feature(enable = "avx2")]
    pub(crate) unsafe fn avx2_qgemm_4x16(
        mr: usize,
        kq: usize,
        a: *const u8,
        lda: usize,
        tail: *const u32,
        b: *const u8,
        out: *mut i32,
    ) {
        by_rows!(avx2_body, mr, [1, 2, 3, 4], (kq, a, lda, tail, b, out))
    }
}

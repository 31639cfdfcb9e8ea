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

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::a_group;
    use std::arch::x86_64::*;

    /// Calls `$body::<MR>` for a runtime `mr` in `1..=max`.
    macro_rules! by_rows {
        ($body:ident, $mr:expr, [$($m:literal),*], $args:tt) => {
            match $mr {
                $( $m => $body::<$m> $args, )*
                _ => unreachable!("tile of {} rows", $mr),
            }
        };
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
        for (i, row) in acc.iter().enumerate() {
            for (v, x) in row.iter().enumerate() {
                _mm512_store_si512(out.add(i * NR + v * 16) as *mut _, *x);
            }
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

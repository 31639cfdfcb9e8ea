//! Matrix products against weights stored as ggml blocks (Q4_1, Q8_0, and any other block
//! format through a dequantize callback): `y[m, n] = x[m, k] · W[n, k]ᵀ` with f32 activations.
//!
//! Two paths, picked by the number of activation rows:
//! * few rows (decoding one token): every output is a dot product of an activation row with a
//!   weight row read straight from its blocks. Q4_1 and Q8_0 have AVX2 dots that widen the
//!   4/8-bit codes to f32 in registers (no dequantized copy of the weight ever exists; AVX-512
//!   takes a whole block per two registers); other
//!   formats dequantize one row at a time into a small buffer. Threads split the weight rows.
//! * many rows (prefill, perplexity): weight rows are dequantized a tile at a time (256 rows),
//!   packed, and multiplied by the packed f32 GEMM, so the product runs at GEMM speed while at
//!   most one tile of f32 weights exists.
//!
//! Activations stay f32 (not re-quantized to 8 bits as llama.cpp does): this keeps the product
//! within f32 rounding of the dequantized model, which the LLM's reference checks rely on.

use crate::cpu::{self, CpuTier};
use crate::error::{check_tier, KernelError};
use crate::gemm::{gemm, Epilogue, PackedB, Par};
use rayon::prelude::*;

const KERNEL: &str = "block_matmul";

/// Activation rows below which the per-row dot path is used.
pub const GEMM_MIN_ROWS: usize = 4;
/// Weight rows dequantized per GEMM tile.
const TILE_ROWS: usize = 256;
/// Weight rows per threaded task on the dot path.
const TASK_ROWS: usize = 64;

/// Block formats with a dedicated dot kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastFormat {
    /// 32 values: f16 `d`, f16 `m`, 16 bytes of nibbles; `x = d * q + m`.
    Q4_1,
    /// 32 values: f16 `d`, 32 `i8`; `x = d * q`.
    Q8_0,
}

impl FastFormat {
    fn block_bytes(self) -> usize {
        match self {
            FastFormat::Q4_1 => 20,
            FastFormat::Q8_0 => 34,
        }
    }
}

/// A `[n, k]` weight in a block format.
#[derive(Clone, Copy)]
pub struct BlockWeight<'a> {
    pub bytes: &'a [u8],
    pub n: usize,
    pub k: usize,
    pub block_len: usize,
    pub block_bytes: usize,
    /// The format's dedicated dot kernel, if it has one.
    pub fast: Option<FastFormat>,
    /// Dequantizes whole blocks (`bytes` a multiple of `block_bytes`) into f32 values.
    pub dequantize: &'a (dyn Fn(&[u8], &mut [f32]) + Sync),
}

impl BlockWeight<'_> {
    fn row_bytes(&self) -> usize {
        self.k / self.block_len.max(1) * self.block_bytes
    }

    fn check(&self) -> Result<(), KernelError> {
        if self.block_len == 0 || !self.k.is_multiple_of(self.block_len) {
            return Err(KernelError::shape(
                KERNEL,
                format!("k = {} is not whole blocks of {}", self.k, self.block_len),
            ));
        }
        if self.bytes.len() != self.n * self.row_bytes() {
            return Err(KernelError::shape(
                KERNEL,
                format!("{} weight bytes for {} rows of {} bytes", self.bytes.len(), self.n, self.row_bytes()),
            ));
        }
        if let Some(f) = self.fast {
            if f.block_bytes() != self.block_bytes || self.block_len != 32 {
                return Err(KernelError::shape(
                    KERNEL,
                    format!("{f:?} blocks are 32 values in {} bytes", f.block_bytes()),
                ));
            }
        }
        Ok(())
    }
}

/// IEEE half to f32 (ggml's block scales).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match exp {
        0 if mant == 0 => sign,
        0 => {
            // Subnormal: value = mant * 2^-24.
            let v = mant as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        31 => sign | 0x7f80_0000 | (mant << 13),
        _ => sign | ((exp + 112) << 23) | (mant << 13),
    };
    f32::from_bits(bits)
}

/// Scalar references: the dot of one weight row (blocks) with `x`, accumulated in f64.
pub mod reference {
    use super::{f16_to_f32, FastFormat};

    pub fn dot(format: FastFormat, row: &[u8], x: &[f32]) -> f64 {
        let mut acc = 0f64;
        for (b, xs) in row.chunks_exact(format.block_bytes()).zip(x.chunks_exact(32)) {
            let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]])) as f64;
            match format {
                FastFormat::Q4_1 => {
                    let m = f16_to_f32(u16::from_le_bytes([b[2], b[3]])) as f64;
                    for j in 0..16 {
                        acc += (d * (b[4 + j] & 15) as f64 + m) * xs[j] as f64;
                        acc += (d * (b[4 + j] >> 4) as f64 + m) * xs[j + 16] as f64;
                    }
                }
                FastFormat::Q8_0 => {
                    for j in 0..32 {
                        acc += d * (b[2 + j] as i8) as f64 * xs[j] as f64;
                    }
                }
            }
        }
        acc
    }
}

/// Portable dot of one weight row with `x` (f32 accumulation per block).
fn dot_generic(format: FastFormat, row: &[u8], x: &[f32]) -> f32 {
    let mut acc = 0f32;
    for (b, xs) in row.chunks_exact(format.block_bytes()).zip(x.chunks_exact(32)) {
        let d = f16_to_f32(u16::from_le_bytes([b[0], b[1]]));
        match format {
            FastFormat::Q4_1 => {
                let m = f16_to_f32(u16::from_le_bytes([b[2], b[3]]));
                let (mut qx, mut sx) = (0f32, 0f32);
                for j in 0..16 {
                    qx += (b[4 + j] & 15) as f32 * xs[j] + (b[4 + j] >> 4) as f32 * xs[j + 16];
                    sx += xs[j] + xs[j + 16];
                }
                acc += d * qx + m * sx;
            }
            FastFormat::Q8_0 => {
                let qx: f32 = b[2..34].iter().zip(xs).map(|(&q, &v)| (q as i8) as f32 * v).sum();
                acc += d * qx;
            }
        }
    }
    acc
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::FastFormat;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// The two f16 values at `p` as f32 lanes 0 and 1 (F16C).
    #[inline(always)]
    unsafe fn two_halves(p: *const u8) -> __m128 {
        _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()))
    }

    /// # Safety
    /// The host must support AVX2, FMA and F16C; `row` holds `x.len() / 32` blocks of `format`;
    /// for Q4_1, `sums[b]` is the sum of `x`'s block `b`.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(format: FastFormat, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let mut acc = _mm256_setzero_ps();
        let xp = x.as_ptr();
        match format {
            FastFormat::Q4_1 => {
                let mask = _mm_set1_epi8(15);
                let mut offsets = _mm_setzero_ps();
                for (i, b) in row.chunks_exact(20).enumerate() {
                    let dm = two_halves(b.as_ptr());
                    let q = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
                    let lo = _mm_and_si128(q, mask);
                    let hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
                    let p = xp.add(i * 32);
                    let f = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v));
                    let mut qx = _mm256_mul_ps(f(lo), _mm256_loadu_ps(p));
                    qx = _mm256_fmadd_ps(f(_mm_srli_si128(lo, 8)), _mm256_loadu_ps(p.add(8)), qx);
                    qx = _mm256_fmadd_ps(f(hi), _mm256_loadu_ps(p.add(16)), qx);
                    qx = _mm256_fmadd_ps(f(_mm_srli_si128(hi, 8)), _mm256_loadu_ps(p.add(24)), qx);
                    acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(dm), qx, acc);
                    // m * sum(x): lane 1 of `dm` times the block sum.
                    offsets = _mm_fmadd_ps(dm, _mm_set_ps(0.0, 0.0, *sums.get_unchecked(i), 0.0), offsets);
                }
                hsum(acc) + _mm_cvtss_f32(_mm_shuffle_ps(offsets, offsets, 1))
            }
            FastFormat::Q8_0 => {
                for (i, b) in row.chunks_exact(34).enumerate() {
                    let d = two_halves(b.as_ptr());
                    let q = b.as_ptr().add(2);
                    let p = xp.add(i * 32);
                    let f = |o: usize| {
                        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(q.add(o) as *const __m128i)))
                    };
                    let mut qx = _mm256_mul_ps(f(0), _mm256_loadu_ps(p));
                    qx = _mm256_fmadd_ps(f(8), _mm256_loadu_ps(p.add(8)), qx);
                    qx = _mm256_fmadd_ps(f(16), _mm256_loadu_ps(p.add(16)), qx);
                    qx = _mm256_fmadd_ps(f(24), _mm256_loadu_ps(p.add(24)), qx);
                    acc = _mm256_fmadd_ps(_mm256_broadcastss_ps(d), qx, acc);
                }
                hsum(acc)
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::FastFormat;
    use std::arch::x86_64::*;

    /// The AVX2 kernel's math on 16 lanes: one block is two registers of activations.
    ///
    /// # Safety
    /// The host must support AVX-512F and F16C; `row` holds `x.len() / 32` blocks of `format`;
    /// for Q4_1, `sums[b]` is the sum of `x`'s block `b`.
    #[target_feature(enable = "avx512f,f16c")]
    pub unsafe fn dot(format: FastFormat, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
        let mut acc = _mm512_setzero_ps();
        let xp = x.as_ptr();
        let halves = |p: *const u8| _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        match format {
            FastFormat::Q4_1 => {
                let mask = _mm_set1_epi8(15);
                let mut offset = 0f32;
                for (i, b) in row.chunks_exact(20).enumerate() {
                    let dm = halves(b.as_ptr());
                    let q = _mm_loadu_si128(b.as_ptr().add(4) as *const __m128i);
                    let lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(q, mask)));
                    let hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(q, 4), mask)));
                    let p = xp.add(i * 32);
                    let qx = _mm512_fmadd_ps(hi, _mm512_loadu_ps(p.add(16)), _mm512_mul_ps(lo, _mm512_loadu_ps(p)));
                    acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(dm), qx, acc);
                    offset += _mm_cvtss_f32(_mm_shuffle_ps(dm, dm, 1)) * *sums.get_unchecked(i);
                }
                _mm512_reduce_add_ps(acc) + offset
            }
            FastFormat::Q8_0 => {
                for (i, b) in row.chunks_exact(34).enumerate() {
                    let d = halves(b.as_ptr());
                    let q = b.as_ptr().add(2) as *const __m128i;
                    let q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q)));
                    let q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(q.add(1))));
                    let p = xp.add(i * 32);
                    let qx = _mm512_fmadd_ps(q1, _mm512_loadu_ps(p.add(16)), _mm512_mul_ps(q0, _mm512_loadu_ps(p)));
                    acc = _mm512_fmadd_ps(_mm512_broadcastss_ps(d), qx, acc);
                }
                _mm512_reduce_add_ps(acc)
            }
        }
    }
}

/// F16C (half-precision conversion) is not part of the tier definition; checked once.
fn has_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        static F16C: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *F16C.get_or_init(|| std::is_x86_feature_detected!("f16c"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Per-block sums of `x` (Q4_1's offset term needs them once per activation row).
fn block_sums(x: &[f32]) -> Vec<f32> {
    x.chunks_exact(32).map(|b| b.iter().sum()).collect()
}

/// The dot of one weight row (blocks of `format`) with `x` using `tier`'s kernel; `sums` are
/// [`block_sums`] of `x`.
fn dot_with(tier: CpuTier, format: FastFormat, row: &[u8], x: &[f32], sums: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if tier >= CpuTier::Avx512 && has_f16c() {
        // SAFETY: as below; Avx512 and above imply AVX-512F.
        return unsafe { avx512::dot(format, row, x, sums) };
    }
    #[cfg(target_arch = "x86_64")]
    if tier >= CpuTier::Avx2 && has_f16c() {
        // SAFETY: callers only pass tiers `check_tier` accepted (Avx2 and above imply AVX2 +
        // FMA), F16C was detected, and lengths were checked by the callers.
        return unsafe { avx2::dot(format, row, x, sums) };
    }
    let _ = (tier, sums);
    dot_generic(format, row, x)
}

/// Dot of one weight row with `x` with the active tier (for tests and callers outside a GEMM).
pub fn dot(format: FastFormat, row: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    dot_tier(cpu::tier(), format, row, x)
}

/// [`dot`] with `tier`'s kernel.
pub fn dot_tier(tier: CpuTier, format: FastFormat, row: &[u8], x: &[f32]) -> Result<f32, KernelError> {
    check_tier(tier)?;
    if !x.len().is_multiple_of(32) || row.len() != x.len() / 32 * format.block_bytes() {
        return Err(KernelError::shape(KERNEL, format!("{} bytes of {format:?} for {} values", row.len(), x.len())));
    }
    Ok(dot_with(tier, format, row, x, &block_sums(x)))
}

/// `out[m, n] = x[m, k] · Wᵀ` with the active tier.
pub fn block_matmul(
    m: usize,
    x: &[f32],
    w: &BlockWeight<'_>,
    out: &mut [f32],
    par: Par<'_>,
) -> Result<(), KernelError> {
    block_matmul_tier(cpu::tier(), m, x, w, out, par)
}

/// [`block_matmul`] with `tier`'s kernels.
pub fn block_matmul_tier(
    tier: CpuTier,
    m: usize,
    x: &[f32],
    w: &BlockWeight<'_>,
    out: &mut [f32],
    par: Par<'_>,
) -> Result<(), KernelError> {
    check_tier(tier)?;
    w.check()?;
    let (n, k) = (w.n, w.k);
    if x.len() != m * k || out.len() != m * n {
        return Err(KernelError::shape(
            KERNEL,
            format!("x has {} values for {m} x {k}, out {} for {m} x {n}", x.len(), out.len()),
        ));
    }
    if m == 0 || n == 0 {
        return Ok(());
    }
    if m < GEMM_MIN_ROWS {
        for (xr, yr) in x.chunks_exact(k.max(1)).zip(out.chunks_exact_mut(n)) {
            rows_dot(tier, xr, w, yr, par);
        }
        return Ok(());
    }
    let mut tile = vec![0f32; TILE_ROWS.min(n) * k];
    let mut packed = PackedB::empty(tier)?;
    let row_bytes = w.row_bytes();
    for j0 in (0..n).step_by(TILE_ROWS) {
        let rows = TILE_ROWS.min(n - j0);
        let t = &mut tile[..rows * k];
        dequantize_rows(&w.bytes[j0 * row_bytes..(j0 + rows) * row_bytes], row_bytes, k, w.dequantize, t, par);
        packed.pack_transposed(t, k, rows, k)?;
        gemm(m, x, k, &packed, &mut out[j0..], n, Epilogue::NONE, par)?;
    }
    Ok(())
}

fn dequantize_rows(
    bytes: &[u8],
    row_bytes: usize,
    k: usize,
    dequantize: &(dyn Fn(&[u8], &mut [f32]) + Sync),
    out: &mut [f32],
    par: Par<'_>,
) {
    let job = |(src, dst): (&[u8], &mut [f32])| dequantize(src, dst);
    match par {
        Par::Seq => bytes.chunks_exact(row_bytes).zip(out.chunks_exact_mut(k)).for_each(job),
        Par::Current => bytes.par_chunks_exact(row_bytes).zip(out.par_chunks_exact_mut(k)).for_each(job),
        Par::Pool(p) => p.install(|| bytes.par_chunks_exact(row_bytes).zip(out.par_chunks_exact_mut(k)).for_each(job)),
    }
}

/// One activation row against every weight row: `y[j] = x · W[j]`.
fn rows_dot(tier: CpuTier, x: &[f32], w: &BlockWeight<'_>, y: &mut [f32], par: Par<'_>) {
    let row_bytes = w.row_bytes();
    let sums = block_sums(x);
    let task = |(t, ys): (usize, &mut [f32])| {
        let mut scratch = Vec::new();
        for (i, yv) in ys.iter_mut().enumerate() {
            let j = t * TASK_ROWS + i;
            let row = &w.bytes[j * row_bytes..(j + 1) * row_bytes];
            *yv = match w.fast {
                Some(f) => dot_with(tier, f, row, x, &sums),
                None => {
                    scratch.resize(w.k, 0.0);
                    (w.dequantize)(row, &mut scratch);
                    scratch.iter().zip(x).map(|(a, b)| a * b).sum()
                }
            };
        }
    };
    match par {
        Par::Seq => y.chunks_mut(TASK_ROWS).enumerate().for_each(task),
        Par::Current => y.par_chunks_mut(TASK_ROWS).enumerate().for_each(task),
        Par::Pool(p) => p.install(|| y.par_chunks_mut(TASK_ROWS).enumerate().for_each(task)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// f32 to IEEE half bits (round to nearest; test values are small and normal).
    fn f32_to_f16(v: f32) -> u16 {
        let bits = v.to_bits();
        let sign = ((bits >> 16) & 0x8000) as u16;
        let exp = ((bits >> 23) & 0xff) as i32 - 127 + 15;
        if v == 0.0 || exp <= 0 {
            return sign;
        }
        let mant = ((bits & 0x7f_ffff) + 0x1000) >> 13;
        sign | (((exp as u32) << 10) + mant) as u16
    }

    fn blocks(format: FastFormat, seed: &[u8], scales: &[(f32, f32)]) -> Vec<u8> {
        let mut out = vec![];
        for (i, &(d, m)) in scales.iter().enumerate() {
            out.extend(f32_to_f16(d).to_le_bytes());
            let body = match format {
                FastFormat::Q4_1 => {
                    out.extend(f32_to_f16(m).to_le_bytes());
                    16
                }
                FastFormat::Q8_0 => 32,
            };
            out.extend((0..body).map(|j| seed[(i * 31 + j * 7) % seed.len()].wrapping_mul(j as u8 + 1)));
        }
        out
    }

    fn dequantize(format: FastFormat) -> impl Fn(&[u8], &mut [f32]) + Sync {
        move |b: &[u8], y: &mut [f32]| {
            for (blk, ys) in b.chunks_exact(format.block_bytes()).zip(y.chunks_exact_mut(32)) {
                for (t, v) in ys.iter_mut().enumerate() {
                    let mut e = [0f32; 32];
                    e[t] = 1.0;
                    *v = reference::dot(format, blk, &e) as f32;
                }
            }
        }
    }

    #[test]
    fn half_conversion() {
        for v in [0.0f32, 1.0, -2.5, 0.000123, 65504.0, -0.333] {
            let back = f16_to_f32(f32_to_f16(v));
            assert!((back - v).abs() <= v.abs() * 1e-3, "{v} -> {back}");
        }
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert!(f16_to_f32(0x7c00).is_infinite());
    }

    proptest! {
        #[test]
        fn dots_match_reference(
            seed in proptest::collection::vec(any::<u8>(), 64),
            scales in proptest::collection::vec((-2.0f32..2.0, -2.0f32..2.0), 1..6),
            xs in proptest::collection::vec(-3.0f32..3.0, 192),
        ) {
            for format in [FastFormat::Q4_1, FastFormat::Q8_0] {
                let row = blocks(format, &seed, &scales);
                let x = &xs[..scales.len() * 32];
                let r = reference::dot(format, &row, x);
                let mag: f64 = x.iter().map(|v| v.abs() as f64).sum::<f64>() * 2.0 * 127.0 + 1.0;
                for tier in cpu::supported_tiers() {
                    let got = dot_tier(tier, format, &row, x).unwrap() as f64;
                    prop_assert!((got - r).abs() <= 1e-5 * mag, "{format:?} {tier}: {got} vs {r}");
                }
            }
        }
    }

    #[test]
    fn matmul_paths_match_reference() {
        let seed: Vec<u8> = (0..97u32).map(|i| (i * 89 % 251) as u8).collect();
        for format in [FastFormat::Q4_1, FastFormat::Q8_0] {
            let (n, k) = (300, 96);
            let scales: Vec<(f32, f32)> =
                (0..n * k / 32).map(|i| (((i % 7) as f32 - 3.0) / 50.0, (i % 5) as f32 / 10.0 - 0.2)).collect();
            let bytes = blocks(format, &seed, &scales);
            let deq = dequantize(format);
            for with_fast in [true, false] {
                let w = BlockWeight {
                    bytes: &bytes,
                    n,
                    k,
                    block_len: 32,
                    block_bytes: format.block_bytes(),
                    fast: with_fast.then_some(format),
                    dequantize: &deq,
                };
                for m in [1, 3, 9] {
                    let x: Vec<f32> = (0..m * k).map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0).collect();
                    for tier in cpu::supported_tiers() {
                        for par in [Par::Seq, Par::Current] {
                            let mut out = vec![0f32; m * n];
                            block_matmul_tier(tier, m, &x, &w, &mut out, par).unwrap();
                            let row_bytes = k / 32 * format.block_bytes();
                            for i in 0..m {
                                for j in 0..n {
                                    let r =
                                        reference::dot(format, &bytes[j * row_bytes..][..row_bytes], &x[i * k..][..k]);
                                    let got = out[i * n + j] as f64;
                                    assert!(
                                        (got - r).abs() <= 1e-4 * (1.0 + r.abs()),
                                        "{format:?} m={m} {tier}: {got} vs {r}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_inconsistent_sizes() {
        let deq = dequantize(FastFormat::Q8_0);
        let bytes = vec![0u8; 34];
        let w =
            BlockWeight { bytes: &bytes, n: 2, k: 32, block_len: 32, block_bytes: 34, fast: None, dequantize: &deq };
        let mut out = vec![0f32; 2];
        assert!(block_matmul(1, &[0.0; 32], &w, &mut out, Par::Seq).is_err());
    }
}

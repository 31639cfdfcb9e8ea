//! Weight-only quantized GEMM: f32 activations times 8- or 4-bit weight codes, dequantized in
//! the micro-kernel (`w = (code - zero) * scale`, one scale and zero per block of `block` K
//! values and column) and accumulated in f32. For memory-bound products (few rows) it reads
//! a quarter (int8) or an eighth (int4) of the f32 weight's bytes.
//!
//! Packing: column panels of NR (32 on AVX-512, 16 otherwise); per K row, a panel holds NR
//! codes: one byte each for 8 bits, or NR/2 bytes for 4 bits with column `j` in the low nibble
//! and column `j + NR/2` in the high nibble of byte `j` (both halves unpack with one shift).

use super::AlignedBytes;
use crate::cpu::{self, CpuTier};
use crate::error::{check_tier, KernelError};
use crate::gemm::driver::{grid, Ties};
use crate::gemm::{Activation, Epilogue, Par};

const KERNEL: &str = "weight-only gemm";

/// Rows of A per micro-tile.
const MR: usize = 6;

/// Weight codes with per-block scales and zero points, packed for one tier.
#[derive(Clone)]
pub struct PackedWeightOnly {
    tier: CpuTier,
    bits: usize,
    k: usize,
    n: usize,
    block: usize,
    nr: usize,
    /// Bytes per K row of a panel.
    row_bytes: usize,
    panel_stride: usize,
    codes: AlignedBytes,
    /// Per panel, per block: NR scales then NR zero points (f32).
    params: Vec<f32>,
}

impl std::fmt::Debug for PackedWeightOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedWeightOnly")
            .field("tier", &self.tier)
            .field("bits", &self.bits)
            .field("k", &self.k)
            .field("n", &self.n)
            .field("block", &self.block)
            .finish()
    }
}

fn nr_of(tier: CpuTier) -> usize {
    match tier {
        CpuTier::Avx512 | CpuTier::Amx => 32,
        _ => 16,
    }
}

impl PackedWeightOnly {
    /// From ONNX Runtime's `MatMulNBits` layout: `b` u8 `[n, blocks, block * bits / 8]` (codes
    /// low bits first along K), `scales` `[n * blocks]`, optional `zero_points` u8
    /// `[n * ceil(blocks * bits / 8)]` (default `2^(bits-1)`). Packs for the active tier.
    pub fn from_nbits(
        bits: usize,
        k: usize,
        n: usize,
        block: usize,
        b: &[u8],
        scales: &[f32],
        zero_points: Option<&[u8]>,
    ) -> Result<Self, KernelError> {
        Self::from_nbits_with(cpu::tier(), bits, k, n, block, b, scales, zero_points)
    }

    /// [`PackedWeightOnly::from_nbits`] for `tier`.
    #[allow(clippy::too_many_arguments)]
    pub fn from_nbits_with(
        tier: CpuTier,
        bits: usize,
        k: usize,
        n: usize,
        block: usize,
        b: &[u8],
        scales: &[f32],
        zero_points: Option<&[u8]>,
    ) -> Result<Self, KernelError> {
        if !matches!(bits, 4 | 8) || block == 0 || (bits == 4 && !block.is_multiple_of(2)) {
            return Err(KernelError::shape(KERNEL, format!("{bits}-bit codes in blocks of {block} are not supported")));
        }
        let blocks = k.div_ceil(block);
        let blob = block * bits / 8;
        let zp_bytes = (blocks * bits).div_ceil(8);
        let want = |what: &str, have: usize, need: usize| {
            if have < need {
                Err(KernelError::shape(KERNEL, format!("{what} has {have} values, need {need}")))
            } else {
                Ok(())
            }
        };
        want("B", b.len(), n * blocks * blob)?;
        want("scales", scales.len(), n * blocks)?;
        if let Some(z) = zero_points {
            want("zero points", z.len(), n * zp_bytes)?;
        }
        let code = |j: usize, kk: usize| -> u8 {
            let byte = b[j * blocks * blob + (kk / block) * blob + (kk % block) * bits / 8];
            if bits == 8 {
                byte
            } else if kk.is_multiple_of(2) {
                byte & 15
            } else {
                byte >> 4
            }
        };
        let zero = |j: usize, blk: usize| -> f32 {
            match zero_points {
                None => (1u32 << (bits - 1)) as f32,
                Some(z) if bits == 8 => z[j * zp_bytes + blk] as f32,
                Some(z) => ((z[j * zp_bytes + blk / 2] >> (4 * (blk % 2))) & 15) as f32,
            }
        };
        Self::build(tier, bits, k, n, block, code, |j, blk| scales[j * blocks + blk], zero)
    }

    /// Signed 8-bit weights `w` (`k x n` row-major, stride `ldw`, zero point 0) with one scale
    /// per column (`scales`, `n` values) or per tensor (1 value). Packs for the active tier.
    pub fn from_i8(w: &[i8], k: usize, n: usize, ldw: usize, scales: &[f32]) -> Result<Self, KernelError> {
        Self::from_i8_with(cpu::tier(), w, k, n, ldw, scales)
    }

    /// [`PackedWeightOnly::from_i8`] for `tier`.
    pub fn from_i8_with(
        tier: CpuTier,
        w: &[i8],
        k: usize,
        n: usize,
        ldw: usize,
        scales: &[f32],
    ) -> Result<Self, KernelError> {
        super::check_matrix("weight", w.len(), k, n, ldw)?;
        if scales.len() != 1 && scales.len() != n {
            return Err(KernelError::shape(KERNEL, format!("{} scales for {n} columns", scales.len())));
        }
        let scale = |j: usize, _| scales[if scales.len() == 1 { 0 } else { j }];
        // Codes are offset by 128 so that every width shares the unsigned unpacking.
        Self::build(tier, 8, k, n, k.max(1), |j, kk| (w[kk * ldw + j] as u8) ^ 0x80, scale, |_, _| 128.0)
    }

    #[allow(clippy::too_many_arguments)]
    fn build(
        tier: CpuTier,
        bits: usize,
        k: usize,
        n: usize,
        block: usize,
        code: impl Fn(usize, usize) -> u8,
        scale: impl Fn(usize, usize) -> f32,
        zero: impl Fn(usize, usize) -> f32,
    ) -> Result<Self, KernelError> {
        check_tier(tier)?;
        let nr = nr_of(tier);
        let row_bytes = nr * bits / 8;
        let blocks = k.div_ceil(block);
        let panels = n.div_ceil(nr);
        let too_big = || KernelError::shape(KERNEL, format!("packed weight of {k} x {n} is too large"));
        let panel_stride = k.checked_mul(row_bytes).map(|s| s.next_multiple_of(64)).ok_or_else(too_big)?;
        let total = panel_stride.checked_mul(panels).filter(|&t| t <= isize::MAX as usize).ok_or_else(too_big)?;
        let mut codes = AlignedBytes::zeroed(total);
        let mut params = vec![0f32; panels * blocks * 2 * nr];
        let dst = codes.as_mut_slice();
        let half = nr / 2;
        for j in 0..n {
            let (p, jj) = (j / nr, j % nr);
            for kk in 0..k {
                let c = code(j, kk);
                let at = p * panel_stride + kk * row_bytes;
                if bits == 8 {
                    dst[at + jj] = c;
                } else if jj < half {
                    dst[at + jj] |= c & 15;
                } else {
                    dst[at + jj - half] |= (c & 15) << 4;
                }
            }
            for blk in 0..blocks {
                let at = (p * blocks + blk) * 2 * nr;
                params[at + jj] = scale(j, blk);
                params[at + nr + jj] = zero(j, blk);
            }
        }
        Ok(PackedWeightOnly { tier, bits, k, n, block, nr, row_bytes, panel_stride, codes, params })
    }

    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }
    pub fn bits(&self) -> usize {
        self.bits
    }
    pub fn block(&self) -> usize {
        self.block
    }
    pub fn tier(&self) -> CpuTier {
        self.tier
    }
    /// Bytes held (codes and per-block parameters).
    pub fn bytes(&self) -> usize {
        self.codes.as_slice().len() + self.params.len() * 4
    }

    /// The dequantized weight `W[kk][j]` (tests and references).
    pub fn get(&self, kk: usize, j: usize) -> Option<f32> {
        if kk >= self.k || j >= self.n {
            return None;
        }
        let (p, jj) = (j / self.nr, j % self.nr);
        let at = p * self.panel_stride + kk * self.row_bytes;
        let bytes = self.codes.as_slice();
        let half = self.nr / 2;
        let c = match self.bits {
            8 => bytes[at + jj],
            _ if jj < half => bytes[at + jj] & 15,
            _ => bytes[at + jj - half] >> 4,
        };
        let blocks = self.k.div_ceil(self.block);
        let pa = (p * blocks + kk / self.block) * 2 * self.nr;
        Some((c as f32 - self.params[pa + self.nr + jj]) * self.params[pa + jj])
    }
}

/// `C = epilogue(A·W)` for f32 `A` (`m x w.k()`, stride `lda`) and a weight-only packed `W`
/// (`C` is `m x w.n()`, stride `ldc`). `epilogue.accumulate` is not supported.
#[allow(clippy::too_many_arguments)]
pub fn wgemm(
    m: usize,
    a: &[f32],
    lda: usize,
    w: &PackedWeightOnly,
    c: &mut [f32],
    ldc: usize,
    ep: Epilogue<'_>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    check_tier(w.tier)?;
    let (k, n) = (w.k, w.n);
    super::check_matrix("A", a.len(), m, k, lda)?;
    super::check_matrix("C", c.len(), m, n, ldc)?;
    if ep.accumulate {
        return Err(KernelError::epilogue(KERNEL, "accumulating into C is not supported"));
    }
    let qep = super::QEpilogue {
        a_zero: super::PerRow::Tensor(0),
        a_scale: super::PerRow::Tensor(1.0),
        b_scale: &[1.0],
        bias: ep.bias,
        activation: ep.activation,
        residual: ep.residual,
        outliers: None,
    };
    super::check_epilogue(m, n, &qep, true)?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    let job = Job { a: a.as_ptr(), lda, w, c: c.as_mut_ptr(), ldc, ep: &ep };
    let threads = par.threads().min(m.saturating_mul(n).saturating_mul(k.max(1)) >> 19).max(1);
    let (tm, tn) = grid(threads, m.div_ceil(MR), n.div_ceil(w.nr), Ties::Columns);
    let rows_per = m.div_ceil(MR).div_ceil(tm) * MR;
    let panels = n.div_ceil(w.nr);
    let panels_per = panels.div_ceil(tn);
    let task = |t: usize| {
        let (ti, tj) = (t / tn, t % tn);
        let rows = (ti * rows_per).min(m)..((ti + 1) * rows_per).min(m);
        let cols = (tj * panels_per).min(panels)..((tj + 1) * panels_per).min(panels);
        if !rows.is_empty() && !cols.is_empty() {
            // SAFETY: the buffers were validated above; tasks own disjoint blocks of C.
            unsafe { run_block(&job, rows, cols) }
        }
    };
    par.run_tasks(tm * tn, task);
    Ok(())
}

struct Job<'a> {
    a: *const f32,
    lda: usize,
    w: &'a PackedWeightOnly,
    c: *mut f32,
    ldc: usize,
    ep: &'a Epilogue<'a>,
}

// SAFETY: A, the weight and the epilogue operands are only read; C is written in disjoint
// blocks by the tasks (see `wgemm`).
unsafe impl Sync for Job<'_> {}

#[repr(C, align(64))]
struct Tile([f32; MR * 32]);

/// # Safety
/// The job's buffers must be valid for its dimensions; no other task writes this block.
unsafe fn run_block(job: &Job, rows: std::ops::Range<usize>, panels: std::ops::Range<usize>) {
    let w = job.w;
    let (n, nr) = (w.n, w.nr);
    let blocks = w.k.div_ceil(w.block);
    let col0 = panels.start * nr;
    let width = (panels.end * nr).min(n) - col0;
    let mut tile = Tile([0.0; MR * 32]);
    let mut tmp = vec![0f32; if job.ep.activation == Activation::None { 0 } else { width }];
    let mut ir = rows.start;
    while ir < rows.end {
        let mr = MR.min(rows.end - ir);
        let a = job.a.add(ir * job.lda);
        for p in panels.clone() {
            let codes = w.codes.as_slice().as_ptr().add(p * w.panel_stride);
            let params = w.params.as_ptr().add(p * blocks * 2 * nr);
            micro(w, mr, a, job.lda, codes, params, tile.0.as_mut_ptr());
            let j0 = p * nr;
            let cols = nr.min(n - j0);
            for i in 0..mr {
                std::ptr::copy_nonoverlapping(tile.0.as_ptr().add(i * nr), job.c.add((ir + i) * job.ldc + j0), cols);
            }
        }
        for i in 0..mr {
            let r = ir + i;
            let row = std::slice::from_raw_parts_mut(job.c.add(r * job.ldc + col0), width);
            if let Some(b) = job.ep.bias {
                for (o, &v) in row.iter_mut().zip(&b[col0..col0 + width]) {
                    *o += v;
                }
            }
            if job.ep.activation != Activation::None {
                tmp.copy_from_slice(row);
                // Lengths match and the tier was checked by `wgemm`.
                let _ = crate::rows::map_activation_with(w.tier, &tmp, job.ep.activation, row);
            }
            if let Some(res) = job.ep.residual {
                for (o, &v) in row.iter_mut().zip(&res.data[r * res.ld + col0..][..width]) {
                    *o += v;
                }
            }
        }
        ir += mr;
    }
}

/// One `mr x NR` tile over the whole K into `out` (rows of NR).
///
/// # Safety
/// `a` valid for `mr` rows of `k` values at stride `lda`; `codes` and `params` one panel's.
unsafe fn micro(
    w: &PackedWeightOnly,
    mr: usize,
    a: *const f32,
    lda: usize,
    codes: *const u8,
    params: *const f32,
    out: *mut f32,
) {
    #[cfg(target_arch = "x86_64")]
    match w.tier {
        CpuTier::Avx512 | CpuTier::Amx => return x86::avx512_wgemm_6x32(w, mr, a, lda, codes, params, out),
        CpuTier::Avx2 => return x86::avx2_wgemm_6x16(w, mr, a, lda, codes, params, out),
        CpuTier::Generic => {}
    }
    scalar_wgemm(w, mr, a, lda, codes, params, out)
}

/// The portable tile: dequantize each K row of the panel, then multiply-add per row of A.
unsafe fn scalar_wgemm(
    w: &PackedWeightOnly,
    mr: usize,
    a: *const f32,
    lda: usize,
    codes: *const u8,
    params: *const f32,
    out: *mut f32,
) {
    let nr = w.nr;
    let half = nr / 2;
    let mut acc = [[0f32; 16]; MR];
    let mut wrow = [0f32; 16];
    for kk in 0..w.k {
        let blk = kk / w.block;
        let (s, z) = (params.add(blk * 2 * nr), params.add(blk * 2 * nr + nr));
        let row = codes.add(kk * w.row_bytes);
        for (j, v) in wrow.iter_mut().enumerate().take(nr) {
            let c = match w.bits {
                8 => *row.add(j),
                _ if j < half => *row.add(j) & 15,
                _ => *row.add(j - half) >> 4,
            };
            *v = (c as f32 - *z.add(j)) * *s.add(j);
        }
        for (i, accr) in acc.iter_mut().enumerate().take(mr) {
            let av = *a.add(i * lda + kk);
            for (x, &wv) in accr.iter_mut().zip(&wrow).take(nr) {
                *x = av.mul_add(wv, *x);
            }
        }
    }
    for (i, accr) in acc.iter().enumerate().take(mr) {
        std::ptr::copy_nonoverlapping(accr.as_ptr(), out.add(i * nr), nr);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{PackedWeightOnly, MR};
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn body512<const BITS: usize>(
        w: &PackedWeightOnly,
        mr: usize,
        a: *const f32,
        lda: usize,
        codes: *const u8,
        params: *const f32,
        out: *mut f32,
    ) {
        const NR: usize = 32;
        let mask = _mm_set1_epi8(15);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let mut kk = 0;
        let mut blk = 0;
        while kk < w.k {
            let end = (kk + w.block).min(w.k);
            let p = params.add(blk * 2 * NR);
            let (s0, s1) = (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)));
            let (z0, z1) = (_mm512_loadu_ps(p.add(NR)), _mm512_loadu_ps(p.add(NR + 16)));
            while kk < end {
                let row = codes.add(kk * w.row_bytes);
                let (c0, c1) = if BITS == 8 {
                    (_mm_loadu_si128(row as *const _), _mm_loadu_si128(row.add(16) as *const _))
                } else {
                    let v = _mm_loadu_si128(row as *const _);
                    (_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16::<4>(v), mask))
                };
                let w0 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c0)), z0), s0);
                let w1 = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(c1)), z1), s1);
                for (i, accr) in acc.iter_mut().enumerate() {
                    if i < mr {
                        let av = _mm512_set1_ps(*a.add(i * lda + kk));
                        accr[0] = _mm512_fmadd_ps(av, w0, accr[0]);
                        accr[1] = _mm512_fmadd_ps(av, w1, accr[1]);
                    }
                }
                kk += 1;
            }
            blk += 1;
        }
        for (i, accr) in acc.iter().enumerate().take(mr) {
            _mm512_store_ps(out.add(i * NR), accr[0]);
            _mm512_store_ps(out.add(i * NR + 16), accr[1]);
        }
    }

    /// AVX-512: 6 x 32 (12 zmm accumulators); `out` 64-byte aligned.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub(super) unsafe fn avx512_wgemm_6x32(
        w: &PackedWeightOnly,
        mr: usize,
        a: *const f32,
        lda: usize,
        codes: *const u8,
        params: *const f32,
        out: *mut f32,
    ) {
        if w.bits == 8 {
            body512::<8>(w, mr, a, lda, codes, params, out)
        } else {
            body512::<4>(w, mr, a, lda, codes, params, out)
        }
    }

    #[inline(always)]
    unsafe fn body256<const BITS: usize>(
        w: &PackedWeightOnly,
        mr: usize,
        a: *const f32,
        lda: usize,
        codes: *const u8,
        params: *const f32,
        out: *mut f32,
    ) {
        const NR: usize = 16;
        let mask = _mm_set1_epi8(15);
        let mut acc = [[_mm256_setzero_ps(); 2]; MR];
        let mut kk = 0;
        let mut blk = 0;
        while kk < w.k {
            let end = (kk + w.block).min(w.k);
            let p = params.add(blk * 2 * NR);
            let (s0, s1) = (_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)));
            let (z0, z1) = (_mm256_loadu_ps(p.add(NR)), _mm256_loadu_ps(p.add(NR + 8)));
            while kk < end {
                let row = codes.add(kk * w.row_bytes);
                let (c0, c1) = if BITS == 8 {
                    let v = _mm_loadu_si128(row as *const _);
                    (v, _mm_srli_si128::<8>(v))
                } else {
                    let v = _mm_loadl_epi64(row as *const _);
                    (_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16::<4>(v), mask))
                };
                let w0 = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c0)), z0), s0);
                let w1 = _mm256_mul_ps(_mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(c1)), z1), s1);
                for (i, accr) in acc.iter_mut().enumerate() {
                    if i < mr {
                        let av = _mm256_set1_ps(*a.add(i * lda + kk));
                        accr[0] = _mm256_fmadd_ps(av, w0, accr[0]);
                        accr[1] = _mm256_fmadd_ps(av, w1, accr[1]);
                    }
                }
                kk += 1;
            }
            blk += 1;
        }
        for (i, accr) in acc.iter().enumerate().take(mr) {
            _mm256_storeu_ps(out.add(i * NR), accr[0]);
            _mm256_storeu_ps(out.add(i * NR + 8), accr[1]);
        }
    }

    /// AVX2: 6 x 16 (12 ymm accumulators).
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn avx2_wgemm_6x16(
        w: &PackedWeightOnly,
        mr: usize,
        a: *const f32,
        lda: usize,
        codes: *const u8,
        params: *const f32,
        out: *mut f32,
    ) {
        if w.bits == 8 {
            body256::<8>(w, mr, a, lda, codes, params, out)
        } else {
            body256::<4>(w, mr, a, lda, codes, params, out)
        }
    }
}

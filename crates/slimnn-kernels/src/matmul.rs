//! Batched f32 products of two run-time operands: `out[i] = op(A[ia]) · op(B[ib])` over
//! broadcast batch dims, `op` an optional transpose of the last two axes.
//!
//! B is packed per call (per batch matrix) into a thread-local [`PackedB`] that later calls
//! reuse; a transposed B goes straight through [`PackedB::pack_transposed`]. The GEMM reads A
//! in place, so a transposed A is first copied into a thread-local row-major scratch (a
//! blocked transpose costs one pass over A against `2 n` flops per element of it). When every
//! output matrix reads the same B (a weight against batched activations) the batches are one
//! tall GEMM; otherwise batches are spread over threads, each packing its own B.
//!
//! `reduce` sums the products over the batch instead of stacking them (`Σ_i A_iᵀ·B_i`, the
//! weight gradient of a batched linear layer); with `Aᵀ` and equal batch shapes that is one
//! GEMM whose inner dimension runs over every batch.

use crate::cpu::{self, CpuTier};
use crate::error::KernelError;
use crate::gemm::{gemm, Epilogue, PackedB, Par};
use crate::simd::Simd;
use rayon::prelude::*;
use std::cell::Cell;

const KERNEL: &str = "matmul";

/// Dimensions of one product: `op(A)` is `m x k`, `op(B)` is `k x n`. With `a_trans`, A is
/// stored `k x m` (row-major); with `b_trans`, B is stored `n x k`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MatMulDims {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a_trans: bool,
    pub b_trans: bool,
}

/// A batched product: batch shapes of A and B broadcast (numpy rules) to the output's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchedMatMul {
    pub dims: MatMulDims,
    pub batch_a: Vec<usize>,
    pub batch_b: Vec<usize>,
    /// Sum over the output batch: `out` is one `m x n` matrix.
    pub reduce: bool,
}

/// Per-thread buffers: B packed for one tier and A transposed.
struct Scratch {
    packed: PackedB,
    a_t: Vec<f32>,
}

thread_local! {
    static SCRATCH: Cell<Option<Scratch>> = const { Cell::new(None) };
}

fn with_scratch<R>(tier: CpuTier, f: impl FnOnce(&mut Scratch) -> Result<R, KernelError>) -> Result<R, KernelError> {
    let mut s = match SCRATCH.with(Cell::take) {
        Some(s) if s.packed.tier() == tier => s,
        _ => Scratch { packed: PackedB::empty(tier)?, a_t: Vec::new() },
    };
    let r = f(&mut s);
    SCRATCH.with(|c| c.set(Some(s)));
    r
}

impl BatchedMatMul {
    /// The output's batch shape (the broadcast of both batch shapes).
    pub fn batch_out(&self) -> Result<Vec<usize>, KernelError> {
        let (a, b) = (&self.batch_a, &self.batch_b);
        let r = a.len().max(b.len());
        let dim = |s: &[usize], i: usize| if i + s.len() < r { 1 } else { s[i + s.len() - r] };
        (0..r)
            .map(|i| match (dim(a, i), dim(b, i)) {
                (x, y) if x == y || y == 1 => Ok(x),
                (1, y) => Ok(y),
                (x, y) => {
                    Err(KernelError::shape(KERNEL, format!("batch dims {a:?} and {b:?} do not broadcast ({x} vs {y})")))
                }
            })
            .collect()
    }

    /// For each output matrix, the indices of the A and B matrices it multiplies.
    pub fn pairs(&self) -> Result<Vec<(usize, usize)>, KernelError> {
        let out = self.batch_out()?;
        let r = out.len();
        let strides = |s: &[usize]| -> Vec<usize> {
            let mut st = vec![0; r];
            let mut acc = 1;
            for i in (0..s.len()).rev() {
                st[r - s.len() + i] = if s[i] == 1 { 0 } else { acc };
                acc *= s[i];
            }
            st
        };
        let (sa, sb) = (strides(&self.batch_a), strides(&self.batch_b));
        let total: usize = out.iter().product();
        let mut pairs = Vec::with_capacity(total);
        let mut idx = vec![0usize; r];
        for _ in 0..total {
            let at = |st: &[usize]| idx.iter().zip(st).map(|(i, s)| i * s).sum::<usize>();
            pairs.push((at(&sa), at(&sb)));
            for ax in (0..r).rev() {
                idx[ax] += 1;
                if idx[ax] < out[ax] {
                    break;
                }
                idx[ax] = 0;
            }
        }
        Ok(pairs)
    }

    fn check(&self, a: usize, b: usize, out: usize, ep: &Epilogue<'_>) -> Result<Vec<(usize, usize)>, KernelError> {
        let MatMulDims { m, k, n, .. } = self.dims;
        let pairs = self.pairs()?;
        let count = |s: &[usize]| s.iter().product::<usize>();
        let want_out = if self.reduce { m * n } else { pairs.len() * m * n };
        let lens =
            [("A", a, count(&self.batch_a) * m * k), ("B", b, count(&self.batch_b) * k * n), ("out", out, want_out)];
        for (name, got, want) in lens {
            if got != want {
                return Err(KernelError::shape(KERNEL, format!("{name} has {got} values, {self:?} needs {want}")));
            }
        }
        if ep.row_bias.is_some() {
            // Batched rows are stacked or split; a per-row bias is the 2-d GEMM's alone.
            return Err(KernelError::epilogue(KERNEL, "a row bias is not supported on batched products"));
        }
        if ep.bias.is_some_and(|b| b.len() != n) {
            return Err(KernelError::epilogue(
                KERNEL,
                format!("bias of {} values for {n} columns", ep.bias.map_or(0, <[f32]>::len)),
            ));
        }
        if let Some(r) = ep.residual {
            if r.ld != n || r.data.len() != want_out {
                return Err(KernelError::epilogue(
                    KERNEL,
                    format!("residual of {} values (ld {}) for an output of {want_out} (ld {n})", r.data.len(), r.ld),
                ));
            }
        }
        if ep.accumulate || (self.reduce && *ep != Epilogue::NONE) {
            return Err(KernelError::epilogue(
                KERNEL,
                "accumulate, and any epilogue on a batch reduction, are unsupported",
            ));
        }
        Ok(pairs)
    }
}

/// Row-major `rows x cols` transpose of `src` (stride `cols`) into `dst` (`cols x rows`).
///
/// 16 x 16 tiles pass through a stack buffer, so every source and destination cache line is
/// read or written whole at once: a direct strided copy thrashes L1 when the row stride is a
/// multiple of 4 KiB (1024 or 1536 floats, the shapes of a transformer's activations).
pub fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    transpose_cols(src, rows, cols, 0, dst);
}

/// Rows `c0..` of the transpose (columns `c0..c0 + dst.len() / rows` of `src`) into `dst`.
fn transpose_cols(src: &[f32], rows: usize, cols: usize, c0: usize, dst: &mut [f32]) {
    const T: usize = 16;
    let width = dst.len().checked_div(rows).unwrap_or(0);
    let mut tile = [[0f32; T]; T];
    for cb in (0..width).step_by(T) {
        let w = T.min(width - cb);
        for r0 in (0..rows).step_by(T) {
            let h = T.min(rows - r0);
            for (r, t) in tile.iter_mut().enumerate().take(h) {
                let at = (r0 + r) * cols + c0 + cb;
                t[..w].copy_from_slice(&src[at..at + w]);
            }
            for c in 0..w {
                let d = &mut dst[(cb + c) * rows + r0..(cb + c) * rows + r0 + h];
                for (r, v) in d.iter_mut().enumerate() {
                    *v = tile[r][c];
                }
            }
        }
    }
}

/// `dst[c * rows + j] = scale * src[j * ld + c]` for `j < rows`, `c < cols`: `rows` rows of
/// `cols` values (stride `ld`) transposed into `cols x rows`, row-major, through register
/// blocks on `tier` (which the host must support). Attention uses it for a head's K.
pub fn transpose_scaled(
    tier: CpuTier,
    src: &[f32],
    ld: usize,
    rows: usize,
    cols: usize,
    scale: f32,
    dst: &mut [f32],
) -> Result<(), KernelError> {
    let need = if rows == 0 { 0 } else { (rows - 1) * ld + cols };
    if cols > ld || src.len() < need || dst.len() != rows * cols {
        return Err(KernelError::shape("transpose", format!("transpose of {rows} x {cols} (stride {ld})")));
    }
    if rows * cols > 0 {
        transpose_tier(tier, src.as_ptr(), ld, rows, cols, scale, dst.as_mut_ptr());
    }
    Ok(())
}

/// Square `LANES x LANES` block transposes.
trait Transpose: Simd {
    /// `dst[c * ldd + j] = scale * src[j * lds + c]` for `j, c < LANES`.
    ///
    /// # Safety
    /// Both blocks in bounds; the type's features available.
    unsafe fn transpose_block(src: *const f32, lds: usize, dst: *mut f32, ldd: usize, scale: f32);
}

impl Transpose for f32 {
    #[inline(always)]
    unsafe fn transpose_block(src: *const f32, _lds: usize, dst: *mut f32, _ldd: usize, scale: f32) {
        *dst = *src * scale;
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_transpose {
    use super::Transpose;
    use std::arch::x86_64::*;

    impl Transpose for __m256 {
        #[inline(always)]
        unsafe fn transpose_block(src: *const f32, lds: usize, dst: *mut f32, ldd: usize, scale: f32) {
            let s = _mm256_set1_ps(scale);
            let r: [__m256; 8] = std::array::from_fn(|i| _mm256_mul_ps(_mm256_loadu_ps(src.add(i * lds)), s));
            // 32-bit interleave of row pairs, 64-bit interleave of pair pairs, then 128-bit halves.
            let t: [__m256; 8] = std::array::from_fn(|i| {
                let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
                if i % 2 == 0 {
                    _mm256_unpacklo_ps(a, b)
                } else {
                    _mm256_unpackhi_ps(a, b)
                }
            });
            let mut u = [_mm256_setzero_ps(); 8];
            for g in 0..2 {
                let (t0, t1, t2, t3) = (t[4 * g], t[4 * g + 1], t[4 * g + 2], t[4 * g + 3]);
                u[4 * g] = _mm256_shuffle_ps::<0x44>(t0, t2);
                u[4 * g + 1] = _mm256_shuffle_ps::<0xEE>(t0, t2);
                u[4 * g + 2] = _mm256_shuffle_ps::<0x44>(t1, t3);
                u[4 * g + 3] = _mm256_shuffle_ps::<0xEE>(t1, t3);
            }
            for c in 0..4 {
                _mm256_storeu_ps(dst.add(c * ldd), _mm256_permute2f128_ps::<0x20>(u[c], u[4 + c]));
                _mm256_storeu_ps(dst.add((c + 4) * ldd), _mm256_permute2f128_ps::<0x31>(u[c], u[4 + c]));
            }
        }
    }

    impl Transpose for __m512 {
        #[inline(always)]
        unsafe fn transpose_block(src: *const f32, lds: usize, dst: *mut f32, ldd: usize, scale: f32) {
            let s = _mm512_set1_ps(scale);
            let mut r: [__m512; 16] = std::array::from_fn(|i| _mm512_mul_ps(_mm512_loadu_ps(src.add(i * lds)), s));
            crate::matmul::x86::transpose_16x16(&mut r);
            for (c, v) in r.iter().enumerate() {
                _mm512_storeu_ps(dst.add(c * ldd), *v);
            }
        }
    }
}

/// # Safety
/// As [`transpose_scaled`]'s checks; `S`'s features available.
#[inline(always)]
unsafe fn transpose_body<S: Transpose>(
    src: *const f32,
    ld: usize,
    rows: usize,
    cols: usize,
    scale: f32,
    dst: *mut f32,
) {
    let l = S::LANES;
    let (full_r, full_c) = (rows - rows % l, cols - cols % l);
    for j0 in (0..full_r).step_by(l) {
        for c0 in (0..full_c).step_by(l) {
            S::transpose_block(src.add(j0 * ld + c0), ld, dst.add(c0 * rows + j0), rows, scale);
        }
    }
    // Edges: the last columns of every row, then the last rows.
    for j in 0..rows {
        let cs = if j < full_r { full_c } else { 0 };
        for c in cs..cols {
            *dst.add(c * rows + j) = *src.add(j * ld + c) * scale;
        }
    }
}

crate::rows::tiered!(fn transpose_tier(src: *const f32, ld: usize, rows: usize, cols: usize, scale: f32, dst: *mut f32) => transpose_body);

/// In-register building blocks shared by kernels that change layouts.
#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use std::arch::x86_64::*;

    /// Transposes 16 rows of 16 f32 in registers: `r[i]` lane `j` becomes `r[j]` lane `i`.
    ///
    /// # Safety
    /// Only from code compiled with AVX-512 F (this is inlined into it).
    #[inline(always)]
    pub unsafe fn transpose_16x16(r: &mut [__m512; 16]) {
        // Pairs of rows interleaved within each 128-bit lane: t[2i] holds columns 4j, 4j+1 of
        // rows 2i, 2i+1 in lane j; t[2i+1] columns 4j+2, 4j+3.
        let mut t = [_mm512_setzero_ps(); 16];
        for i in 0..8 {
            t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
            t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        // Then 64-bit pairs: u[4i + e] holds column 4j + e of rows 4i..4i+4 in lane j.
        let mut u = [_mm512_setzero_ps(); 16];
        let (lo, hi) = (
            |a: __m512, b: __m512| _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
            |a: __m512, b: __m512| _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b))),
        );
        for i in 0..4 {
            u[4 * i] = lo(t[4 * i], t[4 * i + 2]);
            u[4 * i + 1] = hi(t[4 * i], t[4 * i + 2]);
            u[4 * i + 2] = lo(t[4 * i + 1], t[4 * i + 3]);
            u[4 * i + 3] = hi(t[4 * i + 1], t[4 * i + 3]);
        }
        // Column 4j + e gathers lane j of u[e], u[4 + e], u[8 + e], u[12 + e].
        for e in 0..4 {
            let a = _mm512_shuffle_f32x4::<0x88>(u[e], u[4 + e]);
            let b = _mm512_shuffle_f32x4::<0xdd>(u[e], u[4 + e]);
            let c = _mm512_shuffle_f32x4::<0x88>(u[8 + e], u[12 + e]);
            let d = _mm512_shuffle_f32x4::<0xdd>(u[8 + e], u[12 + e]);
            r[e] = _mm512_shuffle_f32x4::<0x88>(a, c);
            r[8 + e] = _mm512_shuffle_f32x4::<0xdd>(a, c);
            r[4 + e] = _mm512_shuffle_f32x4::<0x88>(b, d);
            r[12 + e] = _mm512_shuffle_f32x4::<0xdd>(b, d);
        }
    }
}

/// [`transpose`] with the destination rows split over the threads of `par`.
fn transpose_par(src: &[f32], rows: usize, cols: usize, dst: &mut [f32], par: Par<'_>) {
    let threads = par.threads();
    if threads <= 1 || rows * cols < 1 << 16 || rows == 0 {
        return transpose(src, rows, cols, dst);
    }
    let per = cols.div_ceil(threads).next_multiple_of(16);
    let mut run = move || {
        dst.par_chunks_mut(per * rows).enumerate().for_each(|(t, d)| transpose_cols(src, rows, cols, t * per, d));
    };
    match par {
        Par::Pool(pool) => pool.install(run),
        _ => run(),
    }
}

/// [`matmul_tier`] on the active tier ([`cpu::tier`]).
pub fn matmul(
    spec: &BatchedMatMul,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    ep: Epilogue<'_>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    matmul_tier(cpu::tier(), spec, a, b, out, ep, par)
}

/// The batched product with the kernels of `tier`; `ep` applies to every output matrix
/// (the residual spans the whole output, row stride `n`).
pub fn matmul_tier(
    tier: CpuTier,
    spec: &BatchedMatMul,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    ep: Epilogue<'_>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    let pairs = spec.check(a.len(), b.len(), out.len(), &ep)?;
    let MatMulDims { m, k, n, a_trans, b_trans } = spec.dims;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if pairs.is_empty() {
        out.fill(0.0);
        return Ok(());
    }
    let (sa, sb) = (m * k, k * n);
    if spec.reduce {
        let same = pairs.iter().enumerate().all(|(i, &(x, y))| x == i && y == i);
        if same && a_trans && !b_trans {
            // Σ_i A_iᵀ B_i: the stacked A_i are one (batches k) x m matrix, the B_i one
            // (batches k) x n matrix: a single product over the long inner dimension.
            let big = BatchedMatMul {
                dims: MatMulDims { k: k * pairs.len(), ..spec.dims },
                batch_a: vec![],
                batch_b: vec![],
                reduce: false,
            };
            return matmul_tier(tier, &big, a, b, out, Epilogue::NONE, par);
        }
        // Σ over a run of batches into `acc`, the first product overwriting it.
        let sum_into = |pairs: &[(usize, usize)], acc: &mut [f32], par: Par<'_>| {
            with_scratch(tier, |s| {
                for (i, &(ia, ib)) in pairs.iter().enumerate() {
                    let ep = if i == 0 { Epilogue::NONE } else { Epilogue::NONE.accumulating() };
                    product(s, spec.dims, &a[ia * sa..(ia + 1) * sa], &b[ib * sb..(ib + 1) * sb], acc, ep, par)?;
                }
                Ok(())
            })
        };
        let threads = par.threads();
        if threads <= 1 || pairs.len() < 2 * threads {
            return sum_into(&pairs, out, par);
        }
        // Many small products (a convolution's weight gradient, one per image): a partial sum
        // per thread over a fixed run of batches, added in run order.
        let per = pairs.len().div_ceil(threads);
        let partials = || -> Result<Vec<Vec<f32>>, KernelError> {
            pairs
                .par_chunks(per)
                .map(|run| {
                    let mut acc = vec![0.0; m * n];
                    sum_into(run, &mut acc, Par::Seq)?;
                    Ok(acc)
                })
                .collect()
        };
        let partials = match par {
            Par::Pool(pool) => pool.install(partials)?,
            _ => partials()?,
        };
        out.copy_from_slice(&partials[0]);
        for p in &partials[1..] {
            out.iter_mut().zip(p).for_each(|(o, v)| *o += v);
        }
        return Ok(());
    }
    let shared_b = pairs.iter().all(|p| p.1 == pairs[0].1);
    let stacked_a = pairs.iter().enumerate().all(|(i, p)| p.0 == i);
    if shared_b && stacked_a && !a_trans {
        // One B for every batch: the batches are the rows of one tall product.
        let dims = MatMulDims { m: m * pairs.len(), ..spec.dims };
        let ib = pairs[0].1;
        return with_scratch(tier, |s| product(s, dims, a, &b[ib * sb..(ib + 1) * sb], out, ep, par));
    }
    let mn = m * n;
    let batch_ep = |i: usize| {
        let mut e = Epilogue::NONE.with_activation(ep.activation);
        e.bias = ep.bias;
        if let Some(r) = ep.residual {
            e = e.with_residual(&r.data[i * mn..(i + 1) * mn], n);
        }
        e
    };
    let threads = par.threads();
    if threads <= 1 || pairs.len() < threads {
        // Few batches: each product uses every thread.
        return with_scratch(tier, |s| {
            for (i, &(ia, ib)) in pairs.iter().enumerate() {
                let (ai, bi) = (&a[ia * sa..(ia + 1) * sa], &b[ib * sb..(ib + 1) * sb]);
                product(s, spec.dims, ai, bi, &mut out[i * mn..(i + 1) * mn], batch_ep(i), par)?;
            }
            Ok(())
        });
    }
    // Many batches: whole products per thread, each repacking B only when it changes.
    let per = pairs.len().div_ceil(threads * 4).max(1);
    let run = |(t, chunk): (usize, &mut [f32])| -> Result<(), KernelError> {
        with_scratch(tier, |s| {
            let mut packed_for = None;
            for (j, o) in chunk.chunks_exact_mut(mn).enumerate() {
                let i = t * per + j;
                let (ia, ib) = pairs[i];
                if packed_for != Some(ib) {
                    pack_b(&mut s.packed, spec.dims, &b[ib * sb..(ib + 1) * sb])?;
                    packed_for = Some(ib);
                }
                let ai = &a[ia * sa..(ia + 1) * sa];
                multiply(s, spec.dims.m, spec.dims, ai, o, batch_ep(i), Par::Seq)?;
            }
            Ok(())
        })
    };
    match par {
        Par::Pool(pool) => pool.install(|| out.par_chunks_mut(per * mn).enumerate().try_for_each(run)),
        _ => out.par_chunks_mut(per * mn).enumerate().try_for_each(run),
    }
}

fn pack_b(packed: &mut PackedB, d: MatMulDims, b: &[f32]) -> Result<(), KernelError> {
    if d.b_trans {
        packed.pack_transposed(b, d.k, d.n, d.k)
    } else {
        packed.pack(b, d.k, d.n, d.n)
    }
}

/// One product `op(A)·op(B)` (`d.m` rows) with scratch for B's packing and A's transpose.
fn product(
    s: &mut Scratch,
    d: MatMulDims,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    ep: Epilogue<'_>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    pack_b(&mut s.packed, d, b)?;
    multiply(s, d.m, d, a, out, ep, par)
}

/// `op(A) · packed` for `m` rows of A.
fn multiply(
    s: &mut Scratch,
    m: usize,
    d: MatMulDims,
    a: &[f32],
    out: &mut [f32],
    ep: Epilogue<'_>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    let k = d.k;
    if d.a_trans && m > 1 && k > 1 {
        // A is stored k x m: a row-major m x k copy for the GEMM's in-place A reads.
        // Grown only: shrinking and regrowing would zero-fill on every other call.
        if s.a_t.len() < m * k {
            s.a_t.resize(m * k, 0.0);
        }
        let a_t = &mut s.a_t[..m * k];
        transpose_par(a, k, m, a_t, par);
        gemm(m, a_t, k, &s.packed, out, d.n, ep, par)
    } else {
        // One row or one column: the transpose is the same memory.
        gemm(m, a, k, &s.packed, out, d.n, ep, par)
    }
}

/// Scalar reference for [`matmul_tier`]: f64 sums, then bias, activation and residual.
pub fn reference(
    spec: &BatchedMatMul,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    ep: Epilogue<'_>,
) -> Result<(), KernelError> {
    let pairs = spec.check(a.len(), b.len(), out.len(), &ep)?;
    let MatMulDims { m, k, n, a_trans, b_trans } = spec.dims;
    let (sa, sb) = (m * k, k * n);
    let mut acc = vec![0.0f64; out.len()];
    for (p, &(ia, ib)) in pairs.iter().enumerate() {
        let base = if spec.reduce { 0 } else { p * m * n };
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for kk in 0..k {
                    let av = if a_trans { a[ia * sa + kk * m + i] } else { a[ia * sa + i * k + kk] };
                    let bv = if b_trans { b[ib * sb + j * k + kk] } else { b[ib * sb + kk * n + j] };
                    s += av as f64 * bv as f64;
                }
                acc[base + i * n + j] += s;
            }
        }
    }
    for (idx, (o, s)) in out.iter_mut().zip(acc).enumerate() {
        let j = idx % n.max(1);
        let mut y = s + ep.bias.map_or(0.0, |b| b[j] as f64);
        y = crate::reference::activation(ep.activation, y);
        if let Some(r) = ep.residual {
            y += r.data[idx] as f64;
        }
        *o = y as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::Activation;
    use proptest::prelude::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn run_case(spec: &BatchedMatMul, bias: bool, act: Activation, residual: bool, seed: u64) {
        let MatMulDims { m, k, n, .. } = spec.dims;
        let count = |s: &[usize]| s.iter().product::<usize>();
        let a = values(count(&spec.batch_a) * m * k, seed);
        let b = values(count(&spec.batch_b) * k * n, seed + 1);
        let outs = if spec.reduce { 1 } else { spec.pairs().unwrap().len() };
        let bias_v = values(n, seed + 2);
        let res_v = values(outs * m * n, seed + 3);
        let mut ep = Epilogue::NONE.with_activation(act);
        if bias {
            ep = ep.with_bias(&bias_v);
        }
        if residual {
            ep = ep.with_residual(&res_v, n);
        }
        let mut want = vec![0.0; outs * m * n];
        reference(spec, &a, &b, &mut want, ep).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for tier in cpu::supported_tiers() {
            for par in [Par::Seq, Par::Pool(&pool)] {
                let mut got = vec![f32::NAN; want.len()];
                matmul_tier(tier, spec, &a, &b, &mut got, ep, par).unwrap();
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let tol = 1e-5 * (k as f32).sqrt().max(1.0) * if spec.reduce { outs as f32 } else { 1.0 };
                    assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{tier} {spec:?} [{i}]: got {g}, want {w}");
                }
            }
        }
    }

    fn spec(m: usize, k: usize, n: usize, at: bool, bt: bool, ba: &[usize], bb: &[usize]) -> BatchedMatMul {
        BatchedMatMul {
            dims: MatMulDims { m, k, n, a_trans: at, b_trans: bt },
            batch_a: ba.to_vec(),
            batch_b: bb.to_vec(),
            reduce: false,
        }
    }

    #[test]
    fn by_hand_transposes() {
        // A = [1 2; 3 4], B = [5 6; 7 8]: A·B = [19 22; 43 50], Aᵀ·B = [26 30; 38 44],
        // A·Bᵀ = [17 23; 39 53].
        let (a, b) = ([1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]);
        for (at, bt, want) in [
            (false, false, [19.0, 22.0, 43.0, 50.0]),
            (true, false, [26.0, 30.0, 38.0, 44.0]),
            (false, true, [17.0, 23.0, 39.0, 53.0]),
        ] {
            for tier in cpu::supported_tiers() {
                let mut c = [0.0; 4];
                matmul_tier(tier, &spec(2, 2, 2, at, bt, &[], &[]), &a, &b, &mut c, Epilogue::NONE, Par::Seq).unwrap();
                assert_eq!(c, want, "{tier} at={at} bt={bt}");
            }
        }
    }

    #[test]
    fn shared_and_per_batch_b_with_epilogues() {
        // Activations x weight (one tall product), attention-style per-batch products
        // (threads over batches), broadcast of both operands' batch dims.
        run_case(&spec(37, 19, 41, false, false, &[3, 2], &[]), true, Activation::GeluErf, true, 1);
        run_case(&spec(37, 19, 41, false, true, &[3, 2], &[]), true, Activation::Relu, false, 2);
        run_case(&spec(16, 8, 16, false, true, &[2, 12], &[2, 12]), false, Activation::None, false, 3);
        run_case(&spec(9, 13, 7, true, false, &[2, 1, 3], &[4, 1]), true, Activation::None, true, 4);
        run_case(&spec(9, 13, 7, true, true, &[1], &[5]), false, Activation::None, false, 5);
        run_case(&spec(1, 13, 70, false, false, &[4], &[4]), false, Activation::None, false, 6);
    }

    #[test]
    fn batch_reductions() {
        let mut s = spec(24, 33, 40, true, false, &[6], &[6]);
        s.reduce = true;
        run_case(&s, false, Activation::None, false, 7);
        let mut s = spec(24, 33, 40, false, true, &[2, 3], &[3]);
        s.reduce = true;
        run_case(&s, false, Activation::None, false, 8);
        // Enough batches for per-thread partial sums.
        let mut s = spec(6, 20, 30, false, true, &[17], &[17]);
        s.reduce = true;
        run_case(&s, false, Activation::None, false, 9);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn register_transpose_swaps_rows_and_columns() {
        use std::arch::x86_64::*;
        if !std::arch::is_x86_feature_detected!("avx512f") {
            return;
        }
        #[target_feature(enable = "avx512f")]
        unsafe fn run(m: &[f32], got: &mut [f32]) {
            let mut r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(m.as_ptr().add(16 * i)));
            super::x86::transpose_16x16(&mut r);
            for (i, v) in r.iter().enumerate() {
                _mm512_storeu_ps(got.as_mut_ptr().add(16 * i), *v);
            }
        }
        let m: Vec<f32> = (0..256).map(|i| i as f32).collect();
        let mut got = [0f32; 256];
        // SAFETY: AVX-512 F checked above; 256 values each.
        unsafe { run(&m, &mut got) };
        for i in 0..16 {
            for j in 0..16 {
                assert_eq!(got[i * 16 + j], m[j * 16 + i]);
            }
        }
    }

    #[test]
    fn transposes_every_tier() {
        for (rows, cols, ld) in [(1, 1, 1), (16, 16, 16), (40, 35, 37), (128, 32, 384), (7, 70, 70)] {
            let src = values((rows - 1) * ld + cols, rows as u64);
            for tier in crate::cpu::supported_tiers() {
                let mut dst = vec![0.0; rows * cols];
                transpose_scaled(tier, &src, ld, rows, cols, 0.5, &mut dst).unwrap();
                for j in 0..rows {
                    for c in 0..cols {
                        assert_eq!(dst[c * rows + j], src[j * ld + c] * 0.5, "{tier} {rows}x{cols} at ({j}, {c})");
                    }
                }
            }
        }
        let mut dst = vec![0.0; 6];
        assert!(transpose_scaled(CpuTier::Generic, &[0.0; 5], 3, 2, 3, 1.0, &mut dst).is_err());
        assert!(transpose_scaled(CpuTier::Generic, &[0.0; 6], 2, 2, 3, 1.0, &mut dst).is_err());
    }

    #[test]
    fn transposes_of_odd_shapes() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (rows, cols) in [(1, 1), (3, 37), (40, 17), (300, 301), (1024, 70)] {
            let src = values(rows * cols, 9);
            for par in [Par::Seq, Par::Pool(&pool)] {
                let mut dst = vec![f32::NAN; rows * cols];
                transpose_par(&src, rows, cols, &mut dst, par);
                for r in 0..rows {
                    for c in 0..cols {
                        assert_eq!(dst[c * rows + r], src[r * cols + c], "{rows}x{cols} at {r},{c}");
                    }
                }
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let s = spec(2, 3, 4, false, false, &[2], &[3]);
        let mut out = [0.0; 16];
        assert!(matmul(&s, &[0.0; 12], &[0.0; 36], &mut out, Epilogue::NONE, Par::Seq).is_err());
        let s = spec(2, 3, 4, false, false, &[2], &[]);
        assert!(matmul(&s, &[0.0; 11], &[0.0; 12], &mut out, Epilogue::NONE, Par::Seq).is_err());
        assert!(matmul(&s, &[0.0; 12], &[0.0; 12], &mut out[..15], Epilogue::NONE, Par::Seq).is_err());
        let bias = [0.0; 3];
        let e = matmul(&s, &[0.0; 12], &[0.0; 12], &mut out, Epilogue::NONE.with_bias(&bias), Par::Seq);
        assert!(matches!(e, Err(KernelError::Epilogue { .. })));
        assert!(matmul(&s, &[0.0; 12], &[0.0; 12], &mut out, Epilogue::NONE, Par::Seq).is_ok());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        #[test]
        fn matches_reference(
            m in 1usize..40, k in 0usize..40, n in 1usize..70,
            at: bool, bt: bool, reduce: bool,
            ba in prop::collection::vec(1usize..4, 0..3),
            bshare in 0usize..3, seed in 0u64..1000,
        ) {
            // B's batch: none, A's own, or a trailing 1-broadcast of it.
            let bb: Vec<usize> = match bshare {
                0 => vec![],
                1 => ba.clone(),
                _ => ba.iter().enumerate().map(|(i, &d)| if i == 0 { 1 } else { d }).collect(),
            };
            let mut s = spec(m, k, n, at, bt, &ba, &bb);
            s.reduce = reduce;
            let (bias, act, res) = if reduce { (false, Activation::None, false) } else { (seed % 2 == 0, Activation::Relu, seed % 3 == 0) };
            run_case(&s, bias, act, res, seed);
        }
    }
}

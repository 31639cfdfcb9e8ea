//! f32 attention on AVX-512 for BERT-family shapes (heads of 16, 32, 48 or 64 values, at most
//! 128 keys). One task per (batch, head) transposes `scale * Kᵀ` and copies the head's V rows
//! together once, then takes query rows in blocks of [`ROWS`] through three passes that keep
//! everything in L1:
//!
//! - [`scores`]: `Q·Kᵀ` for a few rows and every key (all of a row's scores fit in
//!   registers), plus the mask; stores the scores and each row's max;
//! - [`exponentiate`]: `e^(s - max)` and each row's `1 / sum`, every vector independent of the
//!   others (inside the score kernel, each row's exponentials waited on its max's horizontal
//!   reduction, and perf put a third of the time there);
//! - [`context`]: `P·V`, each row times its `1 / sum` as it is stored into the head's columns
//!   of the output.
//!
//! The general path runs two GEMM driver calls and a softmax pass per block: at these shapes
//! the GEMM's edge tiles (`head_dim` 32 is two thirds of its 48-wide kernel) and per-call
//! packing cost as much as the products. MiniLM's attention (128 tokens, 12 heads of 32, one
//! thread) went from 258 to 212 µs (`cargo run --release -p slimnn-kernels --example
//! attention_speed`).

#![cfg(target_arch = "x86_64")]

use super::{each_head, AttnDims, Job, Out};
use crate::cpu::CpuTier;
use crate::error::KernelError;
use crate::matmul::transpose_scaled;
use crate::rows::Lanes;
use std::arch::x86_64::*;
use std::cell::Cell;

/// Query rows per block: a multiple of every kernel's row count (3, 4, 6, 8, 12), and small
/// enough that the probabilities (24 x 128 keys, 12 KB), `Kᵀ` (16 KB at `head_dim` 32) and the
/// head's V rows stay in L1 together.
const ROWS: usize = 24;
/// Keys that fit the score kernel's registers: 8 vectors of 16.
const MAX_KEYS: usize = 128;
const MAX_HEAD_DIM: usize = 64;

/// Whether this path runs `job`: f32 products on an AVX-512 tier, and shapes the kernels cover.
pub(super) fn usable(job: &Job<'_>) -> bool {
    let AttnDims { seq_k, head_dim, .. } = job.dims;
    matches!(job.tier, CpuTier::Avx512 | CpuTier::Amx)
        && !job.bf16
        && (1..=MAX_KEYS).contains(&seq_k)
        && head_dim % 16 == 0
        && (16..=MAX_HEAD_DIM).contains(&head_dim)
}

#[derive(Default)]
struct Scratch {
    /// `scale * Kᵀ`: `head_dim` rows of `seq_k` values.
    kt: Vec<f32>,
    /// The head's V rows, contiguous: read in place (rows a projection's width apart), they
    /// fall on few L1 sets and evict each other.
    v: Vec<f32>,
    /// Unnormalised probabilities: `ROWS` rows of `MAX_KEYS` values.
    p: Vec<f32>,
    inv: Vec<f32>,
}

thread_local! {
    static SCRATCH: Cell<Option<Scratch>> = const { Cell::new(None) };
}

/// Runs `job` (validated by the caller, [`usable`]) into `out`.
pub(super) fn run(job: &Job<'_>, out: &mut [f32], threads: usize) -> Result<(), KernelError> {
    let ptr = Out(out.as_mut_ptr());
    each_head(job.dims, threads, &SCRATCH, |b, h, s| {
        // SAFETY: the tier has AVX-512 F (`usable`, and `run`'s caller checked the host); the
        // head's writes stay in `out` (validated lengths) and in its own columns (see `Out`).
        unsafe { head(job, b, h, s, ptr) }
    })
}

/// Where [`scores`] and [`context`] read and write for one block of query rows.
struct Block {
    /// Query row `i0` of the block, head `h`'s first value; rows `ldq` apart.
    q: *const f32,
    ldq: usize,
    /// Rows in the block (`1..=ROWS`).
    m: usize,
    d: usize,
    kt: *const f32,
    seq_k: usize,
    /// Lanes of the last key vector that hold keys.
    tail: __mmask16,
    /// The block's first mask row and the stride between rows (0: one row for all), or null.
    mask: *const f32,
    mask_stride: usize,
    /// `ROWS` rows `MAX_KEYS` apart, `skp` (`seq_k` rounded up to 16) values each.
    p: *mut f32,
    skp: usize,
    inv: *mut f32,
    /// Head `h`'s V rows, contiguous (`d` values each).
    v: *const f32,
    /// Head `h`'s first output value of query row `i0`; rows `ldo` apart.
    out: *mut f32,
    ldo: usize,
}

/// Batch `b`, head `h`: transposes `scale * Kᵀ`, then every block of query rows.
///
/// # Safety
/// AVX-512 F present; `out` as [`Out`] describes; `job` validated and [`usable`].
#[target_feature(enable = "avx512f")]
unsafe fn head(job: &Job<'_>, b: usize, h: usize, s: &mut Scratch, out: Out) -> Result<(), KernelError> {
    let AttnDims { seq_q, seq_k: all_keys, head_dim: d, .. } = job.dims;
    let seq_k = job.live_keys(b, h);
    let (q, k, v) = (job.q, job.k, job.v);
    s.kt.resize(d * seq_k, 0.0);
    transpose_scaled(job.tier, &k.data[b * all_keys * k.ld + h * d..], k.ld, seq_k, d, job.scale, &mut s.kt)?;
    s.v.resize(seq_k * d, 0.0);
    for (j, dst) in s.v.chunks_exact_mut(d).enumerate() {
        dst.copy_from_slice(&v.data[(b * all_keys + j) * v.ld + h * d..][..d]);
    }
    let skp = seq_k.next_multiple_of(16);
    s.p.resize(ROWS * MAX_KEYS, 0.0);
    s.inv.resize(ROWS, 0.0);
    let tail = match seq_k % 16 {
        0 => 0xffff,
        r => (1u16 << r) - 1,
    };
    for i0 in (0..seq_q).step_by(ROWS) {
        let m = ROWS.min(seq_q - i0);
        let (mask, mask_stride) = job.mask_rows(b, h, i0, m).map_or((std::ptr::null(), 0), |(d, st)| (d.as_ptr(), st));
        let blk = Block {
            q: q.data.as_ptr().add((b * seq_q + i0) * q.ld + h * d),
            ldq: q.ld,
            m,
            d,
            kt: s.kt.as_ptr(),
            seq_k,
            tail,
            mask,
            mask_stride,
            p: s.p.as_mut_ptr(),
            skp,
            inv: s.inv.as_mut_ptr(),
            v: s.v.as_ptr(),
            out: out.0.add((b * seq_q + i0) * job.hd + h * d),
            ldo: job.hd,
        };
        // Rows per kernel call: as many as keep the accumulators within 24 registers.
        match skp / 16 {
            1 => scores::<8, 1>(&blk),
            2 => scores::<8, 2>(&blk),
            3 => scores::<6, 3>(&blk),
            4 => scores::<6, 4>(&blk),
            5 => scores::<4, 5>(&blk),
            6 => scores::<4, 6>(&blk),
            7 => scores::<3, 7>(&blk),
            _ => scores::<3, 8>(&blk),
        }
        exponentiate(&blk);
        match d / 16 {
            1 => context::<12, 1>(&blk),
            2 => context::<12, 2>(&blk),
            3 => context::<8, 3>(&blk),
            _ => context::<6, 4>(&blk),
        }
    }
    Ok(())
}

/// Scores of the block's rows, `R` at a time, masked in registers: P rows get `s + mask`
/// (`-inf` past `seq_k`), `inv` each row's max. Rows past `m` (up to a multiple of `R`, within
/// `ROWS`) repeat row `m - 1`; the later passes ignore them.
///
/// # Safety
/// AVX-512 F present; the block's pointers valid as [`Block`] describes.
#[target_feature(enable = "avx512f")]
unsafe fn scores<const R: usize, const NV: usize>(blk: &Block) {
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    let last = |r: usize| r.min(blk.m - 1);
    for r0 in (0..blk.m).step_by(R) {
        let q: [*const f32; R] = std::array::from_fn(|r| blk.q.add(last(r0 + r) * blk.ldq));
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for kk in 0..blk.d {
            let row = blk.kt.add(kk * blk.seq_k);
            // Whichever operand set is smaller is held in registers across the other's loop.
            // (Plain loops: a closure would not inherit this function's target features.)
            if NV <= R {
                let mut kv = [_mm512_setzero_ps(); NV];
                for (j, k) in kv.iter_mut().enumerate() {
                    *k = key(row, j, NV, blk.tail);
                }
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*q[r].add(kk));
                    for (x, &k) in acc.iter_mut().zip(&kv) {
                        *x = _mm512_fmadd_ps(a, k, *x);
                    }
                }
            } else {
                let mut a = [_mm512_setzero_ps(); R];
                for (r, a) in a.iter_mut().enumerate() {
                    *a = _mm512_set1_ps(*q[r].add(kk));
                }
                for j in 0..NV {
                    let k = key(row, j, NV, blk.tail);
                    for (acc, &a) in acc.iter_mut().zip(&a) {
                        acc[j] = _mm512_fmadd_ps(a, k, acc[j]);
                    }
                }
            }
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let row = last(r0 + r);
            for (j, x) in acc.iter_mut().enumerate() {
                let tail = if j + 1 < NV { 0xffff } else { blk.tail };
                *x = if blk.mask.is_null() {
                    _mm512_mask_mov_ps(ninf, tail, *x)
                } else {
                    let m = blk.mask.add(row * blk.mask_stride + 16 * j);
                    _mm512_add_ps(*x, _mm512_mask_loadu_ps(ninf, tail, m))
                };
            }
            let mut vmax = acc[0];
            for &x in &acc[1..] {
                vmax = _mm512_max_ps(vmax, x);
            }
            // Nothing waits for the max but the exponentials after the block's products, so
            // its reduction overlaps the next rows' products.
            *blk.inv.add(r0 + r) = vmax.hmax();
            let p = blk.p.add((r0 + r) * MAX_KEYS);
            for (j, &x) in acc.iter().enumerate() {
                _mm512_storeu_ps(p.add(16 * j), x);
            }
        }
    }
}

/// The block's scores (`-inf` past `seq_k`) to `e^(s - max)` in place, and `inv` from each row's
/// max to its `1 / sum` (NaN for a row masked entirely: `-inf - -inf` is NaN, which then
/// propagates, as ONNX's Softmax gives NaN). Every vector is independent of the others, so the
/// exponentials run at the FMA ports' rate.
///
/// # Safety
/// As [`scores`], which must have filled the block's rows and maxima.
#[target_feature(enable = "avx512f")]
unsafe fn exponentiate(blk: &Block) {
    let nv = blk.skp / 16;
    for r in 0..blk.m {
        let vmax = _mm512_set1_ps(*blk.inv.add(r));
        let p = blk.p.add(r * MAX_KEYS);
        let mut sum = _mm512_setzero_ps();
        for j in 0..nv {
            let e = _mm512_sub_ps(_mm512_loadu_ps(p.add(16 * j)), vmax).exp_nonpos();
            _mm512_storeu_ps(p.add(16 * j), e);
            sum = _mm512_add_ps(sum, e);
        }
        *blk.inv.add(r) = 1.0 / sum.hsum();
    }
}

/// Key vector `j` of a `Kᵀ` row: the last of `nv` only where `tail` has keys.
#[inline(always)]
unsafe fn key(row: *const f32, j: usize, nv: usize, tail: __mmask16) -> __m512 {
    if j + 1 < nv {
        _mm512_loadu_ps(row.add(16 * j))
    } else {
        _mm512_maskz_loadu_ps(tail, row.add(16 * j))
    }
}

/// `P·V` for the block's rows, `R` at a time, each row times its `1 / sum` into the output.
///
/// # Safety
/// As [`scores`], which must have filled the block's P rows and `inv`.
#[target_feature(enable = "avx512f")]
unsafe fn context<const R: usize, const NV: usize>(blk: &Block) {
    for r0 in (0..blk.m).step_by(R) {
        // One base register for every row: their stride is a constant.
        let p = blk.p.add(r0 * MAX_KEYS).cast_const();
        let mut acc = [[_mm512_setzero_ps(); NV]; R];
        for kk in 0..blk.seq_k {
            let row = blk.v.add(kk * blk.d);
            let mut vv = [_mm512_setzero_ps(); NV];
            for (j, v) in vv.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(row.add(16 * j));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*p.add(r * MAX_KEYS + kk));
                for (x, &v) in acc.iter_mut().zip(&vv) {
                    *x = _mm512_fmadd_ps(a, v, *x);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate().take(blk.m - r0) {
            let f = _mm512_set1_ps(*blk.inv.add(r0 + r));
            let o = blk.out.add((r0 + r) * blk.ldo);
            for (j, &x) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(16 * j), _mm512_mul_ps(x, f));
            }
        }
    }
}

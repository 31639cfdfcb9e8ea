//! int8 attention on AMX tiles (`tdpbssd` for `Q·Kᵀ`, `tdpbusd` for `P·V`), exact in its
//! integer products and as [`super::reference::mha_int8`] defines the quantization:
//!
//! - Q and K rows (one token of one head) symmetric i8, each with its own scale
//!   `max|x| / 127`, so scores are `acc · (scale_q · scale_k · scale) + mask`;
//! - the softmax's unnormalised weights `e^(s - max)`, in (0, 1], as u8 `round(255 e)`; each
//!   row's sum is taken over those same u8 values, so the rounding reweights keys without
//!   changing the total;
//! - V per head and column (one scale per output channel over the keys), symmetric i8.
//!
//! One task per (batch, head) quantizes and packs K, V and Q once, then takes query rows 32 at
//! a time (two row tiles) through the scores for every 32 keys (one 2 x 2 tile block with a
//! single 64-byte K step: `head_dim` up to 64) and the softmax in f32 writing u8 weights, then
//! once more through `P·V` (64 keys a step) and the output scaled per column and row. `e^x` is `2^n · p(f)` with a
//! degree-4 polynomial (relative error 4e-5, a hundredth of one u8 step).
//!
//! Tile layouts (32-bit slots of four bytes, as the dot-product instructions read them):
//! - Q: rows of 64 bytes (zeros past `head_dim`), 32 per block;
//! - Kᵀ: 16 rows (four K values each) of `skp` slots (`skp` = `seq_k` rounded up to 64),
//!   slot `(r, j)` = `K[j][4r..4r+4]`, zeros past `seq_k`;
//! - P: rows of `skp` bytes, zeros past `seq_k`;
//! - V: `skp / 4` rows of `dv` slots (`dv` = `head_dim` rounded up to 32), slot `(r, c)` =
//!   `V[4r..4r+4][c]`.
//!
//! Here `seq_k` counts the live keys: a padding mask's trailing masked keys (`Job::live_keys`)
//! are left out in whole steps of 64. Their u8 weights would be 0, and V's column scales are
//! still taken over every key, so the result is the same value for value.

#![cfg(target_arch = "x86_64")]

use super::{each_head, AttnDims, Job, KernelError, Out};
use crate::amx;
use crate::cpu::{self, CpuTier};
use crate::gemm::AlignedVec;
use std::arch::x86_64::*;
use std::cell::Cell;

/// Query rows per block: two row tiles.
const ROWS: usize = 32;
/// The scores' K step is one 64-byte tile row: four values per slot, sixteen slots.
const MAX_HEAD_DIM: usize = 64;

/// Whether this path runs heads of `head_dim` values on `tier`: AMX tiles granted, heads of 16,
/// 32, 48 or 64 values.
pub(super) fn native(tier: CpuTier, head_dim: usize) -> bool {
    tier == CpuTier::Amx
        && cpu::features().amx_granted
        && head_dim.is_multiple_of(16)
        && (16..=MAX_HEAD_DIM).contains(&head_dim)
}

#[derive(Default)]
struct Scratch {
    /// Kᵀ as i8 slots (see the module comment).
    kt: AlignedVec,
    /// Per key: `scale * max|K[j]| / 127` (0 past `seq_k`).
    kf: Vec<f32>,
    /// 16 quantized K rows of 64 bytes, staged for their transpose into Kᵀ.
    krow: AlignedVec,
    /// V as i8 slots.
    v: AlignedVec,
    /// Per column: `max_j |V[j][c]| / 127`.
    vf: Vec<f32>,
    /// The block's quantized Q rows and their scales.
    q: AlignedVec,
    qf: Vec<f32>,
    /// Scores: i32 from the tiles, then f32 in place.
    s: AlignedVec,
    /// u8 weights.
    p: AlignedVec,
    /// `P·V` as i32.
    o: AlignedVec,
    /// `1 / sum` of each row's u8 weights (NaN for a row masked entirely).
    inv: Vec<f32>,
}

thread_local! {
    static SCRATCH: Cell<Option<Scratch>> = const { Cell::new(None) };
}

/// Runs `job` (validated by the caller, [`usable`], `seq_k > 0`) into `out`.
pub(super) fn run(job: &Job<'_>, out: &mut [f32], threads: usize) -> Result<(), KernelError> {
    let ptr = Out(out.as_mut_ptr());
    each_head(job.dims, threads, &SCRATCH, |b, h, s| {
        // SAFETY: AMX tiles granted and AVX-512 present (`usable`: the amx tier); the head's
        // writes stay within `out` (checked lengths) and its own columns (see `Out`).
        unsafe { head(job, b, h, s, ptr) };
        Ok(())
    })
}

/// Sizes of one head's buffers.
#[derive(Clone, Copy)]
struct Geom {
    /// Keys in the operands (the row count of K and V per batch).
    all: usize,
    /// Keys that can carry weight: `all` less a padding mask's trailing masked keys
    /// (`Job::live_keys`, rounded up to 64 here), whose u8 weights would be 0.
    seq_k: usize,
    d: usize,
    /// `seq_k` rounded up to 64.
    skp: usize,
    /// `head_dim` rounded up to 32.
    dv: usize,
}

/// Batch `b`, head `h`: packs K and V, quantizes every query row, then two passes over the
/// blocks of 32 rows: scores and weights for all of them, then `P·V` and the output.
///
/// Each pass's tile loads read what vector stores wrote one pass earlier: loading a block's
/// weights right after the softmax stored them made every `P·V` wait for those stores
/// (MiniLM's attention took 131 µs per layer that way, 124 µs in passes: `INT8=1 cargo run
/// --release -p slimnn-kernels --example attention_speed`).
///
/// # Safety
/// AMX-INT8 tiles granted, AVX-512 F/BW present; `out` as [`Out`] describes.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn head(job: &Job<'_>, b: usize, h: usize, s: &mut Scratch, out: Out) {
    let AttnDims { seq_q, seq_k: all, head_dim: d, .. } = job.dims;
    let seq_k = job.live_keys(b, h).next_multiple_of(64).min(all);
    let g = Geom { all, seq_k, d, skp: seq_k.next_multiple_of(64), dv: d.next_multiple_of(32) };
    let rows = seq_q.next_multiple_of(ROWS);
    pack_k(job, b, h, s, g);
    pack_v(job, b, h, s, g);
    // Q rows past `head_dim` and P rows past `seq_k` stay zero: the tiles read them.
    s.q.resize(rows * 16);
    s.q.as_mut_slice().fill(0.0);
    s.qf.resize(rows, 0.0);
    let (q, qp) = (job.q, s.q.as_mut_slice().as_mut_ptr());
    for i in 0..seq_q {
        let src = q.data.as_ptr().add((b * seq_q + i) * q.ld + h * d);
        s.qf[i] = quantize_row(src, d, qp.add(i * 16).cast());
    }
    s.s.resize(ROWS * g.skp);
    s.p.resize(rows * g.skp / 4);
    s.p.as_mut_slice().fill(0.0);
    s.o.resize(ROWS * g.dv);
    s.inv.resize(rows, 0.0);
    amx::configure();
    for i0 in (0..seq_q).step_by(ROWS) {
        weights(job, b, h, i0, s, g);
    }
    for i0 in (0..seq_q).step_by(ROWS) {
        context(job, b, h, i0, s, g, out);
    }
    amx::release();
}

/// `dst[c] = round(src[c] · 127 / max|src|)` (i8) for `n` values (a multiple of 16); returns
/// `max|src| / 127` (0 for a row of zeros, which then quantizes to zeros).
///
/// # Safety
/// AVX-512 F present; `src` valid for `n` values, `dst` for `n` bytes.
#[target_feature(enable = "avx512f")]
unsafe fn quantize_row(src: *const f32, n: usize, dst: *mut u8) -> f32 {
    let mut amax = _mm512_setzero_ps();
    for c in (0..n).step_by(16) {
        amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(src.add(c))));
    }
    let m = _mm512_reduce_max_ps(amax);
    let f = _mm512_set1_ps(if m > 0.0 { 127.0 / m } else { 0.0 });
    for c in (0..n).step_by(16) {
        let q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(src.add(c)), f));
        _mm_storeu_si128(dst.add(c).cast(), _mm512_cvtsepi32_epi8(q));
    }
    m / 127.0
}

/// Kᵀ of head `h`, batch `b`, 16 keys at a time: their rows quantized (staged, 64 bytes each,
/// zeros past `head_dim` and past `seq_k`), then each 16 x 16 block of slots transposed.
///
/// # Safety
/// As [`head`].
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_k(job: &Job<'_>, b: usize, h: usize, s: &mut Scratch, g: Geom) {
    let k = job.k;
    s.kt.resize(16 * g.skp);
    s.kf.resize(g.skp, 0.0);
    s.krow.resize(16 * 16);
    let kt = s.kt.as_mut_slice().as_mut_ptr();
    let krow = s.krow.as_mut_slice().as_mut_ptr();
    for j0 in (0..g.skp).step_by(16) {
        for r in 0..16 {
            let row = krow.add(r * 16);
            _mm512_storeu_ps(row, _mm512_setzero_ps());
            let j = j0 + r;
            s.kf[j] = if j < g.seq_k {
                let src = k.data.as_ptr().add((b * g.all + j) * k.ld + h * g.d);
                job.scale * quantize_row(src, g.d, row.cast())
            } else {
                0.0
            };
        }
        // The slots are four i8 in f32 containers; the shuffles move their bits as they are.
        let mut v = [_mm512_setzero_ps(); 16];
        for (r, v) in v.iter_mut().enumerate() {
            *v = _mm512_loadu_ps(krow.add(r * 16));
        }
        crate::matmul::x86::transpose_16x16(&mut v);
        for (p, v) in v.iter().enumerate() {
            _mm512_storeu_ps(kt.add(p * g.skp + j0), *v);
        }
    }
}

/// V of head `h`, batch `b`: each column's scale over all keys (padding included, so that
/// leaving padding out changes no value), then groups of four live keys quantized and
/// interleaved byte by byte into slots.
///
/// # Safety
/// As [`head`].
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pack_v(job: &Job<'_>, b: usize, h: usize, s: &mut Scratch, g: Geom) {
    let v = job.v;
    let row = |j: usize| v.data.as_ptr().add((b * g.all + j) * v.ld + h * g.d);
    let nc = g.d / 16;
    let mut amax = [_mm512_setzero_ps(); MAX_HEAD_DIM / 16];
    for j in 0..g.all {
        for (c, m) in amax.iter_mut().enumerate().take(nc) {
            *m = _mm512_max_ps(*m, _mm512_abs_ps(_mm512_loadu_ps(row(j).add(16 * c))));
        }
    }
    s.vf.resize(g.d, 0.0);
    let mut f = [_mm512_setzero_ps(); MAX_HEAD_DIM / 16];
    for c in 0..nc {
        _mm512_storeu_ps(s.vf.as_mut_ptr().add(16 * c), _mm512_div_ps(amax[c], _mm512_set1_ps(127.0)));
        let nonzero = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(amax[c], _mm512_setzero_ps());
        f[c] = _mm512_maskz_div_ps(nonzero, _mm512_set1_ps(127.0), amax[c]);
    }
    s.v.resize(g.skp / 4 * g.dv);
    let dst = s.v.as_mut_slice();
    if g.dv != g.d {
        dst.fill(0.0);
    }
    let dst = dst.as_mut_ptr().cast::<u8>();
    for r in 0..g.skp / 4 {
        for (c, &f) in f.iter().enumerate().take(nc) {
            // Rows 4r..4r+4, columns 16c..16c+16 as i8 (zeros past `seq_k`).
            let q: [__m128i; 4] = std::array::from_fn(|t| match 4 * r + t {
                j if j < g.seq_k => {
                    let x = _mm512_mul_ps(_mm512_loadu_ps(row(j).add(16 * c)), f);
                    _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(x))
                }
                _ => _mm_setzero_si128(),
            });
            let (lo01, hi01) = (_mm_unpacklo_epi8(q[0], q[1]), _mm_unpackhi_epi8(q[0], q[1]));
            let (lo23, hi23) = (_mm_unpacklo_epi8(q[2], q[3]), _mm_unpackhi_epi8(q[2], q[3]));
            let at = dst.add(r * g.dv * 4 + 64 * c).cast::<__m128i>();
            _mm_storeu_si128(at, _mm_unpacklo_epi16(lo01, lo23));
            _mm_storeu_si128(at.add(1), _mm_unpackhi_epi16(lo01, lo23));
            _mm_storeu_si128(at.add(2), _mm_unpacklo_epi16(hi01, hi23));
            _mm_storeu_si128(at.add(3), _mm_unpackhi_epi16(hi01, hi23));
        }
    }
}

/// Scores and u8 weights of query rows `i0..i0 + 32` (or to `seq_q`), with the head packed and
/// its Q rows quantized in `s`, the tiles configured.
///
/// # Safety
/// As [`head`].
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn weights(job: &Job<'_>, b: usize, h: usize, i0: usize, s: &mut Scratch, g: Geom) {
    let m = ROWS.min(job.dims.seq_q - i0);
    // S = Q·Kᵀ, 32 keys (two column tiles) at a time, one K step.
    let qb = s.q.as_slice().as_ptr().add(i0 * 16).cast::<u8>();
    let kt = s.kt.as_slice().as_ptr().cast::<u8>();
    let sp = s.s.as_mut_slice().as_mut_ptr();
    for j in 0..g.skp / 32 {
        amx::int8ss_block_2x2(1, qb, 64, 64, kt.add(j * 128), g.skp * 4, sp.add(j * 32).cast(), g.skp * 4);
    }
    let mask = job.mask_rows(b, h, i0, m).map(|(data, stride)| (data.as_ptr(), stride));
    let pp = s.p.as_mut_slice().as_mut_ptr().cast::<u8>().add(i0 * g.skp);
    softmax_u8(sp, g.skp, m, g.seq_k, &s.kf, &s.qf[i0..i0 + m], mask, pp, &mut s.inv[i0..i0 + m]);
}

/// `P·V` of query rows `i0..i0 + 32` (or to `seq_q`), each output row times its `1 / sum` and
/// each column times V's scale, into head `h`'s columns of the output.
///
/// # Safety
/// As [`head`], after [`weights`] for these rows.
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn context(job: &Job<'_>, b: usize, h: usize, i0: usize, s: &mut Scratch, g: Geom, out: Out) {
    let seq_q = job.dims.seq_q;
    let m = ROWS.min(seq_q - i0);
    // 32 columns (two column tiles) at a time, 64 keys a step.
    let pp = s.p.as_slice().as_ptr().cast::<u8>().add(i0 * g.skp);
    let (vb, op) = (s.v.as_slice().as_ptr().cast::<u8>(), s.o.as_mut_slice().as_mut_ptr());
    for t in 0..g.dv / 32 {
        amx::int8_block_2x2(g.skp / 64, pp, g.skp, 64, vb.add(t * 128), g.dv * 4, op.add(t * 32).cast(), g.dv * 4);
    }
    for r in 0..m {
        let f = _mm512_set1_ps(s.inv[i0 + r]);
        let dst = out.0.add((b * seq_q + i0 + r) * job.hd + h * g.d);
        for c in (0..g.d).step_by(16) {
            let acc = _mm512_cvtepi32_ps(_mm512_loadu_si512(op.add(r * g.dv + c).cast()));
            _mm512_storeu_ps(dst.add(c), _mm512_mul_ps(_mm512_mul_ps(acc, _mm512_loadu_ps(s.vf.as_ptr().add(c))), f));
        }
    }
}

/// The block's `m` score rows (stride `skp`): i32 dot products to f32 scores in place
/// (`acc · kf[j] · qf[r] + mask`), then `round(255 e^(s - max))` as u8 into P's rows; `inv[r]`
/// gets `1 / sum` of row `r`'s u8 weights (NaN when every key is masked out or a score is NaN,
/// as ONNX's Softmax).
///
/// Each pass runs over all rows before the next, and rows keep their maxima and sums as
/// vectors, reduced sixteen rows at a time by one transpose: reduced row by row, each row's
/// horizontal reductions, division and branch formed one dependency chain that the next row
/// waited on (MiniLM's attention took 142 µs per layer that way, 131 µs in this form).
///
/// # Safety
/// AVX-512 F/BW present; `s` valid for `m` rows of `seq_k` rounded up to 16 values, `kf` as
/// many values, `qf` and `inv` `m`; a non-null `mask` valid for `m` rows of `seq_k` values at
/// `mask_stride`; `p` for `m` rows of `skp` bytes.
#[allow(clippy::too_many_arguments)]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn softmax_u8(
    s: *mut f32,
    skp: usize,
    m: usize,
    seq_k: usize,
    kf: &[f32],
    qf: &[f32],
    mask: Option<(*const f32, usize)>,
    p: *mut u8,
    inv: &mut [f32],
) {
    let nv = seq_k.div_ceil(16);
    let tail: __mmask16 = match seq_k % 16 {
        0 => 0xffff,
        r => (1u16 << r) - 1,
    };
    let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
    // Per row, a vector of maxima then of sums, reduced sixteen rows at a time.
    let mut lanes = [_mm512_setzero_ps(); ROWS];
    // Rows with a NaN score (from the mask or the operands): `max` may drop a NaN, so each row
    // also sums its scores, which NaN (or `+inf` beside `-inf`, where the softmax is NaN too)
    // turns into NaN; such rows give NaN.
    let mut nan = [false; ROWS];
    for r in 0..m {
        let row = s.add(r * skp);
        let q = _mm512_set1_ps(qf[r]);
        let mut vmax = ninf;
        let mut total = _mm512_setzero_ps();
        for v in 0..nv {
            let k = if v + 1 < nv { 0xffff } else { tail };
            let acc = _mm512_cvtepi32_ps(_mm512_loadu_si512(row.add(16 * v).cast()));
            let add = match mask {
                Some((mk, stride)) => _mm512_maskz_loadu_ps(k, mk.add(r * stride + 16 * v)),
                None => _mm512_setzero_ps(),
            };
            let x = _mm512_fmadd_ps(_mm512_mul_ps(acc, _mm512_loadu_ps(kf.as_ptr().add(16 * v))), q, add);
            let x = _mm512_mask_mov_ps(ninf, k, x);
            _mm512_storeu_ps(row.add(16 * v), x);
            vmax = _mm512_max_ps(vmax, x);
            total = _mm512_add_ps(total, x);
        }
        lanes[r] = vmax;
        nan[r] = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(total, total) != 0;
    }
    let mut max = [0f32; ROWS];
    reduce_rows(&mut lanes, m, &mut max, _mm512_max_ps);

    // e^(x - max) = 2^y, y = (x - max) log2(e), as 2^n · 2^f with n = round(y), |f| <= 1/2;
    // y is clamped at -30, where 255 · 2^y rounds to 0 (and -inf becomes finite).
    let l2e = _mm512_set1_ps(std::f32::consts::LOG2_E);
    let floor = _mm512_set1_ps(-30.0);
    for r in 0..m {
        let row = s.add(r * skp);
        let ml = _mm512_set1_ps(max[r] * std::f32::consts::LOG2_E);
        let mut sum = _mm512_setzero_si512();
        for v in 0..nv {
            let y = _mm512_max_ps(_mm512_fmsub_ps(_mm512_loadu_ps(row.add(16 * v)), l2e, ml), floor);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(y);
            let f = _mm512_sub_ps(y, n);
            let mut e = _mm512_set1_ps(EXP2_POLY4_255[4]);
            for &c in EXP2_POLY4_255[..4].iter().rev() {
                e = _mm512_fmadd_ps(e, f, _mm512_set1_ps(c));
            }
            let w = _mm512_cvtps_epi32(_mm512_scalef_ps(e, n));
            sum = _mm512_add_epi32(sum, w);
            _mm_storeu_si128(p.add(r * skp + 16 * v).cast(), _mm512_cvtepi32_epi8(w));
        }
        lanes[r] = _mm512_cvtepi32_ps(sum);
    }
    let mut sum = [0f32; ROWS];
    reduce_rows(&mut lanes, m, &mut sum, _mm512_add_ps);
    for r in 0..m {
        // A row masked entirely has max -inf (its weights are garbage): NaN, as ONNX's Softmax.
        inv[r] = if max[r] == f32::NEG_INFINITY || max[r].is_nan() || nan[r] { f32::NAN } else { 1.0 / sum[r] };
    }
}

/// `out[r] = op`-reduction of the sixteen lanes of `rows[r]` for `r < m`: sixteen rows at a time
/// by a transpose, then fifteen vertical operations.
///
/// # Safety
/// AVX-512 F present.
#[inline(always)]
unsafe fn reduce_rows(
    rows: &mut [__m512; ROWS],
    m: usize,
    out: &mut [f32; ROWS],
    op: unsafe fn(__m512, __m512) -> __m512,
) {
    for r0 in (0..m).step_by(16) {
        let mut t: [__m512; 16] = rows[r0..r0 + 16].try_into().unwrap();
        crate::matmul::x86::transpose_16x16(&mut t);
        let mut acc = t[0];
        for &x in &t[1..] {
            acc = op(acc, x);
        }
        _mm512_storeu_ps(out.as_mut_ptr().add(r0), acc);
    }
}

/// `255 · 2^f` for `|f| <= 1/2`: the Taylor series of `2^f` to degree 4 (relative error below
/// 4.3e-5), times 255; constant first.
const EXP2_POLY4_255: [f32; 5] = [255.0, 176.752_53, 61.257_76, 14.153_548, 2.452_623];

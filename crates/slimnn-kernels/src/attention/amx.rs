//! bf16 attention on AMX tiles: one task per (batch, head) packs that head's K and V as bf16
//! pairs in the tile layout, then takes query rows 32 at a time through
//! `S = Q·Kᵀ` (tiles), the masked softmax in f32 ([`softmax_block`], rows left unnormalised),
//! `P` rounded to bf16, `O = P·V` (tiles) and `O / sum` into the head's columns.
//!
//! The generic bf16 path calls the GEMM driver four times per block of rows; at MiniLM's
//! shapes (`head_dim` 32, 128 keys) each call is a few tile products, so the per-call
//! conversion, packing and blocking dominated. Here both products are a handful of tile loads
//! on buffers that stay in L1.
//!
//! Layouts, in 32-bit slots each holding a bf16 pair (low half first, as `tdpbf16ps` reads):
//! - Q block: 32 rows of `dp / 2` slots (`dp` = `head_dim` rounded up to 32, zeros past it);
//! - Kᵀ: `dp / 2` rows of `skp` slots (`skp` = the live keys rounded up to 32), slot `(p, j)`
//!   = `(K[j][2p], K[j][2p+1])`: the tile B operand of `S = Q·Kᵀ`, zeros past the live keys;
//! - V: `skp / 2` rows of `dp` slots, slot `(r, c)` = `(V[2r][c], V[2r+1][c])`;
//! - P: 32 rows of `skp / 2` slots, zeros past the live keys.
//!
//! The live keys are `seq_k` less a padding mask's trailing masked keys (`Job::live_keys`),
//! whose weights are exactly 0.

#![cfg(target_arch = "x86_64")]

use super::{each_head, AttnDims, Job, KernelError, Out};
use crate::amx;
use crate::cpu::{self, CpuTier};
use crate::gemm::bf16::{convert_row, native_for, pack_pair_row};
use crate::gemm::AlignedVec;
use crate::rows::softmax_block;
use std::arch::x86_64::*;
use std::cell::Cell;

/// Query rows per block: two row tiles.
const ROWS: usize = 32;

/// Whether the AMX path runs for `tier` on this host (AMX-BF16 tiles granted, AVX-512 BF16 for
/// the conversions).
pub(super) fn usable(tier: CpuTier) -> bool {
    tier == CpuTier::Amx && native_for(tier) && cpu::features().amx_granted
}

#[derive(Default)]
struct Scratch {
    q: AlignedVec,
    kt: AlignedVec,
    v: AlignedVec,
    s: AlignedVec,
    p: AlignedVec,
    o: AlignedVec,
    inv: Vec<f32>,
    /// 16 K rows as pairs, staged for their transpose into Kᵀ.
    krow: Vec<f32>,
}

thread_local! {
    static SCRATCH: Cell<Option<Scratch>> = const { Cell::new(None) };
}

/// Runs `job` (validated by the caller, `seq_k > 0`) into `out`.
pub(super) fn run(job: &Job<'_>, out: &mut [f32], threads: usize) -> Result<(), KernelError> {
    let ptr = Out(out.as_mut_ptr());
    each_head(job.dims, threads, &SCRATCH, |b, h, s| {
        // SAFETY: AMX tiles granted (`usable`); the head's writes stay within `out` (checked
        // lengths) and within its own columns (see `Out`).
        unsafe { head(job, b, h, s, ptr) }
    })
}

/// Batch `b`, head `h`: packs K and V, then every block of query rows.
///
/// # Safety
/// AMX-BF16 tiles granted and AVX-512 BF16 present; `out` as [`Out`] describes.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn head(job: &Job<'_>, b: usize, h: usize, s: &mut Scratch, out: Out) -> Result<(), KernelError> {
    let AttnDims { seq_q, head_dim: d, .. } = job.dims;
    // Trailing padding keys (weight exactly 0) are left out, as on the f32 path, in whole
    // tiles of 32: a row count that is not a multiple of 32 takes the softmax row by row.
    let live = job.live_keys(b, h).next_multiple_of(32).min(job.dims.seq_k);
    let (dp, skp) = (d.next_multiple_of(32), live.next_multiple_of(32));
    pack(job, b, h, s, dp, live);
    s.q.resize(ROWS * dp / 2);
    s.s.resize(ROWS * skp);
    s.p.resize(ROWS * skp / 2);
    s.o.resize(ROWS * dp);
    s.inv.resize(ROWS, 0.0);
    // Slots past a row's values stay zero: the tiles read them.
    s.q.as_mut_slice().fill(0.0);
    s.p.as_mut_slice().fill(0.0);
    amx::configure();
    let mut result = Ok(());
    for i0 in (0..seq_q).step_by(ROWS) {
        result = block(job, b, h, i0, live, s, out);
        if result.is_err() {
            break;
        }
    }
    amx::release();
    result
}

/// Query rows `i0..i0 + 32` (or to `seq_q`) of batch `b`, head `h`, over its first `live`
/// keys, with the head packed in `s` and the tiles configured. (A plain function, not a closure: closures do not inherit
/// the caller's target features.)
///
/// # Safety
/// As [`head`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn block(
    job: &Job<'_>,
    b: usize,
    h: usize,
    i0: usize,
    live: usize,
    s: &mut Scratch,
    out: Out,
) -> Result<(), KernelError> {
    let AttnDims { seq_q, head_dim: d, .. } = job.dims;
    let (dp, skp) = (d.next_multiple_of(32), live.next_multiple_of(32));
    let (d2, sk2) = (dp / 2, skp / 2);
    let tier = job.tier;
    let m = ROWS.min(seq_q - i0);
    let q = job.q;
    let qs = s.q.as_mut_slice();
    for r in 0..m {
        let src = &q.data[(b * seq_q + i0 + r) * q.ld + h * d..][..d];
        convert_row(src, &mut qs[r * d2..(r + 1) * d2], tier);
    }
    qs[m * d2..].fill(0.0);

    // S = Q·Kᵀ, 32 key columns (two tiles) at a time.
    let qp = s.q.as_slice().as_ptr().cast::<u8>();
    let ktp = s.kt.as_slice().as_ptr().cast::<u8>();
    let sp = s.s.as_mut_slice().as_mut_ptr().cast::<u8>();
    for j in 0..skp / 32 {
        amx::bf16_block_2x2(dp / 32, qp, d2 * 4, 64, ktp.add(j * 128), skp * 4, sp.add(j * 128), skp * 4);
    }

    softmax(job, (b, h, i0, m, live), s.s.as_mut_slice(), skp, &mut s.inv[..m])?;

    let (ss, ps) = (s.s.as_slice(), s.p.as_mut_slice());
    for r in 0..m {
        convert_row(&ss[r * skp..r * skp + live], &mut ps[r * sk2..(r + 1) * sk2], tier);
    }

    // O = P·V, 32 output columns at a time.
    let pp = s.p.as_slice().as_ptr().cast::<u8>();
    let vp = s.v.as_slice().as_ptr().cast::<u8>();
    let op = s.o.as_mut_slice().as_mut_ptr().cast::<u8>();
    for j in 0..dp / 32 {
        amx::bf16_block_2x2(skp / 32, pp, sk2 * 4, 64, vp.add(j * 128), dp * 4, op.add(j * 128), dp * 4);
    }

    let os = s.o.as_slice();
    for r in 0..m {
        let dst = std::slice::from_raw_parts_mut(out.0.add((b * seq_q + i0 + r) * job.hd + h * d), d);
        let f = s.inv[r];
        for (y, &x) in dst.iter_mut().zip(&os[r * dp..r * dp + d]) {
            *y = x * f;
        }
    }
    Ok(())
}

/// Packs the first `live` keys of head `h` of batch `b`: Kᵀ and V as bf16 pairs (see the
/// module comment).
///
/// # Safety
/// AVX-512 F/BW/VL/DQ present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn pack(job: &Job<'_>, b: usize, h: usize, s: &mut Scratch, dp: usize, live: usize) {
    let AttnDims { seq_k, head_dim: d, .. } = job.dims;
    let skp = live.next_multiple_of(32);
    let (k, v, tier) = (job.k, job.v, job.tier);
    let d2 = dp / 2;
    // Kᵀ, 16 keys at a time: their rows as pairs (staged, slots past a row's values and rows
    // past `seq_k` zero), then each 16 x 16 block of slots transposed into Kᵀ's rows.
    s.krow.clear();
    s.krow.resize(16 * d2, 0.0);
    s.kt.resize(d2 * skp);
    let kt = s.kt.as_mut_slice().as_mut_ptr();
    for j0 in (0..skp).step_by(16) {
        for r in 0..16 {
            let row = &mut s.krow[r * d2..r * d2 + d.div_ceil(2)];
            match j0 + r {
                j if j < live => convert_row(&k.data[(b * seq_k + j) * k.ld + h * d..][..d], row, tier),
                _ => row.fill(0.0),
            }
        }
        for c in (0..d2).step_by(16) {
            // The slots are bf16 pairs in f32 containers; the shuffles move their bits as they are.
            let mut v = [_mm512_setzero_ps(); 16];
            for (r, v) in v.iter_mut().enumerate() {
                *v = _mm512_loadu_ps(s.krow.as_ptr().add(r * d2 + c));
            }
            crate::matmul::x86::transpose_16x16(&mut v);
            for (p, v) in v.iter().enumerate() {
                _mm512_storeu_ps(kt.add((c + p) * skp + j0), *v);
            }
        }
    }

    s.v.resize(skp / 2 * dp);
    let row = |j: usize| (j < live).then(|| &v.data[(b * seq_k + j) * v.ld + h * d..][..d]);
    for (r, dst) in s.v.as_mut_slice().chunks_exact_mut(dp).enumerate() {
        match row(2 * r) {
            Some(lo) => pack_pair_row(tier, lo, row(2 * r + 1), dst),
            None => dst.fill(0.0),
        }
    }
}

/// The masked, scaled softmax of score rows `i0..i0 + m` of batch `b`, head `h` (row stride
/// `skp`, `seq_k` values each: the live keys), left unnormalised with `1 / sum` in `inv`.
fn softmax(
    job: &Job<'_>,
    (b, h, i0, m, seq_k): (usize, usize, usize, usize, usize),
    scores: &mut [f32],
    skp: usize,
    inv: &mut [f32],
) -> Result<(), KernelError> {
    // Fewer live keys than `seq_k` only with one mask row for every query (`live_keys`).
    let mask =
        job.mask_rows(b, h, i0, m).map(|(data, stride)| (if stride == 0 { &data[..seq_k] } else { data }, stride));
    if skp == seq_k {
        return softmax_block(job.tier, &mut scores[..m * seq_k], seq_k, job.scale, mask, Some(inv));
    }
    for (r, f) in inv.iter_mut().enumerate() {
        let row_mask = mask.map(|(data, stride)| (&data[r * stride..r * stride + seq_k], 0));
        let row = &mut scores[r * skp..r * skp + seq_k];
        softmax_block(job.tier, row, seq_k, job.scale, row_mask, Some(std::slice::from_mut(f)))?;
    }
    Ok(())
}

//! Multi-head scaled dot-product attention on projections laid out `[batch, seq, heads *
//! head_dim]` (the layout linear layers produce, so no transposes are materialised):
//! `out[b, i, h] = softmax(Q[b, i, h] · K[b, :, h]ᵀ * scale + mask) · V[b, :, h]`.
//!
//! Per (batch, head), `scale * Kᵀ` (transposed in registers) and V are packed once for the
//! GEMM; query rows then go in blocks of 48: `S = Q·Kᵀ` into a small thread-local buffer that
//! stays in L1, the fused mask + softmax in place ([`crate::rows`], rows left unnormalised),
//! `P·V` by the GEMM straight into the head's columns of the output (row stride `heads *
//! head_dim`), then each output row times its `1 / sum`. With threads, tasks are blocks of
//! query rows (all heads), which own disjoint rows of the output.
//!
//! On AVX-512, f32 attention at BERT-family shapes (heads of 16-64 values, up to 128 keys) runs
//! register-blocked kernels instead (`avx512`); bf16 attention on AMX runs on tiles (`amx`), and
//! so does int8 attention ([`AttnProducts::Int8`], `int8`).

use crate::cpu::{self, CpuTier};
use crate::error::{check_tier, KernelError};
use crate::gemm::{gemm, Epilogue, PackedB, Par};
use crate::matmul::transpose_scaled;
use crate::rows::{scale_rows, softmax_block};
use rayon::prelude::*;
use std::cell::Cell;

mod amx;
mod avx512;
mod int8;

/// The output, shared by the tasks: task (b, h) writes only head `h`'s columns of batch `b`'s
/// rows, so no two tasks touch the same value.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
struct Out(*mut f32);
// SAFETY: see the type's comment; the pointer outlives the tasks (they finish inside `run`).
#[cfg(target_arch = "x86_64")]
unsafe impl Send for Out {}
#[cfg(target_arch = "x86_64")]
unsafe impl Sync for Out {}

/// Runs `task(b, h, scratch)` for every (batch, head), over rayon's threads when `threads > 1`.
/// Each thread keeps its scratch in `slot` between calls, taken out while in use so that a
/// nested call (rayon work stealing) gets its own.
#[cfg(target_arch = "x86_64")]
fn each_head<S: Default + 'static>(
    dims: AttnDims,
    threads: usize,
    slot: &'static std::thread::LocalKey<Cell<Option<S>>>,
    task: impl Fn(usize, usize, &mut S) -> Result<(), KernelError> + Sync,
) -> Result<(), KernelError> {
    let run = |i: usize| {
        let mut s = slot.with(Cell::take).unwrap_or_default();
        let r = task(i / dims.heads, i % dims.heads, &mut s);
        slot.with(|c| c.set(Some(s)));
        r
    };
    let tasks = dims.batch * dims.heads;
    if threads <= 1 {
        (0..tasks).try_for_each(run)
    } else {
        (0..tasks).into_par_iter().try_for_each(run)
    }
}

const KERNEL: &str = "attention";

/// Mask values at or below this mask their key out (PyTorch writes the f32 minimum, others
/// `-inf`): with any score below 1e29 in size, the key's weight is exactly 0.
const MASKED: f32 = -1e30;

/// Query rows per block: the score block (`BLOCK_ROWS x seq_k`) stays in L1 for the usual
/// sequence lengths, and a multiple of the micro-kernels' row counts (4, 6, 8) keeps tiles full.
const BLOCK_ROWS: usize = 48;

/// Sizes of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttnDims {
    pub batch: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// An additive mask `[mb, mh, mq, seq_k]` (row-major) broadcast to `[batch, heads, seq_q,
/// seq_k]`: `mb` is 1 or `batch`, `mh` 1 or `heads`, `mq` 1 or `seq_q`. `-inf` masks a position
/// out; a query row with every position at `-inf` gives NaN (as ONNX's Softmax).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnMask<'a> {
    pub data: &'a [f32],
    pub shape: [usize; 4],
}

/// Multi-head attention with the active tier's kernels ([`cpu::tier`]): `q` is `[batch, seq_q,
/// heads * head_dim]`, `k` and `v` are `[batch, seq_k, heads * head_dim]`, `out` is `[batch,
/// seq_q, heads * head_dim]`; buffers must have exactly those lengths.
#[allow(clippy::too_many_arguments)]
pub fn mha(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<AttnMask<'_>>,
    dims: AttnDims,
    scale: f32,
    out: &mut [f32],
    par: Par<'_>,
) -> Result<(), KernelError> {
    mha_with(cpu::tier(), q, k, v, mask, dims, scale, out, par)
}

/// Rows of a projection: row `r` (of `batch * seq`) starts at `data[r * ld]` and holds
/// `heads * head_dim` values. A fused QKV projection `[batch, seq, 3 * heads * head_dim]`
/// gives three of these, offset by `0`, `heads * head_dim` and `2 * heads * head_dim`.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    pub data: &'a [f32],
    pub ld: usize,
}

/// [`mha`] with the kernels of `tier`, which the host must support.
#[allow(clippy::too_many_arguments)]
pub fn mha_with(
    tier: CpuTier,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<AttnMask<'_>>,
    dims: AttnDims,
    scale: f32,
    out: &mut [f32],
    par: Par<'_>,
) -> Result<(), KernelError> {
    let hd = dims.heads.saturating_mul(dims.head_dim);
    let rows = |data| Rows { data, ld: hd };
    mha_strided_with(tier, rows(q), rows(k), rows(v), mask, dims, scale, out, par)
}

/// [`mha`] on projections with their own row strides (see [`Rows`]).
#[allow(clippy::too_many_arguments)]
pub fn mha_strided(
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    mask: Option<AttnMask<'_>>,
    dims: AttnDims,
    scale: f32,
    out: &mut [f32],
    par: Par<'_>,
) -> Result<(), KernelError> {
    mha_strided_with(cpu::tier(), q, k, v, mask, dims, scale, out, par)
}

/// Whether [`AttnProducts::Int8`] runs in int8 for heads of `head_dim` values on the active tier.
pub fn int8_native(head_dim: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    return int8::native(cpu::tier(), head_dim);
    #[cfg(not(target_arch = "x86_64"))]
    return {
        let _ = head_dim;
        false
    };
}

/// The arithmetic of attention's two products (`Q·Kᵀ` and `P·V`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum AttnProducts {
    F32,
    /// Both products in bf16 (f32 accumulation; see [`crate::gemm::bf16`]): K, V and the query
    /// and probability rows rounded to bf16. On the `amx` tier both products run on AMX tiles.
    Bf16,
    /// Both products in int8 where AMX-INT8 tiles are granted and `head_dim` is 16, 32, 48 or
    /// 64; elsewhere the f32 kernels run (a request, as bf16 is). Q and K rows are quantized
    /// per token, the softmax weights to u8 and V per column, as [`reference::mha_int8`]
    /// defines; see [`int8_native`].
    Int8,
}

/// [`mha_strided`] with the products `products` names.
#[allow(clippy::too_many_arguments)]
pub fn mha_strided_as(
    products: AttnProducts,
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    mask: Option<AttnMask<'_>>,
    dims: AttnDims,
    scale: f32,
    out: &mut [f32],
    par: Par<'_>,
) -> Result<(), KernelError> {
    run(cpu::tier(), products, q, k, v, mask, dims, scale, out, par)
}

/// [`mha_strided_as`] with the kernels of `tier`, which the host must support.
#[allow(clippy::too_many_arguments)]
pub fn mha_strided_as_with(
    tier: CpuTier,
    products: AttnProducts,
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    mask: Option<AttnMask<'_>>,
    dims: AttnDims,
    scale: f32,
    out: &mut [f32],
    par: Par<'_>,
) -> Result<(), KernelError> {
    run(tier, products, q, k, v, mask, dims, scale, out, par)
}

/// [`mha_strided`] with the kernels of `tier`, which the host must support.
#[allow(clippy::too_many_arguments)]
pub fn mha_strided_with(
    tier: CpuTier,
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    mask: Option<AttnMask<'_>>,
    dims: AttnDims,
    scale: f32,
    out: &mut [f32],
    par: Par<'_>,
) -> Result<(), KernelError> {
    run(tier, AttnProducts::F32, q, k, v, mask, dims, scale, out, par)
}

#[allow(clippy::too_many_arguments)]
fn run(
    tier: CpuTier,
    products: AttnProducts,
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    mask: Option<AttnMask<'_>>,
    dims: AttnDims,
    scale: f32,
    out: &mut [f32],
    par: Par<'_>,
) -> Result<(), KernelError> {
    check_tier(tier)?;
    let hd = check(q, k, v, mask, dims, out)?;
    if out.is_empty() {
        return Ok(());
    }
    if dims.seq_k == 0 {
        // Softmax over no keys weights nothing: the sum over keys is empty.
        out.fill(0.0);
        return Ok(());
    }
    let bf16 = products == AttnProducts::Bf16;
    let job = Job { tier, bf16, q, k, v, mask, dims, scale, hd };
    #[cfg(target_arch = "x86_64")]
    if products == AttnProducts::Int8 && int8::native(tier, dims.head_dim) {
        return match par {
            Par::Pool(pool) => pool.install(|| int8::run(&job, out, par.threads())),
            _ => int8::run(&job, out, par.threads()),
        };
    }
    #[cfg(target_arch = "x86_64")]
    if bf16 && amx::usable(tier) {
        return match par {
            Par::Pool(pool) => pool.install(|| amx::run(&job, out, par.threads())),
            _ => amx::run(&job, out, par.threads()),
        };
    }
    #[cfg(target_arch = "x86_64")]
    if avx512::usable(&job) {
        return match par {
            Par::Pool(pool) => pool.install(|| avx512::run(&job, out, par.threads())),
            _ => avx512::run(&job, out, par.threads()),
        };
    }
    match par {
        _ if par.threads() <= 1 => job.run_seq(out),
        Par::Pool(pool) => pool.install(|| job.run_par(out, par.threads())),
        _ => job.run_par(out, par.threads()),
    }
}

/// Validates buffer lengths and the mask; returns `heads * head_dim`.
fn check(
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    mask: Option<AttnMask<'_>>,
    dims: AttnDims,
    out: &[f32],
) -> Result<usize, KernelError> {
    let AttnDims { batch, seq_q, seq_k, heads, head_dim } = dims;
    let too_big = || KernelError::shape(KERNEL, format!("{dims:?} is too large"));
    let hd = heads.checked_mul(head_dim).ok_or_else(too_big)?;
    let q_len = batch.checked_mul(seq_q).and_then(|x| x.checked_mul(hd)).ok_or_else(too_big)?;
    if out.len() != q_len {
        return Err(KernelError::shape(KERNEL, format!("out has {} values, {dims:?} needs {q_len}", out.len())));
    }
    // Contiguous projections must match exactly; strided ones need their last row in bounds.
    for (name, x, rows) in [("q", q, batch * seq_q), ("k", k, batch * seq_k), ("v", v, batch * seq_k)] {
        if x.ld < hd {
            return Err(KernelError::shape(
                KERNEL,
                format!("{name} rows of stride {} hold fewer than {hd} values", x.ld),
            ));
        }
        let need = match rows {
            0 => 0,
            r => (r - 1).checked_mul(x.ld).and_then(|v| v.checked_add(hd)).ok_or_else(too_big)?,
        };
        let ok = if x.ld == hd { x.data.len() == need } else { x.data.len() >= need };
        if !ok {
            let got = x.data.len();
            return Err(KernelError::shape(KERNEL, format!("{name} has {got} values, {dims:?} needs {need}")));
        }
    }
    if let Some(m) = mask {
        let [mb, mh, mq, mk] = m.shape;
        let ok = |d: usize, full: usize| d == 1 || d == full;
        if !(ok(mb, batch) && ok(mh, heads) && ok(mq, seq_q) && mk == seq_k) {
            return Err(KernelError::shape(
                KERNEL,
                format!("mask {:?} does not broadcast to [{batch}, {heads}, {seq_q}, {seq_k}]", m.shape),
            ));
        }
        let len = mb.checked_mul(mh).and_then(|x| x.checked_mul(mq)).and_then(|x| x.checked_mul(mk));
        if len != Some(m.data.len()) {
            return Err(KernelError::shape(KERNEL, format!("mask {:?} holds {} values", m.shape, m.data.len())));
        }
    }
    Ok(hd)
}

/// Per-thread scratch: Kᵀ and V packs (sequential path) and the score block.
#[derive(Default)]
struct Scratch {
    packs: Option<(PackedB, PackedB)>,
    scores: Vec<f32>,
    /// `1 / sum` per row of the score block.
    inv: Vec<f32>,
    /// One head's `scale * Kᵀ` before packing.
    kt: Vec<f32>,
}

thread_local! {
    // Taken out while in use, so a nested call (rayon work stealing) gets its own.
    static SCRATCH: Cell<Option<Scratch>> = const { Cell::new(None) };
    // The parallel path's packs for every (batch, head), kept on the calling thread.
    static PACKS: Cell<Vec<(PackedB, PackedB)>> = const { Cell::new(Vec::new()) };
    // The per-head path's outputs, one contiguous `seq_q x head_dim` block per (batch, head).
    static HEADS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    let mut s = SCRATCH.with(Cell::take).unwrap_or_default();
    let r = f(&mut s);
    SCRATCH.with(|c| c.set(Some(s)));
    r
}

fn empty_packs(tier: CpuTier) -> Result<(PackedB, PackedB), KernelError> {
    Ok((PackedB::empty(tier)?, PackedB::empty(tier)?))
}

struct Job<'a> {
    tier: CpuTier,
    /// Pack K and V as bf16 (the GEMMs then round Q and P rows per call).
    bf16: bool,
    q: Rows<'a>,
    k: Rows<'a>,
    v: Rows<'a>,
    mask: Option<AttnMask<'a>>,
    dims: AttnDims,
    scale: f32,
    hd: usize,
}

impl Job<'_> {
    /// Packs `scale * Kᵀ` (`head_dim x seq_k`) and V (`seq_k x head_dim`) of batch `b`, head
    /// `h`; `kt_buf` is scratch for the transpose. The scale rides along with the transpose
    /// (cheaper there than on every score).
    fn pack(
        &self,
        b: usize,
        h: usize,
        (kt, vp): &mut (PackedB, PackedB),
        kt_buf: &mut Vec<f32>,
    ) -> Result<(), KernelError> {
        let AttnDims { seq_k: all_keys, head_dim: d, .. } = self.dims;
        let seq_k = self.live_keys(b, h);
        let (k, v) = (self.k, self.v);
        if kt_buf.len() < d * seq_k {
            kt_buf.resize(d * seq_k, 0.0);
        }
        let buf = &mut kt_buf[..d * seq_k];
        transpose_scaled(self.tier, &k.data[b * all_keys * k.ld + h * d..], k.ld, seq_k, d, self.scale, buf)?;
        let v_head = &v.data[b * all_keys * v.ld + h * d..];
        if self.bf16 {
            kt.pack_bf16(buf, d, seq_k, seq_k)?;
            vp.pack_bf16(v_head, seq_k, d, v.ld)
        } else {
            kt.pack(buf, d, seq_k, seq_k)?;
            vp.pack(v_head, seq_k, d, v.ld)
        }
    }

    /// Keys of batch `b`, head `h` that can carry weight: all of them, except that a mask with
    /// one row for every query (a padding mask) drops its trailing run of masked keys. Their
    /// weights are e^(s - 1e30 - max) = 0, so leaving them out changes nothing but the work:
    /// a short sentence padded to 128 tokens attends over its own tokens only. The count is
    /// rounded up to 16 (the mask still masks the extra keys): rows of `Kᵀ` whose length is not
    /// a multiple of 16 straddle cache lines, which cost more than the keys saved. A row masked
    /// entirely keeps every key (and gives NaN, as ONNX's Softmax).
    fn live_keys(&self, b: usize, h: usize) -> usize {
        let seq_k = self.dims.seq_k;
        // Stride 0: one mask row serves every query.
        let Some((row, 0)) = self.mask_rows(b, h, 0, 1) else { return seq_k };
        // NaN is live: it must reach the softmax and make the row NaN.
        match row.iter().rposition(|&v| v > MASKED || v.is_nan()) {
            Some(last) => (last + 1).next_multiple_of(16).min(seq_k),
            None => seq_k,
        }
    }

    /// The mask rows of query rows `i0..i0 + m` of batch `b`, head `h`: (first row, stride
    /// between rows; 0 when one row serves every query).
    fn mask_rows(&self, b: usize, h: usize, i0: usize, m: usize) -> Option<(&[f32], usize)> {
        let seq_k = self.dims.seq_k;
        self.mask.map(|mk| {
            let [mb, mh, mq, _] = mk.shape;
            let base = ((b % mb) * mh + h % mh) * mq * seq_k;
            if mq == 1 {
                (&mk.data[base..base + seq_k], 0)
            } else {
                (&mk.data[base + i0 * seq_k..base + (i0 + m) * seq_k], seq_k)
            }
        })
    }

    /// Query rows `i0..i0 + m` of batch `b`, head `h`, into `out_rows` (row stride `ldo`,
    /// starting at that head's first column of row `i0`).
    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        b: usize,
        h: usize,
        i0: usize,
        m: usize,
        (kt, vp): &(PackedB, PackedB),
        (scores, inv): (&mut Vec<f32>, &mut Vec<f32>),
        (out_rows, ldo): (&mut [f32], usize),
    ) -> Result<(), KernelError> {
        let AttnDims { seq_q, head_dim: d, .. } = self.dims;
        // The packs hold the live keys only (see `pack`).
        let seq_k = kt.n();
        if scores.len() < m * seq_k {
            scores.resize(m * seq_k, 0.0);
        }
        let s = &mut scores[..m * seq_k];
        let q = self.q;
        gemm(m, &q.data[(b * seq_q + i0) * q.ld + h * d..], q.ld, kt, s, seq_k, Epilogue::NONE, Par::Seq)?;
        let mask = self.mask_rows(b, h, i0, m);
        // Normalising P·V's rows (head_dim wide) instead of P's (seq_k wide) saves work.
        if inv.len() < m {
            inv.resize(m, 0.0);
        }
        softmax_block(self.tier, s, seq_k, 1.0, mask, Some(&mut inv[..m]))?;
        gemm(m, s, seq_k, vp, out_rows, ldo, Epilogue::NONE, Par::Seq)?;
        scale_rows(self.tier, out_rows, d, ldo, &inv[..m])
    }

    /// One thread: head by head, so each head's packs stay in L1 across its row blocks.
    fn run_seq(&self, out: &mut [f32]) -> Result<(), KernelError> {
        let AttnDims { batch, seq_q, heads, .. } = self.dims;
        with_scratch(|s| {
            let mut packs = match s.packs.take() {
                Some(p) if p.0.tier() == self.tier => p,
                _ => empty_packs(self.tier)?,
            };
            let result = (|| {
                for b in 0..batch {
                    for h in 0..heads {
                        self.pack(b, h, &mut packs, &mut s.kt)?;
                        for i0 in (0..seq_q).step_by(BLOCK_ROWS) {
                            let m = BLOCK_ROWS.min(seq_q - i0);
                            let rows = &mut out[(b * seq_q + i0) * self.hd + h * self.dims.head_dim..];
                            self.block(b, h, i0, m, &packs, (&mut s.scores, &mut s.inv), (rows, self.hd))?;
                        }
                    }
                }
                Ok(())
            })();
            s.packs = Some(packs);
            result
        })
    }

    /// Threads: pack every (batch, head), then one task per block of query rows (all heads).
    fn run_par(&self, out: &mut [f32], threads: usize) -> Result<(), KernelError> {
        let AttnDims { batch, seq_q, heads, .. } = self.dims;
        // Blocks small enough for about four tasks per thread (load balance), in multiples of
        // 8 rows (the widest micro-kernel's height), at most BLOCK_ROWS.
        let per_task = (batch * seq_q).div_ceil(4 * threads).next_multiple_of(8).clamp(8, BLOCK_ROWS);
        if per_task < BLOCK_ROWS && batch * heads >= 2 * threads {
            return self.run_par_heads(out);
        }
        let mut packs = PACKS.with(Cell::take);
        let result = (|| {
            packs.retain(|p| p.0.tier() == self.tier);
            packs.truncate(batch * heads);
            while packs.len() < batch * heads {
                packs.push(empty_packs(self.tier)?);
            }
            packs
                .par_iter_mut()
                .enumerate()
                .try_for_each(|(i, p)| with_scratch(|s| self.pack(i / heads, i % heads, p, &mut s.kt)))?;
            let packs = &packs;
            out.par_chunks_mut(seq_q * self.hd).enumerate().try_for_each(|(b, ob)| {
                ob.par_chunks_mut(per_task * self.hd).enumerate().try_for_each(|(blk, rows)| {
                    with_scratch(|s| {
                        let m = rows.len() / self.hd;
                        (0..heads).try_for_each(|h| {
                            self.block(
                                b,
                                h,
                                blk * per_task,
                                m,
                                &packs[b * heads + h],
                                (&mut s.scores, &mut s.inv),
                                (&mut rows[h * self.dims.head_dim..], self.hd),
                            )
                        })
                    })
                })
            })
        })();
        PACKS.with(|c| c.set(packs));
        result
    }

    /// Threads over few query rows (small batches): one task per (batch, head) packs its own
    /// Kᵀ and V (no shared packing phase, more and larger tasks than row blocks would give)
    /// and writes its head to a contiguous buffer; the heads are then interleaved into `out`.
    fn run_par_heads(&self, out: &mut [f32]) -> Result<(), KernelError> {
        let AttnDims { batch, seq_q, heads, head_dim: d, .. } = self.dims;
        let per_head = seq_q * d;
        let mut buf = HEADS.with(Cell::take);
        buf.resize(batch * heads * per_head, 0.0);
        let result = buf.par_chunks_mut(per_head).enumerate().try_for_each(|(i, ho)| {
            with_scratch(|s| {
                let mut packs = match s.packs.take() {
                    Some(p) if p.0.tier() == self.tier => p,
                    _ => empty_packs(self.tier)?,
                };
                let (b, h) = (i / heads, i % heads);
                let r = self.pack(b, h, &mut packs, &mut s.kt).and_then(|()| {
                    (0..seq_q).step_by(BLOCK_ROWS).try_for_each(|i0| {
                        let m = BLOCK_ROWS.min(seq_q - i0);
                        self.block(b, h, i0, m, &packs, (&mut s.scores, &mut s.inv), (&mut ho[i0 * d..], d))
                    })
                });
                s.packs = Some(packs);
                r
            })
        });
        if result.is_ok() {
            let buf = &buf;
            out.par_chunks_mut(seq_q * self.hd).enumerate().for_each(|(b, ob)| {
                for (i, row) in ob.chunks_exact_mut(self.hd).enumerate() {
                    for (h, dst) in row.chunks_exact_mut(d).enumerate() {
                        dst.copy_from_slice(&buf[(b * heads + h) * per_head + i * d..][..d]);
                    }
                }
            });
        }
        HEADS.with(|c| c.set(buf));
        result
    }
}

/// Scalar reference in f64 (obviously correct, for the property tests).
pub mod reference {
    use super::{AttnDims, AttnMask};

    /// `softmax(Q·Kᵀ * scale + mask)·V` per (batch, head) in f64; rows masked entirely give NaN.
    pub fn mha(q: &[f32], k: &[f32], v: &[f32], mask: Option<AttnMask<'_>>, dims: AttnDims, scale: f32) -> Vec<f64> {
        let AttnDims { batch, seq_q, seq_k, heads, head_dim: d } = dims;
        let hd = heads * d;
        let mut out = vec![0.0; batch * seq_q * hd];
        for b in 0..batch {
            for h in 0..heads {
                for i in 0..seq_q {
                    let qrow = &q[(b * seq_q + i) * hd + h * d..][..d];
                    let z: Vec<f64> = (0..seq_k)
                        .map(|j| {
                            let krow = &k[(b * seq_k + j) * hd + h * d..][..d];
                            let dot: f64 = qrow.iter().zip(krow).map(|(&x, &y)| x as f64 * y as f64).sum();
                            let m = mask.map_or(0.0, |m| {
                                let [mb, mh, mq, _] = m.shape;
                                m.data[(((b % mb) * mh + h % mh) * mq + i % mq) * seq_k + j] as f64
                            });
                            dot * scale as f64 + m
                        })
                        .collect();
                    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let e: Vec<f64> = z.iter().map(|&x| (x - max).exp()).collect();
                    let sum: f64 = e.iter().sum();
                    for (j, &w) in e.iter().enumerate() {
                        let p = if max == f64::NEG_INFINITY { f64::NAN } else { w / sum };
                        let vrow = &v[(b * seq_k + j) * hd + h * d..][..d];
                        for (c, &x) in vrow.iter().enumerate() {
                            out[(b * seq_q + i) * hd + h * d + c] += p * x as f64;
                        }
                    }
                }
            }
        }
        out
    }

    /// Symmetric i8 of `x` with one scale: `round(x · 127 / max|x|)` (f32 arithmetic, ties to
    /// even) and `max|x| / 127`, as the int8 kernel rounds.
    fn quantize(x: impl Iterator<Item = f32> + Clone) -> (Vec<i32>, f32) {
        let m = x.clone().fold(0f32, |m, v| m.max(v.abs()));
        let f = if m > 0.0 { 127.0 / m } else { 0.0 };
        (x.map(|v| (v * f).round_ties_even().clamp(-128.0, 127.0) as i32).collect(), m / 127.0)
    }

    /// What [`super::AttnProducts::Int8`] computes, with exact `e^x` (f64): per (batch, head), Q
    /// and K rows quantized to i8 with a scale each, V columns with a scale each over the keys;
    /// scores `Σ q·k · scale_q · scale_k · scale + mask`; weights `w = round(255 e^(s - max))`;
    /// `out = Σ w · v · scale_v / Σ w` (NaN for rows masked entirely).
    ///
    /// Also returns each output's slack: how far it moves, at most, if every weight whose
    /// `255 e^(s - max)` lies within `eps` of a rounding boundary rounds the other way (what an
    /// approximate `e^x` may do).
    pub fn mha_int8(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<AttnMask<'_>>,
        dims: AttnDims,
        scale: f32,
        eps: f64,
    ) -> (Vec<f64>, Vec<f64>) {
        let AttnDims { batch, seq_q, seq_k, heads, head_dim: d } = dims;
        let hd = heads * d;
        let mut out = vec![0.0; batch * seq_q * hd];
        let mut slack = vec![0.0; batch * seq_q * hd];
        for b in 0..batch {
            for h in 0..heads {
                let row = |x: &'_ [f32], s: usize, i: usize| x[(b * s + i) * hd + h * d..][..d].to_vec();
                let keys: Vec<_> = (0..seq_k).map(|j| quantize(row(k, seq_k, j).into_iter())).collect();
                let cols: Vec<_> =
                    (0..d).map(|c| quantize((0..seq_k).map(|j| v[(b * seq_k + j) * hd + h * d + c]))).collect();
                for i in 0..seq_q {
                    let (q8, qs) = quantize(row(q, seq_q, i).into_iter());
                    let z: Vec<f64> = keys
                        .iter()
                        .enumerate()
                        .map(|(j, (k8, ks))| {
                            let dot: i64 = q8.iter().zip(k8).map(|(&x, &y)| x as i64 * y as i64).sum();
                            let m = mask.map_or(0.0, |m| {
                                let [mb, mh, mq, _] = m.shape;
                                m.data[(((b % mb) * mh + h % mh) * mq + i % mq) * seq_k + j] as f64
                            });
                            dot as f64 * (scale * ks) as f64 * qs as f64 + m
                        })
                        .collect();
                    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let exact: Vec<f64> = z.iter().map(|&x| 255.0 * (x - max).exp()).collect();
                    let w: Vec<f64> = exact.iter().map(|x| x.round()).collect();
                    let near: Vec<bool> = exact.iter().map(|x| ((x - x.floor()) - 0.5).abs() < eps).collect();
                    let flips = near.iter().filter(|&&n| n).count() as f64;
                    let sum: f64 = w.iter().sum();
                    for (c, (v8, vs)) in cols.iter().enumerate() {
                        let at = (b * seq_q + i) * hd + h * d + c;
                        let acc: f64 = w.iter().zip(v8).map(|(&w, &x)| w * x as f64).sum();
                        out[at] = if max == f64::NEG_INFINITY { f64::NAN } else { acc * *vs as f64 / sum };
                        let moved: f64 = near.iter().zip(v8).filter(|(&n, _)| n).map(|(_, &x)| x.abs() as f64).sum();
                        slack[at] = (moved * *vs as f64 + out[at].abs() * flips) / (sum - flips).max(1.0);
                    }
                }
            }
        }
        (out, slack)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::supported_tiers;
    use proptest::prelude::*;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    fn assert_close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            if w.is_nan() {
                assert!(g.is_nan(), "{what} at {i}: {g}, want NaN");
            } else {
                assert!((g as f64 - w).abs() <= 2e-5 * (1.0 + w.abs()), "{what} at {i}: {g} vs {w}");
            }
        }
    }

    #[test]
    fn one_head_by_hand() {
        // seq_q 1, seq_k 2, d 1: scores [1*1, 1*3] * scale ln(2)/2 -> [ln2/2, 3 ln2/2]
        // -> weights [1, 2] / 3; V [3, 6] -> 1 + 4 = 5.
        let dims = AttnDims { batch: 1, seq_q: 1, seq_k: 2, heads: 1, head_dim: 1 };
        let scale = std::f32::consts::LN_2 / 2.0;
        for tier in supported_tiers() {
            let mut out = [0.0];
            mha_with(tier, &[1.0], &[1.0, 3.0], &[3.0, 6.0], None, dims, scale, &mut out, Par::Seq).unwrap();
            assert!((out[0] - 5.0).abs() < 1e-5, "{tier}: {out:?}");
            // Masking key 1 with -inf leaves V[0].
            let mask = AttnMask { data: &[0.0, f32::NEG_INFINITY], shape: [1, 1, 1, 2] };
            mha_with(tier, &[1.0], &[1.0, 3.0], &[3.0, 6.0], Some(mask), dims, scale, &mut out, Par::Seq).unwrap();
            assert_eq!(out[0], 3.0, "{tier}");
            // Everything masked: NaN.
            let mask = AttnMask { data: &[f32::NEG_INFINITY; 2], shape: [1, 1, 1, 2] };
            mha_with(tier, &[1.0], &[1.0, 3.0], &[3.0, 6.0], Some(mask), dims, scale, &mut out, Par::Seq).unwrap();
            assert!(out[0].is_nan(), "{tier}");
        }
    }

    #[test]
    fn rejects_bad_shapes() {
        let dims = AttnDims { batch: 1, seq_q: 2, seq_k: 3, heads: 2, head_dim: 2 };
        let (q, kv) = (vec![0.0; 8], vec![0.0; 12]);
        let mut out = vec![0.0; 8];
        let run = |q: &[f32], kv: &[f32], mask, out: &mut [f32]| mha(q, kv, kv, mask, dims, 1.0, out, Par::Seq);
        assert!(run(&q, &kv, None, &mut out).is_ok());
        assert!(run(&q[..7], &kv, None, &mut out).is_err());
        assert!(run(&q, &kv[..11], None, &mut out).is_err());
        assert!(run(&q, &kv, None, &mut out[..7]).is_err());
        let m = [0.0; 12];
        let mask = |shape| Some(AttnMask { data: &m[..shape_len(shape)], shape });
        assert!(run(&q, &kv, mask([1, 2, 2, 3]), &mut out).is_ok());
        assert!(run(&q, &kv, mask([1, 1, 1, 3]), &mut out).is_ok());
        assert!(run(&q, &kv, mask([1, 1, 2, 2]), &mut out).is_err(), "seq_k mismatch");
        assert!(run(&q, &kv, mask([2, 1, 2, 3]), &mut out).is_err(), "batch 2 for 1");
        assert!(run(&q, &kv, mask([1, 4, 1, 3]), &mut out).is_err(), "heads 4 for 2");
        let short = Some(AttnMask { data: &m[..5], shape: [1, 1, 2, 3] });
        assert!(run(&q, &kv, short, &mut out).is_err(), "mask data too short");
        let huge = AttnDims { batch: usize::MAX, ..dims };
        assert!(mha(&q, &kv, &kv, None, huge, 1.0, &mut out, Par::Seq).is_err());
    }

    fn shape_len(s: [usize; 4]) -> usize {
        s.iter().product()
    }

    /// Every tier's f32 attention against the f64 reference on random Q, K, V and a mask of
    /// `mask_kind` (see [`test_mask`]; 0: none) broadcast where `bits` say, on `threads` threads.
    fn check_against_reference(dims: AttnDims, mask_kind: u8, bits: [bool; 3], scale: f32, threads: usize, seed: u64) {
        let AttnDims { batch, seq_q, seq_k, heads, head_dim } = dims;
        let hd = heads * head_dim;
        let q = values(batch * seq_q * hd, seed);
        let k: Vec<f32> = values(batch * seq_k * hd, seed ^ 1).iter().map(|x| x * 3.0).collect();
        let v = values(batch * seq_k * hd, seed ^ 2);
        let shape = mask_shape(bits, dims);
        let m = test_mask(shape, mask_kind, seed ^ 3);
        let mask = (mask_kind > 0).then_some(AttnMask { data: &m, shape });
        let want = reference::mha(&q, &k, &v, mask, dims, scale);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        for tier in supported_tiers() {
            let mut out = vec![0.0; want.len()];
            mha_with(tier, &q, &k, &v, mask, dims, scale, &mut out, Par::Pool(&pool)).unwrap();
            assert_close(&out, &want, tier.name());
        }
    }

    /// A mask shape broadcasting over batch, heads and query rows where `bits` say so.
    fn mask_shape(bits: [bool; 3], dims: AttnDims) -> [usize; 4] {
        let pick = |bit: bool, full: usize| if bit { full } else { 1 };
        [pick(bits[0], dims.batch), pick(bits[1], dims.heads), pick(bits[2], dims.seq_q), dims.seq_k]
    }

    /// A mask of `shape` for the property tests. Kind 1: finite offsets; 2: also `-inf` on every
    /// third key; 3: huge negatives on odd keys and the first mask row masked entirely (NaN
    /// rows). Key 0 stays open in every other row.
    fn test_mask(shape: [usize; 4], kind: u8, seed: u64) -> Vec<f32> {
        let seq_k = shape[3];
        let mut m = values(shape_len(shape), seed);
        for (i, x) in m.iter_mut().enumerate() {
            match kind {
                2 if i % seq_k % 3 == 2 => *x = f32::NEG_INFINITY,
                3 if i % seq_k % 2 == 1 => *x = -1e30,
                _ => {}
            }
        }
        if kind == 3 {
            m[..seq_k].fill(f32::NEG_INFINITY);
        }
        m
    }

    #[test]
    fn no_keys_gives_zeros() {
        let dims = AttnDims { batch: 2, seq_q: 3, seq_k: 0, heads: 2, head_dim: 4 };
        let mut out = vec![1.0; 2 * 3 * 8];
        mha(&[1.0; 48], &[], &[], None, dims, 1.0, &mut out, Par::Seq).unwrap();
        assert!(out.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn minilm_shape_matches_reference_and_threads_agree() {
        let dims = AttnDims { batch: 2, seq_q: 128, seq_k: 128, heads: 12, head_dim: 32 };
        let n = 2 * 128 * 384;
        let (q, k, v) = (values(n, 1), values(n, 2), values(n, 3));
        // BERT-style padding mask [batch, 1, 1, seq_k]: batch 1 has its last 28 keys masked.
        let mut m = vec![0.0f32; 2 * 128];
        m[128 + 100..].fill(-3.4e38);
        let mask = Some(AttnMask { data: &m, shape: [2, 1, 1, 128] });
        let want = reference::mha(&q, &k, &v, mask, dims, 0.176_776_7);
        for tier in supported_tiers() {
            let mut seq = vec![0.0; n];
            mha_with(tier, &q, &k, &v, mask, dims, 0.176_776_7, &mut seq, Par::Seq).unwrap();
            assert_close(&seq, &want, tier.name());
            let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            let mut par = vec![0.0; n];
            mha_with(tier, &q, &k, &v, mask, dims, 0.176_776_7, &mut par, Par::Pool(&pool)).unwrap();
            assert_eq!(seq, par, "{tier}: threads change the result");
        }
    }

    #[test]
    fn trailing_padding_is_skipped_exactly() {
        // Padding masks ([batch, 1, 1, seq_k]) whose trailing masked runs the kernels leave
        // out: none, one key, a run crossing a vector boundary, all keys but the first.
        let dims = AttnDims { batch: 4, seq_q: 9, seq_k: 40, heads: 3, head_dim: 16 };
        let n = 4 * 9 * 48;
        let kv = 4 * 40 * 48;
        let (q, k, v) = (values(n, 11), values(kv, 12), values(kv, 13));
        for masked in [f32::NEG_INFINITY, f32::MIN, -1e30] {
            let mut m = vec![0.0f32; 4 * 40];
            for (b, live) in [40, 39, 23, 1].into_iter().enumerate() {
                m[b * 40 + live..(b + 1) * 40].fill(masked);
            }
            // A masked key inside the live run stays masked; a NaN past it is not skipped.
            m[40 + 5] = masked;
            m[3 * 40 + 30] = f32::NAN;
            let mask = Some(AttnMask { data: &m, shape: [4, 1, 1, 40] });
            let want = reference::mha(&q, &k, &v, mask, dims, 0.25);
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            for tier in supported_tiers() {
                for par in [Par::Seq, Par::Pool(&pool)] {
                    let mut out = vec![0.0; n];
                    mha_with(tier, &q, &k, &v, mask, dims, 0.25, &mut out, par).unwrap();
                    assert_close(&out, &want, &format!("{tier} {par:?} masked by {masked}"));
                }
            }
            // int8 products (AMX tiles, which skip the padding too): as the scheme's reference
            // states them, running every key.
            #[cfg(target_arch = "x86_64")]
            if int8::native(CpuTier::Amx, dims.head_dim) && supported_tiers().contains(&CpuTier::Amx) {
                for threads in [1, 2] {
                    check_int8(&q, &k, &v, mask, dims, 0.25, threads);
                }
            }
            // bf16 products (on AMX tiles where granted, which skip the padding too): within
            // bf16 rounding, and NaN where the reference is.
            let rows = |data| Rows { data, ld: 48 };
            let scale = want.iter().filter(|w| w.is_finite()).fold(0.0f64, |a, w| a.max(w.abs()));
            for par in [Par::Seq, Par::Pool(&pool)] {
                let mut out = vec![0.0; n];
                let (q, k, v) = (rows(&q), rows(&k), rows(&v));
                mha_strided_as(AttnProducts::Bf16, q, k, v, mask, dims, 0.25, &mut out, par).unwrap();
                for (i, (&g, &w)) in out.iter().zip(&want).enumerate() {
                    let ok = if w.is_nan() { g.is_nan() } else { (g as f64 - w).abs() < 0.02 * scale };
                    assert!(ok, "bf16 {par:?} masked by {masked} at {i}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn bf16_products_stay_within_bf16_rounding() {
        let dims = AttnDims { batch: 2, seq_q: 128, seq_k: 128, heads: 12, head_dim: 32 };
        let n = 2 * 128 * 384;
        let (q, k, v) = (values(n, 1), values(n, 2), values(n, 3));
        let mut m = vec![0.0f32; 2 * 128];
        m[128 + 100..].fill(-3.4e38);
        let mask = Some(AttnMask { data: &m, shape: [2, 1, 1, 128] });
        let want = reference::mha(&q, &k, &v, mask, dims, 0.176_776_7);
        let rows = |data| Rows { data, ld: 384 };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        for par in [Par::Seq, Par::Pool(&pool)] {
            let mut got = vec![0.0; n];
            mha_strided_as(AttnProducts::Bf16, rows(&q), rows(&k), rows(&v), mask, dims, 0.176_776_7, &mut got, par)
                .unwrap();
            let worst = got.iter().zip(&want).map(|(&a, &b)| (a as f64 - b).abs()).fold(0.0, f64::max);
            let scale = want.iter().map(|x| x.abs()).fold(0.0, f64::max);
            // Q, K, V and P each rounded to 8 mantissa bits: a few 2^-9 relative at most.
            assert!(worst < 0.02 * scale, "{par:?}: worst {worst}, scale {scale}");
        }
    }

    #[test]
    fn fused_qkv_rows_equal_separate_projections() {
        let dims = AttnDims { batch: 2, seq_q: 50, seq_k: 50, heads: 3, head_dim: 20 };
        let (hd, rows) = (60, 100);
        let qkv = values(rows * 3 * hd, 7);
        let part =
            |p: usize| -> Vec<f32> { qkv.chunks(3 * hd).flat_map(|r| r[p * hd..(p + 1) * hd].to_vec()).collect() };
        let (q, k, v) = (part(0), part(1), part(2));
        let fused = |p: usize| Rows { data: &qkv[p * hd..], ld: 3 * hd };
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            for tier in supported_tiers() {
                let mut want = vec![0.0; rows * hd];
                mha_with(tier, &q, &k, &v, None, dims, 0.3, &mut want, Par::Pool(&pool)).unwrap();
                let mut got = vec![0.0; rows * hd];
                mha_strided_with(tier, fused(0), fused(1), fused(2), None, dims, 0.3, &mut got, Par::Pool(&pool))
                    .unwrap();
                assert_eq!(got, want, "{tier}, {threads} threads");
            }
        }
        // The last V row must fit: a buffer one value short is an error, not a read past it.
        let short = Rows { data: &qkv[2 * hd..qkv.len() - 1], ld: 3 * hd };
        let mut out = vec![0.0; rows * hd];
        assert!(mha_strided(fused(0), fused(1), short, None, dims, 0.3, &mut out, Par::Seq).is_err());
        let narrow = Rows { data: &qkv, ld: hd - 1 };
        assert!(mha_strided(narrow, fused(1), fused(2), None, dims, 0.3, &mut out, Par::Seq).is_err());
    }

    /// `x` rounded to bf16.
    fn bf16(x: f32) -> f32 {
        crate::gemm::bf16::bf16_to_f32(crate::gemm::bf16::round_bf16_bits(x))
    }

    /// The bf16 path of `tier` against the f64 reference on its rounded operands: Q, V and K
    /// rounded (the AMX path; the GEMM path rounds `scale * K`). What remains is P's rounding,
    /// at most 2^-9 of each weight, so at most 2^-9 of max |V| per output.
    #[allow(clippy::too_many_arguments)]
    fn check_bf16(
        tier: CpuTier,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<AttnMask<'_>>,
        dims: AttnDims,
        scale: f32,
        threads: usize,
    ) {
        let round = |x: &[f32], f: f32| -> Vec<f32> { x.iter().map(|&x| bf16(x * f)).collect() };
        let want = if amx::usable(tier) {
            reference::mha(&round(q, 1.0), &round(k, 1.0), &round(v, 1.0), mask, dims, scale)
        } else {
            reference::mha(&round(q, 1.0), &round(k, scale), &round(v, 1.0), mask, dims, 1.0)
        };
        let hd = dims.heads * dims.head_dim;
        let rows = |data| Rows { data, ld: hd };
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut got = vec![0.0; want.len()];
        mha_strided_as_with(
            tier,
            AttnProducts::Bf16,
            rows(q),
            rows(k),
            rows(v),
            mask,
            dims,
            scale,
            &mut got,
            Par::Pool(&pool),
        )
        .unwrap();
        let vmax = v.iter().fold(0.0f64, |m, &x| m.max(x.abs() as f64));
        for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if w.is_nan() {
                assert!(g.is_nan(), "{tier} {dims:?} at {i}: {g}, want NaN");
            } else {
                let tol = 4e-3 * vmax + 1e-5 * w.abs() + 1e-6;
                assert!((g as f64 - w).abs() <= tol, "{tier} {dims:?} at {i}: {g} vs {w}");
            }
        }
    }

    /// Operands of the reduced-precision property tests: K three times Q's range (as trained
    /// projections give); mask kind 1 has finite offsets and -inf on every third key, kind 2
    /// also masks the first query row (or, with one mask row for all queries, every row)
    /// entirely: NaN.
    struct Case {
        q: Vec<f32>,
        k: Vec<f32>,
        v: Vec<f32>,
        m: Vec<f32>,
        shape: [usize; 4],
        masked: bool,
    }

    impl Case {
        fn new(dims: AttnDims, mask_kind: u8, per_query_mask: bool, seed: u64) -> Self {
            let AttnDims { batch, seq_q, seq_k, heads, head_dim } = dims;
            let hd = heads * head_dim;
            let shape = [batch, 1, if per_query_mask { seq_q } else { 1 }, seq_k];
            let mut m = values(shape_len(shape), seed ^ 3);
            for (i, x) in m.iter_mut().enumerate() {
                if i % seq_k % 3 == 2 {
                    *x = f32::NEG_INFINITY;
                }
            }
            if mask_kind == 2 {
                m[..seq_k].fill(f32::NEG_INFINITY);
            }
            Case {
                q: values(batch * seq_q * hd, seed),
                k: values(batch * seq_k * hd, seed ^ 1).iter().map(|x| x * 3.0).collect(),
                v: values(batch * seq_k * hd, seed ^ 2),
                m,
                shape,
                masked: mask_kind > 0,
            }
        }

        fn mask(&self) -> Option<AttnMask<'_>> {
            self.masked.then_some(AttnMask { data: &self.m, shape: self.shape })
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn bf16_matches_rounded_reference(
            (batch, seq_q, seq_k, heads, head_dim) in (1usize..3, 1usize..80, 1usize..80, 1usize..4, 1usize..80),
            mask_kind in 0u8..3,
            per_query_mask: bool,
            threads in 1usize..4,
            seed in any::<u64>(),
        ) {
            let dims = AttnDims { batch, seq_q, seq_k, heads, head_dim };
            let c = Case::new(dims, mask_kind, per_query_mask, seed);
            let scale = 1.0 / (head_dim as f32).sqrt();
            for tier in supported_tiers() {
                check_bf16(tier, &c.q, &c.k, &c.v, c.mask(), dims, scale, threads);
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bert_shapes_take_the_register_blocked_path() {
        let job = |tier, bf16, seq_k, head_dim| {
            let rows = Rows { data: &[], ld: 0 };
            let dims = AttnDims { batch: 1, seq_q: 4, seq_k, heads: 1, head_dim };
            Job { tier, bf16, q: rows, k: rows, v: rows, mask: None, dims, scale: 1.0, hd: head_dim }
        };
        for tier in [CpuTier::Avx512, CpuTier::Amx] {
            assert!(avx512::usable(&job(tier, false, 128, 32)));
            assert!(avx512::usable(&job(tier, false, 1, 64)));
            assert!(!avx512::usable(&job(tier, true, 128, 32)), "bf16 products");
            assert!(!avx512::usable(&job(tier, false, 129, 32)), "more keys than registers");
            assert!(!avx512::usable(&job(tier, false, 128, 40)), "head_dim not a multiple of 16");
            assert!(!avx512::usable(&job(tier, false, 128, 80)), "head_dim above 64");
        }
        assert!(!avx512::usable(&job(CpuTier::Avx2, false, 128, 32)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The shapes of the AVX-512 register-blocked path (heads of 16-64 values, up to 128
        /// keys) and just past its key limit, with every kind of mask.
        #[test]
        fn bert_shapes_match_reference(
            (batch, seq_q, seq_k, heads) in (1usize..3, 1usize..60, 1usize..140, 1usize..3),
            head_dim in prop::sample::select(vec![16usize, 32, 48, 64]),
            mask_kind in 0u8..4,
            bits in any::<[bool; 3]>(),
            threads in 1usize..4,
            seed in any::<u64>(),
        ) {
            let dims = AttnDims { batch, seq_q, seq_k, heads, head_dim };
            check_against_reference(dims, mask_kind, bits, 1.0 / (head_dim as f32).sqrt(), threads, seed);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn matches_reference(
            (batch, seq_q, seq_k, heads, head_dim) in (1usize..3, 1usize..70, 1usize..70, 1usize..4, 1usize..70),
            mask_kind in 0u8..4,
            bits in any::<[bool; 3]>(),
            scale in 0.05f32..1.5,
            threads in 1usize..4,
            seed in any::<u64>(),
        ) {
            let dims = AttnDims { batch, seq_q, seq_k, heads, head_dim };
            check_against_reference(dims, mask_kind, bits, scale, threads, seed);
        }
    }

    /// MiniLM-like operands (K three times Q's range, as trained projections give): the int8
    /// reference against exact attention. Q, K and V lose ~0.4% to their i8 steps and weights
    /// below 1/510 of a row's largest vanish, which stays within 2% of V's range per output.
    #[test]
    fn int8_reference_stays_within_quantization_error() {
        let dims = AttnDims { batch: 2, seq_q: 40, seq_k: 128, heads: 2, head_dim: 32 };
        let hd = dims.heads * dims.head_dim;
        let q = values(dims.batch * dims.seq_q * hd, 7);
        let k: Vec<f32> = values(dims.batch * dims.seq_k * hd, 8).iter().map(|x| x * 3.0).collect();
        let v = values(dims.batch * dims.seq_k * hd, 9);
        let m: Vec<f32> =
            (0..dims.batch * dims.seq_k).map(|i| if i % 128 >= 120 { f32::NEG_INFINITY } else { 0.0 }).collect();
        let mask = Some(AttnMask { data: &m, shape: [dims.batch, 1, 1, dims.seq_k] });
        let scale = 1.0 / (dims.head_dim as f32).sqrt();
        let exact = reference::mha(&q, &k, &v, mask, dims, scale);
        let (int8, _) = reference::mha_int8(&q, &k, &v, mask, dims, scale, 0.0);
        let err: Vec<f64> = exact.iter().zip(&int8).map(|(a, b)| (a - b).abs()).collect();
        let max = err.iter().cloned().fold(0.0, f64::max);
        let mean = err.iter().sum::<f64>() / err.len() as f64;
        assert!(max < 0.02 && mean < 0.003, "max {max}, mean {mean}");
        assert!(max > 1e-4, "quantization must show: max {max}");
    }

    #[cfg(target_arch = "x86_64")]
    fn check_int8(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        mask: Option<AttnMask<'_>>,
        dims: AttnDims,
        scale: f32,
        threads: usize,
    ) {
        let rows = |data| Rows { data, ld: dims.heads * dims.head_dim };
        // The kernel's e^x is within 4.3e-5 relative (0.011 of a u8 step), its scores within f32
        // rounding of the reference's.
        let (want, slack) = reference::mha_int8(q, k, v, mask, dims, scale, 0.02);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut got = vec![0.0; want.len()];
        run(CpuTier::Amx, AttnProducts::Int8, rows(q), rows(k), rows(v), mask, dims, scale, &mut got, Par::Pool(&pool))
            .unwrap();
        for (i, ((&g, &w), &s)) in got.iter().zip(&want).zip(&slack).enumerate() {
            if w.is_nan() {
                assert!(g.is_nan(), "{dims:?} at {i}: {g}, want NaN");
            } else {
                let tol = s + 1e-5 * (1.0 + w.abs());
                assert!((g as f64 - w).abs() <= tol, "{dims:?} at {i}: {g} vs {w} (slack {s})");
            }
        }
    }

    #[cfg(target_arch = "x86_64")]
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// The AMX kernel against its reference: keys across the 64-key steps, every head size
        /// it takes, every kind of mask (kind 2 masks whole rows: NaN).
        #[test]
        fn int8_matches_its_reference(
            (batch, seq_q, seq_k, heads) in (1usize..3, 1usize..70, 1usize..150, 1usize..3),
            head_dim in prop::sample::select(vec![16usize, 32, 48, 64]),
            mask_kind in 0u8..3,
            per_query_mask: bool,
            threads in 1usize..4,
            seed in any::<u64>(),
        ) {
            if !int8::native(CpuTier::Amx, head_dim) || !supported_tiers().contains(&CpuTier::Amx) {
                return Ok(());
            }
            let dims = AttnDims { batch, seq_q, seq_k, heads, head_dim };
            let c = Case::new(dims, mask_kind, per_query_mask, seed);
            check_int8(&c.q, &c.k, &c.v, c.mask(), dims, 1.0 / (head_dim as f32).sqrt(), threads);
        }
    }

    /// Off AMX (or at a head size the tiles do not take) an int8 request runs the f32 kernels.
    #[test]
    fn int8_request_falls_back_to_f32() {
        let dims = AttnDims { batch: 1, seq_q: 5, seq_k: 7, heads: 2, head_dim: 8 };
        let q = values(5 * 16, 1);
        let k = values(7 * 16, 2);
        let v = values(7 * 16, 3);
        let rows = |data| Rows { data, ld: 16 };
        let mut got = vec![0.0; 5 * 16];
        mha_strided_as(AttnProducts::Int8, rows(&q), rows(&k), rows(&v), None, dims, 0.3, &mut got, Par::Seq).unwrap();
        assert!(!int8_native(8));
        assert_close(&got, &reference::mha(&q, &k, &v, None, dims, 0.3), "fallback");
    }
}

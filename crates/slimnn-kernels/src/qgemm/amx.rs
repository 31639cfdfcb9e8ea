//! AMX-INT8 blocks of the integer GEMM: `tdpbusd` on 16-row x 64-byte tiles, a 32 x 32 block
//! of C in four accumulator tiles, finished with AVX-512 (zero-point correction, scales, bias,
//! activation, residual, requantization) from a tile store in L1.
//!
//! B is the [`PackedQB`] layout with NR = 32 and its groups padded to whole 64-byte K blocks:
//! 16 groups of one 32-column panel are two B tiles side by side (row stride 128 bytes), so
//! the packing needs no AMX-specific order. A is read in place when its rows are long, else
//! copied tile after tile (each 16 x 64-byte tile 1 KB in a row) once per block of rows.

use super::driver::Out;
use super::{PackedQB, QEpilogue};
use crate::gemm::Activation;
use std::cell::Cell;
use std::ops::Range;

/// Rows and columns of the C block.
pub(super) const MR: usize = 32;
pub(super) const NR: usize = 32;
/// Bytes of K per tile step (16 groups of 4).
pub(super) const KB: usize = 64;

/// Bytes of one K step of a packed row tile: 32 rows of 64 bytes.
const TILE_PAIR: usize = MR * KB;

/// A blocks with at most this many K steps per row are packed (see `run_block`).
const PACK_MAX_STEPS: usize = 12;

/// Rows of A kept in L2 while B panels stream past them (as the VNNI path does).
const A_BLOCK_BYTES: usize = 256 << 10;

/// One operand-set of a blocked run.
pub(super) struct Job<'a> {
    pub a: &'a [u8],
    pub lda: usize,
    pub b: &'a PackedQB,
    pub out: Out,
    pub ldc: usize,
    pub ep: &'a QEpilogue<'a>,
}

// SAFETY: tasks read A, B and the epilogue operands (shared borrows outliving the tasks) and
// write disjoint (row range x panel range) blocks of the output through `out`.
unsafe impl Sync for Job<'_> {}

/// The 32 x 32 i32 block as the tiles store it (row stride 128 bytes).
#[repr(C, align(64))]
struct Block([i32; MR * NR]);

/// Runs rows `rows` x panels `panels` of the job.
///
/// # Safety
/// The buffers must be valid for the job's dimensions (as `qgemm` checks), no other task may
/// write this block, and the host must have AMX-INT8 granted and AVX-512 F/BW/VL/DQ.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
pub(super) unsafe fn run_block(job: &Job, rows: Range<usize>, panels: Range<usize>) {
    let k = job.b.k;
    let packed = !k.is_multiple_of(KB) || k.div_ceil(KB) <= PACK_MAX_STEPS;
    // A light epilogue is finished a share per K step of the next block, while the tile unit
    // multiplies (at K = 384 it took as long as the products when it ran after them). A GELU's
    // share holds the next step's tile loads back: those blocks are finished after their
    // products, in one assembly block each.
    let interleave = matches!(job.ep.activation, Activation::None | Activation::Relu | Activation::Clip { .. });
    match (packed, interleave) {
        (true, true) => run_block_with::<true, true>(job, rows, panels),
        (true, false) => run_block_with::<true, false>(job, rows, panels),
        (false, true) => run_block_with::<false, true>(job, rows, panels),
        (false, false) => run_block_with::<false, false>(job, rows, panels),
    }
}

/// [`run_block`] with A packed (`PACKED`) or read in place, and the epilogue interleaved with
/// the next block's steps (`INTERLEAVE`) or not, chosen at compile time: a choice made per tile
/// left fewer registers to the epilogue, and the packed path lost its gain.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
unsafe fn run_block_with<const PACKED: bool, const INTERLEAVE: bool>(
    job: &Job,
    rows: Range<usize>,
    panels: Range<usize>,
) {
    let b = job.b;
    let k = b.k;
    let kb = k.div_ceil(KB);
    let kpad = kb * KB;
    let block = (A_BLOCK_BYTES / kpad.max(1)).max(MR) / MR * MR;
    // Rows of many K steps are read in place (rows `lda` apart): the hardware prefetchers
    // follow each row as a stream. Short rows end before they catch on, so those blocks are
    // packed tile after tile instead: row tile t's K step s is 32 rows x 64 bytes at
    // `(t * kb + s) * TILE_PAIR`, each tile load 1 KB in a row (`qgemm_layer`, 128 rows: K = 384
    // 10-15% faster packed, K = 1536 10% slower). Padding needs no zeros: B's padded K rows
    // are zero, and rows past `mr` are not stored.
    let mut tiles_a = TILES_A.with(Cell::take);
    if tiles_a.len() < block * kpad {
        tiles_a.resize(block * kpad, 0);
    }
    let mut za = vec![0i32; block];
    let mut sa = vec![0f32; block];
    // Two stored blocks: the tiles compute one while the core finishes the other.
    let mut acc = [Block([0; MR * NR]), Block([0; MR * NR])];
    crate::amx::configure();
    for ib in rows.clone().step_by(block) {
        let ib_end = (ib + block).min(rows.end);
        for r in ib..ib_end {
            za[r - ib] = job.ep.a_zero.at(r);
            sa[r - ib] = job.ep.a_scale.at(r);
            if PACKED {
                let (t, i) = ((r - ib) / MR, (r - ib) % MR);
                pack_row(&job.a[r * job.lda..][..k], &mut tiles_a[t * kb * TILE_PAIR + i * KB..]);
            }
        }
        let (za, sa) = (&za[..ib_end - ib], &sa[..ib_end - ib]);
        // The block stored last, waiting for its epilogue.
        let mut pending: Option<Pending> = None;
        let mut cur = 0;
        for p in panels.clone() {
            let j0 = p * NR;
            let bp = b.data.as_slice().as_ptr().add(p * b.panel_stride);
            let fin = Finish::new(job, j0);
            // The next panel is prefetched a share per row tile, so its first tile does not wait
            // on memory (a model's weights do not stay in L2 between runs).
            let next = if p + 1 < panels.end { bp.add(b.panel_stride) } else { std::ptr::null() };
            let lines = b.panel_stride / 64;
            let per_tile = lines.div_ceil((ib_end - ib).div_ceil(MR));
            let mut line = 0;
            let mut ir = ib;
            while ir < ib_end {
                let mr = MR.min(ib_end - ir);
                if !next.is_null() {
                    for l in line..(line + per_tile).min(lines) {
                        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T1};
                        _mm_prefetch::<_MM_HINT_T1>(next.add(l * 64) as *const i8);
                    }
                    line += per_tile;
                }
                let (a, lda, astep) = if PACKED {
                    (tiles_a.as_ptr().add((ir - ib) / MR * kb * TILE_PAIR), KB, TILE_PAIR)
                } else if mr == MR || mr == MR / 2 {
                    (job.a.as_ptr().add(ir * job.lda), job.lda, KB)
                } else {
                    // A partial row tile: the tiles read 16 or 32 whole rows.
                    for i in 0..mr {
                        tiles_a[i * k..][..k].copy_from_slice(&job.a[(ir + i) * job.lda..][..k]);
                    }
                    (tiles_a.as_ptr(), k, KB)
                };
                let two_row_tiles = mr > MR / 2;
                let c = acc[cur].0.as_mut_ptr().cast();
                if !INTERLEAVE {
                    // One assembly block (zero, loop, store) when nothing runs between steps:
                    // 5-8% faster than a block per step at K = 384.
                    if two_row_tiles {
                        crate::amx::int8_block_2x2(kb, a, lda, astep, bp, STRIDE, c, STRIDE);
                    } else {
                        crate::amx::int8_block_1x2(kb, a, lda, astep, bp, STRIDE, c, STRIDE);
                    }
                    fin.rows(job, &acc[cur], ir, 0..mr, &za[ir - ib..], &sa[ir - ib..]);
                    ir += mr;
                    continue;
                }
                crate::amx::zero_acc();
                let share = pending.as_ref().map_or(0, |d| d.mr.div_ceil(kb.max(1)));
                for s in 0..kb {
                    let (a, b) = (a.add(s * astep), bp.add(s * 16 * STRIDE));
                    if two_row_tiles {
                        crate::amx::int8_step_2x2(a, lda, b, STRIDE);
                    } else {
                        crate::amx::int8_step_1x2(a, lda, b, STRIDE);
                    }
                    if let Some(d) = &pending {
                        let part = (s * share).min(d.mr)..((s + 1) * share).min(d.mr);
                        d.fin.rows(job, &acc[d.buf], d.ir, part, &za[d.ir - ib..], &sa[d.ir - ib..]);
                    }
                }
                if kb == 0 {
                    if let Some(d) = pending.take() {
                        d.fin.rows(job, &acc[d.buf], d.ir, 0..d.mr, &za[d.ir - ib..], &sa[d.ir - ib..]);
                    }
                }
                if two_row_tiles {
                    crate::amx::store_2x2(c, STRIDE);
                } else {
                    crate::amx::store_1x2(c, STRIDE);
                }
                pending = Some(Pending { fin: fin.clone(), ir, mr, buf: cur });
                cur ^= 1;
                ir += mr;
            }
        }
        if let Some(d) = pending.take() {
            d.fin.rows(job, &acc[d.buf], d.ir, 0..d.mr, &za[d.ir - ib..], &sa[d.ir - ib..]);
        }
    }
    crate::amx::release();
    TILES_A.with(|c| c.set(tiles_a));
}

/// A stored block waiting for its epilogue: rows `ir..ir + mr` of the panel `fin` finishes,
/// in `acc[buf]`.
#[cfg(target_arch = "x86_64")]
struct Pending {
    fin: Finish,
    ir: usize,
    mr: usize,
    buf: usize,
}

/// One row of A into its packed row tile (`dst` at the row's first byte of step 0).
#[inline(always)]
fn pack_row(row: &[u8], dst: &mut [u8]) {
    // Whole 64-byte steps as fixed-size copies (one vector move each, not a memcpy call).
    let whole = row.chunks_exact(KB);
    let tail = whole.remainder();
    for (s, chunk) in whole.enumerate() {
        let d: &mut [u8; KB] = (&mut dst[s * TILE_PAIR..][..KB]).try_into().unwrap();
        *d = chunk.try_into().unwrap();
    }
    if !tail.is_empty() {
        dst[(row.len() / KB) * TILE_PAIR..][..tail.len()].copy_from_slice(tail);
    }
}

thread_local! {
    /// The packed A block, reused across calls (taken out while in use).
    static TILES_A: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// Per-panel constants of the epilogue.
#[cfg(target_arch = "x86_64")]
#[derive(Clone)]
struct Finish {
    j0: usize,
    masks: [u16; 2],
    col_sums: [std::arch::x86_64::__m512i; 2],
    b_scale: [std::arch::x86_64::__m512; 2],
    bias: [std::arch::x86_64::__m512; 2],
}

#[cfg(target_arch = "x86_64")]
impl Finish {
    // No closures here: a closure does not inherit the caller's target features, and its
    // intrinsics then run as calls.
    #[inline(always)]
    unsafe fn new(job: &Job, j0: usize) -> Self {
        use std::arch::x86_64::*;
        let ep = job.ep;
        let cols = NR.min(job.b.n - j0);
        let mut f = Finish {
            j0,
            masks: [0; 2],
            col_sums: [_mm512_setzero_si512(); 2],
            b_scale: [_mm512_setzero_ps(); 2],
            bias: [_mm512_setzero_ps(); 2],
        };
        for v in 0..2 {
            let c = cols.saturating_sub(v * 16).min(16);
            let mask = ((1u32 << c) - 1) as u16;
            let j = j0 + v * 16;
            f.masks[v] = mask;
            f.col_sums[v] = _mm512_maskz_loadu_epi32(mask, job.b.col_sums.as_ptr().add(j) as *const _);
            f.b_scale[v] = match ep.b_scale.len() {
                1 => _mm512_set1_ps(ep.b_scale[0]),
                _ => _mm512_maskz_loadu_ps(mask, ep.b_scale.as_ptr().add(j)),
            };
            if let Some(bias) = ep.bias {
                f.bias[v] = _mm512_maskz_loadu_ps(mask, bias.as_ptr().add(j));
            }
        }
        f
    }

    /// Finishes rows `part` of the block of rows from `ir` in `acc`; `za` / `sa` start at row
    /// `ir`. Both halves of a row are computed together and every choice (output, activation,
    /// residual) is made once per row: this runs between tile steps, where a long stretch of
    /// vector work holds back the next step's tile loads.
    #[inline(always)]
    unsafe fn rows(&self, job: &Job, acc: &Block, ir: usize, part: Range<usize>, za: &[i32], sa: &[f32]) {
        use std::arch::x86_64::*;
        let ep = job.ep;
        let (za, sa) = (&za[part.clone()], &sa[part.clone()]);
        for (i, (&z, &s)) in part.zip(za.iter().zip(sa)) {
            let at = (ir + i) * job.ldc + self.j0;
            let row = acc.0.as_ptr().add(i * NR);
            let zav = _mm512_set1_epi32(z);
            let x0 = _mm512_load_si512(row as *const _);
            let x1 = _mm512_load_si512(row.add(16) as *const _);
            let x0 = _mm512_sub_epi32(x0, _mm512_mullo_epi32(zav, self.col_sums[0]));
            let x1 = _mm512_sub_epi32(x1, _mm512_mullo_epi32(zav, self.col_sums[1]));
            let [m0, m1] = self.masks;
            if let Out::I32(c) = job.out {
                _mm512_mask_storeu_epi32(c.add(at) as *mut _, m0, x0);
                _mm512_mask_storeu_epi32(c.add(at + 16) as *mut _, m1, x1);
                continue;
            }
            // Multiply, then add: the graph's own order (Cast, Mul, Add), as the reference.
            let sav = _mm512_set1_ps(s);
            let mut y0 = _mm512_mul_ps(_mm512_cvtepi32_ps(x0), _mm512_mul_ps(sav, self.b_scale[0]));
            let mut y1 = _mm512_mul_ps(_mm512_cvtepi32_ps(x1), _mm512_mul_ps(sav, self.b_scale[1]));
            if let Some(o) = ep.outliers {
                let (xr, wr, n) = (o.x.as_ptr().add((ir + i) * o.ld), o.w.as_ptr().add(self.j0), job.b.n);
                for t in 0..o.k {
                    let xv = _mm512_set1_ps(*xr.add(t));
                    y0 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m0, wr.add(t * n)), y0);
                    y1 = _mm512_fmadd_ps(xv, _mm512_maskz_loadu_ps(m1, wr.add(t * n + 16)), y1);
                }
            }
            let (y0, y1) = (_mm512_add_ps(y0, self.bias[0]), _mm512_add_ps(y1, self.bias[1]));
            let (mut y0, mut y1) = match ep.activation {
                Activation::None => (y0, y1),
                act => (crate::math::activate(y0, act), crate::math::activate(y1, act)),
            };
            if let Some(res) = ep.residual {
                let r = res.data.as_ptr().add((ir + i) * res.ld + self.j0);
                y0 = _mm512_add_ps(y0, _mm512_maskz_loadu_ps(m0, r));
                y1 = _mm512_add_ps(y1, _mm512_maskz_loadu_ps(m1, r.add(16)));
            }
            match job.out {
                Out::F32(c) => {
                    _mm512_mask_storeu_ps(c.add(at), m0, y0);
                    _mm512_mask_storeu_ps(c.add(at + 16), m1, y1);
                }
                Out::U8(c, scale, zero) => {
                    for (v, y, m) in [(0, y0, m0), (16, y1, m1)] {
                        let q = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                            _mm512_div_ps(y, _mm512_set1_ps(scale)),
                        );
                        // max first: a NaN becomes 0, as the reference's saturating cast.
                        let q = _mm512_max_ps(_mm512_add_ps(q, _mm512_set1_ps(zero as f32)), _mm512_setzero_ps());
                        let q = _mm512_cvtps_epi32(_mm512_min_ps(q, _mm512_set1_ps(255.0)));
                        _mm512_mask_cvtusepi32_storeu_epi8(c.add(at + v) as *mut _, m, q);
                    }
                }
                Out::I32(_) => {}
            }
        }
    }
}

/// Row stride of a packed panel's B tiles and of a stored C block, bytes.
const STRIDE: usize = 128;

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::super::{qgemm, PackedQB, QEpilogue, QKernel, QOutput};
    use crate::gemm::Par;
    use std::time::Instant;

    /// `tdpbusd` throughput with operands in tiles (four independent accumulators), GOP/s.
    fn register_peak(iters: usize) -> f64 {
        let a = [1u8; 1024];
        // SAFETY: AMX-INT8 is granted (the caller checked); the loads read 1 KB buffers.
        let t = Instant::now();
        unsafe {
            crate::amx::configure();
            std::arch::asm!(
                "tileloadd tmm4, [{a} + {s}*1]",
                "tileloadd tmm5, [{a} + {s}*1]",
                "tileloadd tmm6, [{a} + {s}*1]",
                "tileloadd tmm7, [{a} + {s}*1]",
                "2:",
                "tdpbusd tmm0, tmm4, tmm6",
                "tdpbusd tmm1, tmm4, tmm7",
                "tdpbusd tmm2, tmm5, tmm6",
                "tdpbusd tmm3, tmm5, tmm7",
                "dec {n}",
                "jnz 2b",
                a = in(reg) a.as_ptr(),
                s = in(reg) 64usize,
                n = inout(reg) iters => _,
                options(nostack),
            );
            crate::amx::release();
        }
        iters as f64 * 4.0 * 16.0 * 16.0 * 64.0 * 2.0 / t.elapsed().as_secs_f64() / 1e9
    }

    /// The 2 x 2 step with its four tile loads (two A, two B tiles, 4 KB) walking a buffer of
    /// `span` bytes (4 KB: L1; 256 KB: L2), GOP/s.
    fn step_with_loads(iters: usize, span: usize) -> f64 {
        let buf = vec![1u8; span + 64];
        let base = buf.as_ptr().wrapping_add(buf.as_ptr().align_offset(64));
        // SAFETY: as `register_peak`; the loads stay inside `buf` (offsets below `span`).
        let t = Instant::now();
        unsafe {
            crate::amx::configure();
            std::arch::asm!(
                "2:",
                "lea {a}, [{base} + {o}]",
                "tileloadd tmm4, [{a} + {s}*1]",
                "tileloadd tmm6, [{a} + {s}*1 + 1024]",
                "tileloadd tmm7, [{a} + {s}*1 + 2048]",
                "tileloadd tmm5, [{a} + {s}*1 + 3072]",
                "tdpbusd tmm0, tmm4, tmm6",
                "tdpbusd tmm1, tmm4, tmm7",
                "tdpbusd tmm2, tmm5, tmm6",
                "tdpbusd tmm3, tmm5, tmm7",
                "add {o}, 4096",
                "and {o}, {mask}",
                "dec {n}",
                "jnz 2b",
                base = in(reg) base,
                a = out(reg) _,
                o = inout(reg) 0usize => _,
                mask = in(reg) span - 1,
                s = in(reg) 64usize,
                n = inout(reg) iters => _,
                options(nostack),
            );
            crate::amx::release();
        }
        iters as f64 * 4.0 * 16.0 * 16.0 * 64.0 * 2.0 / t.elapsed().as_secs_f64() / 1e9
    }

    /// `cargo test --release -p slimnn-kernels --lib amx_speed -- --ignored --nocapture`: the
    /// register-only AMX-INT8 peak, the 2 x 2 step with its tile loads from L1 and from L2, then
    /// the GEMM (f32 output with per-channel scales and
    /// bias, weights warm) on MiniLM's shapes at 128 rows, 1 thread, best of 50.
    #[test]
    #[ignore]
    fn amx_speed() {
        if !QKernel::AmxInt8.is_supported() {
            eprintln!("no AMX-INT8 here");
            return;
        }
        let peak = (0..5).map(|_| register_peak(2_000_000)).fold(0.0, f64::max);
        eprintln!("AMX-INT8 tdpbusd, operands in tiles: {peak:.0} GOP/s");
        for (span, place) in [(4096, "L1"), (256 << 10, "L2")] {
            let gops = (0..5).map(|_| step_with_loads(1_000_000, span)).fold(0.0, f64::max);
            let pct = 100.0 * gops / peak;
            eprintln!("2 x 2 step loading its 4 tiles from {place}: {gops:.0} GOP/s ({pct:.0}% of the peak)");
        }
        for (m, k, n) in [(128, 384, 1152), (128, 384, 384), (128, 384, 1536), (128, 1536, 384), (128, 768, 3072)] {
            let a: Vec<u8> = (0..m * k).map(|i| (i * 7 % 251) as u8).collect();
            let b: Vec<i8> = (0..k * n).map(|i| (i * 13 % 255) as u8 as i8).collect();
            let scales = vec![0.01f32; n];
            let bias = vec![0.5f32; n];
            let mut out = vec![0f32; m * n];
            let ep = QEpilogue::new(0.02, 117, &scales).with_bias(&bias);
            for kernel in [QKernel::Avx512Vnni, QKernel::AmxInt8] {
                let p = PackedQB::with_kernel(kernel, &b, k, n, n, false).unwrap();
                let mut best = f64::MAX;
                for _ in 0..50 {
                    let t = Instant::now();
                    qgemm(m, &a, k, &p, QOutput::F32 { c: &mut out, ldc: n }, &ep, Par::Seq).unwrap();
                    best = best.min(t.elapsed().as_secs_f64());
                }
                let gops = 2.0 * (m * k * n) as f64 / best / 1e9;
                let pct = 100.0 * gops / peak;
                eprintln!("{m}x{k}x{n} {kernel}: {:.1} us, {gops:.0} GOP/s ({pct:.0}% of the AMX peak)", best * 1e6);
            }
        }
    }
}

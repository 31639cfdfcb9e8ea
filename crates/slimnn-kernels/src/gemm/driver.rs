//! Cache blocking, edge tiles and the split over threads.

use super::kernels::{Generic, Prefetch, TileEpilogue, TileKernel};
use super::pack::AlignedVec;
use super::{bf16, bf16x6, Epilogue, PackedB, Par};
use std::cell::Cell;
use std::ops::Range;

/// Below this many flops per task, threads cost more than they save.
const MIN_FLOPS_PER_TASK: usize = 1 << 21;

/// One validated GEMM, as raw pointers so tasks on several threads can write disjoint tiles.
struct Job {
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    panel_stride: usize,
    /// B unpacked (row-major, row stride `ldb`), or null when `b` is packed: each `KC x NR`
    /// block is then packed just before the tiles that use it, into a buffer that stays in
    /// L1/L2, instead of the whole of B making a round trip through memory first.
    raw_b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    bias: *const f32,
    row_bias: *const f32,
    act: super::Activation,
    res: *const f32,
    res_ld: usize,
    accumulate: bool,
    store_only: bool,
}

/// Where a job's tiles read B.
enum BSource<'a> {
    Packed(&'a PackedB),
    /// Row-major `k x n` at row stride `ldb`, packed block by block as it is used.
    Rows(&'a [f32], usize),
}

impl Job {
    /// A GEMM over `k` rows of B (f32 values, or bf16 pair slots of a packed B with `a` converted
    /// to match).
    fn new(
        (m, k, n): (usize, usize, usize),
        a: *const f32,
        lda: usize,
        b: BSource<'_>,
        c: &mut [f32],
        ldc: usize,
        ep: &Epilogue<'_>,
    ) -> Job {
        let (bp, panel_stride, raw_b, ldb) = match b {
            BSource::Packed(p) => (p.data().as_ptr(), p.panel_stride(), std::ptr::null(), 0),
            BSource::Rows(rows, ldb) => (std::ptr::null(), 0, rows.as_ptr(), ldb),
        };
        Job {
            m,
            k,
            n,
            a,
            lda,
            b: bp,
            panel_stride,
            raw_b,
            ldb,
            c: c.as_mut_ptr(),
            ldc,
            bias: ep.bias.map_or(std::ptr::null(), |s| s.as_ptr()),
            row_bias: ep.row_bias.map_or(std::ptr::null(), |s| s.as_ptr()),
            act: ep.activation,
            res: ep.residual.map_or(std::ptr::null(), |r| r.data.as_ptr()),
            res_ld: ep.residual.map_or(0, |r| r.ld),
            accumulate: ep.accumulate,
            store_only: ep.is_store_only(),
        }
    }
}

// SAFETY: a Job only hands out reads of A, B, bias and residual (never written during the
// GEMM; their borrows outlive every task) and writes to C through tasks whose row/panel ranges
// are disjoint (see `run_tasks`).
unsafe impl Sync for Job {}

/// Runs a GEMM whose arguments `gemm` has validated.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    ep: &Epilogue<'_>,
    par: Par<'_>,
) {
    let (k, n) = (b.k(), b.n());
    if m == 0 || n == 0 {
        return;
    }
    if b.is_bf16() && k > 0 {
        return run_bf16(m, a, lda, b, c, ldc, ep, par);
    }
    if b.is_bf16x6() && k > 0 {
        return run_bf16x6(m, a, lda, b, c, ldc, ep, par);
    }
    let job = Job::new((m, k, n), a.as_ptr(), lda, BSource::Packed(b), c, ldc, ep);
    run_f32(b.tier(), &job, par);
}

/// Runs an f32 job on `tier`'s kernels.
fn run_f32(tier: crate::CpuTier, job: &Job, par: Par<'_>) {
    match tier {
        #[cfg(target_arch = "x86_64")]
        crate::CpuTier::Avx512 | crate::CpuTier::Amx => run_tasks::<super::kernels::Avx512>(job, par),
        #[cfg(target_arch = "x86_64")]
        crate::CpuTier::Avx2 => run_tasks::<super::kernels::Avx2>(job, par),
        _ => run_tasks::<Generic>(job, par),
    }
}

/// Runs a GEMM with B unpacked (`k x n`, row stride `ldb`) that `sgemm` has validated, on
/// `tier`'s kernels (which the host supports).
#[allow(clippy::too_many_arguments)]
pub(super) fn run_unpacked(
    tier: crate::CpuTier,
    (m, k, n): (usize, usize, usize),
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    ep: &Epilogue<'_>,
    par: Par<'_>,
) {
    if m == 0 || n == 0 {
        return;
    }
    let job = Job::new((m, k, n), a.as_ptr(), lda, BSource::Rows(b, ldb), c, ldc, ep);
    run_f32(tier, &job, par);
}

thread_local! {
    /// Blocks of an unpacked B, packed as they are used; taken out while in use so nested
    /// calls get their own.
    static SCRATCH_PANEL: Cell<Option<AlignedVec>> = const { Cell::new(None) };
    /// A rounded to bf16 pairs, taken out while in use so nested calls get their own.
    static SCRATCH_A: Cell<Option<AlignedVec>> = const { Cell::new(None) };
}

/// A GEMM whose A is first converted into `len` slots of thread-local scratch (`convert`), then
/// run by `run` over the job of `slot_rows` slots per row of B (A's row stride).
#[allow(clippy::too_many_arguments)]
fn run_converted(
    (m, len, slot_rows): (usize, usize, usize),
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    ep: &Epilogue<'_>,
    convert: impl FnOnce(&mut [f32]),
    run: impl FnOnce(&Job),
) {
    let mut scratch = SCRATCH_A.with(Cell::take).unwrap_or_default();
    scratch.resize(len);
    convert(scratch.as_mut_slice());
    let a = scratch.as_slice().as_ptr();
    run(&Job::new((m, slot_rows, b.n()), a, slot_rows, BSource::Packed(b), c, ldc, ep));
    SCRATCH_A.with(|s| s.set(Some(scratch)));
}

/// A bf16 GEMM: A rounded to rows of bf16 pairs, then the f32 driver over `ceil(k/2)` slots.
#[allow(clippy::too_many_arguments)]
fn run_bf16(m: usize, a: &[f32], lda: usize, b: &PackedB, c: &mut [f32], ldc: usize, ep: &Epilogue<'_>, par: Par<'_>) {
    let (k, k2, tier) = (b.k(), b.slot_rows(), b.tier());
    let convert = |out: &mut [f32]| bf16::convert_a(m, k, a, lda, out, tier, par);
    run_converted((m, m * k2, k2), b, c, ldc, ep, convert, |job| match tier {
        #[cfg(target_arch = "x86_64")]
        crate::CpuTier::Amx => run_tasks::<bf16::AmxBf16>(job, par),
        #[cfg(target_arch = "x86_64")]
        crate::CpuTier::Avx512 if bf16::native_for(tier) => run_tasks::<bf16::Avx512Bf16>(job, par),
        crate::CpuTier::Avx512 => run_tasks::<bf16::ScalarBf16<8, 48>>(job, par),
        #[cfg(not(target_arch = "x86_64"))]
        crate::CpuTier::Amx => run_tasks::<bf16::ScalarBf16<8, 48>>(job, par),
        crate::CpuTier::Avx2 => run_tasks::<bf16::ScalarBf16<6, 16>>(job, par),
        crate::CpuTier::Generic => run_tasks::<bf16::ScalarBf16<4, 8>>(job, par),
    });
}

/// An f32 GEMM on bf16 parts (B packed by [`PackedB::pack_bf16x6`]): A split per call, then
/// the f32 driver over the slots, on AMX tiles where the tier has them.
#[allow(clippy::too_many_arguments)]
fn run_bf16x6(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    ep: &Epilogue<'_>,
    par: Par<'_>,
) {
    let (k, rows, tier) = (b.k(), b.slot_rows(), b.tier());
    let len = bf16x6::Layout::of(tier).a_len(m, k);
    let convert = |out: &mut [f32]| bf16x6::convert_a(m, k, a, lda, out, tier, par);
    run_converted((m, len, rows), b, c, ldc, ep, convert, |job| match tier {
        #[cfg(target_arch = "x86_64")]
        crate::CpuTier::Amx => run_tasks::<bf16x6::AmxBf16x6>(job, par),
        #[cfg(not(target_arch = "x86_64"))]
        crate::CpuTier::Amx => run_tasks::<bf16x6::ScalarBf16x6<8, 48>>(job, par),
        crate::CpuTier::Avx512 => run_tasks::<bf16x6::ScalarBf16x6<8, 48>>(job, par),
        crate::CpuTier::Avx2 => run_tasks::<bf16x6::ScalarBf16x6<6, 16>>(job, par),
        crate::CpuTier::Generic => run_tasks::<bf16x6::ScalarBf16x6<4, 8>>(job, par),
    });
}

/// Splits C into a `tm x tn` grid of tasks (rows in MR multiples, columns in whole panels)
/// and runs them.
fn run_tasks<T: TileKernel>(job: &Job, par: Par<'_>) {
    let flops = 2usize.saturating_mul(job.m).saturating_mul(job.n).saturating_mul(job.k.max(1));
    // With few rows, streaming B is the work (a classifier's 1280 x 1000 weights at batch 1:
    // 2.6 Mflop, 5 MB): a byte of B costs about what 4 flops do.
    let work = flops.max(16usize.saturating_mul(job.k).saturating_mul(job.n));
    let threads = par.threads().min(work / MIN_FLOPS_PER_TASK).max(1);
    let row_tiles = job.m.div_ceil(T::MR);
    let panels = job.n.div_ceil(T::NR);
    // Tasks that pack their own blocks of an unpacked B should not pack the same ones.
    let ties = if job.raw_b.is_null() { Ties::Rows } else { Ties::Columns };
    let (tm, tn) = grid(threads, row_tiles, panels, ties);
    let rows_per = row_tiles.div_ceil(tm) * T::MR;
    let panels_per = panels.div_ceil(tn);
    let task = move |t: usize| {
        let (ti, tj) = (t / tn, t % tn);
        let rows = (ti * rows_per).min(job.m)..((ti + 1) * rows_per).min(job.m);
        let cols = (tj * panels_per).min(panels)..((tj + 1) * panels_per).min(panels);
        if !rows.is_empty() && !cols.is_empty() {
            // SAFETY: `gemm` validated every buffer against m, k, n and the strides, and the
            // packed B's tier is supported; tasks cover disjoint (rows x panels) blocks of C.
            unsafe { run_block::<T>(job, rows, cols) }
        }
    };
    par.run_tasks(tm * tn, task);
}

/// Which way [`grid`] splits when both ways give tasks of the same size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ties {
    /// Each task writes whole rows. The row-wise ops after an activation x weight GEMM (layer
    /// norm, the next GEMM's row quantization) split rows the same way, so each thread reads
    /// rows its own core wrote: cross-core reads made int8 MiniLM at batch 1 / 2 threads 20%
    /// slower when the GEMMs split columns.
    Rows,
    /// Each task reads only its share of B: better where streaming B is the bound (weight-only
    /// GEMMs at small M) or where the next op splits columns.
    Columns,
}

/// Picks `tm x tn = threads` minimising the largest task (`row_tiles / tm` by `panels / tn`).
pub(crate) fn grid(threads: usize, row_tiles: usize, panels: usize, ties: Ties) -> (usize, usize) {
    let mut best = (1, 1);
    let mut best_cost = usize::MAX;
    for tm in (1..=threads).filter(|tm| threads.is_multiple_of(*tm)) {
        let tn = threads / tm;
        let cost = row_tiles.div_ceil(tm) * panels.div_ceil(tn);
        let wins_tie = match ties {
            Ties::Rows => tm > best.0,
            Ties::Columns => tn > best.1,
        };
        if cost < best_cost || (cost == best_cost && wins_tie) {
            best = (tm, tn);
            best_cost = cost;
        }
    }
    best
}

/// A stack tile for partial-width panels.
#[repr(C, align(64))]
struct ScratchTile([f32; 1536]);

/// Computes C rows `rows` x panels `panels`.
///
/// # Safety
/// The job's buffers must be valid for its dimensions (as `gemm` validates), `T` supported by
/// the host, and no other thread may touch this block of C meanwhile.
unsafe fn run_block<T: TileKernel>(job: &Job, rows: Range<usize>, panels: Range<usize>) {
    const { assert!(T::MR * T::NR <= 1536 && T::MC % T::MR == 0) };
    let mut scratch = ScratchTile([0.0; 1536]);
    if job.k == 0 {
        return empty_k::<T>(job, rows, panels);
    }
    let null_or = |p: *const f32, off: usize| if p.is_null() { p } else { p.add(off) };
    let unpacked = !job.raw_b.is_null();
    let mut panel = AlignedVec::default();
    if unpacked {
        panel = SCRATCH_PANEL.with(Cell::take).unwrap_or_default();
        panel.resize(T::KC * T::NR);
    }
    // Packing as it goes, every row of the task uses a block before the next is packed, so
    // each is packed once.
    let mc = if unpacked { rows.len().max(1) } else { T::MC };
    for ic in rows.clone().step_by(mc) {
        let ic_end = (ic + mc).min(rows.end);
        for jc in panels.clone().step_by(T::NC_PANELS) {
            let jc_end = (jc + T::NC_PANELS).min(panels.end);
            for pc in (0..job.k).step_by(T::KC) {
                let kc = T::KC.min(job.k - pc);
                let load_c = pc > 0 || job.accumulate;
                let last = pc + kc == job.k;
                for jr in jc..jc_end {
                    let col0 = jr * T::NR;
                    let cols = T::NR.min(job.n - col0);
                    let bp = if unpacked {
                        pack_block(job, pc, kc, col0, cols, T::NR, panel.as_mut_slice());
                        panel.as_slice().as_ptr()
                    } else {
                        job.b.add(jr * job.panel_stride + pc * T::NR)
                    };
                    // The B block used after this one (and its depth), pulled into L2 by the
                    // tiles that use this one.
                    let (next, next_kc) = if unpacked {
                        (bp, 0)
                    } else if jr + 1 < jc_end {
                        (job.b.add((jr + 1) * job.panel_stride + pc * T::NR), kc)
                    } else if pc + kc < job.k {
                        (job.b.add(jc * job.panel_stride + (pc + kc) * T::NR), T::KC.min(job.k - pc - kc))
                    } else if jc_end < panels.end {
                        (job.b.add(jc_end * job.panel_stride), T::KC.min(job.k))
                    } else {
                        (bp, 0)
                    };
                    let next_lines = next_kc * T::NR / 16;
                    let per_tile = lines_per_tile(next_lines, (ic_end - ic).div_ceil(T::MR), kc);
                    let mut ir = ic;
                    let mut first_line = 0;
                    while ir < ic_end {
                        let mr = T::MR.min(ic_end - ir);
                        let pf = if first_line < next_lines {
                            Prefetch {
                                at: next.wrapping_add(first_line * 16),
                                lines: per_tile.min(next_lines - first_line),
                            }
                        } else {
                            Prefetch { at: bp, lines: 0 }
                        };
                        first_line += per_tile;
                        let ap = job.a.add(ir * job.lda + pc * T::A_DEPTH_SCALE);
                        let cp = job.c.add(ir * job.ldc + col0);
                        // Edge panels compute only the vectors that hold valid columns.
                        let width = cols.div_ceil(T::LANES) * T::LANES;
                        let ep = TileEpilogue {
                            bias: null_or(job.bias, col0),
                            row_bias: null_or(job.row_bias, ir),
                            act: job.act,
                            res: null_or(job.res, ir * job.res_ld + col0),
                            res_ld: job.res_ld,
                        };
                        let finish = last && !job.store_only;
                        if width == cols {
                            let ep_ptr: *const TileEpilogue = if finish { &ep } else { std::ptr::null() };
                            T::tile(mr, width, kc, ap, job.lda, bp, cp, job.ldc, load_c, pf, ep_ptr);
                        } else {
                            // The last vector is partial: run the kernel on a scratch tile and
                            // copy the valid columns.
                            let tmp = scratch.0.as_mut_ptr();
                            if load_c {
                                for r in 0..mr {
                                    std::ptr::copy_nonoverlapping(cp.add(r * job.ldc), tmp.add(r * T::NR), cols);
                                }
                            }
                            T::tile(mr, width, kc, ap, job.lda, bp, tmp, T::NR, load_c, pf, std::ptr::null());
                            for r in 0..mr {
                                std::ptr::copy_nonoverlapping(tmp.add(r * T::NR), cp.add(r * job.ldc), cols);
                            }
                            // Bias and residual hold only `cols` valid columns here.
                            if finish {
                                T::epilogue(mr, cols, cp, job.ldc, &ep);
                            }
                        }
                        ir += mr;
                    }
                }
            }
        }
    }
    if unpacked {
        SCRATCH_PANEL.with(|s| s.set(Some(panel)));
    }
}

/// How many lines of the next B block each of `tiles` tiles of depth `kc` prefetches: all of
/// them spread evenly, but at least one per four k steps (fewer tiles then cover the block).
fn lines_per_tile(lines: usize, tiles: usize, kc: usize) -> usize {
    lines.div_ceil(tiles.max(1)).max(kc.div_ceil(4))
}

/// Packs rows `pc..pc + kc`, columns `col0..col0 + cols` of the job's unpacked B into `dst`
/// as one panel block (`kc` rows of `nr` values, zero past `cols`).
///
/// # Safety
/// The job's `raw_b` must be valid for its `k x n` at stride `ldb`, and `pc + kc <= k`,
/// `col0 + cols <= n`, `cols <= nr`, `dst.len() >= kc * nr`.
unsafe fn pack_block(job: &Job, pc: usize, kc: usize, col0: usize, cols: usize, nr: usize, dst: &mut [f32]) {
    for (kk, row) in dst.chunks_exact_mut(nr).take(kc).enumerate() {
        let src = std::slice::from_raw_parts(job.raw_b.add((pc + kk) * job.ldb + col0), cols);
        row[..cols].copy_from_slice(src);
        row[cols..].fill(0.0);
    }
}

/// `k == 0`: the products are zero, so C is `act(bias [+ C]) + residual`.
///
/// # Safety
/// As [`run_block`].
unsafe fn empty_k<T: TileKernel>(job: &Job, rows: Range<usize>, panels: Range<usize>) {
    let col0 = panels.start * T::NR;
    let cols = (panels.end * T::NR).min(job.n) - col0;
    for r in rows.clone() {
        let cp = job.c.add(r * job.ldc + col0);
        if !job.accumulate {
            std::ptr::write_bytes(cp, 0, cols);
        }
    }
    if !job.store_only {
        let null_or = |p: *const f32, off: usize| if p.is_null() { p } else { p.add(off) };
        let ep = TileEpilogue {
            bias: null_or(job.bias, col0),
            row_bias: null_or(job.row_bias, rows.start),
            act: job.act,
            res: null_or(job.res, rows.start * job.res_ld + col0),
            res_ld: job.res_ld,
        };
        T::epilogue(rows.len(), cols, job.c.add(rows.start * job.ldc + col0), job.ldc, &ep);
    }
}

#[cfg(test)]
mod tests {
    use super::{grid, lines_per_tile, Ties};
    use crate::gemm::kernels::Prefetch;

    #[test]
    fn the_next_block_is_prefetched_whole_and_spread_thin() {
        // (lines of the block, tiles, kc): MiniLM's 384 x 48 blocks at 16, 4 and 1 row tiles,
        // a short last K block and an odd depth.
        for (lines, tiles, kc) in [(1152, 16, 384), (1152, 4, 384), (1152, 1, 384), (96, 16, 32), (1149, 7, 383)] {
            let per = lines_per_tile(lines, tiles, kc);
            // The tiles the driver lets prefetch (those whose first line is in the block)
            // cover every line where the kernels' densest rate (4 per 4 steps) allows.
            let covered: usize = (0..tiles).map(|t| per.min(kc).min(lines.saturating_sub(t * per))).sum();
            assert_eq!(covered, lines.min(tiles * kc), "{lines} lines over {tiles} tiles of depth {kc}");
            let density = Prefetch { at: std::ptr::null(), lines: per }.per_four_steps(kc);
            assert!(density * kc.div_ceil(4) >= per.min(kc), "{per} lines at {density} per four of {kc} steps");
        }
        // Sixteen tiles of 384 steps need only one line per four steps for 1152 lines.
        assert_eq!(Prefetch { at: std::ptr::null(), lines: lines_per_tile(1152, 16, 384) }.per_four_steps(384), 1);
    }

    #[test]
    fn grid_balances_tasks_and_follows_the_tie_rule() {
        assert_eq!(grid(1, 16, 64, Ties::Rows), (1, 1));
        // 15 row tiles split unevenly, 64 panels evenly.
        assert_eq!(grid(2, 15, 64, Ties::Rows), (1, 2));
        // Tall and narrow: split rows.
        assert_eq!(grid(2, 100, 1, Ties::Columns), (2, 1));
        // Equal either way: the tie rule decides.
        assert_eq!(grid(2, 16, 64, Ties::Rows), (2, 1));
        assert_eq!(grid(2, 16, 64, Ties::Columns), (1, 2));
        assert_eq!(grid(4, 64, 16, Ties::Columns), (1, 4));
        assert_eq!(grid(4, 64, 16, Ties::Rows), (4, 1));
        assert_eq!(grid(4, 64, 2, Ties::Columns), (2, 2));
        // A prime thread count still yields a valid grid.
        let (tm, tn) = grid(3, 10, 10, Ties::Rows);
        assert_eq!(tm * tn, 3);
    }
}

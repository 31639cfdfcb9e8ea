//! Splitting a quantized GEMM into tasks, the A tail, and the epilogue stages.

use super::kernels::{self, TileFn};
use super::{PackedQB, QEpilogue, QKernel, QOutput};
use crate::cpu::CpuTier;
use crate::gemm::driver::{grid, Ties};
use crate::gemm::{Activation, Par};
use std::ops::Range;

/// Below this many multiply-adds per task, threads cost more than they save.
const MIN_MACS_PER_TASK: usize = 1 << 20;

#[derive(Clone, Copy)]
pub(super) enum Out {
    F32(*mut f32),
    U8(*mut u8, f32, u8),
    I32(*mut i32),
}

struct Job<'a> {
    a: &'a [u8],
    lda: usize,
    b: &'a PackedQB,
    out: Out,
    ldc: usize,
    ep: &'a QEpilogue<'a>,
    tile: TileFn,
    mr: usize,
    tier: CpuTier,
}

// SAFETY: tasks read A, B and the epilogue operands (shared borrows outliving the tasks) and
// write disjoint (row range x panel range) blocks of the output through `out`.
unsafe impl Sync for Job<'_> {}

/// The f32 tier whose row kernels (activation) go with a quantized kernel.
pub(crate) fn row_tier(k: QKernel) -> CpuTier {
    match k {
        QKernel::Avx512Vnni | QKernel::AmxInt8 => CpuTier::Avx512,
        QKernel::AvxVnni | QKernel::Avx2 => CpuTier::Avx2,
        QKernel::Scalar => CpuTier::Generic,
    }
}

pub(super) fn run(m: usize, a: &[u8], lda: usize, b: &PackedQB, out: QOutput<'_>, ep: &QEpilogue<'_>, par: Par<'_>) {
    let n = b.n;
    if m == 0 || n == 0 {
        return;
    }
    let (out, ldc) = match out {
        QOutput::F32 { c, ldc } => (Out::F32(c.as_mut_ptr()), ldc),
        QOutput::U8 { c, ldc, scale, zero } => (Out::U8(c.as_mut_ptr(), scale, zero), ldc),
        QOutput::I32 { c, ldc } => (Out::I32(c.as_mut_ptr()), ldc),
    };
    let (mr, nr) = b.kernel.tile();
    #[cfg(target_arch = "x86_64")]
    if b.kernel == QKernel::AmxInt8 {
        let job = super::amx::Job { a, lda, b, out, ldc, ep };
        // SAFETY: as below; the kernel's support (AMX granted, AVX-512) was checked.
        return split(m, n, b.k, mr, nr, par, |rows, cols| unsafe { super::amx::run_block(&job, rows, cols) });
    }
    let job = Job { a, lda, b, out, ldc, ep, tile: kernels::tile_fn(b.kernel), mr, tier: row_tier(b.kernel) };
    // SAFETY: `qgemm` validated the buffers and the kernel's features; tasks own disjoint
    // output blocks.
    split(m, n, b.k, mr, nr, par, |rows, cols| unsafe { run_block_tiered(&job, rows, cols) });
}

/// Splits `m x n` into (row range x panel range) tasks, one per thread at most.
fn split(
    m: usize,
    n: usize,
    k: usize,
    mr: usize,
    nr: usize,
    par: Par<'_>,
    block: impl Fn(Range<usize>, Range<usize>) + Sync,
) {
    let macs = m.saturating_mul(n).saturating_mul(k.max(1));
    let threads = par.threads().min(macs / MIN_MACS_PER_TASK).max(1);
    let row_tiles = m.div_ceil(mr);
    let panels = n.div_ceil(nr);
    let (tm, tn) = grid(threads, row_tiles, panels, Ties::Rows);
    let rows_per = row_tiles.div_ceil(tm) * mr;
    let panels_per = panels.div_ceil(tn);
    let task = |t: usize| {
        let (ti, tj) = (t / tn, t % tn);
        let rows = (ti * rows_per).min(m)..((ti + 1) * rows_per).min(m);
        let cols = (tj * panels_per).min(panels)..((tj + 1) * panels_per).min(panels);
        if !rows.is_empty() && !cols.is_empty() {
            block(rows, cols)
        }
    };
    par.run_tasks(tm * tn, task);
}

/// The micro-tile's i32 results, aligned for vector stores.
#[repr(C, align(64))]
struct Scratch([i32; 8 * 48]);

/// [`run_block`] compiled for the kernel's ISA, so the epilogue loops vectorise with it.
///
/// # Safety
/// As [`run_block`]; the job's kernel must be supported by the host.
unsafe fn run_block_tiered(job: &Job, rows: Range<usize>, panels: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
        unsafe fn avx512(job: &Job, rows: Range<usize>, panels: Range<usize>) {
            run_block(job, rows, panels)
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(job: &Job, rows: Range<usize>, panels: Range<usize>) {
            run_block(job, rows, panels)
        }
        match job.b.kernel {
            QKernel::Avx512Vnni | QKernel::AmxInt8 => return avx512(job, rows, panels),
            QKernel::AvxVnni | QKernel::Avx2 => return avx2(job, rows, panels),
            QKernel::Scalar => {}
        }
    }
    run_block(job, rows, panels)
}

/// # Safety
/// The job's buffers must be valid for its dimensions and no other task may write this block.
#[inline(always)]
unsafe fn run_block(job: &Job, rows: Range<usize>, panels: Range<usize>) {
    let b = job.b;
    let (k, n, nr) = (b.k, b.n, b.nr);
    let kq_full = k / 4;
    let has_tail = !k.is_multiple_of(4);
    let col0 = panels.start * nr;
    let width = (panels.end * nr).min(n) - col0;
    #[cfg(target_arch = "x86_64")]
    if let (QKernel::Avx512Vnni, Out::F32(c)) = (b.kernel, job.out) {
        return run_block_fused_f32(job, rows, panels, c);
    }
    let float_out = !matches!(job.out, Out::I32(_));
    let mut buf = if float_out && !direct(job) { vec![0f32; job.mr * width] } else { vec![] };
    let mut buf2 = if float_out && job.ep.activation != Activation::None { vec![0f32; width] } else { vec![] };
    let mut scratch = Scratch([0; 8 * 48]);
    let mut tail = [0u32; 8];
    let mut ir = rows.start;
    while ir < rows.end {
        let mr = job.mr.min(rows.end - ir);
        let a = job.a.as_ptr().add(ir * job.lda);
        if has_tail {
            for (i, t) in tail.iter_mut().enumerate().take(mr) {
                let row = &job.a[(ir + i) * job.lda + kq_full * 4..(ir + i) * job.lda + k];
                let mut bytes = [0u8; 4];
                bytes[..row.len()].copy_from_slice(row);
                *t = u32::from_le_bytes(bytes);
            }
        }
        let tail_ptr = if has_tail { tail.as_ptr() } else { std::ptr::null() };
        for p in panels.clone() {
            let j0 = p * nr;
            let cols = nr.min(n - j0);
            let bp = b.data.as_slice().as_ptr().add(p * b.panel_stride);
            (job.tile)(mr, kq_full, a, job.lda, tail_ptr, bp, scratch.0.as_mut_ptr());
            stage1(job, ir, mr, j0, cols, nr, &scratch.0, &mut buf, width, col0);
        }
        if float_out && !direct(job) {
            stage2(job, ir, mr, col0, width, &buf, &mut buf2);
        }
        ir += mr;
    }
}

/// Rows of A kept in L2 while B panels stream past them: each panel is read from memory once
/// per block and then from L1 by every row tile (streaming all of B per row tile left a cold
/// B waiting on memory at batch 1).
const A_BLOCK_BYTES: usize = 192 << 10;

/// Panels up to this size are prefetched while the previous one runs (larger ones would push
/// the running panel out of L1: AMD's prefetches fill L1 whatever the hint).
const PREFETCH_PANEL_MAX: usize = 24 << 10;

/// [`run_block`] on the AVX-512 VNNI kernel with the f32 epilogue fused into the tile.
///
/// # Safety
/// As [`run_block`]; the host has AVX-512 VNNI.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn run_block_fused_f32(job: &Job, rows: Range<usize>, panels: Range<usize>, c: *mut f32) {
    let b = job.b;
    let ep = job.ep;
    let (k, mr_max) = (b.k, job.mr);
    let kq = k / 4;
    let has_tail = !k.is_multiple_of(4);
    let block = (A_BLOCK_BYTES / job.lda.max(1)).max(mr_max) / mr_max * mr_max;
    let per_col = ep.b_scale.len() != 1;
    let mut tails = vec![0u32; if has_tail { block } else { 0 }];
    let mut za = vec![0i32; block];
    let mut sa = vec![0f32; block];
    for ib in rows.clone().step_by(block) {
        let ib_end = (ib + block).min(rows.end);
        for r in ib..ib_end {
            za[r - ib] = ep.a_zero.at(r);
            sa[r - ib] = ep.a_scale.at(r);
            if has_tail {
                let row = &job.a[r * job.lda + kq * 4..r * job.lda + k];
                let mut bytes = [0u8; 4];
                bytes[..row.len()].copy_from_slice(row);
                tails[r - ib] = u32::from_le_bytes(bytes);
            }
        }
        for p in panels.clone() {
            let j0 = p * b.nr;
            let bp = b.data.as_slice().as_ptr().add(p * b.panel_stride);
            let mut f = kernels::F32Finish {
                c,
                ldc: job.ldc,
                cols: b.nr.min(b.n - j0),
                col_sums: b.col_sums.as_ptr().add(j0),
                b_scale: ep.b_scale.as_ptr().add(if per_col { j0 } else { 0 }),
                b_scale_per_col: per_col,
                bias: ep.bias.map_or(std::ptr::null(), |v| v.as_ptr().add(j0)),
                res: std::ptr::null(),
                res_ld: ep.residual.map_or(0, |r| r.ld),
                ox: std::ptr::null(),
                ox_ld: ep.outliers.map_or(0, |o| o.ld),
                ow: ep.outliers.map_or(std::ptr::null(), |o| o.w.as_ptr().add(j0)),
                ow_ld: b.n,
                ok: ep.outliers.map_or(0, |o| o.k),
                za: [0; 8],
                sa: [0.0; 8],
                act: ep.activation,
            };
            // The next panel is prefetched a share per row tile, so its first tile does not
            // wait on memory (weights of a whole model do not stay in L2 between runs).
            let next = if p + 1 < panels.end && b.panel_stride <= PREFETCH_PANEL_MAX {
                bp.add(b.panel_stride)
            } else {
                std::ptr::null()
            };
            let lines = b.panel_stride.div_ceil(64);
            let per_tile = lines.div_ceil((ib_end - ib).div_ceil(mr_max));
            let mut line = 0;
            let mut ir = ib;
            while ir < ib_end {
                let mr = mr_max.min(ib_end - ir);
                if !next.is_null() {
                    for l in line..(line + per_tile).min(lines) {
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                            next.add(l * 64) as *const i8
                        );
                    }
                    line += per_tile;
                }
                let o = ir - ib;
                f.za[..mr].copy_from_slice(&za[o..o + mr]);
                f.sa[..mr].copy_from_slice(&sa[o..o + mr]);
                f.c = c.add(ir * job.ldc + j0);
                f.res = ep.residual.map_or(std::ptr::null(), |r| r.data.as_ptr().add(ir * r.ld + j0));
                f.ox = ep.outliers.map_or(std::ptr::null(), |o| o.x.as_ptr().add(ir * o.ld));
                let tail = if has_tail { tails.as_ptr().add(o) } else { std::ptr::null() };
                let a = job.a.as_ptr().add(ir * job.lda);
                kernels::avx512_vnni_qgemm_8x48_f32(mr, kq, a, job.lda, tail, bp, &f);
                ir += mr;
            }
        }
    }
}

/// Whether float results are final after stage 1 (f32 output, no activation).
#[inline(always)]
fn direct(job: &Job) -> bool {
    matches!(job.out, Out::F32(_)) && job.ep.activation == Activation::None
}

/// Zero-point correction and scaling of one micro-tile: i32 outputs are stored, float ones go
/// to `buf` (rows of `width` values starting at column `col0`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn stage1(
    job: &Job,
    ir: usize,
    mr: usize,
    j0: usize,
    cols: usize,
    nr: usize,
    acc: &[i32],
    buf: &mut [f32],
    width: usize,
    col0: usize,
) {
    let cs = &job.b.col_sums[j0..j0 + cols];
    let ep = job.ep;
    for i in 0..mr {
        let za = ep.a_zero.at(ir + i);
        let acc = &acc[i * nr..i * nr + cols];
        match job.out {
            Out::I32(c) => {
                let row = std::slice::from_raw_parts_mut(c.add((ir + i) * job.ldc + j0), cols);
                for ((o, &x), &s) in row.iter_mut().zip(acc).zip(cs) {
                    *o = x.wrapping_sub(za.wrapping_mul(s));
                }
            }
            out => {
                let sa = ep.a_scale.at(ir + i);
                // Without an activation, f32 results go straight to C (stage 2 is skipped).
                let dst = match out {
                    Out::F32(c) if direct(job) => std::slice::from_raw_parts_mut(c.add((ir + i) * job.ldc + j0), cols),
                    _ => &mut buf[i * width + (j0 - col0)..][..cols],
                };
                if ep.b_scale.len() == 1 {
                    let s = sa * ep.b_scale[0];
                    for ((o, &x), &c) in dst.iter_mut().zip(acc).zip(cs) {
                        *o = x.wrapping_sub(za.wrapping_mul(c)) as f32 * s;
                    }
                } else {
                    let sb = &ep.b_scale[j0..j0 + cols];
                    for (((o, &x), &c), &s) in dst.iter_mut().zip(acc).zip(cs).zip(sb) {
                        *o = x.wrapping_sub(za.wrapping_mul(c)) as f32 * (sa * s);
                    }
                }
                if let Some(o) = ep.outliers {
                    o.add_row(ir + i, job.b.n, j0, dst);
                }
                if let Some(bias) = ep.bias {
                    for (o, &bv) in dst.iter_mut().zip(&bias[j0..j0 + cols]) {
                        *o += bv;
                    }
                }
                if let (true, Some(res)) = (direct(job), ep.residual) {
                    for (o, &r) in dst.iter_mut().zip(&res.data[(ir + i) * res.ld + j0..][..cols]) {
                        *o += r;
                    }
                }
            }
        }
    }
}

/// Activation, residual and the store (or requantization) of `mr` finished rows.
#[inline(always)]
unsafe fn stage2(job: &Job, ir: usize, mr: usize, col0: usize, width: usize, buf: &[f32], buf2: &mut [f32]) {
    let ep = job.ep;
    for i in 0..mr {
        let r = ir + i;
        let src = &buf[i * width..(i + 1) * width];
        let y: &[f32] = if ep.activation != Activation::None {
            // The tier matches the kernel's, which `qgemm` checked; the lengths are equal.
            let _ = crate::rows::map_activation_with(job.tier, src, ep.activation, buf2);
            buf2
        } else {
            src
        };
        match job.out {
            Out::F32(c) => {
                let row = std::slice::from_raw_parts_mut(c.add(r * job.ldc + col0), width);
                match ep.residual {
                    Some(res) => {
                        let rr = &res.data[r * res.ld + col0..][..width];
                        for ((o, &v), &x) in row.iter_mut().zip(y).zip(rr) {
                            *o = v + x;
                        }
                    }
                    None => row.copy_from_slice(y),
                }
            }
            Out::U8(c, scale, zero) => {
                let row = std::slice::from_raw_parts_mut(c.add(r * job.ldc + col0), width);
                let rr = ep.residual.map(|res| &res.data[r * res.ld + col0..][..width]);
                let z = zero as f32;
                for (j, (o, &v)) in row.iter_mut().zip(y).enumerate() {
                    let v = match rr {
                        Some(rr) => v + rr[j],
                        None => v,
                    };
                    *o = ((v / scale).round_ties_even() + z).clamp(0.0, 255.0) as u8;
                }
            }
            Out::I32(_) => {}
        }
    }
}

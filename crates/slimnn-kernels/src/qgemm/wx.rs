//! Integer GEMM with the weights on the left: `C = (W - zw) · (X - zx)` for i8 weights `W`
//! (`m x k`, a zero point per row) and u8 activations `X` (`k x n`, one zero point), exact in
//! i32. This is the layout of an NCHW convolution: `W` holds the `[c_out, c_in·kh·kw]`
//! filters and `X` one image's `[c_in·kh·kw, h·w]` columns (the image itself for 1x1), so
//! neither side needs transposing.
//!
//! `vpdpbusd` multiplies four u8 by four i8 per 32-bit lane. The activations are the vector
//! operand, packed per call ([`PackedQX`]) into panels of NR columns of 4 consecutive K
//! values; each weight row's 4 values are broadcast from memory, packed once ([`PackedQW`])
//! in blocks of MR rows. Zero points are applied as the tile is stored:
//! `sum (x - zx)(w - zw) = sum x w - zx rowsum(w) - zw colsum(x) + k zx zw`.
//!
//! Kernels: AMX-INT8 (32 x 32 blocks of `tdpbsud`: signed weights as the row tiles, the
//! same activation panels as the column tiles), AVX-512 VNNI (8 x 32), AVX-VNNI (4 x 16) and a
//! scalar reference. There is no AVX2 kernel: [`wx_kernel`] is `None` there and callers keep to
//! their float path.

use super::{AlignedBytes, QKernel, KERNEL};
use crate::error::KernelError;
use crate::gemm::driver::{grid, Ties};
use crate::gemm::Par;
use rayon::prelude::*;
use std::ops::Range;

/// Below this many multiply-adds per task, threads cost more than they save.
const MIN_MACS_PER_TASK: usize = 1 << 20;

/// Bytes of K per AMX tile step.
const AMX_KB: usize = super::amx::KB;

/// The largest `k` whose sums `k * 255 * 255` cannot overflow i32.
pub const MAX_K: usize = i32::MAX as usize / (255 * 255);

/// The kernel for weights of `k` columns on the active CPU tier, when it has an AMX or VNNI
/// one. AMX pads K to whole 64-byte steps: at K <= 32 the padding makes its packing 2-4x the
/// work and its blocks no faster than VNNI's (`wx_speed`), so those stay on VNNI.
pub fn wx_kernel(k: usize) -> Option<QKernel> {
    let vector = Some(QKernel::active_vector()).filter(|k| matches!(k, QKernel::Avx512Vnni | QKernel::AvxVnni));
    match QKernel::active() {
        QKernel::AmxInt8 if k > AMX_KB / 2 => Some(QKernel::AmxInt8),
        _ => vector,
    }
}

/// `(MR, NR)` of `kernel`'s tile, `None` when it has no kernel here.
fn tile_of(kernel: QKernel) -> Option<(usize, usize)> {
    match kernel {
        QKernel::Avx512Vnni => Some((8, 32)),
        QKernel::AvxVnni | QKernel::Scalar => Some((4, 16)),
        QKernel::AmxInt8 => Some((super::amx::MR, super::amx::NR)),
        QKernel::Avx2 => None,
    }
}

/// Signed 8-bit weights (`m x k`, row-major) with a zero point per row, packed once for one
/// kernel: blocks of MR rows (zero-padded), each `kq` groups of MR rows' 4 values for the
/// vector kernels; for AMX, each block's K steps are row tiles in a row (MR rows of 64 bytes,
/// K zero-padded to whole steps).
#[derive(Clone)]
pub struct PackedQW {
    kernel: QKernel,
    m: usize,
    k: usize,
    /// Groups of 4 K values per row, padded to whole tile steps for AMX.
    kq: usize,
    mr: usize,
    nr: usize,
    data: AlignedBytes,
    row_sums: Vec<i32>,
    zero: Vec<i32>,
}

impl std::fmt::Debug for PackedQW {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQW").field("kernel", &self.kernel).field("m", &self.m).field("k", &self.k).finish()
    }
}

impl PackedQW {
    /// Packs `w` (`m x k`, stride `k`) whose zero points `zero` are one per row or one in all
    /// (each in `-128..=127`), for `kernel`, which the host must support.
    pub fn new(kernel: QKernel, w: &[i8], m: usize, k: usize, zero: &[i32]) -> Result<Self, KernelError> {
        kernel.check()?;
        let (mr, nr) = tile_of(kernel).ok_or_else(|| {
            KernelError::shape(KERNEL, format!("no {} kernel for weights on the left", kernel.name()))
        })?;
        if k > MAX_K {
            return Err(KernelError::shape(KERNEL, format!("k = {k} exceeds {MAX_K}: i32 sums could overflow")));
        }
        if m.checked_mul(k) != Some(w.len()) {
            return Err(KernelError::shape(KERNEL, format!("{} weights for {m} x {k}", w.len())));
        }
        let zero = match zero.len() {
            1 => vec![zero[0]; m],
            len if len == m => zero.to_vec(),
            len => return Err(KernelError::shape(KERNEL, format!("{len} weight zero points for {m} rows"))),
        };
        if let Some(z) = zero.iter().find(|z| !(-128..=127).contains(*z)) {
            return Err(KernelError::shape(KERNEL, format!("weight zero point {z} is not an i8")));
        }
        let amx = kernel == QKernel::AmxInt8;
        let kq = if amx { k.div_ceil(AMX_KB) * AMX_KB / 4 } else { k.div_ceil(4) };
        let blocks = m.div_ceil(mr);
        let mut data = AlignedBytes::zeroed(blocks * kq * mr * 4);
        let bytes = data.as_mut_slice();
        for i in 0..m {
            let (b, r) = (i / mr, i % mr);
            for (t, &v) in w[i * k..(i + 1) * k].iter().enumerate() {
                let at = if amx {
                    b * kq * mr * 4 + (t / AMX_KB * mr + r) * AMX_KB + t % AMX_KB
                } else {
                    ((b * kq + t / 4) * mr + r) * 4 + t % 4
                };
                bytes[at] = v as u8;
            }
        }
        let row_sums = w.chunks(k.max(1)).map(|row| row.iter().map(|&v| v as i32).sum()).take(m).collect();
        Ok(PackedQW { kernel, m, k, kq, mr, nr, data, row_sums, zero })
    }

    pub fn kernel(&self) -> QKernel {
        self.kernel
    }
    pub fn m(&self) -> usize {
        self.m
    }
    pub fn k(&self) -> usize {
        self.k
    }
    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.as_slice().len() + (self.row_sums.len() + self.zero.len()) * 4
    }
    /// The packed weights as the vector kernels read them: one dword per row and K group.
    fn words(&self) -> *const u32 {
        self.data.as_slice().as_ptr().cast()
    }
    fn symmetric(&self) -> bool {
        self.zero.iter().all(|&z| z == 0)
    }
}

/// One call's activations (`k x n`, u8 or i8 bits) packed for a [`PackedQW`]: panels of NR
/// columns (zero-padded), each `ceil(k/4)` groups of NR columns' 4 values. Reusable: packing
/// again keeps the allocation.
#[derive(Clone, Default)]
pub struct PackedQX {
    k: usize,
    n: usize,
    nr: usize,
    panel_stride: usize,
    /// In the u8 domain (i8 inputs are shifted by 128).
    zero: i32,
    data: AlignedBytes,
    /// Column sums, kept only when some weight zero point is not 0.
    col_sums: Vec<i32>,
}

impl std::fmt::Debug for PackedQX {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQX").field("k", &self.k).field("n", &self.n).field("zero", &self.zero).finish()
    }
}

impl PackedQX {
    /// Packs `x` (`w.k() x n`, row stride `ldx`) with zero point `zero`; `signed` reads the
    /// bytes as i8 (shifted to u8 by flipping the top bit, and the zero point with them).
    pub fn pack(
        &mut self,
        w: &PackedQW,
        x: &[u8],
        ldx: usize,
        n: usize,
        signed: bool,
        zero: i32,
    ) -> Result<(), KernelError> {
        self.pack_par(w, x, ldx, n, signed, zero, Par::Seq)
    }

    /// [`Self::pack`] with the panels split over `par`'s threads (a serial pack was a fixed
    /// share of every 1x1 convolution that the threads could not split).
    #[allow(clippy::too_many_arguments)]
    pub fn pack_par(
        &mut self,
        w: &PackedQW,
        x: &[u8],
        ldx: usize,
        n: usize,
        signed: bool,
        zero: i32,
        par: Par<'_>,
    ) -> Result<(), KernelError> {
        let k = w.k;
        super::check_matrix("X", x.len(), k, n, ldx)?;
        let range = if signed { -128..=127 } else { 0..=255 };
        if !range.contains(&zero) {
            return Err(KernelError::shape(KERNEL, format!("activation zero point {zero} is out of range")));
        }
        let nr = w.nr;
        // The weights' K groups (whole tile steps for AMX): rows past k are packed as zeros.
        let kq = w.kq;
        let panel_stride = kq * nr * 4;
        let total = panel_stride * n.div_ceil(nr);
        if self.data.as_slice().len() < total {
            self.data = AlignedBytes::zeroed(total);
        }
        *self = PackedQX {
            k,
            n,
            nr,
            panel_stride,
            zero: if signed { zero + 128 } else { zero },
            data: std::mem::take(&mut self.data),
            col_sums: std::mem::take(&mut self.col_sums),
        };
        let flip = if signed { 0x8080_8080u32 } else { 0 };
        let panels = n.div_ceil(nr);
        let shape = Panels { k, n, nr, stride: panel_stride };
        let pack = |first: usize, dst: &mut [u8]| {
            // SAFETY: tiers are checked by `features`; the body is the same on each.
            #[cfg(target_arch = "x86_64")]
            unsafe {
                let f = crate::cpu::features();
                if f.avx512f && f.avx512bw && f.avx512vl {
                    return pack_avx512(&shape, x, ldx, flip, first, dst);
                } else if f.avx2 {
                    return pack_avx2(&shape, x, ldx, flip, first, dst);
                }
            }
            pack_panels(&shape, x, ldx, flip, first, dst)
        };
        let data = &mut self.data.as_mut_slice()[..total];
        let threads = par.threads().min(total / MIN_PACK_BYTES_PER_TASK).min(panels).max(1);
        if threads > 1 {
            let per = panels.div_ceil(threads);
            let chunk = per * panel_stride;
            let pack_all = |data: &mut [u8]| data.par_chunks_mut(chunk).enumerate().for_each(|(t, d)| pack(t * per, d));
            match par {
                Par::Pool(pool) => pool.install(|| pack_all(data)),
                _ => pack_all(data),
            }
        } else {
            pack(0, data);
        }
        self.col_sums.clear();
        if !w.symmetric() {
            self.col_sums.resize(n, 0);
            let sign = if signed { 128 } else { 0 };
            for r in 0..k {
                let row = &x[r * ldx..r * ldx + n];
                for (s, &v) in self.col_sums.iter_mut().zip(row) {
                    *s += (v ^ sign) as i32;
                }
            }
        }
        Ok(())
    }
}

/// Below this many packed bytes per task, threads cost more than they save.
const MIN_PACK_BYTES_PER_TASK: usize = 64 << 10;

/// The panel layout of one [`PackedQX`].
struct Panels {
    k: usize,
    n: usize,
    nr: usize,
    /// Bytes per panel.
    stride: usize,
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn pack_avx512(p: &Panels, x: &[u8], ldx: usize, flip: u32, first: usize, dst: &mut [u8]) {
    pack_panels(p, x, ldx, flip, first, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn pack_avx2(p: &Panels, x: &[u8], ldx: usize, flip: u32, first: usize, dst: &mut [u8]) {
    pack_panels(p, x, ldx, flip, first, dst)
}

/// Stands in for the rows past k of the last K group.
static ZERO_ROW: [u8; 32] = [0; 32];

/// Packs the whole panels that fit `dst`, from panel `first` on. Writes every byte of every
/// panel (padding included), so the buffer needs no clearing.
#[inline(always)]
fn pack_panels(p: &Panels, x: &[u8], ldx: usize, flip: u32, first: usize, dst: &mut [u8]) {
    let (k, n, nr) = (p.k, p.n, p.nr);
    for (pi, panel) in dst.chunks_exact_mut(p.stride).enumerate() {
        let j0 = (first + pi) * nr;
        let cols = nr.min(n - j0);
        for (q, dst) in panel.chunks_exact_mut(nr * 4).enumerate() {
            // Rows past k meet zero weights: any bytes do, so zeros keep the fast path.
            let row = |t: usize| {
                let r = 4 * q + t;
                if r < k {
                    &x[r * ldx + j0..r * ldx + j0 + cols]
                } else {
                    &ZERO_ROW[..cols]
                }
            };
            let rows = [row(0), row(1), row(2), row(3)];
            if cols == nr {
                match nr {
                    32 => interleave::<32>(rows[0], rows[1], rows[2], rows[3], dst, flip),
                    _ => interleave::<16>(rows[0], rows[1], rows[2], rows[3], dst, flip),
                }
            } else {
                // The last, partial panel: columns past n are zeros.
                for (j, d) in dst.chunks_exact_mut(4).enumerate() {
                    for (b, r) in d.iter_mut().zip(&rows) {
                        *b = if j < cols { r[j] ^ (flip as u8) } else { 0 };
                    }
                }
            }
        }
    }
}

/// `dst[4j + t] = rt[j] ^ flip` for NR columns of four rows.
#[inline(always)]
fn interleave<const NR: usize>(r0: &[u8], r1: &[u8], r2: &[u8], r3: &[u8], dst: &mut [u8], flip: u32) {
    let (r0, r1, r2, r3) = (&r0[..NR], &r1[..NR], &r2[..NR], &r3[..NR]);
    for (j, d) in dst[..4 * NR].chunks_exact_mut(4).enumerate() {
        let v = (r0[j] as u32 | (r1[j] as u32) << 8 | (r2[j] as u32) << 16 | (r3[j] as u32) << 24) ^ flip;
        d.copy_from_slice(&v.to_le_bytes());
    }
}

/// How [`qgemm_wx`]'s exact sums `acc` become 8-bit outputs, per row `i` (an output channel):
/// `y = clamp(round_half_even(f32(acc + bias[i]) * multiplier[i]) + zero)`, where
/// `f32(acc + bias)` rounds the exact sum once: ONNX `QLinearConv`'s requantization as ONNX
/// Runtime computes it. Signed outputs are written as their i8 bit patterns.
#[derive(Clone, Copy, Debug)]
pub struct Requantize<'a> {
    pub multiplier: &'a [f32],
    pub bias: Option<&'a [i32]>,
    pub zero: i32,
    pub signed: bool,
}

impl Requantize<'_> {
    /// One value, as the kernels compute it.
    pub fn apply(&self, i: usize, acc: i32) -> u8 {
        let v = (acc as i64 + self.bias.map_or(0, |b| b[i]) as i64) as f32;
        self.finish(v, self.multiplier[i])
    }

    #[inline(always)]
    fn bounds(&self) -> (i32, i32) {
        if self.signed {
            (-128, 127)
        } else {
            (0, 255)
        }
    }

    /// `v * mult` rounded and offset: the 8-bit output of the sum `v` (`f32(acc + bias)`).
    /// Adding 1.5 * 2^23 rounds to an integer, to nearest even, for |v| < 2^22 and leaves it
    /// in the low mantissa bits, so the rest is integer arithmetic that vectorises
    /// (`round_ties_even` is a libm call on baseline x86-64). Values are clamped first; beyond
    /// the output range rounding is moot.
    #[inline(always)]
    pub fn finish(&self, v: f32, mult: f32) -> u8 {
        const MAGIC: f32 = 12_582_912.0;
        let (lo, hi) = self.bounds();
        let (vlo, vhi) = ((lo - self.zero - 1) as f32, (hi - self.zero + 1) as f32);
        let r = (v * mult).clamp(vlo, vhi) + MAGIC;
        ((r.to_bits() as i32 - MAGIC.to_bits() as i32) + self.zero).clamp(lo, hi) as u8
    }
}

/// Where [`qgemm_wx`] writes: `m x n` row-major at row stride `ldc`.
#[derive(Debug)]
pub enum WxOut<'a> {
    /// The exact sums.
    I32 { c: &'a mut [i32], ldc: usize },
    /// Requantized to 8 bits.
    Requantized { c: &'a mut [u8], ldc: usize, q: Requantize<'a> },
}

/// `(W - zw)(X - zx)` (`m x n`, exact in i32) into `out`. `x` must have been packed for `w`.
pub fn qgemm_wx(w: &PackedQW, x: &PackedQX, out: WxOut<'_>, par: Par<'_>) -> Result<(), KernelError> {
    w.kernel.check()?;
    if x.k != w.k || x.nr != w.nr {
        return Err(KernelError::shape(KERNEL, format!("activations packed for k = {}, weights have {}", x.k, w.k)));
    }
    let (m, n) = (w.m, x.n);
    let (out, ldc) = match out {
        WxOut::I32 { c, ldc } => {
            super::check_matrix("C", c.len(), m, n, ldc)?;
            (Out::I32(c.as_mut_ptr()), ldc)
        }
        WxOut::Requantized { c, ldc, q } => {
            super::check_matrix("C", c.len(), m, n, ldc)?;
            if q.multiplier.len() != m || q.bias.is_some_and(|b| b.len() != m) {
                return Err(KernelError::epilogue(KERNEL, format!("requantization needs {m} multipliers and biases")));
            }
            let (lo, hi) = q.bounds();
            if !(lo..=hi).contains(&q.zero) {
                return Err(KernelError::epilogue(KERNEL, format!("output zero point {} is out of range", q.zero)));
            }
            (Out::U8(c.as_mut_ptr(), q), ldc)
        }
    };
    if m == 0 || n == 0 {
        return Ok(());
    }
    // Per row: k zx zw - zx rowsum(w), in wrapping i32 (the final sums fit; see `MAX_K`).
    let zx = x.zero;
    let row_terms: Vec<i32> = (0..m)
        .map(|i| (w.k as i32).wrapping_mul(zx).wrapping_mul(w.zero[i]).wrapping_sub(zx.wrapping_mul(w.row_sums[i])))
        .collect();
    let job = Job { w, x, out, ldc, row_terms: &row_terms };
    let macs = m.saturating_mul(n).saturating_mul(w.k.max(1));
    let threads = par.threads().min(macs / MIN_MACS_PER_TASK).max(1);
    let (blocks, panels) = (m.div_ceil(w.mr), n.div_ceil(w.nr));
    // On a tie, each task reads a share of the larger operand: the weights (rows) at small
    // images, where splitting columns had each thread stream all of them (the late 7x7 layers
    // of EfficientNet gained nothing from a second thread).
    let ties = if m >= n { Ties::Rows } else { Ties::Columns };
    let (tm, tn) = grid(threads, blocks, panels, ties);
    let (bper, pper) = (blocks.div_ceil(tm), panels.div_ceil(tn));
    let task = |t: usize| {
        let (ti, tj) = (t / tn, t % tn);
        let rb = (ti * bper).min(blocks)..((ti + 1) * bper).min(blocks);
        let ps = (tj * pper).min(panels)..((tj + 1) * pper).min(panels);
        if !rb.is_empty() && !ps.is_empty() {
            // SAFETY: shapes were checked above; tasks write disjoint blocks of C.
            unsafe { run_block(&job, rb, ps) }
        }
    };
    par.run_tasks(tm * tn, task);
    Ok(())
}

/// Scalar reference for [`qgemm_wx`] on unpacked operands (`x` u8, `k x n` row-major).
#[allow(clippy::too_many_arguments)]
pub fn reference_qgemm_wx(m: usize, k: usize, n: usize, w: &[i8], zw: &[i32], x: &[u8], zx: i32, c: &mut [i32]) {
    for i in 0..m {
        let z = zw[if zw.len() == 1 { 0 } else { i }];
        for j in 0..n {
            let sum: i64 = (0..k).map(|t| (x[t * n + j] as i64 - zx as i64) * (w[i * k + t] as i64 - z as i64)).sum();
            c[i * n + j] = sum as i32;
        }
    }
}

#[derive(Clone, Copy)]
enum Out<'a> {
    I32(*mut i32),
    U8(*mut u8, Requantize<'a>),
}

struct Job<'a> {
    w: &'a PackedQW,
    x: &'a PackedQX,
    out: Out<'a>,
    ldc: usize,
    row_terms: &'a [i32],
}

// SAFETY: tasks read the packed operands and write disjoint blocks of `c`.
unsafe impl Sync for Job<'_> {}

/// Row blocks `rb` x panels `ps` of the job on its kernel.
///
/// # Safety
/// The job's shapes must be consistent and no other task may write this block.
unsafe fn run_block(job: &Job, rb: Range<usize>, ps: Range<usize>) {
    #[cfg(target_arch = "x86_64")]
    match job.w.kernel {
        QKernel::Avx512Vnni => return x86::block_avx512(job, rb, ps),
        QKernel::AvxVnni => return x86::block_avx_vnni(job, rb, ps),
        QKernel::AmxInt8 => return x86::block_amx(job, rb, ps),
        _ => {}
    }
    block::<Scalar>(job, rb, ps)
}

/// An `MR x NR` micro-kernel: `out` (MR rows at stride NR) receives the raw sums `sum x w`
/// over `kq` groups of a weight block and an activation panel.
trait Tile {
    const MR: usize;
    const NR: usize;
    unsafe fn tile(kq: usize, w: *const u32, x: *const u8, out: *mut i32);
    /// [`requantize_row`], vectorised where the kernel's ISA allows.
    #[inline(always)]
    unsafe fn requantize(q: &Requantize<'_>, i: usize, k: usize, term: i32, raw: &[i32], out: &mut [u8]) {
        requantize_row(q, i, k, term, raw, out)
    }
}

struct Scalar;

impl Tile for Scalar {
    const MR: usize = 4;
    const NR: usize = 16;
    #[inline(always)]
    unsafe fn tile(kq: usize, w: *const u32, x: *const u8, out: *mut i32) {
        let mut acc = [[0i32; 16]; 4];
        for q in 0..kq {
            let xq = x.add(q * 64);
            for (i, row) in acc.iter_mut().enumerate() {
                let wv = (*w.add(q * 4 + i)).to_le_bytes();
                for (j, a) in row.iter_mut().enumerate() {
                    for (t, &wb) in wv.iter().enumerate() {
                        *a += *xq.add(j * 4 + t) as i32 * wb as i8 as i32;
                    }
                }
            }
        }
        for (i, row) in acc.iter().enumerate() {
            std::ptr::copy_nonoverlapping(row.as_ptr(), out.add(i * 16), 16);
        }
    }
}

/// The tiles of a block, each stored with its zero-point terms.
#[inline(always)]
unsafe fn block<T: Tile>(job: &Job, rb: Range<usize>, ps: Range<usize>) {
    let (w, x) = (job.w, job.x);
    let kq = w.kq;
    let mut raw = [0i32; 32 * 32];
    debug_assert!(T::MR * T::NR <= raw.len());
    let col_sums = (!x.col_sums.is_empty()).then_some(&x.col_sums[..]);
    for p in ps {
        let j0 = p * T::NR;
        let cols = T::NR.min(x.n - j0);
        let xp = x.data.as_slice().as_ptr().add(p * x.panel_stride);
        for b in rb.clone() {
            T::tile(kq, w.words().add(b * kq * T::MR), xp, raw.as_mut_ptr());
            let i0 = b * T::MR;
            for r in 0..T::MR.min(w.m - i0) {
                let i = i0 + r;
                let src = &mut raw[r * T::NR..r * T::NR + cols];
                // The row's zero-point term goes with the store; the column one (asymmetric
                // weights only) takes a pass of its own.
                let mut term = job.row_terms[i];
                if let (Some(cs), z @ 1..) | (Some(cs), z @ ..=-1) = (col_sums, w.zero[i]) {
                    for (s, &c) in src.iter_mut().zip(&cs[j0..j0 + cols]) {
                        *s = s.wrapping_add(term).wrapping_sub(z.wrapping_mul(c));
                    }
                    term = 0;
                }
                let at = i * job.ldc + j0;
                match job.out {
                    Out::I32(c) => std::slice::from_raw_parts_mut(c.add(at), cols)
                        .iter_mut()
                        .zip(&*src)
                        .for_each(|(d, &s)| *d = s.wrapping_add(term)),
                    Out::U8(c, q) => {
                        T::requantize(&q, i, w.k, term, src, std::slice::from_raw_parts_mut(c.add(at), cols))
                    }
                }
            }
        }
    }
}

/// Whether `acc + bias` fits i32 for every `|acc| <= k * 255 * 255`.
#[inline(always)]
pub(super) fn bias_fits(bias: i32, k: usize) -> bool {
    (bias as i64).abs() + (k * 255 * 255) as i64 <= i32::MAX as i64
}

/// Row `i`'s sums `raw + term` (exact, wrapping) to 8 bits, as [`Requantize::apply`].
#[inline(always)]
fn requantize_row(q: &Requantize<'_>, i: usize, k: usize, term: i32, raw: &[i32], out: &mut [u8]) {
    let (mult, bias) = (q.multiplier[i], q.bias.map_or(0, |b| b[i]));
    let acc = raw.iter().map(|&r| r.wrapping_add(term));
    // |acc| <= k * 255 * 255: when the bias cannot carry that past i32, one i32 addition and
    // one conversion round the exact sum once, vectorised.
    if bias_fits(bias, k) {
        out.iter_mut().zip(acc).for_each(|(o, a)| *o = q.finish(a.wrapping_add(bias) as f32, mult));
    } else {
        out.iter_mut().zip(acc).for_each(|(o, a)| *o = q.finish((a as i64 + bias as i64) as f32, mult));
    }
}

/// [`Requantize`] of one output channel on 16 sums in a zmm register.
#[cfg(target_arch = "x86_64")]
pub(super) struct ZmmRequantize {
    mult: std::arch::x86_64::__m512,
    /// f32 bounds that keep the conversion from overflowing, where the sums could reach it.
    clamp: Option<(std::arch::x86_64::__m512, std::arch::x86_64::__m512)>,
    zero: std::arch::x86_64::__m512i,
    signed: bool,
}

#[cfg(target_arch = "x86_64")]
impl ZmmRequantize {
    /// Channel `i`'s, for sums of `k` u8 x i8 products (plus its bias).
    ///
    /// # Safety
    /// AVX-512 F on the host.
    #[inline(always)]
    pub(super) unsafe fn new(q: &Requantize<'_>, i: usize, k: usize) -> ZmmRequantize {
        use std::arch::x86_64::*;
        let mult = q.multiplier[i];
        let (lo, hi) = q.bounds();
        // |acc| <= k * 255 * 255: when |(acc + bias) * mult| stays below 2^30 the conversion
        // cannot overflow, and the saturating narrowing store does the output clamp alone.
        let reach = ((k * 255 * 255) as f64 + q.bias.map_or(0, |b| b[i]).unsigned_abs() as f64) * mult.abs() as f64;
        let clamp = (reach.is_nan() || reach >= (1u64 << 30) as f64)
            .then(|| (_mm512_set1_ps((lo - q.zero - 1) as f32), _mm512_set1_ps((hi - q.zero + 1) as f32)));
        ZmmRequantize { mult: _mm512_set1_ps(mult), clamp, zero: _mm512_set1_epi32(q.zero), signed: q.signed }
    }

    /// Writes the 8-bit outputs of the exact sums `sum` (bias included) under `mask`, as
    /// [`Requantize::finish`]: the i32 -> f32 conversion is the one rounding of the sum, and
    /// `cvtps` rounds half to even in the default mode.
    ///
    /// # Safety
    /// AVX-512 F/BW on the host; `out` valid for the masked bytes.
    #[inline(always)]
    pub(super) unsafe fn store(
        &self,
        out: *mut u8,
        mask: std::arch::x86_64::__mmask16,
        sum: std::arch::x86_64::__m512i,
    ) {
        self.store_rounded(out, mask, std::arch::x86_64::_mm512_cvtepi32_ps(sum))
    }

    /// `sum` scaled and rounded to i32 (before the zero point), as [`Self::store_rounded`].
    #[inline(always)]
    unsafe fn scaled(&self, sum: std::arch::x86_64::__m512i) -> std::arch::x86_64::__m512i {
        use std::arch::x86_64::*;
        let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(sum), self.mult);
        if let Some((lo, hi)) = self.clamp {
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        }
        _mm512_cvtps_epi32(v)
    }

    /// Two rows of 32 exact sums each (`s0` for `out0` by `r0`, `s1` for `out1` by `r1`; the
    /// two share the output's zero point and type) stored under the byte `mask`, equal to
    /// [`Self::store`] on each vector. Saturating packs to i16, the zero point added there
    /// with saturation, one saturating pack to 8 bits and one shuffle put four vectors'
    /// outputs in place: a third fewer instructions than narrowing each vector alone.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL on the host; `out0`, `out1` valid for the masked bytes.
    #[inline(always)]
    pub(super) unsafe fn store_two_rows(
        (r0, out0, s0): (&ZmmRequantize, *mut u8, [std::arch::x86_64::__m512i; 2]),
        (r1, out1, s1): (&ZmmRequantize, *mut u8, [std::arch::x86_64::__m512i; 2]),
        mask: std::arch::x86_64::__mmask32,
    ) {
        use std::arch::x86_64::*;
        let zero = _mm512_set1_epi16(_mm512_cvtsi512_si32(r0.zero) as i16);
        let a = _mm512_adds_epi16(_mm512_packs_epi32(r0.scaled(s0[0]), r0.scaled(s0[1])), zero);
        let b = _mm512_adds_epi16(_mm512_packs_epi32(r1.scaled(s1[0]), r1.scaled(s1[1])), zero);
        let y = if r0.signed { _mm512_packs_epi16(a, b) } else { _mm512_packus_epi16(a, b) };
        // Each 128-bit lane l now holds pixels 4l..4l+3 of s0[0], s0[1], s1[0], s1[1].
        let y = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), y);
        _mm256_mask_storeu_epi8(out0 as *mut _, mask, _mm512_castsi512_si256(y));
        _mm256_mask_storeu_epi8(out1 as *mut _, mask, _mm512_extracti64x4_epi64::<1>(y));
    }

    /// [`Self::store`] of sums already rounded to f32 (the one rounding of the exact sum).
    ///
    /// # Safety
    /// As [`Self::store`].
    #[inline(always)]
    pub(super) unsafe fn store_rounded(
        &self,
        out: *mut u8,
        mask: std::arch::x86_64::__mmask16,
        sum: std::arch::x86_64::__m512,
    ) {
        use std::arch::x86_64::*;
        let mut v = _mm512_mul_ps(sum, self.mult);
        if let Some((lo, hi)) = self.clamp {
            v = _mm512_min_ps(_mm512_max_ps(v, lo), hi);
        }
        let y = _mm512_add_epi32(_mm512_cvtps_epi32(v), self.zero);
        if self.signed {
            _mm512_mask_cvtsepi32_storeu_epi8(out as *mut _, mask, y);
        } else {
            _mm512_mask_cvtusepi32_storeu_epi8(out as *mut _, mask, _mm512_max_epi32(y, _mm512_setzero_si512()));
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{bias_fits, block, requantize_row, Job, Requantize, Tile, ZmmRequantize};
    use std::arch::x86_64::*;
    use std::ops::Range;

    struct Vnni512;

    impl Vnni512 {
        /// The raw sums of an 8 x 32 tile, left in registers.
        #[inline(always)]
        unsafe fn sums(kq: usize, w: *const u32, x: *const u8) -> [[__m512i; 2]; 8] {
            let mut acc = [[_mm512_setzero_si512(); 2]; 8];
            for q in 0..kq {
                let xq = x.add(q * 128);
                let xv = [_mm512_load_si512(xq as *const _), _mm512_load_si512(xq.add(64) as *const _)];
                let wq = w.add(q * 8);
                for (i, row) in acc.iter_mut().enumerate() {
                    let wv = _mm512_set1_epi32(*wq.add(i) as i32);
                    for (a, &xj) in row.iter_mut().zip(&xv) {
                        *a = _mm512_dpbusd_epi32(*a, xj, wv);
                    }
                }
            }
            acc
        }
    }

    impl Tile for Vnni512 {
        const MR: usize = 8;
        const NR: usize = 32;
        #[inline(always)]
        unsafe fn tile(kq: usize, w: *const u32, x: *const u8, out: *mut i32) {
            let acc = Self::sums(kq, w, x);
            for (i, row) in acc.iter().enumerate() {
                for (v, a) in row.iter().enumerate() {
                    _mm512_storeu_si512(out.add(i * 32 + v * 16) as *mut _, *a);
                }
            }
        }

        #[inline(always)]
        unsafe fn requantize(q: &Requantize<'_>, i: usize, k: usize, term: i32, acc: &[i32], out: &mut [u8]) {
            let bias = q.bias.map_or(0, |b| b[i]);
            if !bias_fits(bias, k) {
                return requantize_row(q, i, k, term, acc, out);
            }
            let rq = ZmmRequantize::new(q, i, k);
            let vt = _mm512_set1_epi32(term.wrapping_add(bias));
            for j in (0..acc.len()).step_by(16) {
                let mask: __mmask16 = if acc.len() - j >= 16 { !0 } else { (1 << (acc.len() - j)) - 1 };
                let a = _mm512_add_epi32(_mm512_maskz_loadu_epi32(mask, acc.as_ptr().add(j)), vt);
                rq.store(out.as_mut_ptr().add(j), mask, a);
            }
        }
    }

    struct Vnni256;

    impl Tile for Vnni256 {
        const MR: usize = 4;
        const NR: usize = 16;
        #[inline(always)]
        unsafe fn tile(kq: usize, w: *const u32, x: *const u8, out: *mut i32) {
            let mut acc = [[_mm256_setzero_si256(); 2]; 4];
            for q in 0..kq {
                let xq = x.add(q * 64);
                let xv = [_mm256_load_si256(xq as *const _), _mm256_load_si256(xq.add(32) as *const _)];
                let wq = w.add(q * 4);
                for (i, row) in acc.iter_mut().enumerate() {
                    let wv = _mm256_set1_epi32(*wq.add(i) as i32);
                    for (a, &xj) in row.iter_mut().zip(&xv) {
                        *a = _mm256_dpbusd_avx_epi32(*a, xj, wv);
                    }
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (v, a) in row.iter().enumerate() {
                    _mm256_storeu_si256(out.add(i * 16 + v * 8) as *mut _, *a);
                }
            }
        }
    }

    /// # Safety
    /// As `run_block`, on a host with AVX-512 VNNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    pub(super) unsafe fn block_avx512(job: &Job, rb: Range<usize>, ps: Range<usize>) {
        match job.out {
            super::Out::U8(c, q) if job.x.col_sums.is_empty() || job.w.symmetric() => fused_u8(job, c, &q, rb, ps),
            _ => block::<Vnni512>(job, rb, ps),
        }
    }

    /// Requantized output finished in registers: row blocks outer (each block's requantization
    /// set up once, its weights kept in L1), panels inner. Storing the i32 tile and setting up
    /// each row's requantization per tile cost as much as the products at K = 192.
    ///
    /// # Safety
    /// As `block_avx512`; the weights' zero points play no part (symmetric, or no column sums).
    #[inline(always)]
    unsafe fn fused_u8(job: &Job, c: *mut u8, q: &Requantize<'_>, rb: Range<usize>, ps: Range<usize>) {
        const MR: usize = Vnni512::MR;
        let (w, x) = (job.w, job.x);
        let kq = w.kq;
        for b in rb {
            let i0 = b * MR;
            let rows = MR.min(w.m - i0);
            // A saturated bias (a dead channel) needs the i64 path of `requantize_row`.
            if (i0..i0 + rows).any(|i| !bias_fits(q.bias.map_or(0, |v| v[i]), w.k)) {
                block::<Vnni512>(job, b..b + 1, ps.clone());
                continue;
            }
            let rq: [ZmmRequantize; MR] = std::array::from_fn(|r| ZmmRequantize::new(q, (i0 + r).min(w.m - 1), w.k));
            let vt: [__m512i; MR] = std::array::from_fn(|r| {
                let i = (i0 + r).min(w.m - 1);
                _mm512_set1_epi32(job.row_terms[i].wrapping_add(q.bias.map_or(0, |v| v[i])))
            });
            let wb = w.words().add(b * kq * MR);
            for p in ps.clone() {
                let j0 = p * Vnni512::NR;
                let cols = Vnni512::NR.min(x.n - j0);
                let acc = Vnni512::sums(kq, wb, x.data.as_slice().as_ptr().add(p * x.panel_stride));
                let mask = if cols == 32 { !0 } else { (1u32 << cols) - 1 };
                macro_rules! row {
                    ($r:expr) => {{
                        let r = $r;
                        let sums = [_mm512_add_epi32(acc[r][0], vt[r]), _mm512_add_epi32(acc[r][1], vt[r])];
                        (&rq[r], c.add((i0 + r) * job.ldc + j0), sums)
                    }};
                }
                // Rows in pairs; an odd last row pairs with itself.
                for r in (0..rows).step_by(2) {
                    ZmmRequantize::store_two_rows(row!(r), row!((r + 1).min(rows - 1)), mask);
                }
            }
        }
    }

    /// # Safety
    /// As `run_block`, on a host with AVX2 and AVX-VNNI.
    #[target_feature(enable = "avx2,avxvnni")]
    pub(super) unsafe fn block_avx_vnni(job: &Job, rb: Range<usize>, ps: Range<usize>) {
        block::<Vnni256>(job, rb, ps)
    }

    /// 32 x 32 blocks of `tdpbsud`: a weight block's row tiles (packed tile after tile) times
    /// a panel's two column tiles (16 K groups of 16 pixels each, 128 bytes apart), stored to L1.
    struct Amx;

    /// Bytes from one row (or K group) of a stored block, or of a panel, to the next.
    const AMX_STRIDE: usize = 128;

    impl Amx {
        /// The block's sums into `out` (32 rows of 32 i32).
        #[inline(always)]
        unsafe fn sums(kq: usize, w: *const u8, x: *const u8, out: *mut i32) {
            const KB: usize = super::AMX_KB;
            crate::amx::int8su_block_2x2(kq * 4 / KB, w, KB, 32 * KB, x, AMX_STRIDE, out.cast(), AMX_STRIDE);
        }
    }

    impl Tile for Amx {
        const MR: usize = 32;
        const NR: usize = 32;
        #[inline(always)]
        unsafe fn tile(kq: usize, w: *const u32, x: *const u8, out: *mut i32) {
            Self::sums(kq, w.cast(), x, out)
        }
    }

    /// The 32 x 32 i32 block as the tiles store it.
    #[repr(C, align(64))]
    struct Stored([i32; 32 * 32]);

    /// # Safety
    /// As `run_block`, on a host with AMX-INT8 granted and AVX-512 F/BW/VL/DQ.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512dq")]
    pub(super) unsafe fn block_amx(job: &Job, rb: Range<usize>, ps: Range<usize>) {
        crate::amx::configure();
        match job.out {
            super::Out::U8(c, q) if job.x.col_sums.is_empty() || job.w.symmetric() => amx_fused_u8(job, c, &q, rb, ps),
            _ => block::<Amx>(job, rb, ps),
        }
        crate::amx::release();
    }

    /// Requantized output, as [`fused_u8`] with 32-row blocks: while the tiles compute one
    /// panel's block, the core requantizes the previous one from the other stored copy.
    ///
    /// # Safety
    /// As `block_amx`, tiles configured; the weights' zero points play no part.
    #[inline(always)]
    unsafe fn amx_fused_u8(job: &Job, c: *mut u8, q: &Requantize<'_>, rb: Range<usize>, ps: Range<usize>) {
        const MR: usize = Amx::MR;
        let (w, x) = (job.w, job.x);
        let kq = w.kq;
        let mut stored = [Stored([0; 32 * 32]), Stored([0; 32 * 32])];
        for b in rb {
            let i0 = b * MR;
            let rows = MR.min(w.m - i0);
            if (i0..i0 + rows).any(|i| !bias_fits(q.bias.map_or(0, |v| v[i]), w.k)) {
                block::<Amx>(job, b..b + 1, ps.clone());
                continue;
            }
            let rq: [ZmmRequantize; MR] = std::array::from_fn(|r| ZmmRequantize::new(q, (i0 + r).min(w.m - 1), w.k));
            let vt: [__m512i; MR] = std::array::from_fn(|r| {
                let i = (i0 + r).min(w.m - 1);
                _mm512_set1_epi32(job.row_terms[i].wrapping_add(q.bias.map_or(0, |v| v[i])))
            });
            let wb = w.data.as_slice().as_ptr().add(b * kq * MR * 4);
            // Rows `i0..i0 + rows` of panel `p`'s block, stored in `acc`, requantized. (A fn, not
            // a closure: a closure does not inherit the caller's target features.)
            #[inline(always)]
            unsafe fn finish(
                job: &Job,
                c: *mut u8,
                (rq, vt): (&[ZmmRequantize], &[__m512i]),
                i0: usize,
                acc: &Stored,
                p: usize,
            ) {
                let j0 = p * Amx::NR;
                let cols = Amx::NR.min(job.x.n - j0);
                let mask = if cols == 32 { !0 } else { (1u32 << cols) - 1 };
                // (A macro, not a closure, for the target features.)
                macro_rules! row {
                    ($r:expr) => {{
                        let (r, at) = ($r, acc.0.as_ptr().add($r * 32));
                        let s0 = _mm512_add_epi32(_mm512_load_si512(at.cast()), vt[r]);
                        let s1 = _mm512_add_epi32(_mm512_load_si512(at.add(16).cast()), vt[r]);
                        (&rq[r], c.add((i0 + r) * job.ldc + j0), [s0, s1])
                    }};
                }
                // Rows in pairs; an odd last row pairs with itself.
                for r in (0..rq.len()).step_by(2) {
                    ZmmRequantize::store_two_rows(row!(r), row!((r + 1).min(rq.len() - 1)), mask);
                }
            }
            let setup = (&rq[..rows], &vt[..rows]);
            let mut pending = None;
            for (t, p) in ps.clone().enumerate() {
                let cur = t % 2;
                Amx::sums(kq, wb, x.data.as_slice().as_ptr().add(p * x.panel_stride), stored[cur].0.as_mut_ptr());
                if let Some(prev) = pending.replace(p) {
                    finish(job, c, setup, i0, &stored[cur ^ 1], prev);
                }
            }
            if let Some(prev) = pending {
                finish(job, c, setup, i0, &stored[(ps.len() - 1) % 2], prev);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(s: &mut u64) -> u64 {
        *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *s >> 33
    }

    #[test]
    fn threads_pack_the_same_bytes() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let mut s = 3u64;
        // Enough columns for several tasks, a partial last panel, k not a multiple of 4.
        let (m, k, n) = (8, 27, 20_001);
        for kernel in QKernel::supported().into_iter().filter(|k| tile_of(*k).is_some()) {
            let w: Vec<i8> = (0..m * k).map(|_| lcg(&mut s) as u8 as i8).collect();
            let x: Vec<u8> = (0..k * n).map(|_| lcg(&mut s) as u8).collect();
            let packed = PackedQW::new(kernel, &w, m, k, &[0]).unwrap();
            let (mut one, mut many) = (PackedQX::default(), PackedQX::default());
            one.pack(&packed, &x, n, n, true, 5).unwrap();
            many.pack_par(&packed, &x, n, n, true, 5, Par::Pool(&pool)).unwrap();
            let bytes = one.panel_stride * n.div_ceil(one.nr);
            assert!(bytes >= 3 * MIN_PACK_BYTES_PER_TASK, "{bytes} bytes make fewer than three tasks");
            assert!(one.data.as_slice()[..bytes] == many.data.as_slice()[..bytes], "{}", kernel.name());
        }
    }

    /// Every supported kernel against the reference: shapes around the tile sizes, u8 and
    /// i8 activations, zero and per-row weight zero points, threads 1 and 2.
    #[test]
    fn kernels_match_the_reference_exactly() {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
        let mut s = 7u64;
        let shapes = [(1, 1, 1), (3, 5, 17), (8, 27, 32), (9, 64, 33), (16, 130, 100), (40, 96, 196), (24, 300, 49)];
        for kernel in QKernel::supported().into_iter().filter(|k| tile_of(*k).is_some()) {
            for &(m, k, n) in &shapes {
                for (signed, asym) in [(false, false), (true, false), (false, true), (true, true)] {
                    let w: Vec<i8> = (0..m * k).map(|_| lcg(&mut s) as u8 as i8).collect();
                    let x: Vec<u8> = (0..k * n).map(|_| lcg(&mut s) as u8).collect();
                    let zw: Vec<i32> =
                        if asym { (0..m).map(|_| (lcg(&mut s) % 256) as i32 - 128).collect() } else { vec![0] };
                    let zx = (lcg(&mut s) % 256) as i32 - if signed { 128 } else { 0 };
                    // The reference sees the i8 bits shifted into u8.
                    let xu: Vec<u8> = x.iter().map(|&v| if signed { v ^ 0x80 } else { v }).collect();
                    let zxu = if signed { zx + 128 } else { zx };
                    let mut want = vec![0i32; m * n];
                    reference_qgemm_wx(m, k, n, &w, &zw, &xu, zxu, &mut want);
                    let packed = PackedQW::new(kernel, &w, m, k, &zw).unwrap();
                    let mut px = PackedQX::default();
                    px.pack(&packed, &x, n, n, signed, zx).unwrap();
                    // Biases up to the i32 limits (quantizers saturate dead channels' biases;
                    // those rows take the i64 path), or all small (the in-register path).
                    for saturated in [true, false] {
                        let bias: Vec<i32> = (0..m)
                            .map(|i| match i % 5 {
                                0 if saturated => i32::MAX - (lcg(&mut s) % 100) as i32,
                                1 if saturated => i32::MIN + (lcg(&mut s) % 100) as i32,
                                _ => (lcg(&mut s) % 20_000) as i32 - 10_000,
                            })
                            .collect();
                        // Multipliers so large the f32 product would overflow the conversion too.
                        let multiplier: Vec<f32> = (0..m)
                            .map(|i| if i % 3 == 2 { 1e4 } else { 1e-4 * (1 + lcg(&mut s) % 200) as f32 })
                            .collect();
                        let q = Requantize { multiplier: &multiplier, bias: Some(&bias), zero: 3, signed };
                        let want_q: Vec<u8> = want.iter().enumerate().map(|(e, &a)| q.apply(e / n, a)).collect();
                        let tag = format!("{kernel} {m}x{k}x{n} signed={signed} asym={asym} saturated={saturated}");
                        for par in [Par::Seq, Par::Pool(&pool)] {
                            let mut got = vec![0i32; m * n];
                            qgemm_wx(&packed, &px, WxOut::I32 { c: &mut got, ldc: n }, par).unwrap();
                            assert_eq!(got, want, "{tag}");
                            let mut got = vec![0u8; m * n];
                            qgemm_wx(&packed, &px, WxOut::Requantized { c: &mut got, ldc: n, q }, par).unwrap();
                            assert_eq!(got, want_q, "{tag} requantized");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn extreme_values_do_not_overflow() {
        // Largest |sum|: x - zx = 255 and w - zw = -255 at every k.
        let (m, k, n) = (2, MAX_K, 3);
        let w = vec![-128i8; m * k];
        let x = vec![255u8; k * n];
        for kernel in QKernel::supported().into_iter().filter(|k| tile_of(*k).is_some()) {
            let packed = PackedQW::new(kernel, &w, m, k, &[127]).unwrap();
            let mut px = PackedQX::default();
            px.pack(&packed, &x, n, n, false, 0).unwrap();
            let mut got = vec![0i32; m * n];
            qgemm_wx(&packed, &px, WxOut::I32 { c: &mut got, ldc: n }, Par::Seq).unwrap();
            assert!(got.iter().all(|&v| v as i64 == -(255 * 255) * k as i64), "{kernel}: {got:?}");
        }
    }

    #[test]
    fn bad_shapes_are_errors() {
        let k = QKernel::Scalar;
        assert!(PackedQW::new(k, &[0; 6], 2, 4, &[0]).is_err());
        assert!(PackedQW::new(k, &[0; 8], 2, 4, &[0, 0, 0]).is_err());
        assert!(PackedQW::new(k, &[0; 8], 2, 4, &[200]).is_err());
        assert!(PackedQW::new(k, &vec![0; MAX_K + 1], 1, MAX_K + 1, &[0]).is_err());
        let w = PackedQW::new(k, &[0; 8], 2, 4, &[0]).unwrap();
        let mut px = PackedQX::default();
        assert!(px.pack(&w, &[0; 7], 2, 2, false, 0).is_err());
        assert!(px.pack(&w, &[0; 8], 2, 2, true, 130).is_err());
        px.pack(&w, &[0; 8], 2, 2, false, 0).unwrap();
        assert!(qgemm_wx(&w, &px, WxOut::I32 { c: &mut [0; 3], ldc: 2 }, Par::Seq).is_err());
        let q = Requantize { multiplier: &[1.0], bias: None, zero: 0, signed: false };
        assert!(qgemm_wx(&w, &px, WxOut::Requantized { c: &mut [0; 4], ldc: 2, q }, Par::Seq).is_err());
    }

    /// Kernel throughput on EfficientNet-lite0's pointwise shapes, packing included, on each
    /// kernel the host has: `cargo test --release -p slimnn-kernels --lib wx_speed -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    fn wx_speed() {
        let kernels =
            [QKernel::AvxVnni, QKernel::Avx512Vnni, QKernel::AmxInt8].into_iter().filter(|k| k.is_supported());
        let mut s = 3u64;
        for (kernel, (m, k, n)) in kernels.flat_map(|kernel| {
            [
                (32, 27, 12544),
                (16, 32, 12544),
                (96, 16, 12544),
                (24, 144, 3136),
                (144, 24, 3136),
                (80, 240, 784),
                (480, 80, 196),
                (1152, 192, 49),
                (192, 1152, 49),
            ]
            .map(|shape| (kernel, shape))
        }) {
            let w: Vec<i8> = (0..m * k).map(|_| lcg(&mut s) as u8 as i8).collect();
            let x: Vec<u8> = (0..k * n).map(|_| lcg(&mut s) as u8).collect();
            let packed = PackedQW::new(kernel, &w, m, k, &[0]).unwrap();
            let mut px = PackedQX::default();
            let mut c = vec![0u8; m * n];
            let multiplier = vec![1e-3; m];
            let q = Requantize { multiplier: &multiplier, bias: None, zero: 3, signed: false };
            let reps = (2e9 / (m * k * n) as f64).ceil() as usize;
            let (mut pack_t, mut gemm_t) = (0.0, 0.0);
            for _ in 0..reps {
                let t = std::time::Instant::now();
                px.pack(&packed, &x, n, n, false, 3).unwrap();
                pack_t += t.elapsed().as_secs_f64();
                let t = std::time::Instant::now();
                qgemm_wx(&packed, &px, WxOut::Requantized { c: &mut c, ldc: n, q }, Par::Seq).unwrap();
                gemm_t += t.elapsed().as_secs_f64();
            }
            let ops = 2.0 * (m * k * n) as f64 * reps as f64;
            println!(
                "{kernel} m={m} k={k} n={n}: gemm {:.0} GOP/s, pack {:.1} us/call, gemm {:.1} us/call",
                ops / gemm_t / 1e9,
                pack_t / reps as f64 * 1e6,
                gemm_t / reps as f64 * 1e6
            );
        }
    }
}

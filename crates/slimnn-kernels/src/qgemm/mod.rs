//! Integer GEMM: `u8 x i8 -> i32` with fused dequantize / requantize epilogues, activation
//! quantization, and weight-only (int8 per-channel, int4 group-wise) GEMMs that dequantize the
//! weights inside the micro-kernel.
//!
//! * A is row-major `m x k` u8 (stride `lda`) with zero points per tensor or per row, read in
//!   place (the last partial group of four values is assembled on the stack).
//! * B is a [`PackedQB`]: signed 8-bit weights with zero point 0 (symmetric), packed once for
//!   one [`QKernel`] into NR-wide column panels of `ceil(k/4)` groups of 4 consecutive K values
//!   per column (the operand layout of `vpdpbusd`), plus each column's sum for the activation
//!   zero-point correction: `sum_k (a - za) b = sum_k a b - za * colsum(b)`.
//! * The epilogue ([`QEpilogue`]) turns the exact i32 products into `act(acc * sa * sb + bias)
//!   + residual` as f32, or requantizes that to u8, or stores the corrected i32 as is.
//!
//! Kernels ([`QKernel`]): AVX-512 VNNI (`vpdpbusd` on zmm), AVX-VNNI (ymm), an AVX2 fallback
//! whose `vpmaddubsw` cannot saturate because A is split into its low 7 bits and its top bit
//! (each pair sum then fits i16), and a scalar reference. The tier ([`crate::cpu::tier`], capped
//! by `SLIMNN_CPU_TIER`) picks one; tests run every kernel the host supports. On the `amx` tier
//! (AMX-INT8 granted by the OS) [`qgemm`] runs on AMX tiles ([`amx`]); the convolution kernels
//! ([`wx`], [`dw`]) stay on AVX-512 VNNI there.

mod amx;
mod driver;
pub mod dw;
mod kernels;
pub mod quantize;
pub mod wonly;
pub mod wx;

use crate::cpu::{self, CpuTier};
use crate::error::KernelError;
use crate::gemm::{Activation, Par, Residual};

pub use quantize::{dequantize_u8, quantize_dynamic_u8, quantize_rows_u8, quantize_u8};
pub use wonly::{wgemm, PackedWeightOnly};
pub use wx::{qgemm_wx, PackedQW, PackedQX, Requantize, WxOut};

const KERNEL: &str = "qgemm";

/// An integer GEMM micro-kernel family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QKernel {
    /// Portable Rust.
    Scalar,
    /// AVX2 `vpmaddubsw` + `vpmaddwd` with A split so that no pair sum saturates.
    Avx2,
    /// AVX-VNNI `vpdpbusd` on 256-bit vectors.
    AvxVnni,
    /// AVX-512 VNNI `vpdpbusd` on 512-bit vectors.
    Avx512Vnni,
    /// AMX-INT8 `tdpbusd` on 16 x 64-byte tiles, finished with AVX-512.
    AmxInt8,
}

impl QKernel {
    pub const ALL: [QKernel; 5] =
        [QKernel::Scalar, QKernel::Avx2, QKernel::AvxVnni, QKernel::Avx512Vnni, QKernel::AmxInt8];

    /// The best kernel for `tier` on this host.
    pub fn for_tier(tier: CpuTier) -> QKernel {
        let f = cpu::features();
        match tier {
            CpuTier::Amx if QKernel::AmxInt8.is_supported() => QKernel::AmxInt8,
            CpuTier::Avx512 | CpuTier::Amx if f.avx512vnni => QKernel::Avx512Vnni,
            CpuTier::Avx512 | CpuTier::Amx | CpuTier::Avx2 if has_avx_vnni() => QKernel::AvxVnni,
            CpuTier::Avx512 | CpuTier::Amx | CpuTier::Avx2 => QKernel::Avx2,
            CpuTier::Generic => QKernel::Scalar,
        }
    }

    /// The kernel of the active tier.
    pub fn active() -> QKernel {
        QKernel::for_tier(cpu::tier())
    }

    /// The best vector (non-AMX) kernel of the active tier: the convolution kernels' family.
    pub fn active_vector() -> QKernel {
        QKernel::for_tier(cpu::tier().min(CpuTier::Avx512))
    }

    /// Whether the host can run this kernel (the tier cap aside).
    pub fn is_supported(self) -> bool {
        let f = cpu::features();
        let avx2 = CpuTier::Avx2.is_supported();
        match self {
            QKernel::Scalar => true,
            QKernel::Avx2 => avx2,
            QKernel::AvxVnni => avx2 && has_avx_vnni(),
            QKernel::Avx512Vnni => CpuTier::Avx512.is_supported() && f.avx512vnni,
            QKernel::AmxInt8 => CpuTier::Amx.is_supported() && f.avx512vnni,
        }
    }

    /// Every kernel the host supports (tests use this to cover each one).
    pub fn supported() -> Vec<QKernel> {
        QKernel::ALL.into_iter().filter(|k| k.is_supported()).collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            QKernel::Scalar => "scalar",
            QKernel::Avx2 => "avx2",
            QKernel::AvxVnni => "avx-vnni",
            QKernel::Avx512Vnni => "avx512-vnni",
            QKernel::AmxInt8 => "amx-int8",
        }
    }

    /// `(MR, NR)`: rows and columns of the micro-tile.
    pub(crate) fn tile(self) -> (usize, usize) {
        match self {
            QKernel::Scalar => (4, 16),
            QKernel::Avx2 => (4, 16),
            QKernel::AvxVnni => (6, 16),
            QKernel::Avx512Vnni => (8, 48),
            QKernel::AmxInt8 => (amx::MR, amx::NR),
        }
    }

    fn check(self) -> Result<(), KernelError> {
        if self.is_supported() {
            Ok(())
        } else {
            Err(KernelError::shape(KERNEL, format!("the {} kernel needs CPU features this host lacks", self.name())))
        }
    }
}

impl std::fmt::Display for QKernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

fn has_avx_vnni() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use std::sync::OnceLock;
        static AVX_VNNI: OnceLock<bool> = OnceLock::new();
        *AVX_VNNI.get_or_init(|| std::is_x86_feature_detected!("avxvnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// One cache line of bytes.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// A 64-byte aligned byte buffer.
#[derive(Clone, Default)]
pub(crate) struct AlignedBytes {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedBytes {
    pub(crate) fn zeroed(len: usize) -> Self {
        AlignedBytes { lines: vec![Line([0; 64]); len.div_ceil(64)], len }
    }
    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: `lines` holds at least `len` bytes and `Line` is a plain byte array.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<u8>(), self.len) }
    }
    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, with a unique borrow.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

/// Signed 8-bit weights `B` (`k x n`, zero point 0) packed once for one [`QKernel`].
///
/// Panels of `nr` columns follow one another (each starting on a cache line); a panel holds
/// `ceil(k/4)` groups (for AMX rounded up to whole 16-group tiles), each `nr` columns of 4
/// consecutive K values, zero-padded in K and N.
/// Valid only on the machine that packed it: never serialise it.
#[derive(Clone)]
pub struct PackedQB {
    kernel: QKernel,
    k: usize,
    n: usize,
    nr: usize,
    panel_stride: usize,
    data: AlignedBytes,
    col_sums: Vec<i32>,
}

impl std::fmt::Debug for PackedQB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQB").field("kernel", &self.kernel).field("k", &self.k).field("n", &self.n).finish()
    }
}

impl PackedQB {
    /// Packs row-major `b` (`k x n`, row stride `ldb`; ONNX `MatMulInteger`'s layout) for the
    /// active kernel.
    pub fn new(b: &[i8], k: usize, n: usize, ldb: usize) -> Result<Self, KernelError> {
        Self::with_kernel(QKernel::active(), b, k, n, ldb, false)
    }

    /// Packs `B` given transposed: `bt` is `n x k` (row stride `ldbt`), e.g. a `[out, in]`
    /// weight.
    pub fn from_transposed(bt: &[i8], k: usize, n: usize, ldbt: usize) -> Result<Self, KernelError> {
        Self::with_kernel(QKernel::active(), bt, k, n, ldbt, true)
    }

    /// Packs for `kernel` (which the host must support); `transposed` as in
    /// [`PackedQB::from_transposed`].
    pub fn with_kernel(
        kernel: QKernel,
        b: &[i8],
        k: usize,
        n: usize,
        ld: usize,
        transposed: bool,
    ) -> Result<Self, KernelError> {
        kernel.check()?;
        let (rows, cols) = if transposed { (n, k) } else { (k, n) };
        check_matrix("B", b.len(), rows, cols, ld)?;
        let (_, nr) = kernel.tile();
        let kq = match kernel {
            QKernel::AmxInt8 => k.div_ceil(amx::KB) * amx::KB / 4,
            _ => k.div_ceil(4),
        };
        let too_big = || KernelError::shape(KERNEL, format!("packed B of {k} x {n} is too large"));
        let panel_stride = kq.checked_mul(nr * 4).map(|s| s.next_multiple_of(64)).ok_or_else(too_big)?;
        let total =
            panel_stride.checked_mul(n.div_ceil(nr)).filter(|&t| t <= isize::MAX as usize).ok_or_else(too_big)?;
        let mut data = AlignedBytes::zeroed(total);
        let mut col_sums = vec![0i32; n];
        let at = |kk: usize, j: usize| if transposed { b[j * ld + kk] } else { b[kk * ld + j] };
        let dst = data.as_mut_slice();
        for (j, sum) in col_sums.iter_mut().enumerate() {
            let (p, jj) = (j / nr, j % nr);
            for kk in 0..k {
                let v = at(kk, j);
                *sum += v as i32;
                dst[p * panel_stride + (kk / 4) * nr * 4 + jj * 4 + kk % 4] = v as u8;
            }
        }
        Ok(PackedQB { kernel, k, n, nr, panel_stride, data, col_sums })
    }

    pub fn kernel(&self) -> QKernel {
        self.kernel
    }
    pub fn k(&self) -> usize {
        self.k
    }
    pub fn n(&self) -> usize {
        self.n
    }
    /// `sum_k B[k][j]` per column.
    pub fn col_sums(&self) -> &[i32] {
        &self.col_sums
    }
    /// Unpacks `B[kk][j]` (tests and debugging).
    pub fn get(&self, kk: usize, j: usize) -> Option<i8> {
        if kk >= self.k || j >= self.n {
            return None;
        }
        let off = (j / self.nr) * self.panel_stride + (kk / 4) * self.nr * 4 + (j % self.nr) * 4 + kk % 4;
        self.data.as_slice().get(off).map(|&v| v as i8)
    }
    /// Bytes held (packed weights and column sums).
    pub fn bytes(&self) -> usize {
        self.data.as_slice().len() + self.col_sums.len() * 4
    }
}

/// A value per tensor or one per row of A.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum PerRow<'a, T> {
    Tensor(T),
    Rows(&'a [T]),
}

impl<T: Copy> PerRow<'_, T> {
    #[inline]
    pub(crate) fn at(&self, i: usize) -> T {
        match self {
            PerRow::Tensor(v) => *v,
            PerRow::Rows(r) => r[i],
        }
    }
    fn check(&self, m: usize, what: &str) -> Result<(), KernelError> {
        match self {
            PerRow::Rows(r) if r.len() < m => {
                Err(KernelError::epilogue(KERNEL, format!("{what} has {} values for {m} rows", r.len())))
            }
            _ => Ok(()),
        }
    }
}

/// How the quantized product becomes the output: with `acc = sum_k (A[i][k] - za_i) B[k][j]`,
///
/// * f32 and u8 outputs: `y = act(acc * (a_scale_i * b_scale_j) + bias_j) + residual_ij`
///   (the scale product is rounded to f32 first, as ONNX Runtime's `Mul` of the two scales);
///   u8 outputs are then `saturate(round_half_even(y / out_scale) + out_zero)`; with
///   [`Outliers`], `acc * (a_scale_i * b_scale_j)` first takes `x_o[i][t] * w_o[t][j]` for
///   `t = 0, 1, ...` (one fused multiply-add each), then the bias;
/// * i32 outputs: `acc` (`MatMulInteger` with A's zero point; the rest is ignored).
#[derive(Clone, Copy, Debug)]
pub struct QEpilogue<'a> {
    pub a_zero: PerRow<'a, i32>,
    pub a_scale: PerRow<'a, f32>,
    /// One value (per tensor) or `n` values (per output channel).
    pub b_scale: &'a [f32],
    pub bias: Option<&'a [f32]>,
    pub activation: Activation,
    pub residual: Option<Residual<'a>>,
    pub outliers: Option<Outliers<'a>>,
}

/// Input channels kept out of the integer product (LLM.int8()'s outlier channels: a few
/// channels whose range would coarsen every other channel's static scale) and added back in
/// float, before the bias: A's codes there meet zero weights.
#[derive(Clone, Copy, Debug)]
pub struct Outliers<'a> {
    /// Their float values, `m x k` at row stride `ld`.
    pub x: &'a [f32],
    pub ld: usize,
    /// Their weight rows, `k x n` row-major.
    pub w: &'a [f32],
    pub k: usize,
}

impl Outliers<'_> {
    /// `y[j] += x[i][t] * w[t][j]` for each `t` in order, on a row slice starting at column `j0`.
    #[inline(always)]
    pub(crate) fn add_row(&self, i: usize, n: usize, j0: usize, y: &mut [f32]) {
        for t in 0..self.k {
            let xv = self.x[i * self.ld + t];
            for (o, &w) in y.iter_mut().zip(&self.w[t * n + j0..]) {
                *o = xv.mul_add(w, *o);
            }
        }
    }
}

impl<'a> QEpilogue<'a> {
    /// Per-tensor activation quantization (`scale`, `zero`) and weight scales `b_scale`.
    pub fn new(a_scale: f32, a_zero: i32, b_scale: &'a [f32]) -> Self {
        QEpilogue {
            a_zero: PerRow::Tensor(a_zero),
            a_scale: PerRow::Tensor(a_scale),
            b_scale,
            bias: None,
            activation: Activation::None,
            residual: None,
            outliers: None,
        }
    }
    pub fn with_bias(mut self, bias: &'a [f32]) -> Self {
        self.bias = Some(bias);
        self
    }
    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }
    pub fn with_residual(mut self, data: &'a [f32], ld: usize) -> Self {
        self.residual = Some(Residual { data, ld });
        self
    }
    pub fn with_outliers(mut self, outliers: Outliers<'a>) -> Self {
        self.outliers = Some(outliers);
        self
    }
}

/// Where a quantized GEMM writes: `m x n` row-major with row stride `ldc`.
#[derive(Debug)]
pub enum QOutput<'a> {
    F32 { c: &'a mut [f32], ldc: usize },
    U8 { c: &'a mut [u8], ldc: usize, scale: f32, zero: u8 },
    I32 { c: &'a mut [i32], ldc: usize },
}

impl QOutput<'_> {
    fn extent(&self) -> (usize, usize) {
        match self {
            QOutput::F32 { c, ldc } => (c.len(), *ldc),
            QOutput::U8 { c, ldc, .. } => (c.len(), *ldc),
            QOutput::I32 { c, ldc } => (c.len(), *ldc),
        }
    }
}

fn check_matrix(what: &str, len: usize, rows: usize, cols: usize, ld: usize) -> Result<(), KernelError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if ld < cols {
        return Err(KernelError::shape(KERNEL, format!("{what}: leading dimension {ld} < {cols} columns")));
    }
    let need = (rows - 1).checked_mul(ld).and_then(|x| x.checked_add(cols));
    match need {
        Some(need) if need <= len => Ok(()),
        _ => {
            Err(KernelError::shape(KERNEL, format!("{what}: {len} values cannot hold {rows} x {cols} at stride {ld}")))
        }
    }
}

pub(crate) fn check_epilogue(m: usize, n: usize, ep: &QEpilogue<'_>, float_out: bool) -> Result<(), KernelError> {
    ep.a_zero.check(m, "A zero points")?;
    ep.a_scale.check(m, "A scales")?;
    if !float_out {
        return Ok(());
    }
    if ep.b_scale.len() != 1 && ep.b_scale.len() != n {
        return Err(KernelError::epilogue(KERNEL, format!("{} B scales for {n} columns", ep.b_scale.len())));
    }
    if let Some(b) = ep.bias {
        if b.len() != n {
            return Err(KernelError::epilogue(KERNEL, format!("bias has {} values for {n} columns", b.len())));
        }
    }
    if let Some(r) = ep.residual {
        check_matrix("residual", r.data.len(), m, n, r.ld)?;
    }
    if let Some(o) = ep.outliers {
        check_matrix("outlier values", o.x.len(), m, o.k, o.ld)?;
        check_matrix("outlier weights", o.w.len(), o.k, n, n)?;
    }
    if let Activation::Clip { min, max } = ep.activation {
        if min.is_nan() || max.is_nan() || min > max {
            return Err(KernelError::epilogue(KERNEL, format!("clip range [{min}, {max}] is empty")));
        }
    }
    Ok(())
}

/// `out = epilogue(A·B)` for u8 `A` (`m x b.k()`, stride `lda`) and packed i8 `B`, on `b`'s
/// kernel.
pub fn qgemm(
    m: usize,
    a: &[u8],
    lda: usize,
    b: &PackedQB,
    out: QOutput<'_>,
    ep: &QEpilogue<'_>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    b.kernel.check()?;
    let (k, n) = (b.k, b.n);
    check_matrix("A", a.len(), m, k, lda)?;
    let (len, ldc) = out.extent();
    check_matrix("C", len, m, n, ldc)?;
    check_epilogue(m, n, ep, !matches!(out, QOutput::I32 { .. }))?;
    driver::run(m, a, lda, b, out, ep, par);
    Ok(())
}

/// Scalar reference for [`qgemm`] on an unpacked row-major `b` (`k x n`, stride `ldb`), in
/// f64 for the float epilogue parts except the scale product (f32, as in [`QEpilogue`]).
#[allow(clippy::too_many_arguments)]
pub fn reference_qgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[u8],
    lda: usize,
    b: &[i8],
    ldb: usize,
    out: QOutput<'_>,
    ep: &QEpilogue<'_>,
) -> Result<(), KernelError> {
    check_matrix("A", a.len(), m, k, lda)?;
    check_matrix("B", b.len(), k, n, ldb)?;
    let (len, ldc) = out.extent();
    check_matrix("C", len, m, n, ldc)?;
    check_epilogue(m, n, ep, !matches!(out, QOutput::I32 { .. }))?;
    let mut out = out;
    for i in 0..m {
        let za = ep.a_zero.at(i);
        for j in 0..n {
            let acc: i32 = (0..k).map(|kk| (a[i * lda + kk] as i32 - za) * b[kk * ldb + j] as i32).sum();
            let y = || {
                let s = ep.a_scale.at(i) * ep.b_scale[if ep.b_scale.len() == 1 { 0 } else { j }];
                let mut y = acc as f32 * s;
                if let Some(o) = ep.outliers {
                    for t in 0..o.k {
                        y = o.x[i * o.ld + t].mul_add(o.w[t * n + j], y);
                    }
                }
                if let Some(bias) = ep.bias {
                    y += bias[j];
                }
                let mut y = crate::reference::activation(ep.activation, y as f64) as f32;
                if let Some(r) = ep.residual {
                    y += r.data[i * r.ld + j];
                }
                y
            };
            match &mut out {
                QOutput::I32 { c, ldc } => c[i * *ldc + j] = acc,
                QOutput::F32 { c, ldc } => c[i * *ldc + j] = y(),
                QOutput::U8 { c, ldc, scale, zero } => {
                    c[i * *ldc + j] = ((y() / *scale).round_ties_even() + *zero as f32).clamp(0.0, 255.0) as u8
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;

//! Integer lowering of quantized graphs onto `slimnn_kernels::qgemm`, recognised by meaning:
//!
//! * ONNX Runtime's dynamic (QOperator) form: `DynamicQuantizeLinear(x)` runs as one vectorised
//!   quantization step; `MatMulInteger(xq, Wq, xz, 0) -> Cast(float) -> Mul(·, x_scale *
//!   w_scale) [-> Add bias] [-> activation] [-> Add residual]` becomes one u8 x i8 GEMM whose
//!   epilogue applies the zero-point correction, the scale product, bias, activation and
//!   residual. A `MatMulInteger` without that tail runs on the same kernel with i32 output.
//! * The QDQ form: `MatMul(DequantizeLinear(xq, s, z), DequantizeLinear(Wq const, ws, 0))`
//!   becomes the same GEMM on `xq` and `Wq` (constant per-tensor `s`, `z`), never
//!   dequantizing either operand. `QuantizeLinear` / `DequantizeLinear` of activations with
//!   constant per-tensor parameters run as vectorised steps.
//!
//! * slimnn's per-token form: `DynamicRowQuantMatMul(x, Wq, ws) [-> Add bias] [-> activation]
//!   [-> Add residual]` quantizes x's rows (a scale and zero point each) into scratch, then runs
//!   the same GEMM with per-row parameters in the epilogue.
//!
//! Weights must be symmetric (zero point 0) i8, per tensor or per output column; activations
//! u8 per tensor. Anything else is left to the other lowerings or the reference evaluator.

use super::{fuse_tail, out0, Ctx, Group};
use crate::plan::{Fusion, Kernel};
use crate::{Result, RuntimeError};
use rayon::prelude::*;
use slimnn_ir::ops::{
    Binary, BinaryOp, Cast, DequantizeLinear, Gather, GatherBlockQuantized, MatMul, MatMulNBits, QuantizeLinear,
};
use slimnn_ir::{NodeId, Op, OutletId};
use slimnn_kernels::qgemm::{self, Outliers, PackedQB, PackedWeightOnly, PerRow, QEpilogue, QOutput};
use slimnn_kernels::{Activation, Epilogue, KernelError, Par};
use slimnn_tensor::{DType, Tensor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Quantized weights packed once per runnable, keyed by their constant tensor's address.
#[derive(Default)]
pub(crate) struct QPackCache(
    Mutex<HashMap<(Vec<usize>, bool), PackedConcat>>,
    Mutex<HashMap<usize, Packed<PackedWeightOnly>>>,
);

/// A packed weight and the constant it came from (kept alive so its address stays unique).
type Packed<P> = (Arc<Tensor>, Arc<P>);
/// Weights packed side by side, and their constants.
type PackedConcat = (Vec<Arc<Tensor>>, Arc<PackedQB>);

impl QPackCache {
    /// `w` is i8 `[k, n]` (or `[n, k]` when `transposed`).
    fn get(&self, w: &Arc<Tensor>, transposed: bool) -> Result<Arc<PackedQB>> {
        self.get_concat(std::slice::from_ref(w), transposed)
    }

    /// `[w0 | w1 | ...]`: i8 weights with the same rows side by side (one weight only when
    /// `transposed`).
    fn get_concat(&self, ws: &[Arc<Tensor>], transposed: bool) -> Result<Arc<PackedQB>> {
        let key = (ws.iter().map(|w| Arc::as_ptr(w) as usize).collect(), transposed);
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = map.get(&key) {
            return Ok(p.clone());
        }
        let packed = match ws {
            [w] => {
                let data = w.as_slice::<i8>()?;
                let (r, c) = (w.shape()[0], w.shape()[1]);
                if transposed {
                    PackedQB::from_transposed(data, c, r, c)?
                } else {
                    PackedQB::new(data, r, c, c)?
                }
            }
            _ => {
                let (data, k, n) = super::side_by_side::<i8>(ws)?;
                PackedQB::new(&data, k, n, n)?
            }
        };
        let p = Arc::new(packed);
        map.insert(key, (ws.to_vec(), p.clone()));
        Ok(p)
    }

    /// `MatMulNBits`' constant codes `b` with their scales and zero points.
    fn get_nbits(
        &self,
        op: &MatMulNBits,
        b: &Arc<Tensor>,
        scales: &Tensor,
        zeros: Option<&Tensor>,
    ) -> Result<Arc<PackedWeightOnly>> {
        let key = Arc::as_ptr(b) as usize;
        let mut map = self.1.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, p)) = map.get(&key) {
            return Ok(p.clone());
        }
        let zeros = zeros.map(|z| z.as_slice::<u8>()).transpose()?;
        let (bits, k, n, block) = (op.bits, op.k, op.n, op.block_size);
        let packed =
            PackedWeightOnly::from_nbits(bits, k, n, block, b.as_slice::<u8>()?, scales.as_slice::<f32>()?, zeros)?;
        let p = Arc::new(packed);
        map.insert(key, (b.clone(), p.clone()));
        Ok(p)
    }
}

/// A lowered integer step.
#[derive(Debug)]
pub enum QuantKernel {
    /// `DynamicQuantizeLinear`: f32 -> (u8, scale, zero point), per tensor.
    DynamicQuantize,
    /// `QuantizeLinear` to u8 with constant per-tensor parameters, of `x` or (`channel`) of
    /// `Mul(x, channel)` with a constant per-channel (last axis) multiplier.
    Quantize { scale: f32, zero: u8, channel: Option<Arc<[f32]>> },
    /// `DequantizeLinear` of u8 with constant per-tensor parameters.
    Dequantize { scale: f32, zero: u8 },
    /// A u8 x i8 GEMM with its fused epilogue.
    MatMul(QMatMul),
    /// f32 rows quantized to u8 each with its own scale and zero point, then a u8 x i8 GEMM:
    /// `DynamicRowQuantMatMul`; inputs `[x, residual?]`.
    RowQuant(RowQuantMatMul),
    /// Rows of a block-quantized table dequantized to f32: `GatherBlockQuantized` [-> `Cast`
    /// to f32]; inputs `[indices]`.
    GatherBlock(GatherBlock),
    /// f32 x weight-only (4- or 8-bit, block-quantized) GEMM: `MatMulNBits`; inputs `[a,
    /// residual?]`.
    WeightOnly(WeightOnlyMatMul),
    /// `QLinearConv` on the convolution kernels, exactly; inputs `[x]`.
    Conv(Box<QLinearConvKernel>),
}

/// `QLinearConv`, exactly. Pointwise and `group == 1` convolutions run on the integer GEMM
/// with the weights on the left ([`qgemm::wx`], VNNI hosts): u8 x i8 products summed in i32,
/// requantized as the tile is stored. Otherwise (depthwise, or hosts without VNNI) the integer
/// arithmetic is carried by f32: the centred input `x - x_zero` and weights `w - w_zero` are
/// small integers, so the f32 convolution's products and sums are exact while every partial
/// sum stays below 2^24, which [`match_qlinear_conv`] proves from the weights (else the node
/// stays on the reference evaluator). Either way the requantization is the reference's (ONNX
/// Runtime's): `round_even(f32(acc + bias) * (x_scale * w_scale[c] / y_scale)) + y_zero`,
/// where `f32(acc + bias)` is the one rounding of the exact sum.
#[derive(Debug)]
pub struct QLinearConvKernel {
    /// Weights `w - w_zero` as f32, no bias.
    conv: crate::conv::ConvKernel,
    /// The weights packed for the integer GEMM, when it runs this convolution.
    int8: Option<qgemm::PackedQW>,
    /// Depthwise weights (zero point 0) packed for the 8-bit depthwise kernel, when it runs
    /// this convolution.
    dw_int8: Option<Arc<qgemm::dw::DwPacked>>,
    bias: Option<Arc<[i32]>>,
    x_zero: i32,
    /// One multiplier per output channel.
    multipliers: Arc<[f32]>,
    y_zero: i32,
    y_dtype: DType,
}

impl QLinearConvKernel {
    /// `y` is the output's buffer (any contents: every value is written).
    fn run(&self, x: &Tensor, shape: Vec<usize>, mut y: Vec<u8>, par: bool) -> Result<Vec<Tensor>> {
        let images = shape.first().copied().unwrap_or(1).max(1);
        let (in_len, out_len) = (x.len() / images, shape.iter().product::<usize>() / images);
        y.resize(images * out_len, 0);
        let bytes: &[u8] = match x.dtype() {
            DType::U8 => x.as_slice::<u8>()?,
            // SAFETY: i8 and u8 have the same size and alignment; the bits are reinterpreted.
            _ => unsafe { std::mem::transmute::<&[i8], &[u8]>(x.as_slice::<i8>()?) },
        };
        let signed = x.dtype() == DType::I8;
        let one = |i: usize, yi: &mut [u8], par: bool| -> Result<()> {
            let xi = &bytes[i * in_len..(i + 1) * in_len];
            if let Some(w) = &self.int8 {
                return self.run_int8(w, xi, signed, yi, par);
            }
            if let Some(w) = &self.dw_int8 {
                let gp = if par { Par::Current } else { Par::Seq };
                let input = qgemm::dw::DwInput { data: xi, signed, zero: self.x_zero };
                return Ok(qgemm::dw::depthwise_u8_packed(w, input, &self.requantize(), yi, gp)?);
            }
            if self.conv.method == crate::conv::ConvMethod::Depthwise {
                // Centred as each plane is padded, requantized as each plane is done.
                let finish = |c: usize, sums: &[f32], o: &mut [u8]| self.requantize_plane(c, sums, o);
                return self.conv.depthwise_8bit(xi, signed, self.x_zero, yi, finish, par);
            }
            QCONV_SCRATCH.with(|s| {
                // A task stolen while this thread waits inside `conv.run` finds the scratch
                // taken: it gets its own.
                let mut own = (Vec::new(), Vec::new());
                let mut held = s.try_borrow_mut();
                let (xf, acc) = match held.as_mut() {
                    Ok(b) => &mut **b,
                    Err(_) => &mut own,
                };
                xf.resize(in_len, 0.0);
                acc.resize(out_len, 0.0);
                self.centre(xi, signed, xf);
                self.conv.run(xf, None, acc, par)?;
                let plane = out_len / self.multipliers.len().max(1);
                for (c, (o, a)) in yi.chunks_mut(plane).zip(acc.chunks(plane)).enumerate() {
                    self.requantize_plane(c, a, o);
                }
                Ok(())
            })
        };
        if par && images > 1 {
            y.par_chunks_mut(out_len).enumerate().try_for_each(|(i, yi)| one(i, yi, false))?;
        } else {
            y.chunks_mut(out_len).enumerate().try_for_each(|(i, yi)| one(i, yi, par))?;
        }
        let t = match self.y_dtype {
            DType::U8 => Tensor::from_vec(shape, y)?,
            _ => {
                let mut y = std::mem::ManuallyDrop::new(y);
                // SAFETY: the same allocation reinterpreted: i8 and u8 have one size and
                // alignment, and the outputs were written as i8 bit patterns.
                let y = unsafe { Vec::from_raw_parts(y.as_mut_ptr() as *mut i8, y.len(), y.capacity()) };
                Tensor::from_vec(shape, y)?
            }
        };
        Ok(vec![t])
    }

    /// One image on the integer GEMM: its columns (the image itself for 1x1; else im2col,
    /// padded with the zero point as `QLinearConv` pads) packed, multiplied, requantized.
    /// The integer kernels' requantization: this node's.
    fn requantize(&self) -> qgemm::Requantize<'_> {
        qgemm::Requantize {
            multiplier: &self.multipliers,
            bias: self.bias.as_deref(),
            zero: self.y_zero,
            signed: self.y_dtype == DType::I8,
        }
    }

    fn run_int8(&self, w: &qgemm::PackedQW, x: &[u8], signed: bool, y: &mut [u8], par: bool) -> Result<()> {
        let g = &self.conv.geom;
        let n = g.oh * g.ow;
        let q = self.requantize();
        let gp = if par { Par::Current } else { Par::Seq };
        QCONV_INT_SCRATCH.with(|s| {
            let mut own = Default::default();
            let mut held = s.try_borrow_mut();
            let (packed, cols): &mut (qgemm::PackedQX, Vec<u8>) = match held.as_mut() {
                Ok(b) => b,
                Err(_) => &mut own,
            };
            let src = if self.conv.method == crate::conv::ConvMethod::Pointwise {
                x
            } else {
                cols.resize(w.k() * n, self.x_zero as u8);
                crate::conv::im2col_into(g, x, self.x_zero as u8, cols, par);
                &cols[..]
            };
            packed.pack_par(w, src, n, n, signed, self.x_zero, gp)?;
            qgemm::qgemm_wx(w, packed, qgemm::WxOut::Requantized { c: y, ldc: n, q }, gp)?;
            Ok(())
        })
    }

    /// `x - x_zero` as f32 into `xf` (its length); `signed`: `x` holds i8 bits.
    fn centre(&self, x: &[u8], signed: bool, xf: &mut [f32]) {
        #[inline(always)]
        fn body(x: &[u8], signed: bool, z: f32, xf: &mut [f32]) {
            if signed {
                xf.iter_mut().zip(x).for_each(|(o, &v)| *o = v as i8 as f32 - z);
            } else {
                xf.iter_mut().zip(x).for_each(|(o, &v)| *o = v as f32 - z);
            }
        }
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(x: &[u8], signed: bool, z: f32, xf: &mut [f32]) {
            body(x, signed, z, xf)
        }
        #[cfg(target_arch = "x86_64")]
        if slimnn_kernels::cpu::tier() >= slimnn_kernels::CpuTier::Avx2 {
            // SAFETY: every tier from AVX2 up has AVX2 and FMA.
            return unsafe { avx2(x, signed, self.x_zero as f32, xf) };
        }
        body(x, signed, self.x_zero as f32, xf)
    }

    /// Output channel `c`'s exact sums to 8-bit outputs (i8 ones as their bit patterns).
    fn requantize_plane(&self, c: usize, acc: &[f32], y: &mut [u8]) {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(k: &QLinearConvKernel, c: usize, acc: &[f32], y: &mut [u8]) {
            k.requantize_body(c, acc, y)
        }
        #[cfg(target_arch = "x86_64")]
        if slimnn_kernels::cpu::tier() >= slimnn_kernels::CpuTier::Avx2 {
            // SAFETY: as in `centre`; the same operations, so the same results.
            return unsafe { avx2(self, c, acc, y) };
        }
        self.requantize_body(c, acc, y)
    }

    #[inline(always)]
    fn requantize_body(&self, c: usize, acc: &[f32], y: &mut [u8]) {
        // The integer kernels' rounding, on sums carried exactly by f32.
        let q = self.requantize();
        let mult = self.multipliers[c];
        let b = self.bias.as_ref().map_or(0, |b| b[c]);
        if (b as f32) as i64 == b as i64 {
            // An f32 bias: one f32 addition rounds the exact sum once.
            let bf = b as f32;
            y.iter_mut().zip(acc).for_each(|(o, &a)| *o = q.finish(a + bf, mult));
        } else {
            let bd = b as f64;
            y.iter_mut().zip(acc).for_each(|(o, &a)| *o = q.finish((a as f64 + bd) as f32, mult));
        }
    }
}

thread_local! {
    /// A `QLinearConv` image's packed columns (and im2col ones), reused across calls.
    static QCONV_INT_SCRATCH: std::cell::RefCell<(qgemm::PackedQX, Vec<u8>)> = std::cell::RefCell::new(Default::default());
    /// A `QLinearConv` image's centred f32 input and its sums, reused across calls.
    static QCONV_SCRATCH: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

#[derive(Debug)]
pub struct GatherBlock {
    op: GatherBlockQuantized,
    data: Arc<Tensor>,
    /// The table's scales as f32 (converted once from f16), `[rows, blocks]`.
    scales: Arc<[f32]>,
    zeros: Option<Arc<Tensor>>,
    cols: usize,
    /// The output is the f16 product cast back to f32 (`GatherBlockQuantized` with f16 scales
    /// and its `Cast`): round each value through f16 as the graph does.
    through_f16: bool,
}

#[derive(Debug)]
pub struct RowQuantMatMul {
    packed: Arc<PackedQB>,
    b_scale: Arc<[f32]>,
    bias: Option<Arc<[f32]>>,
    activation: Activation,
    residual: bool,
}

#[derive(Debug)]
pub struct WeightOnlyMatMul {
    packed: Arc<PackedWeightOnly>,
    bias: Option<Arc<[f32]>>,
    activation: Activation,
    residual: bool,
}

/// Where one of A's quantization parameters comes from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Param<T> {
    Const(T),
    /// A scalar input of the step, at this index.
    Input(usize),
}

/// A's per-tensor quantization: constants (QDQ) or `DynamicQuantizeLinear`'s outputs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AParams {
    pub scale: Param<f32>,
    pub zero: Param<i32>,
}

/// Where a [`QMatMul`]'s outlier channels come from: input `input` holds their values, or
/// (with `channels`) the whole f32 activation they are picked from; `w` their weight rows.
#[derive(Debug)]
pub struct OutlierInput {
    input: usize,
    channels: Option<Arc<[usize]>>,
    w: Arc<Tensor>,
}

#[derive(Debug)]
pub struct QMatMul {
    packed: Arc<PackedQB>,
    a: AParams,
    /// Weight scales (1 or n values); absent for the i32 output of a bare `MatMulInteger`.
    b_scale: Option<Arc<[f32]>>,
    bias: Option<Arc<[f32]>>,
    activation: Activation,
    /// Input index of the residual, if fused.
    residual: Option<usize>,
    /// Outlier channels added back in float (see [`qgemm::Outliers`]).
    outliers: Option<OutlierInput>,
    /// `QLinearMatMul`: u8 output `saturate(round(acc * b_scale_j) + zero)`, where `b_scale`
    /// holds the multipliers `a_scale * w_scale_j / y_scale` (rounded as ONNX Runtime does).
    requantize: Option<u8>,
}

impl QuantKernel {
    pub fn name(&self) -> String {
        match self {
            QuantKernel::DynamicQuantize => "quantize_dynamic_u8".into(),
            QuantKernel::Quantize { channel: None, .. } => "quantize_u8".into(),
            QuantKernel::Quantize { channel: Some(_), .. } => "mul_channels+quantize_u8".into(),
            QuantKernel::Dequantize { .. } => "dequantize_u8".into(),
            QuantKernel::WeightOnly(w) => {
                let mut s = format!("wgemm_int{}_g{}", w.packed.bits(), w.packed.block());
                if w.bias.is_some() {
                    s.push_str("+bias");
                }
                if w.activation != Activation::None {
                    s.push_str(&format!("+{:?}", w.activation).to_lowercase());
                }
                if w.residual {
                    s.push_str("+residual");
                }
                s
            }
            QuantKernel::GatherBlock(gb) => format!("gather_dequantize_int{}_b{}", gb.op.bits, gb.op.block_size),
            QuantKernel::Conv(k) if k.int8.is_some() || k.dw_int8.is_some() => {
                format!("qlinear_{}_int8", k.conv.name())
            }
            QuantKernel::Conv(k) => format!("qlinear_{}", k.conv.name()),
            QuantKernel::RowQuant(q) => {
                let mut s = format!("quantize_rows_u8+qgemm_u8i8_{}", q.packed.kernel());
                if q.bias.is_some() {
                    s.push_str("+bias");
                }
                if q.activation != Activation::None {
                    s.push_str(&format!("+{:?}", q.activation).to_lowercase());
                }
                if q.residual {
                    s.push_str("+residual");
                }
                s
            }
            QuantKernel::MatMul(q) => {
                let mut s = format!("qgemm_u8i8_{}", q.packed.kernel());
                if q.b_scale.is_none() {
                    s.push_str("+i32");
                }
                if q.requantize.is_some() {
                    s.push_str("+requantize");
                }
                if q.bias.is_some() {
                    s.push_str("+bias");
                }
                if q.activation != Activation::None {
                    s.push_str(&format!("+{:?}", q.activation).to_lowercase());
                }
                if q.residual.is_some() {
                    s.push_str("+residual");
                }
                if let Some(o) = &q.outliers {
                    s.push_str(&format!("+outliers{}", o.w.shape()[0]));
                }
                s
            }
        }
    }

    /// Whether the (first) output is f32 from the runtime's buffer pool.
    pub fn f32_output(&self) -> bool {
        match self {
            QuantKernel::Dequantize { .. }
            | QuantKernel::WeightOnly(_)
            | QuantKernel::RowQuant(_)
            | QuantKernel::GatherBlock(_) => true,
            QuantKernel::MatMul(q) => q.b_scale.is_some() && q.requantize.is_none(),
            _ => false,
        }
    }

    /// Whether the first output holds 8-bit values in a pooled buffer (see [`Self::run`]).
    pub fn byte_output(&self) -> bool {
        match self {
            QuantKernel::DynamicQuantize | QuantKernel::Quantize { .. } | QuantKernel::Conv(_) => true,
            QuantKernel::MatMul(q) => q.b_scale.is_some() && q.requantize.is_some(),
            _ => false,
        }
    }

    /// Runs the step; `out` is a pooled buffer of the output's size when [`Self::f32_output`],
    /// `bytes` one when [`Self::byte_output`] (either may hold stale values: it is overwritten).
    pub fn run(
        &self,
        ins: &[&Tensor],
        shape: &[usize],
        mut out: Vec<f32>,
        mut bytes: Vec<u8>,
        par: bool,
    ) -> Result<Vec<Tensor>> {
        let shape = shape.to_vec();
        match self {
            QuantKernel::DynamicQuantize => {
                let x = ins[0].as_slice::<f32>()?;
                bytes.resize(x.len(), 0);
                let (scale, zero) = quantize_dynamic(x, &mut bytes, par)?;
                Ok(vec![Tensor::from_vec(shape, bytes)?, Tensor::scalar(scale), Tensor::scalar(zero)])
            }
            QuantKernel::Quantize { scale, zero, channel: None } => {
                let x = ins[0].as_slice::<f32>()?;
                bytes.resize(x.len(), 0);
                chunked(x, &mut bytes, 1, par, |x, q| qgemm::quantize_u8(x, *scale, *zero, q))?;
                Ok(vec![Tensor::from_vec(shape, bytes)?])
            }
            QuantKernel::Quantize { scale, zero, channel: Some(c) } => {
                let x = ins[0].as_slice::<f32>()?;
                let k = c.len();
                bytes.resize(x.len(), 0);
                // Row by row through a scratch row: the product rounds to f32 as `Mul` does.
                chunked(x, &mut bytes, k, par, |x, q| {
                    let mut t = vec![0f32; k];
                    for (xr, qr) in x.chunks_exact(k).zip(q.chunks_exact_mut(k)) {
                        for ((t, &v), &m) in t.iter_mut().zip(xr).zip(c.iter()) {
                            *t = v * m;
                        }
                        qgemm::quantize_u8(&t, *scale, *zero, qr)?;
                    }
                    Ok(())
                })?;
                Ok(vec![Tensor::from_vec(shape, bytes)?])
            }
            QuantKernel::Dequantize { scale, zero } => {
                let q = ins[0].as_slice::<u8>()?;
                chunked(q, &mut out, 1, par, |q, o| qgemm::dequantize_u8(q, *scale, *zero, o))?;
                Ok(vec![Tensor::from_vec(shape, out)?])
            }
            QuantKernel::MatMul(mm) => mm.run(ins, shape, out, bytes, par),
            QuantKernel::RowQuant(rq) => rq.run(ins, shape, out, par),
            QuantKernel::GatherBlock(gb) => gb.run(ins[0], shape, out),
            QuantKernel::Conv(k) => k.run(ins[0], shape, bytes, par),
            QuantKernel::WeightOnly(w) => {
                let a = ins[0].as_slice::<f32>()?;
                let (k, n) = (w.packed.k(), w.packed.n());
                let m = a.len() / k.max(1);
                let mut ep = Epilogue::NONE.with_activation(w.activation);
                if let Some(b) = &w.bias {
                    ep = ep.with_bias(b);
                }
                if w.residual {
                    ep = ep.with_residual(ins[1].as_slice::<f32>()?, n);
                }
                let gpar = if par { Par::Current } else { Par::Seq };
                qgemm::wgemm(m, a, k, &w.packed, &mut out, n, ep, gpar)?;
                Ok(vec![Tensor::from_vec(shape, out)?])
            }
        }
    }
}

/// `f` over matching chunks of `x` and `out` made of whole rows of `row` values, one chunk per
/// thread when `par`.
fn chunked<A: Sync, B: Send>(
    x: &[A],
    out: &mut [B],
    row: usize,
    par: bool,
    f: impl Fn(&[A], &mut [B]) -> Result<(), KernelError> + Sync,
) -> Result<()> {
    if x.len() != out.len() || row == 0 || !x.len().is_multiple_of(row) {
        return Err(KernelError::Shape {
            kernel: "quantize",
            msg: format!("{} values in, {} out, in rows of {row}", x.len(), out.len()),
        }
        .into());
    }
    // One chunk of whole rows per thread, lined up with the row-split GEMMs and row ops around it.
    let chunk = crate::fast::rows_per_task(x.len() / row, row) * row;
    if par && x.len() > chunk {
        out.par_chunks_mut(chunk).zip(x.par_chunks(chunk)).try_for_each(|(o, x)| f(x, o))?;
    } else {
        f(x, out)?;
    }
    Ok(())
}

/// Per-tensor dynamic quantization, the range reduced over threads when large.
fn quantize_dynamic(x: &[f32], q: &mut [u8], par: bool) -> Result<(f32, u8)> {
    let chunk = crate::fast::rows_per_task(x.len(), 1);
    if !par || x.len() <= chunk {
        return Ok(qgemm::quantize_dynamic_u8(x, q)?);
    }
    // Each chunk's quantization is thrown away except for its range (quantize_dynamic_u8
    // reports it through the scale and zero point only), so reduce the range directly.
    let (lo, hi) = x
        .par_chunks(chunk)
        .map(|c| c.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v))))
        .reduce(|| (0.0, 0.0), |a, b| (a.0.min(b.0), a.1.max(b.1)));
    let (scale, zero) = qgemm::quantize::dynamic_params(lo, hi);
    chunked(x, q, 1, true, |x, q| qgemm::quantize_u8(x, scale, zero, q))?;
    Ok((scale, zero))
}

fn scalar_of<T: Copy + slimnn_tensor::IntoData>(t: &Tensor, what: &str) -> Result<T> {
    match t.as_slice::<T>()? {
        [v] => Ok(*v),
        s => Err(RuntimeError::Kernel(KernelError::Shape {
            kernel: "qgemm",
            msg: format!("{what} must hold one value, got {}", s.len()),
        })),
    }
}

impl QMatMul {
    fn run(
        &self,
        ins: &[&Tensor],
        shape: Vec<usize>,
        mut out: Vec<f32>,
        mut bytes: Vec<u8>,
        par: bool,
    ) -> Result<Vec<Tensor>> {
        let a = ins[0].as_slice::<u8>()?;
        let (k, n) = (self.packed.k(), self.packed.n());
        let m = a.len().checked_div(k).unwrap_or_else(|| shape.iter().product::<usize>() / n.max(1));
        let a_scale = match self.a.scale {
            Param::Const(v) => v,
            Param::Input(i) => scalar_of::<f32>(ins[i], "A scale")?,
        };
        let a_zero = match self.a.zero {
            Param::Const(v) => v,
            Param::Input(i) => scalar_of::<u8>(ins[i], "A zero point")? as i32,
        };
        let gpar = if par { Par::Current } else { Par::Seq };
        let Some(b_scale) = &self.b_scale else {
            let mut c = vec![0i32; m * n];
            let ep = QEpilogue::new(1.0, a_zero, &[1.0]);
            qgemm::qgemm(m, a, k, &self.packed, QOutput::I32 { c: &mut c, ldc: n }, &ep, gpar)?;
            return Ok(vec![Tensor::from_vec(shape, c)?]);
        };
        let mut ep = QEpilogue {
            a_zero: PerRow::Tensor(a_zero),
            a_scale: PerRow::Tensor(a_scale),
            b_scale,
            bias: self.bias.as_deref(),
            activation: self.activation,
            residual: None,
            outliers: None,
        };
        if let Some(r) = self.residual {
            ep = ep.with_residual(ins[r].as_slice::<f32>()?, n);
        }
        let picked;
        if let Some(o) = &self.outliers {
            let ko = o.w.shape()[0];
            let x = ins[o.input].as_slice::<f32>()?;
            let row = match o.channels {
                Some(_) => k,
                None => ko,
            };
            if x.len() != m * row {
                return Err(RuntimeError::Kernel(KernelError::Shape {
                    kernel: "qgemm",
                    msg: format!("outlier channels: {} values for {m} rows of {row}", x.len()),
                }));
            }
            let x = match &o.channels {
                // A few values per row: picked here rather than in a step of their own.
                Some(ch) => {
                    picked = x.chunks_exact(k).flat_map(|r| ch.iter().map(move |&c| r[c])).collect::<Vec<f32>>();
                    &picked[..]
                }
                None => x,
            };
            ep = ep.with_outliers(Outliers { x, ld: ko, w: o.w.as_slice::<f32>()?, k: ko });
        }
        if let Some(zero) = self.requantize {
            bytes.resize(m * n, 0);
            let c = QOutput::U8 { c: &mut bytes, ldc: n, scale: 1.0, zero };
            qgemm::qgemm(m, a, k, &self.packed, c, &ep, gpar)?;
            return Ok(vec![Tensor::from_vec(shape, bytes)?]);
        }
        qgemm::qgemm(m, a, k, &self.packed, QOutput::F32 { c: &mut out, ldc: n }, &ep, gpar)?;
        Ok(vec![Tensor::from_vec(shape, out)?])
    }
}

impl GatherBlock {
    fn run(&self, ids: &Tensor, shape: Vec<usize>, mut out: Vec<f32>) -> Result<Vec<Tensor>> {
        let rows = self.data.shape()[0];
        let ids: Vec<i64> = match ids.dtype() {
            DType::I64 => ids.as_slice::<i64>()?.to_vec(),
            _ => ids.as_slice::<i32>()?.iter().map(|&v| v as i64).collect(),
        };
        let data = self.data.as_slice::<u8>()?;
        let zeros = self.zeros.as_deref().map(|z| z.as_slice::<u8>()).transpose()?;
        let cols = self.cols;
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(cols.max(1))) {
            let r = if id < 0 { id + rows as i64 } else { id };
            if r < 0 || r >= rows as i64 {
                return Err(RuntimeError::Kernel(KernelError::Shape {
                    kernel: "gather_dequantize",
                    msg: format!("index {id} is outside the table of {rows} rows"),
                }));
            }
            self.op.dequantize_row(data, |i| self.scales[i], zeros, r as usize, row);
        }
        if self.through_f16 {
            slimnn_kernels::rows::round_through_f16(&mut out);
        }
        Ok(vec![Tensor::from_vec(shape, out)?])
    }
}

thread_local! {
    // Quantized rows with their scales and zero points, reused across calls on this thread.
    static ROWS: std::cell::Cell<(Vec<u8>, Vec<f32>, Vec<i32>)> = const { std::cell::Cell::new((Vec::new(), Vec::new(), Vec::new())) };
}

impl RowQuantMatMul {
    fn run(&self, ins: &[&Tensor], shape: Vec<usize>, mut out: Vec<f32>, par: bool) -> Result<Vec<Tensor>> {
        let x = ins[0].as_slice::<f32>()?;
        let (k, n) = (self.packed.k(), self.packed.n());
        let m = x.len().checked_div(k).unwrap_or(0);
        let (mut q, mut scales, mut zeros) = ROWS.with(std::cell::Cell::take);
        q.resize(x.len(), 0);
        scales.resize(m, 0.0);
        zeros.resize(m, 0);
        let result = (|| {
            // One chunk of rows per thread, as the GEMM below splits them.
            let rows_per = if par { crate::fast::rows_per_task(m, k) } else { m.max(1) };
            x.par_chunks(rows_per * k.max(1))
                .zip(q.par_chunks_mut(rows_per * k.max(1)))
                .zip(scales.par_chunks_mut(rows_per).zip(zeros.par_chunks_mut(rows_per)))
                .try_for_each(|((x, q), (s, z))| qgemm::quantize_rows_u8(x, k, q, s, z))?;
            let mut ep = QEpilogue {
                a_zero: PerRow::Rows(&zeros),
                a_scale: PerRow::Rows(&scales),
                b_scale: &self.b_scale,
                bias: self.bias.as_deref(),
                activation: self.activation,
                residual: None,
                outliers: None,
            };
            if self.residual {
                ep = ep.with_residual(ins[1].as_slice::<f32>()?, n);
            }
            let gpar = if par { Par::Current } else { Par::Seq };
            qgemm::qgemm(m, &q, k, &self.packed, QOutput::F32 { c: &mut out, ldc: n }, &ep, gpar)?;
            Ok::<_, RuntimeError>(())
        })();
        ROWS.with(|c| c.set((q, scales, zeros)));
        result?;
        Ok(vec![Tensor::from_vec(shape, out)?])
    }
}

/// Values of a constant as f32 when it has 1 or `n` of them.
fn const_f32s(c: &Ctx, o: OutletId, n: usize) -> Option<Vec<f32>> {
    let t = c.konst(o)?;
    (t.dtype() == DType::F32 && (t.len() == 1 || t.len() == n) && t.rank() <= 1)
        .then(|| t.to_f64_vec().into_iter().map(|v| v as f32).collect())
}

fn const_all_zero(c: &Ctx, o: OutletId) -> bool {
    c.konst(o).is_some_and(|t| t.dtype().is_integer() && t.to_f64_vec().iter().all(|&v| v == 0.0))
}

/// `(i8 weight [k, n] constant, its scales)` when `w` is `DequantizeLinear(Wq, ws, 0)` with
/// per-tensor or per-column (axis 1) scales.
fn dequantized_weight(c: &Ctx, w: OutletId) -> Option<(Arc<Tensor>, Vec<f32>)> {
    let Op::DequantizeLinear(DequantizeLinear { axis }) = c.op(w) else { return None };
    let ins = &c.g.node(w.node).inputs;
    let wq = c.konst(ins[0]).filter(|t| t.dtype() == DType::I8 && t.rank() == 2)?;
    let n = wq.shape()[1];
    let scales = const_f32s(c, ins[1], n)?;
    if scales.len() > 1 && !(*axis == 1 || *axis == -1) {
        return None;
    }
    if ins.len() > 2 && !const_all_zero(c, ins[2]) {
        return None;
    }
    Some((wq.clone(), scales))
}

/// `(u8 input, scale, zero)` when `x` is `DequantizeLinear(xq, s, z)` of a non-constant u8
/// tensor with constant per-tensor parameters.
fn dequantized_activation(c: &Ctx, x: OutletId) -> Option<(OutletId, f32, u8)> {
    let Op::DequantizeLinear(_) = c.op(x) else { return None };
    let ins = &c.g.node(x.node).inputs;
    if c.g.fact(ins[0]).dtype != DType::U8 || c.konst(ins[0]).is_some() {
        return None;
    }
    let s = c.scalar(ins[1])?;
    let z = match ins.get(2) {
        Some(&z) => c.konst(z).filter(|t| t.dtype() == DType::U8 && t.len() == 1)?.as_slice::<u8>().ok()?[0],
        None => 0,
    };
    (s.is_finite() && s > 0.0).then_some((ins[0], s, z))
}

/// Whether `id` is a `MatMul` of a dequantized activation and a dequantized constant weight.
fn is_qdq_matmul(c: &Ctx, id: NodeId) -> bool {
    let node = c.g.node(id);
    node.op == Op::MatMul(MatMul)
        && dequantized_activation(c, node.inputs[0]).is_some()
        && dequantized_weight(c, node.inputs[1]).is_some()
}

/// A quantized GEMM group anchored at `id`: `MatMulInteger` (dynamic form) or a QDQ `MatMul`.
pub(super) fn match_group(c: &Ctx, id: NodeId, packs: &QPackCache) -> Result<Option<Group>> {
    let node = c.g.node(id);
    match &node.op {
        Op::MatMulInteger(_) => match_matmul_integer(c, id, packs),
        Op::MatMul(MatMul) if is_qdq_matmul(c, id) => match_qdq(c, id, packs),
        Op::QLinearMatMul(_) => match_qlinear(c, id, packs),
        Op::QLinearConv(op) => match_qlinear_conv(c, id, &op.attrs),
        Op::MatMulNBits(op) => match_nbits(c, id, op, packs),
        Op::DynamicRowQuantMatMul(_) => match_row_quant(c, id, packs),
        Op::QuantizeLinear(_) => Ok(match_channel_quantize(c, id)),
        Op::GatherBlockQuantized(op) => Ok(match_gather_block(c, id, *op)),
        _ => Ok(None),
    }
}

/// `bias` when `end`'s sole reader adds a constant f32 `[n]` to it (the reader joins `members`
/// and becomes the new `end`).
fn fuse_bias(c: &Ctx, end: &mut OutletId, n: usize, members: &mut Vec<NodeId>) -> Result<Option<Arc<[f32]>>> {
    if let Some(r) = c.sole_reader(*end) {
        if let Some(bv) = c.binary_other(r, *end, BinaryOp::Add) {
            if let Some(t) = c.konst(bv).filter(|t| t.len() == n && t.dtype() == DType::F32) {
                members.push(r);
                *end = out0(r);
                return Ok(Some(Arc::from(t.as_slice::<f32>()?)));
            }
        }
    }
    Ok(None)
}

/// `GatherBlockQuantized(table const, ids, scales const[, zeros const])`, with the `Cast` to
/// f32 that follows f16 scales.
fn match_gather_block(c: &Ctx, id: NodeId, op: GatherBlockQuantized) -> Option<Group> {
    let ins = &c.g.node(id).inputs;
    let data = c.konst(ins[0])?.clone();
    let scales = c.konst(ins[2])?;
    let zeros = match ins.get(3) {
        Some(&z) => Some(c.konst(z)?.clone()),
        None => None,
    };
    let mut members = vec![id];
    let through_f16 = match scales.dtype() {
        DType::F32 => false,
        DType::F16 => {
            let r = c.sole_reader(out0(id))?;
            if c.g.node(r).op != Op::Cast(Cast { to: DType::F32 }) {
                return None;
            }
            members.push(r);
            true
        }
        _ => return None,
    };
    let scales: Arc<[f32]> = scales.to_f64_vec().into_iter().map(|v| v as f32).collect();
    let cols = data.shape()[1] * 8 / op.bits;
    let kernel = QuantKernel::GatherBlock(GatherBlock { op, data, scales, zeros, cols, through_f16 });
    let fusion = Fusion { kind: kernel.name(), nodes: c.names(&members), note: String::new() };
    Some(Group { members, kernel: Kernel::Quant(Arc::new(kernel)), inputs: vec![ins[1]], fusion, output_shape: None })
}

/// `DynamicRowQuantMatMul(x, Wq const, ws const) [-> bias -> activation -> residual]`.
fn match_row_quant(c: &Ctx, id: NodeId, packs: &QPackCache) -> Result<Option<Group>> {
    let ins = &c.g.node(id).inputs;
    let x = ins[0];
    let Some(wq) = c.konst(ins[1]).filter(|t| t.dtype() == DType::I8 && t.rank() == 2) else { return Ok(None) };
    let n = wq.shape()[1];
    let Some(b_scale) = const_f32s(c, ins[2], n) else { return Ok(None) };
    if !c.is_f32(x) || c.shape(x).is_none() {
        return Ok(None);
    }
    let packed = packs.get(wq, false)?;
    let mut members = vec![id];
    let mut end = out0(id);
    let bias = fuse_bias(c, &mut end, n, &mut members)?;
    let mut inputs = vec![x];
    let mut notes = vec![];
    let (activation, residual) = fuse_tail(c, end, &mut members, &mut inputs, &mut notes);
    let kernel = QuantKernel::RowQuant(RowQuantMatMul { packed, b_scale: b_scale.into(), bias, activation, residual });
    let fusion = Fusion { kind: kernel.name(), nodes: c.names(&members), note: notes.join("; ") };
    Ok(Some(Group { members, kernel: Kernel::Quant(Arc::new(kernel)), inputs, fusion, output_shape: None }))
}

/// `DynamicRowQuantMatMul(x, Wq const, ws const)` at `mm`: `(x, Wq, one scale per column)`.
pub(super) fn row_quant_weight(c: &Ctx, mm: NodeId) -> Option<(OutletId, Arc<Tensor>, Vec<f32>)> {
    let Op::DynamicRowQuantMatMul(_) = c.g.node(mm).op else { return None };
    let ins = &c.g.node(mm).inputs;
    let wq = c.konst(ins[1]).filter(|t| t.dtype() == DType::I8 && t.rank() == 2)?;
    let n = wq.shape()[1];
    let mut scales = const_f32s(c, ins[2], n)?;
    if scales.len() == 1 {
        scales = vec![scales[0]; n];
    }
    Some((ins[0], wq.clone(), scales))
}

/// Row-quantized projections of one input side by side as one GEMM (x is quantized once).
pub(super) fn row_quant_concat(
    ws: &[Arc<Tensor>],
    b_scale: Vec<f32>,
    bias: Arc<[f32]>,
    packs: &QPackCache,
) -> Result<Kernel> {
    let packed = packs.get_concat(ws, false)?;
    let rq = RowQuantMatMul {
        packed,
        b_scale: b_scale.into(),
        bias: Some(bias),
        activation: Activation::None,
        residual: false,
    };
    Ok(Kernel::Quant(Arc::new(QuantKernel::RowQuant(rq))))
}

/// `MatMulNBits(a, B, scales[, zero_points])` with constant weights [-> bias -> activation ->
/// residual] on the weight-only kernel.
fn match_nbits(c: &Ctx, id: NodeId, op: &MatMulNBits, packs: &QPackCache) -> Result<Option<Group>> {
    let ins = &c.g.node(id).inputs;
    let a = ins[0];
    let (Some(b), Some(scales)) = (c.konst(ins[1]), c.konst(ins[2])) else { return Ok(None) };
    let zeros = match ins.get(3) {
        Some(&z) => match c.konst(z) {
            Some(t) => Some(t.as_ref()),
            None => return Ok(None),
        },
        None => None,
    };
    if !c.is_f32(a) || c.shape(a).is_none() {
        return Ok(None);
    }
    let packed = packs.get_nbits(op, b, scales, zeros)?;
    let n = op.n;
    let mut members = vec![id];
    let mut end = out0(id);
    let bias = fuse_bias(c, &mut end, n, &mut members)?;
    let mut inputs = vec![a];
    let mut notes = vec![];
    let (activation, residual) = fuse_tail(c, end, &mut members, &mut inputs, &mut notes);
    let kernel = QuantKernel::WeightOnly(WeightOnlyMatMul { packed, bias, activation, residual });
    let fusion = Fusion { kind: kernel.name(), nodes: c.names(&members), note: notes.join("; ") };
    Ok(Some(Group { members, kernel: Kernel::Quant(Arc::new(kernel)), inputs, fusion, output_shape: None }))
}

/// A constant u8 scalar.
fn const_u8(c: &Ctx, o: OutletId) -> Option<u8> {
    c.konst(o).filter(|t| t.dtype() == DType::U8 && t.len() == 1)?.as_slice::<u8>().ok().map(|v| v[0])
}

/// `QLinearMatMul(a u8, sa, za, W i8 const, sw, 0, sy, zy u8)` with constant parameters.
fn match_qlinear(c: &Ctx, id: NodeId, packs: &QPackCache) -> Result<Option<Group>> {
    let ins = &c.g.node(id).inputs;
    let Some(wq) = c.konst(ins[3]).filter(|t| t.dtype() == DType::I8 && t.rank() == 2) else { return Ok(None) };
    let n = wq.shape()[1];
    let a = ins[0];
    if c.g.fact(a).dtype != DType::U8 || c.g.fact(a).rank() < 1 || c.shape(a).is_none() || !const_all_zero(c, ins[5]) {
        return Ok(None);
    }
    let (Some(sa), Some(za), Some(sw), Some(sy), Some(zy)) =
        (c.scalar(ins[1]), const_u8(c, ins[2]), const_f32s(c, ins[4], n), c.scalar(ins[6]), const_u8(c, ins[7]))
    else {
        return Ok(None);
    };
    if !(sy.is_finite() && sy > 0.0) || c.g.fact(out0(id)).dtype != DType::U8 {
        return Ok(None);
    }
    let multipliers: Vec<f32> = sw.iter().map(|&s| sa * s / sy).collect();
    let packed = packs.get(wq, false)?;
    let mm = QMatMul {
        packed,
        a: AParams { scale: Param::Const(1.0), zero: Param::Const(za as i32) },
        b_scale: Some(Arc::from(multipliers)),
        bias: None,
        activation: Activation::None,
        residual: None,
        outliers: None,
        requantize: Some(zy),
    };
    Ok(Some(group(c, vec![id], vec![a], mm, vec![])))
}

/// An 8-bit constant's values as i32 (u8 or i8).
fn const_8bit(c: &Ctx, o: OutletId) -> Option<Vec<i32>> {
    let t = c.konst(o)?;
    match t.dtype() {
        DType::U8 => Some(t.as_slice::<u8>().ok()?.iter().map(|&v| v as i32).collect()),
        DType::I8 => Some(t.as_slice::<i8>().ok()?.iter().map(|&v| v as i32).collect()),
        _ => None,
    }
}

/// Whether a test asked for `QLinearConv` on the float kernels even on VNNI hosts.
fn float_qconv_forced() -> bool {
    #[cfg(test)]
    return tests::FLOAT_QCONV.get();
    #[cfg(not(test))]
    false
}

/// `QLinearConv(x, sx, zx, W const, sw, zw, sy, zy[, bias i32])` with constant parameters, on
/// the f32 convolution kernels when its sums provably stay exact in f32.
fn match_qlinear_conv(c: &Ctx, id: NodeId, attrs: &slimnn_ir::ops::ConvAttrs) -> Result<Option<Group>> {
    let ins = &c.g.node(id).inputs;
    let (x, y) = (ins[0], out0(id));
    let (Some(xs), Some(ys)) = (c.shape(x), c.shape(y)) else { return Ok(None) };
    let Some(w) = c.konst(ins[3]) else { return Ok(None) };
    let (x_dt, y_dt) = (c.g.fact(x).dtype, c.g.fact(y).dtype);
    if !matches!(x_dt, DType::U8 | DType::I8) || !matches!(y_dt, DType::U8 | DType::I8) || w.rank() != 4 {
        return Ok(None);
    }
    let m = w.shape()[0];
    let per_channel = |v: Vec<f64>| match v.len() {
        1 => Some(vec![v[0]; m]),
        n if n == m => Some(v),
        _ => None,
    };
    let ws = c.konst(ins[4]).filter(|t| t.dtype() == DType::F32).and_then(|t| per_channel(t.to_f64_vec()));
    let wz = const_8bit(c, ins[5]).and_then(|z| per_channel(z.into_iter().map(f64::from).collect()));
    let (Some(sx), Some(zx), Some(ws), Some(wz), Some(sy), Some(zy)) = (
        c.scalar(ins[1]),
        const_8bit(c, ins[2]).filter(|z| z.len() == 1),
        ws,
        wz,
        c.scalar(ins[6]),
        const_8bit(c, ins[7]).filter(|z| z.len() == 1),
    ) else {
        return Ok(None);
    };
    let Some(wv) = const_8bit(c, ins[3]) else { return Ok(None) };
    let bias = match ins.get(8) {
        None => None,
        Some(&b) => match c.konst(b) {
            Some(t) if t.dtype() == DType::I32 && t.len() == m => Some(t.as_slice::<i32>()?.to_vec()),
            _ => return Ok(None),
        },
    };
    let (lo, hi) = if x_dt == DType::U8 { (0, 255) } else { (-128, 127) };
    let x_max = (zx[0] - lo).max(hi - zx[0]) as f64;
    let per = wv.len() / m.max(1);
    let centred: Vec<f32> = wv.iter().enumerate().map(|(i, &v)| (v as f64 - wz[i / per]) as f32).collect();
    let Some(conv) = crate::conv::ConvKernel::prepare(attrs, &xs, w.shape(), &centred, None, &ys) else {
        return Ok(None);
    };
    // The integer GEMM for everything but depthwise, where the host has it: i8 weights (u8
    // ones shifted by 128, their zero points with them).
    let int8 = match qgemm::wx::wx_kernel(per).filter(|_| !float_qconv_forced()) {
        Some(kernel) if conv.method != crate::conv::ConvMethod::Depthwise && per <= qgemm::wx::MAX_K => {
            let shift = if w.dtype() == DType::U8 { 128 } else { 0 };
            let wq: Vec<i8> = wv.iter().map(|&v| (v - shift) as i8).collect();
            let zeros: Vec<i32> = wz.iter().map(|&z| z as i32 - shift).collect();
            Some(qgemm::PackedQW::new(kernel, &wq, m, per, &zeros)?)
        }
        _ => None,
    };
    // Depthwise ones on the 8-bit depthwise kernel where the host has it: i8 weights around 0
    // (u8 ones around 128, shifted).
    let dw_int8 = match conv.method {
        crate::conv::ConvMethod::Depthwise
            if !float_qconv_forced()
                && qgemm::dw::dw_kernel_available()
                && qgemm::dw::dw_supported(&conv.geom.depthwise()) =>
        {
            let shift = if w.dtype() == DType::U8 { 128 } else { 0 };
            match wz.iter().all(|&z| z == shift as f64) {
                true => {
                    let wq: Vec<i8> = wv.iter().map(|&v| (v - shift) as i8).collect();
                    Some(Arc::new(qgemm::dw::DwPacked::new(&conv.geom.depthwise(), &wq)?))
                }
                false => None,
            }
        }
        _ => None,
    };
    // Exactness in f32: |x - zx| <= x_max, so every partial sum is at most x_max * sum |w - zw|.
    // The bias (quantizers saturate it near 2^31 on dead channels) is added in f64 afterwards.
    let limit = (1u32 << 24) as f64;
    let exact = (0..m).all(|ch| {
        let l1: f64 = centred[ch * per..(ch + 1) * per].iter().map(|v| v.abs() as f64).sum();
        x_max * l1 < limit
    });
    if !((exact || int8.is_some() || dw_int8.is_some()) && sy.is_finite() && sy > 0.0) {
        return Ok(None);
    }
    // The reference's multiplier, operation for operation.
    let multipliers: Vec<f32> = ws.iter().map(|&s| sx * s as f32 / sy).collect();
    let kernel = QuantKernel::Conv(Box::new(QLinearConvKernel {
        conv,
        int8,
        dw_int8,
        bias: bias.map(Arc::from),
        x_zero: zx[0],
        multipliers: Arc::from(multipliers),
        y_zero: zy[0],
        y_dtype: y_dt,
    }));
    let fusion = Fusion { kind: kernel.name(), nodes: c.names(&[id]), note: String::new() };
    Ok(Some(Group {
        members: vec![id],
        kernel: Kernel::Quant(Arc::new(kernel)),
        inputs: vec![x],
        fusion,
        output_shape: None,
    }))
}

fn match_matmul_integer(c: &Ctx, id: NodeId, packs: &QPackCache) -> Result<Option<Group>> {
    let node = c.g.node(id);
    let ins = &node.inputs;
    let (a, b) = (ins[0], ins[1]);
    let Some(wq) = c.konst(b).filter(|t| t.dtype() == DType::I8 && t.rank() == 2) else { return Ok(None) };
    if c.g.fact(a).dtype != DType::U8 || c.g.fact(a).rank() < 1 || c.shape(a).is_none() {
        return Ok(None);
    }
    if ins.get(3).is_some_and(|&z| !const_all_zero(c, z)) {
        return Ok(None);
    }
    // A's zero point: a u8 scalar, constant or computed.
    let Some(&az) = ins.get(2) else { return Ok(None) };
    if c.g.fact(az).dtype != DType::U8 || c.g.fact(az).known_shape().is_none_or(|s| s.iter().product::<usize>() != 1) {
        return Ok(None);
    }
    let n = wq.shape()[1];
    let packed = packs.get(wq, false)?;
    let mut members = vec![id];
    let mut inputs = vec![a, az];
    let mut end = out0(id);
    let mut b_scale = None;
    let mut bias = None;
    let mut notes = vec![];
    // Cast(float) then Mul by the scale product.
    let cast = c.sole_reader(end).filter(|&r| c.g.node(r).op == Op::Cast(Cast { to: DType::F32 }));
    let scaled = cast.and_then(|r| {
        let m = c.sole_reader(out0(r))?;
        let s = c.binary_other(m, out0(r), BinaryOp::Mul)?;
        // The scale product Mul(x_scale, w_scale), read only here, or a constant.
        if let Some(sc) = const_f32s(c, s, n) {
            return Some((r, m, None, sc));
        }
        let sn = s.node;
        if c.op(s) != &Op::Binary(Binary(BinaryOp::Mul)) || c.sole_reader(s) != Some(m) {
            return None;
        }
        let pair = &c.g.node(sn).inputs;
        for (xs, ws) in [(pair[0], pair[1]), (pair[1], pair[0])] {
            let xs_scalar = c.g.fact(xs).dtype == DType::F32
                && c.konst(xs).is_none()
                && c.g.fact(xs).known_shape().is_some_and(|s| s.iter().product::<usize>() == 1);
            if let (true, Some(w)) = (xs_scalar, const_f32s(c, ws, n)) {
                return Some((r, m, Some((sn, xs)), w));
            }
        }
        None
    });
    let mut a_params = AParams { scale: Param::Const(1.0), zero: Param::Input(1) };
    match scaled {
        Some((r, m, dynamic_scale, sc)) => {
            members.extend([r, m]);
            end = out0(m);
            b_scale = Some(Arc::from(sc));
            // Without a computed A scale, the constant is the whole scale product.
            if let Some((sn, xs)) = dynamic_scale {
                members.push(sn);
                a_params.scale = Param::Input(inputs.len());
                inputs.push(xs);
            }
        }
        None => notes.push("no Cast + scale Mul after MatMulInteger: i32 output".to_string()),
    }
    let mut activation = Activation::None;
    let mut residual = None;
    if b_scale.is_some() {
        if let Some(r) = c.sole_reader(end) {
            if let Some(bv) = c.binary_other(r, end, BinaryOp::Add) {
                if let Some(t) = c.konst(bv).filter(|t| t.len() == n && t.dtype() == DType::F32) {
                    bias = Some(Arc::from(t.as_slice::<f32>()?));
                    members.push(r);
                    end = out0(r);
                }
            }
        }
        let before = inputs.len();
        let (act, res) = fuse_tail(c, end, &mut members, &mut inputs, &mut notes);
        activation = act;
        residual = res.then_some(before);
    }
    let mm = QMatMul { packed, a: a_params, b_scale, bias, activation, residual, outliers: None, requantize: None };
    Ok(Some(group(c, members, inputs, mm, notes)))
}

fn match_qdq(c: &Ctx, id: NodeId, packs: &QPackCache) -> Result<Option<Group>> {
    let node = c.g.node(id);
    let (x, w) = (node.inputs[0], node.inputs[1]);
    let (Some((xq, scale, zero)), Some((wq, ws))) = (dequantized_activation(c, x), dequantized_weight(c, w)) else {
        return Ok(None);
    };
    if c.shape(xq).is_none() {
        return Ok(None);
    }
    let n = wq.shape()[1];
    let packed = packs.get(&wq, false)?;
    let mut members = vec![id];
    // The weight's DequantizeLinear and, when every reader of the activation's is a QDQ
    // MatMul lowered here, that one too: neither is ever computed.
    if c.sole_reader(w) == Some(id) {
        members.push(w.node);
    }
    let all_qdq = c.readers.get(&x).is_some_and(|rs| rs.iter().all(|&(r, _)| is_qdq_matmul(c, r)));
    if all_qdq && !c.outputs.contains(&x) && !c.taken.contains(&x.node) {
        members.push(x.node);
    }
    let mut end = out0(id);
    let mut inputs = vec![xq];
    let mut outliers = None;
    if let Some((add, mo, xo, w)) = outlier_add(c, end, n) {
        members.extend([mo, add]);
        end = out0(add);
        let input = inputs.len();
        let k = wq.shape()[0];
        match picked_columns(c, xo, k) {
            Some((gather, x, channels)) => {
                // The gather runs inside the step; its node with it when only such steps read it.
                if !c.taken.contains(&gather) && !members.contains(&gather) && only_outlier_products(c, out0(gather)) {
                    members.push(gather);
                }
                outliers = Some(OutlierInput { input, channels: Some(channels), w });
                inputs.push(x);
            }
            None => {
                outliers = Some(OutlierInput { input, channels: None, w });
                inputs.push(xo);
            }
        }
    }
    let mut bias = None;
    let mut notes = vec![];
    if let Some(r) = c.sole_reader(end) {
        if let Some(bv) = c.binary_other(r, end, BinaryOp::Add) {
            if let Some(t) = c.konst(bv).filter(|t| t.len() == n && t.dtype() == DType::F32) {
                bias = Some(Arc::from(t.as_slice::<f32>()?));
                members.push(r);
                end = out0(r);
            }
        }
    }
    let res_at = inputs.len();
    let (activation, res) = fuse_tail(c, end, &mut members, &mut inputs, &mut notes);
    let residual = res.then_some(res_at);
    let a = AParams { scale: Param::Const(scale), zero: Param::Const(zero as i32) };
    let mm =
        QMatMul { packed, a, b_scale: Some(Arc::from(ws)), bias, activation, residual, outliers, requantize: None };
    Ok(Some(group(c, members, inputs, mm, notes)))
}

/// `QuantizeLinear(Mul(x, m const [k]))` with per-tensor u8 parameters, the Mul read only
/// there: outlier channels divided before quantization (slimnn's static form), in one step.
fn match_channel_quantize(c: &Ctx, id: NodeId) -> Option<Group> {
    let node = c.g.node(id);
    let ins = &node.inputs;
    let mul = ins[0];
    if c.op(mul) != &Op::Binary(Binary(BinaryOp::Mul)) || c.sole_reader(mul) != Some(id) || !c.is_f32(mul) {
        return None;
    }
    let Kernel::Quant(k) = single_kernel(c, id)? else { return None };
    let QuantKernel::Quantize { scale, zero, .. } = *k else { return None };
    let k = c.shape(mul)?.last().copied()?;
    let (x, m) = [0, 1].into_iter().find_map(|i| {
        let x = c.g.node(mul.node).inputs[i];
        let m = c.binary_other(mul.node, x, BinaryOp::Mul)?;
        let t = c.konst(m).filter(|t| t.dtype() == DType::F32 && t.rank() == 1 && t.len() == k)?;
        (c.konst(x).is_none() && c.shape(x)? == c.shape(mul)?).then(|| (x, t.clone()))
    })?;
    let channel: Arc<[f32]> = Arc::from(m.as_slice::<f32>().ok()?);
    let kernel = QuantKernel::Quantize { scale, zero, channel: Some(channel) };
    let members = vec![mul.node, id];
    let fusion = Fusion { kind: kernel.name(), nodes: c.names(&members), note: String::new() };
    Some(Group { members, kernel: Kernel::Quant(Arc::new(kernel)), inputs: vec![x], fusion, output_shape: None })
}

/// `(Gather, x, channels)` when `xo` is `Gather(x, channels const, axis = last)` of an f32
/// activation `x` with `k` values per row.
fn picked_columns(c: &Ctx, xo: OutletId, k: usize) -> Option<(NodeId, OutletId, Arc<[usize]>)> {
    let Op::Gather(Gather { axis }) = c.op(xo) else { return None };
    let ins = &c.g.node(xo.node).inputs;
    let shape = c.shape(ins[0])?;
    let last = shape.len() as i64 - 1;
    if !(*axis == -1 || *axis == last) || shape.last() != Some(&k) || !c.is_f32(ins[0]) {
        return None;
    }
    let idx = c.konst(ins[1]).filter(|t| t.rank() == 1 && t.dtype().is_integer())?;
    let channels: Option<Vec<usize>> = idx
        .to_f64_vec()
        .into_iter()
        .map(|v| {
            let v = if v < 0.0 { v + k as f64 } else { v };
            (v >= 0.0 && v < k as f64).then_some(v as usize)
        })
        .collect();
    Some((xo.node, ins[0], Arc::from(channels?)))
}

/// Whether every reader of `o` is the float product of outlier channels that a QDQ matmul's
/// group takes (see [`outlier_add`]), so nothing else needs `o` computed.
fn only_outlier_products(c: &Ctx, o: OutletId) -> bool {
    if c.outputs.contains(&o) {
        return false;
    }
    c.readers.get(&o).is_some_and(|rs| {
        rs.iter().all(|&(r, slot)| {
            let Some(add) = c.sole_reader(out0(r)).filter(|_| slot == 0) else { return false };
            // The QDQ matmul beside it takes this product into its step (as `match_qdq` will).
            c.g.node(add).inputs.iter().any(|&q| {
                let node = c.g.node(q.node);
                q.slot == 0
                    && is_qdq_matmul(c, q.node)
                    && dequantized_activation(c, node.inputs[0]).is_some_and(|(xq, ..)| c.shape(xq).is_some())
                    && dequantized_weight(c, node.inputs[1])
                        .and_then(|(w, _)| outlier_add(c, q, w.shape()[1]))
                        .is_some_and(|(a, mo, ..)| a == add && mo == r)
            })
        })
    })
}

/// `(Add, MatMul, x_o, W_o)` when `end`'s sole reader adds `MatMul(x_o, W_o)` to it, `W_o` a
/// constant f32 `[k, n]` read only there: outlier channels kept in float beside the integer
/// product (slimnn's static form with `--outlier-channels`), run in the GEMM's epilogue.
fn outlier_add(c: &Ctx, end: OutletId, n: usize) -> Option<(NodeId, NodeId, OutletId, Arc<Tensor>)> {
    let add = c.sole_reader(end)?;
    let other = c.binary_other(add, end, BinaryOp::Add)?;
    if c.op(other) != &Op::MatMul(MatMul) || c.sole_reader(other) != Some(add) {
        return None;
    }
    let ins = &c.g.node(other.node).inputs;
    let w = c.konst(ins[1]).filter(|t| t.dtype() == DType::F32 && t.rank() == 2 && t.shape()[1] == n)?;
    let k = w.shape()[0];
    let x_ok = c.g.fact(ins[0]).dtype == DType::F32 && c.shape(ins[0]).is_some_and(|s| s.last() == Some(&k));
    x_ok.then(|| (add, other.node, ins[0], w.clone()))
}

fn group(c: &Ctx, members: Vec<NodeId>, inputs: Vec<OutletId>, mm: QMatMul, notes: Vec<String>) -> Group {
    let kernel = QuantKernel::MatMul(mm);
    let kind = kernel.name();
    let fusion = Fusion { kind, nodes: c.names(&members), note: notes.join("; ") };
    Group { members, kernel: Kernel::Quant(Arc::new(kernel)), inputs, fusion, output_shape: None }
}

/// A single quantization node on a vectorised kernel.
pub(super) fn single_kernel(c: &Ctx, id: NodeId) -> Option<Kernel> {
    let node = c.g.node(id);
    let ins = &node.inputs;
    let params = |s: OutletId, z: Option<&OutletId>| -> Option<(f32, u8)> {
        let scale = c.scalar(s).filter(|s| s.is_finite() && *s > 0.0)?;
        let zero = match z {
            Some(&z) => c.konst(z).filter(|t| t.dtype() == DType::U8 && t.len() == 1)?.as_slice::<u8>().ok()?[0],
            None => return None,
        };
        Some((scale, zero))
    };
    let k = match &node.op {
        Op::DynamicQuantizeLinear(_) if c.is_f32(ins[0]) => QuantKernel::DynamicQuantize,
        Op::QuantizeLinear(QuantizeLinear { .. }) if c.is_f32(ins[0]) => {
            let (scale, zero) = params(ins[1], ins.get(2))?;
            QuantKernel::Quantize { scale, zero, channel: None }
        }
        Op::DequantizeLinear(_) if c.g.fact(ins[0]).dtype == DType::U8 && c.is_f32(out0(id)) => {
            let (scale, zero) = params(ins[1], ins.get(2))?;
            QuantKernel::Dequantize { scale, zero }
        }
        _ => return None,
    };
    Some(Kernel::Quant(Arc::new(k)))
}

#[cfg(test)]
mod tests {
    thread_local! {
        /// Lowers `QLinearConv` onto the float kernels even on VNNI hosts.
        pub(super) static FLOAT_QCONV: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    use crate::{Runnable, RuntimeConfig};
    use slimnn_ir::ops::{
        Binary, BinaryOp, Cast, DequantizeLinear, DynamicQuantizeLinear, DynamicRowQuantMatMul, Gather, MatMul,
        MatMulInteger, MatMulNBits, QLinearMatMul, QuantizeLinear, Unary, UnaryOp,
    };
    use slimnn_ir::{Fact, Graph, OutletId};
    use slimnn_tensor::{DType, Dim, Tensor};

    const K: usize = 37;
    const N: usize = 70;

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 4.0 - 2.0
            })
            .collect()
    }

    fn weights(k: usize, n: usize, seed: u64) -> (Tensor, Tensor, Tensor) {
        let wq: Vec<i8> = values(k * n, seed).iter().map(|v| (v * 63.0) as i8).collect();
        let ws: Vec<f32> = (0..n).map(|j| 0.01 + j as f32 * 1e-4).collect();
        (
            Tensor::from_vec(vec![k, n], wq).unwrap(),
            Tensor::from_vec(vec![n], ws).unwrap(),
            Tensor::from_vec(vec![n], vec![0i8; n]).unwrap(),
        )
    }

    fn bin(g: &mut Graph, name: &str, op: BinaryOp, a: OutletId, b: OutletId) -> OutletId {
        g.add_node(name, Binary(op), vec![a, b]).unwrap()[0]
    }

    fn input(g: &mut Graph, name: &str, n: usize) -> OutletId {
        let dims = vec![Dim::Known(2), Dim::Known(5), Dim::Known(n)];
        g.add_input(name, Fact::new(DType::F32, dims)).unwrap()
    }

    /// Runs `g` through the runtime and the reference evaluator; returns the plan's kernel names.
    fn check(g: Graph, feeds: Vec<(String, Tensor)>, tol: f64) -> Vec<String> {
        let want = g.eval(feeds.clone()).unwrap();
        // Other inputs of the same shapes (f32 ones reversed), run first on a reused state:
        // pooled buffers then hold stale values that every kernel must overwrite.
        let other: Vec<(String, Tensor)> = feeds
            .iter()
            .map(|(n, t)| match t.as_slice::<f32>() {
                Ok(v) => (n.clone(), Tensor::from_vec(t.shape().to_vec(), v.iter().rev().copied().collect()).unwrap()),
                Err(_) => (n.clone(), t.clone()),
            })
            .collect();
        for threads in [1, 2] {
            let r = Runnable::new(g.clone(), RuntimeConfig::with_threads(threads)).unwrap();
            let mut reused = r.new_state();
            r.run(&mut reused, other.clone()).unwrap();
            for st in [&mut r.new_state(), &mut reused] {
                let got = r.run(st, feeds.clone()).unwrap();
                for (a, b) in got.iter().zip(&want) {
                    let d = a.max_abs_diff(b).unwrap();
                    assert!(d <= tol, "max abs diff {d} > {tol}");
                }
            }
        }
        let r = Runnable::new(g, RuntimeConfig::with_threads(1)).unwrap();
        let shapes: Vec<Vec<usize>> = feeds.iter().map(|(_, t)| t.shape().to_vec()).collect();
        r.plan_for(&shapes).unwrap().summary().kernels.keys().cloned().collect()
    }

    #[test]
    fn dynamic_form_runs_on_the_integer_gemm() {
        let mut g = Graph::default();
        let x = input(&mut g, "x", K);
        let res = input(&mut g, "res", N);
        let (wq, ws, wz) = weights(K, N, 1);
        let (wq, ws, wz) =
            (g.add_const("wq", wq).unwrap(), g.add_const("ws", ws).unwrap(), g.add_const("wz", wz).unwrap());
        let bias = g.add_const("bias", Tensor::from_vec(vec![N], values(N, 2)).unwrap()).unwrap();
        let q = g.add_node("dql", DynamicQuantizeLinear, vec![x]).unwrap();
        let s = bin(&mut g, "scales", BinaryOp::Mul, q[1], ws);
        let acc = g.add_node("mmi", MatMulInteger, vec![q[0], wq, q[2], wz]).unwrap()[0];
        let f = g.add_node("cast", Cast { to: DType::F32 }, vec![acc]).unwrap()[0];
        let y = bin(&mut g, "scale", BinaryOp::Mul, f, s);
        let y = bin(&mut g, "bias", BinaryOp::Add, y, bias);
        let y = g.add_node("relu", Unary(UnaryOp::Relu), vec![y]).unwrap()[0];
        let y = bin(&mut g, "res", BinaryOp::Add, y, res);
        g.add_output("y", y);
        // A second, bare MatMulInteger on the same quantized input: i32 output.
        let acc2 = g.add_node("mmi2", MatMulInteger, vec![q[0], wq, q[2], wz]).unwrap()[0];
        g.add_output("acc", acc2);
        let feeds = vec![
            ("x".to_string(), Tensor::from_vec(vec![2, 5, K], values(10 * K, 3)).unwrap()),
            ("res".to_string(), Tensor::from_vec(vec![2, 5, N], values(10 * N, 4)).unwrap()),
        ];
        let kernels = check(g, feeds, 1e-5);
        assert!(
            kernels.iter().any(|k| k.starts_with("qgemm_u8i8") && k.ends_with("+bias+relu+residual")),
            "{kernels:?}"
        );
        assert!(kernels.iter().any(|k| k.starts_with("qgemm_u8i8") && k.ends_with("+i32")), "{kernels:?}");
        assert!(kernels.contains(&"quantize_dynamic_u8".to_string()), "{kernels:?}");
        assert!(!kernels.iter().any(|k| k.starts_with("ref:")), "{kernels:?}");
    }

    #[test]
    fn per_token_form_runs_on_the_integer_gemm_exactly() {
        let mut g = Graph::default();
        let x = input(&mut g, "x", K);
        let res = input(&mut g, "res", N);
        let (wq, ws, _) = weights(K, N, 13);
        let (wq, ws) = (g.add_const("wq", wq).unwrap(), g.add_const("ws", ws).unwrap());
        let bias = g.add_const("bias", Tensor::from_vec(vec![N], values(N, 14)).unwrap()).unwrap();
        let y = g.add_node("rq", DynamicRowQuantMatMul, vec![x, wq, ws]).unwrap()[0];
        let y = bin(&mut g, "bias", BinaryOp::Add, y, bias);
        let y = g.add_node("gelu", Unary(UnaryOp::Gelu { tanh: false }), vec![y]).unwrap()[0];
        let y = bin(&mut g, "res", BinaryOp::Add, y, res);
        g.add_output("y", y);
        // A bare one: the integer part must match the reference bit for bit.
        let y2 = g.add_node("rq2", DynamicRowQuantMatMul, vec![x, wq, ws]).unwrap()[0];
        g.add_output("y2", y2);
        // Rows of very different ranges, an all-zero row and one of a single sign.
        let mut xs = values(10 * K, 15);
        for (r, row) in xs.chunks_mut(K).enumerate() {
            row.iter_mut().for_each(|v| *v *= 0.01 + r as f32 * 3.0);
        }
        xs[..K].iter_mut().for_each(|v| *v = 0.0);
        xs[K..2 * K].iter_mut().for_each(|v| *v = v.abs());
        let feeds = vec![
            ("x".to_string(), Tensor::from_vec(vec![2, 5, K], xs).unwrap()),
            ("res".to_string(), Tensor::from_vec(vec![2, 5, N], values(10 * N, 16)).unwrap()),
        ];
        let want = g.eval(feeds.clone()).unwrap();
        let r = Runnable::new(g.clone(), RuntimeConfig::with_threads(2)).unwrap();
        let got = r.run(&mut r.new_state(), feeds.clone()).unwrap();
        assert_eq!(got[1].as_slice::<f32>().unwrap(), want[1].as_slice::<f32>().unwrap());
        let kernels = check(g, feeds, 1e-5);
        let fused = "quantize_rows_u8+qgemm_u8i8";
        assert!(kernels.iter().any(|k| k.starts_with(fused) && k.ends_with("+bias+geluerf+residual")), "{kernels:?}");
        assert!(!kernels.iter().any(|k| k.starts_with("ref:")), "{kernels:?}");
    }

    /// Sizes of the QDQ tests' layers: weights above the constant-folding limit, as in real
    /// models (a smaller DequantizeLinear of a constant folds to an f32 weight before lowering).
    const QK: usize = 300;
    const QN: usize = 256;

    /// `DequantizeLinear(QuantizeLinear(x))` at a fixed per-tensor scale and zero point.
    fn qdq_input(g: &mut Graph, x: OutletId) -> OutletId {
        let s = g.add_const("s", Tensor::scalar(0.02f32)).unwrap();
        let z = g.add_const("z", Tensor::scalar(120u8)).unwrap();
        let xq = g.add_node("q", QuantizeLinear { axis: 1 }, vec![x, s, z]).unwrap()[0];
        g.add_node("dq", DequantizeLinear { axis: 1 }, vec![xq, s, z]).unwrap()[0]
    }

    /// `MatMul(xd, DequantizeLinear(W_i8 [QK, QN] per column))`, layer `i`.
    fn qdq_matmul(g: &mut Graph, xd: OutletId, i: usize, seed: u64) -> OutletId {
        let (wq, ws, wz) = weights(QK, QN, seed);
        let wq = g.add_const(&format!("wq{i}"), wq).unwrap();
        let ws = g.add_const(&format!("ws{i}"), ws).unwrap();
        let wz = g.add_const(&format!("wz{i}"), wz).unwrap();
        let w = g.add_node(&format!("dqw{i}"), DequantizeLinear { axis: 1 }, vec![wq, ws, wz]).unwrap()[0];
        g.add_node(&format!("mm{i}"), MatMul, vec![xd, w]).unwrap()[0]
    }

    fn add_bias(g: &mut Graph, y: OutletId, i: usize, seed: u64) -> OutletId {
        let bias = g.add_const(&format!("b{i}"), Tensor::from_vec(vec![QN], values(QN, seed)).unwrap()).unwrap();
        bin(g, &format!("add{i}"), BinaryOp::Add, y, bias)
    }

    #[test]
    fn divided_channels_quantize_in_one_step() {
        // `QuantizeLinear(Mul(x, 1/factors))`, migrated outlier channels: one step.
        let mut g = Graph::default();
        let x = input(&mut g, "x", QK);
        let inv: Vec<f32> = (0..QK).map(|c| if c % 97 == 3 { 1.0 / 7.5 } else { 1.0 }).collect();
        let inv = g.add_const("inv", Tensor::from_vec(vec![QK], inv).unwrap()).unwrap();
        let xm = bin(&mut g, "divide", BinaryOp::Mul, x, inv);
        let xd = qdq_input(&mut g, xm);
        let y = qdq_matmul(&mut g, xd, 0, 5);
        let y = add_bias(&mut g, y, 0, 5);
        g.add_output("y", y);
        let mut xs = values(10 * QK, 7);
        xs[3] = 30.0;
        let feeds = vec![("x".to_string(), Tensor::from_vec(vec![2, 5, QK], xs).unwrap())];
        let kernels = check(g, feeds, 1e-4);
        assert!(kernels.contains(&"mul_channels+quantize_u8".to_string()), "{kernels:?}");
        assert_eq!(kernels.len(), 2, "{kernels:?}");
    }

    #[test]
    fn qdq_form_runs_on_the_integer_gemm() {
        let mut g = Graph::default();
        let x = input(&mut g, "x", QK);
        let xd = qdq_input(&mut g, x);
        for (i, seed) in [(0, 5u64), (1, 6)] {
            let y = qdq_matmul(&mut g, xd, i, seed);
            let y = add_bias(&mut g, y, i, seed);
            g.add_output(&format!("y{i}"), y);
        }
        // Values beyond the quantization range saturate.
        let mut xs = values(10 * QK, 7);
        xs[3] = 50.0;
        xs[4] = -50.0;
        let feeds = vec![("x".to_string(), Tensor::from_vec(vec![2, 5, QK], xs).unwrap())];
        let kernels = check(g, feeds, 1e-4);
        assert_eq!(kernels.iter().filter(|k| k.starts_with("qgemm_u8i8")).count(), 1, "{kernels:?}");
        assert!(kernels.contains(&"quantize_u8".to_string()), "{kernels:?}");
        assert!(!kernels.iter().any(|k| k.starts_with("ref:")), "{kernels:?}");
    }

    #[test]
    fn outlier_channels_run_in_the_integer_gemm_epilogue() {
        let kernels = check_outlier_graph(false);
        assert!(kernels.iter().any(|k| k.starts_with("qgemm_u8i8") && k.ends_with("+bias+outliers3")), "{kernels:?}");
        assert!(kernels.iter().any(|k| k.contains("+bias+gelu") && k.ends_with("+outliers3")), "{kernels:?}");
        // The gather of the 3 columns runs inside both GEMM steps.
        assert_eq!(kernels.len(), 3, "{kernels:?}");
        // With another reader of the gathered columns (an output), the gather stays a step.
        let kernels = check_outlier_graph(true);
        assert!(kernels.iter().any(|k| k.ends_with("+bias+outliers3")), "{kernels:?}");
        assert!(kernels.contains(&"ref:Gather".to_string()), "{kernels:?}");
    }

    /// `MatMul(DQ(Q(x)), DQ(Wq)) + MatMul(Gather(x, idx), W_o)`, the float product written first
    /// (an f32 GEMM must not take it), then bias, then (layer 1) GELU; `gather_out` also makes
    /// the gathered columns an output. Checked against the reference; returns the kernels.
    fn check_outlier_graph(gather_out: bool) -> Vec<String> {
        let mut g = Graph::default();
        let x = input(&mut g, "x", QK);
        let idx = g.add_const("idx", Tensor::from_vec(vec![3], vec![3i64, 17, 250]).unwrap()).unwrap();
        let xo = g.add_node("gather", Gather { axis: -1 }, vec![x, idx]).unwrap()[0];
        let mut outliers = vec![];
        for (i, seed) in [(0, 5u64), (1, 6)] {
            let wo = g.add_const(&format!("wo{i}"), Tensor::from_vec(vec![3, QN], values(3 * QN, seed + 9)).unwrap());
            outliers.push(g.add_node(&format!("mo{i}"), MatMul, vec![xo, wo.unwrap()]).unwrap()[0]);
        }
        let xd = qdq_input(&mut g, x);
        for (i, seed) in [(0, 5u64), (1, 6)] {
            let y = qdq_matmul(&mut g, xd, i, seed);
            let y = bin(&mut g, &format!("sum{i}"), BinaryOp::Add, y, outliers[i]);
            let mut y = add_bias(&mut g, y, i, seed);
            if i == 1 {
                y = g.add_node("gelu", Unary(UnaryOp::Gelu { tanh: false }), vec![y]).unwrap()[0];
            }
            g.add_output(&format!("y{i}"), y);
        }
        if gather_out {
            g.add_output("xo", xo);
        }
        // The outlier channels' own values far outside the quantization range.
        let mut xs = values(10 * QK, 7);
        for r in 0..10 {
            xs[r * QK + 3] = 40.0 - r as f32 * 9.0;
            xs[r * QK + 250] = -30.0;
        }
        let feeds = vec![("x".to_string(), Tensor::from_vec(vec![2, 5, QK], xs).unwrap())];
        check(g, feeds, 1e-4)
    }

    #[test]
    fn qlinear_matmul_requantizes_like_the_reference() {
        let mut g = Graph::default();
        let x = input(&mut g, "x", K);
        let s = g.add_const("s", Tensor::scalar(0.015f32)).unwrap();
        let z = g.add_const("z", Tensor::scalar(131u8)).unwrap();
        let ys = g.add_const("ys", Tensor::scalar(0.09f32)).unwrap();
        let yz = g.add_const("yz", Tensor::scalar(97u8)).unwrap();
        let (wq, ws, wz) = weights(K, N, 8);
        let (wq, ws, wz) =
            (g.add_const("wq", wq).unwrap(), g.add_const("ws", ws).unwrap(), g.add_const("wz", wz).unwrap());
        let xq = g.add_node("q", QuantizeLinear { axis: 1 }, vec![x, s, z]).unwrap()[0];
        let y = g.add_node("qmm", QLinearMatMul, vec![xq, s, z, wq, ws, wz, ys, yz]).unwrap()[0];
        g.add_output("yq", y);
        let y = g.add_node("dq", DequantizeLinear { axis: 1 }, vec![y, ys, yz]).unwrap()[0];
        g.add_output("y", y);
        let feeds = vec![("x".to_string(), Tensor::from_vec(vec![2, 5, K], values(10 * K, 9)).unwrap())];
        let kernels = check(g, feeds, 0.0);
        assert!(kernels.iter().any(|k| k.starts_with("qgemm_u8i8") && k.ends_with("+requantize")), "{kernels:?}");
        assert!(!kernels.iter().any(|k| k.starts_with("ref:")), "{kernels:?}");
    }

    /// `QLinearConv(Quantize(x))` with per-channel weight scales and zero points and a bias
    /// that has a quantizer-saturated channel; `x_i8` quantizes the input to i8.
    #[allow(clippy::too_many_arguments)]
    fn qlinear_conv_graph(
        c: usize,
        co: usize,
        k: usize,
        stride: usize,
        pad: usize,
        group: usize,
        x_i8: bool,
        w_max: i32,
        symmetric: bool,
    ) -> Graph {
        use slimnn_ir::ops::{ConvAttrs, QLinearConv};
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[2, c, 9, 11])).unwrap();
        let s = g.add_const("s", Tensor::scalar(0.02f32)).unwrap();
        let z = match x_i8 {
            true => g.add_const("z", Tensor::scalar(-7i8)).unwrap(),
            false => g.add_const("z", Tensor::scalar(121u8)).unwrap(),
        };
        let xq = g.add_node("q", QuantizeLinear { axis: 1 }, vec![x, s, z]).unwrap()[0];
        let per = c / group * k * k;
        let wv: Vec<u8> = (0..co * per).map(|i| ((i * 37 + 11) % (2 * w_max as usize + 1)) as u8).collect();
        let wq = g.add_const("wq", Tensor::from_vec(vec![co, c / group, k, k], wv).unwrap()).unwrap();
        let ws = g
            .add_const(
                "ws",
                Tensor::from_vec(vec![co], values(co, 3).iter().map(|v| 0.01 + v.abs() * 0.01).collect::<Vec<f32>>())
                    .unwrap(),
            )
            .unwrap();
        let wz = g
            .add_const(
                "wz",
                Tensor::from_vec(
                    vec![co],
                    (0..co)
                        .map(|i| if symmetric { 128 } else { (w_max - 3 + (i % 7) as i32) as u8 })
                        .collect::<Vec<u8>>(),
                )
                .unwrap(),
            )
            .unwrap();
        let ys = g.add_const("ys", Tensor::scalar(0.3f32)).unwrap();
        let yz = g.add_const("yz", Tensor::scalar(5u8)).unwrap();
        let mut bias: Vec<i32> = (0..co as i32).map(|i| (i - 2) * 1000).collect();
        bias[1] = i32::MAX - 3;
        let b = g.add_const("b", Tensor::from_vec(vec![co], bias).unwrap()).unwrap();
        let attrs = ConvAttrs { strides: vec![stride; 2], pads: vec![pad; 4], group, ..Default::default() };
        let y = g.add_node("qconv", QLinearConv { attrs }, vec![xq, s, z, wq, ws, wz, ys, yz, b]).unwrap()[0];
        g.add_output("y", y);
        g
    }

    #[test]
    fn qlinear_conv_runs_exactly_on_the_conv_kernels() {
        let int8 = slimnn_kernels::qgemm::wx::wx_kernel(1).is_some();
        let dw_int8 = slimnn_kernels::qgemm::dw::dw_kernel_available();
        for float in [false, true] {
            FLOAT_QCONV.set(float);
            // (c_in, c_out, k, stride, pad, group): pointwise, im2col, depthwise.
            for (c, co, k, stride, pad, group) in
                [(6, 5, 1, 1, 0, 1), (4, 6, 3, 2, 1, 1), (6, 6, 3, 1, 1, 6), (5, 5, 5, 2, 2, 5)]
            {
                // Symmetric weights (zero point 128 on u8) take the 8-bit depthwise kernel.
                for (x_i8, symmetric) in [(false, false), (true, false), (false, true), (true, true)] {
                    let g = qlinear_conv_graph(c, co, k, stride, pad, group, x_i8, 100, symmetric);
                    let feeds =
                        vec![("x".to_string(), Tensor::from_vec(vec![2, c, 9, 11], values(2 * c * 99, 4)).unwrap())];
                    let kernels = check(g, feeds, 0.0);
                    let name = kernels.iter().find(|n| n.starts_with("qlinear_conv")).expect("a conv kernel");
                    let on_int8 = if group == 1 { int8 } else { dw_int8 && symmetric };
                    assert_eq!(name.ends_with("_int8"), on_int8 && !float, "{kernels:?}");
                    assert!(!kernels.iter().any(|n| n.starts_with("ref:QLinearConv")), "{kernels:?}");
                }
            }
            // 2400 inputs x |w - zw| ~65 on average x |x - zx| up to 134 may pass 2^24: exact
            // in i32, but f32 could round, so without the integer GEMM the reference keeps it.
            let g = qlinear_conv_graph(2400, 2, 1, 1, 0, 1, false, 127, false);
            let feeds =
                vec![("x".to_string(), Tensor::from_vec(vec![2, 2400, 9, 11], values(2 * 2400 * 99, 5)).unwrap())];
            let kernels = check(g, feeds, 0.0);
            let want = if int8 && !float { "qlinear_conv1x1_int8" } else { "ref:QLinearConv" };
            assert!(kernels.iter().any(|n| n == want), "{kernels:?}");
        }
        FLOAT_QCONV.set(false);
    }

    #[test]
    fn matmul_nbits_runs_on_the_weight_only_kernel() {
        for (bits, block, zeros) in [(4, 32, true), (4, 16, false), (8, 32, true)] {
            let (k, n) = (96, 40);
            let op = MatMulNBits { k, n, bits, block_size: block };
            let blocks = k / block;
            let codes: Vec<u8> =
                values(n * blocks * block * bits / 8, 10).iter().map(|v| (v * 60.0 + 128.0) as u8).collect();
            let scales: Vec<f32> = (0..n * blocks).map(|i| 0.01 + (i % 7) as f32 * 1e-3).collect();
            let zp_bytes = (blocks * bits).div_ceil(8);
            let zp: Vec<u8> = (0..n * zp_bytes).map(|i| (i * 37 % 256) as u8).collect();
            let mut g = Graph::default();
            let x = input(&mut g, "x", k);
            let b = g.add_const("b", Tensor::from_vec(vec![n, blocks, block * bits / 8], codes).unwrap()).unwrap();
            let s = g.add_const("s", Tensor::from_vec(vec![n * blocks], scales).unwrap()).unwrap();
            let mut ins = vec![x, b, s];
            if zeros {
                ins.push(g.add_const("z", Tensor::from_vec(vec![n * zp_bytes], zp).unwrap()).unwrap());
            }
            let y = g.add_node("mmnb", op, ins).unwrap()[0];
            let bias = g.add_const("bias", Tensor::from_vec(vec![n], values(n, 11)).unwrap()).unwrap();
            let y = bin(&mut g, "add", BinaryOp::Add, y, bias);
            let y = g.add_node("gelu", Unary(UnaryOp::Gelu { tanh: false }), vec![y]).unwrap()[0];
            g.add_output("y", y);
            let feeds = vec![("x".to_string(), Tensor::from_vec(vec![2, 5, k], values(10 * k, 12)).unwrap())];
            let kernels = check(g, feeds, 1e-4);
            let want = format!("wgemm_int{bits}_g{block}+bias+geluerf");
            assert!(kernels.contains(&want), "{kernels:?}");
            assert!(!kernels.iter().any(|k| k.starts_with("ref:")), "{kernels:?}");
        }
    }
}

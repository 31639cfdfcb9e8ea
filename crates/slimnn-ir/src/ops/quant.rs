//! Quantized ops as ONNX writes them (QDQ and QOperator forms).
//! Missing optional zero points are supplied by the importer as zero constants, so the
//! input lists below are always complete (a missing trailing zero point is still read as 0).
//!
//! Integer products run through the float ops' loops on exact f64 values (8-bit products
//! summed stay far below 2^53), so there is one convolution and one matmul loop to trust.

use super::conv::{check_bias, conv_f64, conv_output_dims, ConvAttrs};
use super::util::{broadcast_dims, expect_inputs, next_index, norm_axis, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrError, IrResult};
use slimnn_tensor::{broadcast_shapes, checked_numel, strides_of, DType, Dim, Tensor};

/// `QuantizeLinear(x, y_scale, y_zero_point)`: `saturate(round_half_even(x / scale) + zp)`,
/// per tensor or along `axis`; output dtype is the zero point's (u8 or i8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantizeLinear {
    pub axis: i64,
}

/// `DequantizeLinear(x, x_scale, x_zero_point)`: `(x - zp) * scale`, per tensor or along `axis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DequantizeLinear {
    pub axis: i64,
}

/// `DynamicQuantizeLinear(x)` -> (y: u8, y_scale: f32, y_zero_point: u8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicQuantizeLinear;

/// `MatMulInteger(a, b, a_zero_point, b_zero_point)` -> i32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatMulInteger;

/// `ConvInteger(x, w, x_zero_point, w_zero_point)` -> i32.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvInteger {
    pub attrs: ConvAttrs,
}

/// `QLinearMatMul(a, a_scale, a_zp, b, b_scale, b_zp, y_scale, y_zp)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QLinearMatMul;

/// `QLinearConv(x, x_scale, x_zp, w, w_scale, w_zp, y_scale, y_zp[, bias: i32])`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QLinearConv {
    pub attrs: ConvAttrs,
}

/// Saturation range of a quantized dtype.
fn qrange(op: &'static str, what: &str, dt: DType) -> IrResult<(f64, f64)> {
    Ok(match dt {
        DType::U8 => (0.0, 255.0),
        DType::I8 => (-128.0, 127.0),
        DType::I16 => (-32768.0, 32767.0),
        _ => op_bail!(op, "{what} must be u8, i8 or i16, got {dt}"),
    })
}

/// Checks an 8-bit integer operand of the integer products.
fn check_8bit(op: &'static str, what: &str, dt: DType) -> IrResult<()> {
    if !matches!(dt, DType::U8 | DType::I8) {
        op_bail!(op, "{what} must be u8 or i8, got {dt}");
    }
    Ok(())
}

fn check_same(op: &'static str, what: &str, dt: DType, want: DType) -> IrResult<()> {
    if dt != want {
        op_bail!(op, "{what} must be {want}, got {dt}");
    }
    Ok(())
}

fn check_float(op: &'static str, what: &str, dt: DType) -> IrResult<()> {
    if !dt.is_float() {
        op_bail!(op, "{what} must be a float tensor, got {dt}");
    }
    Ok(())
}

/// Fact check of a scale or zero point: a scalar or 1-d; when 1-d with several values, as
/// many as `len` (when `len` is known).
fn check_param_fact(op: &'static str, what: &str, f: &Fact, len: &Dim) -> IrResult<()> {
    if f.rank() > 1 {
        op_bail!(op, "{what} must be a scalar or 1-d, got shape {}", show_dims(&f.shape));
    }
    if let (Some(Dim::Known(n)), Dim::Known(l)) = (f.shape.first(), len) {
        if *n != 1 && n != l {
            op_bail!(op, "{what} has {n} values, expected 1 or {l}");
        }
    }
    Ok(())
}

/// A scale or zero point for `len` channels: its one value repeated, or a 1-d tensor of
/// exactly `len` values.
fn per_channel(op: &'static str, what: &str, t: &Tensor, len: usize) -> IrResult<Vec<f64>> {
    if t.rank() > 1 {
        op_bail!(op, "{what} must be a scalar or 1-d, got shape {:?}", t.shape());
    }
    let v = t.to_f64_vec();
    match v.len() {
        1 => Ok(vec![v[0]; len]),
        n if n == len => Ok(v),
        n => op_bail!(op, "{what} has {n} values, expected 1 or {len}"),
    }
}

fn scalar(op: &'static str, what: &str, t: &Tensor) -> IrResult<f64> {
    Ok(per_channel(op, what, t, 1)?[0])
}

/// Scales and zero points of a per-tensor or per-axis quantization of a tensor of `shape`,
/// with the channel of flat element `i` being `(i / inner) % scale.len()`.
struct AxisParams {
    scale: Vec<f64>,
    zero: Vec<f64>,
    inner: usize,
}

impl AxisParams {
    fn new(op: &'static str, shape: &[usize], axis: i64, scale: &Tensor, zero: Option<&Tensor>) -> IrResult<Self> {
        if scale.rank() > 1 {
            op_bail!(op, "blocked quantization (scale of shape {:?}) is not supported", scale.shape());
        }
        let (len, inner) = if scale.len() == 1 {
            (1, 1)
        } else {
            let a = norm_axis(op, axis, shape.len())?;
            (shape[a], shape[a + 1..].iter().product())
        };
        let zero = match zero {
            Some(z) => per_channel(op, "zero point", z, len)?,
            None => vec![0.0; len],
        };
        Ok(AxisParams { scale: per_channel(op, "scale", scale, len)?, zero, inner })
    }

    fn channel(&self, i: usize) -> usize {
        (i / self.inner) % self.scale.len()
    }
}

/// Fact checks of per-tensor / per-axis scale and zero point for an input `x`.
fn check_axis_facts(op: &'static str, x: &Fact, axis: i64, scale: &Fact, zero: Option<&&Fact>) -> IrResult<()> {
    if scale.rank() > 1 {
        op_bail!(op, "blocked quantization (scale of shape {}) is not supported", show_dims(&scale.shape));
    }
    let len = match scale.shape.first() {
        Some(d) if *d != Dim::Known(1) => x.shape[norm_axis(op, axis, x.rank())?].clone(),
        _ => Dim::Known(1),
    };
    check_param_fact(op, "scale", scale, &len)?;
    if let Some(z) = zero {
        check_param_fact(op, "zero point", z, &len)?;
    }
    Ok(())
}

impl OpDef for QuantizeLinear {
    fn name(&self) -> &'static str {
        "QuantizeLinear"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 3)?;
        let (x, scale, zero) = (inputs[0], inputs[1], inputs.get(2));
        if !(x.dtype.is_float() || x.dtype == DType::I32) {
            op_bail!(op, "input must be a float or i32 tensor, got {}", x.dtype);
        }
        check_float(op, "scale", scale.dtype)?;
        let out = zero.map_or(DType::U8, |z| z.dtype);
        qrange(op, "zero point", out)?;
        check_axis_facts(op, x, self.axis, scale, zero)?;
        Ok(vec![Fact::new(out, x.shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        let out = check_eval(self, inputs)?[0].dtype;
        let (x, scale, zero) = (inputs[0], inputs[1], inputs.get(2).copied());
        let p = AxisParams::new(op, x.shape(), self.axis, scale, zero)?;
        let (lo, hi) = qrange(op, "zero point", out)?;
        // Divide in the input's precision as ONNX Runtime does (f32 for the 16-bit floats).
        let wide = matches!(x.dtype(), DType::F64 | DType::I32);
        let q: Vec<f64> = x
            .to_f64_vec()
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = p.channel(i);
                let r = if wide {
                    (v / p.scale[c]).round_ties_even()
                } else {
                    (v as f32 / p.scale[c] as f32).round_ties_even() as f64
                };
                (r + p.zero[c]).clamp(lo, hi)
            })
            .collect();
        Ok(vec![Tensor::from_f64s(out, x.shape().to_vec(), &q)?])
    }
}

/// Runs `output_facts` on concrete inputs so `eval` validates exactly as inference does.
fn check_eval(op: &dyn OpDef, inputs: &[&Tensor]) -> IrResult<Vec<Fact>> {
    let facts: Vec<Fact> = inputs.iter().map(|t| Fact::known(t.dtype(), t.shape())).collect();
    op.output_facts(&facts.iter().collect::<Vec<_>>())
}

impl OpDef for DequantizeLinear {
    fn name(&self) -> &'static str {
        "DequantizeLinear"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 3)?;
        let (x, scale, zero) = (inputs[0], inputs[1], inputs.get(2));
        if !matches!(x.dtype, DType::U8 | DType::I8 | DType::I16 | DType::I32) {
            op_bail!(op, "input must be u8, i8, i16 or i32, got {}", x.dtype);
        }
        check_float(op, "scale", scale.dtype)?;
        if let Some(z) = zero {
            check_same(op, "zero point", z.dtype, x.dtype)?;
        }
        check_axis_facts(op, x, self.axis, scale, zero)?;
        Ok(vec![Fact::new(scale.dtype, x.shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        check_eval(self, inputs)?;
        let (x, scale, zero) = (inputs[0], inputs[1], inputs.get(2).copied());
        let p = AxisParams::new(op, x.shape(), self.axis, scale, zero)?;
        // An f64 product of these exact values rounds once to the output type.
        let y: Vec<f64> = x
            .to_f64_vec()
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let c = p.channel(i);
                (v - p.zero[c]) * p.scale[c]
            })
            .collect();
        Ok(vec![Tensor::from_f64s(scale.dtype(), x.shape().to_vec(), &y)?])
    }
}

impl OpDef for DynamicQuantizeLinear {
    fn name(&self) -> &'static str {
        "DynamicQuantizeLinear"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 1, 1)?;
        check_same(op, "input", inputs[0].dtype, DType::F32)?;
        Ok(vec![
            Fact::new(DType::U8, inputs[0].shape.clone()),
            Fact::new(DType::F32, vec![]),
            Fact::new(DType::U8, vec![]),
        ])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 1, 1)?;
        let x = inputs[0].as_slice::<f32>().map_err(|_| IrError::op(op, "input must be f32"))?;
        // The range always includes 0 so that 0 is exactly representable.
        let (lo, hi) = x.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        // An all-zero input would give scale 0; use 1 as ONNX Runtime does.
        let scale = if hi == lo { 1.0 } else { (hi - lo) / 255.0 };
        let zero = (0.0 - lo / scale).clamp(0.0, 255.0).round_ties_even();
        let y: Vec<u8> = x.iter().map(|&v| ((v / scale).round_ties_even() + zero).clamp(0.0, 255.0) as u8).collect();
        Ok(vec![Tensor::from_vec(inputs[0].shape().to_vec(), y)?, Tensor::scalar(scale), Tensor::scalar(zero as u8)])
    }
}

/// Numpy `matmul` output shape (batch dims broadcast; a 1-d operand's added dim removed).
pub(crate) fn matmul_dims(op: &'static str, a: &[Dim], b: &[Dim]) -> IrResult<Vec<Dim>> {
    if a.is_empty() || b.is_empty() {
        op_bail!(op, "operands must be at least 1-d, got shapes {} and {}", show_dims(a), show_dims(b));
    }
    let a2 = if a.len() == 1 { vec![Dim::Known(1), a[0].clone()] } else { a.to_vec() };
    let b2 = if b.len() == 1 { vec![b[0].clone(), Dim::Known(1)] } else { b.to_vec() };
    let (ra, rb) = (a2.len(), b2.len());
    if let (Dim::Known(k1), Dim::Known(k2)) = (&a2[ra - 1], &b2[rb - 2]) {
        if k1 != k2 {
            op_bail!(op, "inner dims differ: shapes {} and {}", show_dims(a), show_dims(b));
        }
    }
    let mut out = broadcast_dims(op, &a2[..ra - 2], &b2[..rb - 2])?;
    if a.len() > 1 {
        out.push(a2[ra - 2].clone());
    }
    if b.len() > 1 {
        out.push(b2[rb - 1].clone());
    }
    Ok(out)
}

/// Flat offset of the matrix at batch index `idx` (of the broadcast batch shape) in an
/// operand whose batch dims are `dims` (right-aligned, broadcasting dims of 1).
fn batch_offset(idx: &[usize], dims: &[usize], matrix: usize) -> usize {
    let skip = idx.len() - dims.len();
    let strides = strides_of(dims);
    dims.iter().zip(&strides).zip(&idx[skip..]).map(|((&d, &s), &i)| if d == 1 { 0 } else { i * s }).sum::<usize>()
        * matrix
}

/// Numpy `matmul` on f64 values; returns the output shape and values. The integer and
/// quantized matmuls run through this loop.
pub(crate) fn matmul_f64(
    op: &'static str,
    a: &[f64],
    a_shape: &[usize],
    b: &[f64],
    b_shape: &[usize],
) -> IrResult<(Vec<usize>, Vec<f64>)> {
    let dims = |s: &[usize]| s.iter().map(|&d| Dim::Known(d)).collect::<Vec<_>>();
    let out_dims = matmul_dims(op, &dims(a_shape), &dims(b_shape))?;
    let out_shape: Vec<usize> = out_dims.iter().filter_map(Dim::as_known).collect();
    let total = checked_numel(&out_shape, DType::F64)?;
    let a2 = if a_shape.len() == 1 { vec![1, a_shape[0]] } else { a_shape.to_vec() };
    let b2 = if b_shape.len() == 1 { vec![b_shape[0], 1] } else { b_shape.to_vec() };
    let (ra, rb) = (a2.len(), b2.len());
    let (m, k, n) = (a2[ra - 2], a2[ra - 1], b2[rb - 1]);
    if a.len() != a2.iter().product::<usize>() || b.len() != b2.iter().product::<usize>() {
        op_bail!(op, "operand values do not match shapes {a_shape:?} and {b_shape:?}");
    }
    let batch: Vec<usize> = broadcast_shapes(&a2[..ra - 2], &b2[..rb - 2])?;
    let mut y = vec![0f64; total];
    if total == 0 {
        return Ok((out_shape, y));
    }
    let mut idx = vec![0; batch.len()];
    for yb in y.chunks_exact_mut(m * n) {
        let ao = batch_offset(&idx, &a2[..ra - 2], m * k);
        let bo = batch_offset(&idx, &b2[..rb - 2], k * n);
        for (i, yrow) in yb.chunks_exact_mut(n).enumerate() {
            for (kk, &av) in a[ao + i * k..][..k].iter().enumerate() {
                for (yv, bv) in yrow.iter_mut().zip(&b[bo + kk * n..][..n]) {
                    *yv += av * bv;
                }
            }
        }
        next_index(&mut idx, &batch);
    }
    Ok((out_shape, y))
}

/// Values of a matmul operand minus its zero point: a scalar, per row of `a` / per column
/// of `b` (1-d), or an N-d tensor broadcasting to the operand (`[.., M, 1]` / `[.., 1, N]`).
fn centered(op: &'static str, what: &str, x: &Tensor, zero: Option<&Tensor>, rows: bool) -> IrResult<Vec<f64>> {
    let mut v = x.to_f64_vec();
    let Some(z) = zero else { return Ok(v) };
    check_same(op, what, z.dtype(), x.dtype())?;
    let zv = z.to_f64_vec();
    let shape = x.shape();
    let r = shape.len();
    if zv.len() == 1 {
        v.iter_mut().for_each(|e| *e -= zv[0]);
    } else if z.rank() == 1 {
        let (len, step) = match (rows, r) {
            (true, 2..) => (shape[r - 2], shape[r - 1]),
            (false, 2..) => (shape[r - 1], 1),
            _ => op_bail!(op, "{what} has {} values but the operand is 1-d", zv.len()),
        };
        if zv.len() != len {
            let side = if rows { "rows" } else { "columns" };
            op_bail!(op, "{what} has {} values for {len} {side}", zv.len());
        }
        v.iter_mut().enumerate().for_each(|(i, e)| *e -= zv[(i / step) % len]);
    } else {
        if z.rank() != r || broadcast_shapes(shape, z.shape()).ok().as_deref() != Some(shape) {
            op_bail!(op, "{what} of shape {:?} does not broadcast to {shape:?}", z.shape());
        }
        let zs = strides_of(z.shape());
        let mut idx = vec![0; r];
        for e in v.iter_mut() {
            let off: usize =
                idx.iter().zip(z.shape()).zip(&zs).map(|((&i, &d), &s)| if d == 1 { 0 } else { i * s }).sum();
            *e -= zv[off];
            next_index(&mut idx, shape);
        }
    }
    Ok(v)
}

/// `saturate(round_half_even(acc * multiplier) + zero)`, in f32 as ONNX Runtime computes it.
fn requantize(acc: f64, multiplier: f32, zero: f64, (lo, hi): (f64, f64)) -> f64 {
    (((acc as f32) * multiplier).round_ties_even() as f64 + zero).clamp(lo, hi)
}

/// Rows `m` of `a` and columns `n` of `b` as matmul sees them (1 for a 1-d operand).
fn rows_cols(a: &[usize], b: &[usize]) -> (usize, usize) {
    let m = if a.len() >= 2 { a[a.len() - 2] } else { 1 };
    let n = if b.len() >= 2 { b[b.len() - 1] } else { 1 };
    (m, n)
}

/// Dim of a fact shape counted from the end, for per-row / per-column parameter checks.
fn dim_from_end(s: &[Dim], k: usize) -> Dim {
    if s.len() >= 2 {
        s[s.len() - k].clone()
    } else {
        Dim::Known(1)
    }
}

impl OpDef for MatMulInteger {
    fn name(&self) -> &'static str {
        "MatMulInteger"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 4)?;
        let (a, b) = (inputs[0], inputs[1]);
        check_8bit(op, "a", a.dtype)?;
        check_8bit(op, "b", b.dtype)?;
        for (i, (name, operand)) in [("a_zero_point", a), ("b_zero_point", b)].into_iter().enumerate() {
            if let Some(z) = inputs.get(i + 2) {
                check_same(op, name, z.dtype, operand.dtype)?;
                if z.rank() > operand.rank().max(1) {
                    op_bail!(op, "{name} of shape {} has a higher rank than its operand", show_dims(&z.shape));
                }
            }
        }
        Ok(vec![Fact::new(DType::I32, matmul_dims(op, &a.shape, &b.shape)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        check_eval(self, inputs)?;
        let (a, b) = (inputs[0], inputs[1]);
        let av = centered(op, "a_zero_point", a, inputs.get(2).copied(), true)?;
        let bv = centered(op, "b_zero_point", b, inputs.get(3).copied(), false)?;
        let (shape, y) = matmul_f64(op, &av, a.shape(), &bv, b.shape())?;
        Ok(vec![Tensor::from_f64s(DType::I32, shape, &y)?])
    }
}

impl OpDef for QLinearMatMul {
    fn name(&self) -> &'static str {
        "QLinearMatMul"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 8, 8)?;
        let [a, a_s, a_z, b, b_s, b_z, y_s, y_z] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| inputs[i]);
        check_8bit(op, "a", a.dtype)?;
        check_8bit(op, "b", b.dtype)?;
        check_same(op, "a_zero_point", a_z.dtype, a.dtype)?;
        check_same(op, "b_zero_point", b_z.dtype, b.dtype)?;
        check_8bit(op, "y_zero_point", y_z.dtype)?;
        let (m, n) = (dim_from_end(&a.shape, 2), dim_from_end(&b.shape, 1));
        let one = Dim::Known(1);
        for (name, f, len) in [
            ("a_scale", a_s, &m),
            ("a_zero_point", a_z, &m),
            ("b_scale", b_s, &n),
            ("b_zero_point", b_z, &n),
            ("y_scale", y_s, &one),
            ("y_zero_point", y_z, &one),
        ] {
            check_param_fact(op, name, f, len)?;
        }
        for (name, s) in [("a_scale", a_s), ("b_scale", b_s), ("y_scale", y_s)] {
            check_float(op, name, s.dtype)?;
        }
        Ok(vec![Fact::new(y_z.dtype, matmul_dims(op, &a.shape, &b.shape)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        let out = check_eval(self, inputs)?[0].dtype;
        let [a, a_s, a_z, b, b_s, b_z, y_s, y_z] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| inputs[i]);
        let (m, n) = rows_cols(a.shape(), b.shape());
        let av = centered(op, "a_zero_point", a, Some(a_z), true)?;
        let bv = centered(op, "b_zero_point", b, Some(b_z), false)?;
        let (shape, acc) = matmul_f64(op, &av, a.shape(), &bv, b.shape())?;
        let (sa, sb) = (per_channel(op, "a_scale", a_s, m)?, per_channel(op, "b_scale", b_s, n)?);
        let (sy, zy, range) =
            (scalar(op, "y_scale", y_s)?, scalar(op, "y_zero_point", y_z)?, qrange(op, "y_zero_point", out)?);
        let y: Vec<f64> = acc
            .iter()
            .enumerate()
            .map(|(i, &v)| {
                let mult = sa[(i / n) % m] as f32 * sb[i % n] as f32 / sy as f32;
                requantize(v, mult, zy, range)
            })
            .collect();
        Ok(vec![Tensor::from_f64s(out, shape, &y)?])
    }
}

/// Input and weights of an integer convolution minus their zero points (the input's per
/// tensor, the weights' per tensor or per output channel).
fn centered_conv(
    op: &'static str,
    x: &Tensor,
    x_zero: Option<&Tensor>,
    w: &Tensor,
    w_zero: Option<&Tensor>,
) -> IrResult<(Vec<f64>, Vec<f64>)> {
    let mut xv = x.to_f64_vec();
    if let Some(z) = x_zero {
        check_same(op, "x_zero_point", z.dtype(), x.dtype())?;
        let z = scalar(op, "x_zero_point", z)?;
        xv.iter_mut().for_each(|e| *e -= z);
    }
    let mut wv = w.to_f64_vec();
    let m = w.shape().first().copied().unwrap_or(0);
    if let (Some(z), true) = (w_zero, m > 0) {
        check_same(op, "w_zero_point", z.dtype(), w.dtype())?;
        let z = per_channel(op, "w_zero_point", z, m)?;
        let per = wv.len() / m;
        wv.iter_mut().enumerate().for_each(|(i, e)| *e -= z[i / per.max(1)]);
    }
    Ok((xv, wv))
}

impl OpDef for ConvInteger {
    fn name(&self) -> &'static str {
        "ConvInteger"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 4)?;
        let (x, w) = (inputs[0], inputs[1]);
        check_8bit(op, "x", x.dtype)?;
        check_8bit(op, "w", w.dtype)?;
        let shape = conv_output_dims(op, &self.attrs, &x.shape, &w.shape)?;
        if let Some(z) = inputs.get(2) {
            check_same(op, "x_zero_point", z.dtype, x.dtype)?;
            check_param_fact(op, "x_zero_point", z, &Dim::Known(1))?;
        }
        if let Some(z) = inputs.get(3) {
            check_same(op, "w_zero_point", z.dtype, w.dtype)?;
            check_param_fact(op, "w_zero_point", z, &shape[1])?;
        }
        Ok(vec![Fact::new(DType::I32, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        check_eval(self, inputs)?;
        let (x, w) = (inputs[0], inputs[1]);
        let (xv, wv) = centered_conv(op, x, inputs.get(2).copied(), w, inputs.get(3).copied())?;
        let (shape, y) = conv_f64(op, &self.attrs, &xv, x.shape(), &wv, w.shape(), None)?;
        Ok(vec![Tensor::from_f64s(DType::I32, shape, &y)?])
    }
}

impl OpDef for QLinearConv {
    fn name(&self) -> &'static str {
        "QLinearConv"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 8, 9)?;
        let [x, x_s, x_z, w, w_s, w_z, y_s, y_z] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| inputs[i]);
        check_8bit(op, "x", x.dtype)?;
        check_8bit(op, "w", w.dtype)?;
        check_same(op, "x_zero_point", x_z.dtype, x.dtype)?;
        check_same(op, "w_zero_point", w_z.dtype, w.dtype)?;
        check_8bit(op, "y_zero_point", y_z.dtype)?;
        for (name, s) in [("x_scale", x_s), ("w_scale", w_s), ("y_scale", y_s)] {
            check_float(op, name, s.dtype)?;
        }
        let shape = conv_output_dims(op, &self.attrs, &x.shape, &w.shape)?;
        let one = Dim::Known(1);
        for (name, f, len) in [
            ("x_scale", x_s, &one),
            ("x_zero_point", x_z, &one),
            ("w_scale", w_s, &shape[1]),
            ("w_zero_point", w_z, &shape[1]),
            ("y_scale", y_s, &one),
            ("y_zero_point", y_z, &one),
        ] {
            check_param_fact(op, name, f, len)?;
        }
        if let Some(b) = inputs.get(8) {
            check_bias(op, b, &shape[1], DType::I32)?;
        }
        Ok(vec![Fact::new(y_z.dtype, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        let out = check_eval(self, inputs)?[0].dtype;
        let [x, x_s, x_z, w, w_s, w_z, y_s, y_z] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| inputs[i]);
        let (xv, wv) = centered_conv(op, x, Some(x_z), w, Some(w_z))?;
        let bias = inputs.get(8).map(|b| b.to_f64_vec());
        let (shape, acc) = conv_f64(op, &self.attrs, &xv, x.shape(), &wv, w.shape(), bias.as_deref())?;
        let m = shape[1];
        let plane: usize = shape[2..].iter().product();
        let sw = per_channel(op, "w_scale", w_s, m)?;
        let (sx, sy) = (scalar(op, "x_scale", x_s)? as f32, scalar(op, "y_scale", y_s)? as f32);
        let (zy, range) = (scalar(op, "y_zero_point", y_z)?, qrange(op, "y_zero_point", out)?);
        let mult: Vec<f32> = sw.iter().map(|&s| sx * s as f32 / sy).collect();
        let y: Vec<f64> =
            acc.iter().enumerate().map(|(i, &v)| requantize(v, mult[(i / plane) % m], zy, range)).collect();
        Ok(vec![Tensor::from_f64s(out, shape, &y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }
    fn u8t(shape: &[usize], v: &[u8]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }
    fn i8t(shape: &[usize], v: &[i8]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    /// Runs `eval` and checks `output_facts` agrees on dtypes and shapes.
    fn run(op: &dyn OpDef, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let want = check_eval(op, inputs)?;
        let got = op.eval(inputs)?;
        for (w, g) in want.iter().zip(&got) {
            assert_eq!((w.dtype, w.known_shape().as_deref()), (g.dtype(), Some(g.shape())));
        }
        Ok(got)
    }

    fn err(op: &dyn OpDef, inputs: &[&Tensor]) -> String {
        run(op, inputs).unwrap_err().to_string()
    }

    #[test]
    fn quantize_rounds_half_to_even_and_saturates() {
        let q = QuantizeLinear { axis: 1 };
        let x = f(&[7], &[0.5, 1.5, 2.5, -0.5, -1.5, 300.0, -300.0]);
        let one = f(&[], &[1.0]);
        let y = run(&q, &[&x, &one, &u8t(&[], &[0])]).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[0, 2, 2, 0, 0, 255, 0]);
        let y = run(&q, &[&x, &one, &i8t(&[], &[0])]).unwrap();
        assert_eq!(y[0].as_slice::<i8>().unwrap(), &[0, 2, 2, 0, -2, 127, -128]);
        // 3 / 2 = 1.5 -> 2, 5 / 2 = 2.5 -> 2, -21 / 2 = -10.5 -> -10; then + 10
        let x = f(&[3], &[3.0, 5.0, -21.0]);
        let y = run(&q, &[&x, &f(&[1], &[2.0]), &u8t(&[1], &[10])]).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[12, 12, 0]);
        // without a zero point: u8, zero point 0
        let y = run(&q, &[&x, &f(&[], &[2.0])]).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[2, 2, 0]);
        let x = Tensor::from_vec(vec![2], vec![7i32, -9]).unwrap();
        let y = run(&q, &[&x, &f(&[], &[2.0]), &i8t(&[], &[0])]).unwrap();
        assert_eq!(y[0].as_slice::<i8>().unwrap(), &[4, -4]);
    }

    #[test]
    fn quantize_per_axis() {
        let x = f(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let s = f(&[2], &[1.0, 2.0]);
        let y = run(&QuantizeLinear { axis: 1 }, &[&x, &s, &u8t(&[2], &[0, 1])]).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[1, 2, 3, 3]);
        let y = run(&QuantizeLinear { axis: -2 }, &[&x, &s, &u8t(&[2], &[0, 0])]).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[1, 2, 2, 2]);
    }

    #[test]
    fn quantize_errors() {
        let q = QuantizeLinear { axis: 1 };
        let x = f(&[2, 3], &[0.0; 6]);
        let s2 = f(&[2], &[1.0, 1.0]);
        assert!(err(&q, &[&x, &s2, &u8t(&[2], &[0, 0])]).contains("expected 1 or 3"));
        assert!(err(&q, &[&x, &f(&[2, 3], &[1.0; 6])]).contains("blocked"));
        assert!(err(&q, &[&x, &f(&[], &[1.0]), &f(&[], &[0.0])]).contains("zero point"));
        assert!(err(&q, &[&u8t(&[1], &[0]), &f(&[], &[1.0])]).contains("input"));
        assert!(err(&q, &[&x, &u8t(&[], &[1])]).contains("scale"));
        assert!(err(&QuantizeLinear { axis: 2 }, &[&x, &s2]).contains("axis"));
        assert!(err(&q, &[&x]).contains("inputs"));
    }

    #[test]
    fn dequantize() {
        let d = DequantizeLinear { axis: 1 };
        let x = u8t(&[3], &[0, 128, 255]);
        let y = run(&d, &[&x, &f(&[], &[0.5]), &u8t(&[], &[128])]).unwrap();
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[-64.0, 0.0, 63.5]);
        let x = Tensor::from_vec(vec![2], vec![-7i32, 100_000]).unwrap();
        let z = Tensor::from_vec(vec![], vec![0i32]).unwrap();
        let y = run(&d, &[&x, &f(&[], &[0.5]), &z]).unwrap();
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[-3.5, 50_000.0]);
        // per axis 0 of a [2, 2] tensor, output dtype from the scale
        let x = i8t(&[2, 2], &[1, 2, 3, 4]);
        let s = Tensor::from_vec(vec![2], vec![slimnn_tensor::f16::from_f32(1.0), slimnn_tensor::f16::from_f32(0.5)])
            .unwrap();
        let y = run(&DequantizeLinear { axis: 0 }, &[&x, &s, &i8t(&[2], &[1, -2])]).unwrap();
        assert_eq!(y[0].dtype(), DType::F16);
        assert_eq!(y[0].to_f64_vec(), [0.0, 1.0, 2.5, 3.0]);
        assert!(err(&d, &[&x, &f(&[], &[1.0]), &u8t(&[], &[0])]).contains("zero point"));
        assert!(err(&d, &[&f(&[1], &[1.0]), &f(&[], &[1.0])]).contains("input"));
        assert!(err(&d, &[&x, &f(&[3], &[1.0; 3])]).contains("expected 1 or 2"));
    }

    #[test]
    fn dynamic_quantize() {
        let op = DynamicQuantizeLinear;
        // range [-1, 2]: scale 3 / 255, zero point 85
        let y = run(&op, &[&f(&[4], &[0.0, 2.0, -1.0, 1.0])]).unwrap();
        assert_eq!(y[1].as_slice::<f32>().unwrap(), &[3.0 / 255.0]);
        assert_eq!(y[2].as_slice::<u8>().unwrap(), &[85]);
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[85, 255, 0, 170]);
        // positive values only: the range still starts at 0
        let y = run(&op, &[&f(&[2], &[1.0, 2.55])]).unwrap();
        assert_eq!((y[1].as_slice::<f32>().unwrap()[0], y[2].as_slice::<u8>().unwrap()[0]), (0.01, 0));
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[100, 255]);
        // negative values only: zero point 255
        let y = run(&op, &[&f(&[2], &[-2.55, -1.0])]).unwrap();
        assert_eq!(y[2].as_slice::<u8>().unwrap(), &[255]);
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[0, 155]);
        // all zeros: scale 1 rather than a division by zero
        let y = run(&op, &[&f(&[2, 1], &[0.0, 0.0])]).unwrap();
        assert_eq!((y[1].as_slice::<f32>().unwrap()[0], y[2].as_slice::<u8>().unwrap()[0]), (1.0, 0));
        assert_eq!(y[0].shape(), &[2, 1]);
        let x64 = Tensor::from_vec(vec![1], vec![1.0f64]).unwrap();
        assert!(err(&op, &[&x64]).contains("f32"));
    }

    #[test]
    fn matmul_integer_zero_points() {
        let op = MatMulInteger;
        let a = u8t(&[2, 2], &[1, 2, 3, 4]);
        let b = u8t(&[2, 2], &[1, 0, 0, 1]);
        let y = run(&op, &[&a, &b, &u8t(&[], &[1]), &u8t(&[], &[0])]).unwrap();
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[0, 1, 2, 3]);
        // per row of a: rows minus 1 and 2
        let y = run(&op, &[&a, &b, &u8t(&[2], &[1, 2])]).unwrap();
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[0, 1, 1, 2]);
        // per column of b, i8 x u8, no zero point for a
        let bi = i8t(&[2, 2], &[-1, 2, 3, -4]);
        let y = run(&op, &[&a, &bi, &u8t(&[], &[0]), &i8t(&[2], &[-1, 2])]).unwrap();
        // b - zp = [[0, 0], [4, -6]]
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[8, -12, 16, -24]);
        // N-d zero point [.., M, 1] broadcasting over a
        let y = run(&op, &[&a, &b, &u8t(&[2, 1], &[1, 2])]).unwrap();
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[0, 1, 1, 2]);
        // 1-d a and batch broadcasting: [2] x [3, 2, 1] -> [3, 1]
        let a1 = i8t(&[2], &[-128, 127]);
        let b3 = i8t(&[3, 2, 1], &[1, 1, 2, 0, -1, -1]);
        let y = run(&op, &[&a1, &b3]).unwrap();
        assert_eq!(y[0].shape(), &[3, 1]);
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[-1, -256, 1]);
        let y = run(&op, &[&u8t(&[2, 1, 2], &[1, 2, 3, 4]), &b]).unwrap();
        assert_eq!(y[0].shape(), &[2, 1, 2]);
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[1, 2, 3, 4]);
    }

    #[test]
    fn matmul_integer_errors() {
        let op = MatMulInteger;
        let a = u8t(&[2, 3], &[0; 6]);
        assert!(err(&op, &[&a, &u8t(&[2, 2], &[0; 4])]).contains("inner dims"));
        assert!(err(&op, &[&f(&[2, 3], &[0.0; 6]), &a]).contains("u8 or i8"));
        let b = u8t(&[3, 2], &[0; 6]);
        assert!(err(&op, &[&a, &b, &i8t(&[], &[0])]).contains("a_zero_point"));
        assert!(err(&op, &[&a, &b, &u8t(&[3], &[0; 3])]).contains("rows"));
        assert!(err(&op, &[&a, &b, &u8t(&[], &[0]), &u8t(&[3], &[0; 3])]).contains("columns"));
        assert!(err(&op, &[&a, &b, &u8t(&[3, 1], &[0; 3])]).contains("broadcast"));
        assert!(err(&op, &[&a]).contains("inputs"));
    }

    #[test]
    fn qlinear_matmul() {
        let op = QLinearMatMul;
        // real a = [1, 2], real b = [0.5, 0.5]^T: 1.5 = 3 * 0.5, plus zero point 10
        let a = u8t(&[1, 2], &[2, 4]);
        let b = u8t(&[2, 1], &[2, 2]);
        let (sa, sb, sy) = (f(&[], &[0.5]), f(&[], &[0.25]), f(&[], &[0.5]));
        let z = u8t(&[], &[0]);
        let y = run(&op, &[&a, &sa, &z, &b, &sb, &z, &sy, &u8t(&[], &[10])]).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[13]);
        // i8 output saturates; acc 12 * 8 = 96 and 12 * 16 = 192 per column scale
        let b2 = u8t(&[2, 2], &[2, 2, 2, 2]);
        let sb2 = f(&[2], &[4.0, 8.0]);
        let y = run(&op, &[&a, &sa, &z, &b2, &sb2, &u8t(&[2], &[0, 0]), &f(&[], &[0.25]), &i8t(&[], &[0])]).unwrap();
        assert_eq!(y[0].as_slice::<i8>().unwrap(), &[96, 127]);
        assert!(err(&op, &[&a, &sa, &z, &b, &sb, &z, &f(&[2], &[1.0, 1.0]), &z]).contains("y_scale"));
        assert!(err(&op, &[&a, &sa, &i8t(&[], &[0]), &b, &sb, &z, &sy, &z]).contains("a_zero_point"));
        assert!(err(&op, &[&a, &z, &z, &b, &sb, &z, &sy, &z]).contains("a_scale"));
    }

    #[test]
    fn conv_integer() {
        let x = u8t(&[1, 1, 2, 2], &[1, 2, 3, 4]);
        let w = u8t(&[1, 1, 1, 1], &[2]);
        let op = ConvInteger { attrs: ConvAttrs::default() };
        let y = run(&op, &[&x, &w, &u8t(&[], &[1]), &u8t(&[], &[0])]).unwrap();
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[0, 2, 4, 6]);
        // per-output-channel weight zero points: weights 3 - 1 and 5 - 2
        let w2 = u8t(&[2, 1, 1, 1], &[3, 5]);
        let y = run(&op, &[&x, &w2, &u8t(&[], &[1]), &u8t(&[2], &[1, 2])]).unwrap();
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[0, 2, 4, 6, 0, 3, 6, 9]);
        // a 2x2 kernel with padding, i8 weights
        let attrs = ConvAttrs { pads: vec![0, 0, 1, 1], ..Default::default() };
        let op = ConvInteger { attrs };
        let w = i8t(&[1, 1, 2, 2], &[1, -1, -1, 1]);
        let y = run(&op, &[&x, &w]).unwrap();
        assert_eq!(y[0].as_slice::<i32>().unwrap(), &[0, -2, -1, 4]);
        assert!(err(&op, &[&x, &w, &u8t(&[2], &[0, 0])]).contains("x_zero_point"));
        assert!(err(&op, &[&x, &w, &u8t(&[], &[0]), &i8t(&[3], &[0; 3])]).contains("w_zero_point"));
        assert!(err(&op, &[&f(&[1, 1, 2, 2], &[0.0; 4]), &w]).contains("u8 or i8"));
    }

    #[test]
    fn qlinear_conv() {
        let x = u8t(&[1, 1, 2, 2], &[1, 2, 3, 4]);
        let w = u8t(&[2, 1, 1, 1], &[3, 5]);
        let op = QLinearConv { attrs: ConvAttrs::default() };
        let (one, z) = (f(&[], &[1.0]), u8t(&[], &[0]));
        let (xz, wz, ws) = (u8t(&[], &[1]), u8t(&[2], &[1, 2]), f(&[2], &[0.5, 1.0]));
        let bias = Tensor::from_vec(vec![2], vec![1i32, -1]).unwrap();
        // x - 1 = [0, 1, 2, 3]; channel 0: (2x + 1) * 0.5 = [0.5, 1.5, 2.5, 3.5] -> [0, 2, 2, 4];
        // channel 1: 3x - 1 = [-1, 2, 5, 8], saturated at 0
        let y = run(&op, &[&x, &one, &xz, &w, &ws, &wz, &one, &z, &bias]).unwrap();
        assert_eq!(y[0].as_slice::<u8>().unwrap(), &[0, 2, 2, 4, 0, 2, 5, 8]);
        // without bias, i8 output with zero point -3
        let y = run(&op, &[&x, &one, &xz, &w, &ws, &wz, &one, &i8t(&[], &[-3])]).unwrap();
        assert_eq!(y[0].as_slice::<i8>().unwrap(), &[-3, -2, -1, 0, -3, 0, 3, 6]);
        let bad_bias = f(&[2], &[0.0; 2]);
        assert!(err(&op, &[&x, &one, &xz, &w, &ws, &wz, &one, &z, &bad_bias]).contains("bias"));
        assert!(err(&op, &[&x, &f(&[2], &[1.0; 2]), &xz, &w, &ws, &wz, &one, &z]).contains("x_scale"));
        assert!(err(&op, &[&x, &one, &xz, &w, &f(&[3], &[1.0; 3]), &wz, &one, &z]).contains("w_scale"));
        assert!(err(&op, &[&x, &one, &xz, &w, &ws, &wz, &one]).contains("inputs"));
        let f32_y = f(&[], &[0.0]);
        assert!(err(&op, &[&x, &one, &xz, &w, &ws, &wz, &one, &f32_y]).contains("y_zero_point"));
    }
}

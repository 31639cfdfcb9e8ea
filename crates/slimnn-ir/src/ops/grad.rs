//! Gradient ops: the backward halves of forward ops, built by reverse-mode autodiff, plus
//! the fake quantization of quantization-aware training and its straight-through gradient.
//! They are training-only (no ONNX spelling except FakeQuant). Evaluation runs in f64 for
//! every float dtype; the result takes the dtype of the value it is a gradient of.

use super::conv::{
    check_conv_operands, check_float_operands, conv_output_dims, conv_transposed_plane, conv_window, known_dims,
    valid_range, ConvAttrs, Geometry,
};
use super::elementwise::{erf, UnaryOp};
use super::pool::{taps, Pool, PoolKind};
use super::util::{expect_inputs, next_index, norm_axis, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{checked_numel, DType, Dim, Tensor};

/// `[x, dy] -> [dy * f'(x)]` for a differentiable unary function `f`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UnaryGrad(pub UnaryOp);

/// `[y, dy] -> [dx]` where `y` is the OUTPUT of `Softmax` (or `LogSoftmax` when `log`) along
/// `axis` (per-axis form, opset >= 13).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SoftmaxGrad {
    pub axis: i64,
    pub log: bool,
}

/// `[x, scale, dy] -> [dx, dscale, dbias]` of `LayerNormalization` over dims `axis..`;
/// `dscale` and `dbias` are shaped like `scale` (broadcast dims summed).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerNormGrad {
    pub axis: i64,
    pub epsilon: f32,
}

/// `[dy, w, x] -> [dx]` of `Conv(x, w)`; `x` is read for its shape only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvGradInput(pub ConvAttrs);

/// `[x, dy, w] -> [dw]` of `Conv(x, w)`; `w` is read for its shape only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvGradWeight(pub ConvAttrs);

/// `[x, dy] -> [dx]` of a `MaxPool` / `AveragePool`. Max routes each output's gradient to the
/// first maximum of its window (scan order depth, height, width); average spreads it over
/// the window with the divisor the forward op used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolGrad(pub Pool);

/// `[data, indices, dy] -> [ddata]` of `Gather` along `axis`: `dy` scatter-added into zeros
/// shaped like `data` (read for its shape only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherGrad {
    pub axis: i64,
}

/// `[x, scale, zero_point] -> [(clamp(round(x / s) + zp, qmin, qmax) - zp) * s]`: quantize
/// then dequantize in float. Per-tensor (`axis` None, one-element scale and zero point) or
/// per-channel along `axis` (1-d scale and zero point). Rounds half to even, as QuantizeLinear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeQuant {
    pub qmin: i32,
    pub qmax: i32,
    pub axis: Option<i64>,
}

/// `[x, scale, zero_point, dy] -> [dx, dscale]` of [`FakeQuant`]: the straight-through
/// estimator for `dx` (`dy` where `qmin <= round(x / s) + zp <= qmax`, else 0) and the LSQ
/// step-size gradient (Esser et al. 2019) for `dscale`, summed to the scale's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeQuantGrad {
    pub qmin: i32,
    pub qmax: i32,
    pub axis: Option<i64>,
}

// ---------------------------------------------------------------------------------------------
// Shared checks

fn check_float(op: &'static str, what: &str, dt: DType) -> IrResult<()> {
    if !dt.is_float() {
        op_bail!(op, "{what} must be a float tensor, got {dt}");
    }
    Ok(())
}

fn check_same_dtype(op: &'static str, what: &str, dt: DType, want_what: &str, want: DType) -> IrResult<()> {
    if dt != want {
        op_bail!(op, "{what} dtype {dt} differs from {want_what} dtype {want}");
    }
    Ok(())
}

/// Merges two shapes that must be equal: known dims must agree; a known dim wins over a
/// symbolic or unknown one.
fn same_shape(op: &'static str, a_what: &str, a: &[Dim], b_what: &str, b: &[Dim]) -> IrResult<Vec<Dim>> {
    let mismatch = || {
        crate::IrError::op(
            op,
            format!("{a_what} shape {} does not match {b_what} shape {}", show_dims(a), show_dims(b)),
        )
    };
    if a.len() != b.len() {
        return Err(mismatch());
    }
    a.iter()
        .zip(b)
        .map(|(x, y)| match (x, y) {
            (Dim::Known(p), Dim::Known(q)) if p != q => Err(mismatch()),
            (Dim::Known(_), _) => Ok(x.clone()),
            (_, Dim::Known(_)) => Ok(y.clone()),
            (Dim::Sym(_), _) => Ok(x.clone()),
            _ => Ok(y.clone()),
        })
        .collect()
}

fn check_shapes_equal(op: &'static str, a_what: &str, a: &[usize], b_what: &str, b: &[usize]) -> IrResult<()> {
    if a != b {
        op_bail!(op, "{a_what} shape {a:?} does not match {b_what} shape {b:?}");
    }
    Ok(())
}

fn tensor(dtype: DType, shape: &[usize], v: &[f64]) -> IrResult<Tensor> {
    Ok(Tensor::from_f64s(dtype, shape.to_vec(), v)?)
}

// ---------------------------------------------------------------------------------------------
// UnaryGrad

/// `f'(x)` of a differentiable unary op; `None` for ops with no useful derivative.
fn unary_derivative(op: UnaryOp, x: f64) -> Option<f64> {
    use UnaryOp::*;
    let sigmoid = |x: f64| {
        if x >= 0.0 {
            1.0 / (1.0 + (-x).exp())
        } else {
            let e = x.exp();
            e / (1.0 + e)
        }
    };
    Some(match op {
        Neg => -1.0,
        Abs => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                0.0
            }
        }
        Sqrt => 0.5 / x.sqrt(),
        Reciprocal => -1.0 / (x * x),
        Exp => x.exp(),
        Log => 1.0 / x,
        Erf => std::f64::consts::FRAC_2_SQRT_PI * (-x * x).exp(),
        Tanh => {
            let t = x.tanh();
            1.0 - t * t
        }
        Sigmoid => {
            let s = sigmoid(x);
            s * (1.0 - s)
        }
        // At the kink x = 0, Relu, LeakyRelu and Elu take their negative-side slope (as PyTorch).
        Relu => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
        Softplus => sigmoid(x),
        LeakyRelu { alpha } => {
            if x > 0.0 {
                1.0
            } else {
                f64::from(alpha)
            }
        }
        Elu { alpha } => {
            if x > 0.0 {
                1.0
            } else {
                f64::from(alpha) * x.exp()
            }
        }
        HardSigmoid { alpha, beta } => {
            let v = f64::from(alpha) * x + f64::from(beta);
            if v > 0.0 && v < 1.0 {
                f64::from(alpha)
            } else {
                0.0
            }
        }
        // As PyTorch: 0 below -3, x/3 + 1/2 up to 3 inclusive, 1 above.
        HardSwish => {
            if x < -3.0 {
                0.0
            } else if x <= 3.0 {
                x / 3.0 + 0.5
            } else {
                1.0
            }
        }
        Gelu { tanh: false } => {
            let cdf = 0.5 * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2));
            let pdf = (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt();
            cdf + x * pdf
        }
        Gelu { tanh: true } => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            let t = (k * (x + 0.044715 * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Sin => x.cos(),
        Cos => -x.sin(),
        Not | Floor | Ceil | Round | Sign => return None,
    })
}

impl UnaryGrad {
    fn check_op(&self) -> IrResult<()> {
        if unary_derivative(self.0, 0.5).is_none() {
            op_bail!(self.name(), "{:?} has no gradient (piecewise constant or boolean)", self.0);
        }
        Ok(())
    }
}

impl OpDef for UnaryGrad {
    fn name(&self) -> &'static str {
        "UnaryGrad"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 2)?;
        self.check_op()?;
        let (x, dy) = (inputs[0], inputs[1]);
        check_float(op, "x", x.dtype)?;
        check_same_dtype(op, "dy", dy.dtype, "x", x.dtype)?;
        Ok(vec![Fact::new(x.dtype, same_shape(op, "dy", &dy.shape, "x", &x.shape)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 2)?;
        self.check_op()?;
        let (x, dy) = (inputs[0], inputs[1]);
        check_float(op, "x", x.dtype())?;
        check_same_dtype(op, "dy", dy.dtype(), "x", x.dtype())?;
        check_shapes_equal(op, "dy", dy.shape(), "x", x.shape())?;
        let f = self.0;
        let dx: Vec<f64> = x
            .to_f64_vec()
            .into_iter()
            .zip(dy.to_f64_vec())
            .map(|(x, d)| d * unary_derivative(f, x).unwrap_or(0.0))
            .collect();
        Ok(vec![tensor(x.dtype(), x.shape(), &dx)?])
    }
}

// ---------------------------------------------------------------------------------------------
// SoftmaxGrad

impl OpDef for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "SoftmaxGrad"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 2)?;
        let (y, dy) = (inputs[0], inputs[1]);
        check_float(op, "y", y.dtype)?;
        check_same_dtype(op, "dy", dy.dtype, "y", y.dtype)?;
        if y.rank() == 0 {
            op_bail!(op, "needs an input of rank >= 1");
        }
        norm_axis(op, self.axis, y.rank())?;
        Ok(vec![Fact::new(y.dtype, same_shape(op, "dy", &dy.shape, "y", &y.shape)?)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 2)?;
        let (y, dy) = (inputs[0], inputs[1]);
        check_float(op, "y", y.dtype())?;
        check_same_dtype(op, "dy", dy.dtype(), "y", y.dtype())?;
        check_shapes_equal(op, "dy", dy.shape(), "y", y.shape())?;
        let shape = y.shape();
        if shape.is_empty() {
            op_bail!(op, "needs an input of rank >= 1");
        }
        let a = norm_axis(op, self.axis, shape.len())?;
        let (n, inner) = (shape[a], shape[a + 1..].iter().product::<usize>());
        let yv = y.to_f64_vec();
        let mut dx = dy.to_f64_vec();
        if n > 0 && inner > 0 {
            // Per column of the axis: s = sum(dy * y) (softmax) or sum(dy) (log-softmax).
            let mut sums = vec![0f64; inner];
            for (yb, db) in yv.chunks_exact(n * inner).zip(dx.chunks_exact_mut(n * inner)) {
                sums.fill(0.0);
                for (yr, dr) in yb.chunks_exact(inner).zip(db.chunks_exact(inner)) {
                    for ((s, &y), &d) in sums.iter_mut().zip(yr).zip(dr) {
                        *s += if self.log { d } else { d * y };
                    }
                }
                for (yr, dr) in yb.chunks_exact(inner).zip(db.chunks_exact_mut(inner)) {
                    for ((d, &y), &s) in dr.iter_mut().zip(yr).zip(&sums) {
                        *d = if self.log { *d - y.exp() * s } else { y * (*d - s) };
                    }
                }
            }
        }
        Ok(vec![tensor(y.dtype(), shape, &dx)?])
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNormGrad

/// Checks that `p` broadcasts to `x` without growing it (numpy rules, as LayerNorm's scale).
fn check_broadcasts_to(op: &'static str, what: &str, p: &[Dim], x: &[Dim]) -> IrResult<()> {
    let fits = p.len() <= x.len()
        && p.iter().zip(&x[x.len() - p.len()..]).all(|(p, x)| match (p, x) {
            (Dim::Known(1), _) => true,
            (Dim::Known(a), Dim::Known(b)) => a == b,
            _ => true,
        });
    if !fits {
        op_bail!(op, "{what} of shape {} does not broadcast to input shape {}", show_dims(p), show_dims(x));
    }
    Ok(())
}

/// Offsets into `p` (shape `p_shape`, broadcast right-aligned to `shape`) of every element of
/// `shape` in row-major order.
fn broadcast_offsets(p_shape: &[usize], shape: &[usize]) -> Vec<usize> {
    let lead = shape.len() - p_shape.len();
    let mut strides = vec![0usize; shape.len()];
    let mut s = 1;
    for i in (0..p_shape.len()).rev() {
        if p_shape[i] != 1 {
            strides[lead + i] = s;
        }
        s *= p_shape[i];
    }
    let total: usize = shape.iter().product();
    let mut out = Vec::with_capacity(total);
    if total == 0 {
        return out;
    }
    let mut idx = vec![0usize; shape.len()];
    loop {
        out.push(idx.iter().zip(&strides).map(|(i, s)| i * s).sum());
        if !next_index(&mut idx, shape) {
            break;
        }
    }
    out
}

impl OpDef for LayerNormGrad {
    fn name(&self) -> &'static str {
        "LayerNormGrad"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        self.check_epsilon()?;
        let (x, scale, dy) = (inputs[0], inputs[1], inputs[2]);
        check_float(op, "x", x.dtype)?;
        check_same_dtype(op, "scale", scale.dtype, "x", x.dtype)?;
        check_same_dtype(op, "dy", dy.dtype, "x", x.dtype)?;
        if x.rank() == 0 {
            op_bail!(op, "needs an input of rank >= 1");
        }
        norm_axis(op, self.axis, x.rank())?;
        check_broadcasts_to(op, "scale", &scale.shape, &x.shape)?;
        let dx = Fact::new(x.dtype, same_shape(op, "dy", &dy.shape, "x", &x.shape)?);
        Ok(vec![dx, scale.without_value(), scale.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        self.check_epsilon()?;
        let (x, scale, dy) = (inputs[0], inputs[1], inputs[2]);
        check_float(op, "x", x.dtype())?;
        check_same_dtype(op, "scale", scale.dtype(), "x", x.dtype())?;
        check_same_dtype(op, "dy", dy.dtype(), "x", x.dtype())?;
        check_shapes_equal(op, "dy", dy.shape(), "x", x.shape())?;
        let shape = x.shape();
        if shape.is_empty() {
            op_bail!(op, "needs an input of rank >= 1");
        }
        let axis = norm_axis(op, self.axis, shape.len())?;
        check_broadcasts_to(op, "scale", &known_dims(scale.shape()), &known_dims(shape))?;
        let n: usize = shape[axis..].iter().product();
        // Where each element's scale lives: a per-row map when the scale does not vary across
        // rows (the usual [n] scale), else one offset per element.
        let lead_ones = scale.shape().iter().take_while(|&&d| d == 1).count();
        let core = &scale.shape()[lead_ones..];
        let offsets = if core.len() <= shape.len() - axis {
            broadcast_offsets(core, &shape[axis..])
        } else {
            broadcast_offsets(scale.shape(), shape)
        };
        let per_row = offsets.len() == n;
        let sv = scale.to_f64_vec();
        let (xv, dyv) = (x.to_f64_vec(), dy.to_f64_vec());
        let mut dx = vec![0f64; xv.len()];
        let (mut dscale, mut dbias) = (vec![0f64; sv.len()], vec![0f64; sv.len()]);
        if n > 0 {
            let eps = f64::from(self.epsilon);
            let mut xhat = vec![0f64; n];
            let mut g = vec![0f64; n];
            for (r, ((xr, dr), dxr)) in
                xv.chunks_exact(n).zip(dyv.chunks_exact(n)).zip(dx.chunks_exact_mut(n)).enumerate()
            {
                let mean = xr.iter().sum::<f64>() / n as f64;
                let var = xr.iter().map(|&v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
                let inv = 1.0 / (var + eps).sqrt();
                let offs = if per_row { &offsets[..] } else { &offsets[r * n..][..n] };
                let (mut mean_g, mut mean_gx) = (0.0, 0.0);
                for j in 0..n {
                    let xh = (xr[j] - mean) * inv;
                    let gj = dr[j] * sv[offs[j]];
                    xhat[j] = xh;
                    g[j] = gj;
                    mean_g += gj;
                    mean_gx += gj * xh;
                    dscale[offs[j]] += dr[j] * xh;
                    dbias[offs[j]] += dr[j];
                }
                mean_g /= n as f64;
                mean_gx /= n as f64;
                for j in 0..n {
                    dxr[j] = inv * (g[j] - mean_g - xhat[j] * mean_gx);
                }
            }
        }
        Ok(vec![
            tensor(x.dtype(), shape, &dx)?,
            tensor(scale.dtype(), scale.shape(), &dscale)?,
            tensor(scale.dtype(), scale.shape(), &dbias)?,
        ])
    }
}

impl LayerNormGrad {
    fn check_epsilon(&self) -> IrResult<()> {
        if !(self.epsilon.is_finite() && self.epsilon >= 0.0) {
            op_bail!(self.name(), "epsilon must be finite and >= 0, got {}", self.epsilon);
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// ConvGradInput, ConvGradWeight

/// The forward geometry of `Conv(x, w)` and its channel counts, after checking `dy` has the
/// forward output's shape. Returns (geometry, n, c, m, group).
fn conv_grad_geometry(
    op: &'static str,
    attrs: &ConvAttrs,
    xs: &[usize],
    ws: &[usize],
    dys: &[usize],
) -> IrResult<(Geometry, usize, usize, usize, usize)> {
    let (xd, wd) = (known_dims(xs), known_dims(ws));
    check_conv_operands(op, attrs.group(), &xd, &wd, false)?;
    let (window, _) = conv_window(op, attrs, &wd[2..])?;
    let g = window.geometry(op, &xs[2..])?;
    let want = [&[xs[0], ws[0]][..], &g.output[3 - (xs.len() - 2)..]].concat();
    check_shapes_equal(op, "dy", dys, "the convolution output", &want)?;
    Ok((g, xs[0], xs[1], ws[0], attrs.group()))
}

/// Facts shared by the two convolution gradients: checks dtypes and that `dy` fits the
/// forward output shape.
fn conv_grad_facts(op: &'static str, attrs: &ConvAttrs, x: &Fact, w: &Fact, dy: &Fact) -> IrResult<()> {
    check_float_operands(op, &[x.dtype, w.dtype])?;
    check_same_dtype(op, "dy", dy.dtype, "x", x.dtype)?;
    let y = conv_output_dims(op, attrs, &x.shape, &w.shape)?;
    same_shape(op, "dy", &dy.shape, "the convolution output", &y)?;
    Ok(())
}

/// `dw += x (*) dy` for one input plane and one output-gradient plane: each tap's gradient is
/// the dot product of `dy` with the input pixels that tap read. Products accumulate
/// lane-wise in `acc` (one slot per output column, so the loop vectorises) and are summed
/// once per tap.
fn conv_weight_plane(g: &Geometry, x: &[f64], dy: &[f64], dw: &mut [f64], acc: &mut [f64]) {
    let [_, ih, iw] = g.input;
    let [od, oh, ow] = g.output;
    let [kd, kh, kw] = g.kernel;
    let sw = g.strides[2];
    for a in 0..kd {
        let off_d = (a * g.dilations[0]) as i64 - g.pad_begin[0];
        let rd = valid_range(od, g.input[0], g.strides[0], off_d);
        for b in 0..kh {
            let off_h = (b * g.dilations[1]) as i64 - g.pad_begin[1];
            let rh = valid_range(oh, ih, g.strides[1], off_h);
            for c in 0..kw {
                let off_w = (c * g.dilations[2]) as i64 - g.pad_begin[2];
                let rw = valid_range(ow, iw, sw, off_w);
                if rw.is_empty() {
                    continue;
                }
                let start = (rw.start as i64 * sw as i64 + off_w) as usize;
                let acc = &mut acc[..rw.len()];
                acc.fill(0.0);
                for o_d in rd.clone() {
                    let i_d = (o_d as i64 * g.strides[0] as i64 + off_d) as usize;
                    for o_h in rh.clone() {
                        let i_h = (o_h as i64 * g.strides[1] as i64 + off_h) as usize;
                        let xrow = &x[(i_d * ih + i_h) * iw..][..iw];
                        let dyrow = &dy[(o_d * oh + o_h) * ow..][rw.clone()];
                        if sw == 1 {
                            for ((s, d), x) in acc.iter_mut().zip(dyrow).zip(&xrow[start..]) {
                                *s += d * x;
                            }
                        } else {
                            for ((s, d), x) in acc.iter_mut().zip(dyrow).zip(xrow[start..].iter().step_by(sw)) {
                                *s += d * x;
                            }
                        }
                    }
                }
                dw[(a * kh + b) * kw + c] += acc.iter().sum::<f64>();
            }
        }
    }
}

impl OpDef for ConvGradInput {
    fn name(&self) -> &'static str {
        "ConvGradInput"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        let (dy, w, x) = (inputs[0], inputs[1], inputs[2]);
        conv_grad_facts(op, &self.0, x, w, dy)?;
        Ok(vec![x.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        let (dy, w, x) = (inputs[0], inputs[1], inputs[2]);
        check_float_operands(op, &[x.dtype(), w.dtype()])?;
        check_same_dtype(op, "dy", dy.dtype(), "x", x.dtype())?;
        let (g, n, c, m, group) = conv_grad_geometry(op, &self.0, x.shape(), w.shape(), dy.shape())?;
        let total = checked_numel(x.shape(), x.dtype())?;
        let mut dx = vec![0f64; total];
        let (in_len, out_len, k_len) = (g.input_len(), g.output_len(), g.kernel_len());
        if total > 0 && out_len > 0 {
            let (dyv, wv) = (dy.to_f64_vec(), w.to_f64_vec());
            // The transposed convolution's geometry: reads the forward output, writes the input.
            let gt = Geometry { input: g.output, output: g.input, ..g };
            let (cpg, mpg) = (c / group, m / group);
            for (ni, dxn) in dx.chunks_exact_mut(c * in_len).enumerate() {
                for (ci, dxp) in dxn.chunks_exact_mut(in_len).enumerate() {
                    let (gi, cloc) = (ci / cpg, ci % cpg);
                    for mi in gi * mpg..(gi + 1) * mpg {
                        let dyp = &dyv[(ni * m + mi) * out_len..][..out_len];
                        let wk = &wv[(mi * cpg + cloc) * k_len..][..k_len];
                        conv_transposed_plane(&gt, dyp, wk, dxp);
                    }
                }
            }
        }
        debug_assert_eq!(n * c * in_len, total);
        Ok(vec![tensor(x.dtype(), x.shape(), &dx)?])
    }
}

impl OpDef for ConvGradWeight {
    fn name(&self) -> &'static str {
        "ConvGradWeight"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        let (x, dy, w) = (inputs[0], inputs[1], inputs[2]);
        conv_grad_facts(op, &self.0, x, w, dy)?;
        Ok(vec![w.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        let (x, dy, w) = (inputs[0], inputs[1], inputs[2]);
        check_float_operands(op, &[x.dtype(), w.dtype()])?;
        check_same_dtype(op, "dy", dy.dtype(), "x", x.dtype())?;
        let (g, n, c, m, group) = conv_grad_geometry(op, &self.0, x.shape(), w.shape(), dy.shape())?;
        let total = checked_numel(w.shape(), w.dtype())?;
        let mut dw = vec![0f64; total];
        let (in_len, out_len, k_len) = (g.input_len(), g.output_len(), g.kernel_len());
        if total > 0 && out_len > 0 && in_len > 0 {
            let (xv, dyv) = (x.to_f64_vec(), dy.to_f64_vec());
            let (cpg, mpg) = (c / group, m / group);
            let mut acc = vec![0f64; g.output[2]];
            for ni in 0..n {
                for (mi, dwm) in dw.chunks_exact_mut(cpg * k_len).enumerate() {
                    let gi = mi / mpg;
                    let dyp = &dyv[(ni * m + mi) * out_len..][..out_len];
                    for (cloc, dwk) in dwm.chunks_exact_mut(k_len).enumerate() {
                        let xp = &xv[(ni * c + gi * cpg + cloc) * in_len..][..in_len];
                        conv_weight_plane(&g, xp, dyp, dwk, &mut acc);
                    }
                }
            }
        }
        Ok(vec![tensor(w.dtype(), w.shape(), &dw)?])
    }
}

// ---------------------------------------------------------------------------------------------
// PoolGrad

impl OpDef for PoolGrad {
    fn name(&self) -> &'static str {
        "PoolGrad"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 2)?;
        let (x, dy) = (inputs[0], inputs[1]);
        check_float(op, "x", x.dtype)?;
        check_same_dtype(op, "dy", dy.dtype, "x", x.dtype)?;
        let y = self.0.output_facts(&[x])?;
        same_shape(op, "dy", &dy.shape, "the pool output", &y[0].shape)?;
        Ok(vec![x.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 2)?;
        let (x, dy) = (inputs[0], inputs[1]);
        check_float(op, "x", x.dtype())?;
        check_same_dtype(op, "dy", dy.dtype(), "x", x.dtype())?;
        let window = self.0.window(&known_dims(x.shape()))?;
        let g = window.geometry(self.0.name(), &x.shape()[2..])?;
        let want = [&x.shape()[..2], &g.output[5 - x.rank()..]].concat();
        check_shapes_equal(op, "dy", dy.shape(), "the pool output", &want)?;
        let [(td, pd), (th, ph), (tw, pw)] = [taps(&g, 0), taps(&g, 1), taps(&g, 2)];
        let (in_len, out_len, [_, ih, iw]) = (g.input_len(), g.output_len(), g.input);
        let (xv, dyv) = (x.to_f64_vec(), dy.to_f64_vec());
        let mut dx = vec![0f64; xv.len()];
        if in_len > 0 && out_len > 0 {
            for ((xp, dxp), dyp) in
                xv.chunks_exact(in_len).zip(dx.chunks_exact_mut(in_len)).zip(dyv.chunks_exact(out_len))
            {
                let mut o = 0;
                for (a, ta) in td.iter().enumerate() {
                    for (b, tb) in th.iter().enumerate() {
                        for (c, tc) in tw.iter().enumerate() {
                            let d = dyp[o];
                            o += 1;
                            let offsets = ta.iter().flat_map(|&i| {
                                tb.iter().flat_map(move |&j| tc.iter().map(move |&k| (i * ih + j) * iw + k))
                            });
                            match self.0.kind {
                                // Same scan and comparison as the forward op: NaN never wins, and
                                // a window with no value above -inf passes no gradient.
                                PoolKind::Max => {
                                    let mut best = (f64::NEG_INFINITY, None);
                                    for at in offsets {
                                        if xp[at] > best.0 {
                                            best = (xp[at], Some(at));
                                        }
                                    }
                                    if let Some(at) = best.1 {
                                        dxp[at] += d;
                                    }
                                }
                                PoolKind::Average { count_include_pad } => {
                                    let count = if count_include_pad {
                                        pd[a] * ph[b] * pw[c]
                                    } else {
                                        ta.len() * tb.len() * tc.len()
                                    };
                                    if count > 0 {
                                        let share = d / count as f64;
                                        offsets.for_each(|at| dxp[at] += share);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(vec![tensor(x.dtype(), x.shape(), &dx)?])
    }
}

// ---------------------------------------------------------------------------------------------
// GatherGrad

const INDEX_TYPES: [DType; 2] = [DType::I32, DType::I64];

/// Resolves negative indices against a dim of size `d` as Gather does, rejecting those out of range.
fn norm_gather_indices(op: &'static str, idx: &[i64], d: usize, axis: usize) -> IrResult<Vec<usize>> {
    idx.iter()
        .map(|&i| {
            let j = if i < 0 { i as i128 + d as i128 } else { i as i128 };
            if j < 0 || j >= d as i128 {
                op_bail!(op, "index {i} is out of range for axis {axis} of size {d}");
            }
            Ok(j as usize)
        })
        .collect()
}

impl OpDef for GatherGrad {
    fn name(&self) -> &'static str {
        "GatherGrad"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        let (data, idx, dy) = (inputs[0], inputs[1], inputs[2]);
        check_float(op, "data", data.dtype)?;
        check_same_dtype(op, "dy", dy.dtype, "data", data.dtype)?;
        if !INDEX_TYPES.contains(&idx.dtype) {
            op_bail!(op, "indices must be i32 or i64, got {}", idx.dtype);
        }
        if data.rank() == 0 {
            op_bail!(op, "data must have rank >= 1");
        }
        let axis = norm_axis(op, self.axis, data.rank())?;
        if let (Some(t), Some(d)) = (&idx.konst, data.shape[axis].as_known()) {
            norm_gather_indices(op, &t.to_i64_vec()?, d, axis)?;
        }
        let want = [&data.shape[..axis], &idx.shape[..], &data.shape[axis + 1..]].concat();
        same_shape(op, "dy", &dy.shape, "the gather output", &want)?;
        Ok(vec![data.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        let (data, indices, dy) = (inputs[0], inputs[1], inputs[2]);
        check_float(op, "data", data.dtype())?;
        check_same_dtype(op, "dy", dy.dtype(), "data", data.dtype())?;
        if !INDEX_TYPES.contains(&indices.dtype()) {
            op_bail!(op, "indices must be i32 or i64, got {}", indices.dtype());
        }
        let s = data.shape();
        if s.is_empty() {
            op_bail!(op, "data must have rank >= 1");
        }
        let axis = norm_axis(op, self.axis, s.len())?;
        let want = [&s[..axis], indices.shape(), &s[axis + 1..]].concat();
        check_shapes_equal(op, "dy", dy.shape(), "the gather output", &want)?;
        let d = s[axis];
        let idx = norm_gather_indices(op, &indices.to_i64_vec()?, d, axis)?;
        let inner: usize = s[axis + 1..].iter().product();
        let mut dd = vec![0f64; data.len()];
        let dyv = dy.to_f64_vec();
        if inner > 0 && !idx.is_empty() {
            for (ddo, dyo) in dd.chunks_exact_mut(d * inner).zip(dyv.chunks_exact(idx.len() * inner)) {
                for (&j, dyr) in idx.iter().zip(dyo.chunks_exact(inner)) {
                    for (t, &v) in ddo[j * inner..][..inner].iter_mut().zip(dyr) {
                        *t += v;
                    }
                }
            }
        }
        Ok(vec![tensor(data.dtype(), s, &dd)?])
    }
}

// ---------------------------------------------------------------------------------------------
// FakeQuant, FakeQuantGrad

/// Checks attributes and the scale / zero point facts of a fake quantization of `x`.
fn fake_quant_facts(op: &'static str, qmin: i32, qmax: i32, axis: Option<i64>, inputs: &[&Fact]) -> IrResult<()> {
    if qmin > qmax {
        op_bail!(op, "qmin {qmin} exceeds qmax {qmax}");
    }
    let (x, scale, zp) = (inputs[0], inputs[1], inputs[2]);
    check_float(op, "x", x.dtype)?;
    check_float(op, "scale", scale.dtype)?;
    check_float(op, "zero_point", zp.dtype)?;
    match axis {
        None => {
            for (what, f) in [("scale", scale), ("zero_point", zp)] {
                if f.shape.iter().any(|d| matches!(d, Dim::Known(k) if *k != 1)) {
                    op_bail!(op, "per-tensor {what} must hold one element, got shape {}", show_dims(&f.shape));
                }
            }
        }
        Some(a) => {
            let a = norm_axis(op, a, x.rank())?;
            if x.rank() == 0 {
                op_bail!(op, "per-channel quantization needs x of rank >= 1");
            }
            if scale.rank() != 1 {
                op_bail!(op, "per-channel scale must be 1-d, got shape {}", show_dims(&scale.shape));
            }
            same_shape(op, "zero_point", &zp.shape, "scale", &scale.shape)?;
            if let (Dim::Known(s), Dim::Known(c)) = (&scale.shape[0], &x.shape[a]) {
                if s != c {
                    op_bail!(op, "scale has {s} values for {c} channels along axis {a}");
                }
            }
        }
    }
    Ok(())
}

/// Per-channel parameters of a concrete fake quantization: scales, zero points, and the
/// run length `inner` so element `i` belongs to channel `(i / inner) % channels`.
struct FakeQuantParams {
    scale: Vec<f64>,
    zero: Vec<f64>,
    inner: usize,
    /// Divide in f32 for f32 inputs, as QuantizeLinear does, so an exported Q/DQ pair
    /// rounds the same halves.
    f32_ratio: bool,
}

impl FakeQuantParams {
    fn new(op: &'static str, axis: Option<i64>, x: &Tensor, scale: &Tensor, zp: &Tensor) -> IrResult<Self> {
        let (sd, zd) = (known_dims(scale.shape()), known_dims(zp.shape()));
        let facts = [Fact::known(x.dtype(), x.shape()), Fact::new(scale.dtype(), sd), Fact::new(zp.dtype(), zd)];
        fake_quant_facts(op, 0, 0, axis, &[&facts[0], &facts[1], &facts[2]])?;
        let inner = match axis {
            None => x.len().max(1),
            Some(a) => x.shape()[norm_axis(op, a, x.rank())? + 1..].iter().product(),
        };
        let (scale, zero) = (scale.to_f64_vec(), zp.to_f64_vec());
        if scale.is_empty() {
            op_bail!(op, "scale is empty");
        }
        if let Some((c, s)) = scale.iter().enumerate().find(|(_, s)| !(s.is_finite() && **s > 0.0)) {
            op_bail!(op, "scale must be positive and finite, got {s} (channel {c})");
        }
        Ok(FakeQuantParams { scale, zero, inner: inner.max(1), f32_ratio: x.dtype() == DType::F32 })
    }

    fn channel(&self, i: usize) -> usize {
        (i / self.inner) % self.scale.len()
    }

    /// `x / s` for element `i` of channel `c`.
    fn ratio(&self, v: f64, c: usize) -> f64 {
        if self.f32_ratio {
            f64::from(v as f32 / self.scale[c] as f32)
        } else {
            v / self.scale[c]
        }
    }
}

impl OpDef for FakeQuant {
    fn name(&self) -> &'static str {
        "FakeQuant"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        fake_quant_facts(op, self.qmin, self.qmax, self.axis, inputs)?;
        Ok(vec![inputs[0].without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        if self.qmin > self.qmax {
            op_bail!(op, "qmin {} exceeds qmax {}", self.qmin, self.qmax);
        }
        let x = inputs[0];
        let p = FakeQuantParams::new(op, self.axis, x, inputs[1], inputs[2])?;
        let (lo, hi) = (f64::from(self.qmin), f64::from(self.qmax));
        let y: Vec<f64> = x
            .to_f64_vec()
            .into_iter()
            .enumerate()
            .map(|(i, v)| {
                let c = p.channel(i);
                let (s, z) = (p.scale[c], p.zero[c]);
                ((p.ratio(v, c).round_ties_even() + z).clamp(lo, hi) - z) * s
            })
            .collect();
        Ok(vec![tensor(x.dtype(), x.shape(), &y)?])
    }
}

impl OpDef for FakeQuantGrad {
    fn name(&self) -> &'static str {
        "FakeQuantGrad"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 4, 4)?;
        fake_quant_facts(op, self.qmin, self.qmax, self.axis, inputs)?;
        let (x, scale, dy) = (inputs[0], inputs[1], inputs[3]);
        check_same_dtype(op, "dy", dy.dtype, "x", x.dtype)?;
        let dx = Fact::new(x.dtype, same_shape(op, "dy", &dy.shape, "x", &x.shape)?);
        Ok(vec![dx, scale.without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 4, 4)?;
        if self.qmin > self.qmax {
            op_bail!(op, "qmin {} exceeds qmax {}", self.qmin, self.qmax);
        }
        let (x, scale, dy) = (inputs[0], inputs[1], inputs[3]);
        check_same_dtype(op, "dy", dy.dtype(), "x", x.dtype())?;
        check_shapes_equal(op, "dy", dy.shape(), "x", x.shape())?;
        let p = FakeQuantParams::new(op, self.axis, x, scale, inputs[2])?;
        let (lo, hi) = (f64::from(self.qmin), f64::from(self.qmax));
        let mut dx = dy.to_f64_vec();
        let mut dscale = vec![0f64; p.scale.len()];
        for (i, (v, d)) in x.to_f64_vec().into_iter().zip(dx.iter_mut()).enumerate() {
            let c = p.channel(i);
            let z = p.zero[c];
            let r = p.ratio(v, c);
            let q = r.round_ties_even() + z;
            if q < lo {
                dscale[c] += *d * (lo - z);
                *d = 0.0;
            } else if q > hi {
                dscale[c] += *d * (hi - z);
                *d = 0.0;
            } else {
                dscale[c] += *d * (r.round_ties_even() - r);
            }
        }
        Ok(vec![tensor(x.dtype(), x.shape(), &dx)?, tensor(scale.dtype(), scale.shape(), &dscale)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{AutoPad, Conv, Gather, LayerNorm, LogSoftmax, PoolAttrs, Softmax, Unary};

    /// Deterministic values in [lo, hi) (xorshift), distinct with probability ~1.
    fn random(n: usize, seed: u64, lo: f64, hi: f64) -> Vec<f64> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                lo + (hi - lo) * ((s >> 11) as f64 / (1u64 << 53) as f64)
            })
            .collect()
    }

    fn t64(shape: &[usize], v: &[f64]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn rand_t(shape: &[usize], seed: u64) -> Tensor {
        t64(shape, &random(shape.iter().product(), seed, -1.0, 1.0))
    }

    fn f64s(t: &Tensor) -> Vec<f64> {
        t.as_slice::<f64>().unwrap().to_vec()
    }

    /// Evaluates `op`, checking its facts agree with what eval produced.
    fn run(op: &dyn OpDef, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let facts: Vec<Fact> = inputs.iter().map(|x| Fact::known(x.dtype(), x.shape())).collect();
        let want = op.output_facts(&facts.iter().collect::<Vec<_>>())?;
        let out = op.eval(inputs)?;
        assert_eq!(want.len(), out.len());
        for (f, t) in want.iter().zip(&out) {
            assert_eq!(f.known_shape().as_deref(), Some(t.shape()), "{}: facts agree with eval", op.name());
            assert_eq!(f.dtype, t.dtype());
        }
        Ok(out)
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    /// Central differences of `loss(inputs) = sum(forward(inputs) * r)` with respect to input
    /// `wrt`, compared with `analytic`: |a - n| / max(1, |a|, |n|) <= 1e-6 per element.
    fn check_fd(forward: &dyn Fn(&[Tensor]) -> Tensor, inputs: &[Tensor], wrt: usize, r: &Tensor, analytic: &Tensor) {
        let h = 1e-5;
        assert_eq!(analytic.shape(), inputs[wrt].shape(), "gradient shaped like its input");
        let a = f64s(analytic);
        let base = f64s(&inputs[wrt]);
        let rv = f64s(r);
        for (i, &ai) in a.iter().enumerate() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                let mut ins = inputs.to_vec();
                ins[wrt] = t64(inputs[wrt].shape(), &v);
                dot(&f64s(&forward(&ins)), &rv)
            };
            let n = (at(h) - at(-h)) / (2.0 * h);
            let err = (ai - n).abs() / 1f64.max(ai.abs()).max(n.abs());
            assert!(err <= 1e-6, "input {wrt} element {i}: analytic {ai} vs numeric {n} (rel err {err:.2e})");
        }
    }

    /// Runs an op on f32 copies of f64 inputs and compares with the f64 result.
    fn check_f32_matches(op: &dyn OpDef, inputs: &[&Tensor]) {
        let want = op.eval(inputs).unwrap();
        let as32: Vec<Tensor> = inputs
            .iter()
            .map(|t| if t.dtype() == DType::F64 { t.cast(DType::F32).unwrap() } else { (*t).clone() })
            .collect();
        let got = run(op, &as32.iter().collect::<Vec<_>>()).unwrap();
        for (w, g) in want.iter().zip(&got) {
            assert_eq!(g.dtype(), DType::F32);
            let diff = w.to_f64_vec().iter().zip(g.to_f64_vec()).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
            assert!(diff < 1e-4, "{}: f32 differs from f64 by {diff}", op.name());
        }
    }

    // -----------------------------------------------------------------------------------------
    // UnaryGrad

    const DIFFERENTIABLE: [UnaryOp; 19] = [
        UnaryOp::Neg,
        UnaryOp::Abs,
        UnaryOp::Sqrt,
        UnaryOp::Reciprocal,
        UnaryOp::Exp,
        UnaryOp::Log,
        UnaryOp::Erf,
        UnaryOp::Tanh,
        UnaryOp::Sigmoid,
        UnaryOp::Relu,
        UnaryOp::Softplus,
        UnaryOp::LeakyRelu { alpha: 0.1 },
        UnaryOp::Elu { alpha: 0.7 },
        UnaryOp::HardSigmoid { alpha: 0.2, beta: 0.5 },
        UnaryOp::HardSwish,
        UnaryOp::Gelu { tanh: false },
        UnaryOp::Gelu { tanh: true },
        UnaryOp::Sin,
        UnaryOp::Cos,
    ];

    #[test]
    fn unary_grad_matches_central_differences() {
        for (k, &f) in DIFFERENTIABLE.iter().enumerate() {
            // Away from kinks (0, +-2.5 for HardSigmoid, +-3 for HardSwish); positive for Sqrt/Log.
            let mut x = random(24, k as u64 + 1, -4.0, 4.0);
            x.iter_mut().for_each(|v| {
                if matches!(f, UnaryOp::Sqrt | UnaryOp::Log) {
                    *v = v.abs() + 0.2;
                } else if v.abs() < 0.1 {
                    *v += 0.3;
                }
                if (v.abs() - 2.5).abs() < 0.05 || (v.abs() - 3.0).abs() < 0.05 {
                    *v += 0.2;
                }
            });
            let x = t64(&[4, 6], &x);
            let r = rand_t(&[4, 6], 100 + k as u64);
            let dx = run(&UnaryGrad(f), &[&x, &r]).unwrap().remove(0);
            let forward = |ins: &[Tensor]| Unary(f).eval(&[&ins[0]]).unwrap().remove(0);
            check_fd(&forward, std::slice::from_ref(&x), 0, &r, &dx);
            check_f32_matches(&UnaryGrad(f), &[&x, &r]);
        }
    }

    #[test]
    fn unary_grad_known_values() {
        let grad = |f: UnaryOp, x: &[f64]| {
            let dy = vec![2.0; x.len()];
            f64s(&run(&UnaryGrad(f), &[&t64(&[x.len()], x), &t64(&[x.len()], &dy)]).unwrap()[0])
        };
        assert_eq!(grad(UnaryOp::Relu, &[-1.0, 0.0, 3.0]), [0.0, 0.0, 2.0]);
        assert_eq!(grad(UnaryOp::LeakyRelu { alpha: 0.5 }, &[-1.0, 0.0, 3.0]), [1.0, 1.0, 2.0]);
        assert_eq!(grad(UnaryOp::Abs, &[-1.0, 0.0, 3.0]), [-2.0, 0.0, 2.0]);
        assert_eq!(grad(UnaryOp::Sigmoid, &[0.0]), [0.5]);
        assert_eq!(grad(UnaryOp::Tanh, &[0.0]), [2.0]);
        assert_eq!(grad(UnaryOp::Sqrt, &[4.0]), [0.5]);
        assert_eq!(grad(UnaryOp::Reciprocal, &[2.0]), [-0.5]);
        assert_eq!(grad(UnaryOp::HardSwish, &[-4.0, 0.0, 3.0, 4.0]), [0.0, 1.0, 3.0, 2.0]);
        assert_eq!(grad(UnaryOp::HardSigmoid { alpha: 0.25, beta: 0.5 }, &[0.0, 3.0]), [0.5, 0.0]);
        assert_eq!(grad(UnaryOp::Gelu { tanh: false }, &[0.0]), [1.0]);
        assert_eq!(grad(UnaryOp::Gelu { tanh: true }, &[0.0]), [1.0]);
        assert_eq!(grad(UnaryOp::Elu { alpha: 0.5 }, &[0.0, 2.0]), [1.0, 2.0]);
        assert_eq!(grad(UnaryOp::Cos, &[0.0]), [0.0]);
    }

    #[test]
    fn unary_grad_errors() {
        let x = t64(&[2], &[1.0, 2.0]);
        for f in [UnaryOp::Floor, UnaryOp::Ceil, UnaryOp::Round, UnaryOp::Sign, UnaryOp::Not] {
            let e = UnaryGrad(f).eval(&[&x, &x]).unwrap_err().to_string();
            assert!(e.contains("no gradient"), "{e}");
        }
        let op = UnaryGrad(UnaryOp::Exp);
        assert!(op.eval(&[&x, &t64(&[3], &[0.0; 3])]).unwrap_err().to_string().contains("shape"));
        let xi = Tensor::from_vec(vec![2], vec![1i32, 2]).unwrap();
        assert!(op.eval(&[&xi, &xi]).unwrap_err().to_string().contains("float"));
        let x32 = x.cast(DType::F32).unwrap();
        assert!(op.eval(&[&x, &x32]).unwrap_err().to_string().contains("dtype"));
        assert!(op.eval(&[&x]).is_err());
        // Facts: a known dim wins over a symbolic one; known dims must agree.
        let fx = Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(4)]);
        let fd = Fact::new(DType::F32, vec![Dim::Known(8), Dim::Unknown]);
        assert_eq!(op.output_facts(&[&fx, &fd]).unwrap()[0].shape, vec![Dim::Known(8), Dim::Known(4)]);
        let fbad = Fact::known(DType::F32, &[8, 5]);
        assert!(op.output_facts(&[&fx, &fbad]).is_err());
    }

    // -----------------------------------------------------------------------------------------
    // SoftmaxGrad

    #[test]
    fn softmax_grad_matches_central_differences() {
        let x = rand_t(&[2, 3, 4], 7);
        let r = rand_t(&[2, 3, 4], 8);
        for axis in [0, 1, 2, -1] {
            for log in [false, true] {
                let forward = |ins: &[Tensor]| {
                    if log {
                        LogSoftmax { axis, legacy_2d: false }.eval(&[&ins[0]]).unwrap().remove(0)
                    } else {
                        Softmax { axis, legacy_2d: false }.eval(&[&ins[0]]).unwrap().remove(0)
                    }
                };
                let y = forward(std::slice::from_ref(&x));
                let op = SoftmaxGrad { axis, log };
                let dx = run(&op, &[&y, &r]).unwrap().remove(0);
                check_fd(&forward, std::slice::from_ref(&x), 0, &r, &dx);
                check_f32_matches(&op, &[&y, &r]);
            }
        }
    }

    #[test]
    fn softmax_grad_known_values_and_errors() {
        // softmax([0, 0]) = [1/2, 1/2]; dy = [1, 0]: dx = y * (dy - 1/2) = [1/4, -1/4]
        let y = t64(&[1, 2], &[0.5, 0.5]);
        let dy = t64(&[1, 2], &[1.0, 0.0]);
        assert_eq!(f64s(&run(&SoftmaxGrad { axis: 1, log: false }, &[&y, &dy]).unwrap()[0]), [0.25, -0.25]);
        // log-softmax: dx = dy - exp(y) * sum(dy) = [1 - 1/2, -1/2]
        let ly = t64(&[1, 2], &[0.5f64.ln(), 0.5f64.ln()]);
        let dx = f64s(&run(&SoftmaxGrad { axis: -1, log: true }, &[&ly, &dy]).unwrap()[0]);
        assert!((dx[0] - 0.5).abs() < 1e-15 && (dx[1] + 0.5).abs() < 1e-15);
        let op = SoftmaxGrad { axis: 2, log: false };
        assert!(op.eval(&[&y, &dy]).unwrap_err().to_string().contains("axis"));
        assert!(SoftmaxGrad { axis: 0, log: false }.eval(&[&y, &t64(&[2], &[0.0; 2])]).is_err());
        let s = Tensor::scalar(1.0f64);
        assert!(SoftmaxGrad { axis: 0, log: false }.eval(&[&s, &s]).unwrap_err().to_string().contains("rank"));
    }

    // -----------------------------------------------------------------------------------------
    // LayerNormGrad

    #[test]
    fn layer_norm_grad_matches_central_differences() {
        // (x shape, axis, scale/bias shape)
        let cases: [(&[usize], i64, &[usize]); 5] = [
            (&[3, 4], -1, &[4]),
            (&[2, 3, 4], 1, &[3, 4]),
            (&[2, 3, 4], 1, &[1, 4]),
            (&[2, 3, 4], 2, &[2, 3, 4]),
            (&[5], 0, &[1]),
        ];
        for (k, (xs, axis, ps)) in cases.into_iter().enumerate() {
            let seed = 10 * k as u64;
            let (x, scale, bias, r) =
                (rand_t(xs, seed), rand_t(ps, seed + 1), rand_t(ps, seed + 2), rand_t(xs, seed + 3));
            let eps = 1e-3;
            let forward =
                |ins: &[Tensor]| LayerNorm::new(axis, eps).eval(&[&ins[0], &ins[1], &ins[2]]).unwrap().remove(0);
            let op = LayerNormGrad { axis, epsilon: eps };
            let g = run(&op, &[&x, &scale, &r]).unwrap();
            let ins = [x.clone(), scale.clone(), bias.clone()];
            for (wrt, grad) in g.iter().enumerate() {
                check_fd(&forward, &ins, wrt, &r, grad);
            }
            check_f32_matches(&op, &[&x, &scale, &r]);
        }
    }

    #[test]
    fn layer_norm_grad_known_values_and_errors() {
        // x = [1, 3]: mean 2, var 1 (eps 0), xhat = [-1, 1]; scale [2, 2]; dy = [1, 0]:
        // g = [2, 0], mean(g) = 1, mean(g * xhat) = -1, dx = g - 1 + xhat = [0, 0];
        // dscale = dy * xhat = [-1, 0], dbias = dy = [1, 0].
        let x = t64(&[1, 2], &[1.0, 3.0]);
        let scale = t64(&[2], &[2.0, 2.0]);
        let dy = t64(&[1, 2], &[1.0, 0.0]);
        let g = run(&LayerNormGrad { axis: -1, epsilon: 0.0 }, &[&x, &scale, &dy]).unwrap();
        assert_eq!(f64s(&g[0]), [0.0, 0.0]);
        assert_eq!(f64s(&g[1]), [-1.0, 0.0]);
        assert_eq!(f64s(&g[2]), [1.0, 0.0]);
        let op = LayerNormGrad { axis: -1, epsilon: 1e-5 };
        assert!(op.eval(&[&x, &t64(&[3], &[1.0; 3]), &dy]).unwrap_err().to_string().contains("broadcast"));
        assert!(LayerNormGrad { axis: -1, epsilon: -1.0 }.eval(&[&x, &scale, &dy]).is_err());
        assert!(LayerNormGrad { axis: 2, epsilon: 0.0 }.eval(&[&x, &scale, &dy]).is_err());
        assert!(op.eval(&[&x, &scale.cast(DType::F32).unwrap(), &dy]).unwrap_err().to_string().contains("dtype"));
        let f = op
            .output_facts(&[
                &Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(4)]),
                &Fact::known(DType::F32, &[4]),
                &Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(4)]),
            ])
            .unwrap();
        assert_eq!(f[0].shape, vec![Dim::sym("n"), Dim::Known(4)]);
        assert_eq!((f[1].known_shape(), f[2].known_shape()), (Some(vec![4]), Some(vec![4])));
    }

    // -----------------------------------------------------------------------------------------
    // ConvGradInput, ConvGradWeight

    fn conv_cases() -> Vec<(ConvAttrs, Vec<usize>, Vec<usize>)> {
        let d = ConvAttrs::default;
        vec![
            (d(), vec![2, 3, 5, 5], vec![4, 3, 3, 3]),
            (
                ConvAttrs { strides: vec![2, 1], pads: vec![1, 0, 2, 1], dilations: vec![1, 2], ..d() },
                vec![1, 2, 7, 6],
                vec![3, 2, 3, 2],
            ),
            (ConvAttrs { group: 2, pads: vec![1, 1, 1, 1], ..d() }, vec![2, 4, 4, 4], vec![6, 2, 3, 3]),
            (ConvAttrs { group: 3, strides: vec![2, 2], ..d() }, vec![1, 3, 5, 5], vec![3, 1, 3, 3]),
            (ConvAttrs { strides: vec![3], pads: vec![2, 1], ..d() }, vec![2, 2, 9], vec![2, 2, 4]),
            (
                ConvAttrs { auto_pad: AutoPad::SameUpper, strides: vec![2, 2], ..d() },
                vec![1, 1, 5, 4],
                vec![2, 1, 2, 3],
            ),
            (ConvAttrs { auto_pad: AutoPad::SameLower, ..d() }, vec![1, 2, 4, 4], vec![1, 2, 2, 2]),
            (ConvAttrs { kernel_shape: Some(vec![1, 1]), ..d() }, vec![2, 3, 3, 3], vec![2, 3, 1, 1]),
            (
                ConvAttrs { strides: vec![1, 2, 1], pads: vec![1, 0, 0, 0, 1, 1], ..d() },
                vec![1, 2, 3, 4, 3],
                vec![2, 2, 2, 2, 2],
            ),
        ]
    }

    #[test]
    fn conv_grads_match_central_differences_and_adjoint() {
        for (k, (attrs, xs, ws)) in conv_cases().into_iter().enumerate() {
            let seed = 50 * k as u64;
            let (x, w) = (rand_t(&xs, seed), rand_t(&ws, seed + 1));
            let conv = Conv { attrs: attrs.clone() };
            let y = conv.eval(&[&x, &w]).unwrap().remove(0);
            let dy = rand_t(y.shape(), seed + 2);
            let dx = run(&ConvGradInput(attrs.clone()), &[&dy, &w, &x]).unwrap().remove(0);
            let dw = run(&ConvGradWeight(attrs.clone()), &[&x, &dy, &w]).unwrap().remove(0);
            // <Conv(x, w), dy> = <x, dx> = <w, dw>: the convolution is bilinear.
            let inner = dot(&f64s(&y), &f64s(&dy));
            for (what, other) in [("dx", dot(&f64s(&x), &f64s(&dx))), ("dw", dot(&f64s(&w), &f64s(&dw)))] {
                assert!((inner - other).abs() <= 1e-12 * inner.abs().max(1.0), "case {k} {what}: {inner} vs {other}");
            }
            let forward = |ins: &[Tensor]| conv.eval(&[&ins[0], &ins[1]]).unwrap().remove(0);
            let ins = [x.clone(), w.clone()];
            check_fd(&forward, &ins, 0, &dy, &dx);
            check_fd(&forward, &ins, 1, &dy, &dw);
            check_f32_matches(&ConvGradInput(attrs.clone()), &[&dy, &w, &x]);
            check_f32_matches(&ConvGradWeight(attrs), &[&x, &dy, &w]);
        }
    }

    #[test]
    fn conv_grads_known_values() {
        // 1-d, x = [1, 2, 3], w = [1, 10]: y = [21, 32]; dy = [1, 1]:
        // dx = [1, 11, 10], dw = [1 + 2, 2 + 3] = [3, 5].
        let x = t64(&[1, 1, 3], &[1.0, 2.0, 3.0]);
        let w = t64(&[1, 1, 2], &[1.0, 10.0]);
        let dy = t64(&[1, 1, 2], &[1.0, 1.0]);
        let dx = run(&ConvGradInput(ConvAttrs::default()), &[&dy, &w, &x]).unwrap().remove(0);
        assert_eq!(f64s(&dx), [1.0, 11.0, 10.0]);
        let dw = run(&ConvGradWeight(ConvAttrs::default()), &[&x, &dy, &w]).unwrap().remove(0);
        assert_eq!(f64s(&dw), [3.0, 5.0]);
        // stride 2, pad 1 begin: outputs read x[-1..1] and x[1..3]
        let attrs = ConvAttrs { strides: vec![2], pads: vec![1, 0], ..Default::default() };
        let dx = run(&ConvGradInput(attrs.clone()), &[&dy, &w, &x]).unwrap().remove(0);
        assert_eq!(f64s(&dx), [10.0, 1.0, 10.0]);
        let dw = run(&ConvGradWeight(attrs), &[&x, &dy, &w]).unwrap().remove(0);
        assert_eq!(f64s(&dw), [2.0, 4.0]);
    }

    #[test]
    fn conv_grad_errors() {
        let x = rand_t(&[1, 2, 4, 4], 1);
        let w = rand_t(&[3, 2, 3, 3], 2);
        let dy = rand_t(&[1, 3, 2, 2], 3);
        let gi = ConvGradInput(ConvAttrs::default());
        let gw = ConvGradWeight(ConvAttrs::default());
        let bad_dy = rand_t(&[1, 3, 3, 2], 4);
        assert!(gi.eval(&[&bad_dy, &w, &x]).unwrap_err().to_string().contains("dy shape"));
        assert!(gw.eval(&[&x, &bad_dy, &w]).unwrap_err().to_string().contains("dy shape"));
        let w_bad = rand_t(&[3, 1, 3, 3], 5);
        assert!(gi.eval(&[&dy, &w_bad, &x]).unwrap_err().to_string().contains("channels"));
        let dy32 = dy.cast(DType::F32).unwrap();
        assert!(gw.eval(&[&x, &dy32, &w]).unwrap_err().to_string().contains("dtype"));
        assert!(gi.eval(&[&dy, &w]).is_err());
        let facts = |s: &[usize]| Fact::known(DType::F64, s);
        assert!(gi.output_facts(&[&facts(&[1, 3, 2, 3]), &facts(&[3, 2, 3, 3]), &facts(&[1, 2, 4, 4])]).is_err());
        // Symbolic batch: dx keeps x's fact.
        let xs = Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(2), Dim::Known(4), Dim::Known(4)]);
        let dys = Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(3), Dim::Known(2), Dim::Known(2)]);
        let wf = Fact::known(DType::F32, &[3, 2, 3, 3]);
        assert_eq!(gi.output_facts(&[&dys, &wf, &xs]).unwrap()[0].shape, xs.shape);
        assert_eq!(gw.output_facts(&[&xs, &dys, &wf]).unwrap()[0].shape, wf.shape);
    }

    // -----------------------------------------------------------------------------------------
    // PoolGrad

    #[test]
    fn pool_grad_matches_central_differences() {
        let avg = |count_include_pad| PoolKind::Average { count_include_pad };
        let k = |kernel: &[usize]| PoolAttrs { kernel_shape: kernel.to_vec(), ..Default::default() };
        let cases: Vec<(PoolKind, PoolAttrs, Vec<usize>)> = vec![
            (PoolKind::Max, PoolAttrs { strides: vec![2, 2], ..k(&[2, 2]) }, vec![2, 2, 4, 4]),
            (PoolKind::Max, PoolAttrs { pads: vec![1, 1, 1, 1], ..k(&[3, 3]) }, vec![1, 2, 4, 5]),
            (avg(false), PoolAttrs { pads: vec![1, 0, 1, 1], strides: vec![2, 1], ..k(&[3, 2]) }, vec![1, 1, 5, 4]),
            (avg(true), PoolAttrs { pads: vec![1, 1, 1, 1], ..k(&[3, 3]) }, vec![2, 1, 3, 3]),
            (avg(true), PoolAttrs { strides: vec![2], ceil_mode: true, ..k(&[2]) }, vec![1, 2, 5]),
            (PoolKind::Max, PoolAttrs { dilations: vec![2], ..k(&[2]) }, vec![1, 1, 6]),
            (PoolKind::Max, PoolAttrs { auto_pad: AutoPad::SameUpper, ..k(&[2, 2, 2]) }, vec![1, 1, 3, 2, 3]),
            (
                avg(false),
                PoolAttrs { auto_pad: AutoPad::SameLower, strides: vec![2, 2], ..k(&[3, 3]) },
                vec![1, 1, 5, 5],
            ),
        ];
        for (i, (kind, attrs, xs)) in cases.into_iter().enumerate() {
            let pool = Pool { kind, attrs };
            let x = rand_t(&xs, 300 + i as u64);
            let y = pool.eval(&[&x]).unwrap().remove(0);
            let dy = rand_t(y.shape(), 400 + i as u64);
            let op = PoolGrad(pool.clone());
            let dx = run(&op, &[&x, &dy]).unwrap().remove(0);
            let forward = |ins: &[Tensor]| pool.eval(&[&ins[0]]).unwrap().remove(0);
            check_fd(&forward, std::slice::from_ref(&x), 0, &dy, &dx);
            check_f32_matches(&op, &[&x, &dy]);
        }
    }

    #[test]
    fn pool_grad_known_values_and_errors() {
        // Max over overlapping windows of [1, 3, 3, 2]: windows (1,3) (3,3) (3,2) pick indices 1, 1 (first max), 2.
        let x = t64(&[1, 1, 4], &[1.0, 3.0, 3.0, 2.0]);
        let dy = t64(&[1, 1, 3], &[1.0, 10.0, 100.0]);
        let attrs = PoolAttrs { kernel_shape: vec![2], ..Default::default() };
        let max = PoolGrad(Pool { kind: PoolKind::Max, attrs: attrs.clone() });
        assert_eq!(f64s(&run(&max, &[&x, &dy]).unwrap()[0]), [0.0, 11.0, 100.0, 0.0]);
        let avg = PoolGrad(Pool { kind: PoolKind::Average { count_include_pad: false }, attrs });
        assert_eq!(f64s(&run(&avg, &[&x, &dy]).unwrap()[0]), [0.5, 5.5, 55.0, 50.0]);
        // Pads 1 each side, kernel 2, stride 2 over [a, b]: windows (pad, a) and (b, pad);
        // with the padding counted each passes half its gradient, without it all of it.
        let x = t64(&[1, 1, 2], &[1.0, 2.0]);
        let dy = t64(&[1, 1, 2], &[4.0, 8.0]);
        let attrs = PoolAttrs { kernel_shape: vec![2], strides: vec![2], pads: vec![1, 1], ..Default::default() };
        let with = PoolGrad(Pool { kind: PoolKind::Average { count_include_pad: true }, attrs: attrs.clone() });
        assert_eq!(f64s(&run(&with, &[&x, &dy]).unwrap()[0]), [2.0, 4.0]);
        let without = PoolGrad(Pool { kind: PoolKind::Average { count_include_pad: false }, attrs });
        assert_eq!(f64s(&run(&without, &[&x, &dy]).unwrap()[0]), [4.0, 8.0]);
        assert!(max.eval(&[&x, &t64(&[1, 1, 2], &[0.0; 2])]).unwrap_err().to_string().contains("dy shape"));
        let xi = Tensor::from_vec(vec![1, 1, 4], vec![1i8, 2, 3, 4]).unwrap();
        assert!(max.eval(&[&xi, &xi]).unwrap_err().to_string().contains("float"));
        assert!(max
            .output_facts(&[&Fact::known(DType::F32, &[1, 1, 4]), &Fact::known(DType::F32, &[1, 1, 4])])
            .is_err());
    }

    // -----------------------------------------------------------------------------------------
    // GatherGrad

    #[test]
    fn gather_grad_matches_central_differences() {
        // (data shape, axis, indices shape, indices)
        type Case<'a> = (&'a [usize], i64, &'a [usize], &'a [i64]);
        let cases: [Case; 4] = [
            (&[5, 3], 0, &[4], &[0, 2, -1, 2]),
            (&[2, 4, 3], 1, &[2, 2], &[3, -4, 1, 3]),
            (&[2, 3], -1, &[], &[1]),
            (&[4], 0, &[3], &[-1, -1, 0]),
        ];
        for (k, (ds, axis, is, idx)) in cases.into_iter().enumerate() {
            let data = rand_t(ds, 500 + k as u64);
            let indices = Tensor::from_vec(is.to_vec(), idx.to_vec()).unwrap();
            let gather = Gather { axis };
            let y = gather.eval(&[&data, &indices]).unwrap().remove(0);
            let dy = rand_t(y.shape(), 600 + k as u64);
            let op = GatherGrad { axis };
            let dd = run(&op, &[&data, &indices, &dy]).unwrap().remove(0);
            let forward = |ins: &[Tensor]| gather.eval(&[&ins[0], &indices]).unwrap().remove(0);
            check_fd(&forward, std::slice::from_ref(&data), 0, &dy, &dd);
            let i32s = indices.cast(DType::I32).unwrap();
            check_f32_matches(&op, &[&data, &i32s, &dy]);
        }
    }

    #[test]
    fn gather_grad_known_values_and_errors() {
        // Embedding rows 0, 2, 0 (repeat adds up).
        let data = t64(&[3, 2], &[0.0; 6]);
        let idx = Tensor::from_vec(vec![3], vec![0i64, 2, -3]).unwrap();
        let dy = t64(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let op = GatherGrad { axis: 0 };
        assert_eq!(f64s(&run(&op, &[&data, &idx, &dy]).unwrap()[0]), [6.0, 8.0, 0.0, 0.0, 3.0, 4.0]);
        let bad = Tensor::from_vec(vec![3], vec![0i64, 3, 1]).unwrap();
        assert!(op.eval(&[&data, &bad, &dy]).unwrap_err().to_string().contains("out of range"));
        let fidx = t64(&[3], &[0.0; 3]);
        assert!(op.eval(&[&data, &fidx, &dy]).unwrap_err().to_string().contains("indices"));
        assert!(op.eval(&[&data, &idx, &t64(&[2, 2], &[0.0; 4])]).unwrap_err().to_string().contains("dy shape"));
        assert!(GatherGrad { axis: 2 }.eval(&[&data, &idx, &dy]).unwrap_err().to_string().contains("axis"));
        // Symbolic sequence length in the indices.
        let f = op
            .output_facts(&[
                &Fact::known(DType::F32, &[100, 8]),
                &Fact::new(DType::I64, vec![Dim::sym("b"), Dim::sym("s")]),
                &Fact::new(DType::F32, vec![Dim::sym("b"), Dim::sym("s"), Dim::Known(8)]),
            ])
            .unwrap();
        assert_eq!(f[0].known_shape(), Some(vec![100, 8]));
        // Constant indices are checked when the node is built.
        let konst = Fact::from_tensor(std::sync::Arc::new(bad));
        let facts = [Fact::known(DType::F64, &[3, 2]), konst, Fact::known(DType::F64, &[3, 2])];
        let err = op.output_facts(&[&facts[0], &facts[1], &facts[2]]).unwrap_err().to_string();
        assert!(err.contains("index 3 is out of range"), "{err}");
    }

    // -----------------------------------------------------------------------------------------
    // FakeQuant, FakeQuantGrad

    #[test]
    fn fake_quant_known_values() {
        // 2-bit unsigned, scale 1/2, zero point 1: x / s = [-2, 0.4, 0.6, 1.48, 4, 0.5, 1.5]
        // rounds (half to even) to [-2, 0, 1, 1, 4, 0, 2], + zp = [-1, 1, 2, 2, 5, 1, 3],
        // clamps to [0, 1, 2, 2, 3, 1, 3]; minus zp, times s: [-0.5, 0, 0.5, 0.5, 1, 0, 1].
        let x = t64(&[7], &[-1.0, 0.2, 0.3, 0.74, 2.0, 0.25, 0.75]);
        let (s, z) = (t64(&[], &[0.5]), t64(&[1], &[1.0]));
        let fq = FakeQuant { qmin: 0, qmax: 3, axis: None };
        assert_eq!(f64s(&run(&fq, &[&x, &s, &z]).unwrap()[0]), [-0.5, 0.0, 0.5, 0.5, 1.0, 0.0, 1.0]);
        // STE: gradient passes inside [qmin, qmax] (clamped ends -1 and 5 stop it).
        // LSQ: qmin - zp = -1, round(r) - r = -0.4, 0.4, -0.48, qmax - zp = 2, -0.5, 0.5.
        let dy = t64(&[7], &[1.0; 7]);
        let g = run(&FakeQuantGrad { qmin: 0, qmax: 3, axis: None }, &[&x, &s, &z, &dy]).unwrap();
        assert_eq!(f64s(&g[0]), [0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0]);
        assert_eq!(g[1].shape(), &[] as &[usize]);
        assert!((f64s(&g[1])[0] - (-1.0 - 0.4 + 0.4 - 0.48 + 2.0 - 0.5 + 0.5)).abs() < 1e-12);
    }

    #[test]
    fn fake_quant_per_channel() {
        // Channels along axis 1 of [2, 2, 2]: scales 1 and 0.1, zero points 0 and -2, int8-like [-4, 3].
        let x = t64(&[2, 2, 2], &[0.4, 5.0, 0.26, -1.0, -2.6, 1.2, 0.05, 0.6]);
        let s = t64(&[2], &[1.0, 0.1]);
        let z = t64(&[2], &[0.0, -2.0]);
        let fq = FakeQuant { qmin: -4, qmax: 3, axis: Some(1) };
        let y = f64s(&run(&fq, &[&x, &s, &z]).unwrap()[0]);
        // ch0: round([0.4, 5, -2.6, 1.2]) = [0, 5, -3, 1] -> clamp [0, 3, -3, 1]
        // ch1: round([2.6, -10, 0.5, 6]) - 2 = [1, -12, -2, 4] -> clamp [1, -4, -2, 3] -> +2, *0.1
        // (0.6 / 0.1 is 5.999..., which rounds to 6 all the same)
        let want = [0.0, 3.0, 0.3, -0.2, -3.0, 1.0, 0.0, 0.5];
        for (a, b) in y.iter().zip(want) {
            assert!((a - b).abs() < 1e-12, "{y:?} vs {want:?}");
        }
        let dy = t64(&[2, 2, 2], &[1.0; 8]);
        let g = run(&FakeQuantGrad { qmin: -4, qmax: 3, axis: Some(1) }, &[&x, &s, &z, &dy]).unwrap();
        assert_eq!(f64s(&g[0]), [1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0]);
        // ch0: (0 - 0.4) + (qmax - zp = 3) + (-3 + 2.6) + (1 - 1.2) = 2.0
        // ch1: (3 - 2.6) + (qmin - zp = -2) + (0 - 0.5) + (qmax - zp = 5) = 2.9
        let ds = f64s(&g[1]);
        assert!((ds[0] - 2.0).abs() < 1e-12 && (ds[1] - 2.9).abs() < 1e-12, "{ds:?}");
        check_f32_matches(&fq, &[&x, &s, &z]);
    }

    #[test]
    fn fake_quant_errors() {
        let x = t64(&[2, 3], &[0.0; 6]);
        let (s, z) = (t64(&[1], &[0.5]), t64(&[1], &[0.0]));
        let fq = |qmin, qmax, axis| FakeQuant { qmin, qmax, axis };
        assert!(fq(3, 0, None).eval(&[&x, &s, &z]).unwrap_err().to_string().contains("qmin"));
        let zero = t64(&[1], &[0.0]);
        assert!(fq(0, 3, None).eval(&[&x, &zero, &z]).unwrap_err().to_string().contains("positive"));
        let s2 = t64(&[2], &[0.5, 0.5]);
        assert!(fq(0, 3, None).eval(&[&x, &s2, &s2]).unwrap_err().to_string().contains("one element"));
        assert!(fq(0, 3, None).eval(&[&x, &s, &s2]).unwrap_err().to_string().contains("zero_point"));
        assert!(fq(0, 3, Some(1)).eval(&[&x, &s2, &s2]).unwrap_err().to_string().contains("channels"));
        assert!(fq(0, 3, Some(2)).eval(&[&x, &s2, &s2]).unwrap_err().to_string().contains("axis"));
        assert!(fq(0, 3, Some(0)).eval(&[&x, &s2, &z]).unwrap_err().to_string().contains("zero_point"));
        let zi = Tensor::from_vec(vec![1], vec![0i8]).unwrap();
        assert!(fq(0, 3, None).eval(&[&x, &s, &zi]).unwrap_err().to_string().contains("float"));
        let g = FakeQuantGrad { qmin: 0, qmax: 3, axis: None };
        assert!(g.eval(&[&x, &s, &z, &t64(&[3], &[0.0; 3])]).unwrap_err().to_string().contains("dy shape"));
        assert!(g.eval(&[&x, &s, &z]).is_err());
        let f = g
            .output_facts(&[
                &Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(3)]),
                &Fact::known(DType::F32, &[]),
                &Fact::known(DType::F32, &[]),
                &Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(3)]),
            ])
            .unwrap();
        assert_eq!(f[0].shape, vec![Dim::sym("n"), Dim::Known(3)]);
        assert_eq!(f[1].known_shape(), Some(vec![]));
    }

    // -----------------------------------------------------------------------------------------
    // Properties over random geometry: the gradients are the adjoints of the forward op,
    // <op(x), dy> = <x, dx> (and = <w, dw> for the convolution), which pins every index.

    use proptest::prelude::*;

    const AUTO_PADS: [AutoPad; 4] = [AutoPad::NotSet, AutoPad::SameUpper, AutoPad::SameLower, AutoPad::Valid];

    /// Spatial rank, then per spatial dim (input length, kernel, stride, dilation, pad begin, pad end).
    fn window_dims() -> impl Strategy<Value = Vec<(usize, usize, usize, usize, usize, usize)>> {
        proptest::collection::vec((1usize..9, 1usize..4, 1usize..4, 1usize..3, 0usize..3, 0usize..3), 1..3)
    }

    fn assert_adjoint(what: &str, inner: f64, other: f64) -> Result<(), TestCaseError> {
        prop_assert!((inner - other).abs() <= 1e-12 * inner.abs().max(1.0), "{}: {} vs {}", what, inner, other);
        Ok(())
    }

    proptest! {
        #[test]
        fn conv_grads_are_adjoints(
            dims in window_dims(),
            (n, cpg, mpg, group) in (1usize..3, 1usize..3, 1usize..3, 1usize..4),
            auto_pad in 0usize..4,
            seed in any::<u64>(),
        ) {
            let attrs = ConvAttrs {
                strides: dims.iter().map(|d| d.2).collect(),
                dilations: dims.iter().map(|d| d.3).collect(),
                pads: dims.iter().map(|d| d.4).chain(dims.iter().map(|d| d.5)).collect(),
                group,
                auto_pad: AUTO_PADS[auto_pad],
                ..Default::default()
            };
            let xs = [vec![n, cpg * group], dims.iter().map(|d| d.0).collect()].concat();
            let ws = [vec![mpg * group, cpg], dims.iter().map(|d| d.1).collect()].concat();
            let (x, w) = (rand_t(&xs, seed), rand_t(&ws, seed ^ 1));
            let conv = Conv { attrs: attrs.clone() };
            // Windows larger than the padded input are rejected by the forward op.
            let Ok(mut y) = conv.eval(&[&x, &w]) else { return Ok(()) };
            let y = y.remove(0);
            let dy = rand_t(y.shape(), seed ^ 2);
            let dx = run(&ConvGradInput(attrs.clone()), &[&dy, &w, &x]).unwrap().remove(0);
            let dw = run(&ConvGradWeight(attrs), &[&x, &dy, &w]).unwrap().remove(0);
            let inner = dot(&f64s(&y), &f64s(&dy));
            assert_adjoint("dx", inner, dot(&f64s(&x), &f64s(&dx)))?;
            assert_adjoint("dw", inner, dot(&f64s(&w), &f64s(&dw)))?;
        }

        #[test]
        fn pool_grads_are_adjoints(
            dims in window_dims(),
            kind in 0usize..3,
            (ceil_mode, auto_pad) in (any::<bool>(), 0usize..4),
            seed in any::<u64>(),
        ) {
            let kind = [PoolKind::Max, PoolKind::Average { count_include_pad: false }, PoolKind::Average {
                count_include_pad: true,
            }][kind];
            let attrs = PoolAttrs {
                kernel_shape: dims.iter().map(|d| d.1).collect(),
                strides: dims.iter().map(|d| d.2).collect(),
                dilations: dims.iter().map(|d| d.3).collect(),
                pads: dims.iter().map(|d| d.4).chain(dims.iter().map(|d| d.5)).collect(),
                ceil_mode,
                auto_pad: AUTO_PADS[auto_pad],
            };
            let pool = Pool { kind, attrs };
            let xs = [vec![2, 2], dims.iter().map(|d| d.0).collect()].concat();
            let x = rand_t(&xs, seed);
            let Ok(mut y) = pool.eval(&[&x]) else { return Ok(()) };
            let y = y.remove(0);
            // A window wholly in the padding has no value (max -inf, average 0/0) and no gradient.
            prop_assume!(f64s(&y).iter().all(|v| v.is_finite()));
            let dy = rand_t(y.shape(), seed ^ 2);
            let dx = run(&PoolGrad(pool), &[&x, &dy]).unwrap().remove(0);
            // Max pooling is linear in x once the argmax is fixed, so the identity holds for it too.
            assert_adjoint("dx", dot(&f64s(&y), &f64s(&dy)), dot(&f64s(&x), &f64s(&dx)))?;
        }
    }
}

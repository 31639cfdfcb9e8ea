//! Convolutions, and the window geometry (output sizes, pads from `auto_pad`) that the
//! pooling and quantized convolution ops share.

use super::util::{expect_inputs, show_dims, unknown_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{checked_numel, DType, Dim, Tensor};
use std::ops::Range;

/// ONNX `auto_pad`. `SameUpper`/`SameLower` pad so `out = ceil(in / stride)`, putting the odd
/// extra pixel at the end (upper) or the beginning (lower).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AutoPad {
    #[default]
    NotSet,
    SameUpper,
    SameLower,
    Valid,
}

/// Attributes shared by every convolution op. Empty vectors mean the ONNX defaults
/// (strides and dilations 1, pads 0); `kernel_shape` defaults to the weight's spatial dims.
/// `group` 0 is read as the ONNX default 1. With `auto_pad` set, `pads` is ignored.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConvAttrs {
    pub kernel_shape: Option<Vec<usize>>,
    pub strides: Vec<usize>,
    /// Begin pads for every spatial dim, then end pads.
    pub pads: Vec<usize>,
    pub dilations: Vec<usize>,
    pub group: usize,
    pub auto_pad: AutoPad,
}

impl ConvAttrs {
    pub(crate) fn group(&self) -> usize {
        self.group.max(1)
    }
}

/// `Conv(x, w[, b])` for 1-d, 2-d and 3-d inputs in NCHW layout; grouped and depthwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conv {
    pub attrs: ConvAttrs,
}

/// `ConvTranspose(x, w[, b])`; weights are `[C_in, C_out / group, k...]`.
/// `output_shape` holds the spatial dims (a leading `N, C` pair is accepted and skipped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvTranspose {
    pub attrs: ConvAttrs,
    pub output_padding: Vec<usize>,
    pub output_shape: Option<Vec<usize>>,
}

/// Geometry attributes above this are rejected so window arithmetic stays far from overflow.
const MAX_ATTR: usize = 1 << 30;

/// Window attributes of a convolution or pool, ONNX defaults applied and values checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Window {
    pub kernel: Vec<usize>,
    pub strides: Vec<usize>,
    pub dilations: Vec<usize>,
    /// Begin pads then end pads, one per spatial dim each.
    pub pads: Vec<usize>,
    pub auto_pad: AutoPad,
    pub ceil_mode: bool,
}

/// Concrete geometry of one evaluation, widened to 3 spatial dims by leading dims of
/// length 1 so every kernel loops over (depth, height, width).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub input: [usize; 3],
    pub output: [usize; 3],
    pub kernel: [usize; 3],
    pub strides: [usize; 3],
    pub dilations: [usize; 3],
    /// Signed: a transposed convolution asked for a larger output than it produces pads
    /// negatively at the end.
    pub pad_begin: [i64; 3],
    pub pad_end: [i64; 3],
}

impl Geometry {
    pub fn input_len(&self) -> usize {
        self.input.iter().product()
    }
    pub fn output_len(&self) -> usize {
        self.output.iter().product()
    }
    pub fn kernel_len(&self) -> usize {
        self.kernel.iter().product()
    }
}

fn defaulted(op: &'static str, what: &str, v: &[usize], n: usize, default: usize, min: usize) -> IrResult<Vec<usize>> {
    let v = if v.is_empty() { vec![default; n] } else { v.to_vec() };
    if v.len() != n {
        op_bail!(op, "{what} has {} values, expected {n}", v.len());
    }
    if let Some(bad) = v.iter().find(|&&x| x < min || x > MAX_ATTR) {
        op_bail!(op, "{what} value {bad} is out of range ({min} to {MAX_ATTR})");
    }
    Ok(v)
}

fn to_usize(op: &'static str, v: i128) -> IrResult<usize> {
    usize::try_from(v).map_err(|_| crate::IrError::op(op, format!("window geometry gives an invalid size {v}")))
}

fn to_i64(op: &'static str, v: i128) -> IrResult<i64> {
    i64::try_from(v).map_err(|_| crate::IrError::op(op, format!("window geometry gives an invalid pad {v}")))
}

/// `ceil(a / b)` for `b > 0` and any sign of `a`.
fn ceil_div(a: i128, b: i128) -> i128 {
    (a + b - 1).div_euclid(b)
}

/// Splits a total pad between begin and end; the odd pixel goes to the end when `upper`.
/// A negative total (output larger than the input covers) extends the end only.
fn split_pad(total: i128, upper: bool) -> (i128, i128) {
    if total <= 0 {
        (0, total)
    } else if upper {
        (total / 2, total - total / 2)
    } else {
        (total - total / 2, total / 2)
    }
}

impl Window {
    /// Checks and completes window attributes; `kernel` fixes the spatial rank (1 to 3).
    pub fn new(
        op: &'static str,
        kernel: &[usize],
        strides: &[usize],
        pads: &[usize],
        dilations: &[usize],
        auto_pad: AutoPad,
        ceil_mode: bool,
    ) -> IrResult<Window> {
        let n = kernel.len();
        if !(1..=3).contains(&n) {
            op_bail!(op, "supports 1 to 3 spatial dims, got {n}");
        }
        Ok(Window {
            kernel: defaulted(op, "kernel_shape", kernel, n, 1, 1)?,
            strides: defaulted(op, "strides", strides, n, 1, 1)?,
            dilations: defaulted(op, "dilations", dilations, n, 1, 1)?,
            pads: defaulted(op, "pads", pads, 2 * n, 0, 0)?,
            auto_pad,
            ceil_mode,
        })
    }

    fn rank(&self) -> usize {
        self.kernel.len()
    }

    /// Span of the dilated kernel along dim `i`.
    fn extent(&self, i: usize) -> i128 {
        (self.kernel[i] as i128 - 1) * self.dilations[i] as i128 + 1
    }

    /// Output length and (begin, end) pads of spatial dim `i` for an input of length `len`.
    pub fn resolve(&self, op: &'static str, i: usize, len: usize) -> IrResult<(usize, i64, i64)> {
        let (len, s, ext) = (len as i128, self.strides[i] as i128, self.extent(i));
        let (out, pb, pe) = match self.auto_pad {
            AutoPad::NotSet | AutoPad::Valid => {
                let (pb, pe) = match self.auto_pad {
                    AutoPad::Valid => (0, 0),
                    _ => (self.pads[i] as i128, self.pads[i + self.rank()] as i128),
                };
                let span = len + pb + pe - ext;
                if span < 0 {
                    op_bail!(
                        op,
                        "kernel extent {ext} exceeds the padded input length {} in spatial dim {i}",
                        len + pb + pe
                    );
                }
                let out = if self.ceil_mode {
                    // A last window starting inside the end padding is dropped (as PyTorch does).
                    let out = ceil_div(span, s) + 1;
                    if (out - 1) * s >= len + pb {
                        out - 1
                    } else {
                        out
                    }
                } else {
                    span / s + 1
                };
                (out, pb, pe)
            }
            AutoPad::SameUpper | AutoPad::SameLower => {
                let out = ceil_div(len, s);
                let total = ((out - 1) * s + ext - len).max(0);
                let (pb, pe) = split_pad(total, self.auto_pad == AutoPad::SameUpper);
                (out, pb, pe)
            }
        };
        Ok((to_usize(op, out)?, to_i64(op, pb)?, to_i64(op, pe)?))
    }

    /// Output length and (begin, end) pads of spatial dim `i` of a transposed convolution
    /// (ONNX ConvTranspose formulas; `output_len` is the requested `output_shape` entry).
    pub fn resolve_transposed(
        &self,
        op: &'static str,
        i: usize,
        len: usize,
        output_padding: usize,
        output_len: Option<usize>,
    ) -> IrResult<(usize, i64, i64)> {
        let (len, s, ext) = (len as i128, self.strides[i] as i128, self.extent(i));
        let full = s * (len - 1) + output_padding as i128 + ext;
        let upper = self.auto_pad == AutoPad::SameUpper;
        let (out, pb) = match (output_len, self.auto_pad) {
            (Some(o), _) => (o as i128, split_pad(full - o as i128, upper).0),
            (None, AutoPad::SameUpper | AutoPad::SameLower) => (len * s, split_pad(full - len * s, upper).0),
            (None, AutoPad::Valid) => (full, 0),
            (None, AutoPad::NotSet) => {
                let (pb, pe) = (self.pads[i] as i128, self.pads[i + self.rank()] as i128);
                if full - pb - pe < 0 {
                    op_bail!(op, "pads {pb}+{pe} exceed the full output length {full} in spatial dim {i}");
                }
                (full - pb - pe, pb)
            }
        };
        Ok((to_usize(op, out)?, to_i64(op, pb)?, to_i64(op, full - out - pb)?))
    }

    /// Whether dim `i` keeps its length whatever it is (so a symbolic dim carries over).
    fn preserves_len(&self, i: usize) -> bool {
        let ext = self.extent(i);
        self.strides[i] == 1
            && match self.auto_pad {
                AutoPad::NotSet => (self.pads[i] + self.pads[i + self.rank()]) as i128 == ext - 1,
                AutoPad::Valid => ext == 1,
                AutoPad::SameUpper | AutoPad::SameLower => true,
            }
    }

    /// Output spatial dims for (possibly symbolic) input spatial dims.
    pub fn output_dims(&self, op: &'static str, input: &[Dim]) -> IrResult<Vec<Dim>> {
        self.check_rank(op, input.len())?;
        input
            .iter()
            .enumerate()
            .map(|(i, d)| match d {
                Dim::Known(len) => Ok(Dim::Known(self.resolve(op, i, *len)?.0)),
                d if self.preserves_len(i) => Ok(d.clone()),
                _ => Ok(Dim::Unknown),
            })
            .collect()
    }

    /// Output spatial dims of a transposed convolution.
    pub fn output_dims_transposed(
        &self,
        op: &'static str,
        input: &[Dim],
        output_padding: &[usize],
        output_shape: Option<&[usize]>,
    ) -> IrResult<Vec<Dim>> {
        self.check_rank(op, input.len())?;
        input
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let want = output_shape.map(|o| o[i]);
                match d {
                    Dim::Known(len) => Ok(Dim::Known(self.resolve_transposed(op, i, *len, output_padding[i], want)?.0)),
                    _ if want.is_some() => Ok(want.map_or(Dim::Unknown, Dim::Known)),
                    // SAME asks for `in * stride`.
                    d if self.strides[i] == 1 && matches!(self.auto_pad, AutoPad::SameUpper | AutoPad::SameLower) => {
                        Ok(d.clone())
                    }
                    _ => Ok(Dim::Unknown),
                }
            })
            .collect()
    }

    fn check_rank(&self, op: &'static str, n: usize) -> IrResult<()> {
        if n != self.rank() {
            op_bail!(op, "the window has {} spatial dims but the input has {n}", self.rank());
        }
        Ok(())
    }

    fn widen(&self, input: &[usize], dims: &[(usize, i64, i64)]) -> Geometry {
        let off = 3 - self.rank();
        let mut g = Geometry {
            input: [1; 3],
            output: [1; 3],
            kernel: [1; 3],
            strides: [1; 3],
            dilations: [1; 3],
            pad_begin: [0; 3],
            pad_end: [0; 3],
        };
        for (i, &(out, pb, pe)) in dims.iter().enumerate() {
            g.input[off + i] = input[i];
            g.output[off + i] = out;
            g.kernel[off + i] = self.kernel[i];
            g.strides[off + i] = self.strides[i];
            g.dilations[off + i] = self.dilations[i];
            g.pad_begin[off + i] = pb;
            g.pad_end[off + i] = pe;
        }
        g
    }

    /// Concrete geometry for input spatial dims `input`.
    pub fn geometry(&self, op: &'static str, input: &[usize]) -> IrResult<Geometry> {
        self.check_rank(op, input.len())?;
        let dims: Vec<_> = (0..input.len()).map(|i| self.resolve(op, i, input[i])).collect::<IrResult<_>>()?;
        Ok(self.widen(input, &dims))
    }

    /// Concrete geometry of a transposed convolution (`input` holds the input spatial dims).
    pub fn geometry_transposed(
        &self,
        op: &'static str,
        input: &[usize],
        output_padding: &[usize],
        output_shape: Option<&[usize]>,
    ) -> IrResult<Geometry> {
        self.check_rank(op, input.len())?;
        let dims: Vec<_> = (0..input.len())
            .map(|i| self.resolve_transposed(op, i, input[i], output_padding[i], output_shape.map(|o| o[i])))
            .collect::<IrResult<_>>()?;
        Ok(self.widen(input, &dims))
    }
}

/// Indices `o` in `0..n` whose source `o * step + offset` lies in `0..limit`.
pub(crate) fn valid_range(n: usize, limit: usize, step: usize, offset: i64) -> Range<usize> {
    let (s, off, lim) = (step as i64, offset, limit as i64);
    let lo = if off >= 0 { 0 } else { (s - 1 - off) / s };
    let hi = if lim <= off { 0 } else { (lim - off + s - 1) / s };
    let hi = hi.min(n as i64).max(0) as usize;
    (lo as usize).min(hi)..hi
}

/// The kernel's spatial dims: `kernel_shape` when set (checked against the weights), else
/// the weights' own; `None` when neither is known.
fn kernel_dims(op: &'static str, attrs: &ConvAttrs, w_spatial: &[Dim]) -> IrResult<Option<Vec<usize>>> {
    match &attrs.kernel_shape {
        Some(k) => {
            if k.len() != w_spatial.len() {
                op_bail!(op, "kernel_shape {k:?} does not match the weights' {} spatial dims", w_spatial.len());
            }
            for (a, d) in k.iter().zip(w_spatial) {
                if matches!(d, Dim::Known(n) if n != a) {
                    op_bail!(
                        op,
                        "kernel_shape {k:?} disagrees with the weights' spatial dims {}",
                        show_dims(w_spatial)
                    );
                }
            }
            Ok(Some(k.clone()))
        }
        None => Ok(w_spatial.iter().map(Dim::as_known).collect()),
    }
}

/// The window of a convolution, and whether its kernel is known (else a 1s placeholder
/// that still validates the other attributes).
pub(crate) fn conv_window(op: &'static str, attrs: &ConvAttrs, w_spatial: &[Dim]) -> IrResult<(Window, bool)> {
    let kernel = kernel_dims(op, attrs, w_spatial)?;
    let known = kernel.is_some();
    let kernel = kernel.unwrap_or_else(|| vec![1; w_spatial.len()]);
    let w = Window::new(op, &kernel, &attrs.strides, &attrs.pads, &attrs.dilations, attrs.auto_pad, false)?;
    Ok((w, known))
}

/// Checks the ranks and channel counts of a convolution's input and weights. `transposed`
/// reads the weights as `[C, M / group, k...]` instead of `[M, C / group, k...]`.
pub(crate) fn check_conv_operands(
    op: &'static str,
    group: usize,
    x: &[Dim],
    w: &[Dim],
    transposed: bool,
) -> IrResult<()> {
    let r = x.len();
    if !(3..=5).contains(&r) {
        op_bail!(op, "expects an input of rank 3 to 5 (N, C, 1 to 3 spatial dims), got shape {}", show_dims(x));
    }
    if w.len() != r {
        op_bail!(op, "weights of shape {} must have the input's rank {r}", show_dims(w));
    }
    let (x_c, w_c, w_m) = if transposed { (&x[1], &w[0], None) } else { (&x[1], &w[1], Some(&w[0])) };
    match (x_c, w_c) {
        (Dim::Known(c), Dim::Known(wc)) if transposed && c != wc => {
            op_bail!(op, "input has {c} channels but the weights {} expect {wc}", show_dims(w))
        }
        (Dim::Known(c), Dim::Known(wc)) if !transposed && *c != wc * group => {
            op_bail!(
                op,
                "input has {c} channels but the weights {} with group {group} expect {}",
                show_dims(w),
                wc * group
            )
        }
        _ => {}
    }
    if let Some(Dim::Known(m)) = w_m {
        if m % group != 0 {
            op_bail!(op, "{m} output channels are not divisible by group {group}");
        }
    }
    if let (true, Dim::Known(c)) = (transposed, x_c) {
        if c % group != 0 {
            op_bail!(op, "{c} input channels are not divisible by group {group}");
        }
    }
    Ok(())
}

/// Output shape `[N, M, spatial...]` of a convolution of `x` by weights `w`, after checking
/// ranks, channel counts and attributes. Shared by Conv, ConvInteger and QLinearConv.
pub(crate) fn conv_output_dims(op: &'static str, attrs: &ConvAttrs, x: &[Dim], w: &[Dim]) -> IrResult<Vec<Dim>> {
    check_conv_operands(op, attrs.group(), x, w, false)?;
    let (window, known) = conv_window(op, attrs, &w[2..])?;
    let spatial = if known { window.output_dims(op, &x[2..])? } else { unknown_dims(x.len() - 2) };
    Ok([vec![x[0].clone(), w[0].clone()], spatial].concat())
}

pub(crate) fn known_dims(s: &[usize]) -> Vec<Dim> {
    s.iter().map(|&d| Dim::Known(d)).collect()
}

/// Checks a bias fact: 1-d of `m` values (when known) and of dtype `dtype`.
pub(crate) fn check_bias(op: &'static str, b: &Fact, m: &Dim, dtype: DType) -> IrResult<()> {
    if b.dtype != dtype {
        op_bail!(op, "bias must be {dtype}, got {}", b.dtype);
    }
    if b.rank() != 1 {
        op_bail!(op, "bias must be 1-d, got shape {}", show_dims(&b.shape));
    }
    if let (Dim::Known(n), Dim::Known(m)) = (&b.shape[0], m) {
        if n != m {
            op_bail!(op, "bias has {n} values for {m} output channels");
        }
    }
    Ok(())
}

/// Adds `a * x[o * step + offset]` to `y[o]` for `o` in `r`.
fn gather_axpy(a: f64, x: &[f64], step: usize, offset: i64, y: &mut [f64], r: Range<usize>) {
    let start = (r.start as i64 * step as i64 + offset) as usize;
    if step == 1 {
        for (yv, xv) in y[r.clone()].iter_mut().zip(&x[start..]) {
            *yv += a * xv;
        }
    } else {
        for (yv, xv) in y[r].iter_mut().zip(x[start..].iter().step_by(step)) {
            *yv += a * xv;
        }
    }
}

/// Adds `a * x[i]` to `y[i * step + offset]` for `i` in `r`.
fn scatter_axpy(a: f64, x: &[f64], step: usize, offset: i64, y: &mut [f64], r: Range<usize>) {
    let start = (r.start as i64 * step as i64 + offset) as usize;
    if step == 1 {
        for (yv, xv) in y[start..].iter_mut().zip(&x[r]) {
            *yv += a * xv;
        }
    } else {
        for (yv, xv) in y[start..].iter_mut().step_by(step).zip(&x[r]) {
            *yv += a * xv;
        }
    }
}

/// `y += x (*) w` for one input plane, one kernel and one output plane. Loops run over
/// kernel taps outside and output rows inside so the innermost loop walks a row.
fn conv_plane(g: &Geometry, x: &[f64], w: &[f64], y: &mut [f64]) {
    // Pointwise convolutions (most of a mobile network's work) are one plane-wide axpy.
    if g.kernel == [1; 3] && g.strides == [1; 3] && g.pad_begin == [0; 3] && g.input == g.output {
        for (yv, xv) in y.iter_mut().zip(x) {
            *yv += w[0] * xv;
        }
        return;
    }
    let [_, ih, iw] = g.input;
    let [od, oh, ow] = g.output;
    let [kd, kh, kw] = g.kernel;
    for a in 0..kd {
        let off_d = (a * g.dilations[0]) as i64 - g.pad_begin[0];
        let rd = valid_range(od, g.input[0], g.strides[0], off_d);
        for b in 0..kh {
            let off_h = (b * g.dilations[1]) as i64 - g.pad_begin[1];
            let rh = valid_range(oh, ih, g.strides[1], off_h);
            for c in 0..kw {
                let wv = w[(a * kh + b) * kw + c];
                let off_w = (c * g.dilations[2]) as i64 - g.pad_begin[2];
                let rw = valid_range(ow, iw, g.strides[2], off_w);
                if rw.is_empty() {
                    continue;
                }
                for o_d in rd.clone() {
                    let i_d = (o_d as i64 * g.strides[0] as i64 + off_d) as usize;
                    for o_h in rh.clone() {
                        let i_h = (o_h as i64 * g.strides[1] as i64 + off_h) as usize;
                        let xrow = &x[(i_d * ih + i_h) * iw..][..iw];
                        let yrow = &mut y[(o_d * oh + o_h) * ow..][..ow];
                        gather_axpy(wv, xrow, g.strides[2], off_w, yrow, rw.clone());
                    }
                }
            }
        }
    }
}

/// `y += x (*)^T w` for one plane of a transposed convolution: input pixel `i` and tap `k`
/// feed output pixel `i * stride + k * dilation - pad_begin`.
pub(crate) fn conv_transposed_plane(g: &Geometry, x: &[f64], w: &[f64], y: &mut [f64]) {
    let [id, ih, iw] = g.input;
    let [_, oh, ow] = g.output;
    let [kd, kh, kw] = g.kernel;
    for a in 0..kd {
        let off_d = (a * g.dilations[0]) as i64 - g.pad_begin[0];
        let rd = valid_range(id, g.output[0], g.strides[0], off_d);
        for b in 0..kh {
            let off_h = (b * g.dilations[1]) as i64 - g.pad_begin[1];
            let rh = valid_range(ih, oh, g.strides[1], off_h);
            for c in 0..kw {
                let wv = w[(a * kh + b) * kw + c];
                let off_w = (c * g.dilations[2]) as i64 - g.pad_begin[2];
                let rw = valid_range(iw, ow, g.strides[2], off_w);
                if rw.is_empty() {
                    continue;
                }
                for i_d in rd.clone() {
                    let o_d = (i_d as i64 * g.strides[0] as i64 + off_d) as usize;
                    for i_h in rh.clone() {
                        let o_h = (i_h as i64 * g.strides[1] as i64 + off_h) as usize;
                        let xrow = &x[(i_d * ih + i_h) * iw..][..iw];
                        let yrow = &mut y[(o_d * oh + o_h) * ow..][..ow];
                        scatter_axpy(wv, xrow, g.strides[2], off_w, yrow, rw.clone());
                    }
                }
            }
        }
    }
}

fn check_len(op: &'static str, what: &str, v: &[f64], shape: &[usize]) -> IrResult<()> {
    if v.len() != shape.iter().product::<usize>() {
        op_bail!(op, "{what} holds {} values for shape {shape:?}", v.len());
    }
    Ok(())
}

/// Direct convolution on f64 values: `x` is `[N, C, spatial...]`, `w` is
/// `[M, C / group, kernel...]`, `bias` has `M` values. Returns the output shape and values.
/// The float, integer and quantized convolutions all run through this one loop.
pub(crate) fn conv_f64(
    op: &'static str,
    attrs: &ConvAttrs,
    x: &[f64],
    x_shape: &[usize],
    w: &[f64],
    w_shape: &[usize],
    bias: Option<&[f64]>,
) -> IrResult<(Vec<usize>, Vec<f64>)> {
    check_len(op, "input", x, x_shape)?;
    check_len(op, "weights", w, w_shape)?;
    let (xd, wd) = (known_dims(x_shape), known_dims(w_shape));
    check_conv_operands(op, attrs.group(), &xd, &wd, false)?;
    let (window, _) = conv_window(op, attrs, &wd[2..])?;
    let g = window.geometry(op, &x_shape[2..])?;
    let (n, c, m, group) = (x_shape[0], x_shape[1], w_shape[0], attrs.group());
    if let Some(b) = bias {
        if b.len() != m {
            op_bail!(op, "bias has {} values for {m} output channels", b.len());
        }
    }
    let out_shape = [&[n, m][..], &g.output[3 - window.rank()..]].concat();
    let total = checked_numel(&out_shape, DType::F64)?;
    let mut y = vec![0f64; total];
    let (in_len, out_len, k_len) = (g.input_len(), g.output_len(), g.kernel_len());
    if total == 0 {
        return Ok((out_shape, y));
    }
    let (cpg, mpg) = (c / group, m / group);
    for (ni, yn) in y.chunks_exact_mut(m * out_len).enumerate() {
        for (mi, yp) in yn.chunks_exact_mut(out_len).enumerate() {
            yp.fill(bias.map_or(0.0, |b| b[mi]));
            let gi = mi / mpg;
            for ci in 0..cpg {
                let xp = &x[(ni * c + gi * cpg + ci) * in_len..][..in_len];
                let wk = &w[(mi * cpg + ci) * k_len..][..k_len];
                conv_plane(&g, xp, wk, yp);
            }
        }
    }
    Ok((out_shape, y))
}

fn check_float(op: &'static str, what: &str, dt: DType) -> IrResult<()> {
    if !dt.is_float() {
        op_bail!(op, "{what} must be a float tensor, got {dt}");
    }
    Ok(())
}

/// Dtype checks of a float convolution's `x, w[, b]`.
pub(crate) fn check_float_operands(op: &'static str, dts: &[DType]) -> IrResult<()> {
    check_float(op, "input", dts[0])?;
    if dts[1] != dts[0] {
        op_bail!(op, "weights must be {} like the input, got {}", dts[0], dts[1]);
    }
    Ok(())
}

impl OpDef for Conv {
    fn name(&self) -> &'static str {
        "Conv"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 3)?;
        let (x, w) = (inputs[0], inputs[1]);
        check_float_operands(op, &[x.dtype, w.dtype])?;
        let shape = conv_output_dims(op, &self.attrs, &x.shape, &w.shape)?;
        if let Some(b) = inputs.get(2) {
            check_bias(op, b, &shape[1], x.dtype)?;
        }
        Ok(vec![Fact::new(x.dtype, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 3)?;
        let (x, w) = (inputs[0], inputs[1]);
        check_float_operands(op, &[x.dtype(), w.dtype()])?;
        let bias = match inputs.get(2) {
            Some(b) if b.dtype() != x.dtype() || b.rank() != 1 => {
                op_bail!(op, "bias must be a 1-d {} tensor, got {} of shape {:?}", x.dtype(), b.dtype(), b.shape())
            }
            Some(b) => Some(b.to_f64_vec()),
            None => None,
        };
        let (shape, y) =
            conv_f64(op, &self.attrs, &x.to_f64_vec(), x.shape(), &w.to_f64_vec(), w.shape(), bias.as_deref())?;
        Ok(vec![Tensor::from_f64s(x.dtype(), shape, &y)?])
    }
}

impl ConvTranspose {
    /// `output_padding` completed with zeros, and the spatial part of `output_shape`.
    fn extras(&self, op: &'static str, n: usize) -> IrResult<(Vec<usize>, Option<Vec<usize>>)> {
        let pad = defaulted(op, "output_padding", &self.output_padding, n, 0, 0)?;
        let shape = match &self.output_shape {
            None => None,
            Some(s) if s.len() == n => Some(s.clone()),
            Some(s) if s.len() == n + 2 => Some(s[2..].to_vec()),
            Some(s) => op_bail!(op, "output_shape {s:?} does not fit {n} spatial dims"),
        };
        if let Some(bad) = shape.iter().flatten().find(|&&d| d > MAX_ATTR) {
            op_bail!(op, "output_shape value {bad} is too large");
        }
        Ok((pad, shape))
    }
}

impl OpDef for ConvTranspose {
    fn name(&self) -> &'static str {
        "ConvTranspose"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 3)?;
        let (x, w) = (inputs[0], inputs[1]);
        check_float_operands(op, &[x.dtype, w.dtype])?;
        let group = self.attrs.group();
        check_conv_operands(op, group, &x.shape, &w.shape, true)?;
        let (window, known) = conv_window(op, &self.attrs, &w.shape[2..])?;
        let (out_pad, out_shape) = self.extras(op, x.rank() - 2)?;
        let spatial = if known {
            window.output_dims_transposed(op, &x.shape[2..], &out_pad, out_shape.as_deref())?
        } else {
            match &out_shape {
                Some(s) => known_dims(s),
                None => unknown_dims(x.rank() - 2),
            }
        };
        let m = match &w.shape[1] {
            Dim::Known(k) => Dim::Known(k * group),
            d if group == 1 => d.clone(),
            _ => Dim::Unknown,
        };
        if let Some(b) = inputs.get(2) {
            check_bias(op, b, &m, x.dtype)?;
        }
        Ok(vec![Fact::new(x.dtype, [vec![x.shape[0].clone(), m], spatial].concat())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 3)?;
        let (x, w) = (inputs[0], inputs[1]);
        check_float_operands(op, &[x.dtype(), w.dtype()])?;
        let group = self.attrs.group();
        let (xs, ws) = (x.shape(), w.shape());
        let (xd, wd) = (known_dims(xs), known_dims(ws));
        check_conv_operands(op, group, &xd, &wd, true)?;
        let (window, _) = conv_window(op, &self.attrs, &wd[2..])?;
        let (out_pad, out_shape) = self.extras(op, xs.len() - 2)?;
        let g = window.geometry_transposed(op, &xs[2..], &out_pad, out_shape.as_deref())?;
        let (n, c, mpg) = (xs[0], xs[1], ws[1]);
        let m = mpg * group;
        let bias = match inputs.get(2) {
            Some(b) if b.dtype() != x.dtype() || b.shape() != [m] => {
                op_bail!(
                    op,
                    "bias must be a 1-d {} tensor of {m} values, got {} of shape {:?}",
                    x.dtype(),
                    b.dtype(),
                    b.shape()
                )
            }
            Some(b) => Some(b.to_f64_vec()),
            None => None,
        };
        let out_shape = [&[n, m][..], &g.output[3 - window.rank()..]].concat();
        let total = checked_numel(&out_shape, x.dtype())?;
        let mut y = vec![0f64; total];
        if total > 0 {
            let (xv, wv) = (x.to_f64_vec(), w.to_f64_vec());
            let (in_len, out_len, k_len, cpg) = (g.input_len(), g.output_len(), g.kernel_len(), c / group);
            for (ni, yn) in y.chunks_exact_mut(m * out_len).enumerate() {
                for (mi, yp) in yn.chunks_exact_mut(out_len).enumerate() {
                    yp.fill(bias.as_ref().map_or(0.0, |b| b[mi]));
                    let (gi, mloc) = (mi / mpg, mi % mpg);
                    for ci in gi * cpg..(gi + 1) * cpg {
                        let xp = &xv[(ni * c + ci) * in_len..][..in_len];
                        let wk = &wv[(ci * mpg + mloc) * k_len..][..k_len];
                        conv_transposed_plane(&g, xp, wk, yp);
                    }
                }
            }
        }
        Ok(vec![Tensor::from_f64s(x.dtype(), out_shape, &y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn seq(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        t(shape, &(1..=n).map(|i| i as f32).collect::<Vec<_>>())
    }

    fn conv(attrs: ConvAttrs, inputs: &[&Tensor]) -> IrResult<Tensor> {
        let op = Conv { attrs };
        let facts: Vec<Fact> = inputs.iter().map(|x| Fact::known(x.dtype(), x.shape())).collect();
        let want = op.output_facts(&facts.iter().collect::<Vec<_>>())?;
        let y = op.eval(inputs)?.remove(0);
        assert_eq!(want[0].known_shape().as_deref(), Some(y.shape()), "facts agree with eval");
        Ok(y)
    }

    fn values(y: &Tensor) -> Vec<f32> {
        y.as_slice::<f32>().unwrap().to_vec()
    }

    fn win(k: usize, s: usize, pads: [usize; 2], auto_pad: AutoPad, ceil: bool) -> Window {
        Window::new("Test", &[k], &[s], &pads, &[], auto_pad, ceil).unwrap()
    }

    #[test]
    fn output_sizes_and_pads() {
        // floor((5 + 1 + 1 - 3) / 2) + 1 = 3
        assert_eq!(win(3, 2, [1, 1], AutoPad::NotSet, false).resolve("T", 0, 5).unwrap(), (3, 1, 1));
        assert_eq!(win(3, 2, [9, 9], AutoPad::Valid, false).resolve("T", 0, 6).unwrap(), (2, 0, 0));
        // SAME: out = ceil(6 / 4) = 2, total pad (2 - 1) * 4 + 3 - 6 = 1, odd pixel at the end (upper)
        // or the beginning (lower).
        assert_eq!(win(3, 4, [0, 0], AutoPad::SameUpper, false).resolve("T", 0, 6).unwrap(), (2, 0, 1));
        assert_eq!(win(3, 4, [0, 0], AutoPad::SameLower, false).resolve("T", 0, 6).unwrap(), (2, 1, 0));
        // kernel smaller than the stride: no negative pads
        assert_eq!(win(1, 3, [0, 0], AutoPad::SameUpper, false).resolve("T", 0, 3).unwrap(), (1, 0, 0));
        // ceil_mode: ceil((5 - 2) / 2) + 1 = 3 windows, the last one partly outside
        assert_eq!(win(2, 2, [0, 0], AutoPad::NotSet, true).resolve("T", 0, 5).unwrap().0, 3);
        assert_eq!(win(2, 2, [0, 0], AutoPad::NotSet, false).resolve("T", 0, 5).unwrap().0, 2);
        // ceil((3 + 2 - 2) / 2) + 1 = 3, but the third window would start in the end padding
        assert_eq!(win(2, 2, [1, 1], AutoPad::NotSet, true).resolve("T", 0, 3).unwrap().0, 2);
        assert!(win(3, 1, [0, 0], AutoPad::NotSet, false).resolve("T", 0, 2).is_err());
        assert!(win(3, 1, [0, 0], AutoPad::Valid, false).resolve("T", 0, 2).is_err());
        // dilation 2 makes a 3-tap kernel span 5
        let w = Window::new("T", &[3], &[1], &[], &[2], AutoPad::NotSet, false).unwrap();
        assert_eq!(w.resolve("T", 0, 7).unwrap().0, 3);
    }

    #[test]
    fn window_attribute_errors() {
        let k = [3, 3];
        assert!(Window::new("T", &k, &[1], &[], &[], AutoPad::NotSet, false).is_err());
        assert!(Window::new("T", &k, &[0, 1], &[], &[], AutoPad::NotSet, false).is_err());
        assert!(Window::new("T", &k, &[], &[1, 1], &[], AutoPad::NotSet, false).is_err());
        assert!(Window::new("T", &k, &[], &[], &[1, 0], AutoPad::NotSet, false).is_err());
        assert!(Window::new("T", &[0, 3], &[], &[], &[], AutoPad::NotSet, false).is_err());
        assert!(Window::new("T", &[1, 1, 1, 1], &[], &[], &[], AutoPad::NotSet, false).is_err());
        assert!(Window::new("T", &k, &[1 << 40, 1], &[], &[], AutoPad::NotSet, false).is_err());
    }

    #[test]
    fn valid_ranges() {
        // sources o * 2 - 1 in 0..5 for o in 0..4: o = 1, 2 (sources 1, 3)
        assert_eq!(valid_range(4, 5, 2, -1), 1..3);
        assert_eq!(valid_range(4, 5, 1, 0), 0..4);
        assert_eq!(valid_range(4, 2, 1, 3), 0..0);
        assert_eq!(valid_range(3, 4, 1, -5), 3..3);
    }

    #[test]
    fn conv2d_basic_padded_strided_bias() {
        let x = seq(&[1, 1, 3, 3]);
        let w = t(&[1, 1, 2, 2], &[1.0; 4]);
        let y = conv(ConvAttrs::default(), &[&x, &w]).unwrap();
        assert_eq!(y.shape(), &[1, 1, 2, 2]);
        assert_eq!(values(&y), [12.0, 16.0, 24.0, 28.0]);
        // pads 1, stride 2: windows at (-1,-1), (-1,1), (1,-1), (1,1)
        let attrs = ConvAttrs { strides: vec![2, 2], pads: vec![1, 1, 1, 1], ..Default::default() };
        let b = t(&[1], &[0.5]);
        let y = conv(attrs, &[&x, &w, &b]).unwrap();
        assert_eq!(values(&y), [1.5, 5.5, 11.5, 28.5]);
    }

    #[test]
    fn conv_grouped_and_depthwise() {
        let x = t(&[1, 2, 1, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let w = t(&[2, 1, 1, 2], &[1.0, 1.0, 1.0, -1.0]);
        let y = conv(ConvAttrs { group: 2, ..Default::default() }, &[&x, &w]).unwrap();
        assert_eq!(y.shape(), &[1, 2, 1, 2]);
        assert_eq!(values(&y), [3.0, 5.0, -1.0, -1.0]);
        // 2 groups of 2 input channels -> 2 output channels each
        let x = seq(&[1, 4, 1, 1]);
        let w = t(&[4, 2, 1, 1], &[1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, -1.0]);
        let y = conv(ConvAttrs { group: 2, ..Default::default() }, &[&x, &w]).unwrap();
        assert_eq!(values(&y), [1.0, 2.0, 7.0, -1.0]);
    }

    #[test]
    fn conv1d_dilated_and_3d() {
        let x = seq(&[1, 1, 5]);
        let w = t(&[1, 1, 2], &[1.0, 10.0]);
        let y = conv(ConvAttrs { dilations: vec![2], ..Default::default() }, &[&x, &w]).unwrap();
        assert_eq!(values(&y), [31.0, 42.0, 53.0]);
        let x = seq(&[1, 1, 2, 2, 2]);
        let w = t(&[1, 1, 2, 2, 2], &[1.0; 8]);
        assert_eq!(values(&conv(ConvAttrs::default(), &[&x, &w]).unwrap()), [36.0]);
        // stride 2 over 3-d: only the corner windows
        let x = seq(&[1, 1, 3, 3, 3]);
        let w = t(&[1, 1, 1, 1, 1], &[2.0]);
        let y = conv(ConvAttrs { strides: vec![2, 2, 2], ..Default::default() }, &[&x, &w]).unwrap();
        assert_eq!(values(&y), [2.0, 6.0, 14.0, 18.0, 38.0, 42.0, 50.0, 54.0]);
    }

    #[test]
    fn conv_auto_pad() {
        let x = t(&[1, 1, 4], &[1.0, 2.0, 3.0, 4.0]);
        let w = t(&[1, 1, 2], &[1.0, 10.0]);
        let y = conv(ConvAttrs { auto_pad: AutoPad::SameUpper, ..Default::default() }, &[&x, &w]).unwrap();
        assert_eq!(values(&y), [21.0, 32.0, 43.0, 4.0]);
        let y = conv(ConvAttrs { auto_pad: AutoPad::SameLower, ..Default::default() }, &[&x, &w]).unwrap();
        assert_eq!(values(&y), [10.0, 21.0, 32.0, 43.0]);
        // VALID ignores pads
        let attrs = ConvAttrs { auto_pad: AutoPad::Valid, pads: vec![3, 3], ..Default::default() };
        assert_eq!(values(&conv(attrs, &[&x, &w]).unwrap()), [21.0, 32.0, 43.0]);
    }

    #[test]
    fn conv_pointwise_and_f64() {
        let x = Tensor::from_vec(vec![1, 2, 1, 2], vec![1.0f64, 2.0, 3.0, 4.0]).unwrap();
        let w = Tensor::from_vec(vec![3, 2, 1, 1], vec![1.0f64, 1.0, 2.0, 0.0, 0.0, -1.0]).unwrap();
        let y = conv(ConvAttrs::default(), &[&x, &w]).unwrap();
        assert_eq!(y.as_slice::<f64>().unwrap(), &[4.0, 6.0, 2.0, 4.0, -3.0, -4.0]);
    }

    #[test]
    fn conv_errors() {
        let x = seq(&[1, 2, 3, 3]);
        let w = t(&[1, 2, 2, 2], &[1.0; 8]);
        let err = |attrs: ConvAttrs, inputs: &[&Tensor]| conv(attrs, inputs).unwrap_err().to_string();
        assert!(
            err(ConvAttrs { kernel_shape: Some(vec![3, 3]), ..Default::default() }, &[&x, &w]).contains("kernel_shape")
        );
        assert!(err(ConvAttrs { group: 2, ..Default::default() }, &[&x, &w]).contains("channels"));
        assert!(err(ConvAttrs::default(), &[&x, &w, &t(&[2], &[0.0, 0.0])]).contains("bias"));
        assert!(err(ConvAttrs::default(), &[&t(&[2, 3], &[0.0; 6]), &w]).contains("rank"));
        assert!(err(ConvAttrs::default(), &[&x, &t(&[1, 2, 4, 4], &[0.0; 32])]).contains("exceeds"));
        assert!(err(ConvAttrs { strides: vec![1], ..Default::default() }, &[&x, &w]).contains("strides"));
        let xi = Tensor::from_vec(vec![1, 2, 3, 3], vec![0i32; 18]).unwrap();
        assert!(err(ConvAttrs::default(), &[&xi, &w]).contains("float"));
        let w3 = t(&[3, 1, 1, 1], &[1.0; 3]);
        assert!(err(ConvAttrs { group: 2, ..Default::default() }, &[&x, &w3]).contains("divisible"));
        assert!(conv(ConvAttrs::default(), &[&x]).is_err());
        let w64 = Tensor::from_vec(vec![1, 2, 2, 2], vec![0f64; 8]).unwrap();
        assert!(err(ConvAttrs::default(), &[&x, &w64]).contains("weights"));
    }

    #[test]
    fn conv_facts_symbolic() {
        let op = Conv { attrs: ConvAttrs { pads: vec![1, 1, 1, 1], ..Default::default() } };
        let x = Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(3), Dim::sym("h"), Dim::Known(8)]);
        let w = Fact::known(DType::F32, &[16, 3, 3, 3]);
        let y = op.output_facts(&[&x, &w]).unwrap();
        // 3x3 with pads 1 and stride 1 keeps the symbolic height
        assert_eq!(y[0].shape, vec![Dim::sym("n"), Dim::Known(16), Dim::sym("h"), Dim::Known(8)]);
        let op = Conv { attrs: ConvAttrs { strides: vec![2, 2], ..Default::default() } };
        let y = op.output_facts(&[&x, &w]).unwrap();
        assert_eq!(y[0].shape[2..], [Dim::Unknown, Dim::Known(3)]);
        // weights of unknown spatial size: spatial dims unknown, channel checks still apply
        let wu = Fact::new(DType::F32, vec![Dim::Known(4), Dim::Known(3), Dim::Unknown, Dim::Unknown]);
        assert_eq!(op.output_facts(&[&x, &wu]).unwrap()[0].shape[1..], [Dim::Known(4), Dim::Unknown, Dim::Unknown]);
        let wbad = Fact::known(DType::F32, &[16, 2, 3, 3]);
        assert!(op.output_facts(&[&x, &wbad]).is_err());
    }

    fn conv_t(op: &ConvTranspose, inputs: &[&Tensor]) -> IrResult<Tensor> {
        let facts: Vec<Fact> = inputs.iter().map(|x| Fact::known(x.dtype(), x.shape())).collect();
        let want = op.output_facts(&facts.iter().collect::<Vec<_>>())?;
        let y = op.eval(inputs)?.remove(0);
        assert_eq!(want[0].known_shape().as_deref(), Some(y.shape()), "facts agree with eval");
        Ok(y)
    }

    fn transposed(attrs: ConvAttrs, output_padding: Vec<usize>, output_shape: Option<Vec<usize>>) -> ConvTranspose {
        ConvTranspose { attrs, output_padding, output_shape }
    }

    #[test]
    fn conv_transpose_sizes() {
        let x = t(&[1, 1, 3], &[1.0, 2.0, 3.0]);
        let w = t(&[1, 1, 2], &[1.0, 1.0]);
        let s2 = || ConvAttrs { strides: vec![2], ..Default::default() };
        // full output: 2 * (3 - 1) + 2 = 6
        let y = conv_t(&transposed(s2(), vec![], None), &[&x, &w]).unwrap();
        assert_eq!(values(&y), [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        let attrs = ConvAttrs { pads: vec![1, 0], ..s2() };
        assert_eq!(values(&conv_t(&transposed(attrs, vec![], None), &[&x, &w]).unwrap()), [1.0, 2.0, 2.0, 3.0, 3.0]);
        // output_padding adds a (bias only) pixel at the end
        let b = t(&[1], &[0.5]);
        let y = conv_t(&transposed(s2(), vec![1], None), &[&x, &w, &b]).unwrap();
        assert_eq!(values(&y), [1.5, 1.5, 2.5, 2.5, 3.5, 3.5, 0.5]);
        // output_shape 5: total padding 1 goes to the beginning unless SAME_UPPER
        let y = conv_t(&transposed(s2(), vec![], Some(vec![5])), &[&x, &w]).unwrap();
        assert_eq!(values(&y), [1.0, 2.0, 2.0, 3.0, 3.0]);
        let upper = ConvAttrs { auto_pad: AutoPad::SameUpper, ..s2() };
        let y = conv_t(&transposed(upper.clone(), vec![], Some(vec![1, 1, 5])), &[&x, &w]).unwrap();
        assert_eq!(values(&y), [1.0, 1.0, 2.0, 2.0, 3.0]);
        // SAME: output = input * stride
        assert_eq!(conv_t(&transposed(upper, vec![], None), &[&x, &w]).unwrap().shape(), &[1, 1, 6]);
        // stride 1 overlaps
        let y = conv_t(&transposed(ConvAttrs::default(), vec![], None), &[&x, &w]).unwrap();
        assert_eq!(values(&y), [1.0, 3.0, 5.0, 3.0]);
        // dilation 2: taps 2 apart
        let attrs = ConvAttrs { dilations: vec![2], ..Default::default() };
        let y = conv_t(&transposed(attrs, vec![], None), &[&x, &w]).unwrap();
        assert_eq!(values(&y), [1.0, 2.0, 4.0, 2.0, 3.0]);
    }

    #[test]
    fn conv_transpose_2d_and_groups() {
        let x = seq(&[1, 1, 2, 2]);
        let w = t(&[1, 1, 2, 2], &[1.0; 4]);
        let y = conv_t(&transposed(ConvAttrs::default(), vec![], None), &[&x, &w]).unwrap();
        assert_eq!(values(&y), [1.0, 3.0, 2.0, 4.0, 10.0, 6.0, 3.0, 7.0, 4.0]);
        let x = t(&[1, 2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let w = t(&[2, 1, 1], &[2.0, 3.0]);
        let b = t(&[2], &[0.0, 1.0]);
        let y = conv_t(&transposed(ConvAttrs { group: 2, ..Default::default() }, vec![], None), &[&x, &w, &b]).unwrap();
        assert_eq!(values(&y), [2.0, 4.0, 10.0, 13.0]);
        // one input channel feeding two output channels
        let x = t(&[1, 1, 2], &[1.0, 2.0]);
        let w = t(&[1, 2, 1], &[1.0, -1.0]);
        let y = conv_t(&transposed(ConvAttrs::default(), vec![], None), &[&x, &w]).unwrap();
        assert_eq!(y.shape(), &[1, 2, 2]);
        assert_eq!(values(&y), [1.0, 2.0, -1.0, -2.0]);
    }

    #[test]
    fn conv_transpose_errors() {
        let x = t(&[1, 2, 3], &[0.0; 6]);
        let w = t(&[1, 1, 2], &[1.0; 2]);
        assert!(conv_t(&transposed(ConvAttrs::default(), vec![], None), &[&x, &w])
            .unwrap_err()
            .to_string()
            .contains("channels"));
        let x = t(&[1, 1, 3], &[0.0; 3]);
        let bad_shape = transposed(ConvAttrs::default(), vec![], Some(vec![1, 2]));
        assert!(conv_t(&bad_shape, &[&x, &w]).is_err());
        let bad_pad = transposed(ConvAttrs::default(), vec![0, 0], None);
        assert!(conv_t(&bad_pad, &[&x, &w]).is_err());
        let huge_pads = transposed(ConvAttrs { pads: vec![3, 3], ..Default::default() }, vec![], None);
        assert!(conv_t(&huge_pads, &[&x, &w]).unwrap_err().to_string().contains("pads"));
        let bias = t(&[2], &[0.0; 2]);
        assert!(conv_t(&transposed(ConvAttrs::default(), vec![], None), &[&x, &w, &bias]).is_err());
        let f = Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(1), Dim::sym("l")]);
        let op = transposed(ConvAttrs { strides: vec![2], ..Default::default() }, vec![], Some(vec![7]));
        let y = op.output_facts(&[&f, &Fact::known(DType::F32, &[1, 1, 2])]).unwrap();
        assert_eq!(y[0].shape, vec![Dim::sym("n"), Dim::Known(1), Dim::Known(7)]);
    }
}

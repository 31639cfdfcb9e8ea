//! Ops that move, select or build data without arithmetic.
//!
//! Data movement goes through one helper, [`take`]: an op says, for each output axis and
//! coordinate, which source offset that coordinate contributes (or `None` for padding), and
//! `take` gathers the elements for every plain dtype. Reshape-like ops only relabel the shape.

use super::util::{broadcast_dims, expect_inputs, next_index, show_dims, unknown_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrError, IrResult};
use slimnn_tensor::{
    broadcast_shapes, checked_numel, match_data, strides_of, DType, Dim, Element, QuantParams, Tensor,
};
use std::any::Any;
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Op definitions.

/// The input's shape as a 1-d i64 tensor, optionally sliced to `start..end` (opset 15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    pub start: i64,
    pub end: Option<i64>,
}

/// `Reshape(data, shape)`; `0` copies the input dim unless `allowzero`, `-1` is inferred.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reshape {
    pub allowzero: bool,
}

/// Permutes dims; `None` reverses them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transpose {
    pub perm: Option<Vec<usize>>,
}

/// Inserts size-1 dims at `axes` (positions in the output).
///
/// Inputs: `data[, axes]`. Axes known when the graph is built are the attribute; axes computed
/// at run time come as a second input (a 1-d i64 tensor) and `axes` must then be empty. The
/// output rank is then known when the axes' count is, and its dims are unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsqueeze {
    pub axes: Vec<i64>,
}

/// Removes size-1 dims at `axes` (all size-1 dims when `None`).
///
/// Inputs: `data[, axes]`. Axes computed at run time come as a second input (a 1-d i64 tensor;
/// empty means "not given") and `axes` must then be `None`. The output rank is then known when
/// the axes' count is, and its dims are unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Squeeze {
    pub axes: Option<Vec<i64>>,
}

/// Concatenates its inputs along `axis`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Concat {
    pub axis: i64,
}

/// `Slice(data, starts, ends[, axes[, steps]])` (opset 10+ form; the importer converts the
/// attribute form of older opsets into constant inputs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice;

/// Splits along `axis` into `num_outputs` parts, of sizes `split` when given, else equal
/// (the last part smaller when the dim does not divide evenly, as in opset 18).
///
/// Inputs: `input[, split]`. Sizes computed at run time come as a second input (a 1-d i64
/// tensor with `num_outputs` values) and `split` must then be `None`; the parts' lengths along
/// `axis` are then unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub axis: i64,
    pub split: Option<Vec<usize>>,
    pub num_outputs: usize,
}

/// `Expand(data, shape)`: broadcasts `data` to `shape` (bidirectionally, as numpy does).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expand;

/// `Gather(data, indices)` along `axis`; negative indices count from the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gather {
    pub axis: i64,
}

/// `ConstantOfShape(shape)` filled with `value` (a one-element tensor; its dtype is the output's).
#[derive(Debug, Clone, PartialEq)]
pub struct ConstantOfShape {
    pub value: Arc<Tensor>,
}

/// `Range(start, limit, delta)` of scalars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Range;

/// Flattens to 2-d `[prod(shape[..axis]), prod(shape[axis..])]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flatten {
    pub axis: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PadMode {
    Constant,
    Reflect,
    Edge,
    Wrap,
}

/// `Pad(data, pads[, constant_value[, axes]])` (opset 11+ form). `pads` lists all begins then
/// all ends, for every dim or for the dims in `axes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pad {
    pub mode: PadMode,
}

/// `Tile(data, repeats)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tile;

// ---------------------------------------------------------------------------------------------
// Shared helpers.

const INDEX_TYPES: &[DType] = &[DType::I32, DType::I64];
const I64_ONLY: &[DType] = &[DType::I64];

fn dtype_list(d: &[DType]) -> String {
    d.iter().map(|d| d.name()).collect::<Vec<_>>().join(" or ")
}

/// Resolves a possibly negative axis against `rank`; a scalar has no axes.
fn axis_of(op: &'static str, axis: i64, rank: usize) -> IrResult<usize> {
    let r = rank as i64;
    let a = if axis < 0 { axis + r } else { axis };
    if a < 0 || a >= r {
        op_bail!(op, "axis {axis} is out of range for rank {rank}");
    }
    Ok(a as usize)
}

/// Resolves a list of axes, rejecting duplicates.
fn axes_of(op: &'static str, axes: &[i64], rank: usize) -> IrResult<Vec<usize>> {
    let mut seen = vec![false; rank];
    let mut out = Vec::with_capacity(axes.len());
    for &a in axes {
        let n = axis_of(op, a, rank)?;
        if seen[n] {
            op_bail!(op, "axis {a} is repeated in {axes:?}");
        }
        seen[n] = true;
        out.push(n);
    }
    Ok(out)
}

fn to_usize(op: &'static str, what: &str, v: i64) -> IrResult<usize> {
    usize::try_from(v).map_err(|_| IrError::op(op, format!("{what} must not be negative, got {v}")))
}

fn known(shape: &[usize]) -> Vec<Dim> {
    shape.iter().map(|&d| Dim::Known(d)).collect()
}

fn reject_block(op: &'static str, dtype: DType) -> IrResult<()> {
    if let DType::Block(_) = dtype {
        op_bail!(op, "cannot move block-quantized ({dtype}) data; dequantize first");
    }
    Ok(())
}

/// Checks a 1-d integer input fact; returns its length when known and its values when constant.
fn ints_fact(op: &'static str, what: &str, f: &Fact, dtypes: &[DType]) -> IrResult<(Option<usize>, Option<Vec<i64>>)> {
    if !dtypes.contains(&f.dtype) {
        op_bail!(op, "{what} must be {}, got {}", dtype_list(dtypes), f.dtype);
    }
    if f.rank() != 1 {
        op_bail!(op, "{what} must be 1-d, got shape {}", show_dims(&f.shape));
    }
    let values = f.konst.as_deref().map(Tensor::to_i64_vec).transpose()?;
    Ok((f.shape[0].as_known(), values))
}

/// Checks a run-time axes (or sizes) input and that no attribute duplicates it; returns its
/// length when known and its values when constant.
fn axes_input_fact(
    op: &'static str,
    what: &str,
    attr_given: bool,
    f: &Fact,
) -> IrResult<(Option<usize>, Option<Vec<i64>>)> {
    if attr_given {
        op_bail!(op, "{what} are given both as an attribute and as an input");
    }
    ints_fact(op, what, f, I64_ONLY)
}

/// The values of a 1-d integer input tensor.
fn ints(op: &'static str, what: &str, t: &Tensor, dtypes: &[DType]) -> IrResult<Vec<i64>> {
    if !dtypes.contains(&t.dtype()) {
        op_bail!(op, "{what} must be {}, got {}", dtype_list(dtypes), t.dtype());
    }
    if t.rank() != 1 {
        op_bail!(op, "{what} must be 1-d, got shape {:?}", t.shape());
    }
    Ok(t.to_i64_vec()?)
}

/// Rejects shapes whose known dims alone overflow the element count.
fn check_dims(op: &'static str, dims: &[Dim]) -> IrResult<()> {
    let mut n: usize = 1;
    for d in dims {
        if let Dim::Known(k) = d {
            n = n.checked_mul(*k).ok_or_else(|| IrError::op(op, format!("shape {} overflows", show_dims(dims))))?;
        }
    }
    Ok(())
}

/// Product of dims: known when all are, one symbol when the rest are known ones, 0 when any
/// known dim is 0, unknown otherwise.
fn dim_product(op: &'static str, dims: &[Dim]) -> IrResult<Dim> {
    if dims.contains(&Dim::Known(0)) {
        return Ok(Dim::Known(0));
    }
    check_dims(op, dims)?;
    let (k, syms, unknown) = split_dims(op, dims.iter())?;
    Ok(match syms.as_slice() {
        _ if unknown => Dim::Unknown,
        [] => Dim::Known(k),
        [s] if k == 1 => Dim::Sym(s.clone()),
        _ => Dim::Unknown,
    })
}

/// Splits dims into the product of the known ones, the symbols, and whether any is unknown.
fn split_dims<'a>(op: &'static str, dims: impl Iterator<Item = &'a Dim>) -> IrResult<(usize, Vec<Arc<str>>, bool)> {
    let (mut k, mut syms, mut unknown) = (1usize, Vec::new(), false);
    for d in dims {
        match d {
            Dim::Known(n) => k = k.checked_mul(*n).ok_or_else(|| IrError::op(op, "element count overflows"))?,
            Dim::Sym(s) => syms.push(s.clone()),
            Dim::Unknown => unknown = true,
        }
    }
    Ok((k, syms, unknown))
}

/// The elements of `t` as `&[T]` when `T` is its element type.
fn slice_like<T: Element>(t: &Tensor) -> Option<&[T]> {
    match_data!(t.data(), v => (v as &dyn Any).downcast_ref::<Vec<T>>().map(Vec::as_slice), block => None)
}

/// Carries `src`'s quantization to `out`: per-tensor parameters as they are, per-channel ones
/// when `axis` maps the channel axis to an output axis, dropped otherwise.
fn carry_quant(out: Tensor, src: &Tensor, axis: impl FnOnce(usize) -> Option<usize>) -> Tensor {
    let q = src.quant().and_then(|q| match q.axis {
        None => Some(q.clone()),
        Some(a) => axis(a).map(|a| QuantParams { axis: Some(a), ..q.clone() }),
    });
    out.with_quant(q)
}

/// Builds a tensor of `shape` from `src`: output coordinate `i` of axis `k` contributes the
/// source offset `source(k, i)` (offsets add up across axes), `None` meaning "use `fill`"
/// (a one-element tensor of `src`'s dtype; zero when absent).
fn take(
    op: &'static str,
    src: &Tensor,
    shape: Vec<usize>,
    fill: Option<&Tensor>,
    source: impl Fn(usize, usize) -> Option<usize>,
) -> IrResult<Tensor> {
    reject_block(op, src.dtype())?;
    let numel = checked_numel(&shape, src.dtype())?;
    if numel == 0 {
        // Also keeps huge dims next to a zero dim from sizing the tables below.
        return Ok(Tensor::zeros(src.dtype(), shape)?);
    }
    let tables: Vec<Vec<Option<usize>>> =
        shape.iter().enumerate().map(|(k, &n)| (0..n).map(|i| source(k, i)).collect()).collect();
    match_data!(src.data(), v => {
        let out = take_typed(op, v, &shape, &tables, numel, fill)?;
        Ok(Tensor::from_vec(shape, out)?)
    }, block => op_bail!(op, "cannot move block-quantized data"))
}

fn take_typed<T: Element>(
    op: &'static str,
    src: &[T],
    shape: &[usize],
    tables: &[Vec<Option<usize>>],
    numel: usize,
    fill: Option<&Tensor>,
) -> IrResult<Vec<T>> {
    let fill = match fill {
        Some(t) => *slice_like::<T>(t)
            .and_then(|s| s.first())
            .ok_or_else(|| IrError::op(op, format!("fill value must be one {} value", T::DTYPE)))?,
        None => T::default(),
    };
    let oob = || IrError::op(op, "source index out of range");
    let mut out = Vec::with_capacity(numel);
    let Some((last, outer)) = tables.split_last() else {
        out.push(*src.first().ok_or_else(oob)?);
        return Ok(out);
    };
    // Rows that read a contiguous run of the source are copied at once.
    let first = last.first().copied().flatten();
    let contiguous = first.is_some_and(|c0| last.iter().enumerate().all(|(i, &c)| c == Some(c0 + i)));
    let outer_shape = &shape[..outer.len()];
    let mut idx = vec![0; outer.len()];
    loop {
        let base = outer.iter().zip(&idx).try_fold(0usize, |acc, (t, &i)| t[i].map(|c| acc + c));
        match base {
            None => out.resize(out.len() + last.len(), fill),
            Some(b) if contiguous => {
                let s = b + first.unwrap_or(0);
                out.extend_from_slice(src.get(s..s + last.len()).ok_or_else(oob)?);
            }
            Some(b) => {
                for &c in last {
                    out.push(match c {
                        Some(c) => *src.get(b + c).ok_or_else(oob)?,
                        None => fill,
                    });
                }
            }
        }
        if !next_index(&mut idx, outer_shape) {
            break;
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Shape

impl Shape {
    /// The `start..end` range of dims after ONNX's negative wrap and clamping.
    fn range(&self, rank: usize) -> (usize, usize) {
        let r = rank as i64;
        let clamp = |v: i64| (if v < 0 { v.saturating_add(r) } else { v }).clamp(0, r) as usize;
        let (s, e) = (clamp(self.start), clamp(self.end.unwrap_or(r)));
        (s, e.max(s))
    }
}

impl OpDef for Shape {
    fn name(&self) -> &'static str {
        "Shape"
    }

    /// The value is known when the selected dims are, and is then carried as a constant so
    /// shape arithmetic folds even though the data input is not constant.
    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Shape", inputs, 1, 1)?;
        let (s, e) = self.range(inputs[0].rank());
        let dims = &inputs[0].shape[s..e];
        let mut out = Fact::known(DType::I64, &[e - s]);
        if let Some(v) = dims.iter().map(|d| d.as_known().map(|n| n as i64)).collect::<Option<Vec<i64>>>() {
            out.konst = Some(Arc::new(Tensor::from_vec(vec![e - s], v)?));
        }
        Ok(vec![out])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Shape", inputs, 1, 1)?;
        let (s, e) = self.range(inputs[0].rank());
        let v: Vec<i64> = inputs[0].shape()[s..e].iter().map(|&d| d as i64).collect();
        Ok(vec![Tensor::from_vec(vec![e - s], v)?])
    }
}

// ---------------------------------------------------------------------------------------------
// Reshape

/// Output dims of a reshape of `input` to `spec`, as far as they are known. Errors when the
/// spec is malformed or the element counts provably differ.
fn reshape_dims(input: &[Dim], spec: &[i64], allowzero: bool) -> IrResult<Vec<Dim>> {
    const OP: &str = "Reshape";
    let copies = |i: usize| spec.get(i) == Some(&0) && !allowzero;
    let mut out = Vec::with_capacity(spec.len());
    let mut infer = None;
    for (i, &s) in spec.iter().enumerate() {
        let d = match s {
            -1 if infer.is_some() => op_bail!(OP, "shape {spec:?} has more than one -1"),
            -1 => {
                infer = Some(i);
                Dim::Unknown
            }
            0 if !allowzero => match input.get(i) {
                Some(d) => d.clone(),
                None => op_bail!(
                    OP,
                    "shape {spec:?} copies dim {i} (a 0) but the input {} has rank {}",
                    show_dims(input),
                    input.len()
                ),
            },
            s if s >= 0 => Dim::Known(to_usize(OP, "a dim", s)?),
            _ => op_bail!(OP, "shape {spec:?} has an invalid dim {s}"),
        };
        out.push(d);
    }
    if allowzero && infer.is_some() && spec.contains(&0) {
        op_bail!(OP, "shape {spec:?} has both 0 and -1 while allowzero is set");
    }
    // Cancel what both sides share: copied dims by position, symbols by name.
    let rest_in = input.iter().enumerate().filter(|&(i, _)| !copies(i)).map(|(_, d)| d);
    let rest_out = out.iter().enumerate().filter(|&(i, _)| Some(i) != infer && !copies(i)).map(|(_, d)| d);
    let (kin, mut sin, uin) = split_dims(OP, rest_in)?;
    let (kout, mut sout, uout) = split_dims(OP, rest_out)?;
    sout.retain(|s| match sin.iter().position(|x| x == s) {
        Some(p) => {
            sin.remove(p);
            false
        }
        None => true,
    });
    let exact = !uin && !uout && sout.is_empty();
    let mismatch =
        || IrError::op(OP, format!("cannot reshape {} to {spec:?}: element counts differ", show_dims(input)));
    match infer {
        Some(p) => {
            // A zero among the other dims leaves -1 undetermined; eval reports it.
            let copied_zero = input.iter().enumerate().any(|(i, d)| copies(i) && *d == Dim::Known(0));
            if exact && kout > 0 && !copied_zero {
                out[p] = match sin.as_slice() {
                    [] if kin % kout != 0 => return Err(mismatch()),
                    [] => Dim::Known(kin / kout),
                    [s] if kin == kout => Dim::Sym(s.clone()),
                    _ => Dim::Unknown,
                };
            }
        }
        None if exact && sin.is_empty() && kin != kout => return Err(mismatch()),
        None => {}
    }
    Ok(out)
}

impl OpDef for Reshape {
    fn name(&self) -> &'static str {
        "Reshape"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Reshape", inputs, 2, 2)?;
        let (len, spec) = ints_fact("Reshape", "shape", inputs[1], I64_ONLY)?;
        let dims = match (spec, len) {
            (Some(spec), _) => reshape_dims(&inputs[0].shape, &spec, self.allowzero)?,
            (None, Some(n)) => unknown_dims(n),
            (None, None) => op_bail!("Reshape", "the shape input has an unknown length, so the output rank is unknown"),
        };
        check_dims("Reshape", &dims)?;
        Ok(vec![Fact::new(inputs[0].dtype, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Reshape", inputs, 2, 2)?;
        let data = inputs[0];
        let spec = ints("Reshape", "shape", inputs[1], I64_ONLY)?;
        let dims = reshape_dims(&known(data.shape()), &spec, self.allowzero)?;
        let Some(shape) = dims.iter().map(Dim::as_known).collect::<Option<Vec<_>>>() else {
            op_bail!(
                "Reshape",
                "cannot infer the -1 in {spec:?} for input shape {:?}: the other dims multiply to 0",
                data.shape()
            );
        };
        Ok(vec![carry_quant(data.clone().into_shape(shape)?, data, |_| None)])
    }
}

// ---------------------------------------------------------------------------------------------
// Transpose

impl Transpose {
    fn perm(&self, rank: usize) -> IrResult<Vec<usize>> {
        let Some(p) = &self.perm else {
            return Ok((0..rank).rev().collect());
        };
        let mut seen = vec![false; rank];
        for &a in p {
            if p.len() != rank || a >= rank || seen[a] {
                op_bail!("Transpose", "perm {p:?} is not a permutation of 0..{rank}");
            }
            seen[a] = true;
        }
        Ok(p.clone())
    }
}

impl OpDef for Transpose {
    fn name(&self) -> &'static str {
        "Transpose"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Transpose", inputs, 1, 1)?;
        reject_block("Transpose", inputs[0].dtype)?;
        let perm = self.perm(inputs[0].rank())?;
        Ok(vec![Fact::new(inputs[0].dtype, perm.iter().map(|&a| inputs[0].shape[a].clone()).collect())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Transpose", inputs, 1, 1)?;
        let t = inputs[0];
        let perm = self.perm(t.rank())?;
        let st = strides_of(t.shape());
        let shape = perm.iter().map(|&a| t.shape()[a]).collect();
        let out = take("Transpose", t, shape, None, |k, i| Some(i * st[perm[k]]))?;
        Ok(vec![carry_quant(out, t, |a| perm.iter().position(|&p| p == a))])
    }
}

// ---------------------------------------------------------------------------------------------
// Unsqueeze / Squeeze / Flatten

impl Unsqueeze {
    /// For each output position, whether it is an inserted size-1 dim.
    fn inserted(axes: &[i64], rank: usize) -> IrResult<Vec<bool>> {
        let r = rank + axes.len();
        let mut at = vec![false; r];
        for a in axes_of("Unsqueeze", axes, r)? {
            at[a] = true;
        }
        Ok(at)
    }
}

/// Output dims from input dims: `one` where `inserted`, the next input dim elsewhere.
fn interleave<D: Clone>(input: &[D], inserted: &[bool], one: D) -> Vec<D> {
    let mut src = input.iter();
    inserted
        .iter()
        .map(|&ins| if ins { one.clone() } else { src.next().cloned().unwrap_or_else(|| one.clone()) })
        .collect()
}

impl OpDef for Unsqueeze {
    fn name(&self) -> &'static str {
        "Unsqueeze"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Unsqueeze", inputs, 1, 2)?;
        let x = inputs[0];
        let axes = match inputs.get(1) {
            None => self.axes.clone(),
            Some(f) => match axes_input_fact("Unsqueeze", "axes", !self.axes.is_empty(), f)? {
                (_, Some(v)) => v,
                (Some(n), None) => return Ok(vec![Fact::new(x.dtype, unknown_dims(x.rank() + n))]),
                (None, None) => {
                    op_bail!("Unsqueeze", "the axes input has an unknown length, so the output rank is unknown")
                }
            },
        };
        let at = Unsqueeze::inserted(&axes, x.rank())?;
        Ok(vec![Fact::new(x.dtype, interleave(&x.shape, &at, Dim::Known(1)))])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Unsqueeze", inputs, 1, 2)?;
        let t = inputs[0];
        let axes = match inputs.get(1) {
            None => self.axes.clone(),
            Some(a) if self.axes.is_empty() => ints("Unsqueeze", "axes", a, I64_ONLY)?,
            Some(_) => op_bail!("Unsqueeze", "axes are given both as an attribute and as an input"),
        };
        let at = Unsqueeze::inserted(&axes, t.rank())?;
        let out = t.clone().into_shape(interleave(t.shape(), &at, 1))?;
        let kept: Vec<usize> = (0..at.len()).filter(|&i| !at[i]).collect();
        Ok(vec![carry_quant(out, t, |a| kept.get(a).copied())])
    }
}

impl Squeeze {
    /// For each input dim, whether it is removed.
    fn removed(axes: Option<&[i64]>, shape: &[Dim]) -> IrResult<Vec<bool>> {
        match axes {
            Some(axes) => {
                let mut drop = vec![false; shape.len()];
                for a in axes_of("Squeeze", axes, shape.len())? {
                    if let Dim::Known(n) = shape[a] {
                        if n != 1 {
                            op_bail!("Squeeze", "cannot squeeze axis {a} of size {n} in {}", show_dims(shape));
                        }
                    }
                    drop[a] = true;
                }
                Ok(drop)
            }
            None => {
                if shape.iter().any(|d| d.as_known().is_none()) {
                    op_bail!(
                        "Squeeze",
                        "without axes, every dim must be known to tell which are 1, got {}; give axes",
                        show_dims(shape)
                    );
                }
                Ok(shape.iter().map(|d| *d == Dim::Known(1)).collect())
            }
        }
    }
}

impl OpDef for Squeeze {
    fn name(&self) -> &'static str {
        "Squeeze"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Squeeze", inputs, 1, 2)?;
        let x = inputs[0];
        let axes = match inputs.get(1) {
            None => self.axes.clone(),
            Some(f) => match axes_input_fact("Squeeze", "axes", self.axes.is_some(), f)? {
                (_, Some(v)) => Some(v).filter(|v| !v.is_empty()),
                (Some(0), None) => None,
                (Some(n), None) if n <= x.rank() => return Ok(vec![Fact::new(x.dtype, unknown_dims(x.rank() - n))]),
                (Some(n), None) => op_bail!("Squeeze", "{n} axes given for a rank-{} input", x.rank()),
                (None, None) => {
                    op_bail!("Squeeze", "the axes input has an unknown length, so the output rank is unknown")
                }
            },
        };
        let drop = Squeeze::removed(axes.as_deref(), &x.shape)?;
        let dims = x.shape.iter().zip(&drop).filter(|(_, &d)| !d).map(|(d, _)| d.clone()).collect();
        Ok(vec![Fact::new(x.dtype, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Squeeze", inputs, 1, 2)?;
        let t = inputs[0];
        let axes = match inputs.get(1) {
            None => self.axes.clone(),
            Some(a) if self.axes.is_none() => Some(ints("Squeeze", "axes", a, I64_ONLY)?).filter(|v| !v.is_empty()),
            Some(_) => op_bail!("Squeeze", "axes are given both as an attribute and as an input"),
        };
        let drop = Squeeze::removed(axes.as_deref(), &known(t.shape()))?;
        let shape = t.shape().iter().zip(&drop).filter(|(_, &d)| !d).map(|(&d, _)| d).collect();
        let out = t.clone().into_shape(shape)?;
        let kept: Vec<usize> = (0..drop.len()).filter(|&i| !drop[i]).collect();
        Ok(vec![carry_quant(out, t, |a| kept.iter().position(|&k| k == a))])
    }
}

impl Flatten {
    fn axis(&self, rank: usize) -> IrResult<usize> {
        let r = rank as i64;
        let a = if self.axis < 0 { self.axis + r } else { self.axis };
        if a < 0 || a > r {
            op_bail!("Flatten", "axis {} is out of range for rank {rank}", self.axis);
        }
        Ok(a as usize)
    }
}

impl OpDef for Flatten {
    fn name(&self) -> &'static str {
        "Flatten"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Flatten", inputs, 1, 1)?;
        let s = &inputs[0].shape;
        let a = self.axis(s.len())?;
        Ok(vec![Fact::new(inputs[0].dtype, vec![dim_product("Flatten", &s[..a])?, dim_product("Flatten", &s[a..])?])])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Flatten", inputs, 1, 1)?;
        let t = inputs[0];
        let a = self.axis(t.rank())?;
        let shape = vec![t.shape()[..a].iter().product(), t.shape()[a..].iter().product()];
        Ok(vec![carry_quant(t.clone().into_shape(shape)?, t, |_| None)])
    }
}

// ---------------------------------------------------------------------------------------------
// Concat

impl OpDef for Concat {
    fn name(&self) -> &'static str {
        "Concat"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        if inputs.is_empty() {
            op_bail!("Concat", "expects at least 1 input");
        }
        let first = inputs[0];
        reject_block("Concat", first.dtype)?;
        let axis = axis_of("Concat", self.axis, first.rank())?;
        let mut dims = first.shape.clone();
        for (n, f) in inputs.iter().enumerate().skip(1) {
            if f.dtype != first.dtype || f.rank() != first.rank() {
                op_bail!("Concat", "input {n} is {f} but input 0 is {first}; dtypes and ranks must match");
            }
            for (k, (d, e)) in dims.iter_mut().zip(&f.shape).enumerate() {
                if k == axis {
                    continue;
                }
                *d = match (&*d, e) {
                    (Dim::Known(a), Dim::Known(b)) if a != b => {
                        op_bail!("Concat", "input {n} ({f}) differs from input 0 ({first}) at axis {k}")
                    }
                    (Dim::Known(_), _) => d.clone(),
                    (_, Dim::Known(_)) => e.clone(),
                    (Dim::Sym(_), _) => d.clone(),
                    _ => e.clone(),
                };
            }
        }
        // The axis dim is the sum of the inputs' dims.
        let along: Vec<&Dim> = inputs.iter().map(|f| &f.shape[axis]).filter(|d| **d != Dim::Known(0)).collect();
        dims[axis] = match along.as_slice() {
            [] => Dim::Known(0),
            [d] => (*d).clone(),
            ds => match ds.iter().map(|d| d.as_known()).collect::<Option<Vec<_>>>() {
                Some(v) => Dim::Known(
                    v.iter()
                        .try_fold(0usize, |a, &b| a.checked_add(b))
                        .ok_or_else(|| IrError::op("Concat", "dim overflows"))?,
                ),
                None => Dim::Unknown,
            },
        };
        Ok(vec![Fact::new(first.dtype, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let Some(first) = inputs.first() else { op_bail!("Concat", "expects at least 1 input") };
        let axis = axis_of("Concat", self.axis, first.rank())?;
        let mut shape = first.shape().to_vec();
        shape[axis] = 0;
        for (n, t) in inputs.iter().enumerate() {
            let same_rest = t.rank() == first.rank()
                && t.shape().iter().zip(first.shape()).enumerate().all(|(k, (a, b))| k == axis || a == b);
            if t.dtype() != first.dtype() || !same_rest {
                op_bail!(
                    "Concat",
                    "input {n} is {}{:?} but input 0 is {}{:?}; only axis {axis} may differ",
                    t.dtype(),
                    t.shape(),
                    first.dtype(),
                    first.shape()
                );
            }
            shape[axis] += t.shape()[axis];
        }
        let numel = checked_numel(&shape, first.dtype())?;
        let outer: usize = shape[..axis].iter().product();
        let inner: usize = shape[axis + 1..].iter().product();
        let chunks: Vec<usize> = inputs.iter().map(|t| t.shape()[axis] * inner).collect();
        let out = match_data!(first.data(), v => Tensor::from_vec(shape, concat_typed(v, inputs, outer, &chunks, numel)?)?,
            block => op_bail!("Concat", "cannot move block-quantized data"));
        let q = first.quant();
        let out = if inputs.iter().all(|t| t.quant() == q) { carry_quant(out, first, Some) } else { out };
        Ok(vec![out])
    }
}

fn concat_typed<T: Element>(
    _: &[T],
    inputs: &[&Tensor],
    outer: usize,
    chunks: &[usize],
    numel: usize,
) -> IrResult<Vec<T>> {
    let parts: Vec<&[T]> = inputs
        .iter()
        .map(|t| slice_like::<T>(t).ok_or_else(|| IrError::op("Concat", "inputs must share one dtype")))
        .collect::<IrResult<_>>()?;
    let mut out = Vec::with_capacity(numel);
    for o in 0..outer {
        for (p, &c) in parts.iter().zip(chunks) {
            out.extend_from_slice(p.get(o * c..(o + 1) * c).ok_or_else(|| IrError::op("Concat", "input too short"))?);
        }
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// Slice

/// One sliced axis, as given.
struct SliceAxis {
    axis: usize,
    start: i64,
    end: i64,
    step: i64,
}

/// Pairs up starts, ends, axes (default `0..n`) and steps (default 1), validating them.
fn slice_axes(
    rank: usize,
    starts: &[i64],
    ends: &[i64],
    axes: Option<&[i64]>,
    steps: Option<&[i64]>,
) -> IrResult<Vec<SliceAxis>> {
    let n = starts.len();
    if ends.len() != n || axes.is_some_and(|a| a.len() != n) || steps.is_some_and(|s| s.len() != n) {
        op_bail!("Slice", "starts {starts:?}, ends {ends:?}, axes {axes:?} and steps {steps:?} must have one length");
    }
    let default_axes: Vec<i64> = (0..n as i64).collect();
    let axes = axes_of("Slice", axes.unwrap_or(&default_axes), rank)?;
    (0..n)
        .map(|i| {
            let step = steps.map_or(1, |s| s[i]);
            if step == 0 {
                op_bail!("Slice", "steps must not be 0, got {steps:?}");
            }
            Ok(SliceAxis { axis: axes[i], start: starts[i], end: ends[i], step })
        })
        .collect()
}

/// First index and element count of `start..end` by `step` on an axis of size `d`, with
/// ONNX's rules: negative bounds count from the end, then clamp to `[0, d]` (positive step)
/// or `[-1, d-1]` (negative step).
pub(crate) fn slice_range(d: usize, start: i64, end: i64, step: i64) -> (i128, usize) {
    let (d, step) = (d as i128, step as i128);
    let (mut s, mut e) = (start as i128, end as i128);
    if s < 0 {
        s += d;
    }
    if e < 0 {
        e += d;
    }
    let count = if step > 0 {
        s = s.clamp(0, d);
        e = e.clamp(0, d);
        if e > s {
            (e - s + step - 1) / step
        } else {
            0
        }
    } else {
        s = s.max(0).min(d - 1);
        e = e.max(-1).min(d - 1);
        if s > e {
            (s - e - step - 1) / -step
        } else {
            0
        }
    };
    (s, count as usize)
}

impl OpDef for Slice {
    fn name(&self) -> &'static str {
        "Slice"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Slice", inputs, 3, 5)?;
        let data = inputs[0];
        reject_block("Slice", data.dtype)?;
        let (n, starts) = ints_fact("Slice", "starts", inputs[1], INDEX_TYPES)?;
        let (n_ends, ends) = ints_fact("Slice", "ends", inputs[2], INDEX_TYPES)?;
        let (n_axes, axes) = match inputs.get(3) {
            Some(f) => ints_fact("Slice", "axes", f, INDEX_TYPES)?,
            None => (n, n.map(|n| (0..n as i64).collect())),
        };
        let (n_steps, steps) = match inputs.get(4) {
            Some(f) => ints_fact("Slice", "steps", f, INDEX_TYPES)?,
            None => (n, n.map(|n| vec![1; n])),
        };
        let lens: Vec<usize> = [n, n_ends, n_axes, n_steps].into_iter().flatten().collect();
        if lens.windows(2).any(|w| w[0] != w[1]) {
            op_bail!("Slice", "starts, ends, axes and steps must have one length");
        }
        let mut dims = data.shape.clone();
        match (starts, ends, axes, steps) {
            (Some(s), Some(e), Some(a), Some(st)) => {
                for sa in slice_axes(data.rank(), &s, &e, Some(&a), Some(&st))? {
                    let d = &mut dims[sa.axis];
                    *d = match d {
                        Dim::Known(k) => Dim::Known(slice_range(*k, sa.start, sa.end, sa.step).1),
                        // The whole axis, whatever its size.
                        _ if sa.start == 0 && sa.step == 1 && sa.end >= i32::MAX as i64 => d.clone(),
                        _ => Dim::Unknown,
                    };
                }
            }
            (_, _, Some(a), _) => {
                for axis in axes_of("Slice", &a, data.rank())? {
                    dims[axis] = Dim::Unknown;
                }
            }
            _ => dims = unknown_dims(data.rank()),
        }
        Ok(vec![Fact::new(data.dtype, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Slice", inputs, 3, 5)?;
        let data = inputs[0];
        let starts = ints("Slice", "starts", inputs[1], INDEX_TYPES)?;
        let ends = ints("Slice", "ends", inputs[2], INDEX_TYPES)?;
        let axes = inputs.get(3).map(|t| ints("Slice", "axes", t, INDEX_TYPES)).transpose()?;
        let steps = inputs.get(4).map(|t| ints("Slice", "steps", t, INDEX_TYPES)).transpose()?;
        let mut shape = data.shape().to_vec();
        let mut first = vec![0i128; shape.len()];
        let mut step = vec![1i128; shape.len()];
        for sa in slice_axes(data.rank(), &starts, &ends, axes.as_deref(), steps.as_deref())? {
            let (f, c) = slice_range(shape[sa.axis], sa.start, sa.end, sa.step);
            (first[sa.axis], step[sa.axis], shape[sa.axis]) = (f, sa.step as i128, c);
        }
        let st = strides_of(data.shape());
        let out = take("Slice", data, shape, None, |k, i| Some((first[k] + i as i128 * step[k]) as usize * st[k]))?;
        Ok(vec![carry_quant(out, data, |_| None)])
    }
}

// ---------------------------------------------------------------------------------------------
// Split

impl Split {
    /// Part sizes for an axis of size `dim` (`None` when they depend on an unknown dim), from
    /// `split` (the attribute or the input's values) when given.
    fn sizes(&self, split: Option<&[usize]>, dim: Option<usize>) -> IrResult<Option<Vec<usize>>> {
        let k = self.num_outputs;
        if k == 0 {
            op_bail!("Split", "num_outputs must be at least 1");
        }
        if let Some(s) = split {
            let sum = s.iter().try_fold(0usize, |a, &b| a.checked_add(b));
            if s.len() != k {
                op_bail!("Split", "split {s:?} has {} sizes for {k} outputs", s.len());
            }
            if let Some(d) = dim {
                if sum != Some(d) {
                    op_bail!("Split", "split sizes {s:?} do not add up to the dim {d}");
                }
            }
            return Ok(Some(s.to_vec()));
        }
        let Some(d) = dim else { return Ok(None) };
        let chunk = d.div_ceil(k);
        match d.checked_sub(chunk * (k - 1)) {
            Some(last) => {
                let mut s = vec![chunk; k];
                s[k - 1] = last;
                Ok(Some(s))
            }
            None => op_bail!("Split", "cannot split a dim of {d} into {k} parts of {chunk}"),
        }
    }
}

impl OpDef for Split {
    fn name(&self) -> &'static str {
        "Split"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Split", inputs, 1, 2)?;
        let f = inputs[0];
        reject_block("Split", f.dtype)?;
        let axis = axis_of("Split", self.axis, f.rank())?;
        let sizes = match inputs.get(1) {
            None => self.sizes(self.split.as_deref(), f.shape[axis].as_known())?,
            Some(s) => {
                let (n, v) = axes_input_fact("Split", "split sizes", self.split.is_some(), s)?;
                if n.is_some_and(|n| n != self.num_outputs) {
                    op_bail!("Split", "the split input has {} sizes for {} outputs", s.shape[0], self.num_outputs);
                }
                match v {
                    Some(v) => self.sizes(Some(&split_sizes(&v)?), f.shape[axis].as_known())?,
                    None => None,
                }
            }
        };
        Ok((0..self.num_outputs)
            .map(|j| {
                let mut dims = f.shape.clone();
                dims[axis] = match &sizes {
                    Some(s) => Dim::Known(s[j]),
                    None if self.num_outputs == 1 => f.shape[axis].clone(),
                    None => Dim::Unknown,
                };
                Fact::new(f.dtype, dims)
            })
            .collect())
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Split", inputs, 1, 2)?;
        let t = inputs[0];
        let axis = axis_of("Split", self.axis, t.rank())?;
        let split = match inputs.get(1) {
            None => self.split.clone(),
            Some(s) if self.split.is_none() => Some(split_sizes(&ints("Split", "split sizes", s, I64_ONLY)?)?),
            Some(_) => op_bail!("Split", "split sizes are given both as an attribute and as an input"),
        };
        let sizes = self.sizes(split.as_deref(), Some(t.shape()[axis]))?.unwrap_or_default();
        let st = strides_of(t.shape());
        let mut offset = 0;
        let mut outs = Vec::with_capacity(sizes.len());
        for s in sizes {
            let mut shape = t.shape().to_vec();
            shape[axis] = s;
            let out = take("Split", t, shape, None, |k, i| Some((i + if k == axis { offset } else { 0 }) * st[k]))?;
            outs.push(carry_quant(out, t, |_| None));
            offset += s;
        }
        Ok(outs)
    }
}

/// Split sizes from an input's values.
fn split_sizes(v: &[i64]) -> IrResult<Vec<usize>> {
    v.iter().map(|&x| to_usize("Split", "a split size", x)).collect()
}

// ---------------------------------------------------------------------------------------------
// Expand / Tile

impl OpDef for Expand {
    fn name(&self) -> &'static str {
        "Expand"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Expand", inputs, 2, 2)?;
        reject_block("Expand", inputs[0].dtype)?;
        let (len, spec) = ints_fact("Expand", "shape", inputs[1], I64_ONLY)?;
        let target = match (spec, len) {
            (Some(v), _) => {
                v.iter().map(|&d| to_usize("Expand", "a dim", d).map(Dim::Known)).collect::<IrResult<_>>()?
            }
            (None, Some(n)) => unknown_dims(n),
            (None, None) => op_bail!("Expand", "the shape input has an unknown length, so the output rank is unknown"),
        };
        let dims = broadcast_dims("Expand", &inputs[0].shape, &target)?;
        check_dims("Expand", &dims)?;
        Ok(vec![Fact::new(inputs[0].dtype, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Expand", inputs, 2, 2)?;
        let t = inputs[0];
        let spec = ints("Expand", "shape", inputs[1], I64_ONLY)?;
        let target = spec.iter().map(|&d| to_usize("Expand", "a dim", d)).collect::<IrResult<Vec<_>>>()?;
        let shape = broadcast_shapes(t.shape(), &target)?;
        // Source strides aligned to the output's trailing axes; broadcast axes read offset 0.
        let lead = shape.len() - t.rank();
        let st = strides_of(t.shape());
        let stride: Vec<usize> =
            (0..shape.len()).map(|k| if k < lead || t.shape()[k - lead] == 1 { 0 } else { st[k - lead] }).collect();
        let out = take("Expand", t, shape, None, |k, i| Some(i * stride[k]))?;
        Ok(vec![carry_quant(out, t, |_| None)])
    }
}

impl OpDef for Tile {
    fn name(&self) -> &'static str {
        "Tile"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Tile", inputs, 2, 2)?;
        let data = inputs[0];
        reject_block("Tile", data.dtype)?;
        let (len, reps) = ints_fact("Tile", "repeats", inputs[1], I64_ONLY)?;
        if len.is_some_and(|n| n != data.rank()) {
            op_bail!("Tile", "repeats has {} values for a rank-{} input", inputs[1].shape[0], data.rank());
        }
        let Some(reps) = reps else {
            return Ok(vec![Fact::new(data.dtype, unknown_dims(data.rank()))]);
        };
        let dims = data
            .shape
            .iter()
            .zip(&reps)
            .map(|(d, &r)| {
                Ok(match (d, to_usize("Tile", "repeats", r)?) {
                    (_, 0) => Dim::Known(0),
                    (d, 1) => d.clone(),
                    (Dim::Known(n), r) => {
                        Dim::Known(n.checked_mul(r).ok_or_else(|| IrError::op("Tile", "output dim overflows"))?)
                    }
                    _ => Dim::Unknown,
                })
            })
            .collect::<IrResult<Vec<_>>>()?;
        check_dims("Tile", &dims)?;
        Ok(vec![Fact::new(data.dtype, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Tile", inputs, 2, 2)?;
        let t = inputs[0];
        let reps = ints("Tile", "repeats", inputs[1], I64_ONLY)?;
        if reps.len() != t.rank() {
            op_bail!("Tile", "repeats has {} values for a rank-{} input", reps.len(), t.rank());
        }
        let shape = t
            .shape()
            .iter()
            .zip(&reps)
            .map(|(&d, &r)| {
                d.checked_mul(to_usize("Tile", "repeats", r)?)
                    .ok_or_else(|| IrError::op("Tile", "output dim overflows"))
            })
            .collect::<IrResult<Vec<_>>>()?;
        let st = strides_of(t.shape());
        // Only called for non-empty outputs, where every input dim is non-zero.
        let out = take("Tile", t, shape, None, |k, i| Some((i % t.shape()[k]) * st[k]))?;
        Ok(vec![carry_quant(out, t, |_| None)])
    }
}

// ---------------------------------------------------------------------------------------------
// Gather

impl OpDef for Gather {
    fn name(&self) -> &'static str {
        "Gather"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Gather", inputs, 2, 2)?;
        let (data, idx) = (inputs[0], inputs[1]);
        reject_block("Gather", data.dtype)?;
        if !INDEX_TYPES.contains(&idx.dtype) {
            op_bail!("Gather", "indices must be {}, got {}", dtype_list(INDEX_TYPES), idx.dtype);
        }
        let axis = axis_of("Gather", self.axis, data.rank())?;
        if let (Some(t), Some(d)) = (&idx.konst, data.shape[axis].as_known()) {
            norm_indices(&t.to_i64_vec()?, d, axis)?;
        }
        let mut dims = data.shape[..axis].to_vec();
        dims.extend(idx.shape.iter().cloned());
        dims.extend(data.shape[axis + 1..].iter().cloned());
        Ok(vec![Fact::new(data.dtype, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Gather", inputs, 2, 2)?;
        let (data, indices) = (inputs[0], inputs[1]);
        if !INDEX_TYPES.contains(&indices.dtype()) {
            op_bail!("Gather", "indices must be {}, got {}", dtype_list(INDEX_TYPES), indices.dtype());
        }
        let axis = axis_of("Gather", self.axis, data.rank())?;
        let s = data.shape();
        let d = s[axis];
        let idx = norm_indices(&indices.to_i64_vec()?, d, axis)?;
        let mut shape = s[..axis].to_vec();
        shape.extend_from_slice(indices.shape());
        shape.extend_from_slice(&s[axis + 1..]);
        // Viewed as [outer, indices, inner], the gather is one index-mapping.
        let outer: usize = s[..axis].iter().product();
        let inner: usize = s[axis + 1..].iter().product();
        let view = vec![outer, idx.len(), inner];
        let out = take("Gather", data, view, None, |k, i| {
            Some(match k {
                0 => i * d * inner,
                1 => idx[i] * inner,
                _ => i,
            })
        })?;
        Ok(vec![carry_quant(out.into_shape(shape)?, data, |_| None)])
    }
}

/// Resolves negative indices against a dim of size `d`, rejecting those out of range.
fn norm_indices(idx: &[i64], d: usize, axis: usize) -> IrResult<Vec<usize>> {
    idx.iter()
        .map(|&i| {
            let j = if i < 0 { i as i128 + d as i128 } else { i as i128 };
            if j < 0 || j >= d as i128 {
                op_bail!("Gather", "index {i} is out of range for axis {axis} of size {d}");
            }
            Ok(j as usize)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// ConstantOfShape / Range

impl ConstantOfShape {
    fn check_value(&self) -> IrResult<()> {
        reject_block("ConstantOfShape", self.value.dtype())?;
        if self.value.len() != 1 {
            op_bail!("ConstantOfShape", "value must hold one element, got shape {:?}", self.value.shape());
        }
        Ok(())
    }
}

impl OpDef for ConstantOfShape {
    fn name(&self) -> &'static str {
        "ConstantOfShape"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("ConstantOfShape", inputs, 1, 1)?;
        self.check_value()?;
        let (len, spec) = ints_fact("ConstantOfShape", "shape", inputs[0], I64_ONLY)?;
        let dims = match (spec, len) {
            (Some(v), _) => {
                v.iter().map(|&d| to_usize("ConstantOfShape", "a dim", d).map(Dim::Known)).collect::<IrResult<_>>()?
            }
            (None, Some(n)) => unknown_dims(n),
            (None, None) => {
                op_bail!("ConstantOfShape", "the shape input has an unknown length, so the output rank is unknown")
            }
        };
        check_dims("ConstantOfShape", &dims)?;
        Ok(vec![Fact::new(self.value.dtype(), dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("ConstantOfShape", inputs, 1, 1)?;
        self.check_value()?;
        let spec = ints("ConstantOfShape", "shape", inputs[0], I64_ONLY)?;
        let shape = spec.iter().map(|&d| to_usize("ConstantOfShape", "a dim", d)).collect::<IrResult<Vec<_>>>()?;
        let n = checked_numel(&shape, self.value.dtype())?;
        let out = match_data!(self.value.data(), v => match v.first() {
            Some(&x) => Tensor::from_vec(shape, vec![x; n])?,
            None => op_bail!("ConstantOfShape", "value is empty"),
        }, block => op_bail!("ConstantOfShape", "value must not be block-quantized"));
        Ok(vec![out])
    }
}

fn first_f64(t: &Tensor) -> IrResult<f64> {
    t.to_f64_vec().first().copied().ok_or_else(|| IrError::op("Range", "empty scalar"))
}

fn first_i64(t: &Tensor) -> IrResult<i64> {
    t.to_i64_vec()?.first().copied().ok_or_else(|| IrError::op("Range", "empty scalar"))
}

fn range_dtype_ok(d: DType) -> bool {
    d.is_float() || matches!(d, DType::I8 | DType::I16 | DType::I32 | DType::I64)
}

/// Element count of `Range(start, limit, delta)`: `max(ceil((limit - start) / delta), 0)`,
/// checked against the memory limit before anything is allocated.
fn range_count(dtype: DType, start: &Tensor, limit: &Tensor, delta: &Tensor) -> IrResult<usize> {
    let n: i128 = if dtype.is_float() {
        let (s, l, d) = (first_f64(start)?, first_f64(limit)?, first_f64(delta)?);
        if d == 0.0 {
            op_bail!("Range", "delta must not be 0");
        }
        let n = ((l - s) / d).ceil();
        if !n.is_finite() {
            op_bail!("Range", "start {s}, limit {l} and delta {d} give no finite count");
        }
        if n > 1e30 {
            op_bail!("Range", "start {s}, limit {l} and delta {d} give {n} elements");
        }
        n as i128
    } else {
        let (s, l, d) = (first_i64(start)? as i128, first_i64(limit)? as i128, first_i64(delta)? as i128);
        if d == 0 {
            op_bail!("Range", "delta must not be 0");
        }
        let (q, r) = ((l - s) / d, (l - s) % d);
        if r != 0 && (r > 0) == (d > 0) {
            q + 1
        } else {
            q
        }
    };
    let n = usize::try_from(n.max(0)).map_err(|_| IrError::op("Range", format!("{n} elements are too many")))?;
    checked_numel(&[n], dtype)?;
    Ok(n)
}

fn range_check(dtypes: &[DType], shapes: &[Vec<Dim>]) -> IrResult<DType> {
    let dt = dtypes[0];
    if dtypes.iter().any(|&d| d != dt) {
        op_bail!("Range", "start, limit and delta must share one dtype, got {}", dtype_list(dtypes));
    }
    if !range_dtype_ok(dt) {
        op_bail!("Range", "dtype {dt} is not supported (floats and signed integers are)");
    }
    for (what, s) in ["start", "limit", "delta"].iter().zip(shapes) {
        if !(s.is_empty() || s.as_slice() == [Dim::Known(1)]) {
            op_bail!("Range", "{what} must be a scalar, got shape {}", show_dims(s));
        }
    }
    Ok(dt)
}

impl OpDef for Range {
    fn name(&self) -> &'static str {
        "Range"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Range", inputs, 3, 3)?;
        let dtypes: Vec<DType> = inputs.iter().map(|f| f.dtype).collect();
        let shapes: Vec<Vec<Dim>> = inputs.iter().map(|f| f.shape.clone()).collect();
        let dt = range_check(&dtypes, &shapes)?;
        let dim = match (&inputs[0].konst, &inputs[1].konst, &inputs[2].konst) {
            (Some(s), Some(l), Some(d)) => Dim::Known(range_count(dt, s, l, d)?),
            _ => Dim::Unknown,
        };
        Ok(vec![Fact::new(dt, vec![dim])])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Range", inputs, 3, 3)?;
        let dtypes: Vec<DType> = inputs.iter().map(|t| t.dtype()).collect();
        let shapes: Vec<Vec<Dim>> = inputs.iter().map(|t| known(t.shape())).collect();
        let dt = range_check(&dtypes, &shapes)?;
        let n = range_count(dt, inputs[0], inputs[1], inputs[2])?;
        let out = if dt.is_float() {
            let (s, d) = (first_f64(inputs[0])?, first_f64(inputs[2])?);
            let v: Vec<f64> = (0..n).map(|i| s + i as f64 * d).collect();
            Tensor::from_f64s(dt, vec![n], &v)?
        } else {
            let (s, d) = (first_i64(inputs[0])? as i128, first_i64(inputs[2])? as i128);
            // Values stay between start and limit, so they fit the dtype.
            let v: Vec<i64> = (0..n).map(|i| (s + i as i128 * d) as i64).collect();
            Tensor::from_i64s(dt, vec![n], &v)?
        };
        Ok(vec![out])
    }
}

// ---------------------------------------------------------------------------------------------
// Pad

/// Resolves the padded axes (all of them when `axes` is absent).
fn pad_axes(axes: Option<&[i64]>, rank: usize) -> IrResult<Vec<usize>> {
    match axes {
        Some(a) => axes_of("Pad", a, rank),
        None => Ok((0..rank).collect()),
    }
}

/// Output size of a padded axis.
fn pad_dim(d: usize, begin: i64, end: i64) -> IrResult<usize> {
    let n = d as i128 + begin as i128 + end as i128;
    usize::try_from(n).map_err(|_| IrError::op("Pad", format!("pads {begin}, {end} on a dim of {d} give size {n}")))
}

/// Reflects `i` into `0..d` without repeating the edge (numpy's `reflect`), for `d >= 1`.
fn reflect(i: i128, d: i128) -> i128 {
    if d == 1 {
        return 0;
    }
    let period = 2 * (d - 1);
    let m = i.rem_euclid(period);
    if m >= d {
        period - m
    } else {
        m
    }
}

impl OpDef for Pad {
    fn name(&self) -> &'static str {
        "Pad"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Pad", inputs, 2, 4)?;
        let data = inputs[0];
        reject_block("Pad", data.dtype)?;
        let rank = data.rank();
        let (plen, pads) = ints_fact("Pad", "pads", inputs[1], I64_ONLY)?;
        if let Some(c) = inputs.get(2) {
            if c.dtype != data.dtype || c.rank() > 1 || c.shape.iter().any(|d| d.as_known().is_some_and(|n| n > 1)) {
                op_bail!("Pad", "constant_value must be one {} value, got {c}", data.dtype);
            }
        }
        let (nlen, axes) = match inputs.get(3) {
            None => (Some(rank), Some(pad_axes(None, rank)?)),
            Some(f) => {
                let (n, v) = ints_fact("Pad", "axes", f, INDEX_TYPES)?;
                (n, v.map(|v| pad_axes(Some(&v), rank)).transpose()?)
            }
        };
        if let (Some(p), Some(n)) = (plen, nlen) {
            if p != 2 * n {
                op_bail!("Pad", "pads has {p} values for {n} axes; expected {}", 2 * n);
            }
        }
        let mut dims = data.shape.clone();
        match (pads, axes) {
            (Some(p), Some(axes)) => {
                let n = axes.len();
                for (j, &a) in axes.iter().enumerate() {
                    let (b, e) = (p[j], p[j + n]);
                    dims[a] = match &dims[a] {
                        Dim::Known(d) => Dim::Known(pad_dim(*d, b, e)?),
                        d if b == 0 && e == 0 => d.clone(),
                        _ => Dim::Unknown,
                    };
                }
            }
            (None, Some(axes)) => axes.iter().for_each(|&a| dims[a] = Dim::Unknown),
            (_, None) => dims = unknown_dims(rank),
        }
        check_dims("Pad", &dims)?;
        Ok(vec![Fact::new(data.dtype, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Pad", inputs, 2, 4)?;
        let data = inputs[0];
        let rank = data.rank();
        let pads = ints("Pad", "pads", inputs[1], I64_ONLY)?;
        // An empty constant_value is ONNX's "not given".
        let fill = match inputs.get(2) {
            Some(c) if c.dtype() != data.dtype() || c.len() > 1 => {
                op_bail!("Pad", "constant_value must be one {} value, got {}{:?}", data.dtype(), c.dtype(), c.shape())
            }
            Some(c) if c.len() == 1 => Some(*c),
            _ => None,
        };
        let axes = inputs.get(3).map(|t| ints("Pad", "axes", t, INDEX_TYPES)).transpose()?;
        let axes = pad_axes(axes.as_deref(), rank)?;
        let n = axes.len();
        if pads.len() != 2 * n {
            op_bail!("Pad", "pads has {} values for {n} axes; expected {}", pads.len(), 2 * n);
        }
        // Negative pads crop first; the rest pads around the cropped range `lo..lo + len`, as
        // ONNX Runtime does (it matters for wrap and for reflections longer than the data).
        let mut shape = data.shape().to_vec();
        let mut lo = vec![0i128; rank];
        let mut len: Vec<i128> = shape.iter().map(|&d| d as i128).collect();
        let mut before = vec![0i128; rank];
        for (j, &a) in axes.iter().enumerate() {
            let (b, e) = (pads[j] as i128, pads[j + n] as i128);
            shape[a] = pad_dim(shape[a], pads[j], pads[j + n])?;
            lo[a] = (-b).max(0);
            len[a] = len[a] - (-b).max(0) - (-e).max(0);
            before[a] = b.max(0);
            if len[a] <= 0 && shape[a] > 0 && self.mode != PadMode::Constant {
                op_bail!("Pad", "cannot pad an empty axis {a} in {:?} mode", self.mode);
            }
        }
        let st = strides_of(data.shape());
        let mode = self.mode;
        let out = take("Pad", data, shape, fill.filter(|_| mode == PadMode::Constant), |k, i| {
            let d = len[k];
            let s = i as i128 - before[k];
            let s = if (0..d).contains(&s) {
                s
            } else {
                match mode {
                    PadMode::Constant => return None,
                    PadMode::Edge => s.clamp(0, d - 1),
                    PadMode::Reflect => reflect(s, d),
                    PadMode::Wrap => s.rem_euclid(d),
                }
            };
            Some((lo[k] + s) as usize * st[k])
        })?;
        Ok(vec![carry_quant(out, data, |_| None)])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Graph;

    fn ti(shape: &[usize], v: &[i64]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn tf(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn iota(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        Tensor::from_vec(shape.to_vec(), (0..n).map(|i| i as f32).collect::<Vec<_>>()).unwrap()
    }

    fn c(t: Tensor) -> Fact {
        Fact::from_tensor(Arc::new(t))
    }

    fn dims(spec: &str) -> Vec<Dim> {
        spec.split(',')
            .filter(|s| !s.is_empty())
            .map(|s| match s.parse::<usize>() {
                Ok(n) => Dim::Known(n),
                Err(_) if s == "?" => Dim::Unknown,
                Err(_) => Dim::sym(s),
            })
            .collect()
    }

    fn fact(dt: DType, spec: &str) -> Fact {
        Fact::new(dt, dims(spec))
    }

    fn run(op: &dyn OpDef, inputs: &[&Tensor]) -> Vec<Tensor> {
        op.eval(inputs).unwrap()
    }

    fn run1(op: &dyn OpDef, inputs: &[&Tensor]) -> Tensor {
        run(op, inputs).remove(0)
    }

    fn facts1(op: &dyn OpDef, inputs: &[&Fact]) -> Fact {
        op.output_facts(inputs).unwrap().remove(0)
    }

    fn err(r: IrResult<impl std::fmt::Debug>, needle: &str) {
        match r {
            Err(e) => assert!(e.to_string().contains(needle), "error '{e}' lacks '{needle}'"),
            Ok(v) => panic!("expected an error containing '{needle}', got {v:?}"),
        }
    }

    fn f32s(t: &Tensor) -> Vec<f32> {
        t.as_slice::<f32>().unwrap().to_vec()
    }

    fn i64s(t: &Tensor) -> Vec<i64> {
        t.to_i64_vec().unwrap()
    }

    #[test]
    fn shape_slices_and_folds() {
        let x = fact(DType::F32, "2,3,4");
        let f = facts1(&Shape { start: 0, end: None }, &[&x]);
        assert_eq!(f.shape, dims("3"));
        assert_eq!(i64s(f.konst.as_ref().unwrap()), vec![2, 3, 4]);
        let f = facts1(&Shape { start: -2, end: Some(100) }, &[&x]);
        assert_eq!(i64s(f.konst.as_ref().unwrap()), vec![3, 4]);
        let f = facts1(&Shape { start: 2, end: Some(1) }, &[&x]);
        assert_eq!(f.shape, dims("0"));
        let f = facts1(&Shape { start: -100, end: Some(-1) }, &[&x]);
        assert_eq!(i64s(f.konst.as_ref().unwrap()), vec![2, 3]);
        // Symbolic: the length is known, the value is not.
        let f = facts1(&Shape { start: 0, end: None }, &[&fact(DType::F32, "batch,3")]);
        assert_eq!((f.shape, f.konst), (dims("2"), None));
        // A known slice of a partly symbolic shape is still a constant.
        let f = facts1(&Shape { start: 1, end: None }, &[&fact(DType::F32, "batch,3")]);
        assert_eq!(i64s(f.konst.as_ref().unwrap()), vec![3]);

        let out = run1(&Shape { start: 1, end: None }, &[&iota(&[2, 3, 4])]);
        assert_eq!((out.dtype(), out.shape(), i64s(&out)), (DType::I64, &[2usize][..], vec![3, 4]));
        assert_eq!(run1(&Shape { start: 0, end: None }, &[&Tensor::scalar(1f32)]).shape(), &[0]);
        err(Shape { start: 0, end: None }.output_facts(&[]), "expects 1 inputs");
    }

    #[test]
    fn reshape_facts() {
        let r = Reshape { allowzero: false };
        let shape = |v: &[i64]| c(ti(&[v.len()], v));
        let x = fact(DType::F32, "batch,seq,384");
        assert_eq!(facts1(&r, &[&x, &shape(&[0, 0, 12, 32])]).shape, dims("batch,seq,12,32"));
        assert_eq!(
            facts1(&r, &[&fact(DType::F32, "batch,seq,12,32"), &shape(&[0, 0, -1])]).shape,
            dims("batch,seq,384")
        );
        // -1 absorbing a symbol that the known dims cancel.
        assert_eq!(facts1(&r, &[&fact(DType::F32, "batch,12,32"), &shape(&[-1, 384])]).shape, dims("batch,384"));
        assert_eq!(facts1(&r, &[&fact(DType::F32, "batch,6"), &shape(&[-1, 3])]).shape, dims("?,3"));
        assert_eq!(facts1(&r, &[&fact(DType::F32, "2,3,4"), &shape(&[-1, 4])]).shape, dims("6,4"));
        assert_eq!(facts1(&r, &[&fact(DType::F32, "2,?"), &shape(&[0, -1])]).shape, dims("2,?"));
        let r0 = Reshape { allowzero: true };
        assert_eq!(facts1(&r0, &[&fact(DType::F32, "0,3"), &shape(&[3, 0])]).shape, dims("3,0"));
        // Non-constant shape of known length: rank known, dims not.
        assert_eq!(facts1(&r, &[&x, &fact(DType::I64, "2")]).shape, dims("?,?"));

        err(r.output_facts(&[&x, &fact(DType::I64, "?")]), "unknown length");
        err(r.output_facts(&[&x, &shape(&[-1, -1])]), "more than one -1");
        err(r.output_facts(&[&x, &shape(&[-2, 4])]), "invalid dim -2");
        err(r.output_facts(&[&fact(DType::F32, "2,3"), &shape(&[4])]), "element counts differ");
        err(r.output_facts(&[&fact(DType::F32, "2,3"), &shape(&[-1, 4])]), "element counts differ");
        err(r.output_facts(&[&fact(DType::F32, "batch,6"), &shape(&[0, 4])]), "element counts differ");
        err(r.output_facts(&[&fact(DType::F32, "6"), &shape(&[0, 0])]), "copies dim 1");
        err(r0.output_facts(&[&fact(DType::F32, "6"), &shape(&[0, -1])]), "both 0 and -1");
        err(r.output_facts(&[&x, &c(Tensor::from_vec(vec![1], vec![1i32]).unwrap())]), "must be i64");
        err(r.output_facts(&[&x, &c(ti(&[], &[1]))]), "must be 1-d");
        err(r.output_facts(&[&fact(DType::F32, "?"), &shape(&[1 << 40, 1 << 40])]), "overflows");
    }

    #[test]
    fn reshape_eval() {
        let r = Reshape { allowzero: false };
        let x = iota(&[2, 3]);
        let out = run1(&r, &[&x, &ti(&[2], &[3, -1])]);
        assert_eq!((out.shape(), f32s(&out)), (&[3usize, 2][..], f32s(&x)));
        assert_eq!(run1(&r, &[&x, &ti(&[3], &[0, 1, 3])]).shape(), &[2, 1, 3]);
        let empty = tf(&[0, 3], &[]);
        assert_eq!(run1(&Reshape { allowzero: true }, &[&empty, &ti(&[2], &[3, 0])]).shape(), &[3, 0]);
        assert_eq!(run1(&r, &[&empty, &ti(&[2], &[-1, 3])]).shape(), &[0, 3]);
        err(r.eval(&[&empty, &ti(&[2], &[0, -1])]), "multiply to 0");
        err(r.eval(&[&x, &ti(&[2], &[1 << 62, 1 << 62])]), "overflows");
        err(r.eval(&[&x, &ti(&[1], &[5])]), "element counts differ");
        err(r.eval(&[&x]), "expects 2 inputs");
    }

    #[test]
    fn transpose() {
        let t = Transpose { perm: Some(vec![2, 0, 1]) };
        assert_eq!(facts1(&t, &[&fact(DType::F32, "b,3,4")]).shape, dims("4,b,3"));
        let x = iota(&[2, 3, 4]);
        let out = run1(&t, &[&x]);
        assert_eq!(out.shape(), &[4, 2, 3]);
        // out[k][i][j] = x[i][j][k] = 12i + 4j + k
        assert_eq!(f32s(&out)[..7], [0.0, 4.0, 8.0, 12.0, 16.0, 20.0, 1.0]);
        let rev = run1(&Transpose { perm: None }, &[&iota(&[2, 3])]);
        assert_eq!((rev.shape(), f32s(&rev)), (&[3usize, 2][..], vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]));
        assert_eq!(run1(&Transpose { perm: None }, &[&Tensor::scalar(7i8)]).as_slice::<i8>().unwrap(), &[7]);
        assert_eq!(run1(&Transpose { perm: None }, &[&tf(&[0, 5], &[])]).shape(), &[5, 0]);
        err(Transpose { perm: Some(vec![0, 0]) }.output_facts(&[&fact(DType::F32, "2,3")]), "not a permutation");
        err(Transpose { perm: Some(vec![0]) }.eval(&[&iota(&[2, 3])]), "not a permutation");
        err(Transpose { perm: Some(vec![1, 0, 2]) }.eval(&[&iota(&[2, 3])]), "not a permutation");
        err(Transpose { perm: Some(vec![0, 2]) }.eval(&[&iota(&[2, 3])]), "not a permutation");
    }

    #[test]
    fn data_movement_is_dtype_generic() {
        for dt in DType::PLAIN {
            let x = Tensor::from_f64s(dt, vec![2, 3], &[0.0, 1.0, 0.0, 1.0, 1.0, 0.0]).unwrap();
            let out = run1(&Transpose { perm: None }, &[&x]);
            assert_eq!((out.dtype(), out.to_f64_vec()), (dt, vec![0.0, 1.0, 1.0, 1.0, 0.0, 0.0]), "{dt}");
            let g = run1(&Gather { axis: 1 }, &[&x, &ti(&[2], &[-1, 0])]);
            assert_eq!(g.to_f64_vec(), vec![0.0, 0.0, 0.0, 1.0], "{dt}");
            let fill = Tensor::from_f64s(dt, vec![], &[1.0]).unwrap();
            let p = run1(&Pad { mode: PadMode::Constant }, &[&x, &ti(&[4], &[0, 1, 0, 0]), &fill]);
            assert_eq!(p.to_f64_vec(), vec![1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0], "{dt}");
            let cat = run1(&Concat { axis: 0 }, &[&x, &x]);
            assert_eq!(cat.shape(), &[4, 3], "{dt}");
            let cs = ConstantOfShape { value: Arc::new(fill.clone()) };
            assert_eq!(run1(&cs, &[&ti(&[1], &[2])]).to_f64_vec(), vec![1.0, 1.0], "{dt}");
        }
    }

    #[test]
    fn quantization_follows_the_data() {
        let q = QuantParams::per_channel(vec![0.5, 0.25], vec![0, 1], 0);
        let x = Tensor::from_vec(vec![2, 3], vec![1i8, 2, 3, 4, 5, 6]).unwrap().with_quant(Some(q));
        let out = run1(&Transpose { perm: None }, &[&x]);
        assert_eq!(out.quant().unwrap().axis, Some(1));
        let out = run1(&Unsqueeze { axes: vec![0] }, &[&x]);
        assert_eq!(out.quant().unwrap().axis, Some(1));
        // A reshape scrambles channels, so per-channel parameters cannot follow.
        assert!(run1(&Reshape { allowzero: false }, &[&x, &ti(&[1], &[6])]).quant().is_none());
        let p = x.clone().with_quant(Some(QuantParams::per_tensor(0.5, 3)));
        assert_eq!(run1(&Reshape { allowzero: false }, &[&p, &ti(&[1], &[6])]).quant(), p.quant());
    }

    #[test]
    fn unsqueeze_squeeze_flatten() {
        let u = Unsqueeze { axes: vec![0, -1] };
        assert_eq!(facts1(&u, &[&fact(DType::F32, "b,3")]).shape, dims("1,b,3,1"));
        assert_eq!(run1(&u, &[&iota(&[3])]).shape(), &[1, 3, 1]);
        assert_eq!(run1(&Unsqueeze { axes: vec![0] }, &[&Tensor::scalar(1i64)]).shape(), &[1]);
        err(Unsqueeze { axes: vec![1, -2] }.output_facts(&[&fact(DType::F32, "3")]), "repeated");
        err(Unsqueeze { axes: vec![3] }.eval(&[&iota(&[3])]), "out of range");

        let s = Squeeze { axes: Some(vec![0, -1]) };
        assert_eq!(facts1(&s, &[&fact(DType::F32, "1,b,?")]).shape, dims("b"));
        assert_eq!(facts1(&Squeeze { axes: None }, &[&fact(DType::F32, "1,3,1,2")]).shape, dims("3,2"));
        assert_eq!(run1(&s, &[&iota(&[1, 3, 1])]).shape(), &[3]);
        assert_eq!(run1(&Squeeze { axes: None }, &[&iota(&[1, 1])]).shape(), &[0usize; 0]);
        err(s.output_facts(&[&fact(DType::F32, "2,3,1")]), "axis 0 of size 2");
        err(s.eval(&[&iota(&[1, 3, 2])]), "axis 2 of size 2");
        err(Squeeze { axes: None }.output_facts(&[&fact(DType::F32, "1,batch")]), "give axes");
        err(Squeeze { axes: Some(vec![0, 0]) }.output_facts(&[&fact(DType::F32, "1,2")]), "repeated");

        let f = |axis| Flatten { axis };
        let x = fact(DType::F32, "2,3,4");
        assert_eq!(facts1(&f(1), &[&x]).shape, dims("2,12"));
        assert_eq!(facts1(&f(0), &[&x]).shape, dims("1,24"));
        assert_eq!(facts1(&f(3), &[&x]).shape, dims("24,1"));
        assert_eq!(facts1(&f(-1), &[&x]).shape, dims("6,4"));
        assert_eq!(facts1(&f(1), &[&fact(DType::F32, "batch,3,4")]).shape, dims("batch,12"));
        assert_eq!(facts1(&f(2), &[&fact(DType::F32, "batch,3,4")]).shape, dims("?,4"));
        assert_eq!(facts1(&f(1), &[&fact(DType::F32, "batch,0,4")]).shape, dims("batch,0"));
        let out = run1(&f(2), &[&iota(&[2, 3, 4])]);
        assert_eq!((out.shape(), f32s(&out)[5]), (&[6usize, 4][..], 5.0));
        err(f(4).output_facts(&[&x]), "out of range");
        err(f(-4).eval(&[&iota(&[2, 3, 4])]), "out of range");
    }

    #[test]
    fn axes_as_inputs() {
        let v = |v: &[i64]| ti(&[v.len()], v);
        let dynamic = |n: &str| Fact::new(DType::I64, dims(n));
        // Unsqueeze: constant axes act as the attribute; run-time ones give unknown dims.
        let u = Unsqueeze { axes: vec![] };
        assert_eq!(facts1(&u, &[&fact(DType::F32, "b,3"), &c(v(&[0, -1]))]).shape, dims("1,b,3,1"));
        assert_eq!(facts1(&u, &[&fact(DType::F32, "b,3"), &dynamic("2")]).shape, dims("?,?,?,?"));
        assert_eq!(run1(&u, &[&iota(&[3]), &v(&[1])]).shape(), &[3, 1]);
        err(u.output_facts(&[&fact(DType::F32, "3"), &dynamic("?")]), "unknown length");
        err(Unsqueeze { axes: vec![0] }.output_facts(&[&fact(DType::F32, "3"), &dynamic("1")]), "both");
        err(Unsqueeze { axes: vec![0] }.eval(&[&iota(&[3]), &v(&[0])]), "both");
        err(u.output_facts(&[&fact(DType::F32, "3"), &fact(DType::I32, "1")]), "i64");
        err(u.eval(&[&iota(&[3]), &v(&[2])]), "out of range");

        // Squeeze: an empty axes input means every size-1 dim.
        let s = Squeeze { axes: None };
        assert_eq!(facts1(&s, &[&fact(DType::F32, "1,b,1"), &c(v(&[-1]))]).shape, dims("1,b"));
        assert_eq!(facts1(&s, &[&fact(DType::F32, "1,b,1"), &dynamic("2")]).shape, dims("?"));
        assert_eq!(facts1(&s, &[&fact(DType::F32, "1,3,1"), &dynamic("0")]).shape, dims("3"));
        assert_eq!(run1(&s, &[&iota(&[1, 3, 1]), &v(&[0])]).shape(), &[3, 1]);
        assert_eq!(run1(&s, &[&iota(&[1, 3, 1]), &v(&[])]).shape(), &[3]);
        err(s.output_facts(&[&fact(DType::F32, "1"), &dynamic("2")]), "rank-1");
        err(s.output_facts(&[&fact(DType::F32, "1"), &dynamic("?")]), "unknown length");
        err(Squeeze { axes: Some(vec![0]) }.output_facts(&[&fact(DType::F32, "1"), &dynamic("1")]), "both");
        err(s.eval(&[&iota(&[2, 3]), &v(&[0])]), "size 2");

        // Split: sizes as an input.
        let sp = Split { axis: 1, split: None, num_outputs: 2 };
        let f = sp.output_facts(&[&fact(DType::F32, "b,5"), &c(v(&[2, 3]))]).unwrap();
        assert_eq!((f[0].shape.clone(), f[1].shape.clone()), (dims("b,2"), dims("b,3")));
        let f = sp.output_facts(&[&fact(DType::F32, "b,5"), &dynamic("2")]).unwrap();
        assert_eq!((f[0].shape.clone(), f[1].shape.clone()), (dims("b,?"), dims("b,?")));
        let parts = sp.eval(&[&iota(&[1, 5]), &v(&[4, 1])]).unwrap();
        assert_eq!((f32s(&parts[0]), f32s(&parts[1])), (vec![0.0, 1.0, 2.0, 3.0], vec![4.0]));
        err(sp.output_facts(&[&fact(DType::F32, "b,5"), &dynamic("3")]), "3 sizes for 2 outputs");
        err(sp.output_facts(&[&fact(DType::F32, "b,5"), &c(v(&[2, 2]))]), "add up");
        err(sp.eval(&[&iota(&[1, 5]), &v(&[6, -1])]), "negative");
        let both = Split { axis: 1, split: Some(vec![2, 3]), num_outputs: 2 };
        err(both.eval(&[&iota(&[1, 5]), &v(&[2, 3])]), "both");
    }

    #[test]
    fn concat() {
        let cat = |axis| Concat { axis };
        let f = facts1(&cat(0), &[&fact(DType::F32, "2,b"), &fact(DType::F32, "3,?"), &fact(DType::F32, "0,4")]);
        assert_eq!(f.shape, dims("5,4"));
        assert_eq!(facts1(&cat(-1), &[&fact(DType::F32, "b,2"), &fact(DType::F32, "b,s")]).shape, dims("b,?"));
        assert_eq!(facts1(&cat(1), &[&fact(DType::F32, "b,0"), &fact(DType::F32, "b,s")]).shape, dims("b,s"));
        let a = tf(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let b = tf(&[2, 1], &[5.0, 6.0]);
        let e = tf(&[2, 0], &[]);
        let out = run1(&cat(1), &[&a, &e, &b]);
        assert_eq!((out.shape(), f32s(&out)), (&[2usize, 3][..], vec![1.0, 2.0, 5.0, 3.0, 4.0, 6.0]));
        let out = run1(&cat(0), &[&a, &b.clone().into_shape(vec![1, 2]).unwrap()]);
        assert_eq!(f32s(&out), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        err(cat(0).output_facts(&[&fact(DType::F32, "2,3"), &fact(DType::F32, "2,4")]), "differs");
        err(cat(0).output_facts(&[&fact(DType::F32, "2,3"), &fact(DType::I64, "2,3")]), "must match");
        err(cat(0).output_facts(&[&fact(DType::F32, "2,3"), &fact(DType::F32, "6")]), "must match");
        err(cat(0).output_facts(&[&fact(DType::F32, "")]), "out of range");
        err(cat(2).output_facts(&[&fact(DType::F32, "2,3")]), "out of range");
        err(cat(0).output_facts(&[]), "at least 1");
        err(cat(0).eval(&[&a, &b]), "only axis 0 may differ");
        err(cat(0).eval(&[&a, &ti(&[1, 2], &[1, 2])]), "only axis 0 may differ");
    }

    #[test]
    fn slice_eval() {
        let x = tf(&[2, 4], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]);
        let v = |v: &[i64]| ti(&[v.len()], v);
        let out = run1(&Slice, &[&x, &v(&[0, 1]), &v(&[-1, 1000])]);
        assert_eq!((out.shape(), f32s(&out)), (&[1usize, 3][..], vec![2.0, 3.0, 4.0]));
        // Reversal with INT_MIN as end, on axis -1.
        let out = run1(&Slice, &[&x, &v(&[-1]), &v(&[i64::MIN]), &v(&[-1]), &v(&[-1])]);
        assert_eq!(f32s(&out), vec![4.0, 3.0, 2.0, 1.0, 8.0, 7.0, 6.0, 5.0]);
        let out = run1(&Slice, &[&x, &v(&[i64::MAX]), &v(&[0]), &v(&[1]), &v(&[-2])]);
        assert_eq!(f32s(&out), vec![4.0, 2.0, 8.0, 6.0]);
        let out = run1(&Slice, &[&x, &v(&[1]), &v(&[i64::MAX]), &v(&[1]), &v(&[2])]);
        assert_eq!(f32s(&out), vec![2.0, 4.0, 6.0, 8.0]);
        let out = run1(&Slice, &[&x, &v(&[3]), &v(&[1]), &v(&[1])]);
        assert_eq!(out.shape(), &[2, 0]);
        let i32s = |v: i32| Tensor::from_vec(vec![1], vec![v]).unwrap();
        assert_eq!(run1(&Slice, &[&x, &i32s(1), &i32s(i32::MAX)]).shape(), &[1, 4]);
        assert_eq!(run1(&Slice, &[&tf(&[0], &[]), &v(&[-1]), &v(&[-10]), &v(&[0]), &v(&[-1])]).shape(), &[0]);

        err(Slice.eval(&[&x, &v(&[0]), &v(&[1]), &v(&[0]), &v(&[0])]), "steps must not be 0");
        err(Slice.eval(&[&x, &v(&[0, 0]), &v(&[1, 1]), &v(&[0, -2])]), "repeated");
        err(Slice.eval(&[&x, &v(&[0, 0]), &v(&[1])]), "one length");
        err(Slice.eval(&[&x, &v(&[0]), &v(&[1]), &v(&[2])]), "out of range");
        err(Slice.eval(&[&x, &v(&[0, 0, 0]), &v(&[1, 1, 1])]), "out of range");
        err(Slice.eval(&[&x, &tf(&[1], &[0.0]), &v(&[1])]), "must be i32 or i64");
    }

    #[test]
    fn slice_facts() {
        let v = |v: &[i64]| c(ti(&[v.len()], v));
        let x = fact(DType::F32, "b,10,s");
        let f = facts1(&Slice, &[&x, &v(&[2, 0]), &v(&[-1, i64::MAX]), &v(&[1, 2])]);
        assert_eq!(f.shape, dims("b,7,s"));
        let f = facts1(&Slice, &[&x, &v(&[0, 1]), &v(&[i64::MAX, i64::MAX]), &v(&[0, 1]), &v(&[1, 3])]);
        assert_eq!(f.shape, dims("b,3,s"));
        let f = facts1(&Slice, &[&x, &v(&[1]), &v(&[2]), &v(&[0])]);
        assert_eq!(f.shape, dims("?,10,s"));
        // Run-time bounds: the sliced axes are known, their sizes are not.
        let f = facts1(&Slice, &[&x, &fact(DType::I64, "1"), &fact(DType::I64, "1"), &v(&[-1])]);
        assert_eq!(f.shape, dims("b,10,?"));
        let f = facts1(&Slice, &[&x, &fact(DType::I64, "2"), &fact(DType::I64, "2")]);
        assert_eq!(f.shape, dims("?,?,s"));
        let f = facts1(&Slice, &[&x, &v(&[0]), &v(&[1]), &fact(DType::I64, "1")]);
        assert_eq!(f.shape, dims("?,?,?"));
        err(Slice.output_facts(&[&x, &v(&[0]), &v(&[1, 2])]), "one length");
        err(Slice.output_facts(&[&x, &v(&[0]), &v(&[1]), &v(&[0]), &v(&[0])]), "must not be 0");
        err(Slice.output_facts(&[&x, &v(&[0])]), "expects 3 to 5 inputs");
    }

    #[test]
    fn split() {
        let sp = |split: Option<Vec<usize>>, n| Split { axis: -1, split, num_outputs: n };
        let sizes = |op: &Split, x: &Tensor| run(op, &[x]).iter().map(|t| t.shape()[1]).collect::<Vec<_>>();
        let x = iota(&[2, 7]);
        assert_eq!(sizes(&sp(None, 3), &x), vec![3, 3, 1]);
        assert_eq!(sizes(&sp(None, 3), &iota(&[2, 6])), vec![2, 2, 2]);
        assert_eq!(sizes(&sp(None, 4), &iota(&[2, 6])), vec![2, 2, 2, 0]);
        let outs = run(&sp(Some(vec![2, 5]), 2), &[&x]);
        assert_eq!(f32s(&outs[0]), vec![0.0, 1.0, 7.0, 8.0]);
        assert_eq!(f32s(&outs[1])[..3], [2.0, 3.0, 4.0]);
        let f = sp(None, 3).output_facts(&[&fact(DType::F32, "b,7")]).unwrap();
        assert_eq!(f.iter().map(|f| f.shape.clone()).collect::<Vec<_>>(), vec![dims("b,3"), dims("b,3"), dims("b,1")]);
        let f = sp(None, 2).output_facts(&[&fact(DType::F32, "2,s")]).unwrap();
        assert_eq!(f[1].shape, dims("2,?"));
        assert_eq!(facts1(&sp(Some(vec![1, 2]), 2), &[&fact(DType::F32, "2,s")]).shape, dims("2,1"));
        err(sp(Some(vec![2, 4]), 2).eval(&[&x]), "do not add up");
        err(sp(Some(vec![7]), 2).eval(&[&x]), "1 sizes for 2 outputs");
        err(sp(None, 0).eval(&[&x]), "at least 1");
        err(sp(None, 4).eval(&[&iota(&[2, 5])]), "into 4 parts");
        err(Split { axis: 2, split: None, num_outputs: 2 }.output_facts(&[&fact(DType::F32, "2,3")]), "out of range");
    }

    #[test]
    fn expand_and_tile() {
        let shape = |v: &[i64]| ti(&[v.len()], v);
        let x = tf(&[3, 1], &[1.0, 2.0, 3.0]);
        let out = run1(&Expand, &[&x, &shape(&[2, 1, 2])]);
        assert_eq!(out.shape(), &[2, 3, 2]);
        assert_eq!(f32s(&out), vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        // Bidirectional: a target dim of 1 keeps the data's dim.
        assert_eq!(run1(&Expand, &[&x, &shape(&[1, 1])]).shape(), &[3, 1]);
        assert_eq!(run1(&Expand, &[&x, &shape(&[0, 1, 1])]).shape(), &[0, 3, 1]);
        assert_eq!(facts1(&Expand, &[&fact(DType::F32, "b,1"), &c(shape(&[1, 4]))]).shape, dims("b,4"));
        assert_eq!(facts1(&Expand, &[&fact(DType::F32, "3,1"), &fact(DType::I64, "3")]).shape, dims("?,3,?"));
        err(Expand.eval(&[&x, &shape(&[2, 2])]), "broadcast");
        err(Expand.output_facts(&[&fact(DType::F32, "3"), &c(shape(&[2]))]), "broadcast");
        err(Expand.eval(&[&x, &shape(&[-1, 1])]), "negative");
        err(Expand.output_facts(&[&fact(DType::F32, "1,1"), &c(shape(&[1 << 40, 1 << 40]))]), "overflows");
        err(Expand.eval(&[&tf(&[1], &[1.0]), &shape(&[1 << 20, 1 << 30])]), "bytes");

        let x = tf(&[1, 2], &[1.0, 2.0]);
        let out = run1(&Tile, &[&x, &shape(&[2, 2])]);
        assert_eq!((out.shape(), f32s(&out)), (&[2usize, 4][..], vec![1.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0, 2.0]));
        assert_eq!(run1(&Tile, &[&x, &shape(&[0, 3])]).shape(), &[0, 6]);
        assert_eq!(facts1(&Tile, &[&fact(DType::F32, "b,2,s"), &c(shape(&[1, 3, 2]))]).shape, dims("b,6,?"));
        assert_eq!(facts1(&Tile, &[&fact(DType::F32, "b,2"), &fact(DType::I64, "2")]).shape, dims("?,?"));
        err(Tile.eval(&[&x, &shape(&[2])]), "repeats has 1 values");
        err(Tile.output_facts(&[&fact(DType::F32, "b,2"), &fact(DType::I64, "3")]), "repeats has 3 values");
        err(Tile.eval(&[&x, &shape(&[1, -1])]), "negative");
    }

    #[test]
    fn gather() {
        let emb = iota(&[4, 3]);
        let out = run1(&Gather { axis: 0 }, &[&emb, &ti(&[1, 2], &[3, -4])]);
        assert_eq!((out.shape(), f32s(&out)), (&[1usize, 2, 3][..], vec![9.0, 10.0, 11.0, 0.0, 1.0, 2.0]));
        let idx32 = Tensor::from_vec(vec![2], vec![2i32, -1]).unwrap();
        let out = run1(&Gather { axis: -1 }, &[&emb, &idx32]);
        assert_eq!((out.shape(), f32s(&out)[..4].to_vec()), (&[4usize, 2][..], vec![2.0, 2.0, 5.0, 5.0]));
        let out = run1(&Gather { axis: 1 }, &[&emb, &ti(&[], &[1])]);
        assert_eq!((out.shape(), f32s(&out)), (&[4usize][..], vec![1.0, 4.0, 7.0, 10.0]));
        assert_eq!(run1(&Gather { axis: 0 }, &[&emb, &ti(&[0], &[])]).shape(), &[0, 3]);
        let f = facts1(&Gather { axis: 1 }, &[&fact(DType::F32, "b,10,4"), &fact(DType::I64, "s,2")]);
        assert_eq!(f.shape, dims("b,s,2,4"));
        err(Gather { axis: 0 }.eval(&[&emb, &ti(&[1], &[4])]), "index 4 is out of range");
        err(Gather { axis: 0 }.eval(&[&emb, &ti(&[1], &[-5])]), "index -5 is out of range");
        err(Gather { axis: 0 }.eval(&[&emb, &ti(&[1], &[i64::MIN])]), "out of range");
        err(Gather { axis: 0 }.output_facts(&[&fact(DType::F32, "4"), &c(ti(&[1], &[9]))]), "index 9");
        err(Gather { axis: 0 }.output_facts(&[&fact(DType::F32, ""), &fact(DType::I64, "")]), "out of range");
        err(Gather { axis: 2 }.eval(&[&emb, &ti(&[1], &[0])]), "out of range");
        err(Gather { axis: 0 }.eval(&[&emb, &tf(&[1], &[0.0])]), "indices must be");
    }

    #[test]
    fn constant_of_shape() {
        let op = ConstantOfShape { value: Arc::new(Tensor::from_vec(vec![1], vec![7i32]).unwrap()) };
        let out = run1(&op, &[&ti(&[2], &[2, 3])]);
        assert_eq!(
            (out.dtype(), out.shape(), out.as_slice::<i32>().unwrap()),
            (DType::I32, &[2usize, 3][..], &[7; 6][..])
        );
        let scalar = run1(&op, &[&ti(&[0], &[])]);
        assert_eq!(scalar.shape(), &[0usize; 0]);
        assert_eq!(scalar.as_slice::<i32>().unwrap(), &[7]);
        assert_eq!(facts1(&op, &[&c(ti(&[2], &[2, 0]))]).shape, dims("2,0"));
        assert_eq!(facts1(&op, &[&fact(DType::I64, "3")]), fact(DType::I32, "?,?,?"));
        err(op.eval(&[&ti(&[2], &[2, -3])]), "negative");
        err(op.eval(&[&ti(&[2], &[1 << 40, 1 << 40])]), "overflows");
        err(op.eval(&[&ti(&[2], &[1 << 20, 1 << 40])]), "bytes");
        err(op.output_facts(&[&fact(DType::I64, "?")]), "unknown length");
        err(op.output_facts(&[&fact(DType::I32, "2")]), "must be i64");
        let two = ConstantOfShape { value: Arc::new(tf(&[2], &[1.0, 2.0])) };
        err(two.eval(&[&ti(&[1], &[2])]), "one element");
    }

    #[test]
    fn range() {
        let s = |v: i64| ti(&[], &[v]);
        assert_eq!(i64s(&run1(&Range, &[&s(0), &s(10), &s(3)])), vec![0, 3, 6, 9]);
        assert_eq!(i64s(&run1(&Range, &[&s(10), &s(4), &s(-2)])), vec![10, 8, 6]);
        assert_eq!(run1(&Range, &[&s(5), &s(1), &s(1)]).shape(), &[0]);
        let i16s = |v: i16| Tensor::scalar(v);
        assert_eq!(run1(&Range, &[&i16s(-3), &i16s(0), &i16s(1)]).as_slice::<i16>().unwrap(), &[-3, -2, -1]);
        let f = |v: f32| Tensor::scalar(v);
        let out = run1(&Range, &[&f(1.0), &f(2.0), &f(0.3)]);
        assert_eq!(out.shape(), &[4]);
        assert!((f32s(&out)[3] - 1.9).abs() < 1e-6);
        let fact_of = facts1(&Range, &[&c(s(0)), &c(s(10)), &c(s(3))]);
        assert_eq!(fact_of, fact(DType::I64, "4"));
        assert_eq!(facts1(&Range, &[&fact(DType::I64, ""), &c(s(10)), &c(s(3))]), fact(DType::I64, "?"));
        err(Range.eval(&[&s(0), &s(10), &s(0)]), "delta must not be 0");
        err(Range.eval(&[&f(0.0), &f(1.0), &f(0.0)]), "delta must not be 0");
        err(Range.eval(&[&s(0), &s(i64::MAX), &s(1)]), "bytes");
        err(Range.eval(&[&s(i64::MIN), &s(i64::MAX), &s(1)]), "bytes");
        err(Range.eval(&[&f(0.0), &f(f32::INFINITY), &f(1.0)]), "finite");
        err(Range.eval(&[&f(0.0), &f(1e30), &f(1e-30)]), "elements");
        err(Range.output_facts(&[&c(s(0)), &c(f(1.0)), &c(s(1))]), "one dtype");
        err(Range.output_facts(&[&fact(DType::I64, "2"), &c(s(1)), &c(s(1))]), "scalar");
        err(Range.eval(&[&Tensor::scalar(true), &Tensor::scalar(true), &Tensor::scalar(true)]), "not supported");
    }

    #[test]
    fn pad_modes() {
        let p = |mode| Pad { mode };
        let v = |v: &[i64]| ti(&[v.len()], v);
        let x = tf(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        let out = run1(&p(PadMode::Constant), &[&x, &v(&[0, 1, 0, 2])]);
        assert_eq!(out.shape(), &[2, 5]);
        assert_eq!(f32s(&out), vec![0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0, 0.0, 0.0]);
        let out = run1(&p(PadMode::Constant), &[&x, &v(&[1, 0, 0, 0]), &tf(&[], &[9.0])]);
        assert_eq!(f32s(&out), vec![9.0, 9.0, 1.0, 2.0, 3.0, 4.0]);
        // An empty constant_value is "not given"; axes picks the padded dims.
        let out = run1(&p(PadMode::Constant), &[&x, &v(&[1, 0]), &tf(&[0], &[]), &v(&[-1])]);
        assert_eq!(f32s(&out), vec![0.0, 1.0, 2.0, 0.0, 3.0, 4.0]);
        // Expected values from numpy.pad.
        let r = tf(&[3], &[1.0, 2.0, 3.0]);
        let out = run1(&p(PadMode::Reflect), &[&r, &v(&[5, 4])]);
        assert_eq!(f32s(&out), vec![2.0, 1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 3.0, 2.0, 1.0, 2.0, 3.0]);
        let out = run1(&p(PadMode::Wrap), &[&r, &v(&[5, 4])]);
        assert_eq!(f32s(&out), vec![2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 1.0]);
        let out = run1(&p(PadMode::Edge), &[&r, &v(&[2, 1])]);
        assert_eq!(f32s(&out), vec![1.0, 1.0, 1.0, 2.0, 3.0, 3.0]);
        assert_eq!(f32s(&run1(&p(PadMode::Reflect), &[&tf(&[1], &[7.0]), &v(&[2, 1])])), vec![7.0; 4]);
        // Negative pads crop.
        let out = run1(&p(PadMode::Constant), &[&tf(&[4], &[1.0, 2.0, 3.0, 4.0]), &v(&[-1, 1])]);
        assert_eq!(f32s(&out), vec![2.0, 3.0, 4.0, 0.0]);
        // Crop, then pad around what is left (values from ONNX Runtime; for a single row left,
        // reflect repeats it as numpy does).
        let out = run1(&p(PadMode::Reflect), &[&x, &v(&[1, 0, -1, 0])]);
        assert_eq!(f32s(&out), vec![1.0, 2.0, 1.0, 2.0]);
        let x3 = tf(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let out = run1(&p(PadMode::Wrap), &[&x3, &v(&[3, 0, -1, 0])]);
        assert_eq!(f32s(&out), vec![3.0, 4.0, 1.0, 2.0, 3.0, 4.0, 1.0, 2.0, 3.0, 4.0]);
        let y = tf(&[4], &[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(f32s(&run1(&p(PadMode::Wrap), &[&y, &v(&[1, -1])])), vec![3.0, 1.0, 2.0, 3.0]);
        assert_eq!(f32s(&run1(&p(PadMode::Wrap), &[&y, &v(&[-1, 2])])), vec![2.0, 3.0, 4.0, 2.0, 3.0]);
        assert_eq!(f32s(&run1(&p(PadMode::Reflect), &[&y, &v(&[-1, 2])])), vec![2.0, 3.0, 4.0, 3.0, 2.0]);
        assert_eq!(f32s(&run1(&p(PadMode::Edge), &[&y, &v(&[1, -1])])), vec![1.0, 1.0, 2.0, 3.0]);
        err(p(PadMode::Edge).eval(&[&y, &v(&[-4, 1])]), "empty axis");
        assert_eq!(run1(&p(PadMode::Constant), &[&tf(&[0], &[]), &v(&[1, 1])]).shape(), &[2]);

        err(p(PadMode::Constant).eval(&[&x, &v(&[1, 1])]), "pads has 2 values for 2 axes");
        err(p(PadMode::Constant).eval(&[&x, &v(&[-3, 0, 0, 0])]), "give size -1");
        err(p(PadMode::Edge).eval(&[&tf(&[0], &[]), &v(&[1, 0])]), "empty axis");
        err(p(PadMode::Constant).eval(&[&x, &v(&[0, 0, 0, 0]), &ti(&[], &[1])]), "constant_value");
        err(p(PadMode::Constant).eval(&[&x, &v(&[0, 0]), &tf(&[], &[0.0]), &v(&[0, 0])]), "repeated");
        err(p(PadMode::Constant).eval(&[&x, &v(&[i64::MAX, i64::MAX, 0, 0])]), "overflows");
    }

    #[test]
    fn pad_facts() {
        let p = Pad { mode: PadMode::Constant };
        let v = |v: &[i64]| c(ti(&[v.len()], v));
        let x = fact(DType::F32, "b,3,s");
        assert_eq!(facts1(&p, &[&x, &v(&[0, 1, 0, 0, 2, 0])]).shape, dims("b,6,s"));
        assert_eq!(facts1(&p, &[&x, &v(&[1, 0, 0, 0, 0, 0])]).shape, dims("?,3,s"));
        let cv = c(tf(&[], &[0.0]));
        assert_eq!(facts1(&p, &[&x, &v(&[1, 1]), &cv, &v(&[1])]).shape, dims("b,5,s"));
        assert_eq!(facts1(&p, &[&x, &fact(DType::I64, "2"), &cv, &v(&[-1])]).shape, dims("b,3,?"));
        assert_eq!(facts1(&p, &[&x, &fact(DType::I64, "6")]).shape, dims("?,?,?"));
        err(p.output_facts(&[&x, &v(&[1, 1])]), "pads has 2 values for 3 axes");
        err(p.output_facts(&[&x, &fact(DType::I64, "4"), &cv, &v(&[0])]), "pads has 4 values for 1 axes");
        err(p.output_facts(&[&x, &v(&[0, -4, 0, 0, 0, 0])]), "give size -1");
        err(p.output_facts(&[&x, &v(&[0; 6]), &c(ti(&[], &[0]))]), "constant_value");
        err(p.output_facts(&[&x, &v(&[0; 6]), &cv, &v(&[3])]), "out of range");
    }

    /// The BERT pattern: reshape to `[batch, seq, heads, head_dim]` from a shape computed at run time.
    #[test]
    fn shape_arithmetic_in_a_graph() {
        let mut g = Graph::default();
        let x = g.add_input("x", fact(DType::F32, "batch,seq,8")).unwrap();
        let shape = g.add_node("shape", Shape { start: 0, end: Some(2) }, vec![x]).unwrap()[0];
        let tail = g.add_const("tail", ti(&[2], &[2, -1])).unwrap();
        let full = g.add_node("cat", Concat { axis: 0 }, vec![shape, tail]).unwrap()[0];
        assert_eq!(g.fact(full).shape, dims("4"));
        let y = g.add_node("reshape", Reshape { allowzero: false }, vec![x, full]).unwrap()[0];
        assert_eq!(g.fact(y).shape, dims("?,?,?,?"));
        let t = g.add_node("t", Transpose { perm: Some(vec![0, 2, 1, 3]) }, vec![y]).unwrap()[0];
        g.add_output("y", t);
        let out = g.eval(vec![("x".into(), iota(&[1, 3, 8]))]).unwrap();
        assert_eq!(out[0].shape(), &[1, 2, 3, 4]);
        assert_eq!(f32s(&out[0])[..6], [0.0, 1.0, 2.0, 3.0, 8.0, 9.0]);

        // With a known shape, Shape is a constant and everything downstream folds.
        let mut g = Graph::default();
        let x = g.add_input("x", fact(DType::F32, "2,3")).unwrap();
        let shape = g.add_node("shape", Shape { start: 0, end: None }, vec![x]).unwrap()[0];
        let zero = g.add_const("zero", ti(&[], &[0])).unwrap();
        let rows = g.add_node("rows", Gather { axis: 0 }, vec![shape, zero]).unwrap()[0];
        let rows = g.add_node("unsq", Unsqueeze { axes: vec![0] }, vec![rows]).unwrap()[0];
        let k = g.add_node("cos", ConstantOfShape { value: Arc::new(tf(&[1], &[1.0])) }, vec![rows]).unwrap()[0];
        assert_eq!(g.fact(k).shape, dims("2"));
        assert_eq!(f32s(g.fact(k).konst.as_ref().unwrap()), vec![1.0, 1.0]);
    }
}

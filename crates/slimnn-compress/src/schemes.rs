//! The quantization schemes as graph rewrites of weight matmuls:
//!
//! | scheme | pattern written |
//! |---|---|
//! | [`Dynamic`] per token | `ai.slimnn.DynamicRowQuantMatMul(x, Wq, w_scale)` (a scale and zero point per row of x) |
//! | [`Dynamic`] per tensor | `DynamicQuantizeLinear(x)` → `MatMulInteger(xq, Wq, xz, wz)` → `Cast` → `Mul(·, x_scale·w_scale)` (ONNX Runtime's `quantize_dynamic` pattern) |
//! | [`StaticQdq`] | `QuantizeLinear`→`DequantizeLinear` on the activation, `DequantizeLinear` on the int8 weight, float `MatMul` |
//! | [`WeightOnly`] 8-bit | `DequantizeLinear` on the int8 weight, float `MatMul` |
//! | [`WeightOnly`] 4-bit | `MatMulNBits` (`com.microsoft`) |
//! | [`HalfWeights`] | bf16 / fp16 weight → `Cast` to f32 → `MatMul` |

use crate::calib::{StatKind, StatPoint, Statistics};
use crate::gptq::{gptq, GptqGrid, GptqOutput};
use crate::quant::{quantize_groups, quantize_int8_weight, sqnr_db, Granularity, GroupWeight, Int8Weight};
use crate::range::{activation_range, histogram_sqnr_db, ActivationType, CalibrationMethod};
use crate::report::{LayerReport, Report};
use crate::targets::{activation_matmuls, find_targets, require_some, Target};
use crate::{Algorithm, CompressError, Result};
use slimnn_ir::ops::{
    Binary, BinaryOp, Cast, Const, DequantizeLinear, DynamicQuantizeLinear, DynamicRowQuantMatMul, Gather,
    GatherBlockQuantized, MatMul, MatMulInteger, MatMulNBits, QuantizeLinear,
};
use slimnn_ir::{Graph, Op, OutletId, Patch, Wire};
use slimnn_tensor::{DType, Tensor};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Which layers a scheme touches: name patterns left out, and exact names skipped (mixed
/// precision keeps those in higher precision).
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub exclude: Vec<String>,
    pub skip: HashSet<String>,
}

impl Selection {
    pub fn targets_of(&self, g: &Graph) -> Result<Vec<Target>> {
        find_targets(g, &self.exclude, &self.skip)
    }

    fn targets(&self, g: &Graph) -> Result<Vec<Target>> {
        self.targets_of(g)
    }
}

fn konst(p: &mut Patch, name: &str, t: Tensor) -> Wire {
    Patch::wire(p.add_node(name, Const(Arc::new(t)), vec![]), 0)
}

fn value_name(g: &Graph, o: OutletId) -> String {
    g.node(o.node).output_names[o.slot].clone().unwrap_or_else(|| g.node(o.node).name.clone())
}

fn int8_report(t: &Target, scheme: &str, q: &Int8Weight, w: &[f32]) -> LayerReport {
    let mut r = LayerReport::new(&t.name, scheme, 8, [t.k, t.n]);
    let (lo, hi) = q.scales.iter().fold((f32::INFINITY, 0f32), |(a, b), &s| (a.min(s), b.max(s)));
    r.weight_scale = Some((lo, hi));
    r.weight_sqnr_db = Some(sqnr_db(w, &q.dequantize(t.n)));
    r
}

fn int8_tensors(q: &Int8Weight, k: usize, n: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let values = Tensor::from_vec(vec![k, n], q.values.clone())?;
    let (scale, zero) = if q.scales.len() == 1 {
        (Tensor::scalar(q.scales[0]), Tensor::scalar(0i8))
    } else {
        (Tensor::from_vec(vec![n], q.scales.clone())?, Tensor::from_vec(vec![n], vec![0i8; n])?)
    };
    Ok((values, scale, zero))
}

/// Channel statistics wanted for bias correction.
fn bias_points(targets: &[Target], on: bool) -> Vec<StatPoint> {
    if !on {
        return vec![];
    }
    targets.iter().filter(|t| t.bias.is_some()).map(|t| StatPoint { outlet: t.x, kind: StatKind::Channels }).collect()
}

/// Replaces the bias of `t`'s `Add` by `bias - E[x] (W_q - W)`, the mean output shift the
/// quantized weight causes; `y` is the new matmul output.
fn correct_bias(
    p: &mut Patch,
    g: &Graph,
    t: &Target,
    stats: &Statistics,
    y: Wire,
    w_q: &[f32],
) -> Result<Option<String>> {
    let Some((add, bias_ix)) = t.bias else { return Ok(None) };
    let Some(ch) = stats.get(t.x)?.channels.as_ref() else { return Ok(None) };
    let mean = ch.mean();
    let w = t.weight()?;
    let bias_outlet = g.node(add).inputs[bias_ix];
    let Some(b) = g.fact(bias_outlet).konst.clone() else { return Ok(None) };
    let b = b.as_slice::<f32>()?;
    let mut delta = vec![0f64; t.n];
    for (kk, &m) in mean.iter().enumerate().take(t.k) {
        for (d, (wq, w0)) in delta.iter_mut().zip(w_q[kk * t.n..][..t.n].iter().zip(&w[kk * t.n..][..t.n])) {
            *d += m * (*wq as f64 - *w0 as f64);
        }
    }
    let nb: Vec<f32> = b.iter().zip(&delta).map(|(&b, &d)| (b as f64 - d) as f32).collect();
    let shift = delta.iter().map(|d| d.abs()).fold(0f64, f64::max);
    let nbw = konst(p, &format!("{}/bias_corrected", t.name), Tensor::from_vec(vec![t.n], nb)?);
    let ins = if bias_ix == 0 { vec![nbw, y] } else { vec![y, nbw] };
    let a = p.add_node(&format!("{}/bias_add", t.name), Binary(BinaryOp::Add), ins);
    p.shunt(OutletId::new(add, 0), Patch::wire(a, 0));
    Ok(Some(format!("bias corrected (max shift {shift:.2e})")))
}

/// int8 dynamic quantization (weights offline, activations u8 per token or per tensor at run
/// time).
#[derive(Debug, Clone)]
pub struct Dynamic {
    pub granularity: Granularity,
    /// A scale and zero point per row of the activation instead of one per tensor.
    pub per_token: bool,
    pub selection: Selection,
    pub bias_correction: bool,
}

impl Algorithm for Dynamic {
    fn name(&self) -> &'static str {
        "int8-dynamic"
    }

    fn statistic_points(&self, g: &Graph) -> Result<Vec<StatPoint>> {
        Ok(bias_points(&self.selection.targets(g)?, self.bias_correction))
    }

    fn apply(&self, g: &Graph, stats: &Statistics) -> Result<(Graph, Report)> {
        let targets = self.selection.targets(g)?;
        require_some(&targets, self.name())?;
        let mut p = Patch::new();
        let mut report = Report::default();
        let mut quantizers: HashMap<OutletId, usize> = HashMap::new();
        for t in &targets {
            let w = t.weight()?;
            let q = quantize_int8_weight(w, t.n, self.granularity);
            if self.per_token {
                let (values, scale, _) = int8_tensors(&q, t.k, t.n)?;
                let wq = konst(&mut p, &format!("{}/weight_quantized", t.name), values);
                let ws = konst(&mut p, &format!("{}/weight_scale", t.name), scale);
                let y = p.add_node(&format!("{}_quant", t.name), DynamicRowQuantMatMul, vec![t.x.into(), wq, ws]);
                p.shunt(OutletId::new(t.node, 0), Patch::wire(y, 0));
                let mut r = int8_report(t, "int8-dynamic-per-token", &q, w);
                if self.bias_correction {
                    r.note = correct_bias(&mut p, g, t, stats, Patch::wire(y, 0), &q.dequantize(t.n))?;
                }
                report.layers.push(r);
                continue;
            }
            let dq = *quantizers.entry(t.x).or_insert_with(|| {
                p.add_node(&format!("{}_QuantizeLinear", value_name(g, t.x)), DynamicQuantizeLinear, vec![t.x.into()])
            });
            let (values, scale, zero) = int8_tensors(&q, t.k, t.n)?;
            let wq = konst(&mut p, &format!("{}/weight_quantized", t.name), values);
            let wz = konst(&mut p, &format!("{}/weight_zero_point", t.name), zero);
            let ws = konst(&mut p, &format!("{}/weight_scale", t.name), scale);
            let mm = p.add_node(
                &format!("{}_quant", t.name),
                MatMulInteger,
                vec![Patch::wire(dq, 0), wq, Patch::wire(dq, 2), wz],
            );
            let cast = p.add_node(
                &format!("{}_output_quantized_cast", t.name),
                Cast { to: DType::F32 },
                vec![Patch::wire(mm, 0)],
            );
            let sc = p.add_node(
                &format!("{}_quant_scales_mul", t.name),
                Binary(BinaryOp::Mul),
                vec![Patch::wire(dq, 1), ws],
            );
            let y = p.add_node(
                &format!("{}_quant_output_scale_mul", t.name),
                Binary(BinaryOp::Mul),
                vec![Patch::wire(cast, 0), Patch::wire(sc, 0)],
            );
            p.shunt(OutletId::new(t.node, 0), Patch::wire(y, 0));
            let mut r = int8_report(t, self.name(), &q, w);
            if self.bias_correction {
                r.note = correct_bias(&mut p, g, t, stats, Patch::wire(y, 0), &q.dequantize(t.n))?;
            }
            report.layers.push(r);
        }
        let mut out = g.clone();
        out.apply(p)?;
        Ok((out, report))
    }
}

/// An activation's dequantized wire, its `(scale, zero point)` and estimated SQNR (dB).
type ActivationQdq = (Wire, (f32, i32), Option<f64>);

/// int8 static quantization in QDQ form with calibrated activation ranges.
#[derive(Debug, Clone)]
pub struct StaticQdq {
    pub granularity: Granularity,
    pub activation_type: ActivationType,
    pub method: CalibrationMethod,
    pub percentile: f64,
    pub selection: Selection,
    pub bias_correction: bool,
    /// Also quantize both operands of activation-by-activation matmuls.
    pub activation_matmuls: bool,
}

impl StaticQdq {
    fn activation_points(&self, g: &Graph) -> Result<Vec<OutletId>> {
        let mut v: Vec<OutletId> = self.selection.targets(g)?.iter().map(|t| t.x).collect();
        if self.activation_matmuls {
            for id in activation_matmuls(g, &self.selection.exclude, &self.selection.skip) {
                v.extend(g.node(id).inputs.iter().copied());
            }
        }
        v.sort();
        v.dedup();
        Ok(v)
    }
}

impl Algorithm for StaticQdq {
    fn name(&self) -> &'static str {
        "int8-qdq"
    }

    fn statistic_points(&self, g: &Graph) -> Result<Vec<StatPoint>> {
        let kind = if self.method == CalibrationMethod::Minmax { StatKind::MinMax } else { StatKind::Histogram };
        let mut v: Vec<StatPoint> =
            self.activation_points(g)?.into_iter().map(|outlet| StatPoint { outlet, kind }).collect();
        v.extend(bias_points(&self.selection.targets(g)?, self.bias_correction));
        Ok(v)
    }

    fn apply(&self, g: &Graph, stats: &Statistics) -> Result<(Graph, Report)> {
        let targets = self.selection.targets(g)?;
        require_some(&targets, self.name())?;
        let mut p = Patch::new();
        let mut report = Report::default();
        let zero_of = |z: i32| match self.activation_type {
            ActivationType::U8 => Tensor::scalar(z as u8),
            ActivationType::I8 => Tensor::scalar(z as i8),
        };
        // One QuantizeLinear/DequantizeLinear pair per activation, shared by its readers.
        let mut qdq: HashMap<OutletId, ActivationQdq> = HashMap::new();
        for o in self.activation_points(g)? {
            let st = stats.get(o)?;
            let (lo, hi) = activation_range(st, self.method, self.percentile, self.activation_type);
            let (s, z) = self.activation_type.params(lo, hi);
            let sqnr = st.hist.as_ref().map(|h| histogram_sqnr_db(h, s, z, self.activation_type.qrange()));
            let base = value_name(g, o);
            let sw = konst(&mut p, &format!("{base}_scale"), Tensor::scalar(s));
            let zw = konst(&mut p, &format!("{base}_zero_point"), zero_of(z));
            let qn = p.add_node(&format!("{base}_QuantizeLinear"), QuantizeLinear { axis: 1 }, vec![o.into(), sw, zw]);
            let dn = p.add_node(
                &format!("{base}_DequantizeLinear"),
                DequantizeLinear { axis: 1 },
                vec![Patch::wire(qn, 0), sw, zw],
            );
            qdq.insert(o, (Patch::wire(dn, 0), (s, z), sqnr));
        }
        for t in &targets {
            let w = t.weight()?;
            let q = quantize_int8_weight(w, t.n, self.granularity);
            let (values, scale, zero) = int8_tensors(&q, t.k, t.n)?;
            let wq = konst(&mut p, &format!("{}/weight_quantized", t.name), values);
            let ws = konst(&mut p, &format!("{}/weight_scale", t.name), scale);
            let wz = konst(&mut p, &format!("{}/weight_zero_point", t.name), zero);
            let wd = p.add_node(
                &format!("{}/weight_DequantizeLinear", t.name),
                DequantizeLinear { axis: 1 },
                vec![wq, ws, wz],
            );
            let (xw, act, act_sqnr) = qdq[&t.x];
            let mm = p.add_node(&t.name, MatMul, vec![xw, Patch::wire(wd, 0)]);
            p.shunt(OutletId::new(t.node, 0), Patch::wire(mm, 0));
            let mut r = int8_report(t, self.name(), &q, w);
            r.activation = Some(act);
            r.activation_sqnr_db = act_sqnr;
            if self.bias_correction {
                r.note = correct_bias(&mut p, g, t, stats, Patch::wire(mm, 0), &q.dequantize(t.n))?;
            }
            report.layers.push(r);
        }
        if self.activation_matmuls {
            for id in activation_matmuls(g, &self.selection.exclude, &self.selection.skip) {
                let n = g.node(id);
                let (a, b) = (qdq[&n.inputs[0]], qdq[&n.inputs[1]]);
                let mm = p.add_node(&n.name, MatMul, vec![a.0, b.0]);
                p.shunt(OutletId::new(id, 0), Patch::wire(mm, 0));
                let mut r = LayerReport::new(&n.name, "int8-qdq-act", 8, [0, 0]);
                r.activation = Some(a.1);
                r.activation_sqnr_db = a.2;
                report.layers.push(r);
            }
        }
        let mut out = g.clone();
        out.apply(p)?;
        Ok((out, report))
    }
}

/// Weight-only quantization: int8 per channel / per tensor, or 4-bit group-wise; round to
/// nearest or GPTQ.
#[derive(Debug, Clone)]
pub struct WeightOnly {
    pub bits: usize,
    pub group_size: usize,
    pub granularity: Granularity,
    pub gptq: bool,
    pub selection: Selection,
    pub bias_correction: bool,
}

/// Relative dampening added to the Hessian's diagonal by GPTQ.
pub const GPTQ_DAMP: f64 = 0.01;

impl WeightOnly {
    fn scheme(&self) -> String {
        match self.bits {
            8 => "int8-weight".into(),
            b => format!("int{b}-g{}", self.group_size),
        }
    }
}

impl Algorithm for WeightOnly {
    fn name(&self) -> &'static str {
        "weight-only"
    }

    fn statistic_points(&self, g: &Graph) -> Result<Vec<StatPoint>> {
        let targets = self.selection.targets(g)?;
        let mut v = bias_points(&targets, self.bias_correction);
        if self.gptq {
            v.extend(targets.iter().map(|t| StatPoint { outlet: t.x, kind: StatKind::Gram }));
        }
        Ok(v)
    }

    fn apply(&self, g: &Graph, stats: &Statistics) -> Result<(Graph, Report)> {
        let targets = self.selection.targets(g)?;
        require_some(&targets, self.name())?;
        if self.bits == 4 {
            if let Some(t) = targets.iter().find(|t| t.k % self.group_size != 0) {
                return Err(CompressError::Recipe(format!(
                    "--group-size {} does not divide the {} input channels of layer '{}'",
                    self.group_size, t.k, t.name
                )));
            }
        }
        let mut p = Patch::new();
        let mut report = Report::default();
        let scheme = self.scheme();
        for t in &targets {
            let w = t.weight()?;
            let algo = if self.gptq { "+gptq" } else { "" };
            let (y, w_q, mut r) = if self.bits == 8 {
                let rtn = quantize_int8_weight(w, t.n, self.granularity);
                let q = if self.gptq {
                    let gram = stats.get(t.x)?.gram.as_ref().ok_or_else(|| {
                        CompressError::Calibration(format!("no activation statistics for GPTQ of '{}'", t.name))
                    })?;
                    match gptq(w, t.k, t.n, gram, &GptqGrid::Int8 { scales: rtn.scales.clone() }, GPTQ_DAMP)? {
                        GptqOutput::Int8(q) => q,
                        GptqOutput::Groups(_) => unreachable!("an int8 grid gives int8 output"),
                    }
                } else {
                    rtn
                };
                let (values, scale, zero) = int8_tensors(&q, t.k, t.n)?;
                let wq = konst(&mut p, &format!("{}/weight_quantized", t.name), values);
                let ws = konst(&mut p, &format!("{}/weight_scale", t.name), scale);
                let wz = konst(&mut p, &format!("{}/weight_zero_point", t.name), zero);
                let wd = p.add_node(
                    &format!("{}/weight_DequantizeLinear", t.name),
                    DequantizeLinear { axis: 1 },
                    vec![wq, ws, wz],
                );
                let mm = p.add_node(&t.name, MatMul, vec![t.x.into(), Patch::wire(wd, 0)]);
                let r = int8_report(t, &format!("{scheme}{algo}"), &q, w);
                (Patch::wire(mm, 0), q.dequantize(t.n), r)
            } else {
                let gw: GroupWeight = if self.gptq {
                    let gram = stats.get(t.x)?.gram.as_ref().ok_or_else(|| {
                        CompressError::Calibration(format!("no activation statistics for GPTQ of '{}'", t.name))
                    })?;
                    let grid = GptqGrid::Groups { bits: self.bits, block: self.group_size };
                    match gptq(w, t.k, t.n, gram, &grid, GPTQ_DAMP)? {
                        GptqOutput::Groups(q) => q,
                        GptqOutput::Int8(_) => unreachable!("a group grid gives group output"),
                    }
                } else {
                    quantize_groups(w, t.k, t.n, self.bits, self.group_size)
                };
                let op = MatMulNBits { k: t.k, n: t.n, bits: self.bits, block_size: self.group_size };
                let (b, z) = gw.pack();
                let bw = konst(
                    &mut p,
                    &format!("{}/weight_packed", t.name),
                    Tensor::from_vec(vec![t.n, op.blocks(), op.blob_bytes()], b)?,
                );
                let sw = konst(
                    &mut p,
                    &format!("{}/weight_scales", t.name),
                    Tensor::from_vec(vec![gw.scales.len()], gw.scales.clone())?,
                );
                let zw = konst(&mut p, &format!("{}/weight_zero_points", t.name), Tensor::from_vec(vec![z.len()], z)?);
                let mm = p.add_node(&format!("{}_Q{}", t.name, self.bits), op, vec![t.x.into(), bw, sw, zw]);
                let deq = gw.dequantize();
                let mut r = LayerReport::new(&t.name, &format!("{scheme}{algo}"), self.bits as u32, [t.k, t.n]);
                let (lo, hi) = gw.scales.iter().fold((f32::INFINITY, 0f32), |(a, b), &s| (a.min(s), b.max(s)));
                r.weight_scale = Some((lo, hi));
                r.weight_sqnr_db = Some(sqnr_db(w, &deq));
                (Patch::wire(mm, 0), deq, r)
            };
            p.shunt(OutletId::new(t.node, 0), y);
            if self.bias_correction {
                r.note = correct_bias(&mut p, g, t, stats, y, &w_q)?;
            }
            report.layers.push(r);
        }
        let mut out = g.clone();
        out.apply(p)?;
        Ok((out, report))
    }
}

/// bf16 or fp16 weights, cast to f32 for the matmul.
#[derive(Debug, Clone)]
pub struct HalfWeights {
    pub dtype: DType,
    pub selection: Selection,
}

impl Algorithm for HalfWeights {
    fn name(&self) -> &'static str {
        "half-weights"
    }

    fn statistic_points(&self, _: &Graph) -> Result<Vec<StatPoint>> {
        Ok(vec![])
    }

    fn apply(&self, g: &Graph, _: &Statistics) -> Result<(Graph, Report)> {
        let targets = self.selection.targets(g)?;
        require_some(&targets, self.name())?;
        let mut p = Patch::new();
        let mut report = Report::default();
        let scheme = if self.dtype == DType::BF16 { "bf16" } else { "fp16" };
        for t in &targets {
            let half = t.w.cast(self.dtype)?;
            let back = half.cast(DType::F32)?;
            let hw = konst(&mut p, &format!("{}/weight_{scheme}", t.name), half);
            let c = p.add_node(&format!("{}/weight_cast", t.name), Cast { to: DType::F32 }, vec![hw]);
            let mm = p.add_node(&t.name, MatMul, vec![t.x.into(), Patch::wire(c, 0)]);
            p.shunt(OutletId::new(t.node, 0), Patch::wire(mm, 0));
            let mut r = LayerReport::new(&t.name, scheme, 16, [t.k, t.n]);
            r.weight_sqnr_db = Some(sqnr_db(t.weight()?, back.as_slice::<f32>()?));
            report.layers.push(r);
        }
        let mut out = g.clone();
        out.apply(p)?;
        Ok((out, report))
    }
}

/// Embedding tables (`Gather` along axis 0 of a constant 2-d f32 table) stored block-quantized:
/// `bits`-bit codes with an f16 scale and a zero point per `block_size` values of a row, as
/// ONNX Runtime's `com.microsoft.GatherBlockQuantized` reads them, then `Cast` to f32.
#[derive(Debug, Clone)]
pub struct EmbeddingBlock {
    pub bits: usize,
    pub block_size: usize,
    pub selection: Selection,
}

/// Packs codes (one per byte, values below `2^bits`) into rows of `bits`-bit fields, low nibble
/// first when 4-bit.
fn pack_codes(codes: &[u8], row_len: usize, bits: usize) -> Vec<u8> {
    if bits == 8 {
        return codes.to_vec();
    }
    let bytes = row_len.div_ceil(2);
    let mut out = vec![0u8; codes.len() / row_len.max(1) * bytes];
    for (row, dst) in codes.chunks(row_len).zip(out.chunks_mut(bytes)) {
        for (i, &c) in row.iter().enumerate() {
            dst[i / 2] |= c << ((i % 2) * 4);
        }
    }
    out
}

impl Algorithm for EmbeddingBlock {
    fn name(&self) -> &'static str {
        "embedding-block"
    }

    fn statistic_points(&self, _: &Graph) -> Result<Vec<StatPoint>> {
        Ok(vec![])
    }

    fn apply(&self, g: &Graph, _: &Statistics) -> Result<(Graph, Report)> {
        let mut p = Patch::new();
        let mut report = Report::default();
        for (id, n) in g.nodes().iter().enumerate() {
            let Op::Gather(Gather { axis: 0 }) = n.op else { continue };
            let Some(table) = g.fact(n.inputs[0]).konst.clone() else { continue };
            if table.dtype() != DType::F32 || table.rank() != 2 || table.len() < 4096 {
                continue;
            }
            if self.selection.exclude.iter().any(|pat| crate::targets::name_matches(pat, &n.name))
                || self.selection.skip.contains(&n.name)
            {
                continue;
            }
            let (rows, cols) = (table.shape()[0], table.shape()[1]);
            if cols % self.block_size != 0 {
                continue;
            }
            let w = table.as_slice::<f32>()?;
            // Blocks run along a row: quantize the transpose, whose columns are the table's rows.
            let mut wt = vec![0f32; w.len()];
            for (r, row) in w.chunks(cols).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    wt[c * rows + r] = v;
                }
            }
            let mut q = quantize_groups(&wt, cols, rows, self.bits, self.block_size);
            // Scales are stored as f16; dequantize with the stored values.
            q.scales.iter_mut().for_each(|s| *s = slimnn_tensor::f16::from_f32(*s).to_f32());
            let blocks = cols / self.block_size;
            let data = pack_codes(&q.codes, cols, self.bits);
            let zeros = pack_codes(&q.zeros, blocks, self.bits);
            let zero_bytes = zeros.len() / rows;
            let scales: Vec<slimnn_tensor::f16> = q.scales.iter().map(|&s| slimnn_tensor::f16::from_f32(s)).collect();
            let data = konst(
                &mut p,
                &format!("{}/table_quantized", n.name),
                Tensor::from_vec(vec![rows, data.len() / rows], data)?,
            );
            let sc = konst(&mut p, &format!("{}/table_scales", n.name), Tensor::from_vec(vec![rows, blocks], scales)?);
            let zp = konst(
                &mut p,
                &format!("{}/table_zero_points", n.name),
                Tensor::from_vec(vec![rows, zero_bytes], zeros)?,
            );
            let op = GatherBlockQuantized { bits: self.bits, block_size: self.block_size };
            let gq = p.add_node(&format!("{}_quant", n.name), op, vec![data, n.inputs[1].into(), sc, zp]);
            let cast = p.add_node(&format!("{}_quant_cast", n.name), Cast { to: DType::F32 }, vec![Patch::wire(gq, 0)]);
            p.shunt(OutletId::new(id, 0), Patch::wire(cast, 0));
            let mut r = LayerReport::new(&n.name, self.name(), self.bits as u32, [rows, cols]);
            let (lo, hi) = q.scales.iter().fold((f32::INFINITY, 0f32), |(a, b), &s| (a.min(s), b.max(s)));
            r.weight_scale = Some((lo, hi));
            // q.dequantize() is [K = cols, N = rows]: the transpose, as quantized.
            r.weight_sqnr_db = Some(sqnr_db(&wt, &q.dequantize()));
            report.layers.push(r);
        }
        let mut out = g.clone();
        out.apply(p)?;
        Ok((out, report))
    }
}

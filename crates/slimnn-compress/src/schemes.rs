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

use crate::calib::{StatKind, StatPoint, Statistics, ValueStats};
use crate::gptq::{gptq, GptqGrid, GptqOutput};
use crate::quant::{
    quantize_groups, quantize_int8_conv_weight, quantize_int8_weight, sqnr_db, Granularity, GroupWeight, Int8Weight,
};
use crate::range::{activation_range, histogram_sqnr_db, ActivationType, CalibrationMethod};
use crate::report::{LayerReport, Report};
use crate::targets::{
    activation_matmuls, feature_map_adds, find_conv_targets, find_targets, require_some, ConvTarget, Target,
};
use crate::{Algorithm, CompressError, Result};
use slimnn_ir::ops::{
    Binary, BinaryOp, Cast, Const, Conv, DequantizeLinear, DynamicQuantizeLinear, DynamicRowQuantMatMul, Gather,
    GatherBlockQuantized, MatMul, MatMulInteger, MatMulNBits, QuantizeLinear,
};
use slimnn_ir::{Graph, NodeId, Op, OutletId, Patch, Wire};
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

/// An int8 layer's report row: `shape` is `[K, N]` (a conv's `[C / group · kh · kw, M]`).
fn int8_report(name: &str, shape: [usize; 2], scheme: &str, q: &Int8Weight, w: &[f32]) -> LayerReport {
    let mut r = LayerReport::new(name, scheme, 8, shape);
    let (lo, hi) = q.scales.iter().fold((f32::INFINITY, 0f32), |(a, b), &s| (a.min(s), b.max(s)));
    r.weight_scale = Some((lo, hi));
    r.weight_sqnr_db = Some(sqnr_db(w, &q.dequantize()));
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
        require_some(&targets, None, self.name())?;
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
                let mut r = int8_report(&t.name, [t.k, t.n], "int8-dynamic-per-token", &q, w);
                if self.bias_correction {
                    r.note = correct_bias(&mut p, g, t, stats, Patch::wire(y, 0), &q.dequantize())?;
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
            let mut r = int8_report(&t.name, [t.k, t.n], self.name(), &q, w);
            if self.bias_correction {
                r.note = correct_bias(&mut p, g, t, stats, Patch::wire(y, 0), &q.dequantize())?;
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

/// int8 static quantization in QDQ form with calibrated activation ranges. Weight matmuls
/// get their activation and weight dequantized into a float `MatMul`; convolutions are written
/// as ONNX Runtime's quantizer writes them, `Q(Conv(DQ(x), DQ(W), DQ(b_i32)))` with the bias
/// at scale `x_scale * w_scale`, the form both runtimes execute as an integer `QLinearConv`.
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
    /// Channels of each weight matmul's activation left out of its range: the ones of largest
    /// calibrated magnitude, kept in float beside the integer product (LLM.int8()-style) or
    /// migrated into the weight rows, see [`OutlierPlan`] (0: none; at most an eighth of the
    /// channels).
    pub outlier_channels: usize,
}

/// The (at most) `count` channels of `st` with the largest calibrated magnitudes, ascending,
/// capped at an eighth of the channels; `None` when there are none to take.
fn outlier_channels(st: &ValueStats, count: usize) -> Option<Vec<usize>> {
    let ch = st.channels.as_ref()?;
    let count = count.min(ch.absmax.len() / 8);
    if count == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..ch.absmax.len()).collect();
    order.sort_by(|&a, &b| ch.absmax[b].total_cmp(&ch.absmax[a]));
    let mut out = order[..count].to_vec();
    out.sort_unstable();
    Some(out)
}

/// Channels this many times the median channel's max |x| make a static scale coarse for the
/// rest (MiniLM's LayerNorm and GELU outputs reach 5-15x).
const OUTLIER_HINT_RATIO: f32 = 4.0;

/// A note when some of `points` have channels far beyond their median channel's range, which
/// `--outlier-channels` would keep out of the static scale.
fn outlier_hint(points: &[OutletId], stats: &Statistics) -> Option<String> {
    let ratios: Vec<f32> = points
        .iter()
        .filter_map(|&o| stats.get(o).ok()?.channels.as_ref())
        .filter_map(|ch| {
            let mut m = ch.absmax.clone();
            m.sort_by(f32::total_cmp);
            let median = *m.get(m.len() / 2)?;
            (median > 0.0).then(|| m[m.len() - 1] / median)
        })
        .filter(|&r| r >= OUTLIER_HINT_RATIO)
        .collect();
    let worst = ratios.iter().fold(0f32, |a, &r| a.max(r));
    (!ratios.is_empty()).then(|| {
        format!(
            "{} of {} matmul activations have channels over {OUTLIER_HINT_RATIO}x their median channel's range (up to {worst:.0}x): --outlier-channels 8 keeps such channels out of the static scales",
            ratios.len(),
            points.len()
        )
    })
}

/// How an activation's outlier channels are handled.
#[derive(Debug, Clone)]
enum OutlierPlan {
    /// Kept in float: gathered and multiplied by their weight rows beside the integer product.
    Float(Vec<usize>),
    /// Divided by `factors` (1 elsewhere) before quantization, their weight rows multiplied by
    /// them: SmoothQuant on those channels alone, free at run time (the division joins the
    /// quantization step), at the cost of a coarser step on those channels.
    Migrate { channels: Vec<usize>, factors: Vec<f32> },
}

/// Float outlier channels cost a multiply-add per output each in the GEMM's epilogue: they are
/// kept where that is at most 1/128 of the integer product's (K at least 128 per channel), and
/// migrated into the weights elsewhere.
const FLOAT_OUTLIER_MIN_K: usize = 128;

impl OutlierPlan {
    /// The plan for `channels` of an activation read by matmuls of reduction length `k`.
    fn new(st: &ValueStats, channels: Vec<usize>, k: usize) -> OutlierPlan {
        let Some(ch) = st.channels.as_ref().filter(|_| k < FLOAT_OUTLIER_MIN_K * channels.len()) else {
            return OutlierPlan::Float(channels);
        };
        let kept = (0..ch.absmax.len()).filter(|c| channels.binary_search(c).is_err()).map(|c| ch.absmax[c]);
        let kept = kept.fold(0f32, f32::max);
        let mut factors = vec![1f32; ch.absmax.len()];
        for &c in &channels {
            if kept > 0.0 {
                factors[c] = (ch.absmax[c] / kept).max(1.0);
            }
        }
        OutlierPlan::Migrate { channels, factors }
    }
}

/// `w` (`k x n`) with rows `rows` set to zero, and those rows.
fn split_rows(w: &[f32], n: usize, rows: &[usize]) -> (Vec<f32>, Vec<f32>) {
    let mut rest = w.to_vec();
    let mut taken = Vec::with_capacity(rows.len() * n);
    for &r in rows {
        taken.extend_from_slice(&w[r * n..(r + 1) * n]);
        rest[r * n..(r + 1) * n].fill(0.0);
    }
    (rest, taken)
}

/// Largest bias code written (2^30): leaves the integer sum the bias adds to room in i32.
const BIAS_CODE_LIMIT: f32 = 1073741824.0;

/// A layer's bias as `DequantizeLinear(b_i32)` at scale `x_scale * w_scale`, the integer sum's
/// own scale, so it adds to the accumulator as is (how ONNX Runtime's quantizer writes it and
/// what its integer fusions look for). Channels whose bias would overflow the codes (a tiny
/// weight scale from (near) zero weights) get a wider weight scale first.
fn int32_bias(p: &mut Patch, name: &str, bias: &[f32], x_scale: f32, q: &mut Int8Weight, w: &[f32]) -> Result<Wire> {
    let per_channel = q.scales.len() > 1;
    let channel = |i: usize| if per_channel { i } else { 0 };
    for (i, &b) in bias.iter().enumerate() {
        q.raise_scale(w, channel(i), b.abs() / (x_scale * BIAS_CODE_LIMIT));
    }
    let scales: Vec<f32> = q.scales.iter().map(|&s| x_scale * s).collect();
    let codes: Vec<i32> = bias
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            (v as f64 / scales[channel(i)] as f64).round_ties_even().clamp(i32::MIN as f64, i32::MAX as f64) as i32
        })
        .collect();
    let scale_shape = if per_channel { vec![scales.len()] } else { vec![] };
    let bq = konst(p, &format!("{name}/bias_quantized"), Tensor::from_vec(vec![bias.len()], codes)?);
    let bs = konst(p, &format!("{name}/bias_scale"), Tensor::from_vec(scale_shape, scales)?);
    let dq = p.add_node(&format!("{name}/bias_DequantizeLinear"), DequantizeLinear { axis: 0 }, vec![bq, bs]);
    Ok(Patch::wire(dq, 0))
}

/// Builds the quantize / dequantize pairs of one rewrite, one per activation, shared by its
/// readers.
struct QdqBuilder<'a> {
    scheme: &'a StaticQdq,
    g: &'a Graph,
    stats: &'a Statistics,
    made: HashMap<OutletId, ActivationQdq>,
    /// Activations with outlier channels, and how they are handled.
    outliers: HashMap<OutletId, OutlierPlan>,
    /// `Gather`s of those channels, one per activation.
    gathers: HashMap<OutletId, Wire>,
}

impl QdqBuilder<'_> {
    /// The dequantized form of activation `o`, quantizing `source` (what now computes `o`) the
    /// first time `o` is asked for.
    fn at(&mut self, p: &mut Patch, o: OutletId, source: Wire) -> Result<ActivationQdq> {
        if let Some(q) = self.made.get(&o) {
            return Ok(*q);
        }
        let s = self.scheme;
        let st = self.stats.get(o)?;
        let (mut lo, mut hi) = activation_range(st, s.method, s.percentile, s.activation_type);
        let base = value_name(self.g, o);
        let mut source = source;
        // The range the quantized values span: without the float channels, or with the
        // migrated ones divided by their factors.
        let kept = match (self.outliers.get(&o), st.channels.as_ref()) {
            (Some(OutlierPlan::Float(out)), Some(ch)) => Some(
                (0..ch.min.len())
                    .filter(|c| out.binary_search(c).is_err())
                    .fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), c| (l.min(ch.min[c]), h.max(ch.max[c]))),
            ),
            (Some(OutlierPlan::Migrate { factors, .. }), Some(ch)) => {
                let inv: Vec<f32> = factors.iter().map(|f| 1.0 / f).collect();
                let c = konst(p, &format!("{base}_outlier_divisors"), Tensor::from_vec(vec![inv.len()], inv)?);
                source = Patch::wire(
                    p.add_node(&format!("{base}_outliers_divided"), Binary(BinaryOp::Mul), vec![source, c]),
                    0,
                );
                Some((0..ch.min.len()).fold((f32::INFINITY, f32::NEG_INFINITY), |(l, h), c| {
                    (l.min(ch.min[c] / factors[c]), h.max(ch.max[c] / factors[c]))
                }))
            }
            _ => None,
        };
        if let Some((klo, khi)) = kept.filter(|(l, h)| l <= h) {
            (lo, hi) = (lo.max(klo), hi.min(khi));
        }
        let (scale, zero) = s.activation_type.params(lo, hi);
        // The histogram holds the outlier channels too, whose clipping never happens.
        let sqnr = match kept {
            Some(_) => None,
            None => st.hist.as_ref().map(|h| histogram_sqnr_db(h, scale, zero, s.activation_type.qrange())),
        };
        let zero_t = match s.activation_type {
            ActivationType::U8 => Tensor::scalar(zero as u8),
            ActivationType::I8 => Tensor::scalar(zero as i8),
        };
        let sw = konst(p, &format!("{base}_scale"), Tensor::scalar(scale));
        let zw = konst(p, &format!("{base}_zero_point"), zero_t);
        let qn = p.add_node(&format!("{base}_QuantizeLinear"), QuantizeLinear { axis: 1 }, vec![source, sw, zw]);
        let dn = p.add_node(
            &format!("{base}_DequantizeLinear"),
            DequantizeLinear { axis: 1 },
            vec![Patch::wire(qn, 0), sw, zw],
        );
        let q = (Patch::wire(dn, 0), (scale, zero), sqnr);
        self.made.insert(o, q);
        Ok(q)
    }

    /// `Gather(o, channels, axis=-1)`: activation `o`'s outlier channels, in float.
    fn gather(&mut self, p: &mut Patch, o: OutletId, channels: &[usize]) -> Result<Wire> {
        if let Some(&w) = self.gathers.get(&o) {
            return Ok(w);
        }
        let base = value_name(self.g, o);
        let ids: Vec<i64> = channels.iter().map(|&c| c as i64).collect();
        let idx = konst(p, &format!("{base}_outlier_channels"), Tensor::from_vec(vec![ids.len()], ids)?);
        let w = Patch::wire(p.add_node(&format!("{base}_outliers"), Gather { axis: -1 }, vec![o.into(), idx]), 0);
        self.gathers.insert(o, w);
        Ok(w)
    }
}

impl StaticQdq {
    fn convs(&self, g: &Graph) -> Result<Vec<ConvTarget>> {
        // Relu / Clip(0, _) fold into u8 ranges, whose zero point is then 0.
        let fold = self.activation_type == ActivationType::U8;
        find_conv_targets(g, &self.selection.exclude, &self.selection.skip, fold)
    }

    /// A CNN's residual adds (none without quantized convolutions).
    fn adds(&self, g: &Graph, convs: &[ConvTarget]) -> Vec<NodeId> {
        if convs.is_empty() {
            return vec![];
        }
        feature_map_adds(g, &self.selection.exclude, &self.selection.skip)
    }

    fn activation_points(&self, g: &Graph) -> Result<Vec<OutletId>> {
        let mut v: Vec<OutletId> = self.selection.targets(g)?.iter().map(|t| t.x).collect();
        v.extend(self.other_points(g)?);
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Weight matmul activations that may keep outlier channels: those no other quantized op
    /// reads (its range is theirs too). Gathered without `outlier_channels` too, to say when
    /// they would help.
    fn outlier_points(&self, g: &Graph) -> Result<Vec<OutletId>> {
        let others = self.other_points(g)?;
        let mut v: Vec<OutletId> =
            self.selection.targets(g)?.iter().map(|t| t.x).filter(|x| !others.contains(x)).collect();
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Quantized activations other than the weight matmuls' inputs.
    fn other_points(&self, g: &Graph) -> Result<Vec<OutletId>> {
        let mut v = vec![];
        let convs = self.convs(g)?;
        for c in &convs {
            v.push(c.x);
            if c.quantize_output {
                v.push(c.out);
            }
        }
        let outputs: Vec<OutletId> = g.outputs().iter().map(|(_, o)| *o).collect();
        for id in self.adds(g, &convs) {
            v.extend(g.node(id).inputs.iter().copied());
            v.extend(Some(OutletId::new(id, 0)).filter(|o| !outputs.contains(o)));
        }
        if self.activation_matmuls {
            for id in activation_matmuls(g, &self.selection.exclude, &self.selection.skip) {
                v.extend(g.node(id).inputs.iter().copied());
            }
        }
        v.sort();
        v.dedup();
        Ok(v)
    }

    /// Rewrites convolution `c` (its input's QDQ from `qdq`) and quantizes its output.
    fn conv(&self, p: &mut Patch, qdq: &mut QdqBuilder, c: &ConvTarget) -> Result<LayerReport> {
        let (x, act, act_sqnr) = qdq.at(p, c.x, c.x.into())?;
        let (m, w) = (c.channels(), c.w.as_slice::<f32>()?);
        let mut q = quantize_int8_conv_weight(w, m, self.granularity);
        let per_channel = q.scales.len() > 1;
        let bias = match &c.bias {
            Some(b) => Some(int32_bias(p, &c.name, b.as_slice::<f32>()?, act.0, &mut q, w)?),
            None => None,
        };
        let channel_shape = |len: usize| if per_channel { vec![len] } else { vec![] };
        let wq = konst(
            p,
            &format!("{}/weight_quantized", c.name),
            Tensor::from_vec(c.w.shape().to_vec(), q.values.clone())?,
        );
        let ws = konst(p, &format!("{}/weight_scale", c.name), Tensor::from_vec(channel_shape(m), q.scales.clone())?);
        let wz = konst(
            p,
            &format!("{}/weight_zero_point", c.name),
            Tensor::from_vec(channel_shape(m), vec![0i8; q.scales.len()])?,
        );
        let wd =
            p.add_node(&format!("{}/weight_DequantizeLinear", c.name), DequantizeLinear { axis: 0 }, vec![wq, ws, wz]);
        let mut inputs = vec![x, Patch::wire(wd, 0)];
        inputs.extend(bias);
        let conv = Patch::wire(p.add_node(&c.name, Conv { attrs: c.attrs.clone() }, inputs), 0);
        let y = if c.quantize_output { qdq.at(p, c.out, conv)?.0 } else { conv };
        p.shunt(c.out, y);
        let k = w.len() / m;
        let mut r = int8_report(&c.name, [k, m], "int8-qdq-conv", &q, w);
        r.activation = Some(act);
        r.activation_sqnr_db = act_sqnr;
        if c.folds_activation {
            r.note = Some(format!("{} folded into the output range", qdq.g.node(c.out.node).op.as_def().name()));
        }
        Ok(r)
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
        v.extend(self.outlier_points(g)?.into_iter().map(|outlet| StatPoint { outlet, kind: StatKind::Channels }));
        Ok(v)
    }

    fn apply(&self, g: &Graph, stats: &Statistics) -> Result<(Graph, Report)> {
        let targets = self.selection.targets(g)?;
        let convs = self.convs(g)?;
        require_some(&targets, Some(&convs), self.name())?;
        let mut p = Patch::new();
        let mut report = Report::default();
        let mut outliers = HashMap::new();
        let points = self.outlier_points(g)?;
        if self.outlier_channels == 0 {
            report.notes.extend(outlier_hint(&points, stats));
        }
        for o in points {
            let st = stats.get(o)?;
            if let Some(c) = outlier_channels(st, self.outlier_channels) {
                let k = targets.iter().filter(|t| t.x == o).map(|t| t.k).min().unwrap_or(0);
                outliers.insert(o, OutlierPlan::new(st, c, k));
            }
        }
        if !outliers.is_empty() {
            let float = outliers.values().filter(|p| matches!(p, OutlierPlan::Float(_))).count();
            report.notes.push(format!(
                "outlier channels: {} activations keep up to {} channels out of their range ({float} in float, {} migrated into the weights)",
                outliers.len(),
                self.outlier_channels,
                outliers.len() - float
            ));
        }
        let mut qdq = QdqBuilder { scheme: self, g, stats, made: HashMap::new(), outliers, gathers: HashMap::new() };
        // Convolutions and residual adds in graph order, so each one's quantized output exists
        // before the layers reading it.
        let adds = self.adds(g, &convs);
        let mut steps: Vec<(NodeId, Option<&ConvTarget>)> = convs.iter().map(|c| (c.node, Some(c))).collect();
        steps.extend(adds.iter().map(|&id| (id, None)));
        steps.sort_by_key(|(id, _)| *id);
        let outputs: Vec<OutletId> = g.outputs().iter().map(|(_, o)| *o).collect();
        for (id, conv) in steps {
            match conv {
                Some(c) => report.layers.push(self.conv(&mut p, &mut qdq, c)?),
                None => {
                    let n = g.node(id);
                    let a = qdq.at(&mut p, n.inputs[0], n.inputs[0].into())?.0;
                    let b = qdq.at(&mut p, n.inputs[1], n.inputs[1].into())?.0;
                    let sum = Patch::wire(p.add_node(&n.name, Binary(BinaryOp::Add), vec![a, b]), 0);
                    let out = OutletId::new(id, 0);
                    let y = if outputs.contains(&out) { sum } else { qdq.at(&mut p, out, sum)?.0 };
                    p.shunt(out, y);
                }
            }
        }
        if !adds.is_empty() {
            report.notes.push(format!("{} residual adds read and write quantized activations", adds.len()));
        }
        for t in &targets {
            let plan = qdq.outliers.get(&t.x).cloned();
            // Float outlier rows leave the int8 weight (zero there) for a float one of their
            // own; migrated ones are multiplied by their factors.
            let (split, migrated) = match &plan {
                Some(OutlierPlan::Float(rows)) => (Some((rows, split_rows(t.weight()?, t.n, rows))), None),
                Some(OutlierPlan::Migrate { factors, .. }) => {
                    (None, Some(t.weight()?.iter().enumerate().map(|(i, &v)| v * factors[i / t.n]).collect::<Vec<_>>()))
                }
                None => (None, None),
            };
            let w = match (&split, &migrated) {
                (Some((_, (rest, _))), _) => rest.as_slice(),
                (_, Some(w)) => w.as_slice(),
                _ => t.weight()?,
            };
            let mut q = quantize_int8_weight(w, t.n, self.granularity);
            let (xw, act, act_sqnr) = qdq.at(&mut p, t.x, t.x.into())?;
            // The bias add in integer form too (unless bias correction rewrites it), so ONNX
            // Runtime fuses the layer into an integer op instead of dequantizing its weight per run.
            let bias_const = t.bias.filter(|_| !self.bias_correction).and_then(|(add, ix)| {
                let b = g.fact(g.node(add).inputs[ix]).konst.clone()?;
                Some((add, ix, b))
            });
            let bias = match bias_const {
                Some((add, ix, b)) => {
                    Some((add, ix, int32_bias(&mut p, &t.name, b.as_slice::<f32>()?, act.0, &mut q, w)?))
                }
                None => None,
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
            let mut mm = Patch::wire(p.add_node(&t.name, MatMul, vec![xw, Patch::wire(wd, 0)]), 0);
            if let Some((rows, (_, taken))) = &split {
                let xo = qdq.gather(&mut p, t.x, rows)?;
                let wo = konst(
                    &mut p,
                    &format!("{}/outlier_weight", t.name),
                    Tensor::from_vec(vec![rows.len(), t.n], taken.clone())?,
                );
                let side = Patch::wire(p.add_node(&format!("{}/outlier_MatMul", t.name), MatMul, vec![xo, wo]), 0);
                mm = Patch::wire(
                    p.add_node(&format!("{}/outlier_Add", t.name), Binary(BinaryOp::Add), vec![mm, side]),
                    0,
                );
            }
            p.shunt(OutletId::new(t.node, 0), mm);
            if let Some((add, ix, b)) = bias {
                let ins = if ix == 0 { vec![b, mm] } else { vec![mm, b] };
                let a = p.add_node(&g.node(add).name, Binary(BinaryOp::Add), ins);
                p.shunt(OutletId::new(add, 0), Patch::wire(a, 0));
            }
            let mut r = int8_report(&t.name, [t.k, t.n], self.name(), &q, w);
            r.activation = Some(act);
            r.activation_sqnr_db = act_sqnr;
            if self.bias_correction {
                // The weight as the original activation sees it.
                let mut wq = q.dequantize();
                if let Some((rows, (_, taken))) = &split {
                    for (&row, w) in rows.iter().zip(taken.chunks_exact(t.n)) {
                        wq[row * t.n..(row + 1) * t.n].copy_from_slice(w);
                    }
                }
                if let Some(OutlierPlan::Migrate { factors, .. }) = &plan {
                    wq.iter_mut().enumerate().for_each(|(i, v)| *v /= factors[i / t.n]);
                }
                r.note = correct_bias(&mut p, g, t, stats, mm, &wq)?;
            }
            if let Some(plan) = &plan {
                let note = match plan {
                    OutlierPlan::Float(c) => format!("{} outlier channels in float", c.len()),
                    OutlierPlan::Migrate { channels, factors } => format!(
                        "{} outlier channels migrated into the weight (factors up to {:.1})",
                        channels.len(),
                        factors.iter().fold(1f32, |m, &f| m.max(f))
                    ),
                };
                r.note = Some(match r.note {
                    Some(n) => format!("{n}; {note}"),
                    None => note,
                });
            }
            report.layers.push(r);
        }
        if self.activation_matmuls {
            for id in activation_matmuls(g, &self.selection.exclude, &self.selection.skip) {
                let n = g.node(id);
                let a = qdq.at(&mut p, n.inputs[0], n.inputs[0].into())?;
                let b = qdq.at(&mut p, n.inputs[1], n.inputs[1].into())?;
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
        require_some(&targets, None, self.name())?;
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
                let r = int8_report(&t.name, [t.k, t.n], &format!("{scheme}{algo}"), &q, w);
                (Patch::wire(mm, 0), q.dequantize(), r)
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
        require_some(&targets, None, self.name())?;
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

#[cfg(test)]
mod outlier_tests {
    use super::{outlier_channels, split_rows, OutlierPlan};
    use crate::calib::{Channels, ValueStats};

    /// 16 channels: channel 3 reaches 40, channel 9 reaches -12, the rest 2 at most.
    fn stats() -> ValueStats {
        let mut min = vec![-2f32; 16];
        let mut max = vec![2f32; 16];
        max[3] = 40.0;
        min[9] = -12.0;
        let absmax = min.iter().zip(&max).map(|(a, b)| a.abs().max(b.abs())).collect();
        let channels = Channels { absmax, min, max, sum: vec![0.0; 16], rows: 1 };
        ValueStats { min: -12.0, max: 40.0, channels: Some(channels), ..Default::default() }
    }

    #[test]
    fn largest_channels_are_taken_up_to_an_eighth() {
        assert_eq!(outlier_channels(&stats(), 2), Some(vec![3, 9]));
        assert_eq!(outlier_channels(&stats(), 8), Some(vec![3, 9]), "capped at 16 / 8");
        assert_eq!(outlier_channels(&stats(), 0), None);
        assert_eq!(outlier_channels(&ValueStats::default(), 2), None, "no per-channel statistics");
    }

    #[test]
    fn float_where_k_is_long_enough_else_migrated() {
        assert!(matches!(OutlierPlan::new(&stats(), vec![3, 9], 256), OutlierPlan::Float(c) if c == [3, 9]));
        let OutlierPlan::Migrate { channels, factors } = OutlierPlan::new(&stats(), vec![3, 9], 255) else {
            panic!("K = 255 < 128 x 2 migrates")
        };
        assert_eq!(channels, [3, 9]);
        // Divided down to the other channels' largest magnitude (2); the rest unchanged.
        assert_eq!((factors[3], factors[9], factors[0]), (20.0, 6.0, 1.0));
    }

    #[test]
    fn rows_split_into_zeroed_and_taken() {
        let w: Vec<f32> = (0..12).map(|v| v as f32).collect();
        let (rest, taken) = split_rows(&w, 3, &[1, 3]);
        assert_eq!(taken, [3.0, 4.0, 5.0, 9.0, 10.0, 11.0]);
        assert_eq!(rest, [0.0, 1.0, 2.0, 0.0, 0.0, 0.0, 6.0, 7.0, 8.0, 0.0, 0.0, 0.0]);
    }
}

#[cfg(test)]
mod tests {
    use crate::pipeline::quantize;
    use crate::quant::Granularity;
    use crate::range::ActivationType;
    use crate::recipe::{Mode, QuantRecipe};
    use slimnn_ir::ops::{
        BatchNorm, Binary, BinaryOp, Clip, Conv, ConvAttrs, Flatten, Gemm, GlobalPool, Unary, UnaryOp,
    };
    use slimnn_ir::{Fact, Graph, Op, OutletId};
    use slimnn_runtime::{Runnable, RuntimeConfig};
    use slimnn_tensor::{DType, Tensor};

    /// Deterministic values in `[-1, 1)`.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// A small mobile-style CNN: conv 3x3 + BatchNorm + ReLU6, depthwise 3x3 + ReLU, pointwise
    /// 1x1 with a residual add, global average pool, classifier Gemm.
    fn cnn() -> Graph {
        let mut g = Graph::default();
        let c = |g: &mut Graph, name: &str, shape: Vec<usize>, seed: u64, scale: f32| -> OutletId {
            let n: usize = shape.iter().product();
            let mut v: Vec<f32> = values(n, seed).into_iter().map(|v| v * scale).collect();
            if name.starts_with('w') && name != "w4" {
                // A dead output channel (all-zero weights) whose bias still matters.
                v[..n / shape[0]].fill(0.0);
            }
            g.add_const(name, Tensor::from_vec(shape, v).unwrap()).unwrap()
        };
        let x = g.add_input("x", Fact::known(DType::F32, &[1, 3, 8, 8])).unwrap();
        let pad1 = ConvAttrs { pads: vec![1, 1, 1, 1], ..ConvAttrs::default() };
        let (w1, b1) = (c(&mut g, "w1", vec![8, 3, 3, 3], 1, 0.5), c(&mut g, "b1", vec![8], 2, 0.2));
        let y = g.add_node("conv1", Conv { attrs: pad1.clone() }, vec![x, w1, b1]).unwrap()[0];
        let bn: Vec<OutletId> = (0..4).map(|i| c(&mut g, &format!("bn{i}"), vec![8], 10 + i, 0.3)).collect();
        let var = g.add_const("bn_var", Tensor::from_vec(vec![8], vec![0.5f32; 8]).unwrap()).unwrap();
        let mean_ix = 2;
        let y = g.add_node("bn", BatchNorm { epsilon: 1e-3 }, vec![y, bn[0], bn[1], bn[mean_ix], var]).unwrap()[0];
        let (lo, hi) =
            (g.add_const("lo", Tensor::scalar(0f32)).unwrap(), g.add_const("hi", Tensor::scalar(6f32)).unwrap());
        let a1 = g.add_node("relu6", Clip, vec![y, lo, hi]).unwrap()[0];
        let dw_attrs = ConvAttrs { group: 8, ..pad1 };
        let (w2, b2) = (c(&mut g, "w2", vec![8, 1, 3, 3], 3, 0.8), c(&mut g, "b2", vec![8], 4, 0.2));
        let y = g.add_node("dw", Conv { attrs: dw_attrs }, vec![a1, w2, b2]).unwrap()[0];
        let a2 = g.add_node("relu", Unary(UnaryOp::Relu), vec![y]).unwrap()[0];
        let (w3, b3) = (c(&mut g, "w3", vec![8, 8, 1, 1], 5, 0.4), c(&mut g, "b3", vec![8], 6, 0.1));
        let y = g.add_node("pw", Conv { attrs: ConvAttrs::default() }, vec![a2, w3, b3]).unwrap()[0];
        let y = g.add_node("residual", Binary(BinaryOp::Add), vec![y, a1]).unwrap()[0];
        let y = g.add_node("pool", GlobalPool { max: false }, vec![y]).unwrap()[0];
        let y = g.add_node("flatten", Flatten { axis: 1 }, vec![y]).unwrap()[0];
        let (w4, b4) = (c(&mut g, "w4", vec![5, 8], 7, 0.5), c(&mut g, "b4", vec![5], 8, 0.1));
        let gemm = Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true };
        let y = g.add_node("fc", gemm, vec![y, w4, b4]).unwrap()[0];
        g.add_output("logits", y);
        g
    }

    fn input(seed: u64) -> Vec<(String, Tensor)> {
        let v = values(3 * 64, seed).into_iter().map(|v| v * 2.0).collect();
        vec![("x".to_string(), Tensor::from_vec(vec![1, 3, 8, 8], v).unwrap())]
    }

    fn cosine(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
        let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        dot / (a.iter().map(|x| x * x).sum::<f64>() * b.iter().map(|x| x * x).sum::<f64>()).sqrt()
    }

    /// Static quantization of convolutions: BatchNorm folded, ReLU6 / ReLU folded into u8 ranges
    /// (kept with i8), every conv written as `Q(Conv(DQ, DQ, DQ(b_i32)))`, which the runtime
    /// executes as `QLinearConv`; close to the float model on unseen inputs.
    #[test]
    fn static_quantization_of_convolutions() {
        let g = cnn();
        let calibration: Vec<Vec<(String, Tensor)>> = (0..8).map(|i| input(100 + i)).collect();
        for (activation_type, granularity) in [
            (ActivationType::U8, Granularity::PerChannel),
            (ActivationType::U8, Granularity::PerTensor),
            (ActivationType::I8, Granularity::PerChannel),
        ] {
            let case = format!("{activation_type:?} {granularity:?}");
            let recipe = QuantRecipe { mode: Mode::Static, activation_type, granularity, ..QuantRecipe::default() };
            let (q, report) = quantize(&g, &recipe, &calibration, &mut |_| {}).unwrap();
            let h = q.op_histogram();
            let folded = activation_type == ActivationType::U8;
            let kept = if folded { None } else { Some(&1) };
            assert_eq!(h.get("BatchNormalization"), None, "{case}: {h:?}");
            assert_eq!((h.get("Conv"), h.get("Clip"), h.get("Relu")), (Some(&3), kept, kept), "{case}: {h:?}");
            // x, the three conv outputs (after their activation when folded), the residual sum
            // and the fc input; unfolded activations' outputs are quantized again for their reader.
            assert_eq!(h.get("QuantizeLinear"), Some(if folded { &6 } else { &8 }), "{case}: {h:?}");
            // The residual add reads quantized activations (ONNX Runtime makes it a QLinearAdd).
            let add = q.nodes().iter().find(|n| n.name == "residual").expect("the residual add");
            let reads_dq = add.inputs.iter().all(|i| matches!(q.node(i.node).op, Op::DequantizeLinear(_)));
            assert!(reads_dq, "{case}: {:?}", add.inputs);
            let schemes: Vec<&str> = report.layers.iter().map(|l| l.scheme.as_str()).collect();
            assert_eq!(schemes, ["int8-qdq-conv", "int8-qdq-conv", "int8-qdq-conv", "int8-qdq"], "{case}");
            assert_eq!(report.layers[0].shape, [27, 8], "{case}");
            assert!(report.layers[..3].iter().all(|l| l.weight_sqnr_db.unwrap() > 30.0), "{case}: {report:?}");

            let rt = Runnable::new(q.clone(), RuntimeConfig::with_threads(1)).unwrap();
            let fused = rt.report().passes.iter().find(|(p, _)| p == "fuse-qdq-conv").map(|(_, n)| *n);
            assert_eq!(fused, Some(3), "{case}: {:?}", rt.report().passes);
            let kernels = rt.plan_for(&[vec![1, 3, 8, 8]]).unwrap().summary().kernels;
            let qconvs: usize = kernels.iter().filter(|(k, _)| k.starts_with("qlinear_conv")).map(|(_, n)| n).sum();
            assert_eq!(qconvs, 3, "{case}: {kernels:?}");
            let mut state = rt.new_state();
            for seed in 0..4 {
                let x = input(seed);
                let float = g.eval(x.clone()).unwrap();
                let graph = q.eval(x.clone()).unwrap();
                let runtime = rt.run(&mut state, x).unwrap();
                let (to_float, to_graph) = (cosine(&float[0], &graph[0]), cosine(&graph[0], &runtime[0]));
                assert!(to_float > 0.999, "{case}: cosine to the float model {to_float}");
                // The integer convolution rounds its sum once less than the QDQ graph.
                assert!(to_graph > 0.9999, "{case}: runtime vs QDQ graph cosine {to_graph}");
            }
        }
    }

    /// A conv whose activation's output is a model output keeps the activation: folded away,
    /// nothing would clamp the float output.
    #[test]
    fn activation_of_a_model_output_stays() {
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[1, 3, 8, 8])).unwrap();
        let w = g.add_const("w", Tensor::from_vec(vec![4, 3, 3, 3], values(108, 21)).unwrap()).unwrap();
        let attrs = ConvAttrs { pads: vec![1, 1, 1, 1], ..ConvAttrs::default() };
        let y = g.add_node("conv", Conv { attrs }, vec![x, w]).unwrap()[0];
        let y = g.add_node("relu", Unary(UnaryOp::Relu), vec![y]).unwrap()[0];
        g.add_output("y", y);
        let calibration: Vec<Vec<(String, Tensor)>> = (0..4).map(|i| input(200 + i)).collect();
        let recipe = QuantRecipe { mode: Mode::Static, ..QuantRecipe::default() };
        let (q, _) = quantize(&g, &recipe, &calibration, &mut |_| {}).unwrap();
        let h = q.op_histogram();
        // x and the conv output are quantized, the ReLU runs on the dequantized output.
        assert_eq!((h.get("Relu"), h.get("QuantizeLinear")), (Some(&1), Some(&2)), "{h:?}");
        let out = q.eval(input(7)).unwrap();
        assert!(out[0].as_slice::<f32>().unwrap().iter().all(|&v| v >= 0.0));
        assert!(cosine(&out[0], &g.eval(input(7)).unwrap()[0]) > 0.999);
    }
}

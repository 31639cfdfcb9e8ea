//! Graph -> ModelProto. Each canonical op is written in the form of the exported opset (17, or
//! the lowest later one the graph needs: 20 for Gelu, ...). Constants become initializers with
//! `raw_data`; value names come from the graph when it has them and are generated otherwise.

use super::convert::reduce_axes_as_input;
use super::proto::attribute_proto::AttributeType;
use super::proto::tensor_shape_proto::{dimension, Dimension};
use super::proto::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use super::tensor::{dtype_to_onnx, tensor_to_proto};
use crate::{FormatError, Result};
use slimnn_ir::ops::*;
use slimnn_ir::{Fact, Graph, Op, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};
use std::collections::{HashMap, HashSet};

/// The opset written unless the graph needs a later one.
pub const BASE_OPSET: i64 = 17;

fn attr(name: &str, ty: AttributeType) -> AttributeProto {
    AttributeProto { name: Some(name.to_string()), r#type: Some(ty as i32), ..Default::default() }
}

fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto { i: Some(v), ..attr(name, AttributeType::Int) }
}

fn attr_f(name: &str, v: f32) -> AttributeProto {
    AttributeProto { f: Some(v), ..attr(name, AttributeType::Float) }
}

fn attr_s(name: &str, v: &str) -> AttributeProto {
    AttributeProto { s: Some(v.as_bytes().to_vec()), ..attr(name, AttributeType::String) }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto { ints: v.to_vec(), ..attr(name, AttributeType::Ints) }
}

fn attr_usizes(name: &str, v: &[usize]) -> AttributeProto {
    attr_ints(name, &v.iter().map(|&x| x as i64).collect::<Vec<_>>())
}

fn attr_t(name: &str, t: TensorProto) -> AttributeProto {
    AttributeProto { t: Some(t), ..attr(name, AttributeType::Tensor) }
}

/// The opset the graph needs: [`BASE_OPSET`] unless one of its ops only exists (in the form
/// slimnn holds it) in a later one.
pub fn required_opset(g: &Graph) -> i64 {
    let mut v = BASE_OPSET;
    for n in g.nodes() {
        let need = match &n.op {
            Op::Unary(Unary(UnaryOp::Gelu { .. })) => 20,
            Op::Pad(p) if p.mode == PadMode::Wrap => 19,
            Op::Pad(_) if n.inputs.len() > 3 => 18,
            // Run-time axes are an input only from 18 (13 for ReduceSum, below the base).
            Op::Reduce(_) if n.inputs.len() > 1 => 18,
            Op::Resize(r) if r.coord == CoordMode::HalfPixelSymmetric => 19,
            Op::Resize(r) if r.axes.is_some() => 18,
            Op::Pool(p) if matches!(p.kind, PoolKind::Average { .. }) && p.attrs.dilations.iter().any(|&d| d != 1) => {
                19
            }
            Op::QuantizeLinear(_) if n.inputs.get(2).is_some_and(|&z| g.fact(z).dtype == DType::I16) => 21,
            Op::DequantizeLinear(_) if n.inputs.first().is_some_and(|&x| g.fact(x).dtype == DType::I16) => 21,
            _ => BASE_OPSET,
        };
        v = v.max(need);
    }
    v
}

/// Domain of ONNX Runtime's contrib ops (`MatMulNBits`, `GatherBlockQuantized`).
pub const MICROSOFT_DOMAIN: &str = "com.microsoft";

/// The default-domain opset, plus `com.microsoft` version 1 when a contrib op is used.
fn opset_imports(g: &Graph, opset: i64) -> Vec<OperatorSetIdProto> {
    let mut v = vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }];
    if g.nodes().iter().any(|n| matches!(n.op, Op::MatMulNBits(_) | Op::GatherBlockQuantized(_))) {
        v.push(OperatorSetIdProto { domain: Some(MICROSOFT_DOMAIN.into()), version: Some(1) });
    }
    if uses_row_quant(g) {
        v.push(OperatorSetIdProto { domain: Some(SLIMNN_DOMAIN.into()), version: Some(1) });
    }
    v
}

fn uses_row_quant(g: &Graph) -> bool {
    g.nodes().iter().any(|n| matches!(n.op, Op::DynamicRowQuantMatMul(_)))
}

fn ir_version(opset: i64) -> i64 {
    match opset {
        ..=18 => 8,
        19 | 20 => 9,
        _ => 10,
    }
}

fn value_info(name: &str, f: &Fact) -> Result<ValueInfoProto> {
    let elem = dtype_to_onnx(f.dtype)
        .ok_or_else(|| FormatError::Unsupported(format!("value '{name}': {} has no ONNX tensor type", f.dtype)))?;
    let dim = f
        .shape
        .iter()
        .map(|d| Dimension {
            denotation: None,
            value: match d {
                Dim::Known(n) => Some(dimension::Value::DimValue(*n as i64)),
                Dim::Sym(s) => Some(dimension::Value::DimParam(s.to_string())),
                Dim::Unknown => None,
            },
        })
        .collect();
    Ok(ValueInfoProto {
        name: Some(name.to_string()),
        r#type: Some(TypeProto {
            denotation: None,
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        ..Default::default()
    })
}

struct Ex<'g> {
    g: &'g Graph,
    opset: i64,
    names: HashMap<OutletId, String>,
    taken: HashSet<String>,
    node_names: HashSet<String>,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
}

impl Ex<'_> {
    /// A value name not used yet, `base` itself when free.
    fn fresh(&mut self, base: &str) -> String {
        let base = if base.is_empty() { "v" } else { base };
        let mut name = base.to_string();
        let mut k = 1;
        while self.taken.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.taken.insert(name.clone());
        name
    }

    fn fresh_node_name(&mut self, base: &str) -> String {
        let base = if base.is_empty() { "node" } else { base };
        let mut name = base.to_string();
        let mut k = 1;
        while self.node_names.contains(&name) {
            name = format!("{base}_{k}");
            k += 1;
        }
        self.node_names.insert(name.clone());
        name
    }

    fn name(&self, o: OutletId) -> Result<String> {
        self.names.get(&o).cloned().ok_or_else(|| {
            FormatError::Invalid(format!("outlet {}:{} has no name (graph not in order?)", o.node, o.slot))
        })
    }

    fn emit(
        &mut self,
        node: &str,
        op_type: &str,
        inputs: Vec<String>,
        outputs: Vec<String>,
        attribute: Vec<AttributeProto>,
    ) {
        let name = self.fresh_node_name(node);
        self.nodes.push(NodeProto {
            input: inputs,
            output: outputs,
            name: Some(name),
            op_type: Some(op_type.to_string()),
            attribute,
            ..Default::default()
        });
    }

    /// Adds an initializer for a helper constant (axes, shapes) and returns its name.
    fn konst(&mut self, base: &str, t: &Tensor) -> Result<String> {
        let name = self.fresh(base);
        self.inits.push(tensor_to_proto(t, &name)?);
        Ok(name)
    }

    fn i64s(&mut self, base: &str, v: &[i64]) -> Result<String> {
        let t = Tensor::from_vec(vec![v.len()], v.to_vec())?;
        self.konst(base, &t)
    }
}

/// Builds the ModelProto of a graph.
pub fn export(g: &Graph) -> Result<ModelProto> {
    g.check_consistency()?;
    let opset = required_opset(g);
    let mut ex = Ex {
        g,
        opset,
        names: HashMap::new(),
        taken: HashSet::new(),
        node_names: HashSet::new(),
        nodes: Vec::new(),
        inits: Vec::new(),
    };

    // Names: graph inputs keep theirs; a graph output names the outlet it reads unless that
    // outlet has a name of its own (then an Identity makes the output); the rest use their
    // own names when free, else generated ones.
    for &i in g.inputs() {
        let name = g.node(i).name.clone();
        ex.taken.insert(name.clone());
        ex.names.insert(OutletId::new(i, 0), name);
    }
    let mut seen_outputs = HashSet::new();
    for (name, o) in g.outputs() {
        if !seen_outputs.insert(name.as_str()) {
            return Err(FormatError::Invalid(format!("graph output name '{name}' is used twice")));
        }
        if ex.names.get(o) == Some(name) {
            continue;
        }
        if ex.taken.contains(name) {
            return Err(FormatError::Invalid(format!("graph output '{name}' has the name of a graph input")));
        }
        ex.taken.insert(name.clone());
        let own = g.node(o.node).output_names.get(o.slot).cloned().flatten();
        if !ex.names.contains_key(o) && own.as_ref().is_none_or(|s| s == name || s.is_empty()) {
            ex.names.insert(*o, name.clone());
        }
    }
    for (id, n) in g.nodes().iter().enumerate() {
        for slot in 0..n.outputs.len() {
            let o = OutletId::new(id, slot);
            if ex.names.contains_key(&o) {
                continue;
            }
            let name = match n.output_names.get(slot).cloned().flatten() {
                Some(s) if !s.is_empty() => ex.fresh(&s),
                _ if slot == 0 => ex.fresh(&n.name),
                _ => ex.fresh(&format!("{}_out{slot}", n.name)),
            };
            ex.names.insert(o, name);
        }
    }

    for (id, n) in g.nodes().iter().enumerate() {
        if let Op::Input(_) = n.op {
            continue;
        }
        write_node(&mut ex, id).map_err(|e| match e {
            FormatError::Unsupported(m) => {
                FormatError::Unsupported(format!("exporting node '{}' ({}): {m}", n.name, n.op.as_def().name()))
            }
            other => other,
        })?;
    }

    let mut inputs = Vec::new();
    for k in 0..g.inputs().len() {
        inputs.push(value_info(g.input_name(k), g.input_fact(k))?);
    }
    let mut outputs = Vec::new();
    for (name, o) in g.outputs() {
        let have = ex.name(*o)?;
        if &have != name {
            ex.emit(name, "Identity", vec![have], vec![name.clone()], vec![]);
        }
        outputs.push(value_info(name, g.fact(*o))?);
    }

    let graph = GraphProto {
        node: ex.nodes,
        name: Some("main".into()),
        initializer: ex.inits,
        input: inputs,
        output: outputs,
        ..Default::default()
    };
    Ok(ModelProto {
        ir_version: Some(ir_version(opset)),
        opset_import: opset_imports(g, opset),
        functions: if uses_row_quant(g) { vec![super::functions::dynamic_row_quant_matmul(opset)] } else { vec![] },
        producer_name: Some("slimnn".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        metadata_props: g
            .metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto { key: Some(k.clone()), value: Some(v.clone()) })
            .collect(),
        ..Default::default()
    })
}

fn unary_name(u: UnaryOp) -> &'static str {
    match u {
        UnaryOp::Neg => "Neg",
        UnaryOp::Abs => "Abs",
        UnaryOp::Sqrt => "Sqrt",
        UnaryOp::Reciprocal => "Reciprocal",
        UnaryOp::Exp => "Exp",
        UnaryOp::Log => "Log",
        UnaryOp::Erf => "Erf",
        UnaryOp::Tanh => "Tanh",
        UnaryOp::Sigmoid => "Sigmoid",
        UnaryOp::Relu => "Relu",
        UnaryOp::Not => "Not",
        UnaryOp::Floor => "Floor",
        UnaryOp::Ceil => "Ceil",
        UnaryOp::Round => "Round",
        UnaryOp::Sign => "Sign",
        UnaryOp::Sin => "Sin",
        UnaryOp::Cos => "Cos",
        UnaryOp::Softplus => "Softplus",
        UnaryOp::LeakyRelu { .. } => "LeakyRelu",
        UnaryOp::Elu { .. } => "Elu",
        UnaryOp::HardSigmoid { .. } => "HardSigmoid",
        UnaryOp::HardSwish => "HardSwish",
        UnaryOp::Gelu { .. } => "Gelu",
    }
}

fn binary_name(b: BinaryOp) -> &'static str {
    match b {
        BinaryOp::Add => "Add",
        BinaryOp::Sub => "Sub",
        BinaryOp::Mul => "Mul",
        BinaryOp::Div => "Div",
        BinaryOp::Pow => "Pow",
        BinaryOp::Max => "Max",
        BinaryOp::Min => "Min",
        BinaryOp::Mod { .. } => "Mod",
        BinaryOp::PRelu => "PRelu",
        BinaryOp::Equal => "Equal",
        BinaryOp::Less => "Less",
        BinaryOp::LessOrEqual => "LessOrEqual",
        BinaryOp::Greater => "Greater",
        BinaryOp::GreaterOrEqual => "GreaterOrEqual",
        BinaryOp::And => "And",
        BinaryOp::Or => "Or",
        BinaryOp::Xor => "Xor",
    }
}

fn reduce_name(r: ReduceOp) -> &'static str {
    match r {
        ReduceOp::Sum => "ReduceSum",
        ReduceOp::Mean => "ReduceMean",
        ReduceOp::Max => "ReduceMax",
        ReduceOp::Min => "ReduceMin",
        ReduceOp::Prod => "ReduceProd",
        ReduceOp::L1 => "ReduceL1",
        ReduceOp::L2 => "ReduceL2",
        ReduceOp::SumSquare => "ReduceSumSquare",
        ReduceOp::LogSum => "ReduceLogSum",
        ReduceOp::LogSumExp => "ReduceLogSumExp",
    }
}

fn auto_pad_name(a: AutoPad) -> &'static str {
    match a {
        AutoPad::NotSet => "NOTSET",
        AutoPad::SameUpper => "SAME_UPPER",
        AutoPad::SameLower => "SAME_LOWER",
        AutoPad::Valid => "VALID",
    }
}

fn conv_attrs(a: &ConvAttrs) -> Vec<AttributeProto> {
    let mut v = Vec::new();
    if let Some(k) = &a.kernel_shape {
        v.push(attr_usizes("kernel_shape", k));
    }
    for (name, x) in [("strides", &a.strides), ("pads", &a.pads), ("dilations", &a.dilations)] {
        if !x.is_empty() {
            v.push(attr_usizes(name, x));
        }
    }
    if a.group != 1 {
        v.push(attr_i("group", a.group as i64));
    }
    if a.auto_pad != AutoPad::NotSet {
        v.push(attr_s("auto_pad", auto_pad_name(a.auto_pad)));
    }
    v
}

fn write_node(ex: &mut Ex, id: usize) -> Result<()> {
    let g = ex.g;
    let n = g.node(id);
    let ins: Vec<String> = n.inputs.iter().map(|&o| ex.name(o)).collect::<Result<_>>()?;
    let outs: Vec<String> = (0..n.outputs.len()).map(|s| ex.name(OutletId::new(id, s))).collect::<Result<_>>()?;
    let name = n.name.as_str();
    let opset = ex.opset;
    let simple = |ex: &mut Ex, op_type: &str, attrs: Vec<AttributeProto>| {
        ex.emit(name, op_type, ins.clone(), outs.clone(), attrs);
    };
    match &n.op {
        Op::Input(_) => {}
        Op::Const(c) => {
            let t = tensor_to_proto(&c.0, &outs[0])?;
            ex.inits.push(t);
        }
        Op::Unary(Unary(u)) => {
            let attrs = match *u {
                UnaryOp::LeakyRelu { alpha } => vec![attr_f("alpha", alpha)],
                UnaryOp::Elu { alpha } => vec![attr_f("alpha", alpha)],
                UnaryOp::HardSigmoid { alpha, beta } => {
                    vec![attr_f("alpha", alpha), attr_f("beta", beta)]
                }
                UnaryOp::Gelu { tanh: true } => vec![attr_s("approximate", "tanh")],
                _ => vec![],
            };
            simple(ex, unary_name(*u), attrs);
        }
        Op::Binary(Binary(b)) => {
            let attrs = match b {
                BinaryOp::Mod { fmod: true } => vec![attr_i("fmod", 1)],
                _ => vec![],
            };
            simple(ex, binary_name(*b), attrs);
        }
        Op::Where(_) => simple(ex, "Where", vec![]),
        Op::Cast(c) => {
            let to = dtype_to_onnx(c.to).ok_or_else(|| FormatError::Unsupported(format!("cast to {}", c.to)))?;
            simple(ex, "Cast", vec![attr_i("to", to as i64)]);
        }
        Op::Clip(_) => simple(ex, "Clip", vec![]),
        Op::Identity(_) => simple(ex, "Identity", vec![]),
        Op::MatMul(_) => simple(ex, "MatMul", vec![]),
        Op::Gemm(gm) => {
            let mut a = vec![attr_f("alpha", gm.alpha), attr_f("beta", gm.beta)];
            if gm.trans_a {
                a.push(attr_i("transA", 1));
            }
            if gm.trans_b {
                a.push(attr_i("transB", 1));
            }
            simple(ex, "Gemm", a);
        }
        Op::Softmax(Softmax { axis, legacy_2d }) | Op::LogSoftmax(LogSoftmax { axis, legacy_2d }) => {
            let op_type = if matches!(n.op, Op::Softmax(_)) { "Softmax" } else { "LogSoftmax" };
            let rank = g.fact(n.inputs[0]).rank() as i64;
            let norm = if *axis < 0 { axis + rank } else { *axis };
            if !legacy_2d {
                simple(ex, op_type, vec![attr_i("axis", *axis)]);
            } else if norm == rank - 1 {
                // Flattening at the last axis changes nothing.
                simple(ex, op_type, vec![attr_i("axis", -1)]);
            } else {
                // Opset < 13 meaning: softmax over all dims from `axis` on, written with
                // reductions so shapes (symbolic dims included) stay inferable.
                let axes: Vec<i64> = (norm.max(0)..rank).collect();
                let x = ins[0].clone();
                let max = ex.fresh(&format!("{name}/max"));
                let keep = || attr_i("keepdims", 1);
                let max_attrs = if opset >= 18 { vec![keep()] } else { vec![keep(), attr_ints("axes", &axes)] };
                let mut max_in = vec![x.clone()];
                if opset >= 18 {
                    max_in.push(ex.i64s(&format!("{name}/max_axes"), &axes)?);
                }
                ex.emit(&format!("{name}/max"), "ReduceMax", max_in, vec![max.clone()], max_attrs);
                let d = ex.fresh(&format!("{name}/shifted"));
                ex.emit(&format!("{name}/shift"), "Sub", vec![x, max], vec![d.clone()], vec![]);
                let e = ex.fresh(&format!("{name}/exp"));
                ex.emit(&format!("{name}/exp"), "Exp", vec![d.clone()], vec![e.clone()], vec![]);
                let axes_in = ex.i64s(&format!("{name}/sum_axes"), &axes)?;
                let s = ex.fresh(&format!("{name}/sum"));
                ex.emit(&format!("{name}/sum"), "ReduceSum", vec![e.clone(), axes_in], vec![s.clone()], vec![keep()]);
                if op_type == "Softmax" {
                    ex.emit(name, "Div", vec![e, s], outs.clone(), vec![]);
                } else {
                    let l = ex.fresh(&format!("{name}/log_sum"));
                    ex.emit(&format!("{name}/log"), "Log", vec![s], vec![l.clone()], vec![]);
                    ex.emit(name, "Sub", vec![d, l], outs.clone(), vec![]);
                }
            }
        }
        Op::LayerNorm(l) => {
            simple(ex, "LayerNormalization", vec![attr_i("axis", l.axis), attr_f("epsilon", l.epsilon)])
        }
        Op::BatchNorm(b) => simple(ex, "BatchNormalization", vec![attr_f("epsilon", b.epsilon)]),
        Op::Reduce(r) => {
            let op_type = reduce_name(r.op);
            let mut a = vec![attr_i("keepdims", r.keepdims as i64)];
            if !reduce_axes_as_input(op_type, opset) {
                if n.inputs.len() > 1 {
                    return Err(FormatError::Invalid(format!("{op_type} with an axes input needs opset 18")));
                }
                match &r.axes {
                    None if r.noop_with_empty_axes => simple(ex, "Identity", vec![]),
                    None => simple(ex, op_type, a),
                    Some(axes) => {
                        a.push(attr_ints("axes", axes));
                        simple(ex, op_type, a);
                    }
                }
            } else {
                // The data, and the run-time axes when the node has them.
                let mut i = ins.clone();
                if let Some(axes) = &r.axes {
                    i.push(ex.i64s(&format!("{name}/axes"), axes)?);
                }
                if r.noop_with_empty_axes {
                    a.push(attr_i("noop_with_empty_axes", 1));
                }
                ex.emit(name, op_type, i, outs.clone(), a);
            }
        }
        Op::ArgReduce(r) => {
            let mut a = vec![attr_i("axis", r.axis), attr_i("keepdims", r.keepdims as i64)];
            if r.select_last_index {
                a.push(attr_i("select_last_index", 1));
            }
            simple(ex, if r.max { "ArgMax" } else { "ArgMin" }, a);
        }
        Op::Shape(s) => {
            let mut a = Vec::new();
            if s.start != 0 {
                a.push(attr_i("start", s.start));
            }
            if let Some(e) = s.end {
                a.push(attr_i("end", e));
            }
            simple(ex, "Shape", a);
        }
        Op::Reshape(r) => {
            let a = if r.allowzero { vec![attr_i("allowzero", 1)] } else { vec![] };
            simple(ex, "Reshape", a);
        }
        Op::Transpose(t) => {
            let a = t.perm.as_ref().map(|p| vec![attr_usizes("perm", p)]).unwrap_or_default();
            simple(ex, "Transpose", a);
        }
        // Run-time axes are already the node's second input.
        Op::Unsqueeze(_) | Op::Squeeze(_) if n.inputs.len() > 1 => {
            simple(ex, if matches!(n.op, Op::Squeeze(_)) { "Squeeze" } else { "Unsqueeze" }, vec![])
        }
        Op::Unsqueeze(u) => {
            let axes = ex.i64s(&format!("{name}/axes"), &u.axes)?;
            ex.emit(name, "Unsqueeze", vec![ins[0].clone(), axes], outs.clone(), vec![]);
        }
        Op::Squeeze(s) => {
            let mut i = vec![ins[0].clone()];
            if let Some(axes) = &s.axes {
                i.push(ex.i64s(&format!("{name}/axes"), axes)?);
            }
            ex.emit(name, "Squeeze", i, outs.clone(), vec![]);
        }
        Op::Concat(c) => simple(ex, "Concat", vec![attr_i("axis", c.axis)]),
        Op::Slice(_) => simple(ex, "Slice", vec![]),
        Op::Split(s) if n.inputs.len() > 1 => simple(ex, "Split", vec![attr_i("axis", s.axis)]),
        Op::Split(s) => {
            let mut i = vec![ins[0].clone()];
            let mut a = vec![attr_i("axis", s.axis)];
            // Without sizes, a dim that does not divide evenly gets explicit sizes (opsets
            // before 18 cannot express it, and ONNX Runtime rejects empty trailing parts).
            let uneven = || {
                let f = g.fact(n.inputs[0]);
                let r = f.rank() as i64;
                let ax = if s.axis < 0 { s.axis + r } else { s.axis };
                let d = f.shape.get(ax.max(0) as usize).and_then(Dim::as_known)?;
                let k = s.num_outputs;
                (k > 0 && d % k != 0).then(|| {
                    let part = d.div_ceil(k);
                    (0..k).map(|j| part.min(d.saturating_sub(j * part))).collect::<Vec<_>>()
                })
            };
            let sizes = match &s.split {
                Some(v) => Some(v.clone()),
                None => match uneven() {
                    Some(v) => Some(v),
                    None if opset >= 18 => {
                        a.push(attr_i("num_outputs", s.num_outputs as i64));
                        None
                    }
                    None => None,
                },
            };
            if let Some(v) = sizes {
                let v: Vec<i64> = v.iter().map(|&x| x as i64).collect();
                i.push(ex.i64s(&format!("{name}/split"), &v)?);
            }
            ex.emit(name, "Split", i, outs.clone(), a);
        }
        Op::Expand(_) => simple(ex, "Expand", vec![]),
        Op::Gather(gt) => simple(ex, "Gather", vec![attr_i("axis", gt.axis)]),
        Op::ConstantOfShape(c) => {
            let value = c.value.as_ref().clone().into_shape(vec![1])?;
            let t = tensor_to_proto(&value, "value")?;
            simple(ex, "ConstantOfShape", vec![attr_t("value", t)]);
        }
        Op::Range(_) => simple(ex, "Range", vec![]),
        Op::Flatten(f) => simple(ex, "Flatten", vec![attr_i("axis", f.axis)]),
        Op::Pad(p) => {
            let mode = match p.mode {
                PadMode::Constant => "constant",
                PadMode::Reflect => "reflect",
                PadMode::Edge => "edge",
                PadMode::Wrap => "wrap",
            };
            simple(ex, "Pad", vec![attr_s("mode", mode)]);
        }
        Op::Tile(_) => simple(ex, "Tile", vec![]),
        Op::Conv(c) => simple(ex, "Conv", conv_attrs(&c.attrs)),
        Op::ConvTranspose(c) => {
            let mut a = conv_attrs(&c.attrs);
            if !c.output_padding.is_empty() {
                a.push(attr_usizes("output_padding", &c.output_padding));
            }
            if let Some(s) = &c.output_shape {
                a.push(attr_usizes("output_shape", s));
            }
            simple(ex, "ConvTranspose", a);
        }
        Op::Pool(p) => {
            let pa = &p.attrs;
            let mut a = vec![attr_usizes("kernel_shape", &pa.kernel_shape)];
            for (nm, x) in [("strides", &pa.strides), ("pads", &pa.pads)] {
                if !x.is_empty() {
                    a.push(attr_usizes(nm, x));
                }
            }
            let is_max = matches!(p.kind, PoolKind::Max);
            if !pa.dilations.is_empty() && (is_max || pa.dilations.iter().any(|&d| d != 1)) {
                a.push(attr_usizes("dilations", &pa.dilations));
            }
            if pa.ceil_mode {
                a.push(attr_i("ceil_mode", 1));
            }
            if pa.auto_pad != AutoPad::NotSet {
                a.push(attr_s("auto_pad", auto_pad_name(pa.auto_pad)));
            }
            if let PoolKind::Average { count_include_pad: true } = p.kind {
                a.push(attr_i("count_include_pad", 1));
            }
            simple(ex, if is_max { "MaxPool" } else { "AveragePool" }, a);
        }
        Op::GlobalPool(p) => simple(ex, if p.max { "GlobalMaxPool" } else { "GlobalAveragePool" }, vec![]),
        Op::Resize(r) => {
            let mode = match r.mode {
                ResizeMode::Nearest => "nearest",
                ResizeMode::Linear => "linear",
                ResizeMode::Cubic => "cubic",
            };
            let coord = match r.coord {
                CoordMode::HalfPixel => "half_pixel",
                CoordMode::HalfPixelSymmetric => "half_pixel_symmetric",
                CoordMode::PytorchHalfPixel => "pytorch_half_pixel",
                CoordMode::AlignCorners => "align_corners",
                CoordMode::Asymmetric => "asymmetric",
                CoordMode::TfCropAndResize => {
                    return Err(FormatError::Unsupported(
                        "tf_crop_and_resize needs roi, which slimnn does not keep".into(),
                    ))
                }
            };
            let nearest = match r.nearest {
                NearestMode::RoundPreferFloor => "round_prefer_floor",
                NearestMode::RoundPreferCeil => "round_prefer_ceil",
                NearestMode::Floor => "floor",
                NearestMode::Ceil => "ceil",
            };
            let mut a = vec![
                attr_s("mode", mode),
                attr_s("coordinate_transformation_mode", coord),
                attr_s("nearest_mode", nearest),
                attr_f("cubic_coeff_a", r.cubic_coeff_a),
            ];
            if r.exclude_outside {
                a.push(attr_i("exclude_outside", 1));
            }
            if let Some(axes) = &r.axes {
                a.push(attr_ints("axes", axes));
            }
            let i = match r.target {
                ResizeTarget::Scales => vec![ins[0].clone(), String::new(), ins[1].clone()],
                ResizeTarget::Sizes => {
                    vec![ins[0].clone(), String::new(), String::new(), ins[1].clone()]
                }
            };
            ex.emit(name, "Resize", i, outs.clone(), a);
        }
        Op::QuantizeLinear(q) => simple(ex, "QuantizeLinear", vec![attr_i("axis", q.axis)]),
        Op::DequantizeLinear(q) => simple(ex, "DequantizeLinear", vec![attr_i("axis", q.axis)]),
        Op::DynamicQuantizeLinear(_) => simple(ex, "DynamicQuantizeLinear", vec![]),
        Op::MatMulInteger(_) => simple(ex, "MatMulInteger", vec![]),
        Op::ConvInteger(c) => simple(ex, "ConvInteger", conv_attrs(&c.attrs)),
        Op::QLinearMatMul(_) => simple(ex, "QLinearMatMul", vec![]),
        Op::QLinearConv(c) => simple(ex, "QLinearConv", conv_attrs(&c.attrs)),
        Op::BlockMatMul(_) | Op::BlockGather(_) | Op::RmsNorm(_) | Op::Rope(_) | Op::CausalAttention(_) => {
            return Err(FormatError::Unsupported(
                "slimnn's LLM ops (block-quantized weights, KV cache) have no ONNX form".into(),
            ))
        }
        Op::GatherBlockQuantized(q) => {
            let attrs = vec![
                attr_i("bits", q.bits as i64),
                attr_i("block_size", q.block_size as i64),
                attr_i("gather_axis", 0),
                attr_i("quantize_axis", 1),
            ];
            ex.emit(name, "GatherBlockQuantized", ins.clone(), outs.clone(), attrs);
            if let Some(last) = ex.nodes.last_mut() {
                last.domain = Some(MICROSOFT_DOMAIN.into());
            }
        }
        Op::DynamicRowQuantMatMul(_) => {
            simple(ex, "DynamicRowQuantMatMul", vec![]);
            if let Some(last) = ex.nodes.last_mut() {
                last.domain = Some(SLIMNN_DOMAIN.into());
            }
        }
        Op::MatMulNBits(m) => {
            let attrs = vec![
                attr_i("K", m.k as i64),
                attr_i("N", m.n as i64),
                attr_i("bits", m.bits as i64),
                attr_i("block_size", m.block_size as i64),
            ];
            ex.emit(name, "MatMulNBits", ins.clone(), outs.clone(), attrs);
            if let Some(last) = ex.nodes.last_mut() {
                last.domain = Some(MICROSOFT_DOMAIN.into());
            }
        }
        // Quantize then dequantize, with the float zero point cast to the integer type whose
        // range is [qmin, qmax] (ONNX saturates to the type's range, rounding half to even).
        Op::FakeQuant(q) => {
            let int_type = match (q.qmin, q.qmax) {
                (-128, 127) => DType::I8,
                (0, 255) => DType::U8,
                (lo, hi) => {
                    return Err(FormatError::Unsupported(format!(
                        "FakeQuant range [{lo}, {hi}] has no ONNX integer type (only [-128, 127] and [0, 255])"
                    )))
                }
            };
            let to = dtype_to_onnx(int_type).ok_or_else(|| FormatError::Unsupported(format!("cast to {int_type}")))?;
            let axis = q.axis.map(|a| vec![attr_i("axis", a)]).unwrap_or_default();
            let zp = ex.fresh(&format!("{}_zero_point", outs[0]));
            let quantized = ex.fresh(&format!("{}_quantized", outs[0]));
            ex.emit(name, "Cast", vec![ins[2].clone()], vec![zp.clone()], vec![attr_i("to", to as i64)]);
            let q_ins = vec![ins[0].clone(), ins[1].clone(), zp];
            ex.emit(name, "QuantizeLinear", q_ins.clone(), vec![quantized.clone()], axis.clone());
            ex.emit(name, "DequantizeLinear", vec![quantized, q_ins[1].clone(), q_ins[2].clone()], outs.clone(), axis);
        }
        Op::UnaryGrad(_)
        | Op::SoftmaxGrad(_)
        | Op::LayerNormGrad(_)
        | Op::ConvGradInput(_)
        | Op::ConvGradWeight(_)
        | Op::PoolGrad(_)
        | Op::GatherGrad(_)
        | Op::FakeQuantGrad(_) => {
            return Err(FormatError::Unsupported(
                "gradient ops are training-only and not exportable to ONNX (export the model without its backward)"
                    .into(),
            ))
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opset_follows_the_ops() {
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[2, 3])).unwrap();
        let y = g.add_node("r", Unary(UnaryOp::Relu), vec![x]).unwrap()[0];
        g.add_output("y", y);
        assert_eq!(required_opset(&g), 17);
        let z = g.add_node("g", Unary(UnaryOp::Gelu { tanh: false }), vec![y]).unwrap()[0];
        g.add_output("z", z);
        assert_eq!(required_opset(&g), 20);
        assert_eq!((ir_version(17), ir_version(20), ir_version(21)), (8, 9, 10));
    }

    #[test]
    fn names_outputs_and_helpers() {
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[2, 3])).unwrap();
        let u = g.add_node("u", Unsqueeze { axes: vec![0] }, vec![x]).unwrap()[0];
        g.set_outlet_name(u, "unsq");
        g.add_output("out", u);
        g.add_output("x", x);
        let m = export(&g).unwrap();
        let gp = m.graph.unwrap();
        // The named value keeps its name; the output gets an Identity; axes are an input.
        let unsq = gp.node.iter().find(|n| n.op_type.as_deref() == Some("Unsqueeze")).unwrap();
        assert_eq!(unsq.output, vec!["unsq".to_string()]);
        assert_eq!(unsq.input.len(), 2);
        assert!(gp.initializer.iter().any(|t| t.name.as_deref() == Some(unsq.input[1].as_str())));
        let id = gp.node.iter().find(|n| n.op_type.as_deref() == Some("Identity")).unwrap();
        assert_eq!((id.input.clone(), id.output.clone()), (vec!["unsq".to_string()], vec!["out".to_string()]));
        let outs: Vec<_> = gp.output.iter().map(|v| v.name.clone().unwrap()).collect();
        assert_eq!(outs, vec!["out", "x"]);
    }

    #[test]
    fn fake_quant_exports_as_quantize_dequantize() {
        let x_values: Vec<f32> = (0..24).map(|i| (i as f32 - 11.0) * 0.37).collect();
        let x_t = Tensor::from_vec(vec![2, 3, 4], x_values).unwrap();
        // (range, axis, scale, zero point): u8 per-tensor, i8 per-channel along axis 1.
        let cases = [
            ((0, 255), None, Tensor::scalar(0.05f32), Tensor::scalar(100f32)),
            (
                (-128, 127),
                Some(1),
                Tensor::from_vec(vec![3], vec![0.02f32, 0.1, 0.03]).unwrap(),
                Tensor::from_vec(vec![3], vec![0f32, -5.0, 7.0]).unwrap(),
            ),
        ];
        for ((qmin, qmax), axis, scale, zp) in cases {
            let mut g = Graph::default();
            let x = g.add_input("x", Fact::known(DType::F32, &[2, 3, 4])).unwrap();
            let s = g.add_const("scale", scale).unwrap();
            let z = g.add_const("zp", zp).unwrap();
            let y = g.add_node("fq", FakeQuant { qmin, qmax, axis }, vec![x, s, z]).unwrap()[0];
            g.add_output("y", y);
            let bytes = crate::onnx::to_bytes(&g).unwrap();
            let back = crate::onnx::from_bytes(&bytes, None).unwrap();
            let feed = vec![("x".to_string(), x_t.clone())];
            let (want, got) = (g.eval(feed.clone()).unwrap(), back.eval(feed).unwrap());
            assert_eq!(want[0].max_abs_diff(&got[0]), Some(0.0), "range [{qmin}, {qmax}]");
            let ops: Vec<_> = export(&g).unwrap().graph.unwrap().node.into_iter().filter_map(|n| n.op_type).collect();
            assert_eq!(ops, ["Cast", "QuantizeLinear", "DequantizeLinear"]);
        }
        // A range no ONNX integer type has, and a gradient op, are clear errors.
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[4])).unwrap();
        let s = g.add_const("scale", Tensor::scalar(0.5f32)).unwrap();
        let y = g.add_node("fq", FakeQuant { qmin: -8, qmax: 7, axis: None }, vec![x, s, s]).unwrap()[0];
        g.add_output("y", y);
        assert!(export(&g).unwrap_err().to_string().contains("[-8, 7]"));
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[4])).unwrap();
        let dx = g.add_node("g", UnaryGrad(UnaryOp::Tanh), vec![x, x]).unwrap()[0];
        g.add_output("dx", dx);
        let err = export(&g).unwrap_err().to_string();
        assert!(err.contains("'g' (UnaryGrad)") && err.contains("not exportable to ONNX"), "{err}");
    }

    #[test]
    fn uneven_split_gets_sizes() {
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[7])).unwrap();
        let parts = g.add_node("s", Split { axis: 0, split: None, num_outputs: 3 }, vec![x]).unwrap();
        for (i, p) in parts.iter().enumerate() {
            g.add_output(&format!("p{i}"), *p);
        }
        let gp = export(&g).unwrap().graph.unwrap();
        let split = gp.node.iter().find(|n| n.op_type.as_deref() == Some("Split")).unwrap();
        let sizes = gp.initializer.iter().find(|t| t.name.as_deref() == Some(split.input[1].as_str())).unwrap();
        let t = crate::onnx::tensor_from_proto(sizes, None).unwrap();
        assert_eq!(t.as_slice::<i64>().unwrap(), &[3, 3, 1]);
    }
}

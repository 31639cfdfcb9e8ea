//! ONNX import/export: round trips, external data, hostile inputs, and a check against ONNX
//! Runtime.

use prost::Message;
use slimnn_formats::onnx::proto::attribute_proto::AttributeType;
use slimnn_formats::onnx::proto::tensor_proto::{DataLocation, DataType};
use slimnn_formats::onnx::proto::tensor_shape_proto::{dimension, Dimension};
use slimnn_formats::onnx::proto::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use slimnn_formats::{onnx, FormatError};
use slimnn_ir::ops::*;
use slimnn_ir::{Fact, Graph, Op, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};
use std::path::{Path, PathBuf};
use std::sync::Arc;

// ---------------------------------------------------------------- helpers

/// A scratch directory, removed when dropped.
fn tmp_dir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("slimnn-onnx-io-{tag}-")).tempdir().unwrap()
}

/// Deterministic pseudo-random values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn randn(shape: &[usize], seed: u64) -> Tensor {
    Tensor::from_vec(shape.to_vec(), values(shape.iter().product(), seed)).unwrap()
}

fn konst(g: &mut Graph, name: &str, t: Tensor) -> OutletId {
    let o = g.add_const(name, t).unwrap();
    g.set_outlet_name(o, name);
    o
}

fn node(g: &mut Graph, name: &str, op: impl Into<Op>, inputs: Vec<OutletId>) -> OutletId {
    let o = g.add_node(name, op, inputs).unwrap_or_else(|e| panic!("{name}: {e}"))[0];
    g.set_outlet_name(o, name);
    o
}

/// Named constants of a graph (initializers as the importer names them).
fn weights(g: &Graph) -> Vec<(String, Arc<Tensor>)> {
    let mut v: Vec<(String, Arc<Tensor>)> = g
        .nodes()
        .iter()
        .filter_map(|n| match &n.op {
            Op::Const(c) => Some((n.output_names[0].clone().unwrap_or_else(|| n.name.clone()), c.0.clone())),
            _ => None,
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_same_signature(a: &Graph, b: &Graph) {
    assert_eq!(a.inputs().len(), b.inputs().len());
    for i in 0..a.inputs().len() {
        assert_eq!(a.input_name(i), b.input_name(i));
        assert_eq!(a.input_fact(i), b.input_fact(i));
    }
    assert_eq!(a.outputs().len(), b.outputs().len());
    for ((na, oa), (nb, ob)) in a.outputs().iter().zip(b.outputs()) {
        assert_eq!(na, nb);
        let (fa, fb) = (a.fact(*oa), b.fact(*ob));
        assert_eq!((fa.dtype, &fa.shape), (fb.dtype, &fb.shape), "output {na}");
    }
}

/// Exports, imports and compares: signature, facts, weights, outputs on `feed` (within `tol`),
/// and a second export identical to the first when `stable`.
fn roundtrip(g: &Graph, feed: Vec<(String, Tensor)>, tol: f64, stable: bool) -> Graph {
    let bytes = onnx::to_bytes(g).unwrap();
    let back = onnx::from_bytes(&bytes, None).unwrap();
    assert_same_signature(g, &back);
    assert_eq!(weights(g), weights(&back));
    assert_eq!(g.metadata, back.metadata);
    let want = g.eval(feed.clone()).unwrap();
    let got = back.eval(feed).unwrap();
    for (w, o) in want.iter().zip(&got) {
        let d = w.max_abs_diff(o).expect("same shapes");
        assert!(d <= tol, "outputs differ by {d}");
        assert_eq!(w.dtype(), o.dtype());
    }
    if stable {
        assert_eq!(onnx::to_bytes(&back).unwrap(), bytes, "a second export differs from the first");
    }
    back
}

fn opset_of(bytes: &[u8]) -> i64 {
    let m = ModelProto::decode(bytes).unwrap();
    m.opset_import[0].version.unwrap()
}

// ---------------------------------------------------------------- hand-built ModelProtos

fn pnode(name: &str, op: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: Some(name.into()),
        op_type: Some(op.into()),
        attribute,
        ..Default::default()
    }
}

fn vinfo(name: &str, dims: &[i64]) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            denotation: None,
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Float as i32),
                shape: Some(TensorShapeProto {
                    dim: dims
                        .iter()
                        .map(|&d| Dimension { denotation: None, value: Some(dimension::Value::DimValue(d)) })
                        .collect(),
                }),
            })),
        }),
        ..Default::default()
    }
}

fn pmodel(
    nodes: Vec<NodeProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: &[&str],
    inits: Vec<TensorProto>,
    opset: i64,
) -> ModelProto {
    ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(GraphProto {
            node: nodes,
            name: Some("g".into()),
            initializer: inits,
            input: inputs,
            output: outputs.iter().map(|o| vinfo(o, &[])).collect(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn import(m: &ModelProto) -> Result<Graph, FormatError> {
    onnx::from_bytes(&m.encode_to_vec(), None)
}

// ---------------------------------------------------------------- round trips

#[test]
fn roundtrip_identity_graph_keeps_symbols_and_metadata() {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Unknown, Dim::Known(4)])).unwrap();
    g.add_output("x", x);
    let c = konst(&mut g, "table", Tensor::from_vec(vec![3], vec![1i64, -2, 3]).unwrap());
    g.add_output("table_out", c);
    g.metadata.insert("producer".into(), "test".into());
    let feed = vec![("x".to_string(), randn(&[2, 3, 4], 1))];
    let back = roundtrip(&g, feed, 0.0, true);
    assert_eq!(back.input_fact(0).shape, vec![Dim::sym("batch"), Dim::Unknown, Dim::Known(4)]);
}

#[test]
fn roundtrip_mlp() {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(4)])).unwrap();
    let w1 = konst(&mut g, "w1", randn(&[4, 8], 2));
    let b1 = konst(&mut g, "b1", randn(&[8], 3));
    let h = node(&mut g, "mm1", MatMul, vec![x, w1]);
    let h = node(&mut g, "add1", Binary(BinaryOp::Add), vec![h, b1]);
    let h = node(&mut g, "relu", Unary(UnaryOp::Relu), vec![h]);
    let w2 = konst(&mut g, "w2", randn(&[3, 8], 4));
    let b2 = konst(&mut g, "b2", randn(&[3], 5));
    let gemm = Gemm { alpha: 0.5, beta: 2.0, trans_a: false, trans_b: true };
    let y = node(&mut g, "gemm", gemm, vec![h, w2, b2]);
    let lo = konst(&mut g, "lo", Tensor::scalar(-0.5f32));
    let hi = konst(&mut g, "hi", Tensor::scalar(0.5f32));
    let y = node(&mut g, "clip", Clip, vec![y, lo, hi]);
    let y = node(&mut g, "lrelu", Unary(UnaryOp::LeakyRelu { alpha: 0.1 }), vec![y]);
    let y = node(&mut g, "sm", Softmax { axis: -1, legacy_2d: false }, vec![y]);
    g.add_output("probs", y);
    let feed = vec![("x".to_string(), randn(&[5, 4], 6))];
    let bytes = onnx::to_bytes(&g).unwrap();
    assert_eq!(opset_of(&bytes), 17);
    roundtrip(&g, feed, 0.0, true);
}

#[test]
fn roundtrip_shape_ops_and_names() {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(6)])).unwrap();
    let t = node(&mut g, "t", Transpose { perm: Some(vec![1, 0]) }, vec![x]);
    let u = node(&mut g, "u", Unsqueeze { axes: vec![0] }, vec![t]);
    let s = node(&mut g, "s", Squeeze { axes: Some(vec![0]) }, vec![u]);
    let parts = g.add_node("split", Split { axis: 0, split: None, num_outputs: 2 }, vec![s]).unwrap();
    g.set_outlet_name(parts[0], "top");
    g.set_outlet_name(parts[1], "bottom");
    let c = node(&mut g, "cat", Concat { axis: 1 }, vec![parts[1], parts[0]]);
    let shape = node(&mut g, "shape", Shape { start: 0, end: None }, vec![c]);
    let idx = konst(&mut g, "idx", Tensor::from_vec(vec![2], vec![2i64, 0]).unwrap());
    let gat = node(&mut g, "gather", Gather { axis: 0 }, vec![c, idx]);
    let starts = konst(&mut g, "starts", Tensor::from_vec(vec![1], vec![1i64]).unwrap());
    let ends = konst(&mut g, "ends", Tensor::from_vec(vec![1], vec![i64::MAX]).unwrap());
    let sl = node(&mut g, "slice", Slice, vec![gat, starts, ends]);
    let newshape = konst(&mut g, "newshape", Tensor::from_vec(vec![1], vec![-1i64]).unwrap());
    let flat = node(&mut g, "flat", Reshape { allowzero: false }, vec![sl, newshape]);
    g.add_output("flat", flat);
    g.add_output("shape", shape);
    g.add_output("also_top", parts[0]);
    let feed = vec![("x".to_string(), randn(&[3, 6], 7))];
    let back = roundtrip(&g, feed, 0.0, true);
    // Value names survive.
    let names: Vec<String> = back.nodes().iter().flat_map(|n| n.output_names.iter().flatten().cloned()).collect();
    for want in ["top", "bottom", "cat", "gather"] {
        assert!(names.iter().any(|n| n == want), "value name {want} lost: {names:?}");
    }
    // Axes travel as inputs in opset 17 and come back as attributes, adding no constants.
    assert_eq!(weights(&g).len(), weights(&back).len());
}

#[test]
fn roundtrip_conv_net() {
    let mut g = Graph::default();
    let x = g
        .add_input("image", Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(3), Dim::Known(8), Dim::Known(8)]))
        .unwrap();
    let w = konst(&mut g, "conv.w", randn(&[4, 3, 3, 3], 8));
    let b = konst(&mut g, "conv.b", randn(&[4], 9));
    let attrs = ConvAttrs {
        kernel_shape: Some(vec![3, 3]),
        strides: vec![1, 1],
        pads: vec![1, 1, 1, 1],
        dilations: vec![],
        group: 1,
        auto_pad: AutoPad::NotSet,
    };
    let y = node(&mut g, "conv", Conv { attrs }, vec![x, w, b]);
    let bn: Vec<OutletId> = (0..4)
        .map(|k| {
            let v: Vec<f32> = values(4, 10 + k).iter().map(|v| if k == 3 { v.abs() + 0.5 } else { *v }).collect();
            konst(&mut g, &format!("bn.{k}"), Tensor::from_vec(vec![4], v).unwrap())
        })
        .collect();
    let y = node(&mut g, "bn", BatchNorm { epsilon: 1e-5 }, vec![y, bn[0], bn[1], bn[2], bn[3]]);
    let y = node(&mut g, "hs", Unary(UnaryOp::HardSwish), vec![y]);
    let pool = PoolAttrs { kernel_shape: vec![2, 2], strides: vec![2, 2], ..Default::default() };
    let y = node(&mut g, "pool", Pool { kind: PoolKind::Max, attrs: pool }, vec![y]);
    let avg = PoolAttrs { kernel_shape: vec![3, 3], pads: vec![1, 1, 1, 1], ..Default::default() };
    let y = node(&mut g, "avg", Pool { kind: PoolKind::Average { count_include_pad: false }, attrs: avg }, vec![y]);
    let y = node(&mut g, "gap", GlobalPool { max: false }, vec![y]);
    let y = node(&mut g, "flatten", Flatten { axis: 1 }, vec![y]);
    g.add_output("features", y);
    let feed = vec![("image".to_string(), randn(&[2, 3, 8, 8], 20))];
    roundtrip(&g, feed, 0.0, true);
}

#[test]
fn roundtrip_reductions_and_quant() {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::known(DType::F32, &[2, 3, 4])).unwrap();
    let r1 = node(
        &mut g,
        "mean",
        Reduce { op: ReduceOp::Mean, axes: Some(vec![-1]), keepdims: true, noop_with_empty_axes: false },
        vec![x],
    );
    let r2 = node(
        &mut g,
        "sum",
        Reduce { op: ReduceOp::Sum, axes: Some(vec![0, 2]), keepdims: false, noop_with_empty_axes: false },
        vec![x],
    );
    let r3 = node(
        &mut g,
        "max",
        Reduce { op: ReduceOp::Max, axes: None, keepdims: false, noop_with_empty_axes: false },
        vec![x],
    );
    let am =
        node(&mut g, "argmax", ArgReduce { max: true, axis: 1, keepdims: false, select_last_index: false }, vec![x]);
    let scale = konst(&mut g, "scale", Tensor::scalar(0.02f32));
    let zp = konst(&mut g, "zp", Tensor::scalar(3u8));
    let q = node(&mut g, "q", QuantizeLinear { axis: 1 }, vec![x, scale, zp]);
    let dq = node(&mut g, "dq", DequantizeLinear { axis: 1 }, vec![q, scale, zp]);
    for (name, o) in [("mean", r1), ("sum", r2), ("max", r3), ("argmax", am), ("q", q), ("dq", dq)] {
        g.add_output(&format!("{name}_out"), o);
    }
    let feed = vec![("x".to_string(), randn(&[2, 3, 4], 21))];
    roundtrip(&g, feed, 0.0, true);
}

#[test]
fn legacy_softmax_and_gelu_choose_their_forms() {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("b"), Dim::Known(3), Dim::Known(4)])).unwrap();
    let s = node(&mut g, "sm", Softmax { axis: 1, legacy_2d: true }, vec![x]);
    let l = node(&mut g, "lsm", LogSoftmax { axis: -1, legacy_2d: true }, vec![x]);
    g.add_output("sm", s);
    g.add_output("lsm", l);
    let feed = vec![("x".to_string(), randn(&[2, 3, 4], 22))];
    roundtrip(&g, feed.clone(), 1e-6, false);

    let y = node(&mut g, "gelu", Unary(UnaryOp::Gelu { tanh: true }), vec![x]);
    g.add_output("gelu", y);
    let bytes = onnx::to_bytes(&g).unwrap();
    assert_eq!(opset_of(&bytes), 20);
    roundtrip(&g, feed, 1e-6, false);
}

#[test]
fn external_data_roundtrip() {
    let dir_tmp = tmp_dir("ext");
    let dir = dir_tmp.path();
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::known(DType::F32, &[2, 64])).unwrap();
    let w = konst(&mut g, "w", randn(&[64, 32], 30));
    let small = konst(&mut g, "small", randn(&[32], 31));
    let y = node(&mut g, "mm", MatMul, vec![x, w]);
    let y = node(&mut g, "add", Binary(BinaryOp::Add), vec![y, small]);
    g.add_output("y", y);
    let path = dir.join("model.onnx");
    onnx::save_with(&g, &path, &onnx::SaveOptions { external_data_threshold: 1000 }).unwrap();
    let data = dir.join("model.onnx.data");
    assert!(data.is_file(), "no external data file");
    assert!(std::fs::metadata(&path).unwrap().len() < 64 * 32 * 4, "weights stayed inline");
    let back = onnx::load(&path).unwrap();
    assert_eq!(weights(&g), weights(&back));
    let feed = vec![("x".to_string(), randn(&[2, 64], 32))];
    assert_eq!(g.eval(feed.clone()).unwrap(), back.eval(feed).unwrap());
    // Below the threshold everything stays inline.
    let path2 = dir.join("inline.onnx");
    onnx::save(&g, &path2).unwrap();
    assert!(!dir.join("inline.onnx.data").exists());
    assert_eq!(weights(&onnx::load(&path2).unwrap()), weights(&g));
    // A model with external data cannot be read from bytes alone.
    let bytes = std::fs::read(&path).unwrap();
    assert!(onnx::from_bytes(&bytes, None).is_err());
}

// ---------------------------------------------------------------- hostile input

fn small_model_bytes() -> Vec<u8> {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::known(DType::F32, &[2, 3])).unwrap();
    let w = konst(&mut g, "w", randn(&[3, 3], 40));
    let y = node(&mut g, "mm", MatMul, vec![x, w]);
    g.add_output("y", y);
    onnx::to_bytes(&g).unwrap()
}

#[test]
fn truncated_and_random_bytes_are_errors() {
    let bytes = small_model_bytes();
    assert!(onnx::from_bytes(&bytes, None).is_ok());
    for cut in [1, 7, bytes.len() / 3, bytes.len() / 2, bytes.len() - 1] {
        assert!(onnx::from_bytes(&bytes[..cut], None).is_err(), "truncated at {cut} was accepted");
    }
    for seed in 0..50u64 {
        let junk: Vec<u8> = values(512, seed).iter().map(|v| (v.to_bits() >> 7) as u8).collect();
        assert!(onnx::from_bytes(&junk, None).is_err());
    }
    assert!(onnx::from_bytes(&[], None).is_err());
    let dir_tmp = tmp_dir("trunc");
    let dir = dir_tmp.path();
    let p = dir.join("t.onnx");
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    let e = onnx::load(&p).unwrap_err().to_string();
    assert!(e.contains("t.onnx"), "{e}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 200, ..Default::default() })]
    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
        let _ = onnx::from_bytes(&bytes, None);
    }

    #[test]
    fn corrupted_models_never_panic(pos in 0usize..10_000, byte in proptest::prelude::any::<u8>()) {
        let mut bytes = small_model_bytes();
        let p = pos % bytes.len();
        bytes[p] = byte;
        let _ = onnx::from_bytes(&bytes, None);
    }
}

#[test]
fn unknown_ops_are_all_listed() {
    let mut nodes = vec![
        pnode("a", "Relu", &["x"], &["r"], vec![]),
        pnode("b", "FancyOp", &["r"], &["f"], vec![]),
        pnode("c", "Abs", &["f"], &["y0"], vec![]),
        pnode("d", "OtherOp", &["y0"], &["y"], vec![]),
    ];
    let mut ms = pnode("e", "FusedGelu", &["y"], &["z"], vec![]);
    ms.domain = Some("com.microsoft".into());
    nodes.push(ms);
    let m = pmodel(nodes, vec![vinfo("x", &[2])], &["z"], vec![], 13);
    match import(&m) {
        Err(FormatError::UnsupportedOps(list)) => {
            assert_eq!(list.len(), 3, "{list:?}");
            assert_eq!(list[0], "node 'b' op FancyOp (opset 13)");
            assert_eq!(list[1], "node 'd' op OtherOp (opset 13)");
            assert!(list[2].starts_with("node 'e' op com.microsoft.FusedGelu"), "{}", list[2]);
        }
        other => panic!("expected UnsupportedOps, got {other:?}"),
    }
    // An op newer than the model's opset counts as unsupported too.
    let m = pmodel(vec![pnode("g", "Gelu", &["x"], &["y"], vec![])], vec![vinfo("x", &[2])], &["y"], vec![], 17);
    let e = import(&m).unwrap_err().to_string();
    assert!(e.contains("node 'g' op Gelu (opset 17)") && e.contains("needs opset 20"), "{e}");
}

#[test]
fn dangling_edges_missing_attributes_and_opsets() {
    let m = pmodel(
        vec![pnode("a", "Relu", &["x"], &["r"], vec![]), pnode("b", "Add", &["r", "nowhere"], &["y"], vec![])],
        vec![vinfo("x", &[2])],
        &["y"],
        vec![],
        13,
    );
    let e = import(&m).unwrap_err().to_string();
    assert!(e.contains("node 'b'") && e.contains("'nowhere'"), "{e}");

    let m = pmodel(vec![pnode("a", "Relu", &["x"], &["r"], vec![])], vec![vinfo("x", &[2])], &["missing"], vec![], 13);
    assert!(import(&m).unwrap_err().to_string().contains("'missing'"));

    let m = pmodel(vec![pnode("c", "Concat", &["x", "x"], &["y"], vec![])], vec![vinfo("x", &[2])], &["y"], vec![], 13);
    let e = import(&m).unwrap_err().to_string();
    assert!(e.contains("node 'c'") && e.contains("'axis'"), "{e}");

    for opset in [0, onnx::MAX_OPSET + 1] {
        let m = pmodel(vec![pnode("a", "Relu", &["x"], &["y"], vec![])], vec![vinfo("x", &[2])], &["y"], vec![], opset);
        match import(&m) {
            Err(FormatError::Unsupported(msg)) => {
                assert!(msg.contains(&format!("opset {opset}")), "{msg}")
            }
            other => panic!("opset {opset}: expected Unsupported, got {other:?}"),
        }
    }
    // Inside the range, each op's version decides: Relu 6 is read at opset 9, Relu 1 (with
    // consumed_inputs) is not, and every refused node is listed.
    let m = pmodel(vec![pnode("a", "Relu", &["x"], &["y"], vec![])], vec![vinfo("x", &[2])], &["y"], vec![], 9);
    assert!(import(&m).is_ok());
    let m = pmodel(
        vec![pnode("a", "Relu", &["x"], &["r"], vec![]), pnode("b", "Add", &["r", "x"], &["y"], vec![])],
        vec![vinfo("x", &[2])],
        &["y"],
        vec![],
        5,
    );
    match import(&m) {
        Err(FormatError::UnsupportedOps(list)) => assert_eq!(
            list,
            [
                "node 'a' op Relu version 1 (opset 5): not supported",
                "node 'b' op Add version 1 (opset 5): not supported"
            ]
        ),
        other => panic!("expected UnsupportedOps, got {other:?}"),
    }

    // Nodes out of order are sorted; a cycle is an error.
    let m = pmodel(
        vec![pnode("b", "Abs", &["r"], &["y"], vec![]), pnode("a", "Relu", &["x"], &["r"], vec![])],
        vec![vinfo("x", &[2])],
        &["y"],
        vec![],
        13,
    );
    assert!(import(&m).is_ok());
    let m = pmodel(
        vec![pnode("a", "Add", &["x", "q"], &["p"], vec![]), pnode("b", "Abs", &["p"], &["q"], vec![])],
        vec![vinfo("x", &[2])],
        &["q"],
        vec![],
        13,
    );
    assert!(import(&m).unwrap_err().to_string().contains("cycle"));
}

fn attr_int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn i64_input(name: &str, len: i64) -> ValueInfoProto {
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            denotation: None,
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(DataType::Int64 as i32),
                shape: Some(TensorShapeProto {
                    dim: vec![Dimension { denotation: None, value: Some(dimension::Value::DimValue(len)) }],
                }),
            })),
        }),
        ..Default::default()
    }
}

#[test]
fn non_constant_axes_stay_inputs() {
    // Unsqueeze -> ReduceSum -> Split, each reading its axes / sizes from a graph input.
    let m = pmodel(
        vec![
            pnode("u", "Unsqueeze", &["x", "ua"], &["u"], vec![]),
            pnode("r", "ReduceSum", &["u", "ra"], &["r"], vec![attr_int("keepdims", 0)]),
            pnode("s", "Split", &["r", "sizes"], &["p", "q"], vec![]),
        ],
        vec![vinfo("x", &[2, 3]), i64_input("ua", 1), i64_input("ra", 1), i64_input("sizes", 2)],
        &["p", "q"],
        vec![],
        13,
    );
    let g = import(&m).unwrap();
    let ops: Vec<(&str, usize)> = g.nodes().iter().skip(4).map(|n| (n.op.name(), n.inputs.len())).collect();
    assert_eq!(ops, [("Unsqueeze", 2), ("ReduceSum", 2), ("Split", 2)]);
    let x = Tensor::from_vec(vec![2, 3], vec![1f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let i64s = |v: &[i64]| Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap();
    // [2, 3] unsqueezed at 0 is [1, 2, 3]; summed over axis 2 it is [[6, 15]], which sizes
    // [1, 0] split along axis 0 into itself and an empty part.
    let feed = |ua: &[i64], ra: &[i64], sizes: &[i64]| {
        vec![
            ("x".to_string(), x.clone()),
            ("ua".to_string(), i64s(ua)),
            ("ra".to_string(), i64s(ra)),
            ("sizes".to_string(), i64s(sizes)),
        ]
    };
    let out = g.eval(feed(&[0], &[2], &[1, 0])).unwrap();
    assert_eq!((out[0].shape(), out[0].to_f64_vec()), (&[1usize, 2][..], vec![6.0, 15.0]));
    assert_eq!(out[1].shape(), &[0, 2]);
    // Other values, same graph: unsqueeze at the end, reduce over the rows.
    let out = g.eval(feed(&[-1], &[0], &[2, 1])).unwrap();
    assert_eq!((out[0].to_f64_vec(), out[1].to_f64_vec()), (vec![5.0, 7.0], vec![9.0]));
    // Exported and read back, the axes are still inputs.
    let back = onnx::from_bytes(&onnx::to_bytes(&g).unwrap(), None).unwrap();
    let out = back.eval(feed(&[-1], &[0], &[2, 1])).unwrap();
    assert_eq!((out[0].to_f64_vec(), out[1].to_f64_vec()), (vec![5.0, 7.0], vec![9.0]));
    assert!(g.eval(feed(&[0], &[3], &[1, 0])).is_err());
}

#[test]
fn reduce_max_with_run_time_axes_exports_at_opset_18() {
    let m = pmodel(
        vec![pnode("r", "ReduceMax", &["x", "axes"], &["y"], vec![])],
        vec![vinfo("x", &[2, 3]), i64_input("axes", 1)],
        &["y"],
        vec![],
        18,
    );
    let g = import(&m).unwrap();
    let bytes = onnx::to_bytes(&g).unwrap();
    assert_eq!(opset_of(&bytes), 18);
    let back = onnx::from_bytes(&bytes, None).unwrap();
    let x = Tensor::from_vec(vec![2, 3], vec![1f32, 5.0, 3.0, 4.0, 2.0, 6.0]).unwrap();
    let axes = Tensor::from_vec(vec![1], vec![1i64]).unwrap();
    let out = back.eval(vec![("x".into(), x), ("axes".into(), axes)]).unwrap();
    assert_eq!((out[0].shape(), out[0].to_f64_vec()), (&[2usize, 1][..], vec![5.0, 6.0]));
}

#[test]
fn outputs_of_training_ops() {
    // Dropout's mask may be listed as long as nothing reads it.
    let m =
        pmodel(vec![pnode("d", "Dropout", &["x"], &["y", "mask"], vec![])], vec![vinfo("x", &[2])], &["y"], vec![], 13);
    let g = import(&m).unwrap();
    assert_eq!(g.op_histogram().into_iter().collect::<Vec<_>>(), [("Identity", 1)]);
    // Read, it is all true in inference (from version 10, where it became bool).
    let m = pmodel(
        vec![pnode("d", "Dropout", &["x"], &["y", "mask"], vec![])],
        vec![vinfo("x", &[2])],
        &["y", "mask"],
        vec![],
        13,
    );
    let x = Tensor::from_vec(vec![2], vec![1f32, 2.0]).unwrap();
    let out = import(&m).unwrap().eval(vec![("x".into(), x)]).unwrap();
    assert_eq!(out[1], Tensor::from_vec(vec![2], vec![true, true]).unwrap());
    let m = pmodel(
        vec![pnode("d", "Dropout", &["x"], &["y", "mask"], vec![])],
        vec![vinfo("x", &[2])],
        &["y", "mask"],
        vec![],
        7,
    );
    let e = import(&m).unwrap_err().to_string();
    assert!(e.contains("node 'd' op Dropout version 7") && e.contains("mask"), "{e}");
}

#[test]
fn layer_norm_statistics_round_trip() {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("b"), Dim::Known(4)])).unwrap();
    let scale = konst(&mut g, "scale", Tensor::from_vec(vec![4], vec![1f32, 2.0, 1.0, 2.0]).unwrap());
    let outs = g.add_node("ln", LayerNorm { axis: -1, epsilon: 1e-5, num_outputs: 3 }, vec![x, scale]).unwrap();
    for (name, o) in ["y", "mean", "inv_std_dev"].iter().zip(&outs) {
        g.add_output(name, *o);
    }
    let feed = vec![("x".to_string(), randn(&[3, 4], 23))];
    let back = roundtrip(&g, feed, 0.0, true);
    assert_eq!(back.fact(back.outputs()[1].1).shape, vec![Dim::sym("b"), Dim::Known(1)]);
    // Only Y used: one output.
    let m = pmodel(
        vec![pnode("ln", "LayerNormalization", &["x", "s"], &["y", "m", "v"], vec![])],
        vec![vinfo("x", &[2, 4]), vinfo("s", &[4])],
        &["y"],
        vec![],
        17,
    );
    let g = import(&m).unwrap();
    let ln = g.nodes().iter().find(|n| n.op.name() == "LayerNormalization").unwrap();
    assert_eq!(ln.outputs.len(), 1);
}

fn float_init(name: &str, dims: &[i64]) -> TensorProto {
    TensorProto {
        dims: dims.to_vec(),
        data_type: Some(DataType::Float as i32),
        name: Some(name.into()),
        ..Default::default()
    }
}

#[test]
fn huge_or_overflowing_tensors_are_refused() {
    for dims in [vec![1i64 << 40, 1 << 40], vec![1 << 20, 1 << 30], vec![-5], vec![i64::MAX, 2]] {
        let m = pmodel(
            vec![pnode("a", "Add", &["x", "w"], &["y"], vec![])],
            vec![vinfo("x", &[2])],
            &["y"],
            vec![float_init("w", &dims)],
            13,
        );
        match import(&m) {
            Err(FormatError::Malformed { what, .. }) => assert!(what.contains("'w'"), "{what}"),
            other => panic!("dims {dims:?}: expected Malformed, got {other:?}"),
        }
    }
    // Declared data shorter than the shape.
    let mut w = float_init("w", &[1000]);
    w.float_data = vec![1.0; 10];
    let m = pmodel(vec![pnode("a", "Add", &["x", "w"], &["y"], vec![])], vec![vinfo("x", &[2])], &["y"], vec![w], 13);
    assert!(import(&m).is_err());
}

fn external(name: &str, dims: &[i64], location: &str, offset: u64, length: u64) -> TensorProto {
    let kv = |k: &str, v: String| StringStringEntryProto { key: Some(k.into()), value: Some(v) };
    TensorProto {
        data_location: Some(DataLocation::External as i32),
        external_data: vec![
            kv("location", location.into()),
            kv("offset", offset.to_string()),
            kv("length", length.to_string()),
        ],
        ..float_init(name, dims)
    }
}

#[test]
fn external_data_is_confined_and_checked() {
    let root_tmp = tmp_dir("extbad");
    let root = root_tmp.path();
    let dir = root.join("model");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(root.join("secret.bin"), [0u8; 64]).unwrap();
    std::fs::write(dir.join("w.bin"), [0u8; 16]).unwrap();
    let try_load = |t: TensorProto| {
        let m =
            pmodel(vec![pnode("a", "Add", &["x", "w"], &["y"], vec![])], vec![vinfo("x", &[2])], &["y"], vec![t], 13);
        let p = dir.join("m.onnx");
        std::fs::write(&p, m.encode_to_vec()).unwrap();
        onnx::load(&p)
    };
    assert!(try_load(external("w", &[2], "w.bin", 8, 8)).is_ok());
    for (loc, off, len, dims) in [
        ("../secret.bin", 0, 8, vec![2]),
        (root.join("secret.bin").to_str().unwrap(), 0, 8, vec![2]),
        ("w.bin", 12, 8, vec![2]),
        ("w.bin", 0, 1 << 40, vec![1 << 38]),
        ("w.bin", u64::MAX, 8, vec![2]),
        ("missing.bin", 0, 8, vec![2]),
        ("w.bin", 0, 8, vec![1 << 40, 1 << 40]),
    ] {
        let r = try_load(external("w", &dims, loc, off, len));
        assert!(r.is_err(), "{loc} {off}+{len} was accepted");
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink(root.join("secret.bin"), dir.join("link.bin")).unwrap();
        let e = try_load(external("w", &[2], "link.bin", 0, 8)).unwrap_err().to_string();
        assert!(e.contains("outside"), "{e}");
    }
}

#[test]
fn typed_initializers_and_constant_nodes() {
    let mut i8s = TensorProto {
        dims: vec![2],
        data_type: Some(DataType::Int8 as i32),
        name: Some("i".into()),
        ..Default::default()
    };
    i8s.int32_data = vec![-3, 4];
    let mut halfs = TensorProto {
        dims: vec![1],
        data_type: Some(DataType::Float16 as i32),
        name: Some("h".into()),
        ..Default::default()
    };
    halfs.int32_data = vec![0x3c00];
    let cval = AttributeProto {
        name: Some("value_floats".into()),
        r#type: Some(AttributeType::Floats as i32),
        floats: vec![1.0, 2.0],
        ..Default::default()
    };
    let m = pmodel(
        vec![pnode("c", "Constant", &[], &["cf"], vec![cval]), pnode("a", "Add", &["x", "cf"], &["y"], vec![])],
        vec![vinfo("x", &[2])],
        &["y", "i", "h"],
        vec![i8s, halfs],
        13,
    );
    let g = import(&m).unwrap();
    let out = g.eval(vec![("x".into(), Tensor::from_vec(vec![2], vec![0.5f32, 1.0]).unwrap())]).unwrap();
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[1.5, 3.0]);
    assert_eq!(out[1].as_slice::<i8>().unwrap(), &[-3, 4]);
    assert_eq!(out[2].to_f64_vec(), vec![1.0]);
}

// ---------------------------------------------------------------- ONNX Runtime

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Saves `g`, runs it with ONNX Runtime (`scripts/ort_run.py`) on `feed`, and compares with
/// `Graph::eval`. Returns false (after saying so) when the Python venv is missing.
fn check_against_ort(tag: &str, g: &Graph, feed: Vec<(String, Tensor)>, expect_opset: i64) -> bool {
    check_against_ort_with(tag, g, feed, expect_opset, &onnx::SaveOptions::default(), 1e-5)
}

/// [`check_against_ort`] with save options and a tolerance.
fn check_against_ort_with(
    tag: &str,
    g: &Graph,
    feed: Vec<(String, Tensor)>,
    expect_opset: i64,
    opts: &onnx::SaveOptions,
    tol: f64,
) -> bool {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    let script = root.join("scripts/ort_run.py");
    if !python.is_file() || !script.is_file() {
        eprintln!("SKIPPED: {} or {} missing; run scripts/setup-python.sh", python.display(), script.display());
        return false;
    }
    let dir_tmp = tmp_dir(tag);
    let dir = dir_tmp.path();
    let model = dir.join("model.onnx");
    onnx::save_with(g, &model, opts).unwrap();
    assert_eq!(opset_of(&std::fs::read(&model).unwrap()), expect_opset);
    let (ind, outd) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&ind).unwrap();
    for (name, t) in &feed {
        slimnn_formats::npy::write(&ind.join(format!("{name}.npy")), t).unwrap();
    }
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(&model)
        .arg("--input-dir")
        .arg(&ind)
        .arg("--output-dir")
        .arg(&outd)
        .output()
        .expect("python runs");
    assert!(out.status.success(), "ort_run.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let ours = g.eval(feed).unwrap();
    for ((name, _), mine) in g.outputs().iter().zip(&ours) {
        let theirs = slimnn_formats::npy::read(&outd.join(format!("{name}.npy"))).unwrap();
        assert_eq!(mine.dtype(), theirs.dtype(), "{name}");
        let d = mine
            .max_abs_diff(&theirs)
            .unwrap_or_else(|| panic!("{name}: shape {:?} vs {:?}", mine.shape(), theirs.shape()));
        assert!(d <= tol, "{name}: differs from ONNX Runtime by {d}");
    }
    true
}

/// A conv net head plus the ops whose ONNX form depends on the opset (axes as inputs or
/// attributes, Split sizes, legacy softmax); `gelu` adds Gelu, which moves the export to opset 20.
fn ort_graph(gelu: bool) -> Graph {
    let mut g = Graph::default();
    let dims = vec![Dim::sym("batch"), Dim::Known(3), Dim::Known(7), Dim::Known(7)];
    let x = g.add_input("x", Fact::new(DType::F32, dims)).unwrap();
    let w = konst(&mut g, "conv.w", randn(&[4, 3, 3, 3], 50));
    let b = konst(&mut g, "conv.b", randn(&[4], 51));
    let attrs = ConvAttrs { kernel_shape: Some(vec![3, 3]), pads: vec![1, 1, 1, 1], group: 1, ..Default::default() };
    let c = node(&mut g, "conv", Conv { attrs }, vec![x, w, b]);
    let c = node(&mut g, "relu", Unary(UnaryOp::Relu), vec![c]);
    let legacy = node(&mut g, "legacy_sm", Softmax { axis: 1, legacy_2d: true }, vec![c]);
    let parts = g.add_node("split", Split { axis: 2, split: None, num_outputs: 3 }, vec![c]).unwrap();
    let y = node(&mut g, "gap", GlobalPool { max: false }, vec![c]);
    let y = node(&mut g, "flat", Flatten { axis: 1 }, vec![y]);
    let fc = konst(&mut g, "fc.w", randn(&[4, 5], 52));
    let y = node(&mut g, "fc", MatMul, vec![y, fc]);
    let y = node(&mut g, "tanh", Unary(UnaryOp::Tanh), vec![y]);
    let sm = node(&mut g, "sm", Softmax { axis: -1, legacy_2d: false }, vec![y]);
    let mean = Reduce { op: ReduceOp::Mean, axes: Some(vec![1]), keepdims: true, noop_with_empty_axes: false };
    let red = node(&mut g, "rm", mean, vec![y]);
    let sum = Reduce { op: ReduceOp::Sum, axes: Some(vec![2, 3]), keepdims: false, noop_with_empty_axes: false };
    let red2 = node(&mut g, "rs", sum, vec![parts[2]]);
    let u = node(&mut g, "unsq", Unsqueeze { axes: vec![1, -1] }, vec![red2]);
    let sq = node(&mut g, "sq", Squeeze { axes: Some(vec![1]) }, vec![u]);
    let ln_scale = konst(&mut g, "ln.s", randn(&[5], 53));
    let mut last = node(&mut g, "ln", LayerNorm::new(-1, 1e-5), vec![y, ln_scale]);
    if gelu {
        last = node(&mut g, "gelu", Unary(UnaryOp::Gelu { tanh: false }), vec![last]);
    }
    g.add_output("probs", sm);
    g.add_output("mean", red);
    g.add_output("ln", last);
    g.add_output("legacy", legacy);
    g.add_output("split_last", parts[2]);
    g.add_output("squeezed", sq);
    g
}

#[test]
fn exported_model_matches_onnx_runtime() {
    let feed = || vec![("x".to_string(), randn(&[2, 3, 7, 7], 54))];
    if check_against_ort("ort17", &ort_graph(false), feed(), 17) {
        check_against_ort("ort20", &ort_graph(true), feed(), 20);
    }
}

/// MiniLM built from its Hugging Face checkpoint, exported with external data, read back
/// identical, and run by ONNX Runtime (which reads our external data file).
#[test]
fn real_model_export_matches_onnx_runtime() {
    let assets = std::env::var_os("SLIMNN_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"));
    let dir = assets.join("minilm");
    if !dir.join("model.safetensors").is_file() {
        eprintln!("SKIPPED: {} missing; run scripts/fetch-assets.sh", dir.display());
        return;
    }
    let g = slimnn_formats::hf::load_bert(&dir).unwrap();
    let ids = Tensor::from_vec(vec![2, 8], (0..16).map(|i| 100 + i * 37).collect::<Vec<i64>>()).unwrap();
    let mut mask = vec![1i64; 16];
    mask[13..].fill(0);
    let feed = vec![
        ("input_ids".to_string(), ids),
        ("attention_mask".to_string(), Tensor::from_vec(vec![2, 8], mask).unwrap()),
        ("token_type_ids".to_string(), Tensor::from_vec(vec![2, 8], vec![0i64; 16]).unwrap()),
    ];
    let bytes = onnx::to_bytes(&g).unwrap();
    let back = onnx::from_bytes(&bytes, None).unwrap();
    assert_same_signature(&g, &back);
    assert_eq!(weights(&g), weights(&back));
    assert_eq!(g.eval(feed.clone()).unwrap(), back.eval(feed.clone()).unwrap());
    let opset = onnx::required_opset(&g);
    let ext = onnx::SaveOptions { external_data_threshold: 1 };
    check_against_ort_with("minilm", &g, feed, opset, &ext, 1e-4);
}

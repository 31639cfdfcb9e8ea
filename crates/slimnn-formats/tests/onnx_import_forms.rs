//! The importer's normalisation of ONNX spellings that differ across opsets (axes as
//! attributes or inputs, optional inputs, variadic ops, ...), each checked on hand-computed
//! values.

use prost::Message;
use slimnn_formats::onnx;
use slimnn_formats::onnx::proto::attribute_proto::AttributeType;
use slimnn_formats::onnx::proto::tensor_shape_proto::{dimension, Dimension};
use slimnn_formats::onnx::proto::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorShapeProto, TypeProto,
    ValueInfoProto,
};
use slimnn_ir::{Graph, Op};
use slimnn_tensor::{DType, Tensor};

fn ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn string(name: &str, v: &str) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::String as i32),
        s: Some(v.as_bytes().to_vec()),
        ..Default::default()
    }
}

fn node(op: &str, inputs: &[&str], outputs: &[&str], attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        name: Some(format!("{op}_node")),
        op_type: Some(op.into()),
        attribute,
        ..Default::default()
    }
}

fn vinfo(name: &str, t: &Tensor) -> ValueInfoProto {
    let elem = onnx::dtype_to_onnx(t.dtype()).unwrap();
    let dim = t
        .shape()
        .iter()
        .map(|&d| Dimension { denotation: None, value: Some(dimension::Value::DimValue(d as i64)) })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            denotation: None,
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(elem),
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        ..Default::default()
    }
}

fn f32s(shape: &[usize], v: &[f32]) -> Tensor {
    Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
}

fn i64s(v: &[i64]) -> Tensor {
    Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap()
}

/// Imports a one-graph model (inputs fed with `inputs`, initializers `inits`) and runs it.
fn build(
    nodes: Vec<NodeProto>,
    inputs: &[(&str, Tensor)],
    inits: &[(&str, Tensor)],
    outputs: &[&str],
    opset: i64,
) -> Graph {
    let m = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(GraphProto {
            node: nodes,
            name: Some("g".into()),
            initializer: inits.iter().map(|(n, t)| onnx::tensor_to_proto(t, n).unwrap()).collect(),
            input: inputs.iter().map(|(n, t)| vinfo(n, t)).collect(),
            output: outputs
                .iter()
                .map(|o| ValueInfoProto { name: Some(o.to_string()), ..Default::default() })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    onnx::from_bytes(&m.encode_to_vec(), None).unwrap_or_else(|e| panic!("import: {e}"))
}

fn run(
    nodes: Vec<NodeProto>,
    inputs: &[(&str, Tensor)],
    inits: &[(&str, Tensor)],
    outputs: &[&str],
    opset: i64,
) -> Vec<Tensor> {
    let g = build(nodes, inputs, inits, outputs, opset);
    let feed = inputs.iter().map(|(n, t)| (n.to_string(), t.clone())).collect();
    g.eval(feed).unwrap_or_else(|e| panic!("eval: {e}"))
}

fn close(t: &Tensor, want: &[f64]) {
    let got = t.to_f64_vec();
    assert_eq!(got.len(), want.len(), "{got:?} vs {want:?}");
    for (a, b) in got.iter().zip(want) {
        assert!((a - b).abs() < 1e-5, "{got:?} vs {want:?}");
    }
}

#[test]
fn squeeze_unsqueeze_attribute_and_input_forms() {
    let x = f32s(&[1, 2], &[1.0, 2.0]);
    let out =
        run(vec![node("Squeeze", &["x"], &["y"], vec![ints("axes", &[0])])], &[("x", x.clone())], &[], &["y"], 11);
    assert_eq!(out[0].shape(), &[2]);
    let out = run(
        vec![node("Squeeze", &["x", "axes"], &["y"], vec![])],
        &[("x", x.clone())],
        &[("axes", i64s(&[0]))],
        &["y"],
        13,
    );
    assert_eq!(out[0].shape(), &[2]);
    let out =
        run(vec![node("Unsqueeze", &["x"], &["y"], vec![ints("axes", &[-1])])], &[("x", x.clone())], &[], &["y"], 12);
    assert_eq!(out[0].shape(), &[1, 2, 1]);
    let g = build(
        vec![node("Unsqueeze", &["x", "axes"], &["y"], vec![])],
        &[("x", x)],
        &[("axes", i64s(&[0]))],
        &["y"],
        13,
    );
    // The axes initializer is read as a constant, not added to the graph.
    assert!(!g.nodes().iter().any(|n| matches!(n.op, Op::Const(_))));
}

#[test]
fn split_forms() {
    let x = f32s(&[3], &[1.0, 2.0, 3.0]);
    let out = run(
        vec![node("Split", &["x"], &["a", "b"], vec![ints("split", &[1, 2])])],
        &[("x", x.clone())],
        &[],
        &["a", "b"],
        11,
    );
    close(&out[0], &[1.0]);
    close(&out[1], &[2.0, 3.0]);
    let out = run(
        vec![node("Split", &["x", "s"], &["a", "b"], vec![])],
        &[("x", x.clone())],
        &[("s", i64s(&[2, 1]))],
        &["a", "b"],
        13,
    );
    close(&out[0], &[1.0, 2.0]);
    close(&out[1], &[3.0]);
    // Opset 18: num_outputs, the last part smaller.
    let out =
        run(vec![node("Split", &["x"], &["a", "b"], vec![int("num_outputs", 2)])], &[("x", x)], &[], &["a", "b"], 18);
    close(&out[0], &[1.0, 2.0]);
    close(&out[1], &[3.0]);
}

#[test]
fn reduce_axes_by_opset() {
    let x = f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let attr_form = |op: &str, opset| {
        run(
            vec![node(op, &["x"], &["y"], vec![ints("axes", &[1]), int("keepdims", 0)])],
            &[("x", x.clone())],
            &[],
            &["y"],
            opset,
        )
    };
    close(&attr_form("ReduceSum", 11)[0], &[3.0, 7.0]);
    close(&attr_form("ReduceMean", 17)[0], &[1.5, 3.5]);
    let input_form = |op: &str, opset| {
        run(
            vec![node(op, &["x", "axes"], &["y"], vec![int("keepdims", 0)])],
            &[("x", x.clone())],
            &[("axes", i64s(&[0]))],
            &["y"],
            opset,
        )
    };
    close(&input_form("ReduceSum", 13)[0], &[4.0, 6.0]);
    close(&input_form("ReduceMax", 18)[0], &[3.0, 4.0]);
    // No axes: everything; empty axes with noop: pass-through.
    let all =
        run(vec![node("ReduceSum", &["x"], &["y"], vec![int("keepdims", 0)])], &[("x", x.clone())], &[], &["y"], 13);
    close(&all[0], &[10.0]);
    let noop = run(
        vec![node("ReduceSum", &["x", "axes"], &["y"], vec![int("noop_with_empty_axes", 1)])],
        &[("x", x)],
        &[("axes", Tensor::from_vec(vec![0], Vec::<i64>::new()).unwrap())],
        &["y"],
        13,
    );
    close(&noop[0], &[1.0, 2.0, 3.0, 4.0]);
}

#[test]
fn softmax_legacy_meaning_before_opset_13() {
    // Opset 11, default axis 1: softmax over the 4 values of each batch row.
    let x = f32s(&[2, 2, 2], &[0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0]);
    let out = run(vec![node("Softmax", &["x"], &["y"], vec![])], &[("x", x.clone())], &[], &["y"], 11);
    close(&out[0], &[0.25; 8]);
    // Opset 13, default axis -1: over pairs.
    let out = run(vec![node("Softmax", &["x"], &["y"], vec![])], &[("x", x)], &[], &["y"], 13);
    close(&out[0], &[0.5; 8]);
}

#[test]
fn clip_bounds_default_to_the_dtype_range() {
    let x = f32s(&[3], &[-5.0, 0.5, 5.0]);
    let out = run(
        vec![node("Clip", &["x", "", "hi"], &["y"], vec![])],
        &[("x", x.clone())],
        &[("hi", Tensor::scalar(1.0f32))],
        &["y"],
        13,
    );
    close(&out[0], &[-5.0, 0.5, 1.0]);
    let out = run(
        vec![node("Clip", &["x", "lo"], &["y"], vec![])],
        &[("x", x)],
        &[("lo", Tensor::scalar(0.0f32))],
        &["y"],
        11,
    );
    close(&out[0], &[0.0, 0.5, 5.0]);
    let xi = Tensor::from_vec(vec![2], vec![-100i8, 100]).unwrap();
    let out = run(vec![node("Clip", &["x"], &["y"], vec![])], &[("x", xi)], &[], &["y"], 13);
    assert_eq!(out[0].as_slice::<i8>().unwrap(), &[-100, 100]);
}

#[test]
fn resize_opset_11_with_empty_scales_and_sizes() {
    let x = f32s(&[1, 1, 1, 2], &[1.0, 2.0]);
    let out = run(
        vec![node("Resize", &["x", "roi", "scales", "sizes"], &["y"], vec![string("mode", "nearest")])],
        &[("x", x)],
        &[
            ("roi", Tensor::from_vec(vec![0], Vec::<f32>::new()).unwrap()),
            ("scales", Tensor::from_vec(vec![0], Vec::<f32>::new()).unwrap()),
            ("sizes", i64s(&[1, 1, 1, 4])),
        ],
        &["y"],
        11,
    );
    assert_eq!(out[0].shape(), &[1, 1, 1, 4]);
    close(&out[0], &[1.0, 1.0, 2.0, 2.0]);
}

#[test]
fn pad_with_axes_and_slice_with_steps_only() {
    let x = f32s(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
    let out = run(
        vec![node("Pad", &["x", "pads", "", "axes"], &["y"], vec![])],
        &[("x", x.clone())],
        &[("pads", i64s(&[1, 0])), ("axes", i64s(&[1]))],
        &["y"],
        18,
    );
    assert_eq!(out[0].shape(), &[2, 3]);
    close(&out[0], &[0.0, 1.0, 2.0, 0.0, 3.0, 4.0]);
    let out = run(
        vec![node("Slice", &["x", "starts", "ends", "", "steps"], &["y"], vec![])],
        &[("x", x)],
        &[("starts", i64s(&[1])), ("ends", i64s(&[-3])), ("steps", i64s(&[-1]))],
        &["y"],
        13,
    );
    close(&out[0], &[3.0, 4.0, 1.0, 2.0]);
}

#[test]
fn quantize_without_zero_point_is_u8() {
    let x = f32s(&[3], &[0.0, 1.0, 300.0]);
    let out = run(
        vec![
            node("QuantizeLinear", &["x", "s"], &["q"], vec![]),
            node("DequantizeLinear", &["q", "s"], &["y"], vec![]),
        ],
        &[("x", x)],
        &[("s", Tensor::scalar(0.5f32))],
        &["q", "y"],
        13,
    );
    assert_eq!(out[0].as_slice::<u8>().unwrap(), &[0, 2, 255]);
    close(&out[1], &[0.0, 1.0, 127.5]);
}

#[test]
fn variadic_ops_become_chains() {
    let a = f32s(&[2], &[1.0, 5.0]);
    let b = f32s(&[2], &[3.0, 1.0]);
    let c = f32s(&[1], &[2.0]);
    let inputs = [("a", a.clone()), ("b", b), ("c", c)];
    let out = run(
        vec![
            node("Mean", &["a", "b", "c"], &["mean"], vec![]),
            node("Sum", &["a"], &["sum1"], vec![]),
            node("Max", &["a", "b", "c"], &["max"], vec![]),
            node("Min", &["a", "b"], &["min"], vec![]),
        ],
        &inputs,
        &[],
        &["mean", "sum1", "max", "min"],
        13,
    );
    close(&out[0], &[2.0, 8.0 / 3.0]);
    close(&out[1], &[1.0, 5.0]);
    close(&out[2], &[3.0, 5.0]);
    close(&out[3], &[1.0, 1.0]);
}

#[test]
fn dropout_castlike_size_and_constants() {
    let x = f32s(&[2, 3], &[1.5, -2.5, 0.0, 1.0, 2.0, 3.0]);
    let like = Tensor::from_vec(vec![1], vec![0i32]).unwrap();
    let out = run(
        vec![
            node("Dropout", &["x", "ratio", "training"], &["d"], vec![]),
            node("CastLike", &["d", "like"], &["c"], vec![]),
            node("Size", &["x"], &["n"], vec![]),
            node("Constant", &[], &["k"], vec![int("value_int", 7)]),
            node("Add", &["n", "k"], &["n7"], vec![]),
        ],
        &[("x", x), ("like", like)],
        &[("ratio", Tensor::scalar(0.5f32)), ("training", Tensor::scalar(false))],
        &["d", "c", "n7"],
        15,
    );
    close(&out[0], &[1.5, -2.5, 0.0, 1.0, 2.0, 3.0]);
    assert_eq!(out[1].dtype(), DType::I32);
    assert_eq!(out[1].as_slice::<i32>().unwrap(), &[1, -2, 0, 1, 2, 3]);
    assert_eq!(out[2].as_slice::<i64>().unwrap(), &[13]);
}

#[test]
fn dropout_in_training_mode_is_refused() {
    let x = f32s(&[2], &[1.0, 2.0]);
    let m = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(13) }],
        graph: Some(GraphProto {
            node: vec![node("Dropout", &["x", "", "t"], &["y"], vec![])],
            initializer: vec![onnx::tensor_to_proto(&Tensor::scalar(true), "t").unwrap()],
            input: vec![vinfo("x", &x)],
            output: vec![ValueInfoProto { name: Some("y".into()), ..Default::default() }],
            ..Default::default()
        }),
        ..Default::default()
    };
    let e = onnx::from_bytes(&m.encode_to_vec(), None).unwrap_err().to_string();
    assert!(e.contains("training_mode"), "{e}");
}

fn u8s(shape: &[usize], v: &[u8]) -> Tensor {
    Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
}

/// The QOperator ops, whose conformance cases are all at opset 10, with omitted zero points.
#[test]
fn integer_and_qlinear_ops() {
    let out = run(
        vec![node("MatMulInteger", &["a", "b", "azp"], &["y"], vec![])],
        &[("a", u8s(&[2, 2], &[1, 2, 3, 4])), ("b", u8s(&[2, 2], &[1, 0, 0, 1]))],
        &[("azp", Tensor::scalar(1u8))],
        &["y"],
        13,
    );
    assert_eq!(out[0].as_slice::<i32>().unwrap(), &[0, 1, 2, 3]);

    let out = run(
        vec![node("ConvInteger", &["x", "w", "", "wzp"], &["y"], vec![])],
        &[("x", u8s(&[1, 1, 2, 2], &[1, 2, 3, 4]))],
        &[("w", u8s(&[1, 1, 1, 1], &[2])), ("wzp", Tensor::scalar(1u8))],
        &["y"],
        13,
    );
    assert_eq!(out[0].as_slice::<i32>().unwrap(), &[1, 2, 3, 4]);

    let qconv_inputs = ["x", "xs", "xzp", "w", "ws", "wzp", "ys", "yzp"];
    let out = run(
        vec![node("QLinearConv", &qconv_inputs, &["y"], vec![])],
        &[("x", u8s(&[1, 1, 2, 2], &[10, 20, 30, 40]))],
        &[
            ("xs", Tensor::scalar(0.5f32)),
            ("xzp", Tensor::scalar(10u8)),
            ("w", Tensor::from_vec(vec![1, 1, 1, 1], vec![2i8]).unwrap()),
            ("ws", Tensor::scalar(1.0f32)),
            ("wzp", Tensor::scalar(0i8)),
            ("ys", Tensor::scalar(2.0f32)),
            ("yzp", Tensor::scalar(5u8)),
        ],
        &["y"],
        13,
    );
    assert_eq!(out[0].as_slice::<u8>().unwrap(), &[5, 10, 15, 20]);

    let out = run(
        vec![node("QLinearMatMul", &["a", "as", "azp", "b", "bs", "bzp", "ys", "yzp"], &["y"], vec![])],
        &[("a", u8s(&[1, 2], &[12, 14]))],
        &[
            ("as", Tensor::scalar(0.5f32)),
            ("azp", Tensor::scalar(10u8)),
            ("b", u8s(&[2, 1], &[3, 5])),
            ("bs", Tensor::scalar(1.0f32)),
            ("bzp", Tensor::scalar(1u8)),
            ("ys", Tensor::scalar(0.5f32)),
            ("yzp", Tensor::scalar(0u8)),
        ],
        &["y"],
        13,
    );
    assert_eq!(out[0].as_slice::<u8>().unwrap(), &[20]);
}

fn float(name: &str, v: f32) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    }
}

/// Imports a model without running it, for the error cases.
fn import_err(nodes: Vec<NodeProto>, inputs: &[(&str, Tensor)], outputs: &[&str], opset: i64) -> String {
    let m = ModelProto {
        ir_version: Some(8),
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        graph: Some(GraphProto {
            node: nodes,
            name: Some("g".into()),
            input: inputs.iter().map(|(n, t)| vinfo(n, t)).collect(),
            output: outputs
                .iter()
                .map(|o| ValueInfoProto { name: Some(o.to_string()), ..Default::default() })
                .collect(),
            ..Default::default()
        }),
        ..Default::default()
    };
    onnx::from_bytes(&m.encode_to_vec(), None).expect_err("the import should fail").to_string()
}

#[test]
fn slice_clip_and_pad_attribute_forms() {
    let x = f32s(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    // Slice 1: starts / ends / axes attributes.
    let attrs = vec![ints("starts", &[1]), ints("ends", &[1000]), ints("axes", &[1])];
    let out = run(vec![node("Slice", &["x"], &["y"], attrs)], &[("x", x.clone())], &[], &["y"], 9);
    assert_eq!(out[0].shape(), &[2, 2]);
    close(&out[0], &[2.0, 3.0, 5.0, 6.0]);
    // Without axes: the first dims.
    let attrs = vec![ints("starts", &[1]), ints("ends", &[2])];
    let out = run(vec![node("Slice", &["x"], &["y"], attrs)], &[("x", x.clone())], &[], &["y"], 1);
    close(&out[0], &[4.0, 5.0, 6.0]);
    // Clip 6: min / max attributes, each optional.
    let out = run(
        vec![node("Clip", &["x"], &["y"], vec![float("min", 2.5), float("max", 4.5)])],
        &[("x", x.clone())],
        &[],
        &["y"],
        7,
    );
    close(&out[0], &[2.5, 2.5, 3.0, 4.0, 4.5, 4.5]);
    let out = run(vec![node("Clip", &["x"], &["y"], vec![float("max", 2.0)])], &[("x", x.clone())], &[], &["y"], 10);
    close(&out[0], &[1.0, 2.0, 2.0, 2.0, 2.0, 2.0]);
    // Pad 2: pads and value attributes.
    let attrs = vec![ints("pads", &[0, 1, 0, 0]), float("value", 9.0)];
    let out = run(vec![node("Pad", &["x"], &["y"], attrs)], &[("x", x.clone())], &[], &["y"], 10);
    assert_eq!(out[0].shape(), &[2, 4]);
    close(&out[0], &[9.0, 1.0, 2.0, 3.0, 9.0, 4.0, 5.0, 6.0]);
    let attrs = vec![ints("pads", &[1, 0, 0, 0]), string("mode", "edge")];
    let out = run(vec![node("Pad", &["x"], &["y"], attrs)], &[("x", x.clone())], &[], &["y"], 2);
    close(&out[0], &[1.0, 2.0, 3.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    // The attribute forms refuse the inputs of later versions.
    let e = import_err(vec![node("Clip", &["x", "x"], &["y"], vec![])], &[("x", x)], &["y"], 10);
    assert!(e.contains("version 6") && e.contains("inputs"), "{e}");
}

#[test]
fn resize_10_is_asymmetric_and_rounds_down() {
    // Scales 2 on [10, 20]: samples at 0, 0.5, 1, 1.5.
    let x = f32s(&[1, 2], &[10.0, 20.0]);
    let scales = f32s(&[2], &[1.0, 2.0]);
    let out = run(
        vec![node("Resize", &["x", "scales"], &["y"], vec![])],
        &[("x", x.clone())],
        &[("scales", scales.clone())],
        &["y"],
        10,
    );
    close(&out[0], &[10.0, 10.0, 20.0, 20.0]);
    let out = run(
        vec![node("Resize", &["x", "scales"], &["y"], vec![string("mode", "linear")])],
        &[("x", x.clone())],
        &[("scales", scales)],
        &["y"],
        10,
    );
    close(&out[0], &[10.0, 15.0, 20.0, 20.0]);
    let cubic = vec![node("Resize", &["x", "s"], &["y"], vec![string("mode", "cubic")])];
    let e = import_err(cubic, &[("x", x.clone()), ("s", f32s(&[2], &[1.0, 2.0]))], &["y"], 10);
    assert!(e.contains("Resize version 10") && e.contains("cubic"), "{e}");
}

#[test]
fn old_opsets_are_read_per_op() {
    // Not, GlobalAveragePool and Softplus have not changed since opset 1.
    let b = Tensor::from_vec(vec![3], vec![true, false, true]).unwrap();
    let out = run(vec![node("Not", &["x"], &["y"], vec![])], &[("x", b)], &[], &["y"], 1);
    assert_eq!(out[0].as_slice::<bool>().unwrap(), &[false, true, false]);
    let x = f32s(&[1, 2, 2], &[1.0, 3.0, 5.0, 7.0]);
    let out = run(vec![node("GlobalAveragePool", &["x"], &["y"], vec![])], &[("x", x.clone())], &[], &["y"], 1);
    assert_eq!(out[0].shape(), &[1, 2, 1]);
    close(&out[0], &[2.0, 6.0]);
    // Elu 6, BatchNormalization 7 with the default spatial = 1, Dropout 7 with its ratio.
    let out = run(
        vec![
            node("Elu", &["x"], &["e"], vec![float("alpha", 1.0)]),
            node("Dropout", &["e"], &["d"], vec![float("ratio", 0.5)]),
            node("BatchNormalization", &["d", "s", "b", "m", "v"], &["y"], vec![float("epsilon", 0.0)]),
        ],
        &[("x", x.clone())],
        &[
            ("s", f32s(&[2], &[1.0, 2.0])),
            ("b", f32s(&[2], &[0.0, 1.0])),
            ("m", f32s(&[2], &[1.0, 0.0])),
            ("v", f32s(&[2], &[4.0, 1.0])),
        ],
        &["y"],
        7,
    );
    close(&out[0], &[0.0, 1.0, 11.0, 15.0]);
    let bn = vec![node("BatchNormalization", &["x", "s", "s", "s", "s"], &["y"], vec![int("spatial", 0)])];
    let e = import_err(bn, &[("x", x.clone()), ("s", f32s(&[2], &[1.0, 1.0]))], &["y"], 7);
    assert!(e.contains("BatchNormalization version 7") && e.contains("spatial"), "{e}");
    // Versions with legacy attributes are listed as unsupported, all at once.
    let e = import_err(
        vec![node("Add", &["x", "x"], &["a"], vec![]), node("Relu", &["a"], &["y"], vec![])],
        &[("x", x)],
        &["y"],
        5,
    );
    assert!(e.contains("op Add version 1 (opset 5): not supported"), "{e}");
    assert!(e.contains("op Relu version 1 (opset 5): not supported"), "{e}");
}

#[test]
fn layer_norm_statistics_outputs() {
    let x = f32s(&[2, 2], &[1.0, 3.0, 2.0, 2.0]);
    let out = run(
        vec![node("LayerNormalization", &["x", "s"], &["y", "mean", "inv"], vec![float("epsilon", 1.0)])],
        &[("x", x)],
        &[("s", f32s(&[2], &[1.0, 1.0]))],
        &["y", "mean", "inv"],
        17,
    );
    assert_eq!(out.len(), 3);
    assert_eq!(out[1].shape(), &[2, 1]);
    close(&out[1], &[2.0, 2.0]);
    // Variances 1 and 0, plus epsilon 1.
    close(&out[2], &[1.0 / 2f64.sqrt(), 1.0]);
    close(&out[0], &[-1.0 / 2f64.sqrt(), 1.0 / 2f64.sqrt(), 0.0, 0.0]);
}

//! Model-local ONNX functions for slimnn's own ops (domain [`SLIMNN_DOMAIN`]): each body is made
//! of standard ops with the op's exact semantics, so ONNX Runtime (which inlines local
//! functions) runs the exported model, while slimnn's importer reads the node itself.

use super::convert::reduce_axes_as_input;
use super::proto::attribute_proto::AttributeType;
use super::proto::tensor_proto::DataType;
use super::proto::{AttributeProto, FunctionProto, NodeProto, OperatorSetIdProto, TensorProto};
use slimnn_ir::ops::SLIMNN_DOMAIN;

fn node(op: &str, inputs: &[&str], output: &str, attribute: Vec<AttributeProto>) -> NodeProto {
    NodeProto {
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.to_string()],
        op_type: Some(op.to_string()),
        attribute,
        ..Default::default()
    }
}

fn attr_i(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Int as i32),
        i: Some(v),
        ..Default::default()
    }
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(AttributeType::Ints as i32),
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn constant_f32(output: &str, v: f32) -> NodeProto {
    let attr = AttributeProto {
        name: Some("value_float".into()),
        r#type: Some(AttributeType::Float as i32),
        f: Some(v),
        ..Default::default()
    };
    node("Constant", &[], output, vec![attr])
}

fn constant_axes(output: &str, axes: &[i64]) -> NodeProto {
    let t = TensorProto {
        dims: vec![axes.len() as i64],
        data_type: Some(DataType::Int64 as i32),
        int64_data: axes.to_vec(),
        ..Default::default()
    };
    let attr = AttributeProto {
        name: Some("value".into()),
        r#type: Some(AttributeType::Tensor as i32),
        t: Some(t),
        ..Default::default()
    };
    node("Constant", &[], output, vec![attr])
}

/// A reduction over `axes` with `keepdims = 1`, in the form of `opset`.
fn reduce(body: &mut Vec<NodeProto>, op: &str, x: &str, axes: &[i64], output: &str, opset: i64) {
    if reduce_axes_as_input(op, opset) {
        let a = format!("{output}_axes");
        body.push(constant_axes(&a, axes));
        body.push(node(op, &[x, &a], output, vec![attr_i("keepdims", 1)]));
    } else {
        body.push(node(op, &[x], output, vec![attr_ints("axes", axes), attr_i("keepdims", 1)]));
    }
}

/// `DynamicRowQuantMatMul(x, w, w_scale) -> y` (see `slimnn_ir::ops::DynamicRowQuantMatMul`):
/// `DynamicQuantizeLinear`'s rule per row, `MatMulInteger` without zero points, the per-row
/// zero point taken off as `z_r * colsum(w)` in i32, then `f32(acc) * (s_r * w_scale)`.
pub(super) fn dynamic_row_quant_matmul(opset: i64) -> FunctionProto {
    let mut b = vec![constant_f32("zero", 0.0), constant_f32("one", 1.0), constant_f32("c255", 255.0)];
    reduce(&mut b, "ReduceMax", "x", &[-1], "row_max", opset);
    reduce(&mut b, "ReduceMin", "x", &[-1], "row_min", opset);
    let cast = |to: DataType| vec![attr_i("to", to as i64)];
    b.extend([
        node("Max", &["row_max", "zero"], "hi", vec![]),
        node("Min", &["row_min", "zero"], "lo", vec![]),
        node("Sub", &["hi", "lo"], "range", vec![]),
        node("Equal", &["range", "zero"], "flat", vec![]),
        node("Div", &["range", "c255"], "range_scale", vec![]),
        node("Where", &["flat", "one", "range_scale"], "scale", vec![]),
        node("Div", &["lo", "scale"], "lo_scaled", vec![]),
        node("Sub", &["zero", "lo_scaled"], "zero_unclipped", vec![]),
        node("Clip", &["zero_unclipped", "zero", "c255"], "zero_clipped", vec![]),
        node("Round", &["zero_clipped"], "zero_point", vec![]),
        node("Div", &["x", "scale"], "x_scaled", vec![]),
        node("Round", &["x_scaled"], "x_rounded", vec![]),
        node("Add", &["x_rounded", "zero_point"], "x_shifted", vec![]),
        node("Clip", &["x_shifted", "zero", "c255"], "x_clipped", vec![]),
        node("Cast", &["x_clipped"], "x_quantized", cast(DataType::Uint8)),
        node("MatMulInteger", &["x_quantized", "w"], "product", vec![]),
        node("Cast", &["w"], "w_i32", cast(DataType::Int32)),
    ]);
    reduce(&mut b, "ReduceSum", "w_i32", &[0], "w_colsum", opset);
    b.extend([
        node("Cast", &["zero_point"], "zero_point_i32", cast(DataType::Int32)),
        node("Mul", &["zero_point_i32", "w_colsum"], "zero_term", vec![]),
        node("Sub", &["product", "zero_term"], "acc", vec![]),
        node("Cast", &["acc"], "acc_f32", cast(DataType::Float)),
        node("Mul", &["scale", "w_scale"], "scales", vec![]),
        node("Mul", &["acc_f32", "scales"], "y", vec![]),
    ]);
    FunctionProto {
        name: Some("DynamicRowQuantMatMul".into()),
        domain: Some(SLIMNN_DOMAIN.into()),
        input: ["x", "w", "w_scale"].map(String::from).to_vec(),
        output: vec!["y".into()],
        node: b,
        opset_import: vec![OperatorSetIdProto { domain: Some(String::new()), version: Some(opset) }],
        doc_string: Some(
            "x quantized to u8 per row at run time (DynamicQuantizeLinear's rule on each row), times \
             symmetric int8 w, scaled by the row's scale times w_scale"
                .into(),
        ),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use crate::onnx;
    use slimnn_ir::ops::{DynamicRowQuantMatMul, SLIMNN_DOMAIN};
    use slimnn_ir::{Fact, Graph};
    use slimnn_tensor::{DType, Tensor};

    #[test]
    fn row_quant_matmul_round_trips_with_its_function_body() {
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F32, &[2, 4])).unwrap();
        let w =
            g.add_const("w", Tensor::from_vec(vec![4, 3], vec![1i8, -2, 3, 4, -5, 6, 7, -8, 9, 10, 11, -12]).unwrap());
        let s = g.add_const("s", Tensor::from_vec(vec![3], vec![0.1f32, 0.2, 0.3]).unwrap());
        let y = g.add_node("rq", DynamicRowQuantMatMul, vec![x, w.unwrap(), s.unwrap()]).unwrap()[0];
        g.add_output("y", y);
        let model = onnx::to_model(&g).unwrap();
        assert_eq!(model.functions.len(), 1);
        let f = &model.functions[0];
        assert_eq!((f.name.as_deref(), f.domain.as_deref()), (Some("DynamicRowQuantMatMul"), Some(SLIMNN_DOMAIN)));
        assert!(f.node.iter().any(|n| n.op_type.as_deref() == Some("MatMulInteger")));
        assert!(model.opset_import.iter().any(|o| o.domain.as_deref() == Some(SLIMNN_DOMAIN)));
        let back = onnx::from_bytes(&onnx::to_bytes(&g).unwrap(), None).unwrap();
        assert_eq!(back.op_histogram().get("DynamicRowQuantMatMul"), Some(&1));
        let feed = vec![(
            "x".to_string(),
            Tensor::from_vec(vec![2, 4], vec![0.5f32, -1.0, 2.0, 0.0, 3.0, 1.0, -2.0, 0.25]).unwrap(),
        )];
        assert_eq!(g.eval(feed.clone()).unwrap(), back.eval(feed).unwrap());
    }
}

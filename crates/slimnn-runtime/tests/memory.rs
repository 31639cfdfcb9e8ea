//! A state's memory stays flat over repeated runs, and the runtime agrees with the reference.

use slimnn_ir::ops::{Binary, BinaryOp, MatMul, Unary, UnaryOp};
use slimnn_ir::{Fact, Graph};
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Dim, Tensor};

fn model() -> Graph {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(64)])).unwrap();
    let w: Vec<f32> = (0..64 * 64).map(|i| ((i * 7 % 13) as f32 - 6.0) / 20.0).collect();
    let w = g.add_const("w", Tensor::from_vec(vec![64, 64], w).unwrap()).unwrap();
    let b = g.add_const("b", Tensor::from_vec(vec![64], vec![0.1f32; 64]).unwrap()).unwrap();
    let y = g.add_node("mm", MatMul, vec![x, w]).unwrap()[0];
    let y = g.add_node("bias", Binary(BinaryOp::Add), vec![y, b]).unwrap()[0];
    let y = g.add_node("relu", Unary(UnaryOp::Relu), vec![y]).unwrap()[0];
    // Softplus has no fast kernel: it runs on the reference evaluator, whose buffers must not pile up.
    let t = g.add_node("softplus", Unary(UnaryOp::Softplus), vec![y]).unwrap()[0];
    let z = g.add_node("res", Binary(BinaryOp::Add), vec![t, x]).unwrap()[0];
    g.add_output("z", z);
    g
}

fn input(batch: usize) -> Vec<(String, Tensor)> {
    let v: Vec<f32> = (0..batch * 64).map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0).collect();
    vec![("x".into(), Tensor::from_vec(vec![batch, 64], v).unwrap())]
}

#[test]
fn retained_memory_is_flat_over_repeated_runs() {
    let g = model();
    let rt = Runnable::new(g.clone(), RuntimeConfig::with_threads(1)).unwrap();
    let mut st = rt.new_state();
    rt.run(&mut st, input(32)).unwrap();
    let after_first = st.retained_bytes();
    for _ in 0..200 {
        rt.run(&mut st, input(32)).unwrap();
    }
    assert_eq!(st.retained_bytes(), after_first, "the pool grew over repeated same-shape runs");
    assert!(st.peak_activation_bytes() > 0);
    let want = g.eval(input(32)).unwrap();
    let got = rt.run(&mut st, input(32)).unwrap();
    assert!(want[0].max_abs_diff(&got[0]).unwrap() < 1e-5);
}

#[test]
fn plan_cache_is_bounded_over_many_shapes() {
    let g = model();
    let rt = Runnable::new(g.clone(), RuntimeConfig::with_threads(1)).unwrap();
    let mut st = rt.new_state();
    // One new shape per run, as an LLM's decode steps or a server's many sequence lengths give.
    for batch in 1..=100 {
        rt.run(&mut st, input(batch)).unwrap();
    }
    assert_eq!(rt.cached_plans(), 64);
    // An evicted shape is planned again and still right.
    let want = g.eval(input(1)).unwrap();
    let got = rt.run(&mut st, input(1)).unwrap();
    assert!(want[0].max_abs_diff(&got[0]).unwrap() < 1e-5);
    assert_eq!(rt.cached_plans(), 64);
}

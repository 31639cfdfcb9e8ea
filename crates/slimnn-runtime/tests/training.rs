//! Training-style graphs (parameters as inputs, backward products) on the runtime's fast
//! kernels, checked against the reference evaluator.
//!
//! Tolerance: the runtime computes in f32 (GEMMs sum in f32 with FMA), the reference in f64
//! rounded to f32 per op, so outputs agree to `|got - want| <= tol * (1 + |want|)` with
//! `tol = 1e-4` for these sizes (k <= 256).

use slimnn_ir::ops::{Binary, BinaryOp, Gemm, MatMul, Reduce, ReduceOp, Transpose, Unary, UnaryOp};
use slimnn_ir::{Fact, Graph, OutletId};
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Tensor};

fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Inputs of `g` filled with seeded values.
fn random_inputs(g: &Graph) -> Vec<(String, Tensor)> {
    (0..g.inputs().len())
        .map(|i| {
            let shape = g.input_fact(i).known_shape().expect("test inputs have known shapes");
            let n = shape.iter().product();
            (g.input_name(i).to_string(), Tensor::from_vec(shape, values(n, 17 + i as u64)).unwrap())
        })
        .collect()
}

fn input(g: &mut Graph, name: &str, shape: &[usize]) -> OutletId {
    g.add_input(name, Fact::known(DType::F32, shape)).unwrap()
}

fn node(g: &mut Graph, name: &str, op: impl Into<slimnn_ir::Op>, ins: Vec<OutletId>) -> OutletId {
    g.add_node(name, op, ins).unwrap()[0]
}

fn transpose(g: &mut Graph, name: &str, x: OutletId, perm: &[usize]) -> OutletId {
    node(g, name, Transpose { perm: Some(perm.to_vec()) }, vec![x])
}

/// Runs `g` on the runtime with 1 and 2 threads and on the reference; returns the plan's
/// kernel names.
fn check_against_reference(g: &Graph, tol: f64) -> Vec<String> {
    let inputs = random_inputs(g);
    let want = g.eval(inputs.clone()).unwrap();
    let mut kernels = vec![];
    for threads in [1, 2] {
        let rt = Runnable::new(g.clone(), RuntimeConfig { threads }).unwrap();
        let mut st = rt.new_state();
        let got = rt.run(&mut st, inputs.clone()).unwrap();
        for ((name, _), (w, gv)) in g.outputs().iter().zip(want.iter().zip(&got)) {
            assert_eq!(w.shape(), gv.shape(), "{name}");
            for (i, (a, b)) in gv.to_f64_vec().iter().zip(w.to_f64_vec()).enumerate() {
                assert!(
                    (a - b).abs() <= tol * (1.0 + b.abs()),
                    "{name}[{i}] with {threads} threads: got {a}, want {b}"
                );
            }
        }
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
        kernels = rt.plan_for(&shapes).unwrap().steps.iter().map(|s| s.kernel.name()).collect();
    }
    kernels
}

#[test]
fn runtime_b_products_run_on_the_fast_matmul() {
    let (b, s, k, n) = (2, 24, 32, 48);
    let mut g = Graph::default();
    let x = input(&mut g, "x", &[b, s, k]);
    let w = input(&mut g, "w", &[k, n]);
    let bias = input(&mut g, "bias", &[n]);
    let res = input(&mut g, "res", &[b, s, n]);
    // Forward linear layer with a parameter weight: bias, GELU and residual fused.
    let y = node(&mut g, "mm", MatMul, vec![x, w]);
    let y = node(&mut g, "add_bias", Binary(BinaryOp::Add), vec![y, bias]);
    let y = node(&mut g, "gelu", Unary(UnaryOp::Gelu { tanh: false }), vec![y]);
    let y = node(&mut g, "add_res", Binary(BinaryOp::Add), vec![y, res]);
    g.add_output("y", y);
    // dX = dY · Wᵀ (Transpose absorbed into B's packing).
    let dy = input(&mut g, "dy", &[b, s, n]);
    let wt = transpose(&mut g, "wt", w, &[1, 0]);
    let dx = node(&mut g, "dx", MatMul, vec![dy, wt]);
    g.add_output("dx", dx);
    // dW = Σ_batch Xᵀ · dY (Transpose absorbed into A, batch sum into the product).
    let xt = transpose(&mut g, "xt", x, &[0, 2, 1]);
    let dw = node(&mut g, "dw_b", MatMul, vec![xt, dy]);
    let dw = node(
        &mut g,
        "dw",
        Reduce { op: ReduceOp::Sum, axes: Some(vec![0]), keepdims: false, noop_with_empty_axes: false },
        vec![dw],
    );
    g.add_output("dw", dw);
    // Attention scores Q·Kᵀ per head and probabilities · V (activations x activations).
    let q = input(&mut g, "q", &[b, 3, s, 16]);
    let kk = input(&mut g, "k", &[b, 3, s, 16]);
    let kt = transpose(&mut g, "kt", kk, &[0, 1, 3, 2]);
    let scores = node(&mut g, "scores", MatMul, vec![q, kt]);
    let ctx = node(&mut g, "ctx", MatMul, vec![scores, kk]);
    g.add_output("ctx", ctx);
    // Gemm with run-time B, transB and a bias C; a 1-d operand.
    let a2 = input(&mut g, "a2", &[s, k]);
    let b2 = input(&mut g, "b2", &[n, k]);
    let c2 = input(&mut g, "c2", &[n]);
    let gm = node(&mut g, "gemm", Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true }, vec![a2, b2, c2]);
    g.add_output("gemm", gm);
    let v = input(&mut g, "v", &[k]);
    let mv = node(&mut g, "mv", MatMul, vec![a2, v]);
    g.add_output("mv", mv);
    let kernels = check_against_reference(&g, 1e-4);
    assert!(
        !kernels.iter().any(|k| k.contains("ref:MatMul") || k.contains("ref:Gemm") || k.contains("Transpose")),
        "{kernels:?}"
    );
    for want in ["matmul+bias+gelu", "matmul+bt", "matmul+at+batch_sum"] {
        assert!(kernels.iter().any(|k| k.starts_with(want)), "no {want} in {kernels:?}");
    }
}

//! Training-style graphs (parameters as inputs, backward products) on the runtime's fast
//! kernels, checked against the reference evaluator.
//!
//! Tolerance: the runtime computes in f32 (GEMMs sum in f32 with FMA), the reference in f64
//! rounded to f32 per op, so outputs agree to `|got - want| <= tol * (1 + |want|)` with
//! `tol = 1e-4` for these sizes (k <= 256).

#[path = "../examples/common/minilm_step.rs"]
mod minilm_step;

mod common;

use common::values;
use slimnn_ir::ops::{Binary, BinaryOp, Gemm, MatMul, Reduce, ReduceOp, Transpose, Unary, UnaryOp};
use slimnn_ir::{Fact, Graph, OutletId};
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Tensor};

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
        let rt = Runnable::new(g.clone(), RuntimeConfig::with_threads(threads)).unwrap();
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

/// A small model's forward and hand-built backward: embedding gather, linear + bias, GELU,
/// layer norm, linear, softmax; parameters are inputs. Every op lands on a fast kernel.
#[test]
fn hand_built_training_step_matches_reference() {
    use slimnn_ir::ops::{Gather, GatherGrad, LayerNorm, LayerNormGrad, Reshape, Softmax, SoftmaxGrad, UnaryGrad};
    let (b, s, vocab, k, h, classes) = (2, 16, 50, 32, 64, 10);
    let mut g = Graph::default();
    let ids = g.add_input("ids", Fact::known(DType::I64, &[b, s])).unwrap();
    let table = input(&mut g, "table", &[vocab, k]);
    let w1 = input(&mut g, "w1", &[k, h]);
    let b1 = input(&mut g, "b1", &[h]);
    let gamma = input(&mut g, "gamma", &[h]);
    let beta = input(&mut g, "beta", &[h]);
    let w2 = input(&mut g, "w2", &[h, classes]);
    let dp = input(&mut g, "dp", &[b, s, classes]);
    let x = node(&mut g, "embed", Gather { axis: 0 }, vec![table, ids]);
    let h1 = node(&mut g, "mm1", MatMul, vec![x, w1]);
    let h1 = node(&mut g, "bias1", Binary(BinaryOp::Add), vec![h1, b1]);
    let a = node(&mut g, "gelu", Unary(UnaryOp::Gelu { tanh: false }), vec![h1]);
    let ln = node(&mut g, "ln", LayerNorm { axis: -1, epsilon: 1e-5, num_outputs: 1 }, vec![a, gamma, beta]);
    let logits = node(&mut g, "mm2", MatMul, vec![ln, w2]);
    let p = node(&mut g, "softmax", Softmax { axis: -1, legacy_2d: false }, vec![logits]);
    g.add_output("p", p);
    // Backward from dp (the loss's gradient with respect to p).
    let dlogits = node(&mut g, "d_softmax", SoftmaxGrad { axis: -1, log: false }, vec![p, dp]);
    let rows = |g: &mut Graph, name: &str, v: OutletId, n: usize| {
        let shape =
            g.add_const(&format!("{name}/shape"), Tensor::from_vec(vec![2], vec![-1i64, n as i64]).unwrap()).unwrap();
        node(g, name, Reshape { allowzero: false }, vec![v, shape])
    };
    let ln2 = rows(&mut g, "ln_rows", ln, h);
    let dl2 = rows(&mut g, "dlogits_rows", dlogits, classes);
    let ln2t = transpose(&mut g, "ln_rows_t", ln2, &[1, 0]);
    let dw2 = node(&mut g, "dw2", MatMul, vec![ln2t, dl2]);
    let w2t = transpose(&mut g, "w2t", w2, &[1, 0]);
    let dln = node(&mut g, "dln", MatMul, vec![dlogits, w2t]);
    let lng = g.add_node("d_ln", LayerNormGrad { axis: -1, epsilon: 1e-5 }, vec![a, gamma, dln]).unwrap();
    let dh = node(&mut g, "d_gelu", UnaryGrad(UnaryOp::Gelu { tanh: false }), vec![h1, lng[0]]);
    let db1 = node(
        &mut g,
        "db1",
        Reduce { op: ReduceOp::Sum, axes: Some(vec![0, 1]), keepdims: false, noop_with_empty_axes: false },
        vec![dh],
    );
    let xt = transpose(&mut g, "x_t", x, &[0, 2, 1]);
    let dw1 = node(&mut g, "dw1_b", MatMul, vec![xt, dh]);
    let dw1 = node(
        &mut g,
        "dw1",
        Reduce { op: ReduceOp::Sum, axes: Some(vec![0]), keepdims: false, noop_with_empty_axes: false },
        vec![dw1],
    );
    let w1t = transpose(&mut g, "w1t", w1, &[1, 0]);
    let dx = node(&mut g, "dx", MatMul, vec![dh, w1t]);
    let dtable = node(&mut g, "dtable", GatherGrad { axis: 0 }, vec![table, ids, dx]);
    for (name, o) in
        [("dw2", dw2), ("dgamma", lng[1]), ("dbeta", lng[2]), ("db1", db1), ("dw1", dw1), ("dtable", dtable)]
    {
        g.add_output(name, o);
    }
    // Token ids in range, some negative (counted from the end).
    let inputs = random_inputs_with_ids(&g, vocab);
    let want = g.eval(inputs.clone()).unwrap();
    for threads in [1, 2] {
        let rt = Runnable::new(g.clone(), RuntimeConfig::with_threads(threads)).unwrap();
        let mut st = rt.new_state();
        let got = rt.run(&mut st, inputs.clone()).unwrap();
        for ((name, _), (w, gv)) in g.outputs().iter().zip(want.iter().zip(&got)) {
            let scale = w.to_f64_vec().iter().fold(1.0f64, |m, v| m.max(v.abs()));
            let err = w.max_abs_diff(gv).unwrap();
            assert!(err <= 1e-4 * scale, "{name} with {threads} threads: max error {err} at scale {scale}");
        }
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
        let kernels: Vec<String> = rt.plan_for(&shapes).unwrap().steps.iter().map(|s| s.kernel.name()).collect();
        let slow: Vec<&String> = kernels.iter().filter(|k| k.starts_with("ref:") && *k != "ref:Reshape").collect();
        assert!(slow.is_empty(), "reference-evaluator steps left: {slow:?} in {kernels:?}");
    }
}

fn random_inputs_with_ids(g: &Graph, vocab: usize) -> Vec<(String, Tensor)> {
    (0..g.inputs().len())
        .map(|i| {
            let shape = g.input_fact(i).known_shape().unwrap();
            let n: usize = shape.iter().product();
            let t = if g.input_fact(i).dtype == DType::I64 {
                Tensor::from_vec(
                    shape,
                    (0..n)
                        .map(|j| ((j * 7 + 3) % vocab) as i64 - if j % 5 == 0 { vocab as i64 } else { 0 })
                        .collect::<Vec<i64>>(),
                )
                .unwrap()
            } else {
                Tensor::from_vec(shape, values(n, 17 + i as u64)).unwrap()
            };
            (g.input_name(i).to_string(), t)
        })
        .collect()
}

/// Broadcasts that backward graphs and attention masks produce, and element-wise functions
/// left unfused (a GELU's erf decomposition whose intermediates the backward reads).
#[test]
fn broadcasts_and_unfused_elementwise_match_reference() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[2, 3, 8, 8], &[2, 1, 1, 8]),
        (&[2, 1, 1, 8], &[2, 3, 8, 8]),
        (&[4, 1, 6], &[1, 5, 1]),
        (&[4, 5, 6], &[4, 5, 1]),
        (&[4, 5, 6], &[4, 1, 6]),
        (&[1], &[3, 7]),
        (&[3, 1], &[1]),
    ];
    let mut g = Graph::default();
    for (i, (sa, sb)) in cases.iter().enumerate() {
        let a = input(&mut g, &format!("a{i}"), sa);
        let b = input(&mut g, &format!("b{i}"), sb);
        for op in [BinaryOp::Add, BinaryOp::Sub, BinaryOp::Mul, BinaryOp::Div] {
            let y = node(&mut g, &format!("{op:?}{i}"), Binary(op), vec![a, b]);
            g.add_output(&format!("{op:?}{i}"), y);
        }
    }
    let x = input(&mut g, "x", &[3, 50]);
    let dy = input(&mut g, "dy", &[3, 50]);
    for u in [UnaryOp::Erf, UnaryOp::Exp, UnaryOp::Tanh, UnaryOp::Sigmoid] {
        let y = node(&mut g, &format!("{u:?}"), Unary(u), vec![x]);
        g.add_output(&format!("{u:?}"), y);
    }
    let dx = node(&mut g, "erf_grad", slimnn_ir::ops::UnaryGrad(UnaryOp::Erf), vec![x, dy]);
    g.add_output("erf_grad", dx);
    // Transposes of attention's head splits and others; views moved (last reader) or copied.
    let t4 = input(&mut g, "t4", &[2, 5, 3, 4]);
    for (i, perm) in [&[0, 2, 1, 3][..], &[0, 2, 3, 1], &[3, 2, 1, 0], &[1, 0, 2, 3], &[0, 1, 2, 3]].iter().enumerate()
    {
        let t = transpose(&mut g, &format!("perm{i}"), t4, perm);
        g.add_output(&format!("perm{i}"), t);
    }
    let shape = g.add_const("flat", Tensor::from_vec(vec![2], vec![10i64, 12]).unwrap()).unwrap();
    let e = node(&mut g, "exp_t4", Unary(UnaryOp::Exp), vec![t4]);
    let moved = node(&mut g, "moved", slimnn_ir::ops::Reshape { allowzero: false }, vec![e, shape]);
    let moved = node(&mut g, "moved_t", Transpose { perm: Some(vec![1, 0]) }, vec![moved]);
    g.add_output("moved", moved);
    let copied = node(&mut g, "copied", slimnn_ir::ops::Reshape { allowzero: false }, vec![t4, shape]);
    g.add_output("copied", copied);
    let kernels = check_against_reference(&g, 1e-5);
    let slow: Vec<&String> = kernels.iter().filter(|k| k.starts_with("ref:")).collect();
    assert!(slow.is_empty(), "{slow:?}");
}

/// A MiniLM training step (parameters as inputs, loss = Σ mean_pool(hidden) · r, backward by
/// `slimnn_ir::autodiff`) on the runtime against the reference evaluator: the loss and every
/// parameter gradient agree within `max |got - want| <= 1e-4 * max(1, max |want|)` per tensor
/// (f32 sums over up to 1536 terms per product against f64). Two encoder layers, batch 2,
/// 12 tokens keep the f64 reference fast.
#[test]
fn minilm_training_step_matches_reference() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/minilm");
    if !dir.join("model.safetensors").exists() {
        eprintln!("skipped: {} is missing (scripts/fetch-assets.sh)", dir.display());
        return;
    }
    let step = minilm_step::minilm_step_graph(&dir, Some(&[0, 1])).unwrap();
    let inputs = minilm_step::step_inputs(&step, 2, 12, 30522).unwrap();
    let want = step.graph.eval(inputs.clone()).unwrap();
    let rt = Runnable::new(step.graph.clone(), RuntimeConfig::with_threads(2)).unwrap();
    let mut st = rt.new_state();
    let got = rt.run(&mut st, inputs.clone()).unwrap();
    let mut worst = (0.0, String::new());
    for ((name, _), (w, g)) in step.graph.outputs().iter().zip(want.iter().zip(&got)) {
        let scale = w.to_f64_vec().iter().fold(1.0f64, |m, v| m.max(v.abs()));
        let err = w.max_abs_diff(g).unwrap() / scale;
        assert!(err <= 1e-4, "{name}: max error {err} relative to {scale}");
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    eprintln!("worst relative error {:.2e} in {}", worst.0, worst.1);
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
    let summary = rt.plan_for(&shapes).unwrap().summary();
    assert!(!summary.kernels.keys().any(|k| k.contains("MatMul") || k.contains("Grad")), "{:?}", summary.kernels);
}

/// Convolutions with parameter weights and their two gradients (im2col + GEMM) against the
/// reference, over strides, pads, auto-pad and 1x1 / LeNet-sized kernels.
#[test]
fn conv_and_conv_gradients_match_reference() {
    use slimnn_ir::ops::{AutoPad, Conv, ConvAttrs, ConvGradInput, ConvGradWeight};
    let cases = [
        // (n, c_in, h, w, c_out, k, stride, pads, auto_pad)
        (2, 3, 9, 11, 4, 3, 1, vec![1, 1, 1, 1], AutoPad::NotSet),
        (3, 1, 28, 28, 6, 5, 1, vec![2, 2, 2, 2], AutoPad::NotSet),
        (2, 6, 14, 14, 16, 5, 1, vec![], AutoPad::NotSet),
        (2, 4, 10, 9, 5, 3, 2, vec![], AutoPad::SameUpper),
        (2, 5, 7, 7, 3, 1, 1, vec![], AutoPad::NotSet),
        (1, 2, 8, 8, 2, 2, 2, vec![0, 1, 0, 1], AutoPad::NotSet),
    ];
    let mut g = Graph::default();
    for (i, (n, ci, h, w, co, k, s, pads, auto_pad)) in cases.into_iter().enumerate() {
        let attrs = ConvAttrs {
            kernel_shape: Some(vec![k, k]),
            strides: vec![s, s],
            pads,
            dilations: vec![],
            group: 1,
            auto_pad,
        };
        let x = input(&mut g, &format!("x{i}"), &[n, ci, h, w]);
        let wt = input(&mut g, &format!("w{i}"), &[co, ci, k, k]);
        let b = input(&mut g, &format!("b{i}"), &[co]);
        let y = node(&mut g, &format!("conv{i}"), Conv { attrs: attrs.clone() }, vec![x, wt, b]);
        g.add_output(&format!("y{i}"), y);
        let ys = g.fact(y).known_shape().unwrap();
        let dy = input(&mut g, &format!("dy{i}"), &ys);
        let dx = node(&mut g, &format!("dx{i}"), ConvGradInput(attrs.clone()), vec![dy, wt, x]);
        let dw = node(&mut g, &format!("dw{i}"), ConvGradWeight(attrs), vec![x, dy, wt]);
        g.add_output(&format!("dx{i}"), dx);
        g.add_output(&format!("dw{i}"), dw);
    }
    let kernels = check_against_reference(&g, 1e-4);
    let slow: Vec<&String> = kernels.iter().filter(|k| k.starts_with("ref:")).collect();
    assert!(slow.is_empty(), "{slow:?}");
}

/// Max and average pooling and their gradients against the reference: strides, pads,
/// ceil mode, count_include_pad.
#[test]
fn pooling_and_pool_gradients_match_reference() {
    use slimnn_ir::ops::{AutoPad, Pool, PoolAttrs, PoolGrad, PoolKind};
    let kinds =
        [PoolKind::Max, PoolKind::Average { count_include_pad: false }, PoolKind::Average { count_include_pad: true }];
    let windows = [
        // (kernel, strides, pads, ceil_mode)
        (vec![2, 2], vec![2, 2], vec![], false),
        (vec![3, 3], vec![2, 2], vec![1, 1, 1, 1], false),
        (vec![3, 2], vec![2, 1], vec![0, 1, 1, 0], true),
        (vec![2, 2], vec![1, 1], vec![], false),
    ];
    let mut g = Graph::default();
    let x = input(&mut g, "x", &[2, 3, 9, 10]);
    for (i, kind) in kinds.into_iter().enumerate() {
        for (j, (kernel_shape, strides, pads, ceil_mode)) in windows.iter().cloned().enumerate() {
            let attrs =
                PoolAttrs { kernel_shape, strides, pads, dilations: vec![], ceil_mode, auto_pad: AutoPad::NotSet };
            let pool = Pool { kind, attrs };
            let y = node(&mut g, &format!("pool{i}_{j}"), pool.clone(), vec![x]);
            let ys = g.fact(y).known_shape().unwrap();
            let dy = input(&mut g, &format!("dy{i}_{j}"), &ys);
            let dx = node(&mut g, &format!("dx{i}_{j}"), PoolGrad(pool), vec![x, dy]);
            g.add_output(&format!("y{i}_{j}"), y);
            g.add_output(&format!("dx{i}_{j}"), dx);
        }
    }
    let kernels = check_against_reference(&g, 1e-5);
    let slow: Vec<&String> = kernels.iter().filter(|k| k.starts_with("ref:")).collect();
    assert!(slow.is_empty(), "{slow:?}");
}

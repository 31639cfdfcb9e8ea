//! Batches run sample by sample (a CNN; attention over a padded, masked batch laid out as
//! PyTorch exports it) give what the whole batch gives on the reference evaluator; graphs that
//! mix samples, or do too little work per weight, keep the batch whole.
//!
//! Tolerance: f32 kernels against the f64 reference, `|got - want| <= 1e-4 (1 + |want|)`.

mod common;

use common::values;
use slimnn_ir::ops::{
    Binary, BinaryOp, Clip, Concat, Conv, ConvAttrs, Flatten, Gather, Gemm, GlobalPool, LayerNorm, MatMul, Range,
    Reduce, ReduceOp, Reshape, Shape, Softmax, Transpose, Unsqueeze,
};
use slimnn_ir::{Fact, Graph, OutletId};
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Dim, Tensor};

fn konst(g: &mut Graph, name: &str, shape: &[usize], seed: u64) -> OutletId {
    let n = shape.iter().product();
    g.add_const(name, Tensor::from_vec(shape.to_vec(), values(n, seed)).unwrap()).unwrap()
}

fn node(g: &mut Graph, name: &str, op: impl Into<slimnn_ir::Op>, ins: Vec<OutletId>) -> OutletId {
    g.add_node(name, op, ins).unwrap()[0]
}

/// Conv 3x3 stride 2 + ReLU6, depthwise 3x3, pointwise with a residual, global pool, linear
/// layer: `[n, 3, 33, 31] -> [n, 10]`; `mix` adds a step that reads across samples.
fn cnn(mix: Option<&str>) -> Graph {
    let mut g = Graph::default();
    let batch = Dim::Sym("n".into());
    let fact = Fact::new(DType::F32, vec![batch, Dim::Known(3), Dim::Known(33), Dim::Known(31)]);
    let x = g.add_input("x", fact).unwrap();
    let conv = |g: &mut Graph, name: &str, x: OutletId, co: usize, ci: usize, k: usize, s: usize, group: usize| {
        let attrs = ConvAttrs { strides: vec![s, s], pads: vec![k / 2; 4], group, ..Default::default() };
        let w = konst(g, &format!("{name}.w"), &[co, ci / group, k, k], co as u64 * 7 + k as u64);
        let b = konst(g, &format!("{name}.b"), &[co], co as u64);
        node(g, name, Conv { attrs }, vec![x, w, b])
    };
    let stem = conv(&mut g, "stem", x, 8, 3, 3, 2, 1);
    let (lo, hi) = (g.add_const("lo", Tensor::scalar(0f32)).unwrap(), g.add_const("hi", Tensor::scalar(6f32)).unwrap());
    let act = node(&mut g, "relu6", Clip, vec![stem, lo, hi]);
    let dw = conv(&mut g, "dw", act, 8, 8, 3, 1, 8);
    let mut pw = conv(&mut g, "pw", dw, 8, 8, 1, 1, 1);
    match mix {
        // A constant with one row per sample: each sample gets its own offset.
        Some("per-sample constant") => {
            let c = konst(&mut g, "offsets", &[4, 8, 1, 1], 3);
            pw = node(&mut g, "offset", Binary(BinaryOp::Add), vec![pw, c]);
        }
        // The batch mean subtracted: every sample depends on the others.
        Some("batch mean") => {
            let reduce =
                Reduce { op: ReduceOp::Mean, axes: Some(vec![0]), keepdims: true, noop_with_empty_axes: false };
            let mean = node(&mut g, "mean", reduce, vec![pw]);
            pw = node(&mut g, "centre", Binary(BinaryOp::Sub), vec![pw, mean]);
        }
        // A second output that is the same for every batch: nothing to stack per sample.
        Some("constant output") => {
            let c = konst(&mut g, "table", &[3], 4);
            g.add_output("table", c);
        }
        _ => {}
    }
    let res = node(&mut g, "res", Binary(BinaryOp::Add), vec![pw, act]);
    let pool = node(&mut g, "pool", GlobalPool { max: false }, vec![res]);
    let flat = node(&mut g, "flat", Flatten { axis: 1 }, vec![pool]);
    let w = konst(&mut g, "fc.w", &[8, 10], 11);
    let b = konst(&mut g, "fc.b", &[10], 12);
    let gemm = Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: false };
    let y = node(&mut g, "fc", gemm, vec![flat, w, b]);
    g.add_output("y", y);
    g
}

fn check(g: &Graph, batch: usize, split: bool) {
    let x = Tensor::from_vec(vec![batch, 3, 33, 31], values(batch * 3 * 33 * 31, 5)).unwrap();
    check_inputs(g, vec![("x".to_string(), x)], split && batch > 1);
}

fn check_inputs(g: &Graph, inputs: Vec<(String, Tensor)>, split: bool) {
    let batch = inputs[0].1.shape()[0];
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
    let want = g.eval(inputs.clone()).unwrap().remove(0);
    for threads in [1, 2, 3] {
        let rt = Runnable::new(g.clone(), RuntimeConfig::with_threads(threads)).unwrap();
        assert_eq!(rt.splits_batch(&shapes).unwrap(), split);
        let mut st = rt.new_state();
        for _ in 0..2 {
            let got = rt.run(&mut st, inputs.clone()).unwrap().remove(0);
            assert_eq!(got.shape(), want.shape());
            for (i, (a, b)) in got.to_f64_vec().iter().zip(want.to_f64_vec()).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "y[{i}], batch {batch}, {threads} threads: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn cnn_batches_run_sample_by_sample_and_match_the_reference() {
    let g = cnn(None);
    for batch in [1, 2, 5] {
        check(&g, batch, true);
    }
}

#[test]
fn profiling_a_state_that_already_split_counts_every_sample() {
    let g = cnn(None);
    let x = vec![("x".to_string(), Tensor::from_vec(vec![3, 3, 33, 31], values(3 * 3 * 33 * 31, 5)).unwrap())];
    let rt = Runnable::new(g, RuntimeConfig::with_threads(2)).unwrap();
    let calls = |st: &slimnn_runtime::State| st.profile().into_iter().map(|(k, _, n)| (k, n)).collect::<Vec<_>>();
    // Profiled from the start: the per-sample states are made profiling.
    let mut fresh = rt.new_state();
    fresh.enable_profile();
    rt.run(&mut fresh, x.clone()).unwrap();
    // Profiled after a first run has made them: they must start profiling too.
    let mut st = rt.new_state();
    rt.run(&mut st, x.clone()).unwrap();
    st.enable_profile();
    rt.run(&mut st, x).unwrap();
    assert!(calls(&st).iter().any(|(k, _)| k.starts_with("conv")), "{:?}", calls(&st));
    let mut want = calls(&fresh);
    let mut got = calls(&st);
    want.sort();
    got.sort();
    assert_eq!(got, want);
}

#[test]
fn graphs_that_mix_samples_keep_the_batch_whole() {
    check(&cnn(Some("per-sample constant")), 4, false);
    check(&cnn(Some("batch mean")), 4, false);
    check(&cnn(Some("constant output")), 4, false);
}

/// Masked self-attention over `[n, t, 16]` (2 heads of 8), laid out as PyTorch exports BERT:
/// reshape targets computed from the input's shape, and the mask's rows picked from the
/// flattened `[n t, 1]` mask by indices `b t + s` computed from the batch size (`swap` picks
/// another sample's rows instead: `(n - 1 - b) t + s`).
fn attention(t: usize, swap: bool) -> Graph {
    let mut g = Graph::default();
    let n = Dim::Sym("n".into());
    let x = g.add_input("x", Fact::new(DType::F32, vec![n.clone(), Dim::Known(t), Dim::Known(16)])).unwrap();
    let mask = g.add_input("mask", Fact::new(DType::F32, vec![n, Dim::Known(t)])).unwrap();
    let i64s = |g: &mut Graph, name: &str, v: Vec<i64>| {
        let len = v.len();
        g.add_const(name, Tensor::from_vec(vec![len], v).unwrap()).unwrap()
    };
    let scalar = |g: &mut Graph, name: &str, v: i64| g.add_const(name, Tensor::scalar(v)).unwrap();
    // Mask rows: flat[b t + s] for sample b.
    let flat = node(&mut g, "flat", Flatten { axis: 2 }, vec![mask]);
    let shape = node(&mut g, "shape", Shape { start: 0, end: None }, vec![x]);
    let zero = scalar(&mut g, "zero", 0);
    let batch = node(&mut g, "batch", Gather { axis: 0 }, vec![shape, zero]);
    let one = scalar(&mut g, "one", 1);
    let samples = node(&mut g, "samples", Range, vec![zero, batch, one]);
    let samples = if swap {
        let last = node(&mut g, "last", Binary(BinaryOp::Sub), vec![batch, one]);
        node(&mut g, "reversed", Binary(BinaryOp::Sub), vec![last, samples])
    } else {
        samples
    };
    let tc = scalar(&mut g, "t", t as i64);
    let starts = node(&mut g, "starts", Binary(BinaryOp::Mul), vec![samples, tc]);
    let starts = node(&mut g, "starts2", Unsqueeze { axes: vec![1] }, vec![starts]);
    let tokens = node(&mut g, "tokens", Range, vec![zero, tc, one]);
    let ids = node(&mut g, "ids", Binary(BinaryOp::Add), vec![starts, tokens]);
    let m = node(&mut g, "mask_rows", Gather { axis: 0 }, vec![flat, ids]);
    let xm = node(&mut g, "masked", Binary(BinaryOp::Mul), vec![x, m]);
    // Heads: [n, t, 16] -> [n, 2, t, 8], the target's batch taken from the shape.
    let batch1 = node(&mut g, "batch1", Unsqueeze { axes: vec![0] }, vec![batch]);
    let rest = i64s(&mut g, "rest", vec![t as i64, 2, 8]);
    let target = node(&mut g, "target", Concat { axis: 0 }, vec![batch1, rest]);
    let back = i64s(&mut g, "back", vec![t as i64, 16]);
    let back = node(&mut g, "back_target", Concat { axis: 0 }, vec![batch1, back]);
    let heads = |g: &mut Graph, name: &str, perm: Vec<usize>, seed: u64| {
        let w = konst(g, &format!("{name}.w"), &[16, 16], seed);
        let p = node(g, name, MatMul, vec![xm, w]);
        let r = node(g, &format!("{name}.heads"), Reshape { allowzero: false }, vec![p, target]);
        node(g, &format!("{name}.t"), Transpose { perm: Some(perm) }, vec![r])
    };
    let q = heads(&mut g, "q", vec![0, 2, 1, 3], 21);
    let k = heads(&mut g, "k", vec![0, 2, 3, 1], 22);
    let v = heads(&mut g, "v", vec![0, 2, 1, 3], 23);
    let scores = node(&mut g, "scores", MatMul, vec![q, k]);
    let p = node(&mut g, "probs", Softmax { axis: -1, legacy_2d: false }, vec![scores]);
    let ctx = node(&mut g, "ctx", MatMul, vec![p, v]);
    let ctx = node(&mut g, "ctx.t", Transpose { perm: Some(vec![0, 2, 1, 3]) }, vec![ctx]);
    let ctx = node(&mut g, "ctx.r", Reshape { allowzero: false }, vec![ctx, back]);
    let (gamma, beta) = (konst(&mut g, "ln.g", &[16], 24), konst(&mut g, "ln.b", &[16], 25));
    let ln = node(&mut g, "ln", LayerNorm { axis: -1, epsilon: 1e-5, num_outputs: 1 }, vec![ctx, gamma, beta]);
    let mean = Reduce { op: ReduceOp::Mean, axes: Some(vec![1]), keepdims: false, noop_with_empty_axes: false };
    let y = node(&mut g, "pool", mean, vec![ln]);
    g.add_output("y", y);
    g
}

fn attention_inputs(n: usize, t: usize) -> Vec<(String, Tensor)> {
    // Sample b has t - 3 b real tokens, the rest padding.
    let mask: Vec<f32> =
        (0..n * t).map(|i| if i % t < t.saturating_sub(3 * (i / t)).max(1) { 1.0 } else { 0.0 }).collect();
    vec![
        ("x".to_string(), Tensor::from_vec(vec![n, t, 16], values(n * t * 16, 26)).unwrap()),
        ("mask".to_string(), Tensor::from_vec(vec![n, t], mask).unwrap()),
    ]
}

#[test]
fn attention_batches_laid_out_as_pytorch_exports_them_run_sample_by_sample() {
    for n in [2, 3] {
        check_inputs(&attention(64, false), attention_inputs(n, 64), true);
        // Indices that pick another sample's mask rows mix samples.
        check_inputs(&attention(64, true), attention_inputs(n, 64), false);
    }
    // Four tokens: too little work per weight byte to pay for reading the weights per sample.
    check_inputs(&attention(4, false), attention_inputs(3, 4), false);
}

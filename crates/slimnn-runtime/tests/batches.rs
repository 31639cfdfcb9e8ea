//! Batches of a CNN run sample by sample give what the whole batch gives on the reference
//! evaluator; graphs that mix samples keep the batch whole.
//!
//! Tolerance: f32 kernels against the f64 reference, `|got - want| <= 1e-4 (1 + |want|)`.

mod common;

use common::values;
use slimnn_ir::ops::{Binary, BinaryOp, Clip, Conv, ConvAttrs, Flatten, Gemm, GlobalPool, Reduce, ReduceOp};
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
/// layer: `[n, 3, 17, 15] -> [n, 10]`; `mix` adds a step that reads across samples.
fn cnn(mix: Option<&str>) -> Graph {
    let mut g = Graph::default();
    let batch = Dim::Sym("n".into());
    let fact = Fact::new(DType::F32, vec![batch, Dim::Known(3), Dim::Known(17), Dim::Known(15)]);
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
    let x = Tensor::from_vec(vec![batch, 3, 17, 15], values(batch * 3 * 17 * 15, 5)).unwrap();
    let inputs = vec![("x".to_string(), x)];
    let want = g.eval(inputs.clone()).unwrap().remove(0);
    for threads in [1, 2, 3] {
        let rt = Runnable::new(g.clone(), RuntimeConfig::with_threads(threads)).unwrap();
        assert_eq!(rt.splits_batch(&[vec![batch, 3, 17, 15]]).unwrap(), split && batch > 1);
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
fn graphs_that_mix_samples_keep_the_batch_whole() {
    check(&cnn(Some("per-sample constant")), 4, false);
    check(&cnn(Some("batch mean")), 4, false);
}

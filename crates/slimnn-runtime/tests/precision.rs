//! bf16 weights and bf16 products: half-precision weight casts fold into packed GEMMs, and
//! `Precision::Bf16` stays within bf16's rounding of the f32 result.

use slimnn_ir::ops::{Binary, BinaryOp, Cast, MatMul, Unary, UnaryOp};
use slimnn_ir::{Fact, Graph};
use slimnn_runtime::{Precision, Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Tensor};

const K: usize = 96;
const N: usize = 80;

/// `relu(x · W + b)` twice, the weights stored as `dtype` behind a `Cast` to f32 when not f32.
fn mlp(dtype: DType) -> Graph {
    let mut g = Graph::default();
    let mut y = g.add_input("x", Fact::known(DType::F32, &[16, K])).unwrap();
    for (layer, (k, n)) in [(K, N), (N, K)].into_iter().enumerate() {
        let w: Vec<f32> = (0..k * n).map(|i| (((i * 37 + layer) % 101) as f32 - 50.0) / 400.0).collect();
        let w = Tensor::from_vec(vec![k, n], w).unwrap().cast(dtype).unwrap();
        let mut w = g.add_const(&format!("w{layer}"), w).unwrap();
        if dtype != DType::F32 {
            w = g.add_node(&format!("cast{layer}"), Cast { to: DType::F32 }, vec![w]).unwrap()[0];
        }
        let b = g.add_const(&format!("b{layer}"), Tensor::from_vec(vec![n], vec![0.05f32; n]).unwrap()).unwrap();
        y = g.add_node(&format!("mm{layer}"), MatMul, vec![y, w]).unwrap()[0];
        y = g.add_node(&format!("bias{layer}"), Binary(BinaryOp::Add), vec![y, b]).unwrap()[0];
        y = g.add_node(&format!("relu{layer}"), Unary(UnaryOp::Relu), vec![y]).unwrap()[0];
    }
    g.add_output("y", y);
    g
}

fn input() -> Vec<(String, Tensor)> {
    let v: Vec<f32> = (0..16 * K).map(|i| ((i * 29 % 23) as f32 - 11.0) / 6.0).collect();
    vec![("x".into(), Tensor::from_vec(vec![16, K], v).unwrap())]
}

fn kernels(rt: &Runnable) -> Vec<String> {
    rt.plan_for(&[vec![16, K]]).unwrap().summary().kernels.into_keys().collect()
}

#[test]
fn half_precision_weights_fold_into_packed_gemms() {
    for dtype in [DType::BF16, DType::F16] {
        let g = mlp(dtype);
        let rt = Runnable::new(g.clone(), RuntimeConfig::with_threads(1)).unwrap();
        let ks = kernels(&rt);
        assert!(ks.iter().all(|k| !k.starts_with("ref:Cast") && !k.starts_with("matmul")), "{dtype}: {ks:?}");
        assert!(ks.iter().any(|k| k.starts_with("gemm+bias")), "{dtype}: {ks:?}");
        // The widening is exact: the same values as the graph's own f32 cast.
        let want = g.eval(input()).unwrap();
        let got = rt.run(&mut rt.new_state(), input()).unwrap();
        assert!(want[0].max_abs_diff(&got[0]).unwrap() < 1e-5, "{dtype}");
    }
}

#[test]
fn bf16_precision_runs_bf16_gemms_within_bf16_rounding() {
    let g = mlp(DType::BF16);
    let want = g.eval(input()).unwrap();
    for threads in [1, 2] {
        let rt = Runnable::new(
            g.clone(),
            RuntimeConfig { precision: Precision::Bf16, ..RuntimeConfig::with_threads(threads) },
        )
        .unwrap();
        let ks = kernels(&rt);
        let bf16 = ks.iter().any(|k| k.starts_with("gemm_bf16"));
        assert_eq!(bf16, Precision::Bf16.uses_bf16(), "{ks:?}");
        let got = rt.run(&mut rt.new_state(), input()).unwrap();
        let (w, o) = (want[0].as_slice::<f32>().unwrap(), got[0].as_slice::<f32>().unwrap());
        let scale = w.iter().map(|v| v.abs()).fold(0.0, f32::max);
        let worst = w.iter().zip(o).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
        // Activations rounded to 8 mantissa bits before each product (~0.4% relative each).
        assert!(worst <= 0.01 * scale, "threads {threads}: worst {worst}, scale {scale}");
        if bf16 {
            assert!(worst > 0.0, "bf16 products should differ from f32 somewhere");
        }
    }
}

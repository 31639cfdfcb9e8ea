//! `DynamicRowQuantMatMul`: a matmul whose activations are quantized to u8 at run time with one
//! scale and zero point per row (per token), times a symmetric int8 constant weight.
//!
//! Per row `r` of `x` (the last axis): `DynamicQuantizeLinear`'s rule on that row alone —
//! `lo = min(0, min x_r)`, `hi = max(0, max x_r)`, `s_r = (hi - lo) / 255` (1 when 0),
//! `z_r = saturate(round(-lo / s_r))`, `q = saturate(round(x / s_r) + z_r)` (rounding half to
//! even) — then `y[r, j] = f32(sum_k (q[r, k] - z_r) * W[k, j]) * (s_r * w_scale_j)` with the
//! scale product rounded to f32 first. Per-tensor scales (ONNX Runtime's `quantize_dynamic`)
//! let one outlier token coarsen every other token of the batch; per row they cannot.
//!
//! ONNX has no such op (`MatMulInteger` allows per-row zero points, but ONNX Runtime refuses
//! them), so the exporter writes it in domain [`SLIMNN_DOMAIN`] with a model-local function
//! made of standard ops, which ONNX Runtime inlines; slimnn's importer reads the node itself.

use super::quant::matmul_dims;
use super::util::{expect_inputs, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{DType, Dim, Tensor};

/// The ONNX domain of slimnn's own ops (each exported with a function body of standard ops).
pub const SLIMNN_DOMAIN: &str = "ai.slimnn";

/// `DynamicRowQuantMatMul(x f32 [.., K], w i8 [K, N], w_scale f32 [] or [N])` -> f32 [.., N].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DynamicRowQuantMatMul;

/// One row's dynamic quantization parameters `(scale, zero point)`, as `DynamicQuantizeLinear`.
pub fn row_params(row: &[f32]) -> (f32, f32) {
    let (lo, hi) = row.iter().fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let scale = if hi == lo { 1.0 } else { (hi - lo) / 255.0 };
    let zero = (0.0 - lo / scale).clamp(0.0, 255.0).round_ties_even();
    (scale, zero)
}

impl OpDef for DynamicRowQuantMatMul {
    fn name(&self) -> &'static str {
        "DynamicRowQuantMatMul"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 3)?;
        let (x, w, s) = (inputs[0], inputs[1], inputs[2]);
        if x.dtype != DType::F32 || x.rank() < 2 {
            op_bail!(op, "x must be f32 of rank >= 2, got {x}");
        }
        if w.dtype != DType::I8 || w.rank() != 2 {
            op_bail!(op, "w must be i8 [K, N], got {w}");
        }
        if s.dtype != DType::F32 || s.rank() > 1 {
            op_bail!(op, "w_scale must be an f32 scalar or [N], got {s}");
        }
        if let (Some(Dim::Known(ns)), Dim::Known(n)) = (s.shape.first(), &w.shape[1]) {
            if *ns != 1 && ns != n {
                op_bail!(op, "w_scale has {ns} values for {n} output columns");
            }
        }
        let dims = matmul_dims(op, &x.shape, &w.shape)?;
        Ok(vec![Fact::new(DType::F32, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        let facts: Vec<Fact> = inputs.iter().map(|t| Fact::known(t.dtype(), t.shape())).collect();
        self.output_facts(&facts.iter().collect::<Vec<_>>())?;
        let (x, w, s) = (inputs[0].as_slice::<f32>()?, inputs[1].as_slice::<i8>()?, inputs[2].as_slice::<f32>()?);
        let (k, n) = (inputs[1].shape()[0], inputs[1].shape()[1]);
        if k == 0 {
            op_bail!(op, "K is 0 (shapes {} and {})", show_dims(&facts[0].shape), show_dims(&facts[1].shape));
        }
        let rows = x.len() / k;
        let mut y = vec![0f32; rows * n];
        let mut q = vec![0i32; k];
        for (xr, yr) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
            let (scale, zero) = row_params(xr);
            for (qv, &v) in q.iter_mut().zip(xr) {
                // Saturated code minus the zero point (NaN casts to 0, as the kernels do).
                *qv = ((v / scale).round_ties_even() + zero).clamp(0.0, 255.0) as i32 - zero as i32;
            }
            for (j, out) in yr.iter_mut().enumerate() {
                let acc: i64 = q.iter().enumerate().map(|(kk, &a)| a as i64 * w[kk * n + j] as i64).sum();
                let ws = if s.len() == 1 { s[0] } else { s[j] };
                *out = (acc as i32) as f32 * (scale * ws);
            }
        }
        let mut shape = inputs[0].shape().to_vec();
        *shape.last_mut().expect("rank >= 2") = n;
        Ok(vec![Tensor::from_vec(shape, y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_formula_on_hand_values() {
        // Row 0: range [-1, 2] -> scale 3/255, zero 85; row 1 all zero -> scale 1, zero 0.
        let x = Tensor::from_vec(vec![2, 3], vec![-1.0f32, 0.5, 2.0, 0.0, 0.0, 0.0]).unwrap();
        let w = Tensor::from_vec(vec![3, 2], vec![1i8, -2, 3, 4, -5, 6]).unwrap();
        let s = Tensor::from_vec(vec![2], vec![0.5f32, 0.25]).unwrap();
        let y = DynamicRowQuantMatMul.eval(&[&x, &w, &s]).unwrap().remove(0);
        assert_eq!(y.shape(), &[2, 2]);
        let scale = 3.0f32 / 255.0;
        let q: Vec<i32> = [-1.0f32, 0.5, 2.0]
            .iter()
            .map(|&v| ((v / scale).round_ties_even() + 85.0).clamp(0.0, 255.0) as i32 - 85)
            .collect();
        let y = y.as_slice::<f32>().unwrap();
        let acc0 = q[0] + 3 * q[1] - 5 * q[2];
        let acc1 = -2 * q[0] + 4 * q[1] + 6 * q[2];
        assert_eq!(y[0], acc0 as f32 * (scale * 0.5));
        assert_eq!(y[1], acc1 as f32 * (scale * 0.25));
        assert_eq!(&y[2..], &[0.0, 0.0]);
        // Close to the float product.
        let exact = [-1.0 + 0.5 * 3.0 + 2.0 * -5.0, 2.0 + 0.5 * 4.0 + 2.0 * 6.0];
        assert!((y[0] - exact[0] * 0.5).abs() < 0.05 && (y[1] - exact[1] * 0.25).abs() < 0.05);
    }

    #[test]
    fn rejects_bad_operands() {
        let x = Fact::known(DType::F32, &[2, 3]);
        let w = Fact::known(DType::I8, &[4, 2]);
        let s = Fact::known(DType::F32, &[2]);
        let e = DynamicRowQuantMatMul.output_facts(&[&x, &w, &s]).unwrap_err().to_string();
        assert!(e.contains("inner dims"), "{e}");
        let w = Fact::known(DType::U8, &[3, 2]);
        assert!(DynamicRowQuantMatMul.output_facts(&[&x, &w, &s]).is_err());
        let w = Fact::known(DType::I8, &[3, 2]);
        let s = Fact::known(DType::F32, &[3]);
        assert!(DynamicRowQuantMatMul.output_facts(&[&x, &w, &s]).unwrap_err().to_string().contains("w_scale"));
    }
}

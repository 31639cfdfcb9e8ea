//! Kernels the runtime composes from `slimnn-kernels`: GEMM-based attention and the row-wise
//! kernels, with rows split over threads here. Each has a reference counterpart in the IR's
//! evaluator; differential tests compare the two.

use crate::plan::FastBinary;
use crate::{Result, RuntimeError};
use rayon::prelude::*;
use slimnn_kernels::attention::{self, AttnMask};
use slimnn_kernels::{rows, Activation, BinaryOp, KernelError, Par};

pub use slimnn_kernels::AttnDims;

/// Rows per parallel task for row-wise kernels (keeps tasks big enough to be worth it).
const ROWS_PER_TASK: usize = 16;
/// Elements per parallel task at least: row kernels run at several elements per nanosecond,
/// so smaller tasks cost more in rayon overhead than they gain.
const ELEMS_PER_TASK: usize = 1 << 16;

/// Runs `f(first_row, out_chunk)` over chunks of whole rows of `n` values, split over rayon's
/// threads when `par` and there are at least two tasks' worth.
fn row_chunks(
    out: &mut [f32],
    n: usize,
    par: bool,
    f: impl Fn(usize, &mut [f32]) -> Result<()> + Sync + Send,
) -> Result<()> {
    if n == 0 || out.is_empty() {
        return f(0, out);
    }
    let rows = ROWS_PER_TASK.max(ELEMS_PER_TASK.div_ceil(n));
    let chunk = rows * n;
    if par && out.len() >= 2 * chunk {
        out.par_chunks_mut(chunk).enumerate().try_for_each(|(t, c)| f(t * rows, c))
    } else {
        f(0, out)
    }
}

pub fn layer_norm(
    x: &[f32],
    n: usize,
    scale: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
    par: bool,
) -> Result<()> {
    check_len(x.len(), out.len())?;
    row_chunks(out, n, par, |r, y| Ok(rows::layer_norm(&x[r * n..r * n + y.len()], n, scale, bias, eps, y)?))
}

pub fn softmax(x: &[f32], n: usize, out: &mut [f32], par: bool) -> Result<()> {
    check_len(x.len(), out.len())?;
    row_chunks(out, n, par, |r, y| Ok(rows::softmax(&x[r * n..r * n + y.len()], n, y)?))
}

pub fn activation(x: &[f32], act: Activation, out: &mut [f32], par: bool) -> Result<()> {
    check_len(x.len(), out.len())?;
    row_chunks(out, 1, par, |i, y| Ok(rows::map_activation(&x[i..i + y.len()], act, y)?))
}

/// `a op b` where `b` has `a`'s length, one element, or `row` elements repeated per row.
pub fn binary(op: FastBinary, a: &[f32], b: &[f32], row: usize, out: &mut [f32], par: bool) -> Result<()> {
    let op = match op {
        FastBinary::Add => BinaryOp::Add,
        FastBinary::Sub => BinaryOp::Sub,
        FastBinary::Mul => BinaryOp::Mul,
        FastBinary::Div => BinaryOp::Div,
    };
    check_len(a.len(), out.len())?;
    let same = b.len() == a.len();
    if !same && b.len() != 1 && b.len() != row {
        return Err(shape_error(format!("{} values do not broadcast over rows of {row}", b.len())));
    }
    // Chunks of whole rows, so a row vector `b` lines up with each chunk.
    let n = if same || b.len() == 1 { 1 } else { row };
    row_chunks(out, n, par, |r, y| {
        let (lo, hi) = (r * n, r * n + y.len());
        let bc = if same { &b[lo..hi] } else { b };
        Ok(rows::binary(op, &a[lo..hi], bc, y)?)
    })
}

fn check_len(input: usize, output: usize) -> Result<()> {
    if input != output {
        return Err(shape_error(format!("input has {input} values, output {output}")));
    }
    Ok(())
}

fn shape_error(msg: String) -> RuntimeError {
    RuntimeError::Kernel(KernelError::Shape { kernel: "runtime rows", msg })
}

pub fn embedding(table: &[f32], rows: usize, n: usize, idx: &[i64], out: &mut [f32]) -> Result<()> {
    for (i, &ix) in idx.iter().enumerate() {
        let r = if ix < 0 { ix + rows as i64 } else { ix };
        if r < 0 || r >= rows as i64 {
            return Err(RuntimeError::Ir(slimnn_ir::IrError::op(
                "Gather",
                format!("index {ix} is out of range for {rows} rows"),
            )));
        }
        out[i * n..(i + 1) * n].copy_from_slice(&table[r as usize * n..(r as usize + 1) * n]);
    }
    Ok(())
}

/// Multi-head attention on `[batch, seq, heads * head_dim]` projections:
/// `softmax(Q Kᵀ * scale + mask) V` per (batch, head) into that head's columns of `out`.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    mask: Option<(&[f32], [usize; 4])>,
    dims: AttnDims,
    scale: f32,
    out: &mut [f32],
    par: bool,
) -> Result<()> {
    let mask = mask.map(|(data, shape)| AttnMask { data, shape });
    let par = if par { Par::Current } else { Par::Seq };
    Ok(attention::mha(q, k, v, mask, dims, scale, out, par)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(len: usize) -> Vec<f32> {
        (0..len).map(|i| ((i * 7919) % 1000) as f32 / 100.0 - 4.995).collect()
    }

    /// Large enough that `row_chunks` splits the rows over threads.
    const ROWS: usize = 400;
    const N: usize = 384;

    fn both(f: impl Fn(bool, &mut [f32]) -> Result<()> + Sync) -> Vec<f32> {
        let mut seq = vec![0.0; ROWS * N];
        f(false, &mut seq).unwrap();
        let mut par = vec![0.0; ROWS * N];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        pool.install(|| f(true, &mut par)).unwrap();
        let same = seq.iter().zip(&par).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "threads change the result");
        seq
    }

    #[test]
    fn row_kernels_agree_with_and_without_threads() {
        let x = values(ROWS * N);
        let (scale, bias) = (vec![2.0; N], vec![1.0; N]);
        let y = both(|p, o| layer_norm(&x, N, &scale, &bias, 1e-5, o, p));
        // Each row normalised: mean of (y - 1) / 2 is 0.
        let m: f32 = y[N..2 * N].iter().map(|v| (v - 1.0) / 2.0).sum::<f32>() / N as f32;
        assert!(m.abs() < 1e-5, "{m}");
        let y = both(|p, o| softmax(&x, N, o, p));
        let s: f32 = y[5 * N..6 * N].iter().sum();
        assert!((s - 1.0).abs() < 1e-5, "{s}");
        let y = both(|p, o| activation(&x, Activation::Relu, o, p));
        assert_eq!(y[0], x[0].max(0.0));
        let row: Vec<f32> = (0..N).map(|j| j as f32).collect();
        let y = both(|p, o| binary(FastBinary::Sub, &x, &row, N, o, p));
        assert_eq!(y[3 * N + 10], x[3 * N + 10] - 10.0);
        let y = both(|p, o| binary(FastBinary::Mul, &x, &[2.0], N, o, p));
        assert_eq!(y[777], x[777] * 2.0);
        let y = both(|p, o| binary(FastBinary::Div, &x, &x, N, o, p));
        assert_eq!(y[1], 1.0);
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut out = vec![0.0; 6];
        assert!(binary(FastBinary::Add, &[1.0; 6], &[1.0; 2], 3, &mut out, false).is_err());
        assert!(binary(FastBinary::Add, &[1.0; 6], &[1.0; 3], 3, &mut out[..5], false).is_err());
        assert!(layer_norm(&[1.0; 6], 3, &[1.0; 2], &[0.0; 3], 1e-5, &mut out, false).is_err());
        assert!(softmax(&[1.0; 5], 3, &mut out[..5], false).is_err());
        let dims = AttnDims { batch: 1, seq_q: 2, seq_k: 2, heads: 1, head_dim: 3 };
        assert!(attention(&[0.0; 6], &[0.0; 6], &[0.0; 5], None, dims, 1.0, &mut out, false).is_err());
        assert!(attention(&[0.0; 6], &[0.0; 6], &[0.0; 6], None, dims, 1.0, &mut out, true).is_ok());
    }
}

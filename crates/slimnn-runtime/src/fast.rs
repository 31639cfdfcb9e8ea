//! Kernels the runtime composes from `slimnn-kernels`: GEMM-based attention and the row-wise
//! kernels, with rows split over threads here. Each has a reference counterpart in the IR's
//! evaluator; differential tests compare the two.

use crate::plan::{AttnProducts, Broadcast, FastBinary, StridedBroadcast};
use crate::{Result, RuntimeError};
use rayon::prelude::*;
use slimnn_kernels::attention::{self, AttnMask};
use slimnn_kernels::{grad, rows, Activation, BinaryOp, KernelError, Par};

pub use slimnn_kernels::attention::Rows;
pub use slimnn_kernels::AttnDims;

/// Values per parallel task at least: row kernels run at several values per nanosecond, so
/// smaller tasks cost more in thread hand-off than they gain.
const MIN_ELEMS_PER_TASK: usize = 1 << 14;

/// Rows per task when `rows` rows of `n` values are split over the current pool: one task per
/// thread, rows in order, like the row-split GEMMs (`Ties::Rows` in slimnn-kernels). Task 0
/// runs on the calling thread and, with two threads, task 1 on the other, so from op to op
/// each core keeps working on rows it wrote itself.
pub(crate) fn rows_per_task(rows: usize, n: usize) -> usize {
    rows.div_ceil(rayon::current_num_threads().max(1)).max(MIN_ELEMS_PER_TASK.div_ceil(n.max(1))).max(1)
}

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
    let rows = rows_per_task(out.len() / n, n);
    let chunk = rows * n;
    if par && out.len() > chunk {
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

/// `a op b` with `b` lined up as `bc` says.
pub fn binary(op: FastBinary, bc: Broadcast, a: &[f32], b: &[f32], out: &mut [f32], par: bool) -> Result<()> {
    let op = match op {
        FastBinary::Add => BinaryOp::Add,
        FastBinary::Sub => BinaryOp::Sub,
        FastBinary::Mul => BinaryOp::Mul,
        FastBinary::Div => BinaryOp::Div,
    };
    check_len(a.len(), out.len())?;
    let fits = match bc {
        Broadcast::Same => b.len() == a.len(),
        Broadcast::Scalar => b.len() == 1,
        Broadcast::Repeat => !b.is_empty() && a.len().is_multiple_of(b.len()),
        Broadcast::PerRow(n) => n > 0 && b.len().checked_mul(n) == Some(a.len()),
    };
    if !fits {
        return Err(shape_error(format!("{} values do not broadcast over {} as {bc:?}", b.len(), a.len())));
    }
    match bc {
        Broadcast::Same => {
            row_chunks(out, 1, par, |i, y| Ok(rows::binary(op, &a[i..i + y.len()], &b[i..i + y.len()], y)?))
        }
        Broadcast::Scalar => row_chunks(out, 1, par, |i, y| Ok(rows::binary(op, &a[i..i + y.len()], b, y)?)),
        // Chunks of whole repeats, so `b` lines up with each chunk.
        Broadcast::Repeat => {
            let n = b.len();
            row_chunks(out, n, par, |r, y| Ok(rows::binary(op, &a[r * n..r * n + y.len()], b, y)?))
        }
        Broadcast::PerRow(n) => row_chunks(out, n, par, |r, y| {
            for (j, yr) in y.chunks_exact_mut(n).enumerate() {
                let lo = (r + j) * n;
                rows::binary(op, &a[lo..lo + n], &b[r + j..r + j + 1], yr)?;
            }
            Ok(())
        }),
    }
}

/// `out[i..] = x[Σ i_d * strides_d]` over `t.dims` (the `a` strides of `t`): a transpose
/// with runs along the output's last dim (contiguous copies when the input's stride there is
/// 1, as for a split of attention heads).
pub fn transpose(t: &StridedBroadcast, x: &[f32], out: &mut [f32], par: bool) -> Result<()> {
    let r = t.dims.len();
    let total: usize = t.dims.iter().product();
    let extent = t.dims.iter().zip(&t.a_strides).map(|(d, s)| d.saturating_sub(1) * s).sum::<usize>() + 1;
    if r == 0 || total != out.len() || x.len() != out.len() || (total > 0 && extent > x.len()) {
        return Err(shape_error(format!("transpose {t:?} of {} values into {}", x.len(), out.len())));
    }
    let n = t.dims[r - 1];
    let s = t.a_strides[r - 1];
    row_chunks(out, n, par, |r0, chunk| {
        for (j, y) in chunk.chunks_exact_mut(n.max(1)).enumerate() {
            let (mut row, mut off) = (r0 + j, 0);
            for d in (0..r - 1).rev() {
                off += row % t.dims[d] * t.a_strides[d];
                row /= t.dims[d];
            }
            if s == 1 {
                y.copy_from_slice(&x[off..off + n]);
            } else {
                for (i, v) in y.iter_mut().enumerate() {
                    *v = x[off + i * s];
                }
            }
        }
        Ok(())
    })
}

/// `f(x)` element-wise.
pub fn unary(f: grad::FastUnary, x: &[f32], out: &mut [f32], par: bool) -> Result<()> {
    check_len(x.len(), out.len())?;
    row_chunks(out, 1, par, |i, o| Ok(grad::unary(f, &x[i..i + o.len()], o)?))
}

/// `a op b` broadcast as `bc` says, one innermost run at a time.
pub fn binary_strided(
    op: FastBinary,
    bc: &StridedBroadcast,
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    par: bool,
) -> Result<()> {
    let r = bc.dims.len();
    let extent = |st: &[usize]| bc.dims.iter().zip(st).map(|(d, s)| d.saturating_sub(1) * s).sum::<usize>() + 1;
    let total: usize = bc.dims.iter().product();
    if r == 0
        || total != out.len()
        || (total > 0 && (extent(&bc.a_strides) > a.len() || extent(&bc.b_strides) > b.len()))
    {
        return Err(shape_error(format!("broadcast {bc:?} of {} and {} values into {}", a.len(), b.len(), out.len())));
    }
    let n = bc.dims[r - 1];
    let (sa, sb) = (bc.a_strides[r - 1], bc.b_strides[r - 1]);
    let kop = match op {
        FastBinary::Add => BinaryOp::Add,
        FastBinary::Sub => BinaryOp::Sub,
        FastBinary::Mul => BinaryOp::Mul,
        FastBinary::Div => BinaryOp::Div,
    };
    // Offsets of run `row` (row-major over the outer dims) in a and b.
    let offsets = |mut row: usize| {
        let (mut oa, mut ob) = (0, 0);
        for d in (0..r - 1).rev() {
            let i = row % bc.dims[d];
            row /= bc.dims[d];
            oa += i * bc.a_strides[d];
            ob += i * bc.b_strides[d];
        }
        (oa, ob)
    };
    row_chunks(out, n, par, |r0, chunk| {
        for (j, y) in chunk.chunks_exact_mut(n.max(1)).enumerate() {
            let (oa, ob) = offsets(r0 + j);
            let ra = if sa == 0 { &a[oa..oa + 1] } else { &a[oa..oa + n] };
            let rb = if sb == 0 { &b[ob..ob + 1] } else { &b[ob..ob + n] };
            match (sa, sb) {
                (1, _) => rows::binary(kop, ra, rb, y)?,
                (_, 1) if matches!(op, FastBinary::Add | FastBinary::Mul) => rows::binary(kop, rb, ra, y)?,
                _ => {
                    for (i, o) in y.iter_mut().enumerate() {
                        let (x, z) = (ra[if sa == 0 { 0 } else { i }], rb[if sb == 0 { 0 } else { i }]);
                        *o = match op {
                            FastBinary::Add => x + z,
                            FastBinary::Sub => x - z,
                            FastBinary::Mul => x * z,
                            FastBinary::Div => x / z,
                        };
                    }
                }
            }
        }
        Ok(())
    })
}

/// `dy * f'(x)` element-wise.
pub fn activation_grad(act: grad::GradActivation, x: &[f32], dy: &[f32], out: &mut [f32], par: bool) -> Result<()> {
    check_len(x.len(), out.len())?;
    check_len(dy.len(), out.len())?;
    row_chunks(out, 1, par, |i, o| Ok(grad::activation_grad(act, &x[i..i + o.len()], &dy[i..i + o.len()], o)?))
}

/// Softmax / log-softmax backward over rows of `n`.
pub fn softmax_grad(y: &[f32], dy: &[f32], n: usize, log: bool, out: &mut [f32], par: bool) -> Result<()> {
    check_len(y.len(), out.len())?;
    check_len(dy.len(), out.len())?;
    row_chunks(out, n, par, |r, o| {
        let s = r * n..r * n + o.len();
        Ok(grad::softmax_grad(&y[s.clone()], &dy[s], n, log, o)?)
    })
}

/// Layer-norm backward over rows of `n`: `dx`, and `dscale` / `dbias` summed over rows (row
/// blocks on threads keep partial sums, added up at the end in block order, so the result
/// does not depend on the thread count's scheduling).
#[allow(clippy::too_many_arguments)]
pub fn layer_norm_grad(
    x: &[f32],
    scale: &[f32],
    dy: &[f32],
    n: usize,
    eps: f32,
    dx: &mut [f32],
    dscale: &mut [f32],
    dbias: &mut [f32],
    par: bool,
) -> Result<()> {
    check_len(x.len(), dx.len())?;
    check_len(dy.len(), dx.len())?;
    dscale.fill(0.0);
    dbias.fill(0.0);
    let rows = dx.len().checked_div(n).unwrap_or(0);
    let per = rows_per_task(rows, n);
    if !par || rows <= per {
        return Ok(grad::layer_norm_grad(x, scale, dy, n, eps, dx, dscale, dbias)?);
    }
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(per * n)
        .enumerate()
        .map(|(t, d)| {
            let s = t * per * n..t * per * n + d.len();
            let (mut ps, mut pb) = (vec![0.0; n], vec![0.0; n]);
            grad::layer_norm_grad(&x[s.clone()], scale, &dy[s], n, eps, d, &mut ps, &mut pb)?;
            Ok((ps, pb))
        })
        .collect::<Result<_>>()?;
    for (ps, pb) in partials {
        dscale.iter_mut().zip(ps).for_each(|(d, v)| *d += v);
        dbias.iter_mut().zip(pb).for_each(|(d, v)| *d += v);
    }
    Ok(())
}

/// Layer norm over the last axis with run-time scale and bias (parameters as inputs).
pub fn layer_norm_dyn(
    x: &[f32],
    n: usize,
    scale: &[f32],
    bias: Option<&[f32]>,
    eps: f32,
    out: &mut [f32],
    par: bool,
) -> Result<()> {
    match bias {
        Some(b) => layer_norm(x, n, scale, b, eps, out, par),
        None => layer_norm(x, n, scale, &vec![0.0; n], eps, out, par),
    }
}

/// The gradient of a row gather: `out` zeroed, then every `dy` row added at its index.
pub fn gather_grad(idx: &[i64], dy: &[f32], inner: usize, out: &mut [f32], par: bool) -> Result<()> {
    // The zero fill dominates for embedding tables (tens of MB); it splits over threads.
    row_chunks(out, 1, par, |_, o| {
        o.fill(0.0);
        Ok(())
    })?;
    Ok(grad::gather_grad(idx, dy, inner, out)?)
}

/// `out[o, i] = Σ_j x[o, j, i]` for `j < len`, `i < inner`; `out` holds `outer * inner`.
pub fn reduce_sum(x: &[f32], len: usize, inner: usize, out: &mut [f32]) -> Result<()> {
    if x.len() != out.len() * len || (inner > 0 && !out.len().is_multiple_of(inner)) {
        return Err(shape_error(format!("sum of {len} x {inner} blocks: {} values into {}", x.len(), out.len())));
    }
    if inner == 0 || out.is_empty() {
        return Ok(());
    }
    // f32 sums (relative error ~len * 2^-24); whole rows keep the adds vectorised.
    for (o, dst) in out.chunks_exact_mut(inner).enumerate() {
        dst.fill(0.0);
        for src in x[o * len * inner..(o + 1) * len * inner].chunks_exact(inner) {
            for (d, &v) in dst.iter_mut().zip(src) {
                *d += v;
            }
        }
    }
    Ok(())
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
/// `softmax(Q Kᵀ * scale + mask) V` per (batch, head) into that head's columns of `out`, both
/// products in the arithmetic `products` names.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: Rows<'_>,
    k: Rows<'_>,
    v: Rows<'_>,
    mask: Option<(&[f32], [usize; 4])>,
    dims: AttnDims,
    scale: f32,
    out: &mut [f32],
    par: bool,
    products: AttnProducts,
) -> Result<()> {
    let mask = mask.map(|(data, shape)| AttnMask { data, shape });
    let par = if par { Par::Current } else { Par::Seq };
    Ok(attention::mha_strided_as(products, q, k, v, mask, dims, scale, out, par)?)
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
        let y = both(|p, o| binary(FastBinary::Sub, Broadcast::Repeat, &x, &row, o, p));
        assert_eq!(y[3 * N + 10], x[3 * N + 10] - 10.0);
        // A block of two rows repeated (position embeddings over a batch).
        let two: Vec<f32> = (0..2 * N).map(|j| j as f32).collect();
        let y = both(|p, o| binary(FastBinary::Add, Broadcast::Repeat, &x, &two, o, p));
        assert_eq!(y[5 * N + 7], x[5 * N + 7] + (N + 7) as f32);
        let per_row: Vec<f32> = (0..ROWS).map(|r| r as f32).collect();
        let y = both(|p, o| binary(FastBinary::Mul, Broadcast::PerRow(N), &x, &per_row, o, p));
        assert_eq!(y[7 * N + 3], x[7 * N + 3] * 7.0);
        let y = both(|p, o| binary(FastBinary::Mul, Broadcast::Scalar, &x, &[2.0], o, p));
        assert_eq!(y[777], x[777] * 2.0);
        let y = both(|p, o| binary(FastBinary::Div, Broadcast::Same, &x, &x, o, p));
        assert_eq!(y[1], 1.0);
    }

    #[test]
    fn reduce_sum_over_a_middle_axis() {
        // x[o, j, i] = 100 o + 10 j + i with 2 x 3 x 2 values.
        let x: Vec<f32> = (0..12).map(|f| (100 * (f / 6) + 10 * (f / 2 % 3) + f % 2) as f32).collect();
        let mut out = vec![0.0; 4];
        reduce_sum(&x, 3, 2, &mut out).unwrap();
        assert_eq!(out, vec![30.0, 33.0, 330.0, 333.0]);
    }

    #[test]
    fn bad_lengths_are_errors() {
        let mut out = vec![0.0; 6];
        assert!(binary(FastBinary::Add, Broadcast::Repeat, &[1.0; 6], &[1.0; 4], &mut out, false).is_err());
        assert!(binary(FastBinary::Add, Broadcast::Repeat, &[1.0; 6], &[1.0; 3], &mut out[..5], false).is_err());
        assert!(binary(FastBinary::Add, Broadcast::PerRow(3), &[1.0; 6], &[1.0; 3], &mut out, false).is_err());
        assert!(binary(FastBinary::Add, Broadcast::Same, &[1.0; 6], &[1.0; 3], &mut out, false).is_err());
        assert!(reduce_sum(&[1.0; 6], 4, 1, &mut out[..2]).is_err());
        assert!(layer_norm(&[1.0; 6], 3, &[1.0; 2], &[0.0; 3], 1e-5, &mut out, false).is_err());
        assert!(softmax(&[1.0; 5], 3, &mut out[..5], false).is_err());
        let dims = AttnDims { batch: 1, seq_q: 2, seq_k: 2, heads: 1, head_dim: 3 };
        let (q, k) = (Rows { data: &[0.0; 6], ld: 3 }, Rows { data: &[0.0; 6], ld: 3 });
        let mut run = |data: &[f32], par| {
            attention(q, k, Rows { data, ld: 3 }, None, dims, 1.0, &mut out, par, AttnProducts::F32)
        };
        assert!(run(&[0.0; 5], false).is_err());
        assert!(run(&[0.0; 6], true).is_ok());
    }
}

//! Kernels the runtime composes from `slimnn-kernels`' GEMM plus row-wise loops. Each has a
//! reference counterpart in the IR's evaluator; differential tests compare the two.

use crate::plan::FastBinary;
use crate::{Result, RuntimeError};
use rayon::prelude::*;
use slimnn_kernels::{gemm, sgemm, Activation, Epilogue, PackedB, Par};
use std::cell::RefCell;

/// Rows per parallel task for row-wise kernels (keeps tasks big enough to be worth it).
const ROWS_PER_TASK: usize = 16;

fn rows_mut(out: &mut [f32], n: usize, par: bool, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if par && out.len() >= 2 * ROWS_PER_TASK * n && n > 0 {
        out.par_chunks_mut(n * ROWS_PER_TASK).enumerate().for_each(|(t, chunk)| {
            for (i, row) in chunk.chunks_mut(n).enumerate() {
                f(t * ROWS_PER_TASK + i, row);
            }
        });
    } else if n > 0 {
        for (i, row) in out.chunks_mut(n).enumerate() {
            f(i, row);
        }
    }
}

pub fn layer_norm(x: &[f32], n: usize, scale: &[f32], bias: &[f32], eps: f32, out: &mut [f32], par: bool) {
    rows_mut(out, n, par, |r, y| {
        let row = &x[r * n..(r + 1) * n];
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        let inv = 1.0 / (var + eps as f64).sqrt();
        let (mean, inv) = (mean as f32, inv as f32);
        for j in 0..n {
            y[j] = (row[j] - mean) * inv * scale[j] + bias[j];
        }
    });
}

/// Softmax of each row of `x` (length `n`) after `v * scale + mask(row)`.
fn softmax_row(y: &mut [f32], scale: f32, mask: Option<&[f32]>) {
    let mut max = f32::NEG_INFINITY;
    for (j, v) in y.iter_mut().enumerate() {
        *v = *v * scale + mask.map_or(0.0, |m| m[j]);
        max = max.max(*v);
    }
    if max == f32::NEG_INFINITY {
        // Every position masked to -inf: ONNX softmax gives NaN; keep that behaviour.
        y.iter_mut().for_each(|v| *v = f32::NAN);
        return;
    }
    let mut sum = 0f32;
    for v in y.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    y.iter_mut().for_each(|v| *v *= inv);
}

pub fn softmax(x: &[f32], n: usize, out: &mut [f32], par: bool) {
    out.copy_from_slice(x);
    rows_mut(out, n, par, |_, y| softmax_row(y, 1.0, None));
}

/// erf with max abs error ~1.2e-7 (Numerical Recipes' erfc Chebyshev fit, in f64).
fn erf(x: f32) -> f32 {
    let z = (x as f64).abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.26551223
            + t * (1.00002368
                + t * (0.37409196
                    + t * (0.09678418
                        + t * (-0.18628806
                            + t * (0.27886807
                                + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277)))))))))
            .exp();
    let e = 1.0 - r;
    (if x >= 0.0 { e } else { -e }) as f32
}

pub fn apply_activation(act: Activation, v: f32) -> f32 {
    match act {
        Activation::None => v,
        Activation::Relu => v.max(0.0),
        Activation::Clip { min, max } => v.clamp(min, max),
        Activation::GeluErf => 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2)),
        Activation::GeluTanh => {
            let c = (2.0 / std::f32::consts::PI).sqrt();
            0.5 * v * (1.0 + (c * (v + 0.044715 * v * v * v)).tanh())
        }
        Activation::Silu => v / (1.0 + (-v).exp()),
    }
}

pub fn activation(x: &[f32], act: Activation, out: &mut [f32], par: bool) {
    let f = |(o, &v): (&mut f32, &f32)| *o = apply_activation(act, v);
    if par && x.len() > 1 << 15 {
        out.par_iter_mut().zip(x.par_iter()).for_each(f);
    } else {
        out.iter_mut().zip(x).for_each(f);
    }
}

/// `a op b` where `b` has `a`'s length, one element, or `row` elements repeated per row.
pub fn binary(op: FastBinary, a: &[f32], b: &[f32], row: usize, out: &mut [f32], par: bool) {
    let f = |x: f32, y: f32| match op {
        FastBinary::Add => x + y,
        FastBinary::Sub => x - y,
        FastBinary::Mul => x * y,
        FastBinary::Div => x / y,
    };
    let n = if b.len() == a.len() { a.len().max(1) } else { row.max(1) };
    rows_mut(out, n, par, |r, y| {
        let xs = &a[r * n..(r + 1) * n];
        if b.len() == 1 {
            y.iter_mut().zip(xs).for_each(|(o, &x)| *o = f(x, b[0]));
        } else {
            let bs = if b.len() == a.len() { &b[r * n..(r + 1) * n] } else { b };
            for j in 0..n {
                y[j] = f(xs[j], bs[j]);
            }
        }
    });
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

struct AttnScratch {
    k: PackedB,
    scores: Vec<f32>,
    ctx: Vec<f32>,
}

thread_local! {
    static ATTN: RefCell<Option<AttnScratch>> = const { RefCell::new(None) };
}

/// A raw pointer to the output, shared by tasks that write disjoint elements.
#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: tasks write disjoint (batch, head) column blocks of the output; see `attention`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// The element pointer at `i` (a method, so closures capture the whole `Send` wrapper).
    fn at(self, i: usize) -> *mut f32 {
        self.0.wrapping_add(i)
    }
}

/// Dims of one attention call.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub batch: usize,
    pub seq_q: usize,
    pub seq_k: usize,
    pub heads: usize,
    pub head_dim: usize,
}

/// Multi-head attention on `[batch, seq, heads * head_dim]` projections; one task per
/// (batch, head): `softmax(Q Kᵀ * scale + mask) V` into that head's columns of `out`.
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
    let AttnDims { batch, seq_q: sq, seq_k: sk, heads, head_dim: d } = dims;
    let hd = heads * d;
    let ptr = OutPtr(out.as_mut_ptr());
    let task = |item: usize| -> Result<()> {
        let (b, h) = (item / heads, item % heads);
        ATTN.with(|cell| -> Result<()> {
            let mut slot = cell.borrow_mut();
            if slot.is_none() {
                *slot =
                    Some(AttnScratch { k: PackedB::empty(slimnn_kernels::cpu::tier())?, scores: vec![], ctx: vec![] });
            }
            let s = slot.as_mut().expect("initialised above");
            s.scores.resize(sq * sk, 0.0);
            s.ctx.resize(sq * d, 0.0);
            let qb = &q[b * sq * hd + h * d..];
            let kb = &k[b * sk * hd + h * d..];
            let vb = &v[b * sk * hd + h * d..];
            // Kᵀ packed from K's rows (stride hd): B[dd][j] = K[j][dd].
            s.k.pack_transposed(kb, d, sk, hd)?;
            gemm(sq, qb, hd, &s.k, &mut s.scores, sk, Epilogue::NONE, Par::Seq)?;
            for i in 0..sq {
                let row = &mut s.scores[i * sk..(i + 1) * sk];
                let m = mask.map(|(m, [mb, mh, mq, _])| {
                    let off = ((b % mb) * mh + (h % mh)) * mq * sk + (i % mq) * sk;
                    &m[off..off + sk]
                });
                softmax_row(row, scale, m);
            }
            sgemm(sq, sk, d, &s.scores, sk, vb, hd, &mut s.ctx, d, Epilogue::NONE, Par::Seq)?;
            for i in 0..sq {
                let dst = (b * sq + i) * hd + h * d;
                for j in 0..d {
                    // SAFETY: `dst + j` < batch * sq * hd = out.len(), and each (b, h) task
                    // writes only columns h*d..(h+1)*d of its batch's rows, so no two tasks
                    // write the same element and nobody reads `out` meanwhile.
                    unsafe { *ptr.at(dst + j) = s.ctx[i * d + j] };
                }
            }
            Ok(())
        })
    };
    assert!(out.len() >= batch * sq * hd, "attention output buffer too small");
    if par {
        (0..batch * heads).into_par_iter().try_for_each(task)
    } else {
        (0..batch * heads).try_for_each(task)
    }
}

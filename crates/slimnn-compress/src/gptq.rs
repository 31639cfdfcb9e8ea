//! GPTQ (Frantar et al., 2022): quantizes a layer's weight one input channel at a time and
//! spreads each channel's rounding error over the channels not yet quantized, weighted by the
//! inverse Hessian `H = X^T X` of the layer's calibration inputs, so the layer's *output* error
//! `||X W - X Q||` is small rather than the weight error.
//!
//! Layout: the weight is `[K, N]` (`x @ W`), so an "input channel" is a row of K. The
//! Cholesky factorisations are small dense `K x K` ones (K ≤ a few thousand), written here.

use crate::calib::Gram;
use crate::quant::{group_params, quantize_value, GroupWeight, Int8Weight};
use crate::{CompressError, Result};

/// The quantization grid GPTQ rounds onto.
#[derive(Debug, Clone, PartialEq)]
pub enum GptqGrid {
    /// Symmetric int8 with fixed scales (one, or one per output column).
    Int8 { scales: Vec<f32> },
    /// Asymmetric `bits`-bit codes, a scale and zero point per `block` rows of each column,
    /// chosen when GPTQ reaches the block (from the error-updated weights).
    Groups { bits: usize, block: usize },
}

/// GPTQ's result on the requested grid.
#[derive(Debug, Clone, PartialEq)]
pub enum GptqOutput {
    Int8(Int8Weight),
    Groups(GroupWeight),
}

/// Lower Cholesky factor of a symmetric positive definite `n x n` matrix (row-major).
pub fn cholesky(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (0..j).map(|p| l[i * n + p] * l[j * n + p]).sum();
            if i == j {
                let d = a[i * n + i] - s;
                if d <= 0.0 || !d.is_finite() {
                    return Err(CompressError::Model(format!(
                        "GPTQ: the Hessian is not positive definite (pivot {i})"
                    )));
                }
                l[i * n + i] = d.sqrt();
            } else {
                l[i * n + j] = (a[i * n + j] - s) / l[j * n + j];
            }
        }
    }
    Ok(l)
}

/// Inverse of a lower-triangular matrix.
fn invert_lower(l: &[f64], n: usize) -> Vec<f64> {
    let mut inv = vec![0f64; n * n];
    for c in 0..n {
        inv[c * n + c] = 1.0 / l[c * n + c];
        for i in c + 1..n {
            let s: f64 = (c..i).map(|p| l[i * n + p] * inv[p * n + c]).sum();
            inv[i * n + c] = -s / l[i * n + i];
        }
    }
    inv
}

/// Upper Cholesky factor `U` of `H^-1` (`H^-1 = U^T U`), what GPTQ's updates read.
fn inverse_upper_factor(h: &[f64], n: usize) -> Result<Vec<f64>> {
    let l = cholesky(h, n)?;
    let li = invert_lower(&l, n);
    // H^-1 = L^-T L^-1.
    let mut hinv = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f64 = (i..n).map(|p| li[p * n + i] * li[p * n + j]).sum();
            hinv[i * n + j] = s;
            hinv[j * n + i] = s;
        }
    }
    let l2 = cholesky(&hinv, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = l2[i * n + j];
        }
    }
    Ok(u)
}

/// Runs GPTQ on the row-major `[k, n]` weight `w` with the Gram matrix of its inputs.
pub fn gptq(w: &[f32], k: usize, n: usize, gram: &Gram, grid: &GptqGrid, damp: f64) -> Result<GptqOutput> {
    if gram.k != k || gram.rows == 0 {
        return Err(CompressError::Calibration(format!(
            "GPTQ needs input statistics of {k} channels, got {} over {} rows",
            gram.k, gram.rows
        )));
    }
    let mut h = gram.symmetric();
    let mut wf: Vec<f64> = w.iter().map(|&v| v as f64).collect();
    // Inputs that were always zero carry no information: pin them and drop their weights.
    for i in 0..k {
        if h[i * k + i] == 0.0 {
            h[i * k + i] = 1.0;
            wf[i * n..(i + 1) * n].iter_mut().for_each(|v| *v = 0.0);
        }
    }
    let mean_diag = (0..k).map(|i| h[i * k + i]).sum::<f64>() / k as f64;
    for i in 0..k {
        h[i * k + i] += damp * mean_diag;
    }
    let u = inverse_upper_factor(&h, k)?;
    let mut codes = vec![0i32; k * n];
    let (mut scales, mut zeros): (Vec<f32>, Vec<u8>) = (vec![], vec![]);
    let mut col_params: Vec<(f32, i32)> = match grid {
        GptqGrid::Int8 { scales } => (0..n).map(|c| (scales[if scales.len() == 1 { 0 } else { c }], 0)).collect(),
        GptqGrid::Groups { .. } => vec![(1.0, 0); n],
    };
    let (qmin, qmax) = match grid {
        GptqGrid::Int8 { .. } => (-127, 127),
        GptqGrid::Groups { bits, .. } => (0, (1 << bits) - 1),
    };
    let mut err = vec![0f64; n];
    for i in 0..k {
        if let GptqGrid::Groups { bits, block } = grid {
            if i % block == 0 {
                let rows = i..(i + block).min(k);
                for (c, p) in col_params.iter_mut().enumerate() {
                    let (s, z) = group_params(rows.clone().map(|r| wf[r * n + c] as f32), *bits);
                    *p = (s, z as i32);
                }
                scales.extend(col_params.iter().map(|p| p.0));
                zeros.extend(col_params.iter().map(|p| p.1 as u8));
            }
        }
        let d = u[i * k + i];
        for c in 0..n {
            let (s, z) = col_params[c];
            let v = wf[i * n + c];
            let q = quantize_value(v as f32, s, z, qmin, qmax);
            codes[i * n + c] = q;
            err[c] = (v - (q - z) as f64 * s as f64) / d;
        }
        for j in i + 1..k {
            let f = u[i * k + j];
            if f == 0.0 {
                continue;
            }
            for (wv, e) in wf[j * n..(j + 1) * n].iter_mut().zip(&err) {
                *wv -= e * f;
            }
        }
    }
    Ok(match grid {
        GptqGrid::Int8 { scales } => {
            GptqOutput::Int8(Int8Weight::matmul(codes.iter().map(|&q| q as i8).collect(), scales.clone(), n))
        }
        GptqGrid::Groups { bits, block } => {
            let blocks = k.div_ceil(*block);
            // Collected block-major ([blocks, N]); GroupWeight wants [N, blocks] and codes [N, K].
            let mut gw = GroupWeight {
                k,
                n,
                bits: *bits,
                block: *block,
                codes: vec![0; n * k],
                scales: vec![0.0; n * blocks],
                zeros: vec![0; n * blocks],
            };
            for g in 0..blocks {
                for c in 0..n {
                    gw.scales[c * blocks + g] = scales[g * n + c];
                    gw.zeros[c * blocks + g] = zeros[g * n + c];
                }
            }
            for r in 0..k {
                for c in 0..n {
                    gw.codes[c * k + r] = codes[r * n + c] as u8;
                }
            }
            GptqOutput::Groups(gw)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::quantize_groups;

    #[test]
    fn cholesky_by_hand() {
        // [[4, 2], [2, 5]] = L L^T with L = [[2, 0], [1, 2]].
        assert_eq!(cholesky(&[4.0, 2.0, 2.0, 5.0], 2).unwrap(), vec![2.0, 0.0, 1.0, 2.0]);
        assert!(cholesky(&[1.0, 2.0, 2.0, 1.0], 2).is_err());
        // U^T U = H^-1 = [[5, -2], [-2, 4]] / 16.
        let u = inverse_upper_factor(&[4.0, 2.0, 2.0, 5.0], 2).unwrap();
        let ut_u = [u[0] * u[0], u[0] * u[1], u[0] * u[1], u[1] * u[1] + u[3] * u[3]];
        for (a, b) in ut_u.iter().zip([5.0 / 16.0, -2.0 / 16.0, -2.0 / 16.0, 4.0 / 16.0]) {
            assert!((a - b).abs() < 1e-12);
        }
        assert_eq!(u[2], 0.0);
    }

    /// Deterministic pseudo-random values in [-1, 1).
    fn noise(seed: u64, len: usize) -> Vec<f32> {
        let mut s = seed;
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn gptq_output_error_beats_round_to_nearest_on_correlated_inputs() {
        let (k, n, rows) = (64, 16, 512);
        // Correlated inputs: each feature mixes a few shared factors, with uneven scales.
        let f = noise(1, rows * 4);
        let e = noise(2, rows * k);
        let x: Vec<f32> = (0..rows * k)
            .map(|i| {
                let (r, c) = (i / k, i % k);
                (f[r * 4 + c % 4] * 2.0 + 0.3 * e[i]) * (1.0 + (c % 7) as f32)
            })
            .collect();
        let w = noise(3, k * n);
        let mut gram = Gram::default();
        for row in x.chunks_exact(k) {
            gram_add(&mut gram, row, k);
        }
        let out_err = |wq: &[f32]| -> f64 {
            let mut e = 0f64;
            for row in x.chunks_exact(k) {
                for c in 0..n {
                    let d: f64 = (0..k).map(|i| row[i] as f64 * (w[i * n + c] - wq[i * n + c]) as f64).sum();
                    e += d * d;
                }
            }
            e
        };
        let rtn = quantize_groups(&w, k, n, 4, 32).dequantize();
        let GptqOutput::Groups(g) = gptq(&w, k, n, &gram, &GptqGrid::Groups { bits: 4, block: 32 }, 0.01).unwrap()
        else {
            panic!("group output expected")
        };
        let (e_rtn, e_gptq) = (out_err(&rtn), out_err(&g.dequantize()));
        assert!(e_gptq < 0.8 * e_rtn, "GPTQ output error {e_gptq} vs RTN {e_rtn}");
    }

    fn gram_add(g: &mut Gram, row: &[f32], k: usize) {
        if g.k == 0 {
            g.k = k;
            g.xtx = vec![0.0; k * k];
        }
        for i in 0..k {
            for j in i..k {
                g.xtx[i * k + j] += row[i] as f64 * row[j] as f64;
            }
        }
        g.rows += 1;
    }
}

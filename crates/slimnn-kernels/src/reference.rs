//! Scalar references: obviously correct, f64 inside, used by the property tests.

use crate::error::KernelError;
use crate::gemm::validate::{check_gemm, matrix_extent};
use crate::gemm::{Activation, Epilogue};

/// `C = epilogue(A·B)` with the same arguments and semantics as [`crate::gemm::sgemm`]: a
/// triple loop accumulating in f64, then bias, accumulate, activation and residual in f64.
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
) -> Result<(), KernelError> {
    check_gemm(m, k, n, a.len(), lda, c.len(), ldc, &epilogue)?;
    matrix_extent("B", b.len(), k, n, ldb)?;
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0f64;
            for kk in 0..k {
                s += a[i * lda + kk] as f64 * b[kk * ldb + j] as f64;
            }
            if let Some(bias) = epilogue.bias {
                s += bias[j] as f64;
            }
            if let Some(bias) = epilogue.row_bias {
                s += bias[i] as f64;
            }
            if epilogue.accumulate {
                s += c[i * ldc + j] as f64;
            }
            let mut y = activation(epilogue.activation, s);
            if let Some(r) = epilogue.residual {
                y += r.data[i * r.ld + j] as f64;
            }
            c[i * ldc + j] = y as f32;
        }
    }
    Ok(())
}

/// The activation in f64.
pub fn activation(act: Activation, x: f64) -> f64 {
    match act {
        Activation::None => x,
        Activation::Relu => x.max(0.0),
        Activation::Clip { min, max } => x.clamp(min as f64, max as f64),
        Activation::GeluErf => gelu_erf(x),
        Activation::GeluTanh => gelu_tanh(x),
        Activation::Silu => silu(x),
    }
}

/// `0.5 x (1 + erf(x / sqrt 2))`.
pub fn gelu_erf(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2))
}

/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
pub fn gelu_tanh(x: f64) -> f64 {
    let u = (2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x);
    0.5 * x * (1.0 + u.tanh())
}

/// `x / (1 + e^-x)`.
pub fn silu(x: f64) -> f64 {
    x / (1.0 + (-x).exp())
}

/// The error function to about 1e-14: the Maclaurin series below 2.5, the continued fraction
/// for erfc above.
pub fn erf(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    let y = if ax < 2.5 {
        // erf x = 2/sqrt(pi) * sum (-1)^n x^(2n+1) / (n! (2n+1)); terms peak near e^(x^2),
        // so below 2.5 at most ~3 digits are lost to cancellation.
        let mut term = ax;
        let mut sum = 0.0;
        for n in 0..200 {
            let t = term / (2 * n + 1) as f64;
            sum += t;
            if t.abs() <= 1e-17 * sum.abs() {
                break;
            }
            term *= -ax * ax / (n + 1) as f64;
        }
        std::f64::consts::FRAC_2_SQRT_PI * sum
    } else if ax < 10.0 {
        // erfc x = e^(-x^2) / sqrt(pi) / (x + (1/2) / (x + 1 / (x + (3/2) / (x + ...)))).
        let mut f = ax;
        for n in (1..=80).rev() {
            f = ax + (n as f64 / 2.0) / f;
        }
        1.0 - (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f)
    } else {
        1.0
    };
    y.copysign(x)
}

/// Depthwise convolution of one channels-last image (see [`crate::depthwise::depthwise_nhwc`]),
/// in f64; taps outside the image are zero.
pub fn depthwise_nhwc(
    g: &crate::depthwise::DwGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
) -> Vec<f64> {
    let mut out = vec![0.0; g.oh * g.ow * g.c];
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            for ch in 0..g.c {
                let mut s = bias.map_or(0.0, |b| b[ch] as f64);
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let iy = (oy * g.sh + ky) as isize - g.pt as isize;
                        let ix = (ox * g.sw + kx) as isize - g.pl as isize;
                        if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                            let xi = (iy as usize * g.w + ix as usize) * g.c + ch;
                            s += x[xi] as f64 * w[(ky * g.kw + kx) * g.c + ch] as f64;
                        }
                    }
                }
                if let Some((lo, hi)) = clamp {
                    s = s.clamp(lo as f64, hi as f64);
                }
                out[(oy * g.ow + ox) * g.c + ch] = s;
            }
        }
    }
    out
}

/// [`crate::direct::conv_direct_nhwc`] in f64: `x` NCHW, `w` `[c_in, kh, kw, c_out]`, output
/// channels-last.
pub fn conv_direct_nhwc(
    g: &crate::direct::DirectGeom,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    clamp: Option<(f32, f32)>,
) -> Vec<f64> {
    let mut out = vec![0.0; g.oh * g.ow * g.c_out];
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            for co in 0..g.c_out {
                let mut s = bias.map_or(0.0, |b| b[co] as f64);
                for ci in 0..g.c_in {
                    for ky in 0..g.kh {
                        for kx in 0..g.kw {
                            let iy = (oy * g.sh + ky) as isize - g.pt as isize;
                            let ix = (ox * g.sw + kx) as isize - g.pl as isize;
                            if iy >= 0 && ix >= 0 && (iy as usize) < g.h && (ix as usize) < g.w {
                                let xi = (ci * g.h + iy as usize) * g.w + ix as usize;
                                s += x[xi] as f64 * w[((ci * g.kh + ky) * g.kw + kx) * g.c_out + co] as f64;
                            }
                        }
                    }
                }
                if let Some((lo, hi)) = clamp {
                    s = s.clamp(lo as f64, hi as f64);
                }
                out[(oy * g.ow + ox) * g.c_out + co] = s;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn erf_table_values() {
        let table = [
            (0.0, 0.0),
            (0.5, 0.520_499_877_813_046_5),
            (1.0, 0.842_700_792_949_714_9),
            (2.0, 0.995_322_265_018_952_7),
            (2.5, 0.999_593_047_982_555),
            (3.0, 0.999_977_909_503_001_4),
            (4.0, 0.999_999_984_582_742_1),
        ];
        for (x, want) in table {
            assert!((erf(x) - want).abs() < 1e-14, "erf({x}) = {}", erf(x));
            assert!((erf(-x) + want).abs() < 1e-14);
        }
        assert_eq!(erf(30.0), 1.0);
        assert!(erf(f64::NAN).is_nan());
    }

    #[test]
    fn activations_by_hand() {
        assert_eq!(activation(Activation::Relu, -2.0), 0.0);
        assert_eq!(activation(Activation::RELU6, 7.5), 6.0);
        assert_eq!(activation(Activation::Clip { min: -1.0, max: 1.0 }, -3.0), -1.0);
        assert!((gelu_erf(1.0) - 0.841_344_746_068_542_9).abs() < 1e-14);
        assert!((gelu_tanh(1.0) - 0.841_191_990_608_276_8).abs() < 1e-14);
        assert!((silu(1.0) - 0.731_058_578_630_004_9).abs() < 1e-14);
    }

    #[test]
    fn sgemm_by_hand() {
        // [1 2; 3 4] x [5 6; 7 8] = [19 22; 43 50]
        let a = [1.0, 2.0, 3.0, 4.0];
        let b = [5.0, 6.0, 7.0, 8.0];
        let mut c = [0.0; 2 * 3];
        sgemm(2, 2, 2, &a, 2, &b, 2, &mut c, 3, Epilogue::NONE).unwrap();
        assert_eq!(c, [19.0, 22.0, 0.0, 43.0, 50.0, 0.0]);
        // act(AB + bias + C) + residual with relu: row 0: [19-20+0, 22+1+0] -> relu -> [0, 23]
        let bias = [-20.0, 1.0];
        let res = [0.5, 0.5, 1.0, 1.0];
        let ep = Epilogue::default()
            .with_bias(&bias)
            .with_activation(Activation::Relu)
            .with_residual(&res, 2)
            .accumulating();
        let mut c = [0.0, 0.0, -100.0, 0.0];
        sgemm(2, 2, 2, &a, 2, &b, 2, &mut c, 2, ep).unwrap();
        assert_eq!(c, [0.5, 23.5, 1.0, 52.0]);
    }

    #[test]
    fn sgemm_rejects_bad_arguments() {
        let mut c = [0.0; 4];
        assert!(sgemm(2, 2, 2, &[0.0; 3], 2, &[0.0; 4], 2, &mut c, 2, Epilogue::NONE).is_err());
        let bias = [0.0; 3];
        let ep = Epilogue::default().with_bias(&bias);
        assert!(sgemm(2, 2, 2, &[0.0; 4], 2, &[0.0; 4], 2, &mut c, 2, ep).is_err());
    }
}

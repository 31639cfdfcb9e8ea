//! From calibration statistics to an activation's quantization range: min-max, percentile,
//! entropy (KL divergence, TensorRT's histogram method) and MSE.

use crate::calib::{Histogram, ValueStats};
use crate::quant::{asymmetric_params, quantize_value};
use serde::{Deserialize, Serialize};

/// How an activation's clipping range is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CalibrationMethod {
    /// The observed min and max.
    Minmax,
    /// The given percentile of values on each side (see `QuantRecipe::percentile`).
    Percentile,
    /// The symmetric threshold whose 128-level quantized histogram is closest (KL) to the
    /// observed one.
    Entropy,
    /// The range (a shrink of min-max) with the least expected squared quantization error.
    Mse,
}

/// Integer type of quantized activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationType {
    /// Asymmetric u8 (zero point anywhere in 0..=255): ONNX Runtime's default for activations.
    U8,
    /// Symmetric i8 (zero point 0).
    I8,
}

impl ActivationType {
    pub fn qrange(self) -> (i32, i32) {
        match self {
            ActivationType::U8 => (0, 255),
            ActivationType::I8 => (-128, 127),
        }
    }

    /// `(scale, zero point)` for the range `[lo, hi]`.
    pub fn params(self, lo: f32, hi: f32) -> (f32, i32) {
        match self {
            ActivationType::U8 => asymmetric_params(lo, hi, 0, 255),
            ActivationType::I8 => (crate::quant::symmetric_scale(lo.abs().max(hi.abs()), 127.0), 0),
        }
    }
}

/// The clipping range of an activation.
pub fn activation_range(
    stats: &ValueStats,
    method: CalibrationMethod,
    percentile: f64,
    act: ActivationType,
) -> (f32, f32) {
    let (min, max) = if stats.min <= stats.max { (stats.min, stats.max) } else { (0.0, 0.0) };
    let Some(h) = stats.hist.as_ref().filter(|h| h.total() > 0) else { return (min, max) };
    match method {
        CalibrationMethod::Minmax => (min, max),
        CalibrationMethod::Percentile => {
            let (lo, hi) = percentile_range(h, percentile);
            (lo.max(min), hi.min(max))
        }
        CalibrationMethod::Entropy => {
            let t = entropy_threshold(h);
            (min.max(-t), max.min(t))
        }
        CalibrationMethod::Mse => mse_range(h, min, max, act),
    }
}

/// Values at the `(100 - p)`-th and `p`-th percentiles (bin edges).
pub fn percentile_range(h: &Histogram, p: f64) -> (f32, f32) {
    let total = h.total() as f64;
    let tail = total * (1.0 - p / 100.0).clamp(0.0, 0.5);
    let w = h.bin_width();
    let mut acc = 0f64;
    let mut lo = -h.range;
    for (i, &c) in h.counts.iter().enumerate() {
        acc += c as f64;
        if acc > tail {
            lo = -h.range + i as f32 * w;
            break;
        }
    }
    acc = 0.0;
    let mut hi = h.range;
    for (i, &c) in h.counts.iter().enumerate().rev() {
        acc += c as f64;
        if acc > tail {
            hi = -h.range + (i + 1) as f32 * w;
            break;
        }
    }
    (lo, hi)
}

/// Quantized levels per side the entropy method models (int8: 128).
const ENTROPY_LEVELS: usize = 128;

/// TensorRT's entropy calibration on the histogram of `|x|`: the threshold `T` for which the
/// distribution clipped at `T` and quantized to 128 levels loses the least information (KL).
pub fn entropy_threshold(h: &Histogram) -> f32 {
    let nb = h.counts.len() / 2;
    // |x| histogram: bin i covers [i w, (i+1) w).
    let mut abs: Vec<f64> = (0..nb).map(|i| (h.counts[nb + i] + h.counts[nb - 1 - i]) as f64).collect();
    // The bin at 0 holds every exact zero (half of a ReLU's outputs), which any threshold
    // represents exactly; counted as is, merging it into wider levels dominates the divergence
    // and drives the threshold down to clip real values (NVIDIA's calibrator does the same).
    if nb > 1 {
        abs[0] = abs[1];
    }
    let w = h.bin_width();
    let last_nonzero = abs.iter().rposition(|&c| c > 0.0).unwrap_or(0);
    if last_nonzero < ENTROPY_LEVELS {
        return (last_nonzero + 1) as f32 * w;
    }
    let mut best = (f64::INFINITY, last_nonzero + 1);
    // Candidate thresholds every 8 bins keep this cheap; the search is flat near its minimum.
    let mut i = ENTROPY_LEVELS;
    while i <= last_nonzero + 1 {
        let mut p: Vec<f64> = abs[..i].to_vec();
        p[i - 1] += abs[i..].iter().sum::<f64>();
        // Q: p's first i bins merged into 128 levels, each spread over its non-empty bins.
        let mut q = vec![0f64; i];
        for l in 0..ENTROPY_LEVELS {
            let (a, b) = (l * i / ENTROPY_LEVELS, ((l + 1) * i / ENTROPY_LEVELS).max(l * i / ENTROPY_LEVELS + 1));
            let sum: f64 = abs[a..b].iter().sum();
            let nonzero = abs[a..b].iter().filter(|&&c| c > 0.0).count();
            if nonzero > 0 {
                for j in a..b {
                    if abs[j] > 0.0 {
                        q[j] = sum / nonzero as f64;
                    }
                }
            }
        }
        let (ps, qs): (f64, f64) = (p.iter().sum(), q.iter().sum());
        let kl: f64 = p
            .iter()
            .zip(&q)
            .filter(|(&pv, _)| pv > 0.0)
            .map(|(&pv, &qv)| {
                let (pn, qn) = (pv / ps, (qv / qs).max(1e-12));
                pn * (pn / qn).ln()
            })
            .sum();
        if kl < best.0 {
            best = (kl, i);
        }
        i += 8;
    }
    best.1 as f32 * w
}

/// Expected squared error of quantizing the histogram's values with `(scale, zero)`.
pub fn histogram_mse(h: &Histogram, scale: f32, zero: i32, (qmin, qmax): (i32, i32)) -> f64 {
    h.counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 0)
        .map(|(i, &c)| {
            let x = h.center(i);
            let q = (quantize_value(x, scale, zero, qmin, qmax) - zero) as f32 * scale;
            c as f64 * ((x - q) as f64).powi(2)
        })
        .sum()
}

/// Signal-to-quantization-noise ratio (dB) of an activation quantized with `(scale, zero)`,
/// estimated from its histogram.
pub fn histogram_sqnr_db(h: &Histogram, scale: f32, zero: i32, q: (i32, i32)) -> f64 {
    let signal: f64 = h.counts.iter().enumerate().map(|(i, &c)| c as f64 * (h.center(i) as f64).powi(2)).sum();
    let noise = histogram_mse(h, scale, zero, q);
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

fn mse_range(h: &Histogram, min: f32, max: f32, act: ActivationType) -> (f32, f32) {
    let mut best = (f64::INFINITY, (min, max));
    // Shrink each side independently over a geometric grid (the ends of a skewed
    // distribution want different clips).
    let grid: Vec<f32> = (0..24).map(|i| 0.88f32.powi(i)).collect();
    for &a in &grid {
        for &b in &grid {
            let (lo, hi) = (min * a, max * b);
            let (s, z) = act.params(lo, hi);
            let e = histogram_mse(h, s, z, act.qrange());
            if e < best.0 {
                best = (e, (lo, hi));
            }
        }
    }
    best.1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hist_of(values: &[f32]) -> (ValueStats, Histogram) {
        let mut h = Histogram::default();
        h.add(values);
        let s = ValueStats {
            min: values.iter().cloned().fold(f32::INFINITY, f32::min),
            max: values.iter().cloned().fold(f32::NEG_INFINITY, f32::max),
            hist: Some(h.clone()),
            ..Default::default()
        };
        (s, h)
    }

    #[test]
    fn percentile_clips_a_lone_outlier() {
        // 10,000 values in [-1, 1] and one at 100: the 99.9th percentile ends near 1.
        let mut v: Vec<f32> = (0..10_000).map(|i| (i as f32 / 5_000.0) - 1.0).collect();
        v.push(100.0);
        let (s, _) = hist_of(&v);
        let (lo, hi) = activation_range(&s, CalibrationMethod::Percentile, 99.9, ActivationType::U8);
        assert!((-1.05..=-0.95).contains(&lo), "lo {lo}");
        assert!((0.95..=1.2).contains(&hi), "hi {hi}");
        assert_eq!(activation_range(&s, CalibrationMethod::Minmax, 99.9, ActivationType::U8), (-1.0, 100.0));
    }

    #[test]
    fn entropy_and_mse_clip_a_heavy_tail_but_keep_the_bulk() {
        // A bulk within 4 plus two outliers at 60: clipping them costs less than coarse steps
        // for 200,000 values.
        let mut v: Vec<f32> =
            (0..200_000).map(|i| ((i % 400) as f32 / 100.0) * if i % 2 == 0 { 1.0 } else { -1.0 }).collect();
        v.extend([60.0, -60.0]);
        let (s, h) = hist_of(&v);
        let t = entropy_threshold(&h);
        assert!((3.0..40.0).contains(&t), "entropy threshold {t}");
        let (lo, hi) = activation_range(&s, CalibrationMethod::Mse, 0.0, ActivationType::I8);
        assert!((3.0..60.0).contains(&hi) && lo > -60.0, "mse range {lo} {hi}");
        // The MSE choice is no worse than min-max by its own measure.
        let q = ActivationType::I8;
        let (s0, z0) = q.params(-60.0, 60.0);
        let (s1, z1) = q.params(lo, hi);
        assert!(histogram_mse(&h, s1, z1, q.qrange()) <= histogram_mse(&h, s0, z0, q.qrange()));
    }
}

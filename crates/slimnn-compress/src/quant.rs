//! Quantization arithmetic shared by every scheme: scales and zero points, per-tensor /
//! per-channel int8 weights, group-wise n-bit weights with ONNX Runtime's `MatMulNBits`
//! packing, and signal-to-quantization-noise ratios.

use serde::{Deserialize, Serialize};

/// How many scales a weight gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Granularity {
    PerTensor,
    PerChannel,
}

/// Smallest scale handed out: keeps all-zero channels from dividing by zero.
const MIN_SCALE: f32 = 1e-12;

/// Symmetric scale mapping `[-absmax, absmax]` onto `[-qmax, qmax]`.
pub fn symmetric_scale(absmax: f32, qmax: f32) -> f32 {
    (absmax / qmax).max(MIN_SCALE)
}

/// Asymmetric `(scale, zero_point)` mapping `[lo, hi]` (widened to include 0, so 0 is exact)
/// onto `[qmin, qmax]`.
pub fn asymmetric_params(lo: f32, hi: f32, qmin: i32, qmax: i32) -> (f32, i32) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    let scale = ((hi - lo) / (qmax - qmin) as f32).max(MIN_SCALE);
    let zero = (qmin as f32 - lo / scale).round_ties_even().clamp(qmin as f32, qmax as f32) as i32;
    (scale, zero)
}

/// `clamp(round_half_even(x / scale) + zero, qmin, qmax)` as ONNX `QuantizeLinear` computes it.
pub fn quantize_value(x: f32, scale: f32, zero: i32, qmin: i32, qmax: i32) -> i32 {
    ((x / scale).round_ties_even() as i32 + zero).clamp(qmin, qmax)
}

/// A weight quantized to int8 with one scale per output channel (or one in all).
#[derive(Debug, Clone, PartialEq)]
pub struct Int8Weight {
    pub values: Vec<i8>,
    /// One per channel, or one.
    pub scales: Vec<f32>,
    /// The channel of each value (None: per tensor).
    layout: ChannelAxis,
}

/// Where a weight's output channels lie.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ChannelAxis {
    /// Per tensor.
    None,
    /// The last axis of `[K, N]` (matmul weights): value `i` is in channel `i % n`.
    Columns(usize),
    /// The leading axis of `[M, ...]` (convolution weights): value `i` is in `i / per`.
    Leading(usize),
}

impl ChannelAxis {
    fn of(self, i: usize) -> usize {
        match self {
            ChannelAxis::None => 0,
            ChannelAxis::Columns(n) => i % n,
            ChannelAxis::Leading(per) => i / per,
        }
    }
}

impl Int8Weight {
    /// Codes of a `[K, N]` matmul weight with `scales` per column (or one).
    pub fn matmul(values: Vec<i8>, scales: Vec<f32>, n: usize) -> Int8Weight {
        let layout = if scales.len() == 1 { ChannelAxis::None } else { ChannelAxis::Columns(n) };
        Int8Weight { values, scales, layout }
    }

    /// Raises channel `c`'s scale to at least `min`, requantizing its values from `w` (the
    /// weight these codes came from).
    pub fn raise_scale(&mut self, w: &[f32], c: usize, min: f32) {
        if self.scales[c] >= min {
            return;
        }
        self.scales[c] = min;
        for (i, (q, &v)) in self.values.iter_mut().zip(w).enumerate() {
            if self.layout.of(i) == c {
                *q = quantize_value(v, min, 0, -127, 127) as i8;
            }
        }
    }

    pub fn dequantize(&self) -> Vec<f32> {
        self.values.iter().enumerate().map(|(i, &q)| q as f32 * self.scales[self.layout.of(i)]).collect()
    }
}

/// Symmetric `[-127, 127]` codes (ONNX Runtime's convention: -128 unused, so a negated weight
/// quantizes to the negated codes), one scale per channel of `layout`.
fn quantize_int8(w: &[f32], channels: usize, layout: ChannelAxis) -> Int8Weight {
    let mut absmax = vec![0f32; channels];
    for (i, v) in w.iter().enumerate() {
        let a = &mut absmax[layout.of(i)];
        *a = a.max(v.abs());
    }
    let scales: Vec<f32> = absmax.iter().map(|&a| symmetric_scale(a, 127.0)).collect();
    let values =
        w.iter().enumerate().map(|(i, &v)| quantize_value(v, scales[layout.of(i)], 0, -127, 127) as i8).collect();
    Int8Weight { values, scales, layout }
}

/// Quantizes a row-major `[K, N]` matmul weight to int8, per column or per tensor.
pub fn quantize_int8_weight(w: &[f32], n: usize, granularity: Granularity) -> Int8Weight {
    match granularity {
        Granularity::PerTensor => quantize_int8(w, 1, ChannelAxis::None),
        Granularity::PerChannel => quantize_int8(w, n, ChannelAxis::Columns(n)),
    }
}

/// Quantizes a convolution weight `[M, C / group, kh, kw]` (`m` output channels, leading) to
/// int8, per output channel or per tensor.
pub fn quantize_int8_conv_weight(w: &[f32], m: usize, granularity: Granularity) -> Int8Weight {
    match granularity {
        Granularity::PerTensor => quantize_int8(w, 1, ChannelAxis::None),
        Granularity::PerChannel => quantize_int8(w, m, ChannelAxis::Leading(w.len() / m.max(1))),
    }
}

/// A `[K, N]` weight quantized to `bits`-bit codes in blocks of `block` values along K per
/// output column (asymmetric: codes `0..2^bits`, a scale and zero point per block).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupWeight {
    pub k: usize,
    pub n: usize,
    pub bits: usize,
    pub block: usize,
    /// Codes as `[N, K]` (the transposed layout `MatMulNBits` stores).
    pub codes: Vec<u8>,
    /// `[N, blocks]`.
    pub scales: Vec<f32>,
    /// `[N, blocks]`.
    pub zeros: Vec<u8>,
}

impl GroupWeight {
    pub fn blocks(&self) -> usize {
        self.k.div_ceil(self.block)
    }

    /// The weight as row-major `[K, N]` floats.
    pub fn dequantize(&self) -> Vec<f32> {
        let blocks = self.blocks();
        let mut w = vec![0f32; self.k * self.n];
        for col in 0..self.n {
            for kk in 0..self.k {
                let g = col * blocks + kk / self.block;
                w[kk * self.n + col] = (self.codes[col * self.k + kk] as f32 - self.zeros[g] as f32) * self.scales[g];
            }
        }
        w
    }

    /// `(B, zero_points)` packed as `MatMulNBits` reads them: codes low bits first, blocks
    /// padded to `block` values with the zero point's code.
    pub fn pack(&self) -> (Vec<u8>, Vec<u8>) {
        let blocks = self.blocks();
        let per_byte = 8 / self.bits;
        let blob = self.block / per_byte;
        let mut b = vec![0u8; self.n * blocks * blob];
        for col in 0..self.n {
            for kk in 0..blocks * self.block {
                let g = col * blocks + kk / self.block;
                let code = if kk < self.k { self.codes[col * self.k + kk] } else { self.zeros[g] };
                let byte = col * blocks * blob + kk / per_byte;
                b[byte] |= code << ((kk % per_byte) * self.bits);
            }
        }
        let zb = (blocks * self.bits).div_ceil(8);
        let mut z = vec![0u8; self.n * zb];
        for col in 0..self.n {
            for g in 0..blocks {
                z[col * zb + g / per_byte] |= self.zeros[col * blocks + g] << ((g % per_byte) * self.bits);
            }
        }
        (b, z)
    }
}

/// Scale and zero point of one block of values for `bits`-bit asymmetric codes.
pub fn group_params(values: impl Iterator<Item = f32>, bits: usize) -> (f32, u8) {
    let (lo, hi) = values.fold((0f32, 0f32), |(lo, hi), v| (lo.min(v), hi.max(v)));
    let (s, z) = asymmetric_params(lo, hi, 0, (1 << bits) - 1);
    (s, z as u8)
}

/// Round-to-nearest group-wise quantization of a row-major `[K, N]` weight.
pub fn quantize_groups(w: &[f32], k: usize, n: usize, bits: usize, block: usize) -> GroupWeight {
    let blocks = k.div_ceil(block);
    let qmax = (1 << bits) - 1;
    let mut gw = GroupWeight {
        k,
        n,
        bits,
        block,
        codes: vec![0; n * k],
        scales: vec![0.0; n * blocks],
        zeros: vec![0; n * blocks],
    };
    for col in 0..n {
        for g in 0..blocks {
            let rows = g * block..((g + 1) * block).min(k);
            let (s, z) = group_params(rows.clone().map(|r| w[r * n + col]), bits);
            gw.scales[col * blocks + g] = s;
            gw.zeros[col * blocks + g] = z;
            for r in rows {
                gw.codes[col * k + r] = quantize_value(w[r * n + col], s, z as i32, 0, qmax) as u8;
            }
        }
    }
    gw
}

/// Signal-to-quantization-noise ratio in dB: `10 log10(sum x^2 / sum (x - q)^2)` (infinite
/// when exact).
pub fn sqnr_db(reference: &[f32], approx: &[f32]) -> f64 {
    let signal: f64 = reference.iter().map(|&v| (v as f64).powi(2)).sum();
    let noise: f64 = reference.iter().zip(approx).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    if noise == 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn asymmetric_range_keeps_zero_exact() {
        // [0, 2.55] -> scale 0.01, zero 0; [-1, 1.55] over u8 -> scale 0.01, zero 100.
        assert_eq!(asymmetric_params(0.0, 2.55, 0, 255), (0.01, 0));
        let (s, z) = asymmetric_params(-1.0, 1.55, 0, 255);
        assert!((s - 0.01).abs() < 1e-9);
        assert_eq!(z, 100);
        // A positive-only range is widened to include 0.
        assert_eq!(asymmetric_params(1.0, 2.55, 0, 255).1, 0);
        assert_eq!(quantize_value(0.0, s, z, 0, 255), 100);
        assert_eq!(quantize_value(-1.0, s, z, 0, 255), 0);
    }

    #[test]
    fn per_channel_int8_weights_by_hand() {
        // K = 2, N = 2: column 0 absmax 1.27 -> scale 0.01; column 1 absmax 0.5 -> 0.5/127.
        let w = [1.27f32, -0.5, -0.63, 0.2];
        let q = quantize_int8_weight(&w, 2, Granularity::PerChannel);
        assert_eq!(q.scales[0], 0.01);
        assert_eq!(q.values, vec![127, -127, -63, 51]); // 0.2 * 254 = 50.8
        let t = quantize_int8_weight(&w, 2, Granularity::PerTensor);
        assert_eq!(t.scales, vec![0.01]);
        assert_eq!(t.values, vec![127, -50, -63, 20]);
        assert!(sqnr_db(&w, &q.dequantize()) > 40.0);
    }

    #[test]
    fn four_bit_groups_by_hand_and_packing() {
        // One column, K = 4, block 2: block [0, 1.5] -> scale 0.1, zero 0; block [-1.5, 0] -> zero 15.
        let w = [0.0f32, 1.5, -1.5, 0.0];
        let g = quantize_groups(&w, 4, 1, 4, 2);
        assert_eq!(g.zeros, vec![0, 15]);
        assert_eq!(g.codes, vec![0, 15, 0, 15]);
        assert_eq!(g.dequantize(), w.to_vec());
        let (b, z) = g.pack();
        assert_eq!(b, vec![0xf0, 0xf0]);
        assert_eq!(z, vec![0xf0]);
    }

    #[test]
    fn sqnr_of_known_noise() {
        // signal 4, noise 0.04 -> 20 dB.
        assert!((sqnr_db(&[2.0], &[1.8]) - 20.0).abs() < 1e-4);
        assert_eq!(sqnr_db(&[1.0], &[1.0]), f64::INFINITY);
    }
}

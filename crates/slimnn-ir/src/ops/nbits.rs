//! `MatMulNBits`: a matmul with a block-quantized constant weight, as ONNX Runtime's
//! `com.microsoft` contrib op defines it (4- or 8-bit codes, one scale and zero point per block
//! of `block_size` values along K).
//!
//! Layout (ONNX Runtime's): `B` is u8 `[N, blocks, block_size * bits / 8]` holding the
//! transposed weight (row `n` = output column `n`), codes packed low bits first along K;
//! `scales` is `[N * blocks]`; optional `zero_points` is u8 `[N * ceil(blocks * bits / 8)]`,
//! packed the same way per row; without it the zero point is `2^(bits-1)`.
//! `Y[.., n] = sum_k A[.., k] * (code[n, k] - zp[n, k / block_size]) * scale[n, k / block_size]`.

use super::util::{expect_inputs, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{DType, Dim, Tensor};

/// ONNX Runtime's `com.microsoft.MatMulNBits(A, B, scales[, zero_points])`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatMulNBits {
    /// Input features (A's last dim).
    pub k: usize,
    /// Output features.
    pub n: usize,
    /// Bits per code: 4 or 8.
    pub bits: usize,
    /// Values per block along K: a power of two, at least 16.
    pub block_size: usize,
}

impl MatMulNBits {
    /// Blocks per output column.
    pub fn blocks(&self) -> usize {
        self.k.div_ceil(self.block_size)
    }

    /// Bytes per block of codes.
    pub fn blob_bytes(&self) -> usize {
        self.block_size * self.bits / 8
    }

    /// Bytes of packed zero points per output column.
    pub fn zero_bytes_per_column(&self) -> usize {
        (self.blocks() * self.bits).div_ceil(8)
    }

    fn check_attrs(&self) -> IrResult<()> {
        let op = "MatMulNBits";
        if !matches!(self.bits, 4 | 8) {
            op_bail!(op, "bits must be 4 or 8, got {}", self.bits);
        }
        if self.block_size < 16 || !self.block_size.is_power_of_two() {
            op_bail!(op, "block_size must be a power of two of at least 16, got {}", self.block_size);
        }
        if self.k == 0 || self.n == 0 {
            op_bail!(op, "K and N must be positive, got K={} N={}", self.k, self.n);
        }
        Ok(())
    }

    /// The weight as f32 `[K, N]` (MatMul's layout), dequantized from the packed inputs.
    pub fn dequantize(&self, b: &[u8], scales: &[f32], zero_points: Option<&[u8]>) -> IrResult<Vec<f32>> {
        let op = "MatMulNBits";
        self.check_attrs()?;
        let (blocks, blob) = (self.blocks(), self.blob_bytes());
        if b.len() != self.n * blocks * blob {
            op_bail!(op, "B has {} bytes, expected {}", b.len(), self.n * blocks * blob);
        }
        if scales.len() != self.n * blocks {
            op_bail!(op, "scales has {} values, expected {}", scales.len(), self.n * blocks);
        }
        let zb = self.zero_bytes_per_column();
        if let Some(z) = zero_points {
            if z.len() != self.n * zb {
                op_bail!(op, "zero_points has {} bytes, expected {}", z.len(), self.n * zb);
            }
        }
        let default_zero = 1u32 << (self.bits - 1);
        let code = |bytes: &[u8], i: usize| -> u32 {
            match self.bits {
                4 => ((bytes[i / 2] >> ((i % 2) * 4)) & 0xf) as u32,
                _ => bytes[i] as u32,
            }
        };
        let mut w = vec![0f32; self.k * self.n];
        for col in 0..self.n {
            let codes = &b[col * blocks * blob..][..blocks * blob];
            for blk in 0..blocks {
                let scale = scales[col * blocks + blk];
                let zero = zero_points.map_or(default_zero, |z| code(&z[col * zb..][..zb], blk)) as f32;
                for i in 0..self.block_size {
                    let kk = blk * self.block_size + i;
                    if kk >= self.k {
                        break;
                    }
                    w[kk * self.n + col] = (code(&codes[blk * blob..][..blob], i) as f32 - zero) * scale;
                }
            }
        }
        Ok(w)
    }
}

impl OpDef for MatMulNBits {
    fn name(&self) -> &'static str {
        "MatMulNBits"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 3, 4)?;
        self.check_attrs()?;
        let (a, b, scales) = (inputs[0], inputs[1], inputs[2]);
        if a.dtype != DType::F32 {
            op_bail!(op, "A must be f32, got {}", a.dtype);
        }
        if a.rank() < 1 {
            op_bail!(op, "A must have rank >= 1");
        }
        if let Dim::Known(k) = a.shape[a.rank() - 1] {
            if k != self.k {
                op_bail!(op, "A's last dim is {k}, but K is {}", self.k);
            }
        }
        let want_b = [self.n, self.blocks(), self.blob_bytes()];
        if b.dtype != DType::U8 || b.known_shape().is_some_and(|s| s != want_b) || b.rank() != 3 {
            op_bail!(op, "B must be u8 {want_b:?}, got {} {}", b.dtype, show_dims(&b.shape));
        }
        if scales.dtype != DType::F32 {
            op_bail!(op, "scales must be f32, got {}", scales.dtype);
        }
        if let Some(s) = scales.known_shape() {
            if s.iter().product::<usize>() != self.n * self.blocks() {
                op_bail!(op, "scales must hold N*blocks = {} values, got shape {s:?}", self.n * self.blocks());
            }
        }
        if let Some(z) = inputs.get(3) {
            if z.dtype != DType::U8 {
                op_bail!(op, "zero_points must be u8, got {}", z.dtype);
            }
        }
        let mut shape = a.shape.clone();
        let last = shape.len() - 1;
        shape[last] = Dim::Known(self.n);
        Ok(vec![Fact::new(DType::F32, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let facts: Vec<Fact> = inputs.iter().map(|t| Fact::known(t.dtype(), t.shape())).collect();
        self.output_facts(&facts.iter().collect::<Vec<_>>())?;
        let a = inputs[0].as_slice::<f32>()?;
        let zero = inputs.get(3).map(|z| z.as_slice::<u8>()).transpose()?;
        let w = self.dequantize(inputs[1].as_slice::<u8>()?, inputs[2].as_slice::<f32>()?, zero)?;
        let rows = a.len() / self.k;
        let mut y = vec![0f32; rows * self.n];
        let mut acc = vec![0f64; self.n];
        for (arow, yrow) in a.chunks_exact(self.k).zip(y.chunks_exact_mut(self.n)) {
            acc.iter_mut().for_each(|v| *v = 0.0);
            for (&av, wrow) in arow.iter().zip(w.chunks_exact(self.n)) {
                for (s, &wv) in acc.iter_mut().zip(wrow) {
                    *s += av as f64 * wv as f64;
                }
            }
            for (yv, s) in yrow.iter_mut().zip(&acc) {
                *yv = *s as f32;
            }
        }
        let mut shape = inputs[0].shape().to_vec();
        let last = shape.len() - 1;
        shape[last] = self.n;
        Ok(vec![Tensor::from_vec(shape, y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn four_bit_codes_unpack_low_nibble_first_with_default_and_given_zero_points() {
        // K = 16 (one block), N = 1: codes 0..15, byte i holds codes 2i (low) and 2i+1 (high).
        let op = MatMulNBits { k: 16, n: 1, bits: 4, block_size: 16 };
        let b: Vec<u8> = (0..8).map(|i| (2 * i) as u8 | (((2 * i + 1) as u8) << 4)).collect();
        let w = op.dequantize(&b, &[0.5], None).unwrap();
        let want: Vec<f32> = (0..16).map(|c| (c as f32 - 8.0) * 0.5).collect();
        assert_eq!(w, want);
        let w = op.dequantize(&b, &[2.0], Some(&[3])).unwrap();
        assert_eq!(w[0], -6.0);
        assert_eq!(w[15], 24.0);
        // A = ones: the output is the column sum of the weight.
        let a = Tensor::from_vec(vec![1, 16], vec![1f32; 16]).unwrap();
        let bt = Tensor::from_vec(vec![1, 1, 8], b).unwrap();
        let s = Tensor::from_vec(vec![1], vec![0.5f32]).unwrap();
        let y = op.eval(&[&a, &bt, &s]).unwrap();
        assert_eq!(y[0].as_slice::<f32>().unwrap(), &[want.iter().sum::<f32>()]);
    }

    #[test]
    fn rejects_bad_attributes_and_shapes() {
        let f = |s: &[usize], dt| Fact::known(dt, s);
        let op = MatMulNBits { k: 32, n: 2, bits: 4, block_size: 24 };
        let a = f(&[3, 32], DType::F32);
        let b = f(&[2, 1, 16], DType::U8);
        let s = f(&[2], DType::F32);
        assert!(op.output_facts(&[&a, &b, &s]).is_err());
        let op = MatMulNBits { block_size: 32, ..op };
        assert_eq!(op.output_facts(&[&a, &b, &s]).unwrap()[0], f(&[3, 2], DType::F32));
        let b_bad = f(&[2, 2, 16], DType::U8);
        assert!(op.output_facts(&[&a, &b_bad, &s]).is_err());
    }
}

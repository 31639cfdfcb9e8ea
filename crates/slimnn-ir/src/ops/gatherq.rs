//! `GatherBlockQuantized`: rows gathered from a block-quantized constant table and dequantized,
//! as ONNX Runtime's `com.microsoft` contrib op defines it for `gather_axis = 0`,
//! `quantize_axis = last` (embedding tables).
//!
//! Layout (ONNX Runtime's): `data` is u8 `[rows, cols * bits / 8]`, 4-bit codes packed low
//! nibble first; `scales` is `[rows, cols / block_size]` (f32 or f16: the output's type);
//! optional `zero_points` is u8 `[rows, ceil(blocks * bits / 8)]`, packed the same way; without
//! it the zero point is `2^(bits-1)`. `y[.., c] = (code[id, c] - zp[id, c / block]) * scale[id, c / block]`.

use super::util::{expect_inputs, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{DType, Dim, Tensor};

/// ONNX Runtime's `com.microsoft.GatherBlockQuantized(data, indices, scales[, zero_points])`
/// along axis 0, quantized along the last axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherBlockQuantized {
    /// Bits per code: 4 or 8.
    pub bits: usize,
    /// Values per block along a row: a power of two, at least 16.
    pub block_size: usize,
}

impl GatherBlockQuantized {
    const OP: &'static str = "GatherBlockQuantized";

    fn check_attrs(&self) -> IrResult<()> {
        if !matches!(self.bits, 4 | 8) {
            op_bail!(Self::OP, "bits must be 4 or 8, got {}", self.bits);
        }
        if self.block_size < 16 || !self.block_size.is_power_of_two() {
            op_bail!(Self::OP, "block_size must be a power of two of at least 16, got {}", self.block_size);
        }
        Ok(())
    }

    /// Values per row of the table, from `data`'s byte width.
    fn cols(&self, bytes: usize) -> usize {
        bytes * 8 / self.bits
    }

    /// Code `i` of a packed row.
    fn code(&self, row: &[u8], i: usize) -> u8 {
        match self.bits {
            4 => (row[i / 2] >> ((i % 2) * 4)) & 0xf,
            _ => row[i],
        }
    }

    /// Dequantizes table row `r` into `out` (`cols` values); `scale(i)` is the i-th scale of
    /// the table (row-major `[rows, blocks]`).
    pub fn dequantize_row(
        &self,
        data: &[u8],
        scale: impl Fn(usize) -> f32,
        zeros: Option<&[u8]>,
        r: usize,
        out: &mut [f32],
    ) {
        let cols = out.len();
        let blocks = cols.div_ceil(self.block_size);
        let row = &data[r * cols * self.bits / 8..][..cols * self.bits / 8];
        let zb = (blocks * self.bits).div_ceil(8);
        for (b, chunk) in out.chunks_mut(self.block_size).enumerate() {
            let zero = zeros.map_or(1u8 << (self.bits - 1), |z| self.code(&z[r * zb..][..zb], b)) as f32;
            let s = scale(r * blocks + b);
            let first = b * self.block_size;
            if self.bits == 8 {
                for (o, &q) in chunk.iter_mut().zip(&row[first..]) {
                    *o = (q as f32 - zero) * s;
                }
            } else {
                // Blocks are even-sized, so a block starts on a byte.
                for (pair, &q) in chunk.chunks_mut(2).zip(&row[first / 2..]) {
                    pair[0] = ((q & 0xf) as f32 - zero) * s;
                    if let Some(hi) = pair.get_mut(1) {
                        *hi = ((q >> 4) as f32 - zero) * s;
                    }
                }
            }
        }
    }
}

impl OpDef for GatherBlockQuantized {
    fn name(&self) -> &'static str {
        Self::OP
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = Self::OP;
        expect_inputs(op, inputs, 3, 4)?;
        self.check_attrs()?;
        let (data, ids, scales) = (inputs[0], inputs[1], inputs[2]);
        if data.dtype != DType::U8 || data.rank() != 2 {
            op_bail!(op, "data must be u8 [rows, cols * bits / 8], got {data}");
        }
        if !matches!(ids.dtype, DType::I64 | DType::I32) {
            op_bail!(op, "indices must be i64 or i32, got {}", ids.dtype);
        }
        if !matches!(scales.dtype, DType::F32 | DType::F16) || scales.rank() != 2 {
            op_bail!(op, "scales must be f32 or f16 [rows, blocks], got {scales}");
        }
        let cols = match &data.shape[1] {
            Dim::Known(b) => Dim::Known(self.cols(*b)),
            d => d.clone(),
        };
        if let (Some(d), Some(s)) = (data.known_shape(), scales.known_shape()) {
            let blocks = self.cols(d[1]).div_ceil(self.block_size);
            if s != [d[0], blocks] {
                op_bail!(op, "scales must be [{}, {blocks}] for data {}, got {s:?}", d[0], show_dims(&data.shape));
            }
            if let Some(z) = inputs.get(3) {
                let zb = (blocks * self.bits).div_ceil(8);
                if z.dtype != DType::U8 || z.known_shape().is_some_and(|zs| zs != [d[0], zb]) {
                    op_bail!(op, "zero_points must be u8 [{}, {zb}], got {z}", d[0]);
                }
            }
        }
        let mut dims = ids.shape.clone();
        dims.push(cols);
        Ok(vec![Fact::new(scales.dtype, dims)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = Self::OP;
        let facts: Vec<Fact> = inputs.iter().map(|t| Fact::known(t.dtype(), t.shape())).collect();
        self.output_facts(&facts.iter().collect::<Vec<_>>())?;
        let (data, ids, scales) = (inputs[0], inputs[1], inputs[2]);
        let rows = data.shape()[0];
        let cols = self.cols(data.shape()[1]);
        // Only the gathered rows' scales are read (the table can have millions).
        let (s32, s16) = match scales.dtype() {
            DType::F32 => (Some(scales.as_slice::<f32>()?), None),
            _ => (None, Some(scales.as_slice::<slimnn_tensor::f16>()?)),
        };
        let scale = |i: usize| s32.map_or_else(|| s16.map_or(0.0, |s| s[i].to_f32()), |s| s[i]);
        let zeros = inputs.get(3).map(|z| z.as_slice::<u8>()).transpose()?;
        let bytes = data.as_slice::<u8>()?;
        let ids: Vec<i64> = match ids.dtype() {
            DType::I64 => ids.as_slice::<i64>()?.to_vec(),
            _ => ids.as_slice::<i32>()?.iter().map(|&v| v as i64).collect(),
        };
        let mut y = vec![0f32; ids.len() * cols];
        for (&id, out) in ids.iter().zip(y.chunks_exact_mut(cols.max(1))) {
            // Negative indices count from the end, as Gather's.
            let r = if id < 0 { id + rows as i64 } else { id };
            if r < 0 || r >= rows as i64 {
                op_bail!(op, "index {id} is outside the table of {rows} rows");
            }
            self.dequantize_row(bytes, scale, zeros, r as usize, out);
        }
        let mut shape = inputs[1].shape().to_vec();
        shape.push(cols);
        let y = Tensor::from_vec(shape, y)?;
        // Products of a code and an f16 scale are rounded to f16, as ONNX Runtime computes them.
        Ok(vec![if scales.dtype() == DType::F32 { y } else { y.cast(scales.dtype())? }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dequantizes_packed_rows_with_and_without_zero_points() {
        // 2 rows of 32 values, 4-bit codes c = (r * 32 + i) % 16, blocks of 16.
        let codes: Vec<u8> = (0..64).map(|i| (i % 16) as u8).collect();
        let data: Vec<u8> = codes.chunks(2).map(|p| p[0] | (p[1] << 4)).collect();
        let data = Tensor::from_vec(vec![2, 16], data).unwrap();
        let scales = Tensor::from_vec(vec![2, 2], vec![0.5f32, 1.0, 2.0, 4.0]).unwrap();
        let zeros = Tensor::from_vec(vec![2, 1], vec![0x31u8, 0x02]).unwrap();
        let ids = Tensor::from_vec(vec![1, 2], vec![1i64, 0]).unwrap();
        let op = GatherBlockQuantized { bits: 4, block_size: 16 };
        let y = op.eval(&[&data, &ids, &scales, &zeros]).unwrap().remove(0);
        assert_eq!(y.shape(), &[1, 2, 32]);
        let y = y.as_slice::<f32>().unwrap();
        // Row 1, block 0: zero 2, scale 2; row 0 block 1: zero 3, scale 1.
        assert_eq!(y[5], (5.0 - 2.0) * 2.0);
        assert_eq!(y[32 + 16 + 4], (4.0 - 3.0) * 1.0);
        // Without zero points: 8.
        let y = op.eval(&[&data, &ids, &scales]).unwrap().remove(0);
        assert_eq!(y.as_slice::<f32>().unwrap()[32], (0.0 - 8.0) * 0.5);
        // f16 scales give an f16 output.
        let s16 = scales.cast(DType::F16).unwrap();
        assert_eq!(op.eval(&[&data, &ids, &s16]).unwrap()[0].dtype(), DType::F16);
    }

    #[test]
    fn rejects_bad_shapes_and_indices() {
        let op = GatherBlockQuantized { bits: 8, block_size: 16 };
        let data = Tensor::from_vec(vec![2, 32], vec![0u8; 64]).unwrap();
        let bad_scales = Tensor::from_vec(vec![2, 3], vec![1f32; 6]).unwrap();
        let ids = Tensor::from_vec(vec![1], vec![0i64]).unwrap();
        assert!(op.eval(&[&data, &ids, &bad_scales]).unwrap_err().to_string().contains("scales"));
        let scales = Tensor::from_vec(vec![2, 2], vec![1f32; 4]).unwrap();
        let far = Tensor::from_vec(vec![1], vec![2i64]).unwrap();
        assert!(op.eval(&[&data, &far, &scales]).unwrap_err().to_string().contains("outside"));
        assert!(GatherBlockQuantized { bits: 3, block_size: 16 }.eval(&[&data, &ids, &scales]).is_err());
    }
}

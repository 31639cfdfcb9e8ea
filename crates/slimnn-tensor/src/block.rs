//! Block-quantized formats (ggml style): a block of `block_len` values stored in
//! `block_bytes` bytes. Every format is one struct implementing [`BlockFormat`] and one row
//! in [`block_format`].

use crate::f16;

/// Identifies a block format; the table in [`block_format`] maps it to its implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    Q8_0,
    Q4_0,
}

pub trait BlockFormat: Sync {
    fn name(&self) -> &'static str;
    /// Number of values in one block.
    fn block_len(&self) -> usize;
    /// Bytes one block occupies.
    fn block_bytes(&self) -> usize;
    /// Quantizes `src` (a multiple of `block_len` values) into `dst`.
    fn quantize(&self, src: &[f32], dst: &mut [u8]);
    /// Dequantizes `src` into `dst` (a multiple of `block_len` values).
    fn dequantize(&self, src: &[u8], dst: &mut [f32]);
    /// Dot product of quantized blocks `q` with float values `x`.
    fn dot(&self, q: &[u8], x: &[f32]) -> f32 {
        let mut tmp = vec![0f32; x.len()];
        self.dequantize(q, &mut tmp);
        tmp.iter().zip(x).map(|(a, b)| a * b).sum()
    }
}

/// The one table of block formats.
pub fn block_format(kind: BlockKind) -> &'static dyn BlockFormat {
    match kind {
        BlockKind::Q8_0 => &Q8_0,
        BlockKind::Q4_0 => &Q4_0,
    }
}

fn absmax(x: &[f32]) -> f32 {
    x.iter().fold(0f32, |m, v| m.max(v.abs()))
}

/// 32 values: f16 scale `d`, then 32 `i8`; `x = d * q`.
pub struct Q8_0;

impl BlockFormat for Q8_0 {
    fn name(&self) -> &'static str {
        "q8_0"
    }
    fn block_len(&self) -> usize {
        32
    }
    fn block_bytes(&self) -> usize {
        34
    }
    fn quantize(&self, src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.chunks_exact(32).zip(dst.chunks_exact_mut(34)) {
            let d = absmax(x) / 127.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for (o, v) in b[2..].iter_mut().zip(x) {
                *o = ((v * inv).round() as i8) as u8;
            }
        }
    }
    fn dequantize(&self, src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(34).zip(dst.chunks_exact_mut(32)) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            for (o, q) in y.iter_mut().zip(&b[2..]) {
                *o = d * (*q as i8) as f32;
            }
        }
    }
}

/// 32 values: f16 scale `d`, then 16 bytes of nibbles (low nibbles hold values 0..16,
/// high nibbles 16..32); `x = d * (q - 8)`.
pub struct Q4_0;

impl BlockFormat for Q4_0 {
    fn name(&self) -> &'static str {
        "q4_0"
    }
    fn block_len(&self) -> usize {
        32
    }
    fn block_bytes(&self) -> usize {
        18
    }
    fn quantize(&self, src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.chunks_exact(32).zip(dst.chunks_exact_mut(18)) {
            // Signed max (not abs max) so the extreme value maps to -8 exactly, as ggml does.
            let max = x.iter().fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
            let d = max / -8.0;
            let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
            b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for j in 0..16 {
                let lo = ((x[j] * inv + 8.5) as i32).clamp(0, 15) as u8;
                let hi = ((x[j + 16] * inv + 8.5) as i32).clamp(0, 15) as u8;
                b[2 + j] = lo | (hi << 4);
            }
        }
    }
    fn dequantize(&self, src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(18).zip(dst.chunks_exact_mut(32)) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            for j in 0..16 {
                y[j] = d * ((b[2 + j] & 0x0f) as i32 - 8) as f32;
                y[j + 16] = d * ((b[2 + j] >> 4) as i32 - 8) as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(kind: BlockKind, tol: f32) {
        let f = block_format(kind);
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 23) as f32 - 11.0) / 3.0).collect();
        let mut q = vec![0u8; 2 * f.block_bytes()];
        f.quantize(&x, &mut q);
        let mut y = vec![0f32; 64];
        f.dequantize(&q, &mut y);
        let amax = absmax(&x);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= tol * amax, "{a} vs {b}");
        }
        let dot_ref: f32 = y.iter().zip(&x).map(|(a, b)| a * b).sum();
        assert!((f.dot(&q, &x) - dot_ref).abs() < 1e-3);
    }

    #[test]
    fn q8_0_roundtrip() {
        roundtrip(BlockKind::Q8_0, 1.0 / 127.0);
    }

    #[test]
    fn q4_0_roundtrip() {
        // One step (amax / 8) at the clamped end opposite the signed max.
        roundtrip(BlockKind::Q4_0, 1.01 / 8.0);
    }
}

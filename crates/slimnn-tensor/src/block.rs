//! Block-quantized formats (ggml style): a block of `block_len` values stored in
//! `block_bytes` bytes. Every format is one struct implementing [`BlockFormat`] and one row
//! in [`block_format`].

use crate::f16;

/// Identifies a block format; the table in [`block_format`] maps it to its implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    Q8_0,
    Q4_0,
    Q4_1,
    Q4K,
    Q6K,
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
        BlockKind::Q4_1 => &Q4_1,
        BlockKind::Q4K => &Q4K,
        BlockKind::Q6K => &Q6K,
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

/// 32 values: f16 scale `d`, f16 minimum `m`, then 16 bytes of nibbles (low nibbles hold
/// values 0..16, high nibbles 16..32); `x = d * q + m`.
pub struct Q4_1;

impl BlockFormat for Q4_1 {
    fn name(&self) -> &'static str {
        "q4_1"
    }
    fn block_len(&self) -> usize {
        32
    }
    fn block_bytes(&self) -> usize {
        20
    }
    fn quantize(&self, src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.chunks_exact(32).zip(dst.chunks_exact_mut(20)) {
            let min = x.iter().copied().fold(f32::INFINITY, f32::min);
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
            b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            b[2..4].copy_from_slice(&f16::from_f32(min).to_le_bytes());
            for j in 0..16 {
                let lo = (((x[j] - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
                let hi = (((x[j + 16] - min) * inv + 0.5) as i32).clamp(0, 15) as u8;
                b[4 + j] = lo | (hi << 4);
            }
        }
    }
    fn dequantize(&self, src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(20).zip(dst.chunks_exact_mut(32)) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let m = f16::from_le_bytes([b[2], b[3]]).to_f32();
            for j in 0..16 {
                y[j] = d * (b[4 + j] & 0x0f) as f32 + m;
                y[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
            }
        }
    }
}

/// Scale and minimum (6 bits each) of sub-block `j` (0..8) of a Q4_K block, packed in 12 bytes
/// as ggml's `get_scale_min_k4`: sub-blocks 0..4 in the low 6 bits of bytes 0..4 and 4..8,
/// sub-blocks 4..8 in the nibbles of bytes 8..12 plus the top 2 bits of bytes 0..8.
fn q4k_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

/// 256 values ("K-quant"): f16 `d`, f16 `dmin`, 12 bytes of eight 6-bit (scale, min) pairs, then
/// 128 bytes of nibbles. Sub-block `j` of 32 values: `x = d * scale_j * q - dmin * min_j`; each
/// 64-value chunk takes the low nibbles of 32 bytes for its first sub-block, the high for its
/// second.
pub struct Q4K;

impl BlockFormat for Q4K {
    fn name(&self) -> &'static str {
        "q4_k"
    }
    fn block_len(&self) -> usize {
        256
    }
    fn block_bytes(&self) -> usize {
        144
    }
    fn quantize(&self, src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.chunks_exact(256).zip(dst.chunks_exact_mut(144)) {
            // Per sub-block: step and (non-negative) offset below zero.
            let mut steps = [0f32; 8];
            let mut mins = [0f32; 8];
            for (j, sub) in x.chunks_exact(32).enumerate() {
                let lo = sub.iter().copied().fold(0f32, f32::min);
                let hi = sub.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                steps[j] = (hi - lo) / 15.0;
                mins[j] = -lo;
            }
            let d = steps.iter().copied().fold(0f32, f32::max) / 63.0;
            let dmin = mins.iter().copied().fold(0f32, f32::max) / 63.0;
            let d = f16::from_f32(d).to_f32();
            let dmin = f16::from_f32(dmin).to_f32();
            let code = |v: f32, unit: f32| if unit > 0.0 { ((v / unit).round() as i32).clamp(0, 63) as u8 } else { 0 };
            let sc: Vec<u8> = steps.iter().map(|&s| code(s, d)).collect();
            let mn: Vec<u8> = mins.iter().map(|&m| code(m, dmin)).collect();
            b[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            b[2..4].copy_from_slice(&f16::from_f32(dmin).to_le_bytes());
            let s = &mut b[4..16];
            s.fill(0);
            for j in 0..4 {
                s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
                s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
                s[j + 8] = (sc[j + 4] & 0x0f) | ((mn[j + 4] & 0x0f) << 4);
            }
            let mut q = [0u8; 256];
            for (j, sub) in x.chunks_exact(32).enumerate() {
                let step = d * sc[j] as f32;
                let off = dmin * mn[j] as f32;
                let inv = if step > 0.0 { 1.0 / step } else { 0.0 };
                for (l, &v) in sub.iter().enumerate() {
                    q[j * 32 + l] = (((v + off) * inv).round() as i32).clamp(0, 15) as u8;
                }
            }
            for chunk in 0..4 {
                for l in 0..32 {
                    b[16 + chunk * 32 + l] = q[chunk * 64 + l] | (q[chunk * 64 + 32 + l] << 4);
                }
            }
        }
    }
    fn dequantize(&self, src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(144).zip(dst.chunks_exact_mut(256)) {
            let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
            let dmin = f16::from_le_bytes([b[2], b[3]]).to_f32();
            let scales = &b[4..16];
            for chunk in 0..4 {
                let qs = &b[16 + chunk * 32..16 + chunk * 32 + 32];
                let (s1, m1) = q4k_scale_min(2 * chunk, scales);
                let (s2, m2) = q4k_scale_min(2 * chunk + 1, scales);
                let (d1, o1) = (d * s1 as f32, dmin * m1 as f32);
                let (d2, o2) = (d * s2 as f32, dmin * m2 as f32);
                let out = &mut y[chunk * 64..chunk * 64 + 64];
                for l in 0..32 {
                    out[l] = d1 * (qs[l] & 0x0f) as f32 - o1;
                    out[l + 32] = d2 * (qs[l] >> 4) as f32 - o2;
                }
            }
        }
    }
}

/// 256 values ("K-quant"): 128 bytes of low nibbles `ql`, 64 bytes of high 2-bit pairs `qh`,
/// sixteen `i8` scales (one per 16 values), then f16 `d`; `x = d * scale * (q - 32)` with
/// 6-bit `q`. In each 128-value half, value `l + 32 * r` (r = 0..4) takes its low nibble from
/// `ql[l + 32 * (r % 2)]` (low nibble for r < 2, high otherwise) and its high bits from bits
/// `2r..2r+2` of `qh[l]`.
pub struct Q6K;

impl BlockFormat for Q6K {
    fn name(&self) -> &'static str {
        "q6_k"
    }
    fn block_len(&self) -> usize {
        256
    }
    fn block_bytes(&self) -> usize {
        210
    }
    fn quantize(&self, src: &[f32], dst: &mut [u8]) {
        for (x, b) in src.chunks_exact(256).zip(dst.chunks_exact_mut(210)) {
            let sub_scales: Vec<f32> = x.chunks_exact(16).map(|s| absmax(s) / 31.0).collect();
            let d = sub_scales.iter().copied().fold(0f32, f32::max) / 127.0;
            let d = f16::from_f32(d).to_f32();
            let sc: Vec<i8> = sub_scales
                .iter()
                .map(|&s| if d > 0.0 { ((s / d).round() as i32).clamp(-128, 127) as i8 } else { 0 })
                .collect();
            let mut q = [0u8; 256];
            for (i, (v, qv)) in x.iter().zip(q.iter_mut()).enumerate() {
                let step = d * sc[i / 16] as f32;
                let code = if step != 0.0 { (v / step).round() as i32 } else { 0 };
                *qv = (code.clamp(-32, 31) + 32) as u8;
            }
            let (ql, rest) = b.split_at_mut(128);
            let (qh, rest) = rest.split_at_mut(64);
            qh.fill(0);
            for half in 0..2 {
                let q = &q[half * 128..half * 128 + 128];
                let ql = &mut ql[half * 64..half * 64 + 64];
                let qh = &mut qh[half * 32..half * 32 + 32];
                for l in 0..32 {
                    ql[l] = (q[l] & 0x0f) | ((q[l + 64] & 0x0f) << 4);
                    ql[l + 32] = (q[l + 32] & 0x0f) | ((q[l + 96] & 0x0f) << 4);
                    qh[l] = (q[l] >> 4) | ((q[l + 32] >> 4) << 2) | ((q[l + 64] >> 4) << 4) | ((q[l + 96] >> 4) << 6);
                }
            }
            for (o, s) in rest[..16].iter_mut().zip(&sc) {
                *o = *s as u8;
            }
            rest[16..18].copy_from_slice(&f16::from_f32(d).to_le_bytes());
        }
    }
    fn dequantize(&self, src: &[u8], dst: &mut [f32]) {
        for (b, y) in src.chunks_exact(210).zip(dst.chunks_exact_mut(256)) {
            let d = f16::from_le_bytes([b[208], b[209]]).to_f32();
            for half in 0..2 {
                let ql = &b[half * 64..half * 64 + 64];
                let qh = &b[128 + half * 32..128 + half * 32 + 32];
                let sc = &b[192 + half * 8..192 + half * 8 + 8];
                let out = &mut y[half * 128..half * 128 + 128];
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i32 - 32;
                    let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                    out[l] = d * (sc[is] as i8) as f32 * q1 as f32;
                    out[l + 32] = d * (sc[is + 2] as i8) as f32 * q2 as f32;
                    out[l + 64] = d * (sc[is + 4] as i8) as f32 * q3 as f32;
                    out[l + 96] = d * (sc[is + 6] as i8) as f32 * q4 as f32;
                }
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
    fn q4_1_roundtrip() {
        roundtrip(BlockKind::Q4_1, 0.51 / 7.5);
    }

    #[test]
    fn q4_k_roundtrip() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        check_roundtrip(BlockKind::Q4K, &x, 0.12);
    }

    #[test]
    fn q6_k_roundtrip() {
        let x: Vec<f32> = (0..512).map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0).collect();
        check_roundtrip(BlockKind::Q6K, &x, 0.03);
    }

    fn check_roundtrip(kind: BlockKind, x: &[f32], tol: f32) {
        let f = block_format(kind);
        let mut q = vec![0u8; x.len() / f.block_len() * f.block_bytes()];
        f.quantize(x, &mut q);
        let mut y = vec![0f32; x.len()];
        f.dequantize(&q, &mut y);
        let amax = absmax(x);
        for (a, b) in x.iter().zip(&y) {
            assert!((a - b).abs() <= tol * amax, "{a} vs {b}");
        }
    }

    fn h(v: f32) -> [u8; 2] {
        f16::from_f32(v).to_le_bytes()
    }

    /// A Q4_1 block built by hand: d = 0.5, m = -1, nibbles (j, 15 - j).
    #[test]
    fn q4_1_hand_built_block() {
        let mut b = vec![];
        b.extend(h(0.5));
        b.extend(h(-1.0));
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let mut y = [0f32; 32];
        Q4_1.dequantize(&b, &mut y);
        for j in 0..16 {
            assert_eq!(y[j], 0.5 * j as f32 - 1.0);
            assert_eq!(y[j + 16], 0.5 * (15 - j) as f32 - 1.0);
        }
    }

    /// A Q4_K block built by hand: d = 1, dmin = 0.5; sub-block j has scale j + 1 and min j,
    /// except sub-block 7, whose scale 40 and min 33 need the high bits; every nibble is 3 in
    /// the low half of a byte and 5 in the high half.
    #[test]
    fn q4_k_hand_built_block() {
        let sc = [1u8, 2, 3, 4, 5, 6, 7, 40];
        let mn = [0u8, 1, 2, 3, 4, 5, 6, 33];
        let mut b = vec![];
        b.extend(h(1.0));
        b.extend(h(0.5));
        let mut s = [0u8; 12];
        for j in 0..4 {
            s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
            s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
            s[j + 8] = (sc[j + 4] & 15) | ((mn[j + 4] & 15) << 4);
        }
        b.extend(s);
        b.extend([3u8 | (5 << 4); 128]);
        let mut y = [0f32; 256];
        Q4K.dequantize(&b, &mut y);
        for (i, v) in y.iter().enumerate() {
            let j = i / 32;
            let q = if j % 2 == 0 { 3.0 } else { 5.0 };
            assert_eq!(*v, sc[j] as f32 * q - 0.5 * mn[j] as f32, "value {i}");
        }
    }

    /// A Q6_K block built by hand: d = 0.25, scale of sub-block s is s - 8; every 6-bit code is
    /// the value's index within its 32-value group plus 16 (low nibble and high bits both used).
    #[test]
    fn q6_k_hand_built_block() {
        let code = |i: usize| (i % 32 + 16) as u8;
        let mut ql = [0u8; 128];
        let mut qh = [0u8; 64];
        for half in 0..2 {
            for l in 0..32 {
                let q = |r: usize| code(half * 128 + l + 32 * r);
                ql[half * 64 + l] = (q(0) & 15) | ((q(2) & 15) << 4);
                ql[half * 64 + l + 32] = (q(1) & 15) | ((q(3) & 15) << 4);
                qh[half * 32 + l] = (q(0) >> 4) | ((q(1) >> 4) << 2) | ((q(2) >> 4) << 4) | ((q(3) >> 4) << 6);
            }
        }
        let mut b = vec![];
        b.extend(ql);
        b.extend(qh);
        b.extend((0..16i8).map(|s| (s - 8) as u8));
        b.extend(h(0.25));
        let mut y = [0f32; 256];
        Q6K.dequantize(&b, &mut y);
        for (i, v) in y.iter().enumerate() {
            let expected = 0.25 * ((i / 16) as f32 - 8.0) * (code(i) as f32 - 32.0);
            assert_eq!(*v, expected, "value {i}");
        }
    }

    #[test]
    fn q4_0_roundtrip() {
        // One step (amax / 8) at the clamped end opposite the signed max.
        roundtrip(BlockKind::Q4_0, 1.01 / 8.0);
    }
}

//! 8-bit depthwise convolution with requantized 8-bit output (`QLinearConv` with
//! `group == channels`), exact in i32.
//!
//! Each output is `sum_t w[t] * (x[t] - zx)` over the taps of its channel. With AVX-512 VNNI
//! and VBMI, `vpdpbusd` sums four taps of a kernel row per i32 lane: one `vpermb` turns a
//! padded input window into, for each of 16 outputs, the four bytes under four taps (any
//! stride up to 3, so strided convolutions need no column split), and the channel's four
//! weights are one broadcast dword. Taps go four at a time in row-major order, across kernel
//! rows where a window reaches (a 5x5 kernel: 7 groups instead of 10 row chunks of which 5
//! hold one tap); weights and the layout are packed once ([`DwPacked`]). The raw `sum w * x` is corrected by `zx * sum w` (the zero-point
//! border makes padding exact) and requantized in registers, as [`Requantize`] does.

use super::wx::Requantize;
use crate::gemm::Par;
use crate::KernelError;
use std::cell::RefCell;

/// One image's depthwise convolution: `c` channels of `h x w` in, `oh x ow` out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DwGeom {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    /// Top and left padding (the bottom and right follow from `oh`, `ow`).
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
}

impl DwGeom {
    fn taps(&self) -> usize {
        self.kh * self.kw
    }

    /// Padded rows and row length the outputs read.
    fn padded(&self) -> (usize, usize) {
        ((self.oh - 1) * self.sh + self.kh, (self.ow - 1) * self.sw + self.kw)
    }
}

/// Whether this host has the vector kernel (AVX-512 VNNI and VBMI, within the tier cap).
pub fn dw_kernel_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return super::QKernel::active_vector() == super::QKernel::Avx512Vnni
        && std::is_x86_feature_detected!("avx512vbmi")
        && std::is_x86_feature_detected!("avx512dq");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Most four-tap chunks a kernel may have (`kh * ceil(kw / 4)`: 8x8 kernels and beyond fit).
const MAX_CHUNKS: usize = 64;

/// Whether [`depthwise_u8`] takes `g`: strides up to 3 (a 16-output block's bytes fit one
/// 64-byte `vpermb`), at most [`MAX_CHUNKS`] four-tap chunks.
pub fn dw_supported(g: &DwGeom) -> bool {
    let sizes = g.sh >= 1 && g.kw >= 1 && g.kh >= 1 && g.oh >= 1 && g.ow >= 1;
    sizes && (1..=3).contains(&g.sw) && g.kh * g.kw.div_ceil(4) <= MAX_CHUNKS
}

thread_local! {
    /// A channel's padded plane.
    static PLANE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Bytes read past a padded plane's last row by the 64-byte loads.
const SLACK: usize = 64;

/// Four taps read by one `vpermb` + `vpdpbusd`: where the 64-byte window starts (from an
/// output block's first input) and, per output lane, the four bytes under the taps.
#[derive(Clone, Debug)]
struct Group {
    offset: usize,
    idx: [u8; 64],
    /// Tap indices (`ky * kw + kx`) of the four bytes; `None` pads the last group.
    taps: [Option<usize>; 4],
}

/// What every channel of a geometry shares: the tap groups and how outputs fill the vectors.
#[derive(Clone, Debug)]
struct Layout {
    g: DwGeom,
    /// Padded row length.
    pw: usize,
    groups: Vec<Group>,
    /// A vector holds 16 outputs of a row, or whole rows of `ow < 16` (as many as its 64-byte
    /// load reaches: outputs of consecutive rows are consecutive).
    rows_per_vec: usize,
    /// Outputs per vector row.
    cols: usize,
    /// Whether the vector kernel runs.
    vector: bool,
}

impl Layout {
    fn new(g: &DwGeom) -> Layout {
        let pw = g.padded().1;
        let (rows_per_vec, cols) = if g.ow < 16 {
            let mut r = 16 / g.ow;
            while r > 1 && (r - 1) * g.sh * pw + (g.ow - 1) * g.sw + 3 >= 64 {
                r -= 1;
            }
            (r, g.ow)
        } else {
            (1, 16)
        };
        // The farthest lane's first byte from the block's first input.
        let reach = (rows_per_vec - 1) * g.sh * pw + (cols - 1) * g.sw;
        let group = |taps: [Option<usize>; 4]| -> Option<Group> {
            let off = |t: usize| (t / g.kw) * pw + t % g.kw;
            let offset = taps.iter().flatten().map(|&t| off(t)).min()?;
            let rel = taps.map(|t| t.map_or(0, |t| off(t) - offset));
            if reach + rel.iter().max()? >= 64 {
                return None;
            }
            let idx = std::array::from_fn(|b| {
                let i = b / 4;
                if i >= rows_per_vec * cols {
                    0
                } else {
                    ((i / cols) * g.sh * pw + (i % cols) * g.sw + rel[b % 4]) as u8
                }
            });
            Some(Group { offset, idx, taps })
        };
        // Taps four at a time in row-major order, else four at a time within each kernel row
        // (which always fits: `rows_per_vec` was chosen for it).
        let taps = g.kh * g.kw;
        let flat: Option<Vec<Group>> = (0..taps.div_ceil(4))
            .map(|q| group(std::array::from_fn(|b| Some(4 * q + b).filter(|&t| t < taps))))
            .collect();
        let groups = flat.unwrap_or_else(|| {
            (0..g.kh)
                .flat_map(|ky| (0..g.kw.div_ceil(4)).map(move |j| (ky, j)))
                .map(|(ky, j)| {
                    let taps =
                        std::array::from_fn(|b| Some(4 * j + b).filter(|&kx| kx < g.kw).map(|kx| ky * g.kw + kx));
                    group(taps).expect("a kernel row's chunk fits the window")
                })
                .collect()
        });
        Layout { g: *g, pw, groups, rows_per_vec, cols, vector: dw_kernel_available() }
    }
}

/// A depthwise convolution's weights packed for one geometry: each channel's tap groups as
/// dwords of four i8 weights, and each channel's weight sum (for the input zero point).
#[derive(Clone, Debug)]
pub struct DwPacked {
    layout: Layout,
    /// `[c, kh * kw]` as given.
    w: Vec<i8>,
    /// `[c, groups]`.
    dwords: Vec<i32>,
    sums: Vec<i32>,
}

impl DwPacked {
    /// Packs `[c, kh * kw]` i8 weights (zero point 0) for `g`.
    pub fn new(g: &DwGeom, w: &[i8]) -> Result<DwPacked, KernelError> {
        if !dw_supported(g) {
            return Err(KernelError::shape("depthwise_u8", format!("unsupported geometry {g:?}")));
        }
        let taps = g.taps();
        if w.len() != g.c * taps {
            return Err(KernelError::shape("depthwise_u8", format!("{} weights for {g:?}", w.len())));
        }
        let layout = Layout::new(g);
        let mut dwords = Vec::with_capacity(g.c * layout.groups.len());
        for wc in w.chunks_exact(taps.max(1)) {
            for grp in &layout.groups {
                dwords.push(i32::from_le_bytes(grp.taps.map(|t| t.map_or(0, |t| wc[t] as u8))));
            }
        }
        let sums = w.chunks_exact(taps.max(1)).map(|wc| wc.iter().map(|&v| v as i32).sum()).collect();
        Ok(DwPacked { layout, w: w.to_vec(), dwords, sums })
    }
}

/// A depthwise convolution's 8-bit input: `[c, h, w]` bytes (`signed`: i8 bit patterns) and
/// its zero point.
#[derive(Clone, Copy, Debug)]
pub struct DwInput<'a> {
    pub data: &'a [u8],
    pub signed: bool,
    pub zero: i32,
}

/// `out[c] = requantize(sum_t w[c][t] * (x[c][t] - x.zero))`, weights `[c, kh * kw]` i8 with
/// zero point 0, output `[c, oh, ow]` (packs the weights, then [`depthwise_u8_packed`]).
pub fn depthwise_u8(
    g: &DwGeom,
    input: DwInput<'_>,
    w: &[i8],
    q: &Requantize<'_>,
    out: &mut [u8],
    par: Par<'_>,
) -> Result<(), KernelError> {
    depthwise_u8_packed(&DwPacked::new(g, w)?, input, q, out, par)
}

/// [`depthwise_u8`] with weights packed once ([`DwPacked::new`]).
pub fn depthwise_u8_packed(
    packed: &DwPacked,
    input: DwInput<'_>,
    q: &Requantize<'_>,
    out: &mut [u8],
    par: Par<'_>,
) -> Result<(), KernelError> {
    let DwInput { data: x, signed, zero: x_zero } = input;
    let (layout, g) = (&packed.layout, &packed.layout.g);
    let bad = |m: String| Err(KernelError::shape("depthwise_u8", m));
    let (plane, oplane, taps) = (g.h * g.w, g.oh * g.ow, g.taps());
    if x.len() != g.c * plane || out.len() != g.c * oplane {
        return bad(format!("{} inputs, {} outputs for {g:?}", x.len(), out.len()));
    }
    if q.multiplier.len() != g.c || q.bias.is_some_and(|b| b.len() != g.c) {
        return bad(format!("requantization for {} channels, not {}", q.multiplier.len(), g.c));
    }
    // i8 inputs shift to u8 (x ^ 0x80 = x + 128), and their zero point with them.
    let zx = if signed { x_zero + 128 } else { x_zero };
    if !(0..=255).contains(&zx) {
        return bad(format!("input zero point {x_zero}"));
    }
    let tasks = par.threads().min(g.c).min((g.c * oplane * taps).div_ceil(1 << 16)).max(1);
    let per = g.c.div_ceil(tasks);
    let out_ptr = out.as_mut_ptr() as usize;
    let ngroups = layout.groups.len();
    par.run_tasks(g.c.div_ceil(per), |t| {
        let channels = t * per..((t + 1) * per).min(g.c);
        PLANE.with(|p| {
            let mut scratch = p.borrow_mut();
            // The border is the zero point for every channel: filled once, interiors rewritten.
            let (rows, pw) = g.padded();
            scratch.clear();
            scratch.resize(rows * pw + SLACK, zx as u8);
            for c in channels {
                // SAFETY: tasks own disjoint channel ranges of `out`.
                let o = unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut u8).add(c * oplane), oplane) };
                pad_channel(g, &x[c * plane..(c + 1) * plane], signed, &mut scratch, layout.vector);
                #[cfg(target_arch = "x86_64")]
                if layout.vector {
                    let dwords = &packed.dwords[c * ngroups..(c + 1) * ngroups];
                    // SAFETY: the host has the features; `scratch` has `SLACK` bytes past its rows.
                    unsafe { x86::channel(layout, &scratch, zx * packed.sums[c], dwords, q, c, o) };
                    continue;
                }
                let _ = ngroups;
                channel_scalar(g, &scratch, zx, &packed.w[c * taps..(c + 1) * taps], q, c, o);
            }
        })
    });
    Ok(())
}

/// Writes the channel's plane into `scratch`, a padded plane (rows `padded().1` long, then
/// slack) whose border already holds the zero point.
fn pad_channel(g: &DwGeom, x: &[u8], signed: bool, scratch: &mut [u8], vector: bool) {
    let (rows, pw) = g.padded();
    let n = g.w.min(pw.saturating_sub(g.pl));
    let h = g.h.min(rows.saturating_sub(g.pt));
    #[cfg(target_arch = "x86_64")]
    if vector {
        // SAFETY: the vector kernel's features are on the host; the rows are in bounds.
        return unsafe { x86::copy_rows(&x[..h * g.w], g.w, &mut scratch[g.pt * pw + g.pl..], pw, n, signed) };
    }
    let _ = vector;
    for iy in 0..h {
        let dst = &mut scratch[(iy + g.pt) * pw + g.pl..][..n];
        let src = &x[iy * g.w..][..n];
        if signed {
            dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v ^ 0x80);
        } else {
            dst.copy_from_slice(src);
        }
    }
}

/// The portable loop (and reference): exact i32 sums, then [`Requantize::apply`].
fn channel_scalar(g: &DwGeom, padded: &[u8], zx: i32, w: &[i8], q: &Requantize<'_>, c: usize, out: &mut [u8]) {
    let pw = g.padded().1;
    for oy in 0..g.oh {
        for ox in 0..g.ow {
            let mut acc = 0i32;
            for ky in 0..g.kh {
                let row = &padded[(oy * g.sh + ky) * pw + ox * g.sw..];
                for kx in 0..g.kw {
                    acc += w[ky * g.kw + kx] as i32 * (row[kx] as i32 - zx);
                }
            }
            out[oy * g.ow + ox] = q.apply(c, acc);
        }
    }
}

/// Straight from the definition, for tests: unpadded input, taps outside it skipped.
pub fn reference_depthwise_u8(g: &DwGeom, input: DwInput<'_>, w: &[i8], q: &Requantize<'_>, out: &mut [u8]) {
    let DwInput { data: x, signed, zero: x_zero } = input;
    for c in 0..g.c {
        for oy in 0..g.oh {
            for ox in 0..g.ow {
                let mut acc = 0i64;
                for ky in 0..g.kh {
                    for kx in 0..g.kw {
                        let (iy, ix) =
                            ((oy * g.sh + ky) as isize - g.pt as isize, (ox * g.sw + kx) as isize - g.pl as isize);
                        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
                            continue;
                        }
                        let v = x[c * g.h * g.w + iy as usize * g.w + ix as usize];
                        let v = if signed { v as i8 as i64 } else { v as i64 };
                        acc += w[(c * g.kh + ky) * g.kw + kx] as i64 * (v - x_zero as i64);
                    }
                }
                out[(c * g.oh + oy) * g.ow + ox] = q.apply(c, acc as i32);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Layout, Requantize};
    use crate::qgemm::wx::{bias_fits, ZmmRequantize};
    use std::arch::x86_64::*;

    /// Rows of `n` bytes from `src` (stride `ls`) to `dst` (stride `ld`), flipping the top bit
    /// when `signed`, with masked 64-byte moves (short rows made a `memcpy` call each).
    ///
    /// # Safety
    /// AVX-512 F/BW on the host; `src.len()` a multiple of `ls`; `dst` long enough for as many
    /// rows of `n` at stride `ld`.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub(super) unsafe fn copy_rows(src: &[u8], ls: usize, dst: &mut [u8], ld: usize, n: usize, signed: bool) {
        let rows = src.len().checked_div(ls).unwrap_or(0);
        assert!(n <= ls && (rows == 0 || (rows - 1) * ld + n <= dst.len()));
        let flip = _mm512_set1_epi8(if signed { -128 } else { 0 });
        for r in 0..rows {
            let (s, d) = (src.as_ptr().add(r * ls), dst.as_mut_ptr().add(r * ld));
            let mut j = 0;
            while j < n {
                let m: __mmask64 = if n - j >= 64 { !0 } else { (1u64 << (n - j)) - 1 };
                let v = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, s.add(j) as *const _), flip);
                _mm512_mask_storeu_epi8(d.add(j) as *mut _, m, v);
                j += 64;
            }
        }
    }

    /// Independent accumulation chains in flight (`vpdpbusd` latency over its throughput).
    const CHAINS: usize = 4;

    /// Channel `c`: `dwords` its packed weights (one per tap group), `zx_sum_w` the input zero
    /// point times its weight sum.
    ///
    /// # Safety
    /// AVX-512 F/BW/DQ/VNNI/VBMI on the host; `padded` as `pad_channel` writes it (with slack).
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni,avx512vbmi")]
    pub(super) unsafe fn channel(
        l: &Layout,
        padded: &[u8],
        zx_sum_w: i32,
        dwords: &[i32],
        q: &Requantize<'_>,
        c: usize,
        out: &mut [u8],
    ) {
        let (g, pw) = (&l.g, l.pw);
        let (rows_per_vec, cols) = (l.rows_per_vec, l.cols);
        let bias = q.bias.map_or(0, |b| b[c]);
        // With the bias the sums fit i32 (`bias_fits`), or the bias is added in i64 (quantizers
        // saturate dead channels' biases near 2^31).
        let fits = bias_fits(bias, g.taps());
        let term = _mm512_set1_epi32(if fits { bias } else { 0 } - zx_sum_w);
        let wide_bias = _mm512_set1_epi64(bias as i64);
        let rq = ZmmRequantize::new(q, c, g.taps());
        // Output blocks (first row, first column), CHAINS at a time.
        let base = padded.as_ptr();
        let (mut oy, mut ox) = (0, 0);
        while oy < g.oh {
            let mut n = 0;
            let mut src = [base; CHAINS];
            let mut dst = [(0usize, 0u16); CHAINS];
            while n < CHAINS && oy < g.oh {
                src[n] = base.add(oy * g.sh * pw + ox * g.sw);
                let left = if rows_per_vec > 1 { rows_per_vec.min(g.oh - oy) * g.ow } else { (g.ow - ox).min(16) };
                dst[n] = (oy * g.ow + ox, if left == 16 { !0 } else { (1u16 << left) - 1 });
                n += 1;
                ox += cols;
                if ox >= g.ow {
                    (oy, ox) = (oy + rows_per_vec, 0);
                }
            }
            let mut acc = [_mm512_setzero_si512(); CHAINS];
            for (grp, &wd) in l.groups.iter().zip(dwords) {
                let wv = _mm512_set1_epi32(wd);
                let idx = _mm512_loadu_si512(grp.idx.as_ptr() as *const _);
                for k in 0..CHAINS {
                    let v = _mm512_permutexvar_epi8(idx, _mm512_loadu_si512(src[k].add(grp.offset) as *const _));
                    acc[k] = _mm512_dpbusd_epi32(acc[k], v, wv);
                }
            }
            for k in 0..n {
                let (at, mask) = dst[k];
                let sum = _mm512_add_epi32(acc[k], term);
                if fits {
                    rq.store(out.as_mut_ptr().add(at), mask, sum);
                } else {
                    // Each half widened to i64, the bias added, one rounding to f32.
                    let lo = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_castsi512_si256(sum)), wide_bias);
                    let hi = _mm512_add_epi64(_mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64::<1>(sum)), wide_bias);
                    let v =
                        _mm512_insertf32x8::<1>(_mm512_castps256_ps512(_mm512_cvtepi64_ps(lo)), _mm512_cvtepi64_ps(hi));
                    rq.store_rounded(out.as_mut_ptr().add(at), mask, v);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(s: &mut u64) -> u64 {
        *s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        *s >> 33
    }

    fn geom(c: usize, h: usize, w: usize, k: usize, s: usize, pad: usize) -> DwGeom {
        let (oh, ow) = ((h + 2 * pad - k) / s + 1, (w + 2 * pad - k) / s + 1);
        DwGeom { c, h, w, kh: k, kw: k, sh: s, sw: s, pt: pad, pl: pad, oh, ow }
    }

    /// Every shape family EfficientNet / MobileNet use, odd sizes around the 16-wide blocks,
    /// u8 and i8 inputs and outputs, biases at the limits: the kernel equals the reference.
    #[test]
    fn depthwise_matches_the_reference_exactly() {
        let mut s = 7u64;
        let cases = [
            geom(5, 7, 7, 3, 1, 1),
            geom(3, 17, 33, 3, 2, 1),
            geom(4, 14, 14, 5, 1, 2),
            geom(3, 29, 31, 5, 2, 2),
            geom(2, 9, 40, 3, 3, 1),
            geom(2, 6, 5, 7, 1, 3),
            geom(2, 1, 1, 1, 1, 0),
            geom(3, 13, 8, 3, 2, 1),
            DwGeom { c: 2, h: 8, w: 9, kh: 3, kw: 3, sh: 2, sw: 2, pt: 0, pl: 0, oh: 4, ow: 4 },
        ];
        for g in cases {
            for (signed, out_signed) in [(false, false), (true, true), (false, true)] {
                let x: Vec<u8> = (0..g.c * g.h * g.w).map(|_| lcg(&mut s) as u8).collect();
                let w: Vec<i8> = (0..g.c * g.taps()).map(|_| (lcg(&mut s) % 255) as i8).collect();
                // The last channel's multiplier would overflow the f32 -> i32 conversion unclamped.
                let mut multiplier: Vec<f32> = (0..g.c).map(|_| 1e-4 + (lcg(&mut s) % 100) as f32 * 3e-5).collect();
                multiplier[g.c - 1] = 1e5;
                // Channel 0's saturated bias lands mid-range: its i64 path is checked, not masked.
                multiplier[0] = 5e-8;
                let mut bias: Vec<i32> = (0..g.c).map(|_| (lcg(&mut s) % 20001) as i32 - 10000).collect();
                // Saturated biases (dead channels): added in i64.
                bias[0] = i32::MAX - 1;
                if g.c > 2 {
                    bias[1] = i32::MIN + 5;
                }
                let q = Requantize { multiplier: &multiplier, bias: Some(&bias), zero: 5, signed: out_signed };
                let x_zero = if signed { -3 } else { 131 };
                let mut want = vec![0u8; g.c * g.oh * g.ow];
                let input = DwInput { data: &x, signed, zero: x_zero };
                reference_depthwise_u8(&g, input, &w, &q, &mut want);
                for threads in [1, 2] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut got = vec![0u8; want.len()];
                    depthwise_u8(&g, input, &w, &q, &mut got, Par::Pool(&pool)).unwrap();
                    assert_eq!(got, want, "{g:?} signed {signed}/{out_signed}, {threads} threads");
                }
                // The portable loop on its own.
                let zx = if signed { x_zero + 128 } else { x_zero };
                let (rows, pw) = g.padded();
                let mut scratch = vec![zx as u8; rows * pw + SLACK];
                let oplane = g.oh * g.ow;
                for c in 0..g.c {
                    pad_channel(&g, &x[c * g.h * g.w..][..g.h * g.w], signed, &mut scratch, false);
                    let mut o = vec![0u8; oplane];
                    channel_scalar(&g, &scratch, zx, &w[c * g.taps()..][..g.taps()], &q, c, &mut o);
                    assert_eq!(o, want[c * oplane..][..oplane], "{g:?} scalar channel {c}");
                }
            }
        }
    }

    #[test]
    fn bad_arguments_are_errors() {
        let g = geom(2, 4, 4, 3, 1, 1);
        let q = Requantize { multiplier: &[1.0, 1.0], bias: None, zero: 0, signed: false };
        let mut out = vec![0u8; 32];
        assert!(depthwise_u8(&g, DwInput { data: &[0; 31], signed: false, zero: 0 }, &[0; 18], &q, &mut out, Par::Seq)
            .is_err());
        assert!(depthwise_u8(
            &g,
            DwInput { data: &[0; 32], signed: false, zero: 300 },
            &[0; 18],
            &q,
            &mut out,
            Par::Seq
        )
        .is_err());
        let q1 = Requantize { multiplier: &[1.0], ..q };
        assert!(depthwise_u8(
            &g,
            DwInput { data: &[0; 32], signed: false, zero: 0 },
            &[0; 18],
            &q1,
            &mut out,
            Par::Seq
        )
        .is_err());
        let wide = DwGeom { sw: 4, ..g };
        assert!(depthwise_u8(
            &wide,
            DwInput { data: &[0; 32], signed: false, zero: 0 },
            &[0; 18],
            &q,
            &mut out,
            Par::Seq
        )
        .is_err());
    }

    /// EfficientNet-Lite0's depthwise layers one by one (best of 20 runs, one thread):
    /// `cargo test --release -p slimnn-kernels --lib dw_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn dw_speed() {
        let layers = [
            (32, 112, 3, 1),
            (96, 112, 3, 2),
            (144, 56, 3, 1),
            (144, 56, 5, 2),
            (240, 28, 5, 1),
            (240, 28, 3, 2),
            (480, 14, 3, 1),
            (480, 14, 5, 1),
            (672, 14, 5, 1),
            (672, 14, 5, 2),
            (1152, 7, 5, 1),
            (1152, 7, 3, 1),
        ];
        let mut s = 3u64;
        let mut total = 0.0;
        for (c, hw, k, stride) in layers {
            let g = geom(c, hw, hw, k, stride, k / 2);
            let x: Vec<u8> = (0..c * hw * hw).map(|_| lcg(&mut s) as u8).collect();
            let w: Vec<i8> = (0..c * g.taps()).map(|_| (lcg(&mut s) % 255) as i8).collect();
            let multiplier = vec![1e-3f32; c];
            let q = Requantize { multiplier: &multiplier, bias: None, zero: 0, signed: false };
            let mut out = vec![0u8; c * g.oh * g.ow];
            let input = DwInput { data: &x, signed: false, zero: 128 };
            let packed = DwPacked::new(&g, &w).unwrap();
            let mut best = f64::INFINITY;
            for _ in 0..20 {
                let t = std::time::Instant::now();
                depthwise_u8_packed(&packed, input, &q, &mut out, Par::Seq).unwrap();
                best = best.min(t.elapsed().as_secs_f64());
            }
            total += best;
            let macs = (c * g.oh * g.ow * g.taps()) as f64;
            eprintln!("{c}x{hw}x{hw} k{k} s{stride}: {:.3} ms, {:.1} GMAC/s", best * 1e3, macs / best / 1e9);
        }
        eprintln!("total {:.3} ms", total * 1e3);
    }
}

//! Convolutions on channels-last (NHWC) activations.
//!
//! Between convolutions, CNN activations can stay `[h, w, c]` per image. A pointwise
//! convolution is then `Out[hw, c_out] = X[hw, c_in] · Wᵀ` with the weights as the GEMM's packed
//! operand (packed once at load, panels filled by `c_out`), where NCHW makes the activations the
//! operand packed on every call and leaves narrow edge panels on 14x14 and 7x7 planes. A
//! depthwise convolution gets one tap of `LANES` channels per vector
//! ([`slimnn_kernels::depthwise`]), and other `group == 1` convolutions gather pixel-major
//! columns for the same GEMM.
//!
//! [`channels_last`] picks, after lowering, the values that stay channels-last: outputs of
//! convolution steps that only convolutions (as input or residual) and global average pools
//! read. A convolution with any channels-last operand runs channels-last and converts its other
//! operands at the edges of the region (the model's NCHW input, an output read by other ops).

use super::{finish, split_clamp, ConvGeom, ConvKernel, ConvMethod, FUSED_BAND_BYTES};
use crate::plan::{Fusion, Kernel, Plan, Slot};
use crate::{Result, RuntimeError};
use rayon::prelude::*;
use slimnn_kernels::depthwise::{depthwise_nhwc, DwGeom};
use slimnn_kernels::direct::{conv_direct_nhwc, DirectGeom};
use slimnn_kernels::matmul::transpose_scaled;
use slimnn_kernels::{Epilogue, PackedB, Par};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ops::Range;
use std::sync::Arc;

/// How a convolution step runs channels-last: which of its tensors are NHWC (the others are
/// NCHW and converted) and its weights in the layout the NHWC kernels read.
#[derive(Debug)]
pub struct ChannelsLast {
    pub input: bool,
    pub residual: bool,
    pub output: bool,
    weights: Weights,
}

#[derive(Debug)]
enum Weights {
    /// `Wᵀ` as `[kh * kw * c_in, c_out]` (rows in `(ky, kx, ci)` order), packed.
    Packed(PackedB),
    /// Depthwise filters as `[kh, kw, c]`.
    Depthwise(Arc<[f32]>),
    /// Filters as `[c_in, kh, kw, c_out]`, for the direct kernel on NCHW input with few
    /// channels (a stem).
    Direct(Arc<[f32]>),
}

impl ChannelsLast {
    /// Whether the convolution runs the direct kernel (see [`Weights::Direct`]).
    pub(super) fn is_direct(&self) -> bool {
        matches!(self.weights, Weights::Direct(_))
    }
}

/// Input channels up to which a `group == 1` convolution on NCHW input runs the direct kernel
/// instead of im2col (each tap is a broadcast per pixel and `c_out` values of weights).
const DIRECT_MAX_C_IN: usize = 4;

thread_local! {
    /// An image's NHWC input, residual and output when the step converts them.
    static SCRATCH: RefCell<[Vec<f32>; 3]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new()]) };
}

impl ConvKernel {
    /// This kernel set to run channels-last with the given layouts; `None` for kernels with
    /// nothing channels-last.
    fn to_channels_last(&self, input: bool, residual: bool, output: bool) -> Result<Option<ConvKernel>> {
        if !(input || residual || output) {
            return Ok(None);
        }
        let then = match &self.then {
            // The fused depthwise conv reads the band this one writes, channels-last.
            Some(dw) => Some(Arc::new(dw.to_channels_last(true, false, true)?.expect("channels-last"))),
            None => None,
        };
        let weights = self.channels_last_weights(input)?;
        let mut k = self.clone();
        k.then = then;
        k.nhwc = Some(Arc::new(ChannelsLast { input, residual, output, weights }));
        Ok(Some(k))
    }

    /// The weights as the channels-last kernels read them; `input`: the input is channels-last.
    fn channels_last_weights(&self, input: bool) -> Result<Weights> {
        let g = &self.geom;
        let taps = g.kh * g.kw;
        Ok(match self.method {
            ConvMethod::Im2col if !input && g.c_in <= DIRECT_MAX_C_IN => {
                // `[c_out, c_in, kh, kw]` to `[c_in, kh, kw, c_out]`.
                let k = g.c_in * taps;
                let mut w = vec![0.0; k * g.c_out];
                for (co, filter) in self.weights.chunks(k).enumerate() {
                    for (i, &v) in filter.iter().enumerate() {
                        w[i * g.c_out + co] = v;
                    }
                }
                Weights::Direct(w.into())
            }
            ConvMethod::Depthwise => {
                let mut w = vec![0.0; taps * g.c_out];
                for (c, filter) in self.weights.chunks(taps).enumerate() {
                    for (t, &v) in filter.iter().enumerate() {
                        w[t * g.c_out + c] = v;
                    }
                }
                Weights::Depthwise(w.into())
            }
            ConvMethod::Pointwise | ConvMethod::Im2col => {
                let k = g.c_in * taps;
                let mut b = vec![0.0; k * g.c_out];
                for (co, filter) in self.weights.chunks(k).enumerate() {
                    for ci in 0..g.c_in {
                        for t in 0..taps {
                            b[(t * g.c_in + ci) * g.c_out + co] = filter[ci * taps + t];
                        }
                    }
                }
                Weights::Packed(PackedB::new(&b, k, g.c_out, g.c_out).map_err(RuntimeError::from)?)
            }
        })
    }

    /// One image, channels-last: NCHW operands converted in, the result converted out when
    /// the output is NCHW.
    pub(super) fn run_channels_last(
        &self,
        l: &ChannelsLast,
        x: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        par: bool,
    ) -> Result<()> {
        let g = &self.geom;
        let last = self.then.as_ref().map_or(g, |d| &d.geom);
        let tier = slimnn_kernels::cpu::tier();
        SCRATCH.with(|cell| {
            // A nested call on this thread (work stolen while waiting) gets its own buffers.
            let mut own = Default::default();
            let mut held = cell.try_borrow_mut();
            let [xs, rs, os] = held.as_deref_mut().unwrap_or(&mut own);
            let x =
                if l.input || self.method == ConvMethod::Im2col { x } else { to_nhwc(tier, x, g.c_in, g.h * g.w, xs)? };
            let r = match residual {
                Some(r) if !l.residual => Some(to_nhwc(tier, r, last.c_out, last.oh * last.ow, rs)?),
                r => r,
            };
            let o: &mut [f32] = if l.output {
                out
            } else {
                os.resize(out.len(), 0.0);
                os
            };
            match (&self.then, &l.weights) {
                (Some(dw), Weights::Packed(w)) => self.fused_nhwc(w, dw, x, o, par)?,
                (None, Weights::Packed(w)) if self.method == ConvMethod::Im2col => {
                    self.im2col_nhwc(w, x, l.input, r, o, par)?
                }
                (None, Weights::Packed(w)) => {
                    let mut ep = Epilogue::NONE.with_activation(self.activation);
                    if let Some(b) = &self.bias {
                        ep = ep.with_bias(b);
                    }
                    if let Some(r) = r {
                        ep = ep.with_residual(r, g.c_out);
                    }
                    let gp = if par { Par::Current } else { Par::Seq };
                    slimnn_kernels::gemm(g.oh * g.ow, x, w.k(), w, o, g.c_out, ep, gp)?;
                }
                (None, Weights::Depthwise(w)) => {
                    depthwise(self, w, &g.depthwise(), x, o, par)?;
                    finish(o, split_clamp(self.activation).1, r);
                }
                (None, Weights::Direct(w)) => self.direct_nhwc(w, x, r, o, par)?,
                (Some(_), Weights::Depthwise(_) | Weights::Direct(_)) => {
                    unreachable!("only pointwise convolutions fuse a depthwise one")
                }
            }
            if !l.output {
                let (c, hw) = (last.c_out, last.oh * last.ow);
                transpose_scaled(tier, os, c, hw, c, 1.0, out)?;
            }
            Ok(())
        })
    }

    /// A `group == 1` convolution on pixel-major im2col columns (`NHWC` input when `nhwc`, else
    /// NCHW), in bands of output rows whose columns stay in L2. With `par`, each thread
    /// gathers and multiplies its own bands: gathered whole and multiplied across threads, the
    /// gather ran on one core (EfficientNet's stem, then on im2col: 0.37 ms on one thread, 0.35
    /// on two).
    fn im2col_nhwc(
        &self,
        w: &PackedB,
        x: &[f32],
        nhwc: bool,
        residual: Option<&[f32]>,
        out: &mut [f32],
        par: bool,
    ) -> Result<()> {
        let g = &self.geom;
        let rows = per_task_rows(g.oh, par, (IM2COL_BAND_BYTES / (g.ow * w.k() * 4).max(1)).max(1));
        each_band(out, rows, g.ow * g.c_out, par, |oy0, o| {
            super::COLS.with(|cell| {
                // A nested call on this thread (work stolen while waiting) gets its own columns.
                let mut own = Vec::new();
                let mut held = cell.try_borrow_mut();
                let cols = held.as_deref_mut().unwrap_or(&mut own);
                let pixels = oy0 * g.ow..oy0 * g.ow + o.len() / g.c_out;
                im2col_pixel_major(g, x, nhwc, pixels.clone(), cols);
                let mut ep = Epilogue::NONE.with_activation(self.activation);
                if let Some(b) = &self.bias {
                    ep = ep.with_bias(b);
                }
                if let Some(r) = residual {
                    ep = ep.with_residual(&r[pixels.start * g.c_out..pixels.end * g.c_out], g.c_out);
                }
                slimnn_kernels::gemm(pixels.len(), cols, w.k(), w, o, g.c_out, ep, Par::Seq)?;
                Ok(())
            })
        })
    }

    /// This convolution on NCHW input `x` with the direct kernel (weights `w` as
    /// [`Weights::Direct`]), bands of output rows split over threads when `par`.
    fn direct_nhwc(&self, w: &[f32], x: &[f32], residual: Option<&[f32]>, out: &mut [f32], par: bool) -> Result<()> {
        let g = &self.geom;
        let ConvGeom { c_in, h, w: width, c_out, kh, kw, sh, sw, pt, pl, oh, ow } = *g;
        let dg = DirectGeom { c_in, h, w: width, c_out, kh, kw, sh, sw, pt, pl, oh, ow };
        let (clamp, rest) = split_clamp(self.activation);
        let bias = self.bias.as_deref();
        let tier = slimnn_kernels::cpu::tier();
        let row = ow * c_out;
        each_band(out, per_task_rows(oh, par, oh), row, par, |oy0, o| {
            let oy1 = oy0 + o.len() / row;
            conv_direct_nhwc(tier, &dg, x, w, bias, clamp, oy0..oy1, o)?;
            finish(o, rest, residual.map(|r| &r[oy0 * row..oy1 * row]));
            Ok(())
        })
    }

    /// This pointwise convolution then `dw`, channels-last, in bands of `dw`'s output rows
    /// (see [`ConvKernel::run_fused`]: the expanded band stays in L2). With `par`, each thread
    /// takes whole bands: split inside each band, the expansion's rows were written by one core
    /// and read by the other's depthwise rows, and two threads ran EfficientNet's first
    /// expanded block (16 -> 96 at 112x112, then 3x3 stride 2) in 1.1 ms against 0.58 on one.
    fn fused_nhwc(&self, w: &PackedB, dw: &ConvKernel, x: &[f32], out: &mut [f32], par: bool) -> Result<()> {
        let (g, d) = (&self.geom, &dw.geom);
        let Some(ChannelsLast { weights: Weights::Depthwise(dww), .. }) = dw.nhwc.as_deref() else {
            unreachable!("the fused depthwise conv is set channels-last with its pointwise one")
        };
        let fits = (FUSED_BAND_BYTES / (d.sh * d.w * d.c_in * 4).max(1)).max(1);
        let rows = per_task_rows(d.oh, par, fits);
        let mut ep = Epilogue::NONE.with_activation(self.activation);
        if let Some(b) = &self.bias {
            ep = ep.with_bias(b);
        }
        let rest = split_clamp(dw.activation).1;
        each_band(out, rows, d.ow * d.c_out, par, |oy0, o| {
            let oy1 = oy0 + o.len() / (d.ow * d.c_out);
            super::FUSED.with(|cell| {
                // A nested call on this thread (work stolen while waiting) gets its own buffer.
                let mut own = Vec::new();
                let mut held = cell.try_borrow_mut();
                let buf = held.as_deref_mut().unwrap_or(&mut own);
                let (top, ir0, ir1) = super::band_input_rows(d, oy0, oy1);
                let m = ir1.saturating_sub(ir0) * d.w;
                buf.resize(m * d.c_in, 0.0);
                if m > 0 {
                    let xb = &x[ir0 * g.w * g.c_in..][..m * g.c_in];
                    slimnn_kernels::gemm(m, xb, g.c_in, w, buf, g.c_out, ep, Par::Seq)?;
                }
                let mut bg = d.depthwise();
                (bg.h, bg.pt, bg.oh) = (ir1.saturating_sub(ir0), (ir0 as isize - top) as usize, oy1 - oy0);
                depthwise(dw, dww, &bg, buf, o, false)?;
                finish(o, rest, None);
                Ok(())
            })
        })
    }
}

/// Columns gathered per band of an im2col convolution: they stay in L2 for the GEMM.
const IM2COL_BAND_BYTES: usize = 256 << 10;

/// `band(first_row, out_rows)` on consecutive bands of `rows` output rows (`row` values each)
/// of `out`, on the pool's threads when `par` and there is more than one band.
fn each_band<F>(out: &mut [f32], rows: usize, row: usize, par: bool, band: F) -> Result<()>
where
    F: Fn(usize, &mut [f32]) -> Result<()> + Sync,
{
    let chunk = (rows * row).max(1);
    if par && chunk < out.len() {
        out.par_chunks_mut(chunk).enumerate().try_for_each(|(i, o)| band(i * rows, o))
    } else {
        out.chunks_mut(chunk).enumerate().try_for_each(|(i, o)| band(i * rows, o))
    }
}

/// Output rows per task when `oh` rows are split into bands of at most `most` rows: with `par`,
/// as many bands as a multiple of the thread count, so every thread gets the same number.
fn per_task_rows(oh: usize, par: bool, most: usize) -> usize {
    let oh = oh.max(1);
    let threads = if par { rayon::current_num_threads() } else { 1 };
    let bands = oh.div_ceil(most.clamp(1, oh)).next_multiple_of(threads).min(oh);
    oh.div_ceil(bands)
}

/// `k`'s depthwise convolution with filters `w` (`[kh, kw, c]`) over geometry `g` (all its output
/// rows into `out`), its activation's clamp applied; rows split over threads when `par`.
fn depthwise(k: &ConvKernel, w: &[f32], g: &DwGeom, x: &[f32], out: &mut [f32], par: bool) -> Result<()> {
    let tier = slimnn_kernels::cpu::tier();
    let clamp = split_clamp(k.activation).0;
    let bias = k.bias.as_deref();
    let row = g.ow * g.c;
    if !par || g.oh < 2 {
        return depthwise_nhwc(tier, g, x, w, bias, clamp, 0..g.oh, out).map_err(RuntimeError::from);
    }
    // One band per thread: with two per thread, 14 rows went 4 + 4 + 4 + 2 and one thread ran 8.
    each_band(out, per_task_rows(g.oh, true, g.oh), row, true, |r0, o| {
        depthwise_nhwc(tier, g, x, w, bias, clamp, r0..r0 + o.len() / row, o).map_err(RuntimeError::from)
    })
}

/// `x` (`[c, hw]`) transposed to `[hw, c]` in `buf`.
fn to_nhwc<'a>(
    tier: slimnn_kernels::CpuTier,
    x: &[f32],
    c: usize,
    hw: usize,
    buf: &'a mut Vec<f32>,
) -> Result<&'a [f32]> {
    buf.resize(x.len(), 0.0);
    transpose_scaled(tier, x, hw, c, hw, 1.0, buf)?;
    Ok(buf)
}

/// Pixel-major columns `[pixels, kh * kw * c_in]` (`(ky, kx, ci)` order, zeros for padding) for
/// the output pixels `pixels` (row-major over the plane) of `x`, NHWC when `nhwc`, else NCHW. A
/// pixel whose taps are all inside the image gathers them through one table of offsets from its
/// window's corner; border pixels check each tap.
fn im2col_pixel_major(g: &ConvGeom, x: &[f32], nhwc: bool, pixels: Range<usize>, cols: &mut Vec<f32>) {
    let (ci, k) = (g.c_in, g.kh * g.kw * g.c_in);
    cols.resize(pixels.len() * k, 0.0);
    // Element (c, iy, ix) is x[c * cs + (iy * w + ix) * ps].
    let (cs, ps) = if nhwc { (1, ci) } else { (g.h * g.w, 1) };
    let at = |c: usize, iy: usize, ix: usize| c * cs + (iy * g.w + ix) * ps;
    let mut table = Vec::with_capacity(k);
    for ky in 0..g.kh {
        for kx in 0..g.kw {
            table.extend((0..ci).map(|c| at(c, ky, kx)));
        }
    }
    let inside = |o: usize, s: usize, p: usize, kk: usize, n: usize| o * s >= p && o * s - p + kk <= n;
    for (p, col) in pixels.zip(cols.chunks_mut(k)) {
        let (oy, ox) = (p / g.ow, p % g.ow);
        if inside(oy, g.sh, g.pt, g.kh, g.h) && inside(ox, g.sw, g.pl, g.kw, g.w) {
            let corner = &x[at(0, oy * g.sh - g.pt, ox * g.sw - g.pl)..];
            col.iter_mut().zip(&table).for_each(|(d, &o)| *d = corner[o]);
            continue;
        }
        for ky in 0..g.kh {
            let iy = (oy * g.sh + ky) as isize - g.pt as isize;
            for kx in 0..g.kw {
                let ix = (ox * g.sw + kx) as isize - g.pl as isize;
                let dst = &mut col[(ky * g.kw + kx) * ci..][..ci];
                if iy < 0 || iy >= g.h as isize || ix < 0 || ix >= g.w as isize {
                    dst.fill(0.0);
                } else {
                    dst.iter_mut().enumerate().for_each(|(c, d)| *d = x[at(c, iy as usize, ix as usize)]);
                }
            }
        }
    }
}

/// Global average pool of channels-last images: `x` is images of `[hw, c]`, `out` one row of
/// `c` means per image.
pub fn global_average_pool_nhwc(x: &[f32], c: usize, out: &mut [f32]) -> Result<()> {
    if c == 0 || out.is_empty() || !out.len().is_multiple_of(c) || !x.len().is_multiple_of(out.len()) || x.is_empty() {
        return Err(super::shape_error(format!(
            "global average pool: {} values for {} outputs of {c} channels",
            x.len(),
            out.len()
        )));
    }
    let hw = x.len() / out.len();
    for (o, img) in out.chunks_mut(c).zip(x.chunks(hw * c)) {
        o.fill(0.0);
        for px in img.chunks(c) {
            o.iter_mut().zip(px).for_each(|(s, &v)| *s += v);
        }
        o.iter_mut().for_each(|v| *v /= hw as f32);
    }
    Ok(())
}

/// Runs the convolution steps of `plan` channels-last where that keeps values NHWC from one
/// convolution to the next (see the module docs), and reports the region.
pub(crate) fn channels_last(plan: &mut Plan) -> Result<()> {
    let mut readers: HashMap<Slot, Vec<(usize, usize)>> = HashMap::new();
    for (i, s) in plan.steps.iter().enumerate() {
        for (pos, &x) in s.inputs.iter().enumerate() {
            readers.entry(x).or_default().push((i, pos));
        }
    }
    let steps = &plan.steps;
    let nhwc = |slot: Slot, producer: &Kernel| -> bool {
        matches!(producer, Kernel::Conv(_))
            && !plan.outputs.contains(&slot)
            && readers.get(&slot).is_some_and(|rs| {
                rs.iter().all(|&(i, pos)| match &steps[i].kernel {
                    Kernel::Conv(_) => pos <= 1,
                    Kernel::GlobalAveragePool { .. } => pos == 0,
                    _ => false,
                })
            })
    };
    let channels_last: std::collections::HashSet<Slot> = plan
        .steps
        .iter()
        .filter(|s| s.outputs.len() == 1 && nhwc(s.outputs[0], &s.kernel))
        .map(|s| s.outputs[0])
        .collect();
    let mut names = vec![];
    for s in plan.steps.iter_mut() {
        let is = |slot: Option<&Slot>| slot.is_some_and(|x| channels_last.contains(x));
        match &s.kernel {
            Kernel::Conv(k) => {
                let (i, r, o) = (is(s.inputs.first()), is(s.inputs.get(1)), is(s.outputs.first()));
                if let Some(k) = k.to_channels_last(i, r, o)? {
                    s.kernel = Kernel::Conv(Arc::new(k));
                    names.push(s.name.clone());
                }
            }
            Kernel::GlobalAveragePool { .. } if is(s.inputs.first()) => {
                s.kernel = Kernel::GlobalAveragePool { channels_last: true };
                names.push(s.name.clone());
            }
            _ => {}
        }
    }
    if !names.is_empty() {
        plan.fusions.push(Fusion {
            kind: "channels_last".into(),
            note: format!("{} values stay NHWC between these steps", channels_last.len()),
            nodes: names,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::tests::{conv_attrs as attrs, values};
    use slimnn_kernels::Activation;

    /// Images `[c, hw]` as `[hw, c]`.
    fn nhwc(x: &[f32], c: usize, hw: usize) -> Vec<f32> {
        let mut y = vec![0.0; x.len()];
        for (img, out) in x.chunks(c * hw).zip(y.chunks_mut(c * hw)) {
            for ch in 0..c {
                for p in 0..hw {
                    out[p * c + ch] = img[ch * hw + p];
                }
            }
        }
        y
    }

    fn close(got: &[f32], want: &[f32], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((g - w).abs() <= 1e-5 * (1.0 + w.abs()), "{what} at {i}: {g} vs {w}");
        }
    }

    /// Runs `k` channels-last with every combination of operand layouts (and sequentially and
    /// threaded) against its NCHW run on two images.
    fn check(k: &ConvKernel, xs: [usize; 4], residual: bool, what: &str) {
        let g = k.then.as_ref().map_or(&k.geom, |d| &d.geom);
        let ys = [xs[0], g.c_out, g.oh, g.ow];
        let x = values(xs.iter().product(), 7);
        let r = values(ys.iter().product(), 8);
        let r = residual.then_some(&r[..]);
        let mut k = k.clone();
        k.residual = residual;
        let mut want = vec![0.0; ys.iter().product()];
        k.run(&x, r, &mut want, false).unwrap();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for (li, lr, lo) in (0..8).map(|b| (b & 1 != 0, b & 2 != 0, b & 4 != 0)) {
            let Some(cl) = k.to_channels_last(li, lr && residual, lo).unwrap() else { continue };
            let xin = if li { nhwc(&x, xs[1], xs[2] * xs[3]) } else { x.clone() };
            let rin = r.map(|r| if lr { nhwc(r, ys[1], ys[2] * ys[3]) } else { r.to_vec() });
            let want = if lo { nhwc(&want, ys[1], ys[2] * ys[3]) } else { want.clone() };
            for par in [false, true] {
                let mut got = vec![f32::NAN; want.len()];
                cl.run(&xin, rin.as_deref(), &mut got, par).unwrap();
                close(&got, &want, &format!("{what}: in {li} residual {lr} out {lo} par {par}"));
            }
            // One image on three threads: a batch runs image by image, so only a single image
            // splits its own rows between threads.
            let (xn, yn) = (xin.len() / xs[0], want.len() / xs[0]);
            let mut got = vec![f32::NAN; yn];
            pool.install(|| cl.run(&xin[..xn], rin.as_deref().map(|r| &r[..yn]), &mut got, true)).unwrap();
            close(&got, &want[..yn], &format!("{what}: one image in {li} residual {lr} out {lo} on 3 threads"));
        }
    }

    #[test]
    fn channels_last_convs_match_nchw() {
        // Pointwise, with a residual and with a narrow output.
        for (ci, co, hw) in [(16, 24, 9), (24, 144, 7), (40, 8, 5)] {
            let (xs, ys) = ([2, ci, hw, hw], [2, co, hw, hw]);
            let (w, b) = (values(co * ci, 1), values(co, 2));
            let mut k = ConvKernel::prepare(&attrs(1, 1, 0, 1), &xs, &[co, ci, 1, 1], &w, Some(&b), &ys).unwrap();
            k.activation = Activation::RELU6;
            check(&k, xs, false, &format!("pointwise {ci}->{co}"));
            k.activation = Activation::None;
            check(&k, xs, true, &format!("pointwise {ci}->{co} + residual"));
        }
        // im2col or, on NCHW input with few channels, the direct kernel: stems (3 channels,
        // stride 2), a 3x3 conv without bias, and 5 channels (always im2col).
        for (ci, co, hw, kk, s, p, bias) in [
            (3, 32, 17, 3, 2, 1, true),
            (3, 64, 23, 7, 2, 3, true),
            (4, 7, 8, 3, 1, 1, false),
            (5, 7, 8, 3, 1, 1, false),
        ] {
            let oh = (hw + 2 * p - kk) / s + 1;
            let (xs, ys) = ([2, ci, hw, hw], [2, co, oh, oh]);
            let (w, b) = (values(co * ci * kk * kk, 3), values(co, 4));
            let b = bias.then_some(&b[..]);
            let mut k = ConvKernel::prepare(&attrs(kk, s, p, 1), &xs, &[co, ci, kk, kk], &w, b, &ys).unwrap();
            let cl = k.to_channels_last(false, false, true).unwrap().unwrap();
            assert_eq!(cl.nhwc.as_deref().unwrap().is_direct(), ci <= DIRECT_MAX_C_IN, "{ci} input channels");
            assert_eq!(cl.name().contains("conv_direct"), ci <= DIRECT_MAX_C_IN);
            check(&k, xs, false, &format!("im2col {ci}->{co} {kk}x{kk} s{s}"));
            check(&k, xs, true, &format!("im2col {ci}->{co} {kk}x{kk} s{s} + residual"));
            k.activation = Activation::RELU6;
            check(&k, xs, false, &format!("im2col {ci}->{co} {kk}x{kk} s{s} relu6"));
        }
        // Depthwise: 3x3 and 5x5, stride 1 and 2, channels not a multiple of a vector.
        for (c, hw, kk, s, p) in [(32, 12, 3, 1, 1), (20, 11, 5, 2, 2), (17, 9, 5, 1, 2), (48, 14, 3, 2, 1)] {
            let oh = (hw + 2 * p - kk) / s + 1;
            let (xs, ys) = ([2, c, hw, hw], [2, c, oh, oh]);
            let (w, b) = (values(c * kk * kk, 5), values(c, 6));
            let mut k = ConvKernel::prepare(&attrs(kk, s, p, c), &xs, &[c, 1, kk, kk], &w, Some(&b), &ys).unwrap();
            k.activation = Activation::RELU6;
            check(&k, xs, false, &format!("depthwise {c} {kk}x{kk} s{s}"));
            k.activation = Activation::None;
            check(&k, xs, true, &format!("depthwise {c} {kk}x{kk} s{s} + residual"));
        }
        // A fused pointwise + depthwise pair.
        for (ci, ce, hw, kk, s, p) in [(4, 18, 34, 3, 2, 1), (3, 16, 32, 5, 1, 2)] {
            let oh = (hw + 2 * p - kk) / s + 1;
            let (xs, mid, ys) = ([2, ci, hw, hw], [2, ce, hw, hw], [2, ce, oh, oh]);
            let (w1, b1, w2, b2) = (values(ce * ci, 2), values(ce, 3), values(ce * kk * kk, 4), values(ce, 5));
            let mut pw = ConvKernel::prepare(&attrs(1, 1, 0, 1), &xs, &[ce, ci, 1, 1], &w1, Some(&b1), &mid).unwrap();
            let mut dw =
                ConvKernel::prepare(&attrs(kk, s, p, ce), &mid, &[ce, 1, kk, kk], &w2, Some(&b2), &ys).unwrap();
            pw.activation = Activation::RELU6;
            dw.activation = Activation::RELU6;
            assert!(pw.fuses_with(&dw));
            pw.then = Some(Arc::new(dw));
            check(&pw, xs, false, &format!("fused {ci}->{ce} {kk}x{kk} s{s}"));
        }
    }

    #[test]
    fn global_average_pool_nhwc_means_each_channel() {
        // Two images of 3 pixels x 2 channels.
        let x = [1.0, 10.0, 2.0, 20.0, 3.0, 30.0, -1.0, 0.5, -2.0, 0.5, -3.0, 0.5];
        let mut out = [0.0; 4];
        global_average_pool_nhwc(&x, 2, &mut out).unwrap();
        assert_eq!(out, [2.0, 20.0, -2.0, 0.5]);
        assert!(global_average_pool_nhwc(&x, 5, &mut out).is_err());
        assert!(global_average_pool_nhwc(&x[1..], 2, &mut out).is_err());
    }
}

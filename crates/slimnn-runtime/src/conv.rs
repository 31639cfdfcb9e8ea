//! 2-d f32 NCHW convolutions: pointwise (1x1) and general `group == 1` convolutions as GEMMs
//! (im2col for the latter), depthwise convolutions as a direct loop; bias, activation and a
//! residual are applied in the same pass. Also the global average pool.

use crate::{Result, RuntimeError};
use rayon::prelude::*;
use slimnn_ir::ops::{AutoPad, ConvAttrs};
use slimnn_kernels::matmul::{BatchedMatMul, MatMulDims};
use slimnn_kernels::{sgemm, Activation, Epilogue, PackedB, Par};
use std::cell::RefCell;
use std::sync::Arc;

mod blocked;
mod channels_last;

pub(crate) use channels_last::{channels_last, global_average_pool_nhwc};

/// How a convolution runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvMethod {
    /// 1x1, stride 1, no padding: `Out[c_out, hw] = W[c_out, c_in] · X[c_in, hw]`.
    Pointwise,
    /// `group == 1`: columns `[c_in * kh * kw, oh * ow]` then the same GEMM.
    Im2col,
    /// `group == c_in == c_out`: one filter per channel.
    Depthwise,
}

/// Geometry of a 2-d convolution on one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvGeom {
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    /// Top and left padding (bottom/right follow from the output size).
    pub pt: usize,
    pub pl: usize,
    pub oh: usize,
    pub ow: usize,
}

impl ConvGeom {
    /// This geometry as the depthwise kernels take it (`c_out` channels).
    pub fn depthwise(&self) -> slimnn_kernels::depthwise::DwGeom {
        let ConvGeom { c_out: c, h, w, kh, kw, sh, sw, pt, pl, oh, ow, .. } = *self;
        slimnn_kernels::depthwise::DwGeom { c, h, w, kh, kw, sh, sw, pt, pl, oh, ow }
    }
}

/// A lowered convolution: weights `[c_out, c_in / group * kh * kw]`, optional bias, activation
/// and residual (same shape as the output, added after the activation).
impl ConvGeom {
    /// The geometry of a 2-d NCHW convolution `x` (`[n, c_in, h, w]`) by weights `w_shape`
    /// (`[c_out, c_in / group, kh, kw]`) giving `y`, with the group's channels per filter and
    /// the group count; `None` for dilations, other ranks or inconsistent shapes.
    pub fn resolve(attrs: &ConvAttrs, x: &[usize], w_shape: &[usize], y: &[usize]) -> Option<(ConvGeom, usize, usize)> {
        let [_, c_in, h, w] = <[usize; 4]>::try_from(x).ok()?;
        let [c_out, cpg, kh, kw] = <[usize; 4]>::try_from(w_shape).ok()?;
        let [_, yc, oh, ow] = <[usize; 4]>::try_from(y).ok()?;
        if attrs.kernel_shape.as_ref().is_some_and(|k| k != &[kh, kw]) || attrs.dilations.iter().any(|&d| d != 1) {
            return None;
        }
        let (sh, sw) = match attrs.strides.as_slice() {
            [] => (1, 1),
            &[a, b] if a > 0 && b > 0 => (a, b),
            _ => return None,
        };
        // Begin pads from the output size, which shape inference already resolved.
        let total =
            |i: usize, o: usize, k: usize, s: usize| Some(((o.checked_sub(1)? * s + k) as i64 - i as i64).max(0));
        let (pt, pl) = match attrs.auto_pad {
            AutoPad::NotSet => match attrs.pads.as_slice() {
                [] => (0, 0),
                &[t, l, _, _] => (t, l),
                _ => return None,
            },
            AutoPad::Valid => (0, 0),
            AutoPad::SameUpper | AutoPad::SameLower => {
                let (th, tw) = (total(h, oh, kh, sh)?, total(w, ow, kw, sw)?);
                let up = attrs.auto_pad == AutoPad::SameUpper;
                let half = |t: i64| if up { t / 2 } else { (t + 1) / 2 } as usize;
                (half(th), half(tw))
            }
        };
        let group = attrs.group.max(1);
        if yc != c_out || c_in != cpg * group || oh == 0 || ow == 0 {
            return None;
        }
        Some((ConvGeom { c_in, h, w, c_out, kh, kw, sh, sw, pt, pl, oh, ow }, cpg, group))
    }
}

/// The convolutions of training graphs, `group == 1`: the forward op with run-time weights
/// (parameters as inputs) and its two gradients, all as im2col + batched GEMMs.
#[derive(Debug)]
pub struct ConvTrainKernel {
    pub geom: ConvGeom,
    pub op: ConvTrainOp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvTrainOp {
    /// Inputs `[x, w, bias?]`: `y_n = W · cols(x_n) (+ bias per channel)`.
    Forward { bias: bool },
    /// Inputs `[dy, w, x (shape only)]`: `dx_n = col2im(Wᵀ · dy_n)`.
    GradInput,
    /// Inputs `[x, dy, w (shape only)]`: `dw = Σ_n dy_n · cols(x_n)ᵀ`.
    GradWeight,
}

impl ConvTrainKernel {
    pub fn name(&self) -> String {
        match self.op {
            ConvTrainOp::Forward { bias: false } => "conv_im2col".into(),
            ConvTrainOp::Forward { bias: true } => "conv_im2col+bias".into(),
            ConvTrainOp::GradInput => "conv_grad_input".into(),
            ConvTrainOp::GradWeight => "conv_grad_weight".into(),
        }
    }

    /// `(ckk, ohw, images)` after checking the step's buffers.
    fn dims(&self, x_len: usize, dy_len: usize, w_len: usize) -> Result<(usize, usize, usize)> {
        let g = &self.geom;
        let (in_len, ckk, ohw) = (g.c_in * g.h * g.w, g.c_in * g.kh * g.kw, g.oh * g.ow);
        let images = x_len.checked_div(in_len).unwrap_or(0);
        if in_len == 0 || x_len != images * in_len || dy_len != images * g.c_out * ohw || w_len != g.c_out * ckk {
            return Err(shape_error(format!("{}: x {x_len}, dy {dy_len}, w {w_len} values for {g:?}", self.name())));
        }
        Ok((ckk, ohw, images))
    }

    /// Runs on the step's inputs into `out` (y, dx or dw).
    pub fn run(&self, ins: &[&[f32]], out: &mut [f32], par: bool) -> Result<()> {
        let g = &self.geom;
        let gp = if par { Par::Current } else { Par::Seq };
        let matmul = |spec: &BatchedMatMul, a: &[f32], b: &[f32], out: &mut [f32]| {
            slimnn_kernels::matmul::matmul(spec, a, b, out, Epilogue::NONE, gp).map_err(RuntimeError::from)
        };
        let dims = |m, k, n, a_trans, b_trans| MatMulDims { m, k, n, a_trans, b_trans };
        match self.op {
            ConvTrainOp::Forward { bias } => {
                let (x, w) = (ins[0], ins[1]);
                let (ckk, ohw, images) = self.dims(x.len(), out.len(), w.len())?;
                let cols = im2col_images(g, x, images, par);
                let spec = BatchedMatMul {
                    dims: dims(g.c_out, ckk, ohw, false, false),
                    batch_a: vec![],
                    batch_b: vec![images],
                    reduce: false,
                };
                matmul(&spec, w, &cols, out)?;
                if bias {
                    let b = ins[2];
                    if b.len() != g.c_out {
                        return Err(shape_error(format!("conv bias of {} values for {} channels", b.len(), g.c_out)));
                    }
                    for (plane, &bv) in out.chunks_exact_mut(ohw.max(1)).zip(b.iter().cycle()) {
                        plane.iter_mut().for_each(|v| *v += bv);
                    }
                }
            }
            ConvTrainOp::GradInput => {
                let (dy, w) = (ins[0], ins[1]);
                let (ckk, ohw, images) = self.dims(out.len(), dy.len(), w.len())?;
                let mut cols = vec![0.0; images * ckk * ohw];
                let spec = BatchedMatMul {
                    dims: dims(ckk, g.c_out, ohw, true, false),
                    batch_a: vec![],
                    batch_b: vec![images],
                    reduce: false,
                };
                matmul(&spec, w, dy, &mut cols)?;
                let in_len = g.c_in * g.h * g.w;
                let run = |(c, dx): (&[f32], &mut [f32])| col2im(g, c, dx);
                if par {
                    cols.par_chunks(ckk * ohw).zip(out.par_chunks_mut(in_len)).for_each(run);
                } else {
                    cols.chunks(ckk * ohw).zip(out.chunks_mut(in_len)).for_each(run);
                }
            }
            ConvTrainOp::GradWeight => {
                let (x, dy) = (ins[0], ins[1]);
                let (ckk, ohw, images) = self.dims(x.len(), dy.len(), out.len())?;
                let cols = im2col_images(g, x, images, par);
                let spec = BatchedMatMul {
                    dims: dims(g.c_out, ohw, ckk, false, true),
                    batch_a: vec![images],
                    batch_b: vec![images],
                    reduce: true,
                };
                matmul(&spec, dy, &cols, out)?;
            }
        }
        Ok(())
    }
}

/// Columns of every image, `[images, c_in * kh * kw, oh * ow]`.
fn im2col_images(g: &ConvGeom, x: &[f32], images: usize, par: bool) -> Vec<f32> {
    let (in_len, per) = (g.c_in * g.h * g.w, g.c_in * g.kh * g.kw * g.oh * g.ow);
    let mut cols = vec![0.0; images * per];
    let run = |(xi, c): (&[f32], &mut [f32])| im2col_into(g, xi, 0.0, c, false);
    if par {
        x.par_chunks(in_len).zip(cols.par_chunks_mut(per.max(1))).for_each(run);
    } else {
        x.chunks(in_len).zip(cols.chunks_mut(per.max(1))).for_each(run);
    }
    cols
}

/// The adjoint of [`im2col`]: `dx[ci][iy][ix] = Σ cols[(ci, ky, kx)][(oy, ox)]` over the taps
/// that read `(iy, ix)`; `dx` (one image) is overwritten.
fn col2im(g: &ConvGeom, cols: &[f32], dx: &mut [f32]) {
    let n = g.oh * g.ow;
    dx.fill(0.0);
    for ci in 0..g.c_in {
        let xc = &mut dx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let row = &cols[((ci * g.kh + ky) * g.kw + kx) * n..][..n];
                let (lo, hi) = valid_range(g.ow, g.w, g.sw, kx, g.pl);
                for oy in 0..g.oh {
                    let iy = (oy * g.sh + ky) as isize - g.pt as isize;
                    if iy < 0 || iy >= g.h as isize || lo >= hi {
                        continue;
                    }
                    let xr = &mut xc[iy as usize * g.w..][..g.w];
                    let crow = &row[oy * g.ow..][..g.ow];
                    let base = lo * g.sw + kx - g.pl;
                    for (j, &v) in crow[lo..hi].iter().enumerate() {
                        xr[base + j * g.sw] += v;
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct ConvKernel {
    pub geom: ConvGeom,
    pub method: ConvMethod,
    pub weights: Arc<[f32]>,
    pub bias: Option<Arc<[f32]>>,
    pub activation: Activation,
    pub residual: bool,
    /// Depthwise weights for the channel-blocked kernel (`blocked::suits`), packed at load.
    blocked: Option<Arc<[f32]>>,
    /// Pointwise weights transposed and packed at load for small planes, which run pixel-major
    /// (see [`ConvKernel::pointwise_pixel_major`]).
    pixel_major: Option<Arc<PackedB>>,
    /// A depthwise convolution of this pointwise convolution's output, run band by band on it
    /// (see [`ConvKernel::run_fused`]); the step's output is then the depthwise one.
    pub then: Option<Arc<ConvKernel>>,
    /// Set when the step runs channels-last ([`channels_last`]).
    nhwc: Option<Arc<channels_last::ChannelsLast>>,
}

/// Pointwise + depthwise pairs fuse when the expanded image is at least this large: smaller
/// ones come back from L2/L3 quickly, and the rows a band recomputes then cost more than the
/// round trip saves (EfficientNet-lite0, one thread: 96 x 112 x 112 (4.8 MB) 1.04 -> 0.80 ms
/// fused; 144 x 56 x 56 (1.8 MB) 0.46 -> 0.49 ms).
const FUSE_MIN_BYTES: usize = 3 << 20;

/// Expanded rows per band of a fused pointwise + depthwise pair, in bytes: the band stays in
/// L2 (2 MB a core here) between the GEMM that writes it and the depthwise pass that reads it.
const FUSED_BAND_BYTES: usize = 768 << 10;

/// Output planes up to this many pixels run pointwise convolutions pixel-major.
const PIXEL_MAJOR_MAX: usize = 64;

impl ConvKernel {
    pub fn name(&self) -> String {
        let mut s = self.own_name();
        if let Some(dw) = &self.then {
            s.push('>');
            s.push_str(&dw.own_name());
        }
        if self.nhwc.is_some() {
            s.push_str(" (nhwc)");
        }
        s
    }

    fn own_name(&self) -> String {
        let mut s = match self.method {
            ConvMethod::Pointwise => "conv1x1",
            ConvMethod::Im2col if self.nhwc.as_ref().is_some_and(|l| l.is_direct()) => "conv_direct",
            ConvMethod::Im2col => "conv_im2col",
            ConvMethod::Depthwise => "conv_depthwise",
        }
        .to_string();
        if self.bias.is_some() {
            s.push_str("+bias");
        }
        if self.activation != Activation::None {
            s.push_str(&format!("+{:?}", self.activation).to_lowercase());
        }
        if self.residual {
            s.push_str("+residual");
        }
        s
    }

    /// Builds the kernel for input `[n, c_in, h, w]`, weights `[c_out, c_in / group, kh, kw]`
    /// and the (known) output shape; `None` when the convolution is not one this module runs
    /// (dilations, other group counts, inconsistent shapes).
    pub fn prepare(
        attrs: &ConvAttrs,
        x: &[usize],
        w_shape: &[usize],
        weights: &[f32],
        bias: Option<&[f32]>,
        y: &[usize],
    ) -> Option<ConvKernel> {
        let (geom, cpg, group) = ConvGeom::resolve(attrs, x, w_shape, y)?;
        let ConvGeom { c_in, h, w, c_out, kh, kw, sh, sw, pt, pl, oh, ow } = geom;
        if weights.len() != c_out * cpg * kh * kw {
            return None;
        }
        let method = if group == 1 {
            if kh == 1 && kw == 1 && sh == 1 && sw == 1 && pt == 0 && pl == 0 && oh == h && ow == w {
                ConvMethod::Pointwise
            } else {
                ConvMethod::Im2col
            }
        } else if group == c_in && c_out == c_in && cpg == 1 {
            ConvMethod::Depthwise
        } else {
            return None;
        };
        if let Some(b) = bias {
            if b.len() != c_out {
                return None;
            }
        }
        let blocked = (method == ConvMethod::Depthwise && blocked::suits(&geom))
            .then(|| Arc::from(blocked::pack_weights(weights, c_out, kh * kw)));
        let pixel_major = (method == ConvMethod::Pointwise && oh * ow <= PIXEL_MAJOR_MAX)
            .then(|| PackedB::from_transposed(weights, c_in, c_out, c_in).ok().map(Arc::new))
            .flatten();
        Some(ConvKernel {
            geom,
            method,
            weights: Arc::from(weights),
            bias: bias.map(Arc::from),
            activation: Activation::None,
            residual: false,
            blocked,
            pixel_major,
            then: None,
            nhwc: None,
        })
    }

    /// Whether depthwise convolution `dw` can run fused on this one's output: this is a
    /// pointwise convolution on a large plane (small ones run pixel-major), `dw` a depthwise
    /// one on its output with planes wide enough for the per-plane kernels, neither with a
    /// residual.
    pub fn fuses_with(&self, dw: &ConvKernel) -> bool {
        let (g, d) = (&self.geom, &dw.geom);
        self.method == ConvMethod::Pointwise
            && self.pixel_major.is_none()
            && dw.method == ConvMethod::Depthwise
            && dw.blocked.is_none()
            && !self.residual
            && !dw.residual
            && (d.c_in, d.h, d.w) == (g.c_out, g.oh, g.ow)
    }

    /// Whether running a depthwise convolution fused on this one's output is worth it: the
    /// output image is large (see [`FUSE_MIN_BYTES`]).
    pub fn fusing_pays(&self) -> bool {
        let g = &self.geom;
        g.c_out * g.oh * g.ow * 4 >= FUSE_MIN_BYTES
    }

    /// Runs on `x` (`n` images), writing `out` (`n` outputs); `residual` as long as `out`.
    pub fn run(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [f32], par: bool) -> Result<()> {
        let g = &self.geom;
        let last = self.then.as_ref().map_or(g, |d| &d.geom);
        let (in_len, out_len) = (g.c_in * g.h * g.w, last.c_out * last.oh * last.ow);
        if in_len == 0 || out_len == 0 || !x.len().is_multiple_of(in_len) || out.len() != x.len() / in_len * out_len {
            return Err(shape_error(format!("conv: input of {} values for output of {}", x.len(), out.len())));
        }
        if residual.is_some_and(|r| r.len() != out.len()) || residual.is_some() != self.residual {
            return Err(shape_error("conv: residual does not match the output".into()));
        }
        let one = |i: usize, xi: &[f32], oi: &mut [f32], par: bool| -> Result<()> {
            let ri = residual.map(|r| &r[i * out_len..(i + 1) * out_len]);
            if let Some(l) = &self.nhwc {
                return self.run_channels_last(l, xi, ri, oi, par);
            }
            if let Some(dw) = &self.then {
                return self.run_fused(dw, xi, oi, par, FUSED_BAND_BYTES);
            }
            match self.method {
                ConvMethod::Pointwise => match &self.pixel_major {
                    Some(w) => self.pointwise_pixel_major(w, xi, ri, oi, par)?,
                    None => self.gemm(xi, ri, oi, par)?,
                },
                ConvMethod::Im2col => COLS.with(|c| {
                    let mut cols = c.borrow_mut();
                    im2col(g, xi, &mut cols, par);
                    self.gemm(&cols, ri, oi, par)
                })?,
                ConvMethod::Depthwise => self.depthwise(xi, ri, oi, par),
            }
            Ok(())
        };
        if par && x.len() / in_len > 1 {
            // A batch: one image per task, each sequential (splitting one image's small
            // products between threads scaled poorly).
            x.par_chunks(in_len)
                .zip(out.par_chunks_mut(out_len))
                .enumerate()
                .try_for_each(|(i, (xi, oi))| one(i, xi, oi, false))
        } else {
            x.chunks(in_len).zip(out.chunks_mut(out_len)).enumerate().try_for_each(|(i, (xi, oi))| one(i, xi, oi, par))
        }
    }

    /// `out = act(W · cols + bias) + residual`, the bias (one per output channel, a row of
    /// the product) added in the kernel's epilogue.
    fn gemm(&self, cols: &[f32], residual: Option<&[f32]>, out: &mut [f32], par: bool) -> Result<()> {
        let g = &self.geom;
        let (m, k, n) = (g.c_out, self.weights.len() / g.c_out, g.oh * g.ow);
        let mut ep = Epilogue::NONE.with_activation(self.activation);
        if let Some(b) = &self.bias {
            ep = ep.with_row_bias(b);
        }
        if let Some(r) = residual {
            ep = ep.with_residual(r, n);
        }
        let gp = if par { Par::Current } else { Par::Seq };
        sgemm(m, k, n, &self.weights, k, cols, n, out, n, ep, gp).map_err(RuntimeError::from)
    }

    /// This pointwise convolution then `dw` on one image, in bands of `dw`'s output rows: each
    /// band's input rows (with the rows its taps overlap, computed again for the next band) go
    /// through the GEMM into a buffer of about `band_bytes` that stays in cache, then through
    /// the depthwise kernel. The expanded activations (EfficientNet's first blocks: 96 x 112 x
    /// 112, 4.8 MB) never make the round trip through memory. Each value is computed exactly as
    /// the two kernels compute it one after the other.
    fn run_fused(&self, dw: &ConvKernel, x: &[f32], out: &mut [f32], par: bool, band_bytes: usize) -> Result<()> {
        let (g, d) = (&self.geom, &dw.geom);
        let (plane, oplane, taps) = (g.h * g.w, d.oh * d.ow, d.kh * d.kw);
        let band = (band_bytes / (d.sh * d.w * d.c_in * 4).max(1)).clamp(1, d.oh.max(1));
        let (clamp, rest) = split_clamp(dw.activation);
        let mut ep = Epilogue::NONE.with_activation(self.activation);
        if let Some(b) = &self.bias {
            ep = ep.with_row_bias(b);
        }
        let gp = if par { Par::Current } else { Par::Seq };
        let tier = slimnn_kernels::cpu::tier();
        FUSED.with(|cell| {
            // A nested call on this thread (work stolen while waiting) gets its own buffer.
            let mut own = Vec::new();
            let mut held = cell.try_borrow_mut();
            let buf = held.as_deref_mut().unwrap_or(&mut own);
            for oy0 in (0..d.oh).step_by(band) {
                let oy1 = (oy0 + band).min(d.oh);
                let (top, ir0, ir1) = band_input_rows(d, oy0, oy1);
                let n = ir1.saturating_sub(ir0) * d.w;
                buf.resize(d.c_in * n, 0.0);
                if n > 0 {
                    let xb = &x[ir0 * g.w..];
                    sgemm(g.c_out, g.c_in, n, &self.weights, g.c_in, xb, plane, buf, n, ep, gp)?;
                }
                let bg =
                    ConvGeom { h: ir1.saturating_sub(ir0), pt: (ir0 as isize - top) as usize, oh: oy1 - oy0, ..*d };
                let layout = DwLayout::new(&bg);
                let band_in: &[f32] = buf;
                let one = |c: usize, o: &mut [f32]| {
                    let o = &mut o[oy0 * d.ow..oy1 * d.ow];
                    let wc = &dw.weights[c * taps..(c + 1) * taps];
                    let b = dw.bias.as_ref().map_or(0.0, |b| b[c]);
                    depthwise_plane_on(tier, &layout, PlaneIn::F32(&band_in[c * n..(c + 1) * n]), wc, b, clamp, o);
                    finish(o, rest, None);
                };
                if par {
                    out.par_chunks_mut(oplane).enumerate().for_each(|(c, o)| one(c, o));
                } else {
                    out.chunks_mut(oplane).enumerate().for_each(|(c, o)| one(c, o));
                }
            }
            Ok(())
        })
    }

    /// A pointwise convolution on a small plane as `Out^T[hw, c_out] = X^T[hw, c_in] · W^T`:
    /// the weights are then the GEMM's packed operand (packed once, streamed once per run),
    /// and its N (= c_out) fills whole panels, where `W · X` with N = hw (49, 196) ends in a
    /// narrow edge panel that reads every weight row again for a few columns.
    fn pointwise_pixel_major(
        &self,
        w: &PackedB,
        x: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        par: bool,
    ) -> Result<()> {
        let g = &self.geom;
        let (ci, co, n) = (g.c_in, g.c_out, g.oh * g.ow);
        let (tier, transpose) = (w.tier(), slimnn_kernels::matmul::transpose_scaled);
        PIXELS.with(|p| {
            let (xt, ct) = &mut *p.borrow_mut();
            xt.resize(n * ci, 0.0);
            transpose(tier, x, n, ci, n, 1.0, xt)?;
            ct.resize(n * co, 0.0);
            let mut ep = Epilogue::NONE.with_activation(self.activation);
            if let Some(b) = &self.bias {
                ep = ep.with_bias(b);
            }
            let gp = if par { Par::Current } else { Par::Seq };
            slimnn_kernels::gemm(n, xt, ci, w, ct, co, ep, gp)?;
            transpose(tier, ct, co, n, co, 1.0, out)?;
            if let Some(r) = residual {
                out.iter_mut().zip(r).for_each(|(o, &r)| *o += r);
            }
            Ok(())
        })
    }

    fn depthwise(&self, x: &[f32], residual: Option<&[f32]>, out: &mut [f32], par: bool) {
        self.depthwise_on(slimnn_kernels::cpu::tier(), x, residual, out, par)
    }

    /// [`Self::depthwise`] on `tier`, which the host must support.
    fn depthwise_on(
        &self,
        tier: slimnn_kernels::CpuTier,
        x: &[f32],
        residual: Option<&[f32]>,
        out: &mut [f32],
        par: bool,
    ) {
        let g = self.geom;
        let (plane, oplane, taps) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
        let (clamp, rest) = split_clamp(self.activation);
        #[cfg(target_arch = "x86_64")]
        if let (Some(packed), slimnn_kernels::CpuTier::Avx512 | slimnn_kernels::CpuTier::Amx) = (&self.blocked, tier) {
            let one = |i: usize, o: &mut [f32]| {
                let c0 = i * blocked::BLOCK;
                let lanes = o.len() / oplane;
                let b = blocked::Block {
                    geom: &g,
                    x: &x[c0 * plane..(c0 + lanes) * plane],
                    w: &packed[i * taps * blocked::BLOCK..(i + 1) * taps * blocked::BLOCK],
                    bias: self.bias.as_ref().map(|b| &b[c0..c0 + lanes]),
                    clamp,
                    lanes,
                };
                // SAFETY: the tier says AVX-512 F is present.
                unsafe { blocked::run_block(&b, o) };
                for (c, oc) in o.chunks_mut(oplane).enumerate() {
                    let r = residual.map(|r| &r[(c0 + c) * oplane..(c0 + c + 1) * oplane]);
                    finish(oc, rest, r);
                }
            };
            let chunk = blocked::BLOCK * oplane;
            if par && out.len() >= 1 << 14 {
                out.par_chunks_mut(chunk).enumerate().for_each(|(i, o)| one(i, o));
            } else {
                out.chunks_mut(chunk).enumerate().for_each(|(i, o)| one(i, o));
            }
            return;
        }
        let layout = DwLayout::new(&g);
        let one = |c: usize, o: &mut [f32]| {
            let xc = &x[c * plane..(c + 1) * plane];
            let wc = &self.weights[c * taps..(c + 1) * taps];
            let b = self.bias.as_ref().map_or(0.0, |b| b[c]);
            depthwise_plane_on(tier, &layout, PlaneIn::F32(xc), wc, b, clamp, o);
            let r = residual.map(|r| &r[c * oplane..(c + 1) * oplane]);
            finish(o, rest, r);
        };
        if par && out.len() >= 1 << 15 {
            out.par_chunks_mut(oplane).enumerate().for_each(|(c, o)| one(c, o));
        } else {
            out.chunks_mut(oplane).enumerate().for_each(|(c, o)| one(c, o));
        }
    }
}

impl ConvKernel {
    /// One image of a depthwise convolution on 8-bit input (`signed`: i8 bits) centred on
    /// `zero` as each plane is padded (the border is the zero point, as `QLinearConv` pads).
    /// Channel `c`'s f32 sums (exact while small, see `QLinearConvKernel`) go to
    /// `finish(c, sums, out_plane)`, planes in parallel when `par`.
    pub fn depthwise_8bit(
        &self,
        x: &[u8],
        signed: bool,
        zero: i32,
        out: &mut [u8],
        finish: impl Fn(usize, &[f32], &mut [u8]) + Sync,
        par: bool,
    ) -> Result<()> {
        let g = self.geom;
        let (plane, oplane, taps) = (g.h * g.w, g.oh * g.ow, g.kh * g.kw);
        if self.method != ConvMethod::Depthwise || x.len() != g.c_in * plane || out.len() != g.c_out * oplane {
            return Err(shape_error(format!("depthwise: input of {} values for output of {}", x.len(), out.len())));
        }
        let layout = DwLayout::new(&g);
        let one = |c: usize, o: &mut [u8]| {
            let xc = &x[c * plane..(c + 1) * plane];
            let input = if signed { PlaneIn::I8(xc, zero as f32) } else { PlaneIn::U8(xc, zero as f32) };
            let wc = &self.weights[c * taps..(c + 1) * taps];
            SUMS.with(|s| {
                let mut own = Vec::new();
                let mut held = s.try_borrow_mut();
                let sums = held.as_deref_mut().unwrap_or(&mut own);
                sums.resize(oplane, 0.0);
                depthwise_plane(&layout, input, wc, 0.0, None, sums);
                finish(c, sums, o);
            })
        };
        if par && out.len() >= 1 << 15 {
            out.par_chunks_mut(oplane).enumerate().for_each(|(c, o)| one(c, o));
        } else {
            out.chunks_mut(oplane).enumerate().for_each(|(c, o)| one(c, o));
        }
        Ok(())
    }
}

thread_local! {
    /// One depthwise plane's f32 sums on 8-bit input.
    static SUMS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// A pixel-major pointwise convolution's transposed input and output.
    static PIXELS: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
    /// A fused pointwise + depthwise pair's band of expanded rows.
    static FUSED: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// im2col columns, reused across calls on each thread.
    static COLS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Depthwise padded planes, reused across channels on each thread, with the geometry of
    /// the last plane padded: the same geometry writes the same interior, so its zero border
    /// is still in place.
    static PADDED: RefCell<(Vec<f32>, Option<ConvGeom>)> = const { RefCell::new((Vec::new(), None)) };
}

/// The input rows `ir0..ir1` that output rows `oy0..oy1` of `d` read, and the (possibly
/// negative) row of the first one's top tap: rows above 0 and below `h` are the padding.
fn band_input_rows(d: &ConvGeom, oy0: usize, oy1: usize) -> (isize, usize, usize) {
    let top = (oy0 * d.sh) as isize - d.pt as isize;
    let ir1 = ((oy1 - 1) * d.sh + d.kh).saturating_sub(d.pt).min(d.h);
    (top, top.max(0) as usize, ir1)
}

fn shape_error(msg: String) -> RuntimeError {
    RuntimeError::Ir(slimnn_ir::IrError::Graph(msg))
}

/// Output columns `[lo, hi)` whose input column `ox * s + k - p` lies in `[0, w)`.
fn valid_range(ow: usize, w: usize, s: usize, k: usize, p: usize) -> (usize, usize) {
    // ox * s + k >= p  and  ox * s + k - p < w.
    let lo = if k >= p { 0 } else { (p - k).div_ceil(s) };
    let hi = if w + p > k { (w + p - k).div_ceil(s).min(ow) } else { 0 };
    (lo.min(hi), hi)
}

/// `cols[(ci * kh + ky) * kw + kx][oy * ow + ox] = x[ci][oy * sh + ky - pt][ox * sw + kx - pl]`,
/// zero outside the input.
fn im2col(g: &ConvGeom, x: &[f32], cols: &mut Vec<f32>, par: bool) {
    // Every value is written below: no need to clear what a previous call left.
    cols.resize(g.c_in * g.kh * g.kw * g.oh * g.ow, 0.0);
    im2col_into(g, x, 0.0, cols, par);
}

/// [`im2col`] into a buffer of exactly `c_in * kh * kw * oh * ow` values, `pad` outside the
/// input; rows split over threads when `par` (the copies are most of a stem's time).
pub(crate) fn im2col_into<T: Copy + Send + Sync>(g: &ConvGeom, x: &[T], pad: T, cols: &mut [T], par: bool) {
    let n = g.oh * g.ow;
    if n == 0 {
        return;
    }
    if par && cols.len() >= 1 << 16 {
        cols.par_chunks_mut(n).enumerate().for_each(|(r, row)| im2col_row(g, x, pad, r, row));
    } else {
        cols.chunks_mut(n).enumerate().for_each(|(r, row)| im2col_row(g, x, pad, r, row));
    }
}

/// Row `r = (ci * kh + ky) * kw + kx` of the columns.
#[inline(always)]
fn im2col_row<T: Copy>(g: &ConvGeom, x: &[T], pad: T, r: usize, row: &mut [T]) {
    let (ci, ky, kx) = (r / (g.kh * g.kw), r / g.kw % g.kh, r % g.kw);
    let xc = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
    let (lo, hi) = valid_range(g.ow, g.w, g.sw, kx, g.pl);
    for oy in 0..g.oh {
        let iy = (oy * g.sh + ky) as isize - g.pt as isize;
        let orow = &mut row[oy * g.ow..][..g.ow];
        if iy < 0 || iy >= g.h as isize || lo >= hi {
            orow.fill(pad);
            continue;
        }
        orow[..lo].fill(pad);
        orow[hi..].fill(pad);
        let xr = &xc[iy as usize * g.w..][..g.w];
        let base = lo * g.sw + kx - g.pl;
        match g.sw {
            1 => orow[lo..hi].copy_from_slice(&xr[base..base + hi - lo]),
            // Fixed-width chunks the compiler turns into shuffles (while 32 inputs remain).
            2 => {
                let (dst, src) = (&mut orow[lo..hi], &xr[base..]);
                let full = (dst.len() / 16).min(src.len() / 32);
                for c in 0..full {
                    let s: &[T; 32] = src[c * 32..c * 32 + 32].try_into().expect("32 values");
                    for (j, o) in dst[c * 16..c * 16 + 16].iter_mut().enumerate() {
                        *o = s[2 * j];
                    }
                }
                for (j, o) in dst.iter_mut().enumerate().skip(full * 16) {
                    *o = src[2 * j];
                }
            }
            s => {
                for (j, o) in orow[lo..hi].iter_mut().enumerate() {
                    *o = xr[base + j * s];
                }
            }
        }
    }
}

/// Where a depthwise convolution's padded plane and taps lie, the same for every channel.
struct DwLayout {
    geom: ConvGeom,
    /// Padded rows per column phase.
    rows: usize,
    /// Padded row length: wide enough for whole blocks of `LANES` outputs at every tap offset.
    pw: usize,
    /// Each tap's offset in the scratch, relative to its output block's first value.
    offsets: Vec<usize>,
}

impl DwLayout {
    fn new(g: &ConvGeom) -> DwLayout {
        let rows = (g.oh - 1) * g.sh + g.kh;
        let cols = (g.ow - 1) * g.sw + g.kw;
        // (+1: room for the stride-2 split's last pair.)
        let pw = cols.div_ceil(g.sw).max(g.ow.div_ceil(LANES) * LANES + (g.kw - 1) / g.sw) + 1;
        let offsets = (0..g.kh * g.kw)
            .map(|t| {
                let (ky, kx) = (t / g.kw, t % g.kw);
                ((kx % g.sw) * rows + ky) * pw + kx / g.sw
            })
            .collect();
        DwLayout { geom: *g, rows, pw, offsets }
    }
}

/// An input plane's values as the depthwise kernels read them: f32 as they are, 8-bit ones
/// centred on their zero point (exact small integers).
#[derive(Clone, Copy)]
enum PlaneIn<'a> {
    F32(&'a [f32]),
    U8(&'a [u8], f32),
    I8(&'a [u8], f32),
}

/// One channel of a depthwise convolution: `out = b + sum_taps w * x`, on the active tier.
fn depthwise_plane(l: &DwLayout, x: PlaneIn, w: &[f32], b: f32, clamp: Option<(f32, f32)>, out: &mut [f32]) {
    depthwise_plane_on(slimnn_kernels::cpu::tier(), l, x, w, b, clamp, out)
}

/// [`depthwise_plane`] on `tier`, which the host must support.
fn depthwise_plane_on(
    tier: slimnn_kernels::CpuTier,
    l: &DwLayout,
    x: PlaneIn,
    w: &[f32],
    b: f32,
    clamp: Option<(f32, f32)>,
    out: &mut [f32],
) {
    PADDED.with(|p| {
        let (scratch, padded_for) = &mut *p.borrow_mut();
        if *padded_for != Some(l.geom) {
            scratch.clear();
            scratch.resize(l.geom.sw * l.rows * l.pw, 0.0);
            *padded_for = Some(l.geom);
        }
        pad_plane_on(tier, l, x, scratch);
        let g = &l.geom;
        let d = DwPlane {
            scratch,
            row_step: g.sh * l.pw,
            pw: l.pw,
            kernel: (g.kh, g.kw, g.sh, g.sw),
            oh: g.oh,
            ow: g.ow,
            weights: &w[..l.offsets.len()],
            offsets: &l.offsets,
            b,
            clamp,
        };
        #[cfg(target_arch = "x86_64")]
        {
            use slimnn_kernels::CpuTier;
            // SAFETY: callers pass supported tiers only; the scratch is padded for whole
            // `LANES` blocks at every tap offset (`DwLayout`).
            match tier {
                CpuTier::Avx512 | CpuTier::Amx => return unsafe { dw_x86::avx512(&d, out) },
                CpuTier::Avx2 => return unsafe { dw_x86::avx2(&d, out) },
                CpuTier::Generic => {}
            }
        }
        let _ = tier;
        dw_generic(&d, out)
    })
}

/// A padded input plane and what to compute from it.
struct DwPlane<'a> {
    scratch: &'a [f32],
    /// Scratch offset between output rows (`sh * pw`).
    row_step: usize,
    /// Scratch offset between padded input rows.
    pw: usize,
    /// `(kh, kw, sh, sw)`.
    kernel: (usize, usize, usize, usize),
    oh: usize,
    ow: usize,
    /// Tap weights and their offsets from the block's first output.
    weights: &'a [f32],
    offsets: &'a [usize],
    b: f32,
    clamp: Option<(f32, f32)>,
}

/// [`pad_plane`] of any input, compiled for `tier` (the conversions vectorise with it).
fn pad_plane_on(tier: slimnn_kernels::CpuTier, l: &DwLayout, x: PlaneIn, scratch: &mut [f32]) {
    #[inline(always)]
    fn any(l: &DwLayout, x: PlaneIn, scratch: &mut [f32]) {
        match x {
            PlaneIn::F32(x) => pad_plane(l, x, |v| v, scratch),
            PlaneIn::U8(x, z) => pad_plane(l, x, |v| v as f32 - z, scratch),
            PlaneIn::I8(x, z) => pad_plane(l, x, |v| v as i8 as f32 - z, scratch),
        }
    }
    #[inline(always)]
    fn pad_plane<T: Copy>(l: &DwLayout, x: &[T], f: impl Fn(T) -> f32 + Copy, scratch: &mut [f32]) {
        pad_plane_with(l, x, f, |x, e, o| split_pairs(x, f, e, o), scratch)
    }
    #[cfg(target_arch = "x86_64")]
    {
        use slimnn_kernels::CpuTier;
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn avx512(l: &DwLayout, x: PlaneIn, scratch: &mut [f32]) {
            match x {
                // SAFETY: this function's features include the split's.
                PlaneIn::F32(x) => {
                    pad_plane_with(l, x, |v| v, |x, e, o| unsafe { dw_x86::split_pairs_f32(x, e, o) }, scratch)
                }
                _ => any(l, x, scratch),
            }
        }
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2(l: &DwLayout, x: PlaneIn, scratch: &mut [f32]) {
            any(l, x, scratch)
        }
        // SAFETY: callers pass supported tiers only.
        match tier {
            CpuTier::Avx512 | CpuTier::Amx => return unsafe { avx512(l, x, scratch) },
            CpuTier::Avx2 => return unsafe { avx2(l, x, scratch) },
            CpuTier::Generic => {}
        }
    }
    let _ = tier;
    any(l, x, scratch)
}

/// Copies the input plane into the interior of `scratch` (zero-padded to `l`'s layout, split
/// into `sw` column phases: phase `q` holds padded columns `q, q + sw, ...`), so every tap
/// reads a contiguous run of `ow` values. The border is left as it is (zero).
/// `split` does a stride-2 row's column pairs ([`split_pairs`]).
#[inline(always)]
fn pad_plane_with<T: Copy>(
    l: &DwLayout,
    x: &[T],
    f: impl Fn(T) -> f32,
    split: impl Fn(&[T], &mut [f32], &mut [f32]),
    scratch: &mut [f32],
) {
    let (g, rows, pw) = (&l.geom, l.rows, l.pw);
    let cols = (g.ow - 1) * g.sw + g.kw;
    for r in 0..rows {
        let Some(iy) = r.checked_sub(g.pt).filter(|&iy| iy < g.h) else { continue };
        let xr = &x[iy * g.w..][..g.w];
        if g.sw == 1 {
            let n = g.w.min(cols.saturating_sub(g.pl));
            scratch[r * pw + g.pl..][..n].iter_mut().zip(&xr[..n]).for_each(|(d, &v)| *d = f(v));
        } else if g.sw == 2 {
            let (even, odd) = s2_halves(l, r, scratch);
            split(xr, even, odd);
        } else {
            for q in 0..g.sw {
                let dst = &mut scratch[(q * rows + r) * pw..][..pw];
                // Padded column `j * sw + q` is input column `j * sw + q - pl`.
                let j0 = g.pl.saturating_sub(q).div_ceil(g.sw);
                let Some(ix0) = (j0 * g.sw + q).checked_sub(g.pl).filter(|&ix| ix < g.w) else { continue };
                for (d, &v) in dst[j0.min(pw)..].iter_mut().zip(xr[ix0..].iter().step_by(g.sw)) {
                    *d = f(v);
                }
            }
        }
    }
}

/// Row `r` of both column phases of a stride-2 layout, from where input column 0's phase
/// (`pl % 2`) and column 1's begin: input column `ix` is padded column `ix + pl`, so pairs
/// `(2i, 2i + 1)` go to index `i` of the two returned slices.
fn s2_halves<'a>(l: &DwLayout, r: usize, scratch: &'a mut [f32]) -> (&'a mut [f32], &'a mut [f32]) {
    let (rows, pw, pl) = (l.rows, l.pw, l.geom.pl);
    let (lo, hi) = scratch.split_at_mut(rows * pw);
    let (p0, p1) = (&mut lo[r * pw..][..pw], &mut hi[r * pw..][..pw]);
    let (a, b) = if pl.is_multiple_of(2) { (p0, p1) } else { (p1, p0) };
    (&mut a[(pl / 2).min(pw)..], &mut b[pl.div_ceil(2).min(pw)..])
}

/// `even[i] = f(x[2i])`, `odd[i] = f(x[2i + 1])`, as far as each has room (the layout always
/// has room for every column a tap reads).
#[inline(always)]
fn split_pairs<T: Copy>(x: &[T], f: impl Fn(T) -> f32, even: &mut [f32], odd: &mut [f32]) {
    let ne = x.len().div_ceil(2).min(even.len());
    let no = (x.len() / 2).min(odd.len());
    // Whole 64-value chunks converted into a buffer first, then split in fixed-length loops
    // the compiler turns into vector shuffles.
    let chunks = (ne / 32).min(no / 32);
    let mut buf = [0f32; 64];
    for c in 0..chunks {
        buf.iter_mut().zip(&x[c * 64..][..64]).for_each(|(d, &v)| *d = f(v));
        let (e, o) = (&mut even[c * 32..][..32], &mut odd[c * 32..][..32]);
        for i in 0..32 {
            e[i] = buf[2 * i];
            o[i] = buf[2 * i + 1];
        }
    }
    for i in chunks * 32..ne {
        even[i] = f(x[2 * i]);
    }
    for i in chunks * 32..no {
        odd[i] = f(x[2 * i + 1]);
    }
}

/// The portable depthwise loop: blocks of `LANES` outputs accumulate over every tap. Also the
/// reference the vector versions are tested against (same summation order per output).
fn dw_generic(d: &DwPlane, out: &mut [f32]) {
    for oy in 0..d.oh {
        let orow = &mut out[oy * d.ow..][..d.ow];
        let row0 = &d.scratch[oy * d.row_step..];
        for c0 in (0..d.ow).step_by(LANES) {
            let mut acc = [d.b; LANES];
            let block = &row0[c0..];
            for (&wv, &off) in d.weights.iter().zip(d.offsets) {
                let src: &[f32; LANES] = block[off..off + LANES].try_into().expect("LANES values");
                for (a, &v) in acc.iter_mut().zip(src) {
                    *a = wv.mul_add(v, *a);
                }
            }
            if let Some((lo, hi)) = d.clamp {
                acc.iter_mut().for_each(|a| *a = a.max(lo).min(hi));
            }
            let n = LANES.min(d.ow - c0);
            orow[c0..c0 + n].copy_from_slice(&acc[..n]);
        }
    }
}

/// Depthwise rows in vector registers: a group of `R` output rows x `NB` blocks of one
/// vector accumulates over every tap, 6-8 independent FMA chains (with one row of a few
/// blocks, the chains' latency bounded the loop), each tap's weight broadcast once per group.
#[cfg(target_arch = "x86_64")]
mod dw_x86 {
    use super::DwPlane;
    use std::arch::x86_64::*;

    /// Defines `$name`: the depthwise loop for one vector width.
    macro_rules! dw_tier {
        ($name:ident, $group:ident, $rows:ident, $by_rows:ident, $store:ident, $r:literal, $feat:literal, $v:ty,
         $lanes:literal, $set1:ident, $fmadd:ident, $loadu:ident, $min:ident, $max:ident, $store_n:ident) => {
            /// # Safety
            /// The target features on the host; `d.scratch` padded as `DwLayout` says.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(d: &DwPlane, out: &mut [f32]) {
                if d.oh >= $r {
                    match d.kernel {
                        (3, 3, 1, 1) => return $by_rows::<3, 3, 1>(d, out),
                        (3, 3, 2, 2) => return $by_rows::<3, 3, 2>(d, out),
                        (5, 5, 1, 1) => return $by_rows::<5, 5, 1>(d, out),
                        (5, 5, 2, 2) => return $by_rows::<5, 5, 2>(d, out),
                        _ => {}
                    }
                }
                let blocks = d.ow.div_ceil($lanes);
                let mut c0 = 0;
                let mut left = blocks;
                while left > 0 {
                    let nb = left.min(4);
                    match nb {
                        4 => $group::<2, 4>(d, out, c0),
                        3 => $group::<2, 3>(d, out, c0),
                        2 => $group::<4, 2>(d, out, c0),
                        _ => $group::<8, 1>(d, out, c0),
                    }
                    c0 += nb * $lanes;
                    left -= nb;
                }
            }

            /// Every output row of columns `c0 .. c0 + NB * lanes`, `R` rows at a time.
            #[inline(always)]
            unsafe fn $group<const R: usize, const NB: usize>(d: &DwPlane, out: &mut [f32], c0: usize) {
                let clamp = d.clamp.map(|(lo, hi)| ($set1(lo), $set1(hi)));
                let mut oy0 = 0;
                while oy0 < d.oh {
                    let rows = R.min(d.oh - oy0);
                    // Rows past the last are computed again from the last row, not stored.
                    let src: [*const f32; R] =
                        std::array::from_fn(|r| d.scratch.as_ptr().add((oy0 + r.min(rows - 1)) * d.row_step + c0));
                    let mut acc = [[$set1(d.b); NB]; R];
                    for (&wv, &off) in d.weights.iter().zip(d.offsets) {
                        let w = $set1(wv);
                        for (r, row) in acc.iter_mut().enumerate() {
                            let p = src[r].add(off);
                            for (j, a) in row.iter_mut().enumerate() {
                                *a = $fmadd(w, $loadu(p.add($lanes * j)), *a);
                            }
                        }
                    }
                    $store(d, out, &acc[..rows], oy0, c0, clamp);
                    oy0 += R;
                }
            }

            /// Output rows `oy0 ..` of columns `c0 ..` from the accumulators, clamped if asked
            /// (max then min: a NaN sum becomes lo, as the portable loop's `f32::max` does).
            #[inline(always)]
            unsafe fn $store<const NB: usize>(
                d: &DwPlane,
                out: &mut [f32],
                acc: &[[$v; NB]],
                oy0: usize,
                c0: usize,
                clamp: Option<($v, $v)>,
            ) {
                for (r, row) in acc.iter().enumerate() {
                    let dst = out.as_mut_ptr().add((oy0 + r) * d.ow);
                    for (j, a) in row.iter().enumerate() {
                        let col = c0 + $lanes * j;
                        if col >= d.ow {
                            break;
                        }
                        let v = clamp.map_or(*a, |(lo, hi)| $min($max(*a, lo), hi));
                        $store_n(dst.add(col), v, (d.ow - col).min($lanes));
                    }
                }
            }

            /// [`$rows`] over every block of columns.
            #[inline(always)]
            unsafe fn $by_rows<const KH: usize, const KW: usize, const S: usize>(d: &DwPlane, out: &mut [f32]) {
                let blocks = d.ow.div_ceil($lanes);
                let mut c0 = 0;
                let mut left = blocks;
                while left > 0 {
                    let nb = left.min(3);
                    match nb {
                        3 => $rows::<KH, KW, S, $r, 3>(d, out, c0),
                        2 => $rows::<KH, KW, S, $r, 2>(d, out, c0),
                        _ => $rows::<KH, KW, S, $r, 1>(d, out, c0),
                    }
                    c0 += nb * $lanes;
                    left -= nb;
                }
            }

            /// Columns `c0 .. c0 + NB * lanes` of every output row, `R` rows at a time (the last
            /// group overlaps the one before, so `oh >= R`), input row by input row: each
            /// padded row's tap vectors are loaded once for every output row of the group that
            /// reads them. Per output the taps still add in `(ky, kx)` order, as the portable
            /// loop's do.
            #[inline(always)]
            unsafe fn $rows<const KH: usize, const KW: usize, const S: usize, const R: usize, const NB: usize>(
                d: &DwPlane,
                out: &mut [f32],
                c0: usize,
            ) {
                let clamp = d.clamp.map(|(lo, hi)| ($set1(lo), $set1(hi)));
                let w: [[f32; KW]; KH] = std::array::from_fn(|ky| std::array::from_fn(|kx| d.weights[ky * KW + kx]));
                // Tap column kx's offset from its padded row (column phase and shift).
                let col: [usize; KW] = std::array::from_fn(|kx| d.offsets[kx]);
                let mut oy0 = 0;
                while oy0 < d.oh {
                    let oy = oy0.min(d.oh - R);
                    let base = d.scratch.as_ptr().add(oy * d.row_step + c0);
                    let mut acc = [[$set1(d.b); NB]; R];
                    for i in 0..(R - 1) * S + KH {
                        let row = base.add(i * d.pw);
                        for kx in 0..KW {
                            let p = row.add(col[kx]);
                            let v: [$v; NB] = std::array::from_fn(|j| $loadu(p.add($lanes * j)));
                            for (r, a) in acc.iter_mut().enumerate() {
                                // Output row r reads padded rows r * S .. r * S + KH.
                                if i >= r * S && i - r * S < KH {
                                    let wv = $set1(w[i - r * S][kx]);
                                    for (aj, &vj) in a.iter_mut().zip(&v) {
                                        *aj = $fmadd(wv, vj, *aj);
                                    }
                                }
                            }
                        }
                    }
                    $store(d, out, &acc, oy, c0, clamp);
                    oy0 = oy + R;
                }
            }
        };
    }

    /// [`super::split_pairs`] of f32 values: 32 at a time through two permutes.
    ///
    /// # Safety
    /// AVX-512 F on the host.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn split_pairs_f32(x: &[f32], even: &mut [f32], odd: &mut [f32]) {
        let ne = x.len().div_ceil(2).min(even.len());
        let no = (x.len() / 2).min(odd.len());
        let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let mask = |n: usize| if n >= 16 { 0xffff } else { (1u16 << n) - 1 };
        for i in (0..ne.max(no)).step_by(16) {
            // Pairs i .. i + 16: input values 2i .. 2i + 32, of which the masks keep those below
            // x.len() (2 * ne or 2 * no + 1 at most), outputs below ne and no.
            let left = x.len().min(2 * ne.max(no) + 1) - 2 * i;
            // (wrapping: a pointer past the end is fine where its mask is empty.)
            let a = _mm512_maskz_loadu_ps(mask(left), x.as_ptr().wrapping_add(2 * i));
            let b = _mm512_maskz_loadu_ps(mask(left.saturating_sub(16)), x.as_ptr().wrapping_add(2 * i + 16));
            let (e, o) = (even.as_mut_ptr().wrapping_add(i), odd.as_mut_ptr().wrapping_add(i));
            let (ve, vo) = (_mm512_permutex2var_ps(a, ie, b), _mm512_permutex2var_ps(a, io, b));
            // Masked stores only at the end (they are slow on some cores).
            if i + 16 <= no {
                _mm512_storeu_ps(e, ve);
                _mm512_storeu_ps(o, vo);
            } else {
                _mm512_mask_storeu_ps(e, mask(ne.saturating_sub(i)), ve);
                _mm512_mask_storeu_ps(o, mask(no.saturating_sub(i)), vo);
            }
        }
    }

    #[inline(always)]
    unsafe fn store_n_512(p: *mut f32, v: __m512, n: usize) {
        let mask: __mmask16 = if n >= 16 { 0xffff } else { (1u16 << n) - 1 };
        _mm512_mask_storeu_ps(p, mask, v);
    }

    #[inline(always)]
    unsafe fn store_n_256(p: *mut f32, v: __m256, n: usize) {
        if n >= 8 {
            _mm256_storeu_ps(p, v);
        } else {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), v);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), p, n);
        }
    }

    dw_tier!(
        avx512,
        group512,
        rows512,
        by_rows512,
        store512,
        4,
        "avx512f",
        __m512,
        16,
        _mm512_set1_ps,
        _mm512_fmadd_ps,
        _mm512_loadu_ps,
        _mm512_min_ps,
        _mm512_max_ps,
        store_n_512
    );
    dw_tier!(
        avx2,
        group256,
        rows256,
        by_rows256,
        store256,
        2,
        "avx2,fma",
        __m256,
        8,
        _mm256_set1_ps,
        _mm256_fmadd_ps,
        _mm256_loadu_ps,
        _mm256_min_ps,
        _mm256_max_ps,
        store_n_256
    );
}

/// Outputs per depthwise block of the portable loop, and the padding granule (one AVX-512
/// register).
const LANES: usize = 16;

/// A depthwise activation as the clamp applied while outputs are stored and the rest, applied
/// in a second pass.
fn split_clamp(act: Activation) -> (Option<(f32, f32)>, Activation) {
    match act {
        Activation::Relu => (Some((0.0, f32::INFINITY)), Activation::None),
        Activation::Clip { min, max } => (Some((min, max)), Activation::None),
        other => (None, other),
    }
}

/// Activation then residual, in place.
fn finish(o: &mut [f32], act: Activation, residual: Option<&[f32]>) {
    match act {
        Activation::None => {}
        Activation::Relu => o.iter_mut().for_each(|v| *v = v.max(0.0)),
        Activation::Clip { min, max } => o.iter_mut().for_each(|v| *v = v.max(min).min(max)),
        other => {
            let src = o.to_vec();
            // Other activations are rare after depthwise convs; reuse the row kernel.
            if slimnn_kernels::rows::map_activation(&src, other, o).is_err() {
                o.copy_from_slice(&src);
            }
        }
    }
    if let Some(r) = residual {
        o.iter_mut().zip(r).for_each(|(v, &r)| *v += r);
    }
}

/// Global average pool over `rows` of `n` spatial values each.
pub fn global_average_pool(x: &[f32], n: usize, out: &mut [f32]) -> Result<()> {
    if n == 0 || x.len() != out.len() * n {
        return Err(shape_error(format!("global average pool: {} values for {} outputs", x.len(), out.len())));
    }
    for (o, row) in out.iter_mut().zip(x.chunks(n)) {
        *o = (row.iter().map(|&v| v as f64).sum::<f64>() / n as f64) as f32;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use slimnn_ir::ops::Conv;
    use slimnn_ir::OpDef;
    use slimnn_kernels::CpuTier;
    use slimnn_tensor::Tensor;

    pub(super) fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..len)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Compares against the reference Conv for input `[n, c, h, w]`, filter `[co, c/group, k, k]`.
    #[allow(clippy::too_many_arguments)]
    fn check(
        n: usize,
        c: usize,
        h: usize,
        w: usize,
        co: usize,
        k: usize,
        stride: usize,
        pads: [usize; 4],
        group: usize,
        expect: ConvMethod,
    ) {
        let attrs = ConvAttrs {
            kernel_shape: Some(vec![k, k]),
            strides: vec![stride, stride],
            pads: pads.to_vec(),
            dilations: vec![],
            group,
            auto_pad: AutoPad::NotSet,
        };
        let xs = vec![n, c, h, w];
        let ws = vec![co, c / group, k, k];
        let x = Tensor::from_vec(xs.clone(), values(xs.iter().product(), 1)).unwrap();
        let wt = Tensor::from_vec(ws.clone(), values(ws.iter().product(), 2)).unwrap();
        let b = Tensor::from_vec(vec![co], values(co, 3)).unwrap();
        let y = Conv { attrs: attrs.clone() }.eval(&[&x, &wt, &b]).unwrap().remove(0);
        let ys = y.shape().to_vec();
        let mut kern = ConvKernel::prepare(&attrs, &xs, &ws, wt.as_slice().unwrap(), Some(b.as_slice().unwrap()), &ys)
            .expect("supported");
        assert_eq!(kern.method, expect);
        for (act, res) in [(Activation::None, false), (Activation::RELU6, true)] {
            kern.activation = act;
            kern.residual = res;
            let r = values(y.len(), 4);
            for par in [false, true] {
                let mut out = vec![f32::NAN; y.len()];
                kern.run(x.as_slice().unwrap(), res.then_some(r.as_slice()), &mut out, par).unwrap();
                for (i, (&got, &want)) in out.iter().zip(y.as_slice::<f32>().unwrap()).enumerate() {
                    let mut want = want;
                    if act != Activation::None {
                        want = want.clamp(0.0, 6.0);
                    }
                    if res {
                        want += r[i];
                    }
                    assert!((got - want).abs() <= 1e-4, "{i}: {got} vs {want} ({xs:?} {ws:?})");
                }
            }
        }
    }

    pub(super) fn conv_attrs(k: usize, stride: usize, pad: usize, group: usize) -> ConvAttrs {
        ConvAttrs {
            kernel_shape: Some(vec![k, k]),
            strides: vec![stride, stride],
            pads: vec![pad; 4],
            dilations: vec![],
            group,
            auto_pad: AutoPad::NotSet,
        }
    }

    #[test]
    fn pointwise_then_depthwise_fused_equals_the_two_convs() {
        // (c_in, c_exp, side, k, stride, pad): stride 1 and 2, odd and even sides, 3x3 and 5x5.
        for (ci, ce, hw, k, s, p) in
            [(3, 20, 33, 3, 1, 1), (4, 18, 34, 3, 2, 1), (5, 17, 35, 5, 2, 2), (3, 16, 32, 5, 1, 2)]
        {
            let oh = (hw + 2 * p - k) / s + 1;
            let (xs, mid, ys) = ([2, ci, hw, hw], [2, ce, hw, hw], [2, ce, oh, oh]);
            let x = values(xs.iter().product(), 1);
            let (w1, b1, w2, b2) = (values(ce * ci, 2), values(ce, 3), values(ce * k * k, 4), values(ce, 5));
            let mut pw = ConvKernel::prepare(&conv_attrs(1, 1, 0, 1), &xs, &[ce, ci, 1, 1], &w1, Some(&b1), &mid)
                .expect("pointwise");
            let mut dw = ConvKernel::prepare(&conv_attrs(k, s, p, ce), &mid, &[ce, 1, k, k], &w2, Some(&b2), &ys)
                .expect("depthwise");
            pw.activation = Activation::RELU6;
            dw.activation = Activation::RELU6;
            assert!(pw.fuses_with(&dw));
            let mut expanded = vec![0.0; mid.iter().product()];
            pw.run(&x, None, &mut expanded, false).unwrap();
            let mut want = vec![0.0; ys.iter().product()];
            dw.run(&expanded, None, &mut want, false).unwrap();
            let (in_len, out_len) = (ci * hw * hw, ce * oh * oh);
            // Bands of one output row, of a few, and all rows in one band.
            for band_bytes in [1, 3 * s * hw * ce * 4, usize::MAX / 2] {
                for par in [false, true] {
                    let mut got = vec![f32::NAN; want.len()];
                    for (xi, oi) in x.chunks(in_len).zip(got.chunks_mut(out_len)) {
                        pw.run_fused(&dw, xi, oi, par, band_bytes).unwrap();
                    }
                    assert!(got == want, "{ci}->{ce} {hw}x{hw} {k}x{k} s{s}: band {band_bytes} par {par}");
                }
            }
            pw.then = Some(Arc::new(dw));
            for par in [false, true] {
                let mut got = vec![f32::NAN; want.len()];
                pw.run(&x, None, &mut got, par).unwrap();
                assert!(got == want, "{ci}->{ce} {hw}x{hw} {k}x{k} s{s}: run, par {par}");
            }
        }
    }

    #[test]
    fn pointwise_matches_reference() {
        check(2, 8, 5, 7, 12, 1, 1, [0; 4], 1, ConvMethod::Pointwise);
    }

    #[test]
    fn im2col_matches_reference() {
        check(1, 3, 9, 8, 5, 3, 1, [1; 4], 1, ConvMethod::Im2col);
        check(2, 3, 9, 8, 4, 3, 2, [0, 1, 1, 0], 1, ConvMethod::Im2col);
        check(1, 4, 11, 10, 6, 5, 2, [2; 4], 1, ConvMethod::Im2col);
        check(1, 4, 6, 6, 6, 1, 2, [0; 4], 1, ConvMethod::Im2col);
        check(1, 2, 5, 5, 3, 3, 1, [0; 4], 1, ConvMethod::Im2col);
        // Stride 2 over rows long enough for the 16-output chunks, even and odd widths.
        check(1, 2, 7, 40, 3, 3, 2, [1; 4], 1, ConvMethod::Im2col);
        check(1, 2, 6, 67, 2, 3, 2, [0, 1, 1, 0], 1, ConvMethod::Im2col);
    }

    #[test]
    fn depthwise_matches_reference() {
        check(1, 6, 9, 10, 6, 3, 1, [1; 4], 6, ConvMethod::Depthwise);
        check(2, 5, 10, 9, 5, 3, 2, [0, 0, 1, 1], 5, ConvMethod::Depthwise);
        check(1, 4, 11, 12, 4, 5, 2, [1, 2, 2, 1], 4, ConvMethod::Depthwise);
        check(1, 3, 7, 7, 3, 5, 1, [2; 4], 3, ConvMethod::Depthwise);
        // Stride 2 with odd and even widths, odd left pad.
        check(1, 3, 9, 11, 3, 3, 2, [1, 1, 0, 1], 3, ConvMethod::Depthwise);
        check(1, 3, 8, 10, 3, 5, 2, [2, 1, 2, 2], 3, ConvMethod::Depthwise);
        check(1, 2, 7, 7, 2, 3, 3, [1; 4], 2, ConvMethod::Depthwise);
    }

    #[test]
    fn depthwise_tiers_match_the_portable_loop_exactly() {
        // (c, h, w, k, stride, pads): widths around the 16- and 64-output blocks, strides 1-3.
        for (h, w, k, s, p) in [
            (9, 7, 3, 1, 1),
            (12, 17, 3, 2, 1),
            (6, 33, 5, 1, 2),
            (10, 64, 3, 1, 1),
            (11, 71, 5, 2, 2),
            (7, 130, 3, 3, 0),
            (5, 80, 5, 1, 2),
        ] {
            let attrs = ConvAttrs { strides: vec![s, s], pads: vec![p; 4], group: 2, ..Default::default() };
            let oh = (h + 2 * p - k) / s + 1;
            let ow = (w + 2 * p - k) / s + 1;
            let kern = ConvKernel::prepare(
                &attrs,
                &[1, 2, h, w],
                &[2, 1, k, k],
                &values(2 * k * k, 5),
                Some(&[0.25, -0.5]),
                &[1, 2, oh, ow],
            )
            .unwrap();
            let mut x = values(h * w, 6);
            x[h * w / 2] = f32::NAN;
            let wc = &kern.weights[..k * k];
            for clamp in [None, Some((0.0, 6.0))] {
                let mut want = vec![0f32; oh * ow];
                let layout = DwLayout::new(&kern.geom);
                depthwise_plane_on(CpuTier::Generic, &layout, PlaneIn::F32(&x), wc, 0.25, clamp, &mut want);
                for tier in slimnn_kernels::cpu::supported_tiers() {
                    let mut got = vec![f32::INFINITY; oh * ow];
                    depthwise_plane_on(tier, &layout, PlaneIn::F32(&x), wc, 0.25, clamp, &mut got);
                    let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "{tier:?} {h}x{w} k{k} s{s} p{p} {clamp:?}");
                }
            }
        }
    }

    #[test]
    fn blocked_depthwise_matches_the_portable_loop_exactly() {
        // (c, h, w, k, stride, pads): narrow planes, partial channel blocks, strides 1-3,
        // kernels 1-7, asymmetric padding.
        for (c, h, w, k, s, p) in [
            (16, 7, 7, 5, 1, [2; 4]),
            (19, 14, 14, 5, 2, [1, 2, 2, 1]),
            (40, 14, 13, 3, 1, [1; 4]),
            (5, 9, 6, 7, 1, [3; 4]),
            (33, 8, 15, 3, 3, [0, 1, 1, 0]),
            (17, 4, 4, 1, 1, [0; 4]),
            (3, 30, 11, 3, 2, [1; 4]),
        ] {
            let attrs = ConvAttrs { strides: vec![s, s], pads: p.to_vec(), group: c, ..Default::default() };
            let oh = (h + p[0] + p[2] - k) / s + 1;
            let ow = (w + p[1] + p[3] - k) / s + 1;
            let mut kern = ConvKernel::prepare(
                &attrs,
                &[1, c, h, w],
                &[c, 1, k, k],
                &values(c * k * k, 7),
                Some(&values(c, 8)),
                &[1, c, oh, ow],
            )
            .unwrap();
            assert!(kern.blocked.is_some(), "{c}x{h}x{w} k{k}");
            let mut x = values(c * h * w, 9);
            x[h * w + 3] = f32::NAN;
            let r = values(c * oh * ow, 10);
            for (act, res) in [(Activation::None, false), (Activation::RELU6, true), (Activation::Relu, false)] {
                kern.activation = act;
                kern.residual = res;
                let res = res.then_some(r.as_slice());
                let mut want = vec![0f32; c * oh * ow];
                kern.depthwise_on(CpuTier::Generic, &x, res, &mut want, false);
                for tier in slimnn_kernels::cpu::supported_tiers() {
                    for par in [false, true] {
                        let mut got = vec![f32::INFINITY; c * oh * ow];
                        kern.depthwise_on(tier, &x, res, &mut got, par);
                        let same = got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits());
                        assert!(same, "{tier:?} {c}x{h}x{w} k{k} s{s} {p:?} {act:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn unsupported_and_bad_shapes() {
        let attrs = ConvAttrs { group: 2, ..Default::default() };
        // Grouped but not depthwise.
        assert!(ConvKernel::prepare(&attrs, &[1, 4, 3, 3], &[4, 2, 1, 1], &[0.0; 8], None, &[1, 4, 3, 3]).is_none());
        let attrs = ConvAttrs { dilations: vec![2, 2], ..Default::default() };
        assert!(ConvKernel::prepare(&attrs, &[1, 1, 5, 5], &[1, 1, 3, 3], &[0.0; 9], None, &[1, 1, 1, 1]).is_none());
        let attrs = ConvAttrs::default();
        let k = ConvKernel::prepare(&attrs, &[1, 2, 2, 2], &[1, 2, 1, 1], &[1.0, 2.0], None, &[1, 1, 2, 2]).unwrap();
        // x = [[1,2,3,4],[10,20,30,40]] → 1*x0 + 2*x1.
        let mut out = [0.0; 4];
        k.run(&[1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0], None, &mut out, false).unwrap();
        assert_eq!(out, [21.0, 42.0, 63.0, 84.0]);
        assert!(k.run(&[1.0; 7], None, &mut out, false).is_err());
        assert!(k.run(&[1.0; 8], Some(&[0.0; 4]), &mut out, false).is_err());
    }

    #[test]
    fn global_average_pool_means_rows() {
        let mut out = [0.0; 2];
        global_average_pool(&[1.0, 2.0, 3.0, 4.0, -1.0, 1.0], 3, &mut out).unwrap();
        assert_eq!(out, [2.0, 4.0 / 3.0]);
        assert!(global_average_pool(&[1.0; 5], 3, &mut out).is_err());
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    #[test]
    #[ignore]
    fn pointwise_speed() {
        // EfficientNet-lite0's 1x1 convolutions (c_in, c_out, side).
        for (ci, co, h) in [
            (32, 16, 112),
            (16, 96, 112),
            (96, 32, 56),
            (32, 144, 56),
            (144, 32, 56),
            (144, 48, 28),
            (48, 240, 28),
            (240, 48, 28),
            (240, 80, 14),
            (80, 480, 14),
            (480, 80, 14),
            (480, 112, 14),
            (112, 672, 14),
            (672, 112, 14),
            (672, 192, 7),
            (192, 1152, 7),
            (1152, 192, 7),
            (1152, 320, 7),
            (320, 1280, 7),
        ] {
            let attrs = ConvAttrs::default();
            let mut kern = ConvKernel::prepare(
                &attrs,
                &[1, ci, h, h],
                &[co, ci, 1, 1],
                &vec![0.1; co * ci],
                Some(&vec![0.0; co]),
                &[1, co, h, h],
            )
            .unwrap();
            kern.activation = Activation::RELU6;
            let x = vec![1.0f32; ci * h * h];
            let mut out = vec![0.0; co * h * h];
            let t = std::time::Instant::now();
            for _ in 0..50 {
                kern.run(&x, None, &mut out, false).unwrap();
            }
            let dt = t.elapsed().as_secs_f64() / 50.0;
            let flops = 2.0 * (ci * co * h * h) as f64;
            eprintln!("{ci}->{co} h{h}: {:.3} ms, {:.1} GFLOP/s", dt * 1e3, flops / dt / 1e9);
        }
    }

    #[test]
    #[ignore]
    fn depthwise_speed() {
        for (c, h, k, s) in [
            (32, 112, 3, 1),
            (96, 112, 3, 2),
            (144, 56, 3, 1),
            (144, 56, 5, 2),
            (240, 28, 5, 1),
            (672, 14, 5, 1),
            (1152, 7, 5, 1),
        ] {
            let p = k / 2;
            let o = (h + 2 * p - k) / s + 1;
            let attrs = ConvAttrs { strides: vec![s, s], pads: vec![p; 4], group: c, ..Default::default() };
            let kern = ConvKernel::prepare(
                &attrs,
                &[1, c, h, h],
                &[c, 1, k, k],
                &vec![0.1; c * k * k],
                Some(&vec![0.0; c]),
                &[1, c, o, o],
            )
            .unwrap();
            let x = vec![1.0f32; c * h * h];
            let mut out = vec![0.0; c * o * o];
            kern.run(&x, None, &mut out, false).unwrap();
            let t = std::time::Instant::now();
            for _ in 0..200 {
                kern.run(&x, None, &mut out, false).unwrap();
            }
            let dt = t.elapsed().as_secs_f64() / 200.0;
            eprintln!("c{c} h{h} k{k} s{s}: {:.3} ms, {:.2} GMAC/s", dt * 1e3, (c * o * o * k * k) as f64 / dt / 1e9);
        }
    }
}

//! 2-d NCHW max and average pooling and their gradients (LeNet-style training graphs), with
//! the reference evaluator's semantics: taps outside the input are skipped, max takes the
//! first largest value in scan order (NaN never wins; a window with nothing above -inf
//! passes no gradient), average divides by the taps inside the input or, with
//! `count_include_pad`, by the taps inside the input plus its padding.

use crate::{Result, RuntimeError};
use rayon::prelude::*;
use slimnn_ir::ops::{AutoPad, Pool, PoolKind};
use slimnn_kernels::KernelError;

/// One pooling (or its gradient) for fixed input and output planes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolKernel {
    pub max: bool,
    pub count_include_pad: bool,
    pub grad: bool,
    /// Input and output plane sizes.
    pub ih: usize,
    pub iw: usize,
    pub oh: usize,
    pub ow: usize,
    /// Window, strides, begin pads, end pads.
    pub kh: usize,
    pub kw: usize,
    pub sh: usize,
    pub sw: usize,
    pub pt: usize,
    pub pl: usize,
    pub pb: usize,
    pub pr: usize,
}

impl PoolKernel {
    /// The kernel for `pool` from input `[n, c, ih, iw]` to output `[n, c, oh, ow]` (known from
    /// shape inference); `None` for other ranks, dilations or automatic padding.
    pub fn prepare(pool: &Pool, x: &[usize], y: &[usize], grad: bool) -> Option<PoolKernel> {
        let [n, c, ih, iw] = <[usize; 4]>::try_from(x).ok()?;
        let [yn, yc, oh, ow] = <[usize; 4]>::try_from(y).ok()?;
        let a = &pool.attrs;
        let &[kh, kw] = a.kernel_shape.as_slice() else { return None };
        if (yn, yc) != (n, c) || a.dilations.iter().any(|&d| d != 1) || kh == 0 || kw == 0 {
            return None;
        }
        let (sh, sw) = match a.strides.as_slice() {
            [] => (1, 1),
            &[s0, s1] if s0 > 0 && s1 > 0 => (s0, s1),
            _ => return None,
        };
        let (pt, pl, pb, pr) = match (a.auto_pad, a.pads.as_slice()) {
            (AutoPad::NotSet, []) | (AutoPad::Valid, _) => (0, 0, 0, 0),
            (AutoPad::NotSet, &[t, l, b, r]) => (t, l, b, r),
            _ => return None,
        };
        let (max, count_include_pad) = match pool.kind {
            PoolKind::Max => (true, false),
            PoolKind::Average { count_include_pad } => (false, count_include_pad),
        };
        Some(PoolKernel { max, count_include_pad, grad, ih, iw, oh, ow, kh, kw, sh, sw, pt, pl, pb, pr })
    }

    pub fn name(&self) -> String {
        let kind = if self.max { "max_pool" } else { "average_pool" };
        if self.grad {
            format!("{kind}_grad")
        } else {
            kind.into()
        }
    }

    /// Input positions of output `o` along one dim (`len` long, window `k`, stride `s`, pads
    /// `pb` / `pe`): the valid range and the `count_include_pad` tap count.
    fn taps(o: usize, len: usize, k: usize, s: usize, pb: usize, pe: usize) -> (usize, usize, usize) {
        let start = (o * s) as i64 - pb as i64;
        let end = start + k as i64;
        let lo = start.max(0) as usize;
        let hi = end.clamp(0, len as i64) as usize;
        let padded = (end.min((len + pe) as i64) - start).max(0) as usize;
        (lo, hi.max(lo), padded)
    }

    /// Forward: `x` planes to `out` planes. Gradient: inputs `x` and `dy`, `out` is dx.
    pub fn run(&self, x: &[f32], dy: Option<&[f32]>, out: &mut [f32], par: bool) -> Result<()> {
        let (inp, outp) = (self.ih * self.iw, self.oh * self.ow);
        let planes = x.len().checked_div(inp).unwrap_or(0);
        let (want_out, dy_len) = if self.grad { (x.len(), planes * outp) } else { (planes * outp, 0) };
        if inp == 0 || x.len() != planes * inp || out.len() != want_out || dy.map_or(0, <[f32]>::len) != dy_len {
            return Err(RuntimeError::Kernel(KernelError::Shape {
                kernel: "pool",
                msg: format!("{}: x {}, out {} values for {self:?}", self.name(), x.len(), out.len()),
            }));
        }
        let plane = |p: usize, o: &mut [f32]| {
            let xp = &x[p * inp..(p + 1) * inp];
            if self.grad {
                o.fill(0.0);
            }
            for oy in 0..self.oh {
                let (y0, y1, cy) = Self::taps(oy, self.ih, self.kh, self.sh, self.pt, self.pb);
                for ox in 0..self.ow {
                    let (x0, x1, cx) = Self::taps(ox, self.iw, self.kw, self.sw, self.pl, self.pr);
                    let at = oy * self.ow + ox;
                    if self.max {
                        let mut best = (f32::NEG_INFINITY, None);
                        for iy in y0..y1 {
                            for (ix, &v) in xp[iy * self.iw + x0..iy * self.iw + x1].iter().enumerate() {
                                if v > best.0 {
                                    best = (v, Some(iy * self.iw + x0 + ix));
                                }
                            }
                        }
                        match dy {
                            Some(d) => {
                                if let Some(i) = best.1 {
                                    o[i] += d[p * outp + at];
                                }
                            }
                            None => o[at] = best.0,
                        }
                    } else {
                        let count = if self.count_include_pad { cy * cx } else { (y1 - y0) * (x1 - x0) };
                        match dy {
                            Some(d) => {
                                let g = d[p * outp + at] / count as f32;
                                for iy in y0..y1 {
                                    o[iy * self.iw + x0..iy * self.iw + x1].iter_mut().for_each(|v| *v += g);
                                }
                            }
                            None => {
                                let s: f32 = (y0..y1)
                                    .map(|iy| xp[iy * self.iw + x0..iy * self.iw + x1].iter().sum::<f32>())
                                    .sum();
                                o[at] = s / count as f32;
                            }
                        }
                    }
                }
            }
        };
        let per = if self.grad { inp } else { outp };
        if par && planes > 1 {
            out.par_chunks_mut(per).enumerate().for_each(|(p, o)| plane(p, o));
        } else {
            out.chunks_mut(per).enumerate().for_each(|(p, o)| plane(p, o));
        }
        Ok(())
    }
}

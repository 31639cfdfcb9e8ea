//! Resize (nearest, linear and cubic, with ONNX's coordinate transformations).

use super::util::{expect_inputs, norm_axis, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{checked_numel, match_data, DType, Dim, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    Nearest,
    Linear,
    Cubic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CoordMode {
    HalfPixel,
    HalfPixelSymmetric,
    PytorchHalfPixel,
    AlignCorners,
    Asymmetric,
    TfCropAndResize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NearestMode {
    RoundPreferFloor,
    RoundPreferCeil,
    Floor,
    Ceil,
}

/// Whether the second input holds scales (f32, one per dim) or output sizes (i64).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeTarget {
    Scales,
    Sizes,
}

/// `Resize(x, target)`: the importer drops `roi` (unused outside tf_crop_and_resize, which is
/// rejected) and keeps whichever of scales / sizes is given as the single second input.
/// `keep_aspect_ratio_policy` is `stretch` and `antialias` is off. With scales, align_corners
/// and pytorch_half_pixel use the unrounded output length `scale * in_len` as the spec's
/// `length_resized` (ONNX's reference does; with sizes it is the size, as in ONNX Runtime).
#[derive(Debug, Clone, PartialEq)]
pub struct Resize {
    pub mode: ResizeMode,
    pub coord: CoordMode,
    pub nearest: NearestMode,
    pub cubic_coeff_a: f32,
    pub exclude_outside: bool,
    pub target: ResizeTarget,
    /// Dims the target refers to (opset 18 `axes`); `None` means all dims.
    pub axes: Option<Vec<i64>>,
}

/// Output lengths above this are rejected before any arithmetic on them.
const MAX_LEN: f64 = (1u64 << 48) as f64;

impl Resize {
    /// Checks the modes and dtypes, and returns the resized axes (normalised, distinct).
    fn check(&self, x: DType, t: DType, rank: usize) -> IrResult<Vec<usize>> {
        let op = self.name();
        if self.coord == CoordMode::TfCropAndResize {
            op_bail!(op, "coordinate_transformation_mode tf_crop_and_resize is not supported");
        }
        if matches!(x, DType::Block(_)) || (self.mode != ResizeMode::Nearest && x == DType::Bool) {
            op_bail!(op, "{:?} mode does not support {x} inputs", self.mode);
        }
        match self.target {
            ResizeTarget::Scales if !t.is_float() => op_bail!(op, "scales must be floats, got {t}"),
            ResizeTarget::Sizes if !t.is_integer() => {
                op_bail!(op, "sizes must be integers, got {t}")
            }
            _ => {}
        }
        let axes = match &self.axes {
            None => (0..rank).collect(),
            Some(a) => a.iter().map(|&a| norm_axis(op, a, rank)).collect::<IrResult<Vec<_>>>()?,
        };
        for (i, a) in axes.iter().enumerate() {
            if axes[..i].contains(a) {
                op_bail!(op, "axis {a} is listed twice in axes {:?}", self.axes);
            }
        }
        Ok(axes)
    }

    /// Per resized axis: the output length (from `in_len` when known) and the scale the
    /// coordinate transform uses (`out / in` for sizes).
    fn targets(&self, t: &Tensor, n_axes: usize) -> IrResult<Vec<Target>> {
        let op = self.name();
        if t.rank() != 1 || t.len() != n_axes {
            op_bail!(op, "{:?} must be 1-d with {n_axes} values, got shape {:?}", self.target, t.shape());
        }
        Ok(match self.target {
            ResizeTarget::Scales => {
                let v = t.to_f64_vec();
                if let Some(bad) = v.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                    op_bail!(op, "scales must be positive and finite, got {bad}");
                }
                v.into_iter().map(Target::Scale).collect()
            }
            ResizeTarget::Sizes => {
                let v = t.to_i64_vec()?;
                if let Some(bad) = v.iter().find(|&&s| s < 0 || s as f64 > MAX_LEN) {
                    op_bail!(op, "sizes must be between 0 and {MAX_LEN}, got {bad}");
                }
                v.into_iter().map(|s| Target::Size(s as usize)).collect()
            }
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Target {
    Scale(f64),
    Size(usize),
}

/// How one axis is resized.
#[derive(Debug, Clone, Copy, PartialEq)]
struct AxisPlan {
    in_len: usize,
    out_len: usize,
    /// `out / in` for sizes, the given scale otherwise.
    scale: f64,
    /// The spec's `length_resized` of align_corners and pytorch_half_pixel: the output length,
    /// unrounded (`scale * in_len`) when scales are given, as ONNX's reference computes it.
    resized: f64,
}

impl Target {
    /// How an axis of length `len` is resized.
    fn resolve(self, op: &'static str, len: usize) -> IrResult<AxisPlan> {
        match self {
            Target::Scale(s) => {
                let resized = len as f64 * s;
                if resized.floor() > MAX_LEN {
                    op_bail!(op, "scale {s} makes a dim of length {len} too large");
                }
                Ok(AxisPlan { in_len: len, out_len: resized.floor() as usize, scale: s, resized })
            }
            Target::Size(out) if len == 0 && out != 0 => {
                op_bail!(op, "cannot resize an empty dim to {out}")
            }
            Target::Size(out) => {
                let scale = if len == 0 { 1.0 } else { out as f64 / len as f64 };
                Ok(AxisPlan { in_len: len, out_len: out, scale, resized: out as f64 })
            }
        }
    }
}

/// Where output index `o` samples the input (ONNX `coordinate_transformation_mode`).
fn source_coord(op: &'static str, mode: CoordMode, o: usize, p: &AxisPlan) -> IrResult<f64> {
    let x = o as f64;
    let (in_len, scale) = (p.in_len as f64, p.scale);
    Ok(match mode {
        CoordMode::HalfPixel => (x + 0.5) / scale - 0.5,
        CoordMode::HalfPixelSymmetric => {
            let adjustment = p.out_len as f64 / (scale * in_len);
            in_len / 2.0 * (1.0 - adjustment) + (x + 0.5) / scale - 0.5
        }
        CoordMode::PytorchHalfPixel if p.resized > 1.0 => (x + 0.5) / scale - 0.5,
        CoordMode::PytorchHalfPixel => 0.0,
        CoordMode::AlignCorners if p.resized > 1.0 => x * (in_len - 1.0) / (p.resized - 1.0),
        CoordMode::AlignCorners => 0.0,
        CoordMode::Asymmetric => x / scale,
        CoordMode::TfCropAndResize => {
            op_bail!(op, "coordinate_transformation_mode tf_crop_and_resize is not supported")
        }
    })
}

fn nearest_index(mode: NearestMode, x: f64, in_len: usize) -> usize {
    let half = x - x.floor() == 0.5;
    let r = match mode {
        NearestMode::RoundPreferFloor if half => x.floor(),
        NearestMode::RoundPreferCeil if half => x.ceil(),
        NearestMode::RoundPreferFloor | NearestMode::RoundPreferCeil => x.round(),
        NearestMode::Floor => x.floor(),
        NearestMode::Ceil => x.ceil(),
    };
    r.clamp(0.0, in_len.saturating_sub(1) as f64) as usize
}

/// Keys cubic convolution weights for the 4 taps at `floor - 1 ..= floor + 2`, `t` being the
/// fractional part of the source coordinate.
fn cubic_coeffs(t: f64, a: f64) -> [f64; 4] {
    let far = |d: f64| ((a * d - 5.0 * a) * d + 8.0 * a) * d - 4.0 * a;
    let near = |d: f64| ((a + 2.0) * d - (a + 3.0)) * d * d + 1.0;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Input taps (index, weight) of each output index along one axis, for linear and cubic.
fn interp_taps(r: &Resize, x: f64, in_len: usize) -> Vec<(usize, f64)> {
    let f = x.floor();
    let t = x - f;
    let (first, weights) = match r.mode {
        ResizeMode::Cubic => (f as i64 - 1, cubic_coeffs(t, r.cubic_coeff_a as f64).to_vec()),
        _ => (f as i64, vec![1.0 - t, t]),
    };
    let last = in_len as i64 - 1;
    let mut taps: Vec<(i64, f64)> = weights.into_iter().enumerate().map(|(j, w)| (first + j as i64, w)).collect();
    if r.exclude_outside {
        taps.retain(|&(i, _)| (0..=last).contains(&i));
        let sum: f64 = taps.iter().map(|t| t.1).sum();
        if sum != 0.0 {
            taps.iter_mut().for_each(|t| t.1 /= sum);
        }
    }
    // Taps outside the input repeat the edge values.
    taps.into_iter().map(|(i, w)| (i.clamp(0, last.max(0)) as usize, w)).collect()
}

/// Resamples axis `axis` of row-major `data`: output index `j` is the weighted sum of
/// the input slices listed in `taps[j]`.
fn resample_axis(data: &[f64], shape: &[usize], axis: usize, taps: &[Vec<(usize, f64)>]) -> Vec<f64> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let (in_len, out_len) = (shape[axis], taps.len());
    let mut out = vec![0f64; outer * out_len * inner];
    for o in 0..outer {
        let src = &data[o * in_len * inner..][..in_len * inner];
        for (j, tj) in taps.iter().enumerate() {
            let dst = &mut out[(o * out_len + j) * inner..][..inner];
            for &(i, w) in tj {
                for (d, s) in dst.iter_mut().zip(&src[i * inner..][..inner]) {
                    *d += w * s;
                }
            }
        }
    }
    out
}

/// Picks input index `src[j]` for output index `j` along `axis` (any element type).
fn gather_axis<T: Copy>(data: &[T], shape: &[usize], axis: usize, src: &[usize]) -> Vec<T> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis + 1..].iter().product();
    let in_len = shape[axis];
    let mut out = Vec::with_capacity(outer * src.len() * inner);
    for o in 0..outer {
        for &i in src {
            out.extend_from_slice(&data[(o * in_len + i) * inner..][..inner]);
        }
    }
    out
}

/// Applies the per-axis nearest index maps in turn.
fn gather_all<T: Copy>(data: &[T], shape: &[usize], maps: &[(usize, Vec<usize>)]) -> Vec<T> {
    let mut shape = shape.to_vec();
    let mut cur = data.to_vec();
    for (axis, src) in maps {
        cur = gather_axis(&cur, &shape, *axis, src);
        shape[*axis] = src.len();
    }
    cur
}

impl OpDef for Resize {
    fn name(&self) -> &'static str {
        "Resize"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 2)?;
        let (x, t) = (inputs[0], inputs[1]);
        let axes = self.check(x.dtype, t.dtype, x.rank())?;
        if t.rank() != 1 {
            op_bail!(op, "{:?} must be 1-d, got shape {}", self.target, show_dims(&t.shape));
        }
        if matches!(t.shape[0], Dim::Known(n) if n != axes.len()) {
            op_bail!(op, "{:?} has {} values for {} resized axes", self.target, t.shape[0], axes.len());
        }
        let mut shape = x.shape.clone();
        match &t.konst {
            Some(tv) => {
                for (&a, target) in axes.iter().zip(self.targets(tv, axes.len())?) {
                    shape[a] = match (&x.shape[a], target) {
                        (Dim::Known(len), target) => Dim::Known(target.resolve(op, *len)?.out_len),
                        (_, Target::Size(n)) => Dim::Known(n),
                        (d, Target::Scale(1.0)) => d.clone(),
                        _ => Dim::Unknown,
                    };
                }
            }
            None => axes.iter().for_each(|&a| shape[a] = Dim::Unknown),
        }
        Ok(vec![Fact::new(x.dtype, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 2, 2)?;
        let (x, t) = (inputs[0], inputs[1]);
        let axes = self.check(x.dtype(), t.dtype(), x.rank())?;
        let targets = self.targets(t, axes.len())?;
        let in_shape = x.shape();
        let mut out_shape = in_shape.to_vec();
        // The axes that change.
        let mut plan: Vec<(usize, AxisPlan)> = Vec::new();
        for (&a, target) in axes.iter().zip(targets) {
            let p = target.resolve(op, in_shape[a])?;
            out_shape[a] = p.out_len;
            if p.out_len != p.in_len || p.scale != 1.0 {
                plan.push((a, p));
            }
        }
        checked_numel(&out_shape, x.dtype())?;
        // Shrinking axes first keeps the intermediates small.
        let ratio = |p: &AxisPlan| p.out_len as f64 / p.in_len.max(1) as f64;
        plan.sort_by(|p, q| ratio(&p.1).total_cmp(&ratio(&q.1)));
        let coords = |(a, p): &(usize, AxisPlan)| -> IrResult<(usize, Vec<f64>)> {
            let c = (0..p.out_len).map(|o| source_coord(op, self.coord, o, p)).collect::<IrResult<_>>()?;
            Ok((*a, c))
        };
        if self.mode == ResizeMode::Nearest {
            let maps = plan
                .iter()
                .map(|p| {
                    let (a, c) = coords(p)?;
                    Ok((a, c.into_iter().map(|x| nearest_index(self.nearest, x, p.1.in_len)).collect()))
                })
                .collect::<IrResult<Vec<_>>>()?;
            let y = match_data!(x.data(), v => Tensor::from_vec(out_shape, gather_all(v, in_shape, &maps))?,
                block => op_bail!(op, "does not support block-quantized inputs"));
            return Ok(vec![y]);
        }
        let mut shape = in_shape.to_vec();
        let mut cur = x.to_f64_vec();
        for p in &plan {
            let (a, c) = coords(p)?;
            let in_len = p.1.in_len;
            let taps: Vec<_> = c.into_iter().map(|x| interp_taps(self, x, in_len)).collect();
            shape[a] = p.1.out_len;
            checked_numel(&shape, DType::F64)?;
            cur = resample_axis(&cur, &[&shape[..a], &[in_len], &shape[a + 1..]].concat(), a, &taps);
        }
        Ok(vec![Tensor::from_f64s(x.dtype(), out_shape, &cur)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn op(mode: ResizeMode, coord: CoordMode, target: ResizeTarget) -> Resize {
        Resize {
            mode,
            coord,
            nearest: NearestMode::RoundPreferFloor,
            cubic_coeff_a: -0.75,
            exclude_outside: false,
            target,
            axes: None,
        }
    }

    fn scales(s: &[f32]) -> Tensor {
        t(&[s.len()], s)
    }

    fn sizes(s: &[i64]) -> Tensor {
        Tensor::from_vec(vec![s.len()], s.to_vec()).unwrap()
    }

    /// Runs `eval` and checks `output_facts` (with the target constant) agrees.
    fn run(r: &Resize, x: &Tensor, target: &Tensor) -> IrResult<Tensor> {
        let fx = Fact::known(x.dtype(), x.shape());
        let ft = Fact::from_tensor(Arc::new(target.clone()));
        let want = r.output_facts(&[&fx, &ft])?;
        let y = r.eval(&[x, target])?.remove(0);
        assert_eq!(want[0].known_shape().as_deref(), Some(y.shape()), "facts agree with eval");
        Ok(y)
    }

    fn values(y: &Tensor) -> Vec<f32> {
        y.to_f64_vec().into_iter().map(|v| v as f32).collect()
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-5)
    }

    #[test]
    fn nearest_modes() {
        let x = t(&[4], &[10.0, 20.0, 30.0, 40.0]);
        // asymmetric x2 samples at 0, 0.5, 1, ..., 3.5: every other one is a tie
        let mut r = op(ResizeMode::Nearest, CoordMode::Asymmetric, ResizeTarget::Scales);
        let s = scales(&[2.0]);
        assert_eq!(values(&run(&r, &x, &s).unwrap()), [10.0, 10.0, 20.0, 20.0, 30.0, 30.0, 40.0, 40.0]);
        r.nearest = NearestMode::RoundPreferCeil;
        assert_eq!(values(&run(&r, &x, &s).unwrap()), [10.0, 20.0, 20.0, 30.0, 30.0, 40.0, 40.0, 40.0]);
        r.nearest = NearestMode::Ceil;
        assert_eq!(values(&run(&r, &x, &s).unwrap()), [10.0, 20.0, 20.0, 30.0, 30.0, 40.0, 40.0, 40.0]);
        r.nearest = NearestMode::Floor;
        // half_pixel downsample by 2: samples at 0.5 and 2.5, floored
        r.coord = CoordMode::HalfPixel;
        assert_eq!(values(&run(&r, &x, &scales(&[0.5])).unwrap()), [10.0, 30.0]);
    }

    #[test]
    fn nearest_keeps_any_dtype_exactly() {
        let x = Tensor::from_vec(vec![1, 2], vec![i64::MAX, -3]).unwrap();
        let r = op(ResizeMode::Nearest, CoordMode::Asymmetric, ResizeTarget::Sizes);
        let y = run(&r, &x, &sizes(&[2, 4])).unwrap();
        assert_eq!(y.as_slice::<i64>().unwrap(), &[i64::MAX, i64::MAX, -3, -3, i64::MAX, i64::MAX, -3, -3]);
        let x = Tensor::from_vec(vec![2], vec![true, false]).unwrap();
        assert_eq!(run(&r, &x, &sizes(&[3])).unwrap().as_slice::<bool>().unwrap(), &[true, false, false]);
    }

    #[test]
    fn linear_coordinate_modes() {
        let x = t(&[2], &[0.0, 10.0]);
        let mut r = op(ResizeMode::Linear, CoordMode::HalfPixel, ResizeTarget::Sizes);
        // samples at -0.25, 0.25, 0.75, 1.25; outside the input the edge value holds
        assert_eq!(values(&run(&r, &x, &sizes(&[4])).unwrap()), [0.0, 2.5, 7.5, 10.0]);
        r.coord = CoordMode::AlignCorners;
        assert_eq!(values(&run(&r, &x, &sizes(&[3])).unwrap()), [0.0, 5.0, 10.0]);
        r.coord = CoordMode::Asymmetric;
        assert_eq!(values(&run(&r, &x, &sizes(&[4])).unwrap()), [0.0, 5.0, 10.0, 10.0]);
        // a single output samples 0 with pytorch_half_pixel, (0 + 0.5) * 3 - 0.5 = 1 with half_pixel
        let x = t(&[3], &[0.0, 10.0, 20.0]);
        r.coord = CoordMode::PytorchHalfPixel;
        assert_eq!(values(&run(&r, &x, &sizes(&[1])).unwrap()), [0.0]);
        r.coord = CoordMode::HalfPixel;
        assert_eq!(values(&run(&r, &x, &sizes(&[1])).unwrap()), [10.0]);
    }

    #[test]
    fn align_corners_with_scales_uses_the_unrounded_length() {
        // 4 * 0.6 = 2.4 -> 2 outputs at x * (4 - 1) / (2.4 - 1) = 0 and 15/7 (not 3, as
        // sizes [2] give): 10 + 10 * 15/7.
        let x = t(&[4], &[10.0, 20.0, 30.0, 40.0]);
        let mut r = op(ResizeMode::Linear, CoordMode::AlignCorners, ResizeTarget::Scales);
        let y = values(&run(&r, &x, &scales(&[0.6])).unwrap());
        assert!(close(&y, &[10.0, 10.0 + 150.0 / 7.0]), "{y:?}");
        r.target = ResizeTarget::Sizes;
        assert_eq!(values(&run(&r, &x, &sizes(&[2])).unwrap()), [10.0, 40.0]);
        // pytorch_half_pixel: 2 * 0.75 = 1.5 > 1, so the one output samples (0.5 / 0.75) - 0.5
        // = 1/6 rather than 0.
        let x = t(&[2], &[0.0, 6.0]);
        let r = op(ResizeMode::Linear, CoordMode::PytorchHalfPixel, ResizeTarget::Scales);
        let y = values(&run(&r, &x, &scales(&[0.75])).unwrap());
        assert!(close(&y, &[1.0]), "{y:?}");
    }

    #[test]
    fn half_pixel_symmetric() {
        // 4 * 0.6 = 2.4 -> 2 outputs; offset 2 * (1 - 2 / 2.4) = 1/3 shifts the samples to
        // 2/3 and 7/3
        let x = t(&[4], &[10.0, 20.0, 30.0, 40.0]);
        let mut r = op(ResizeMode::Linear, CoordMode::HalfPixelSymmetric, ResizeTarget::Scales);
        let y = values(&run(&r, &x, &scales(&[0.6])).unwrap());
        assert!(close(&y, &[10.0 + 20.0 / 3.0, 10.0 + 70.0 / 3.0]), "{y:?}");
        r.mode = ResizeMode::Nearest;
        assert_eq!(values(&run(&r, &x, &scales(&[0.6])).unwrap()), [20.0, 30.0]);
    }

    #[test]
    fn bilinear_over_resized_axes() {
        let x = t(&[1, 1, 2, 2], &[0.0, 10.0, 20.0, 30.0]);
        let mut r = op(ResizeMode::Linear, CoordMode::AlignCorners, ResizeTarget::Sizes);
        let y = run(&r, &x, &sizes(&[1, 1, 3, 3])).unwrap();
        assert_eq!(values(&y), [0.0, 5.0, 10.0, 10.0, 15.0, 20.0, 20.0, 25.0, 30.0]);
        r.axes = Some(vec![-1]);
        let y = run(&r, &x, &sizes(&[3])).unwrap();
        assert_eq!(y.shape(), &[1, 1, 2, 3]);
        assert_eq!(values(&y), [0.0, 5.0, 10.0, 20.0, 25.0, 30.0]);
    }

    #[test]
    fn cubic() {
        let x = t(&[4], &[0.0, 1.0, 2.0, 3.0]);
        let mut r = op(ResizeMode::Cubic, CoordMode::Asymmetric, ResizeTarget::Scales);
        // weights at t = 0.5 with a = -0.75: [-3/32, 19/32, 19/32, -3/32]. At 1.5 a line is
        // reproduced; at 0.5 the left tap repeats the edge value 0.
        let y = values(&run(&r, &x, &scales(&[2.0])).unwrap());
        assert!(close(&y[..4], &[0.0, 0.40625, 1.0, 1.5]), "{y:?}");
        // exclude_outside drops the outside tap and renormalises: (19/32 - 6/32) / (35/32)
        r.exclude_outside = true;
        let y = values(&run(&r, &x, &scales(&[2.0])).unwrap());
        assert!(close(&y[..4], &[0.0, 13.0 / 35.0, 1.0, 1.5]), "{y:?}");
    }

    #[test]
    fn integer_linear_truncates() {
        let x = Tensor::from_vec(vec![2], vec![0u8, 3]).unwrap();
        let r = op(ResizeMode::Linear, CoordMode::AlignCorners, ResizeTarget::Sizes);
        assert_eq!(run(&r, &x, &sizes(&[3])).unwrap().as_slice::<u8>().unwrap(), &[0, 1, 3]);
    }

    #[test]
    fn facts() {
        let r = op(ResizeMode::Nearest, CoordMode::HalfPixel, ResizeTarget::Scales);
        let x = Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(3), Dim::Known(5), Dim::Unknown]);
        let s = Fact::from_tensor(Arc::new(scales(&[1.0, 1.0, 2.0, 2.0])));
        let y = r.output_facts(&[&x, &s]).unwrap();
        assert_eq!(y[0].shape, vec![Dim::sym("n"), Dim::Known(3), Dim::Known(10), Dim::Unknown]);
        let dynamic = Fact::known(DType::F32, &[4]);
        let y = r.output_facts(&[&x, &dynamic]).unwrap();
        assert_eq!(y[0].shape, vec![Dim::Unknown; 4]);
        let mut r = op(ResizeMode::Nearest, CoordMode::HalfPixel, ResizeTarget::Sizes);
        r.axes = Some(vec![2, 3]);
        let z = Fact::from_tensor(Arc::new(sizes(&[7, 9])));
        let y = r.output_facts(&[&x, &z]).unwrap();
        assert_eq!(y[0].shape, vec![Dim::sym("n"), Dim::Known(3), Dim::Known(7), Dim::Known(9)]);
    }

    #[test]
    fn errors() {
        let x = t(&[2, 2], &[0.0; 4]);
        let r = op(ResizeMode::Linear, CoordMode::TfCropAndResize, ResizeTarget::Scales);
        assert!(run(&r, &x, &scales(&[1.0, 2.0])).unwrap_err().to_string().contains("tf_crop_and_resize"));
        let r = op(ResizeMode::Linear, CoordMode::HalfPixel, ResizeTarget::Scales);
        assert!(run(&r, &x, &scales(&[2.0])).unwrap_err().to_string().contains("resized axes"));
        assert!(run(&r, &x, &scales(&[2.0, 0.0])).unwrap_err().to_string().contains("positive"));
        assert!(run(&r, &x, &scales(&[2.0, f32::NAN])).is_err());
        assert!(run(&r, &x, &scales(&[1.0, 1e30])).unwrap_err().to_string().contains("too large"));
        assert!(run(&r, &x, &sizes(&[2, 2])).unwrap_err().to_string().contains("floats"));
        let r = op(ResizeMode::Linear, CoordMode::HalfPixel, ResizeTarget::Sizes);
        assert!(run(&r, &x, &scales(&[2.0, 2.0])).unwrap_err().to_string().contains("integers"));
        assert!(run(&r, &x, &sizes(&[2, -1])).is_err());
        assert!(run(&r, &t(&[0, 2], &[]), &sizes(&[2, 2])).unwrap_err().to_string().contains("empty"));
        let b = Tensor::from_vec(vec![2], vec![true, false]).unwrap();
        assert!(run(&r, &b, &sizes(&[4])).unwrap_err().to_string().contains("bool"));
        let mut r2 = r.clone();
        r2.axes = Some(vec![1, -1]);
        assert!(run(&r2, &x, &sizes(&[2, 2])).unwrap_err().to_string().contains("twice"));
        r2.axes = Some(vec![2]);
        assert!(run(&r2, &x, &sizes(&[2])).is_err());
        assert!(r.eval(&[&x]).is_err());
    }
}

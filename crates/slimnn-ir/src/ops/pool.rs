//! Pooling.

use super::conv::{AutoPad, Geometry, Window};
use super::util::{expect_inputs, show_dims};
use super::OpDef;
use crate::{op_bail, Fact, IrResult};
use slimnn_tensor::{DType, Dim, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    /// `count_include_pad`: divide by the full window size, padding included.
    Average {
        count_include_pad: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolAttrs {
    pub kernel_shape: Vec<usize>,
    pub strides: Vec<usize>,
    /// Begin pads for every spatial dim, then end pads; empty means 0.
    pub pads: Vec<usize>,
    pub dilations: Vec<usize>,
    pub ceil_mode: bool,
    pub auto_pad: AutoPad,
}

/// `MaxPool` / `AveragePool` over the spatial dims of NC... inputs (only output Y).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub kind: PoolKind,
    pub attrs: PoolAttrs,
}

/// `GlobalAveragePool` (`max == false`) / `GlobalMaxPool`: spatial dims reduce to 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalPool {
    pub max: bool,
}

fn check_rank(op: &'static str, shape: &[Dim], min: usize, max: usize) -> IrResult<()> {
    if shape.len() < min || shape.len() > max {
        op_bail!(op, "expects an input of rank {min} to {max} (N, C, spatial...), got shape {}", show_dims(shape));
    }
    Ok(())
}

impl Pool {
    fn check_dtype(&self, dt: DType) -> IrResult<()> {
        let ok = dt.is_float() || (self.kind == PoolKind::Max && matches!(dt, DType::I8 | DType::U8));
        if !ok {
            op_bail!(self.name(), "does not support {dt} inputs");
        }
        Ok(())
    }

    pub(crate) fn window(&self, shape: &[Dim]) -> IrResult<Window> {
        let op = self.name();
        check_rank(op, shape, 3, 5)?;
        let a = &self.attrs;
        if a.kernel_shape.len() != shape.len() - 2 {
            op_bail!(op, "kernel_shape {:?} does not fit the input's {} spatial dims", a.kernel_shape, shape.len() - 2);
        }
        Window::new(op, &a.kernel_shape, &a.strides, &a.pads, &a.dilations, a.auto_pad, a.ceil_mode)
    }
}

/// For one spatial dim: the input indices each output position reads, and how many of its
/// taps fall inside the input plus end padding (the `count_include_pad` divisor).
pub(crate) fn taps(g: &Geometry, d: usize) -> (Vec<Vec<usize>>, Vec<usize>) {
    let (len, s, k, dil) = (g.input[d] as i64, g.strides[d] as i64, g.kernel[d], g.dilations[d] as i64);
    (0..g.output[d])
        .map(|o| {
            let start = o as i64 * s - g.pad_begin[d];
            let pos = (0..k as i64).map(|j| start + j * dil);
            let inside = pos.clone().filter(|&p| (0..len).contains(&p)).map(|p| p as usize).collect();
            (inside, pos.filter(|&p| p < len + g.pad_end[d]).count())
        })
        .unzip()
}

impl OpDef for Pool {
    fn name(&self) -> &'static str {
        match self.kind {
            PoolKind::Max => "MaxPool",
            PoolKind::Average { .. } => "AveragePool",
        }
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs(self.name(), inputs, 1, 1)?;
        let x = inputs[0];
        self.check_dtype(x.dtype)?;
        let window = self.window(&x.shape)?;
        let spatial = window.output_dims(self.name(), &x.shape[2..])?;
        Ok(vec![Fact::new(x.dtype, [x.shape[..2].to_vec(), spatial].concat())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 1, 1)?;
        let x = inputs[0];
        self.check_dtype(x.dtype())?;
        let dims: Vec<Dim> = x.shape().iter().map(|&d| Dim::Known(d)).collect();
        let window = self.window(&dims)?;
        let g = window.geometry(op, &x.shape()[2..])?;
        let out_shape = [&x.shape()[..2], &g.output[5 - x.rank()..]].concat();
        slimnn_tensor::checked_numel(&out_shape, x.dtype())?;
        let [(td, pd), (th, ph), (tw, pw)] = [taps(&g, 0), taps(&g, 1), taps(&g, 2)];
        let (in_len, [_, ih, iw]) = (g.input_len(), g.input);
        let xv = x.to_f64_vec();
        let planes = x.shape()[0] * x.shape()[1];
        let mut y = Vec::with_capacity(planes * g.output_len());
        for p in 0..planes {
            let xp = &xv[p * in_len..][..in_len];
            for (a, ta) in td.iter().enumerate() {
                for (b, tb) in th.iter().enumerate() {
                    for (c, tc) in tw.iter().enumerate() {
                        let window = ta.iter().flat_map(|&i| {
                            tb.iter().flat_map(move |&j| tc.iter().map(move |&k| xp[(i * ih + j) * iw + k]))
                        });
                        y.push(match self.kind {
                            // Comparisons skip NaN (as ONNX Runtime does); an all-padding window gives -inf.
                            PoolKind::Max => window.fold(f64::NEG_INFINITY, |m, v| if v > m { v } else { m }),
                            PoolKind::Average { count_include_pad } => {
                                let count = if count_include_pad {
                                    pd[a] * ph[b] * pw[c]
                                } else {
                                    ta.len() * tb.len() * tc.len()
                                };
                                window.sum::<f64>() / count as f64
                            }
                        });
                    }
                }
            }
        }
        Ok(vec![Tensor::from_f64s(x.dtype(), out_shape, &y)?])
    }
}

impl OpDef for GlobalPool {
    fn name(&self) -> &'static str {
        if self.max {
            "GlobalMaxPool"
        } else {
            "GlobalAveragePool"
        }
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let op = self.name();
        expect_inputs(op, inputs, 1, 1)?;
        let x = inputs[0];
        if !x.dtype.is_float() {
            op_bail!(op, "expects a float input, got {}", x.dtype);
        }
        check_rank(op, &x.shape, 3, usize::MAX)?;
        let mut shape = x.shape.clone();
        shape[2..].fill(Dim::Known(1));
        Ok(vec![Fact::new(x.dtype, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let op = self.name();
        expect_inputs(op, inputs, 1, 1)?;
        let x = inputs[0];
        let fact = Fact::new(x.dtype(), x.shape().iter().map(|&d| Dim::Known(d)).collect());
        let out_shape = self.output_facts(&[&fact])?[0].known_shape().unwrap_or_default();
        let planes = x.shape()[0] * x.shape()[1];
        let xv = x.to_f64_vec();
        let inner = xv.len().checked_div(planes).unwrap_or(0);
        let y: Vec<f64> = (0..planes)
            .map(|p| {
                let v = &xv[p * inner..][..inner];
                if self.max {
                    v.iter().fold(f64::NEG_INFINITY, |m, &x| if x > m { x } else { m })
                } else {
                    v.iter().sum::<f64>() / inner as f64
                }
            })
            .collect();
        Ok(vec![Tensor::from_f64s(x.dtype(), out_shape, &y)?])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], v: &[f32]) -> Tensor {
        Tensor::from_vec(shape.to_vec(), v.to_vec()).unwrap()
    }

    fn seq(shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>();
        t(shape, &(1..=n).map(|i| i as f32).collect::<Vec<_>>())
    }

    fn pool(kind: PoolKind, attrs: PoolAttrs, x: &Tensor) -> IrResult<Vec<f32>> {
        let op = Pool { kind, attrs };
        let want = op.output_facts(&[&Fact::known(x.dtype(), x.shape())])?;
        let y = op.eval(&[x])?.remove(0);
        assert_eq!(want[0].known_shape().as_deref(), Some(y.shape()), "facts agree with eval");
        Ok(y.to_f64_vec().into_iter().map(|v| v as f32).collect())
    }

    fn k(kernel: &[usize]) -> PoolAttrs {
        PoolAttrs { kernel_shape: kernel.to_vec(), ..Default::default() }
    }

    const AVG: PoolKind = PoolKind::Average { count_include_pad: false };
    const AVG_PAD: PoolKind = PoolKind::Average { count_include_pad: true };

    #[test]
    fn max_and_average_2d() {
        let x = seq(&[1, 1, 4, 4]);
        let a = PoolAttrs { strides: vec![2, 2], ..k(&[2, 2]) };
        assert_eq!(pool(PoolKind::Max, a.clone(), &x).unwrap(), [6.0, 8.0, 14.0, 16.0]);
        assert_eq!(pool(AVG, a, &x).unwrap(), [3.5, 5.5, 11.5, 13.5]);
        // 3x3 window, pads 1: the corner averages 4 values, or divides by 9 with the padding
        let x = seq(&[1, 1, 3, 3]);
        let a = PoolAttrs { pads: vec![1, 1, 1, 1], ..k(&[3, 3]) };
        let y = pool(AVG, a.clone(), &x).unwrap();
        assert_eq!((y[0], y[4]), (3.0, 5.0));
        let y = pool(AVG_PAD, a, &x).unwrap();
        assert_eq!((y[0], y[4]), (12.0 / 9.0, 5.0));
    }

    #[test]
    fn ceil_mode_and_dilation() {
        let x = seq(&[1, 1, 5]);
        let a = PoolAttrs { strides: vec![2], ceil_mode: true, ..k(&[2]) };
        assert_eq!(pool(PoolKind::Max, a.clone(), &x).unwrap(), [2.0, 4.0, 5.0]);
        // the last window hangs past the input, not into padding: it averages 1 value either way
        assert_eq!(pool(AVG, a.clone(), &x).unwrap(), [1.5, 3.5, 5.0]);
        assert_eq!(pool(AVG_PAD, a, &x).unwrap(), [1.5, 3.5, 5.0]);
        // a window that would start in the end padding is dropped: 2 outputs, not 3
        let x = seq(&[1, 1, 3]);
        let a = PoolAttrs { strides: vec![2], pads: vec![1, 1], ceil_mode: true, ..k(&[2]) };
        assert_eq!(pool(PoolKind::Max, a.clone(), &x).unwrap(), [1.0, 3.0]);
        assert_eq!(pool(AVG_PAD, a, &x).unwrap(), [0.5, 2.5]);
        let x = seq(&[1, 1, 5]);
        let a = PoolAttrs { dilations: vec![2], ..k(&[2]) };
        assert_eq!(pool(PoolKind::Max, a, &x).unwrap(), [3.0, 4.0, 5.0]);
    }

    #[test]
    fn auto_pad_same() {
        let x = seq(&[1, 1, 4]);
        let a = PoolAttrs { auto_pad: AutoPad::SameUpper, ..k(&[2]) };
        assert_eq!(pool(PoolKind::Max, a.clone(), &x).unwrap(), [2.0, 3.0, 4.0, 4.0]);
        assert_eq!(pool(AVG, a.clone(), &x).unwrap(), [1.5, 2.5, 3.5, 4.0]);
        assert_eq!(pool(AVG_PAD, a, &x).unwrap(), [1.5, 2.5, 3.5, 2.0]);
        let a = PoolAttrs { auto_pad: AutoPad::SameLower, ..k(&[2]) };
        assert_eq!(pool(AVG_PAD, a, &x).unwrap(), [0.5, 1.5, 2.5, 3.5]);
        let a = PoolAttrs { auto_pad: AutoPad::Valid, pads: vec![5, 5], ..k(&[3]) };
        assert_eq!(pool(PoolKind::Max, a, &x).unwrap(), [3.0, 4.0]);
    }

    #[test]
    fn pool_3d_and_int8() {
        let x = seq(&[1, 1, 2, 2, 2]);
        assert_eq!(pool(AVG, k(&[2, 2, 2]), &x).unwrap(), [4.5]);
        let x = Tensor::from_vec(vec![1, 1, 2, 2], vec![-5i8, 7, 3, -128]).unwrap();
        let op = Pool { kind: PoolKind::Max, attrs: PoolAttrs { pads: vec![0, 0, 1, 1], ..k(&[2, 2]) } };
        let y = op.eval(&[&x]).unwrap().remove(0);
        assert_eq!(y.as_slice::<i8>().unwrap(), &[7, 7, 3, -128]);
    }

    #[test]
    fn pool_names_facts_and_errors() {
        let max = Pool { kind: PoolKind::Max, attrs: k(&[2, 2]) };
        assert_eq!(max.name(), "MaxPool");
        assert_eq!(Pool { kind: AVG, attrs: k(&[2]) }.name(), "AveragePool");
        let f = Fact::new(DType::F32, vec![Dim::sym("n"), Dim::Known(3), Dim::Known(5), Dim::sym("w")]);
        let y = max.output_facts(&[&f]).unwrap();
        assert_eq!(y[0].shape, vec![Dim::sym("n"), Dim::Known(3), Dim::Known(4), Dim::Unknown]);
        let x = seq(&[1, 1, 4, 4]);
        assert!(pool(PoolKind::Max, k(&[2]), &x).unwrap_err().to_string().contains("kernel_shape"));
        assert!(pool(PoolKind::Max, k(&[5, 5]), &x).unwrap_err().to_string().contains("exceeds"));
        assert!(pool(PoolKind::Max, PoolAttrs { strides: vec![0, 1], ..k(&[2, 2]) }, &x).is_err());
        assert!(pool(PoolKind::Max, k(&[2]), &seq(&[4, 4])).unwrap_err().to_string().contains("rank"));
        let xi = Tensor::from_vec(vec![1, 1, 2], vec![1i8, 2]).unwrap();
        assert!(pool(AVG, k(&[2]), &xi).unwrap_err().to_string().contains("i8"));
        assert!(max.eval(&[]).is_err());
    }

    #[test]
    fn global_pools() {
        let x = t(&[1, 2, 2, 2], &[1.0, 2.0, 3.0, 6.0, -1.0, -2.0, -3.0, -4.0]);
        let avg = GlobalPool { max: false };
        let y = avg.eval(&[&x]).unwrap().remove(0);
        assert_eq!(y.shape(), &[1, 2, 1, 1]);
        assert_eq!(y.as_slice::<f32>().unwrap(), &[3.0, -2.5]);
        let max = GlobalPool { max: true };
        assert_eq!(max.eval(&[&x]).unwrap()[0].as_slice::<f32>().unwrap(), &[6.0, -1.0]);
        assert_eq!((avg.name(), max.name()), ("GlobalAveragePool", "GlobalMaxPool"));
        let f = Fact::new(DType::F16, vec![Dim::sym("n"), Dim::Known(8), Dim::sym("h"), Dim::Unknown, Dim::Known(3)]);
        let y = avg.output_facts(&[&f]).unwrap();
        assert_eq!(y[0].shape, vec![Dim::sym("n"), Dim::Known(8), Dim::Known(1), Dim::Known(1), Dim::Known(1)]);
        assert!(avg.output_facts(&[&Fact::known(DType::F32, &[2, 3])]).is_err());
        assert!(avg.output_facts(&[&Fact::known(DType::I32, &[2, 3, 4])]).is_err());
        assert!(avg.eval(&[&x, &x]).is_err());
    }
}

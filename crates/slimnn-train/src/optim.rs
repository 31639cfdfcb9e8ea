//! Optimizers (SGD with momentum, AdamW) and global-norm gradient clipping. Updates follow
//! PyTorch's `torch.optim.SGD` and `torch.optim.AdamW` formulas, in f32, one element at a
//! time in a fixed order, so a step is bit-for-bit reproducible.

use crate::{Parameters, Result, TrainError};
use slimnn_tensor::Tensor;
use std::collections::BTreeMap;

/// An optimizer and its hyper-parameters, as a recipe spells them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum OptimizerConfig {
    /// `g += wd * p; buf = momentum * buf + g (buf = g on the first step);
    /// p -= lr * (nesterov ? g + momentum * buf : buf)`.
    Sgd {
        lr: f32,
        #[serde(default)]
        momentum: f32,
        #[serde(default)]
        nesterov: bool,
        #[serde(default)]
        weight_decay: f32,
    },
    /// Loshchilov & Hutter (2019): decoupled weight decay `p *= 1 - lr * wd`, then Adam with
    /// bias correction.
    #[serde(rename = "adamw")]
    AdamW {
        lr: f32,
        #[serde(default = "default_beta1")]
        beta1: f32,
        #[serde(default = "default_beta2")]
        beta2: f32,
        #[serde(default = "default_eps")]
        eps: f32,
        #[serde(default = "default_adamw_decay")]
        weight_decay: f32,
    },
}

fn default_beta1() -> f32 {
    0.9
}
fn default_beta2() -> f32 {
    0.999
}
fn default_eps() -> f32 {
    1e-8
}
fn default_adamw_decay() -> f32 {
    0.01
}

impl OptimizerConfig {
    /// The base learning rate (schedules scale it).
    pub fn lr(&self) -> f32 {
        match self {
            OptimizerConfig::Sgd { lr, .. } | OptimizerConfig::AdamW { lr, .. } => *lr,
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        let check = |key: &str, v: f32, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(format!("optimizer.{key} = {v} is out of range"))
            }
        };
        match *self {
            OptimizerConfig::Sgd { lr, momentum, weight_decay, nesterov } => {
                check("lr", lr, lr.is_finite() && lr > 0.0)?;
                check("momentum", momentum, (0.0..1.0).contains(&momentum))?;
                check("weight_decay", weight_decay, weight_decay.is_finite() && weight_decay >= 0.0)?;
                if nesterov && momentum == 0.0 {
                    return Err("optimizer.nesterov needs optimizer.momentum > 0".into());
                }
            }
            OptimizerConfig::AdamW { lr, beta1, beta2, eps, weight_decay } => {
                check("lr", lr, lr.is_finite() && lr > 0.0)?;
                check("beta1", beta1, (0.0..1.0).contains(&beta1))?;
                check("beta2", beta2, (0.0..1.0).contains(&beta2))?;
                check("eps", eps, eps.is_finite() && eps > 0.0)?;
                check("weight_decay", weight_decay, weight_decay.is_finite() && weight_decay >= 0.0)?;
            }
        }
        Ok(())
    }
}

/// Whether weight decay applies to a parameter: matrices and kernels (rank >= 2) are decayed,
/// biases and normalisation scales (rank <= 1) are not, the usual practice for both
/// convolutional nets and transformers.
pub fn decays(value: &Tensor) -> bool {
    value.rank() >= 2
}

/// An optimizer with its per-parameter state (momentum buffers or Adam moments) and step count.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimizer {
    pub config: OptimizerConfig,
    /// Updates applied so far (Adam's bias correction uses it).
    pub steps: u64,
    /// State tensors by kind (`momentum`, `exp_avg`, `exp_avg_sq`), then parameter name.
    pub state: BTreeMap<String, BTreeMap<String, Vec<f32>>>,
}

impl Optimizer {
    pub fn new(config: OptimizerConfig) -> Optimizer {
        Optimizer { config, steps: 0, state: BTreeMap::new() }
    }

    /// Removes and returns a state buffer (zeros when new), and whether it was new.
    fn take(&mut self, kind: &str, name: &str, len: usize) -> (Vec<f32>, bool) {
        match self.state.get_mut(kind).and_then(|m| m.remove(name)) {
            Some(buf) => (buf, false),
            None => (vec![0.0; len], true),
        }
    }

    fn put(&mut self, kind: &str, name: &str, buf: Vec<f32>) {
        self.state.entry(kind.to_string()).or_default().insert(name.to_string(), buf);
    }

    /// Applies one update with learning rate `lr` to every trainable parameter; `grads` has
    /// one gradient per trainable parameter, in [`Parameters::trainable_names`] order.
    pub fn step(&mut self, params: &mut Parameters, grads: &[Tensor], lr: f32) -> Result<()> {
        let trainable = params.iter().filter(|p| p.trainable).count();
        if trainable != grads.len() {
            return Err(TrainError::Invalid(format!("{} gradients for {trainable} trainable parameters", grads.len())));
        }
        self.steps += 1;
        let t = self.steps;
        let config = self.config.clone();
        for (p, g) in params.iter_mut().filter(|p| p.trainable).zip(grads) {
            if g.shape() != p.value.shape() {
                return Err(TrainError::Invalid(format!(
                    "gradient of '{}' is {:?}, the parameter is {:?}",
                    p.name,
                    g.shape(),
                    p.value.shape()
                )));
            }
            let decay = decays(&p.value);
            let g = g.as_slice::<f32>()?;
            let name = p.name.clone();
            let w = p.value.as_mut_slice::<f32>()?;
            match config {
                OptimizerConfig::Sgd { momentum, nesterov, weight_decay, .. } => {
                    let wd = if decay { weight_decay } else { 0.0 };
                    if momentum == 0.0 {
                        for (w, &g) in w.iter_mut().zip(g) {
                            *w -= lr * (g + wd * *w);
                        }
                        continue;
                    }
                    let (mut buf, fresh) = self.take("momentum", &name, w.len());
                    for ((w, &g), b) in w.iter_mut().zip(g).zip(buf.iter_mut()) {
                        let g = g + wd * *w;
                        *b = if fresh { g } else { momentum * *b + g };
                        let update = if nesterov { g + momentum * *b } else { *b };
                        *w -= lr * update;
                    }
                    self.put("momentum", &name, buf);
                }
                OptimizerConfig::AdamW { beta1, beta2, eps, weight_decay, .. } => {
                    let wd = if decay { weight_decay } else { 0.0 };
                    let bc1 = 1.0 - beta1.powi(t.min(i32::MAX as u64) as i32);
                    let bc2_sqrt = (1.0 - beta2.powi(t.min(i32::MAX as u64) as i32)).sqrt();
                    let step_size = lr / bc1;
                    let (mut m, _) = self.take("exp_avg", &name, w.len());
                    let (mut v, _) = self.take("exp_avg_sq", &name, w.len());
                    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        *w *= 1.0 - lr * wd;
                        *m = beta1 * *m + (1.0 - beta1) * g;
                        *v = beta2 * *v + (1.0 - beta2) * g * g;
                        let denom = v.sqrt() / bc2_sqrt + eps;
                        *w -= step_size * *m / denom;
                    }
                    self.put("exp_avg", &name, m);
                    self.put("exp_avg_sq", &name, v);
                }
            }
        }
        Ok(())
    }
}

/// Scales `grads` in place so their global L2 norm is at most `max_norm` (as
/// `torch.nn.utils.clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when above); returns the
/// norm before clipping, accumulated in f64.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f32) -> Result<f32> {
    let mut sum = 0.0f64;
    for g in grads.iter() {
        sum += g.as_slice::<f32>()?.iter().map(|&x| x as f64 * x as f64).sum::<f64>();
    }
    let norm = sum.sqrt() as f32;
    if norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.iter_mut() {
            for x in g.as_mut_slice::<f32>()? {
                *x *= scale;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(w: Vec<f32>, b: Vec<f32>) -> Parameters {
        let mut p = Parameters::new();
        p.push("w", Tensor::from_vec(vec![1, w.len()], w).unwrap()).unwrap();
        p.push("b", Tensor::from_vec(vec![b.len()], b).unwrap()).unwrap();
        p
    }

    fn values(p: &Parameters, name: &str) -> Vec<f32> {
        p.get(name).unwrap().value.as_slice::<f32>().unwrap().to_vec()
    }

    fn grads(w: Vec<f32>, b: Vec<f32>) -> Vec<Tensor> {
        vec![Tensor::from_vec(vec![1, w.len()], w).unwrap(), Tensor::from_vec(vec![b.len()], b).unwrap()]
    }

    fn close(a: &[f32], b: &[f32]) {
        assert!(a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs())), "{a:?} vs {b:?}");
    }

    #[test]
    fn sgd_momentum_nesterov_and_decay_by_hand() {
        let cfg = OptimizerConfig::Sgd { lr: 0.1, momentum: 0.9, nesterov: false, weight_decay: 0.5 };
        let mut p = params(vec![1.0, -2.0], vec![3.0]);
        let mut opt = Optimizer::new(cfg);
        opt.step(&mut p, &grads(vec![0.5, 1.0], vec![2.0]), 0.1).unwrap();
        // w: g' = g + 0.5 w = [1.0, 0.0]; buf = g'; w -= 0.1 * buf. b (rank 1): no decay.
        close(&values(&p, "w"), &[0.9, -2.0]);
        close(&values(&p, "b"), &[2.8]);
        opt.step(&mut p, &grads(vec![0.5, 1.0], vec![2.0]), 0.1).unwrap();
        // w0: g' = 0.5 + 0.45 = 0.95; buf = 0.9 * 1.0 + 0.95 = 1.85; w = 0.9 - 0.185.
        // w1: g' = 1.0 - 1.0 = 0.0; buf = 0.0; w = -2.0.  b: buf = 1.8 + 2 = 3.8; b = 2.8 - 0.38.
        close(&values(&p, "w"), &[0.715, -2.0]);
        close(&values(&p, "b"), &[2.42]);

        let cfg = OptimizerConfig::Sgd { lr: 0.1, momentum: 0.5, nesterov: true, weight_decay: 0.0 };
        let mut p = params(vec![1.0], vec![0.0]);
        let mut opt = Optimizer::new(cfg);
        opt.step(&mut p, &grads(vec![1.0], vec![0.0]), 0.1).unwrap();
        // buf = 1; update = g + 0.5 * buf = 1.5.
        close(&values(&p, "w"), &[0.85]);
        opt.step(&mut p, &grads(vec![1.0], vec![0.0]), 0.1).unwrap();
        // buf = 0.5 + 1 = 1.5; update = 1 + 0.75 = 1.75.
        close(&values(&p, "w"), &[0.675]);
    }

    #[test]
    fn adamw_by_hand() {
        let cfg = OptimizerConfig::AdamW { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.1 };
        let mut p = params(vec![1.0], vec![1.0]);
        let mut opt = Optimizer::new(cfg);
        opt.step(&mut p, &grads(vec![0.5], vec![0.5]), 0.01).unwrap();
        // Step 1: m_hat = g, v_hat = g^2, update = lr * g / (|g| + eps) = 0.01.
        // w: decayed first, 1 * (1 - 0.001) = 0.999, then - 0.01. b: not decayed.
        close(&values(&p, "w"), &[0.989]);
        close(&values(&p, "b"), &[0.99]);
        opt.step(&mut p, &grads(vec![-1.0], vec![-1.0]), 0.01).unwrap();
        let m = 0.9 * 0.05 + -0.1; // -0.055
        let v = 0.999 * 0.00025 + 0.001 * 1.0; // 0.00124975
        let (m_hat, v_hat) = (m / (1.0 - 0.81), v / (1.0 - 0.998001));
        let upd = 0.01 * m_hat / (f64::sqrt(v_hat) + 1e-8);
        close(&values(&p, "w"), &[((0.989 * (1.0 - 0.001)) - upd) as f32]);
        close(&values(&p, "b"), &[(0.99 - upd) as f32]);
        assert_eq!(opt.steps, 2);
        close(&opt.state["exp_avg"]["w"], &[-0.055]);
    }

    #[test]
    fn frozen_parameters_are_not_updated() {
        let mut p = params(vec![1.0], vec![1.0]);
        p.freeze(&["w".into()]).unwrap();
        let mut opt =
            Optimizer::new(OptimizerConfig::Sgd { lr: 1.0, momentum: 0.0, nesterov: false, weight_decay: 0.0 });
        assert!(opt.step(&mut p, &grads(vec![1.0], vec![1.0]), 1.0).is_err(), "one gradient per trainable parameter");
        opt.step(&mut p, &[Tensor::from_vec(vec![1], vec![0.25f32]).unwrap()], 1.0).unwrap();
        assert_eq!(values(&p, "w"), vec![1.0]);
        assert_eq!(values(&p, "b"), vec![0.75]);
    }

    #[test]
    fn clipping_scales_to_the_max_norm() {
        let mut g = grads(vec![3.0], vec![4.0]);
        let norm = clip_grad_norm(&mut g, 1.0).unwrap();
        assert_eq!(norm, 5.0);
        close(&g[0].to_f64_vec().iter().map(|&x| x as f32).collect::<Vec<_>>(), &[0.6]);
        close(&g[1].to_f64_vec().iter().map(|&x| x as f32).collect::<Vec<_>>(), &[0.8]);
        let mut small = grads(vec![0.3], vec![0.4]);
        assert_eq!(clip_grad_norm(&mut small, 1.0).unwrap(), 0.5);
        assert_eq!(small[0].as_slice::<f32>().unwrap(), &[0.3]);
    }
}

//! Learning-rate schedules: an optional linear warm-up, then constant, cosine, linear or step
//! decay. `lr(step)` is the rate of update number `step` (0-based).

/// How the rate decays after warm-up, as a recipe spells it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum ScheduleConfig {
    Constant {
        #[serde(default)]
        warmup_steps: u64,
    },
    /// Half a cosine from the base rate down to `min_lr_ratio * base` at the last step.
    Cosine {
        #[serde(default)]
        warmup_steps: u64,
        #[serde(default)]
        min_lr_ratio: f32,
    },
    /// Straight line from the base rate down to `min_lr_ratio * base` at the last step.
    Linear {
        #[serde(default)]
        warmup_steps: u64,
        #[serde(default)]
        min_lr_ratio: f32,
    },
    /// Multiplied by `gamma` every `step_size` steps after warm-up.
    Step {
        #[serde(default)]
        warmup_steps: u64,
        step_size: u64,
        gamma: f32,
    },
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig::Constant { warmup_steps: 0 }
    }
}

impl ScheduleConfig {
    pub fn warmup_steps(&self) -> u64 {
        match *self {
            ScheduleConfig::Constant { warmup_steps }
            | ScheduleConfig::Cosine { warmup_steps, .. }
            | ScheduleConfig::Linear { warmup_steps, .. }
            | ScheduleConfig::Step { warmup_steps, .. } => warmup_steps,
        }
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        match *self {
            ScheduleConfig::Cosine { min_lr_ratio, .. } | ScheduleConfig::Linear { min_lr_ratio, .. }
                if !(0.0..=1.0).contains(&min_lr_ratio) =>
            {
                Err(format!("schedule.min_lr_ratio = {min_lr_ratio} must be in [0, 1]"))
            }
            ScheduleConfig::Step { step_size: 0, .. } => Err("schedule.step_size must be at least 1".into()),
            ScheduleConfig::Step { gamma, .. } if !(gamma.is_finite() && gamma > 0.0) => {
                Err(format!("schedule.gamma = {gamma} must be positive"))
            }
            _ => Ok(()),
        }
    }

    /// The rate of update `step` out of `total_steps`, for base rate `base`. Warm-up rises
    /// linearly, `base * (step + 1) / warmup_steps`, so the first update is not wasted at 0.
    pub fn lr(&self, base: f32, step: u64, total_steps: u64) -> f32 {
        let warmup = self.warmup_steps();
        if step < warmup {
            return base * (step + 1) as f32 / warmup as f32;
        }
        let after = (step - warmup) as f64;
        let span = total_steps.saturating_sub(warmup).saturating_sub(1).max(1) as f64;
        let progress = (after / span).min(1.0);
        let base64 = base as f64;
        let lr = match *self {
            ScheduleConfig::Constant { .. } => base64,
            ScheduleConfig::Cosine { min_lr_ratio, .. } => {
                let min = base64 * min_lr_ratio as f64;
                min + (base64 - min) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            ScheduleConfig::Linear { min_lr_ratio, .. } => {
                let min = base64 * min_lr_ratio as f64;
                base64 + (min - base64) * progress
            }
            ScheduleConfig::Step { step_size, gamma, .. } => {
                base64 * (gamma as f64).powi(((step - warmup) / step_size).min(i32::MAX as u64) as i32)
            }
        };
        lr as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f32, b: f32) {
        assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()), "{a} vs {b}");
    }

    #[test]
    fn warmup_then_cosine() {
        let s = ScheduleConfig::Cosine { warmup_steps: 4, min_lr_ratio: 0.1 };
        let lrs: Vec<f32> = (0..14).map(|t| s.lr(1.0, t, 14)).collect();
        close(lrs[0], 0.25);
        close(lrs[3], 1.0);
        close(lrs[4], 1.0); // first decayed step starts at the base
        close(lrs[13], 0.1); // the last step reaches the floor
                             // Midway (progress 0.5): min + (base - min) / 2.
        let s = ScheduleConfig::Cosine { warmup_steps: 0, min_lr_ratio: 0.0 };
        close(s.lr(2.0, 5, 11), 1.0);
        assert!(lrs.windows(2).skip(4).all(|w| w[1] <= w[0]));
    }

    #[test]
    fn linear_step_constant() {
        let s = ScheduleConfig::Linear { warmup_steps: 0, min_lr_ratio: 0.0 };
        close(s.lr(1.0, 0, 5), 1.0);
        close(s.lr(1.0, 2, 5), 0.5);
        close(s.lr(1.0, 4, 5), 0.0);
        let s = ScheduleConfig::Step { warmup_steps: 2, step_size: 3, gamma: 0.5 };
        let lrs: Vec<f32> = (0..9).map(|t| s.lr(0.8, t, 100)).collect();
        assert_eq!(lrs, vec![0.4, 0.8, 0.8, 0.8, 0.8, 0.4, 0.4, 0.4, 0.2]);
        let s = ScheduleConfig::Constant { warmup_steps: 0 };
        assert_eq!(s.lr(0.3, 1000, 10), 0.3);
        assert!(ScheduleConfig::Step { warmup_steps: 0, step_size: 0, gamma: 0.5 }.validate().is_err());
        assert!(ScheduleConfig::Cosine { warmup_steps: 0, min_lr_ratio: 2.0 }.validate().is_err());
    }
}

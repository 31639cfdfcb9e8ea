//! Training recipes: a typed, versioned TOML file. Unknown keys are errors (a misspelt key
//! would otherwise silently keep a default), and messages name the key and line.
//!
//! ```toml
//! version = 1
//! seed = 0
//! epochs = 10
//! batch_size = 64
//! clip_grad_norm = 1.0
//! freeze = ["embeddings.*"]
//!
//! [optimizer]
//! kind = "adamw"        # or "sgd" (momentum, nesterov, weight_decay)
//! lr = 1e-3
//! weight_decay = 0.01
//!
//! [schedule]
//! kind = "cosine"       # "constant", "linear", "step" (step_size, gamma)
//! warmup_steps = 100
//!
//! [loss]
//! kind = "cross_entropy" # "distill" (temperature, alpha), "mse", "cosine"
//! label_smoothing = 0.1
//!
//! [task]                # free-form: read by the command that builds the model and data
//! model = "lenet5"
//! ```

use crate::loss::LossConfig;
use crate::optim::OptimizerConfig;
use crate::schedule::ScheduleConfig;
use crate::{Result, TrainError};
use std::path::Path;

/// The recipe format version this build reads.
pub const RECIPE_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Format version; must be [`RECIPE_VERSION`].
    pub version: u32,
    /// Seeds the batch order (and whatever a task initialises randomly).
    #[serde(default)]
    pub seed: u64,
    pub epochs: usize,
    pub batch_size: usize,
    /// Evaluation batch size (defaults to `batch_size`).
    #[serde(default)]
    pub eval_batch_size: Option<usize>,
    /// Runtime threads (defaults to the machine's physical cores).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Drop each epoch's last, smaller batch.
    #[serde(default)]
    pub drop_last: bool,
    /// Stop after this many updates (before `epochs` are done).
    #[serde(default)]
    pub max_steps: Option<u64>,
    /// Clip gradients to this global L2 norm.
    #[serde(default)]
    pub clip_grad_norm: Option<f32>,
    /// Glob patterns (`*`) of parameters not to train.
    #[serde(default)]
    pub freeze: Vec<String>,
    /// Write a checkpoint every this many updates (and always at the end of an epoch).
    #[serde(default)]
    pub checkpoint_every: Option<u64>,
    pub optimizer: OptimizerConfig,
    #[serde(default)]
    pub schedule: ScheduleConfig,
    #[serde(default)]
    pub loss: LossConfig,
    /// Task settings for the command that builds the model and data (not read here).
    #[serde(default)]
    pub task: toml::Table,
}

impl Recipe {
    /// A recipe with defaults for everything but the essentials (handy for code and tests).
    pub fn new(epochs: usize, batch_size: usize, optimizer: OptimizerConfig) -> Recipe {
        Recipe {
            version: RECIPE_VERSION,
            seed: 0,
            epochs,
            batch_size,
            eval_batch_size: None,
            threads: None,
            drop_last: false,
            max_steps: None,
            clip_grad_norm: None,
            freeze: vec![],
            checkpoint_every: None,
            optimizer,
            schedule: ScheduleConfig::default(),
            loss: LossConfig::default(),
            task: toml::Table::new(),
        }
    }

    /// Parses and validates TOML text; `origin` names it in errors (a path or "<string>").
    pub fn from_toml(text: &str, origin: &str) -> Result<Recipe> {
        let err = |msg: String| TrainError::Recipe { origin: origin.to_string(), msg };
        let recipe: Recipe = toml::from_str(text).map_err(|e| err(describe_toml_error(text, &e)))?;
        recipe.validate().map_err(err)?;
        Ok(recipe)
    }

    pub fn load(path: &Path) -> Result<Recipe> {
        let text = std::fs::read_to_string(path).map_err(|e| crate::file_err(path, e))?;
        Recipe::from_toml(&text, &path.display().to_string())
    }

    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| TrainError::Invalid(format!("recipe to TOML: {e}")))
    }

    /// Checks values serde cannot: the version, positive sizes, ranges of rates.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.version != RECIPE_VERSION {
            return Err(format!(
                "version = {} is not supported (this build reads version {RECIPE_VERSION})",
                self.version
            ));
        }
        if self.epochs == 0 {
            return Err("epochs must be at least 1".into());
        }
        if self.batch_size == 0 || self.eval_batch_size == Some(0) {
            return Err("batch_size and eval_batch_size must be at least 1".into());
        }
        if self.threads == Some(0) {
            return Err("threads must be at least 1".into());
        }
        if self.checkpoint_every == Some(0) || self.max_steps == Some(0) {
            return Err("checkpoint_every and max_steps must be at least 1".into());
        }
        if let Some(c) = self.clip_grad_norm {
            if !(c.is_finite() && c > 0.0) {
                return Err(format!("clip_grad_norm = {c} must be positive"));
            }
        }
        self.optimizer.validate()?;
        self.schedule.validate()?;
        self.loss.validate()
    }
}

/// toml's message plus the line and column it points at. Serde reports an unknown key of a
/// tagged table (optimizer, schedule, loss) at the table's header; the key's own line is then
/// looked up below it.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().to_string();
    let Some(span) = e.span() else { return msg };
    let mut start = span.start.min(text.len());
    if let Some(key) = msg.strip_prefix("unknown field `").and_then(|r| r.split('`').next()) {
        let mut offset = start;
        for line in text[start..].split_inclusive('\n') {
            let trimmed = line.trim_start();
            if trimmed.starts_with(key) && trimmed[key.len()..].trim_start().starts_with('=') {
                start = offset + (line.len() - trimmed.len());
                break;
            }
            offset += line.len();
        }
    }
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    let snippet = text.lines().nth(line - 1).unwrap_or("").trim();
    format!("line {line}, column {column}: {msg} (at `{snippet}`)")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
version = 1
seed = 3
epochs = 2
batch_size = 32
clip_grad_norm = 1.0
freeze = ["embeddings.*"]

[optimizer]
kind = "adamw"
lr = 1e-3

[schedule]
kind = "cosine"
warmup_steps = 10

[loss]
kind = "cross_entropy"
label_smoothing = 0.1

[task]
model = "lenet5"
"#;

    #[test]
    fn parses_defaults_and_round_trips() {
        let r = Recipe::from_toml(GOOD, "good.toml").unwrap();
        assert_eq!(
            r.optimizer,
            OptimizerConfig::AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 }
        );
        assert_eq!(r.schedule, ScheduleConfig::Cosine { warmup_steps: 10, min_lr_ratio: 0.0 });
        assert_eq!(r.loss, LossConfig::CrossEntropy { label_smoothing: 0.1 });
        assert_eq!(r.task.get("model").and_then(|v| v.as_str()), Some("lenet5"));
        let again = Recipe::from_toml(&r.to_toml().unwrap(), "again").unwrap();
        assert_eq!(again, r);
        let minimal = "version = 1\nepochs = 1\nbatch_size = 8\n[optimizer]\nkind = \"sgd\"\nlr = 0.1\n";
        let m = Recipe::from_toml(minimal, "min").unwrap();
        assert_eq!(m.schedule, ScheduleConfig::Constant { warmup_steps: 0 });
        assert_eq!(m.loss, LossConfig::CrossEntropy { label_smoothing: 0.0 });
    }

    fn error_of(text: &str) -> String {
        Recipe::from_toml(text, "bad.toml").unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let e = error_of(&GOOD.replace("clip_grad_norm", "clip_grad_nrom"));
        assert!(e.contains("bad.toml") && e.contains("clip_grad_nrom") && e.contains("line 6"), "{e}");
        let e = error_of(&GOOD.replace("label_smoothing = 0.1", "label_smothing = 0.1"));
        assert!(e.contains("label_smothing") && e.contains("line 19"), "{e}");
        let e = error_of(&GOOD.replace("\"adamw\"", "\"adam\""));
        assert!(e.contains("adam") && e.contains("line 10"), "{e}");
        let e = error_of(&GOOD.replace("batch_size = 32", "batch_size = \"32\""));
        assert!(e.contains("line 5"), "{e}");
        let e = error_of(&GOOD.replace("version = 1", "version = 2"));
        assert!(e.contains("version = 2"), "{e}");
        let e = error_of(&GOOD.replace("lr = 1e-3", "lr = -1.0"));
        assert!(e.contains("optimizer.lr"), "{e}");
        let e = error_of(&GOOD.replace("label_smoothing = 0.1", "label_smoothing = 1.5"));
        assert!(e.contains("label_smoothing"), "{e}");
        let e = error_of(&GOOD.replace("epochs = 2\n", ""));
        assert!(e.contains("epochs"), "{e}");
        let e = error_of("version = 1\nepochs = [");
        assert!(e.contains("line 2"), "{e}");
    }
}

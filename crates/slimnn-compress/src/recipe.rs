//! Quantization recipes: typed, versioned, serde (unknown fields are errors).

use crate::quant::Granularity;
use crate::range::{ActivationType, CalibrationMethod};
use crate::{CompressError, Result};
use serde::{Deserialize, Serialize};

/// The recipe format version this build reads and writes.
pub const RECIPE_VERSION: u32 = 1;

/// Which quantization scheme.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// int8 weights offline, u8 activations quantized at run time per tensor
    /// (`DynamicQuantizeLinear` + `MatMulInteger`, the pattern ONNX Runtime's `quantize_dynamic` writes).
    Dynamic,
    /// int8 weights and calibrated activations as `QuantizeLinear`/`DequantizeLinear` pairs.
    Static,
    /// Only weights quantized: int8 per channel (`DequantizeLinear`) or 4-bit group-wise (`MatMulNBits`).
    WeightOnly,
    /// bf16 weights (`Cast` to f32 before the matmul).
    Bf16,
    /// fp16 weights (`Cast` to f32 before the matmul).
    Fp16,
}

/// How many scales a run-time quantized activation gets (dynamic mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActivationGranularity {
    /// One scale and zero point per row (token): `ai.slimnn.DynamicRowQuantMatMul`.
    PerToken,
    /// One per tensor: the `DynamicQuantizeLinear` + `MatMulInteger` pattern of ONNX Runtime.
    PerTensor,
}

/// What the layers an error budget keeps in higher precision become.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// Float (int8 weights where the recipe is 4-bit weight-only).
    #[default]
    Float,
    /// int8 with activation scales taken per token at run time (static mode): every matmul
    /// stays on the integer kernels, and only the layers calibrated scales hurt most pay for
    /// the run-time range.
    Dynamic,
}

/// Most outlier channels per activation: each one costs a float multiply-add per output.
pub const MAX_OUTLIER_CHANNELS: usize = 64;

/// Everything `slimnn quantize` can be asked to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct QuantRecipe {
    pub version: u32,
    pub mode: Mode,
    /// Weight bits: 8, or 4 (weight-only).
    pub bits: u8,
    /// Values per scale along K for 4-bit weights.
    pub group_size: usize,
    /// int8 weight scales per output channel or per tensor.
    pub granularity: Granularity,
    /// Run-time activation scales of dynamic quantization (default per token); static
    /// activations are calibrated per tensor.
    pub activation_granularity: Option<ActivationGranularity>,
    /// Activation integer type of static quantization.
    pub activation_type: ActivationType,
    pub calibration_method: CalibrationMethod,
    /// Percentile kept on each side by [`CalibrationMethod::Percentile`].
    pub percentile: f64,
    /// SmoothQuant migration strength (0..=1), applied before dynamic or static quantization.
    pub smoothquant_alpha: Option<f32>,
    /// GPTQ instead of round-to-nearest for weight-only quantization.
    pub gptq: bool,
    /// Subtract the expected output shift of quantized weights from the layer's bias.
    pub bias_correction: bool,
    /// Node name patterns left in float (`*` matches any run of characters; without `*`, a substring).
    pub exclude: Vec<String>,
    /// Keep the most sensitive layers in higher precision until the mean relative output
    /// error on calibration data is at most this.
    pub error_budget: Option<f64>,
    /// What the layers the error budget keeps become.
    pub fallback: Fallback,
    /// Also quantize matmuls whose both operands are activations (attention), static mode only.
    pub quantize_activation_matmuls: bool,
    /// Static mode: this many channels of largest calibrated magnitude per weight-matmul
    /// activation stay out of its range and multiply their weight rows in float (0: none).
    pub outlier_channels: usize,
    /// Also store embedding tables (constant `Gather` tables) block-quantized (8-bit, or 4-bit
    /// in `group_size` blocks when `bits` is 4).
    pub quantize_embeddings: bool,
}

impl Default for QuantRecipe {
    fn default() -> Self {
        QuantRecipe {
            version: RECIPE_VERSION,
            mode: Mode::Dynamic,
            bits: 8,
            group_size: 32,
            granularity: Granularity::PerChannel,
            activation_granularity: None,
            activation_type: ActivationType::U8,
            calibration_method: CalibrationMethod::Minmax,
            percentile: 99.99,
            smoothquant_alpha: None,
            gptq: false,
            bias_correction: false,
            exclude: vec![],
            error_budget: None,
            fallback: Fallback::Float,
            quantize_activation_matmuls: false,
            outlier_channels: 0,
            quantize_embeddings: false,
        }
    }
}

impl QuantRecipe {
    /// Whether the recipe needs calibration data.
    pub fn needs_data(&self) -> bool {
        self.mode == Mode::Static
            || self.smoothquant_alpha.is_some()
            || self.gptq
            || self.bias_correction
            || self.error_budget.is_some()
    }

    /// Rejects impossible requests with a message that says what to change.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CompressError::Recipe(m));
        if self.version != RECIPE_VERSION {
            return bad(format!(
                "recipe version {} is not supported (this build reads {RECIPE_VERSION})",
                self.version
            ));
        }
        match (self.mode, self.bits) {
            (_, b) if b != 8 && b != 4 => return bad(format!("--bits must be 8 or 4, got {b}")),
            (Mode::Dynamic | Mode::Static, 4) => {
                return bad(
                    "4-bit activations are not supported: --bits 4 is for weights only (use --mode weight-only)".into(),
                )
            }
            (Mode::Bf16 | Mode::Fp16, 4) => return bad("--bits does not apply to --mode bf16/fp16".into()),
            _ => {}
        }
        if self.bits == 4 && (!(16..=256).contains(&self.group_size) || !self.group_size.is_power_of_two()) {
            return bad(format!("--group-size must be a power of two from 16 to 256, got {}", self.group_size));
        }
        if self.bits == 4 && self.granularity == Granularity::PerTensor {
            return bad(
                "4-bit weights are group-wise: --granularity per-tensor does not apply (use --group-size)".into()
            );
        }
        if self.activation_granularity.is_some() && self.mode != Mode::Dynamic {
            return bad(
                "--activation-granularity applies to --mode dynamic (static activation scales are calibrated per tensor)"
                    .into(),
            );
        }
        if !(50.0..=100.0).contains(&self.percentile) {
            return bad(format!("--percentile must be within 50..=100, got {}", self.percentile));
        }
        if let Some(a) = self.smoothquant_alpha {
            if !(0.0..=1.0).contains(&a) {
                return bad(format!("--smoothquant alpha must be within 0..=1, got {a}"));
            }
            if !matches!(self.mode, Mode::Dynamic | Mode::Static) {
                return bad("--smoothquant applies to --mode dynamic or static".into());
            }
        }
        if self.gptq && self.mode != Mode::WeightOnly {
            return bad("--gptq applies to --mode weight-only".into());
        }
        if self.quantize_embeddings && matches!(self.mode, Mode::Bf16 | Mode::Fp16) {
            return bad("--quantize-embeddings applies to the integer modes".into());
        }
        if self.quantize_activation_matmuls && self.mode != Mode::Static {
            return bad("quantizing activation-by-activation matmuls needs --mode static".into());
        }
        if let Some(b) = self.error_budget {
            if b.is_nan() || b <= 0.0 {
                return bad(format!("--error-budget must be positive, got {b}"));
            }
        }
        if self.fallback == Fallback::Dynamic && (self.mode != Mode::Static || self.error_budget.is_none()) {
            return bad("--fallback dynamic applies to --mode static with --error-budget".into());
        }
        if self.outlier_channels > 0 && self.mode != Mode::Static {
            return bad("--outlier-channels applies to --mode static (dynamic scales follow each token already)".into());
        }
        if self.outlier_channels > MAX_OUTLIER_CHANNELS {
            return bad(format!(
                "--outlier-channels {} is more than {MAX_OUTLIER_CHANNELS}: that many float channels cost more than they save",
                self.outlier_channels
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipes_round_trip_and_reject_unknown_fields() {
        let r = QuantRecipe { mode: Mode::WeightOnly, bits: 4, gptq: true, ..Default::default() };
        let s = serde_json::to_string(&r).unwrap();
        assert!(s.contains("\"weight-only\""));
        assert_eq!(serde_json::from_str::<QuantRecipe>(&s).unwrap(), r);
        assert!(serde_json::from_str::<QuantRecipe>(r#"{"mode":"static","bitz":4}"#).is_err());
    }

    #[test]
    fn impossible_requests_are_refused() {
        let err = |r: QuantRecipe| r.validate().unwrap_err().to_string();
        assert!(err(QuantRecipe { mode: Mode::Static, bits: 4, ..Default::default() }).contains("4-bit activations"));
        assert!(err(QuantRecipe { mode: Mode::WeightOnly, bits: 4, group_size: 48, ..Default::default() })
            .contains("power of two"));
        assert!(err(QuantRecipe { gptq: true, ..Default::default() }).contains("weight-only"));
        let per_token_static = QuantRecipe {
            mode: Mode::Static,
            activation_granularity: Some(ActivationGranularity::PerToken),
            ..Default::default()
        };
        assert!(err(per_token_static).contains("--mode dynamic"));
        assert!(err(QuantRecipe { outlier_channels: 8, ..Default::default() }).contains("--outlier-channels"));
        let many = QuantRecipe { mode: Mode::Static, outlier_channels: 65, ..Default::default() };
        assert!(err(many).contains("more than 64"));
        let fallback = QuantRecipe { fallback: Fallback::Dynamic, ..Default::default() };
        assert!(err(fallback.clone()).contains("--fallback dynamic"));
        let no_budget = QuantRecipe { mode: Mode::Static, ..fallback.clone() };
        assert!(err(no_budget.clone()).contains("--error-budget"));
        QuantRecipe { error_budget: Some(0.05), ..no_budget }.validate().unwrap();
        QuantRecipe { mode: Mode::WeightOnly, bits: 4, group_size: 128, ..Default::default() }.validate().unwrap();
    }
}

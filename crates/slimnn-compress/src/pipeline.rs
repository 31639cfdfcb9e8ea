//! A whole quantization run from a recipe: SmoothQuant (its own calibration pass, since it
//! changes the activations the next pass measures), one calibration pass for the scheme's
//! statistics, the rewrite, then optional sensitivity analysis and mixed precision.

use crate::calib::{calibrate, BatchSource, Statistics};
use crate::mixed::{output_error, run_all};
use crate::recipe::{ActivationGranularity, Fallback, Mode, QuantRecipe};
use crate::report::{Report, METADATA_KEY};
use crate::schemes::{Dynamic, EmbeddingBlock, HalfWeights, Selection, StaticQdq, WeightOnly};
use crate::smoothquant::SmoothQuant;
use crate::{Algorithm, CompressError, Result};
use slimnn_ir::{Graph, PassRunner};
use slimnn_tensor::DType;
use std::collections::HashSet;

/// Progress of a long step: `(stage, done, total)`.
pub struct Progress<'a> {
    pub stage: &'a str,
    pub done: usize,
    pub total: usize,
}

/// Batches the error budget is measured on (the first ones of the calibration data).
pub const EVAL_BATCHES: usize = 4;

/// The scheme a recipe asks for, over `selection`.
pub fn scheme(recipe: &QuantRecipe, selection: Selection) -> Box<dyn Algorithm> {
    match recipe.mode {
        Mode::Dynamic => {
            let per_token = recipe.activation_granularity != Some(ActivationGranularity::PerTensor);
            Box::new(Dynamic {
                granularity: recipe.granularity,
                per_token,
                selection,
                bias_correction: recipe.bias_correction,
            })
        }
        Mode::Static => Box::new(StaticQdq {
            granularity: recipe.granularity,
            activation_type: recipe.activation_type,
            method: recipe.calibration_method,
            percentile: recipe.percentile,
            selection,
            bias_correction: recipe.bias_correction,
            activation_matmuls: recipe.quantize_activation_matmuls,
            outlier_channels: recipe.outlier_channels,
        }),
        Mode::WeightOnly => Box::new(WeightOnly {
            bits: recipe.bits as usize,
            group_size: recipe.group_size,
            granularity: recipe.granularity,
            gptq: recipe.gptq,
            selection,
            bias_correction: recipe.bias_correction,
        }),
        Mode::Bf16 => Box::new(HalfWeights { dtype: DType::BF16, selection }),
        Mode::Fp16 => Box::new(HalfWeights { dtype: DType::F16, selection }),
    }
}

fn gather(
    g: &Graph,
    algo: &dyn Algorithm,
    data: &dyn BatchSource,
    stage: &str,
    progress: &mut dyn FnMut(Progress),
) -> Result<Statistics> {
    let points = algo.statistic_points(g)?;
    if points.is_empty() {
        return Ok(Statistics::default());
    }
    let total = data.batches();
    calibrate(g, &points, data, slimnn_runtime::physical_cores(), &mut |done| progress(Progress { stage, done, total }))
}

/// Quantizes `graph` as `recipe` says, calibrating on `data` when the recipe needs it.
pub fn quantize(
    graph: &Graph,
    recipe: &QuantRecipe,
    data: &dyn BatchSource,
    progress: &mut dyn FnMut(Progress),
) -> Result<(Graph, Report)> {
    recipe.validate()?;
    if recipe.needs_data() && data.batches() == 0 {
        return Err(CompressError::Recipe(
            "this recipe needs calibration data (--calibration FILE), and none was given".into(),
        ));
    }
    let mut report = Report::default();
    let base = Selection { exclude: recipe.exclude.clone(), skip: HashSet::new() };
    let mut g = crate::targets::split_gemms(graph)?;
    // Convolutions are quantized with their inference BatchNormalization folded in, as they run.
    PassRunner::new().with(slimnn_runtime::FoldConvBatchNorm).run(&mut g)?;
    if let Some(alpha) = recipe.smoothquant_alpha {
        let sq = SmoothQuant { alpha, selection: base.clone() };
        let stats = gather(&g, &sq, data, "smoothquant statistics", progress)?;
        let (smoothed, r) = sq.apply(&g, &stats)?;
        g = smoothed;
        report.merge(r);
    }
    let algo = scheme(recipe, base.clone());
    let stats = gather(&g, algo.as_ref(), data, "calibration", progress)?;
    let (mut q, r) = algo.apply(&g, &stats)?;
    report.merge(r);

    if let Some(budget) = recipe.error_budget {
        let names: Vec<String> = graph.outputs().iter().map(|(n, _)| n.clone()).collect();
        let threads = slimnn_runtime::physical_cores();
        let batches = data.batches().min(EVAL_BATCHES);
        let reference = run_all(graph, data, batches, threads)?;
        let error_of =
            |cand: &Graph| -> Result<f64> { output_error(&names, &reference, &run_all(cand, data, batches, threads)?) };
        let full = error_of(&q)?;
        let layers: Vec<String> = report.layers.iter().map(|l| l.node.clone()).collect();
        let mut sens = Vec::with_capacity(layers.len());
        for (i, layer) in layers.iter().enumerate() {
            progress(Progress { stage: "sensitivity", done: i, total: layers.len() });
            let skip: HashSet<String> = layers.iter().filter(|l| *l != layer).cloned().collect();
            let one = scheme(recipe, Selection { exclude: recipe.exclude.clone(), skip });
            let (gq, _) = one.apply(&g, &stats)?;
            sens.push(error_of(&gq)?);
        }
        progress(Progress { stage: "sensitivity", done: layers.len(), total: layers.len() });
        for (l, s) in report.layers.iter_mut().zip(&sens) {
            l.sensitivity = Some(*s);
        }
        let mut order: Vec<usize> = (0..layers.len()).collect();
        order.sort_by(|&a, &b| sens[b].total_cmp(&sens[a]));
        let fallback = fallback_recipe(recipe);
        let build = |kept: usize| -> Result<(Graph, Report)> {
            let skip: HashSet<String> = order[..kept].iter().map(|&i| layers[i].clone()).collect();
            let (mut gq, mut r) = if kept == layers.len() {
                // Nothing left for the first scheme.
                (g.clone(), Report::default())
            } else {
                scheme(recipe, Selection { exclude: recipe.exclude.clone(), skip: skip.clone() }).apply(&g, &stats)?
            };
            if let Some(second) = fallback.as_ref().filter(|_| !skip.is_empty()) {
                // The kept layers are the float matmuls left: the second scheme takes those.
                let (g2, r2) = scheme(second, Selection { exclude: recipe.exclude.clone(), skip: HashSet::new() })
                    .apply(&gq, &Statistics::default())?;
                gq = g2;
                r.merge(r2);
            }
            Ok((gq, r))
        };
        let mut chosen = (0usize, full);
        if full > budget {
            // Fewest kept layers meeting the budget: binary search over the ranking.
            let (mut lo, mut hi) = (1usize, layers.len());
            let mut best: Option<(usize, f64)> = None;
            while lo <= hi {
                let mid = (lo + hi) / 2;
                progress(Progress { stage: "mixed precision", done: mid, total: layers.len() });
                let (gq, _) = build(mid)?;
                let e = error_of(&gq)?;
                if e <= budget {
                    best = Some((mid, e));
                    if mid == 1 {
                        break;
                    }
                    hi = mid - 1;
                } else {
                    lo = mid + 1;
                }
            }
            let (gq, r) = build(best.map_or(layers.len(), |b| b.0))?;
            chosen = match best {
                Some(b) => b,
                // Every layer kept: float meets any budget; a fallback scheme may not.
                None if fallback.is_some() => (layers.len(), error_of(&gq)?),
                None => (layers.len(), 0.0),
            };
            q = gq;
            let kept: HashSet<&String> = order[..chosen.0].iter().map(|&i| &layers[i]).collect();
            for l in report.layers.iter_mut() {
                if kept.contains(&l.node) {
                    let rank = order.iter().position(|&i| layers[i] == l.node).unwrap_or(0) + 1;
                    match r.layers.iter().rev().find(|x| x.node == l.node && fallback.is_some()) {
                        Some(x) => {
                            l.scheme = x.scheme.clone();
                            l.bits = x.bits;
                            l.weight_scale = x.weight_scale;
                            l.weight_sqnr_db = x.weight_sqnr_db;
                            l.activation = None;
                            l.activation_sqnr_db = None;
                        }
                        None => {
                            l.scheme = "fp32".into();
                            l.bits = 32;
                            l.weight_scale = None;
                            l.weight_sqnr_db = None;
                            l.activation = None;
                            l.activation_sqnr_db = None;
                        }
                    }
                    l.note = Some(format!("kept in higher precision (sensitivity rank {rank})"));
                }
            }
        }
        report.notes.push(format!(
            "error budget {budget}: mean relative output error {full:.5} with every layer quantized, {:.5} with the {} most sensitive kept in higher precision (over {batches} calibration batches)",
            chosen.1, chosen.0
        ));
    }
    if recipe.quantize_embeddings {
        // Tables follow the weights' precision: 4-bit in the recipe's groups, else 8-bit in
        // blocks of 128 (finer blocks cost size and gain nothing measurable at 8 bits).
        let (bits, block_size) = if recipe.bits == 4 { (4, recipe.group_size) } else { (8, 128) };
        let (g2, r) = EmbeddingBlock { bits, block_size, selection: base.clone() }.apply(&q, &Statistics::default())?;
        q = g2;
        report.merge(r);
    }
    q.metadata.insert(METADATA_KEY.into(), serde_json::to_string(&report).unwrap_or_default());
    q.metadata.insert(format!("{METADATA_KEY}.recipe"), serde_json::to_string(recipe).unwrap_or_default());
    Ok((q, report))
}

/// The scheme the layers an error budget keeps get instead of float: int8 weights for a 4-bit
/// recipe, int8 with per-token run-time activation scales for a static one with
/// [`Fallback::Dynamic`]; None where they stay float.
fn fallback_recipe(recipe: &QuantRecipe) -> Option<QuantRecipe> {
    if recipe.bits == 4 {
        Some(QuantRecipe { bits: 8, gptq: false, bias_correction: false, ..recipe.clone() })
    } else if recipe.mode == Mode::Static && recipe.fallback == Fallback::Dynamic {
        Some(QuantRecipe {
            mode: Mode::Dynamic,
            activation_granularity: Some(ActivationGranularity::PerToken),
            smoothquant_alpha: None,
            bias_correction: false,
            quantize_activation_matmuls: false,
            ..recipe.clone()
        })
    } else {
        None
    }
}

//! The training log (JSON) and its loss curve (SVG, drawn here: a few lines of markup do not
//! justify a plotting dependency).

use crate::{write_atomic, Result, TrainError};
use std::fmt::Write as _;
use std::path::Path;

/// One update.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub epoch: usize,
    pub loss: f32,
    pub lr: f32,
    /// Examples in the batch and how many the model classified right (0 without labels).
    pub examples: usize,
    pub correct: usize,
    /// Global gradient norm before clipping (when clipping is on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f32>,
}

/// One epoch: training averages over its steps, evaluation on the test set, and speed.
/// Values that do not exist (accuracy without labels) are NaN, written as JSON `null`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    #[serde(deserialize_with = "null_as_nan")]
    pub train_loss: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub train_accuracy: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub test_loss: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub test_accuracy: f64,
    /// Training examples per second over the epoch's updates (wall clock; evaluation excluded).
    pub images_per_second: f64,
    pub seconds: f64,
}

/// serde_json writes NaN as `null`; read it back as NaN.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainLog {
    /// The recipe the run was started with.
    #[serde(default)]
    pub recipe: serde_json::Value,
    pub steps: Vec<StepRecord>,
    pub epochs: Vec<EpochRecord>,
}

impl TrainLog {
    /// Mean loss and accuracy of `epoch`'s recorded steps (weighted by batch size).
    pub fn epoch_train_stats(&self, epoch: usize) -> (f64, f64) {
        let (mut loss, mut n, mut correct) = (0.0f64, 0usize, 0usize);
        for s in self.steps.iter().filter(|s| s.epoch == epoch) {
            loss += s.loss as f64 * s.examples as f64;
            n += s.examples;
            correct += s.correct;
        }
        if n == 0 {
            return (f64::NAN, f64::NAN);
        }
        (loss / n as f64, correct as f64 / n as f64)
    }

    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string_pretty(self).map_err(|e| TrainError::Invalid(format!("log to JSON: {e}")))
    }

    pub fn write_json(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_json()?.as_bytes())
    }

    pub fn write_svg(&self, path: &Path) -> Result<()> {
        write_atomic(path, loss_curve_svg(self).as_bytes())
    }
}

/// A "nice" tick step (1, 2 or 5 times a power of ten) for about `count` ticks over `range`.
fn tick_step(range: f64, count: usize) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / count as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn format_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 { 0 } else { (-step.log10().floor()) as usize };
    format!("{v:.decimals$}")
}

/// An SVG line chart: per-step training loss (light), its exponential moving average (dark),
/// and per-epoch test accuracy (right axis, 0 to 1) as dots, with axes, ticks and a legend.
pub fn loss_curve_svg(log: &TrainLog) -> String {
    let (w, h) = (800.0, 420.0);
    let (left, right, top, bottom) = (64.0, 64.0, 36.0, 48.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let points: Vec<(f64, f64)> =
        log.steps.iter().filter(|s| s.loss.is_finite()).map(|s| (s.step as f64, s.loss as f64)).collect();
    let x_max = points.last().map_or(1.0, |p| p.0.max(1.0));
    let y_max = points.iter().map(|p| p.1).fold(0.0f64, f64::max).max(1e-6) * 1.05;
    let sx = |x: f64| left + x / x_max * pw;
    let sy = |y: f64| top + ph - y / y_max * ph;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(s, r#"<text x="{}" y="20" text-anchor="middle" font-size="14">training loss</text>"#, w / 2.0);
    // Grid, ticks and labels.
    let ys = tick_step(y_max, 6);
    let mut y = 0.0;
    while y <= y_max + 1e-12 {
        let py = sy(y);
        let _ = writeln!(
            s,
            r##"<line x1="{left}" y1="{py:.1}" x2="{:.1}" y2="{py:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            left + pw,
            left - 6.0,
            py + 4.0,
            format_tick(y, ys)
        );
        y += ys;
    }
    let xs = tick_step(x_max, 8).max(1.0);
    let mut x = 0.0;
    while x <= x_max + 1e-9 {
        let px = sx(x);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{:.1}" x2="{px:.1}" y2="{:.1}" stroke="#999"/><text x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            top + ph,
            top + ph + 4.0,
            top + ph + 18.0,
            format_tick(x, xs)
        );
        x += xs;
    }
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/><text x="{:.1}" y="{:.1}" text-anchor="middle">step</text>"##,
        left + pw / 2.0,
        h - 10.0
    );
    let polyline = |pts: &[(f64, f64)], color: &str, width: f64| -> String {
        let coords: Vec<String> = pts.iter().map(|&(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
        format!(r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{}"/>"#, coords.join(" "))
    };
    if !points.is_empty() {
        let _ = writeln!(s, "{}", polyline(&points, "#9ecae1", 1.0));
        let alpha = 2.0 / (points.len().clamp(10, 200) as f64 / 10.0 + 1.0);
        let mut ema = points[0].1;
        let smooth: Vec<(f64, f64)> = points
            .iter()
            .map(|&(x, y)| {
                ema = alpha * y + (1.0 - alpha) * ema;
                (x, ema)
            })
            .collect();
        let _ = writeln!(s, "{}", polyline(&smooth, "#08519c", 2.0));
    }
    // Test accuracy per epoch on the right axis, at the step that ended the epoch.
    let mut accuracy = Vec::new();
    for e in &log.epochs {
        if let Some(last) = log.steps.iter().rfind(|st| st.epoch == e.epoch) {
            if e.test_accuracy.is_finite() {
                accuracy.push((last.step as f64, e.test_accuracy));
            }
        }
    }
    let sa = |a: f64| top + ph - a * ph;
    for a in [0.0, 0.25, 0.5, 0.75, 1.0] {
        let _ = writeln!(
            s,
            r##"<text x="{:.1}" y="{:.1}" fill="#d94801">{}</text>"##,
            left + pw + 6.0,
            sa(a) + 4.0,
            format_tick(a, 0.25)
        );
    }
    for &(x, a) in &accuracy {
        let _ = writeln!(s, r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#d94801"/>"##, sx(x), sa(a));
    }
    let legend_y = top + 14.0;
    let lx = left + 10.0;
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" y1="{legend_y}" x2="{:.1}" y2="{legend_y}" stroke="#9ecae1"/><text x="{:.1}" y="{:.1}">loss per step</text>"##,
        lx + 20.0,
        lx + 26.0,
        legend_y + 4.0
    );
    let _ = writeln!(
        s,
        r##"<line x1="{lx}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#08519c" stroke-width="2"/><text x="{:.1}" y="{:.1}">moving average</text>"##,
        legend_y + 16.0,
        lx + 20.0,
        legend_y + 16.0,
        lx + 26.0,
        legend_y + 20.0
    );
    let _ = writeln!(
        s,
        r##"<circle cx="{:.1}" cy="{:.1}" r="4" fill="#d94801"/><text x="{:.1}" y="{:.1}">test accuracy (right axis)</text>"##,
        lx + 10.0,
        legend_y + 32.0,
        lx + 26.0,
        legend_y + 36.0
    );
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log() -> TrainLog {
        let steps = (0..50)
            .map(|i| StepRecord {
                step: i,
                epoch: (i / 25) as usize,
                loss: 2.0 / (1.0 + i as f32 * 0.1),
                lr: 0.1,
                examples: 8,
                correct: (i as usize / 10).min(8),
                grad_norm: None,
            })
            .collect();
        let epochs = (0..2)
            .map(|e| EpochRecord {
                epoch: e,
                train_loss: 1.0,
                train_accuracy: 0.5,
                test_loss: 1.0,
                test_accuracy: 0.6 + 0.1 * e as f64,
                images_per_second: 100.0,
                seconds: 1.0,
            })
            .collect();
        TrainLog { recipe: serde_json::json!({"epochs": 2}), steps, epochs }
    }

    #[test]
    fn svg_is_well_formed_and_has_the_series() {
        let svg = loss_curve_svg(&log());
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert_eq!(svg.matches("<circle").count(), 3, "two epochs plus the legend");
        // Every opened element is closed (self-closing or paired): count tags roughly.
        let opens = svg.matches('<').count();
        let closes = svg.matches("/>").count() + svg.matches("</").count() * 2;
        assert_eq!(opens, closes, "{svg}");
        let empty = loss_curve_svg(&TrainLog::default());
        assert!(empty.contains("</svg>"));
    }

    #[test]
    fn json_round_trip_and_epoch_stats() {
        let l = log();
        let back: TrainLog = serde_json::from_str(&l.to_json().unwrap()).unwrap();
        assert_eq!(back, l);
        let mut unlabelled = l.clone();
        unlabelled.epochs[0].test_accuracy = f64::NAN;
        let back: TrainLog = serde_json::from_str(&unlabelled.to_json().unwrap()).unwrap();
        assert!(back.epochs[0].test_accuracy.is_nan());
        let (loss, acc) = l.epoch_train_stats(1);
        let want: f64 = (25..50).map(|i| (2.0 / (1.0 + i as f32 * 0.1)) as f64).sum::<f64>() / 25.0;
        assert!((loss - want).abs() < 1e-12);
        let correct: usize = (25..50).map(|i| (i / 10usize).min(8)).sum();
        assert_eq!(acc, correct as f64 / 200.0);
    }
}

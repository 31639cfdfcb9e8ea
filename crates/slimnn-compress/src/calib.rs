//! Calibration: one streamed pass over a data set that gathers, at every requested value of
//! the graph, the statistics the algorithms asked for. Values are tapped by adding them as
//! extra outputs of a copy of the graph run by the optimised runtime, so calibration sees
//! what serving computes. Memory is bounded by the batch size plus fixed-size statistics
//! (histograms of [`HIST_BINS`] bins, per-channel vectors, `K x K` Gram matrices).

use crate::{CompressError, Result};
use slimnn_ir::{Graph, OutletId};
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::Tensor;
use std::collections::BTreeMap;

/// What an algorithm wants to know about one value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum StatKind {
    /// Exact min and max.
    MinMax,
    /// A histogram over a symmetric range that doubles as values grow (also gives min/max).
    Histogram,
    /// Per-channel (last axis) absolute max and mean.
    Channels,
    /// `X^T X` over rows (last axis = features), for GPTQ's Hessian.
    Gram,
}

/// A statistic request: an outlet and what to gather there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StatPoint {
    pub outlet: OutletId,
    pub kind: StatKind,
}

/// Bins of a calibration histogram (over `[-range, range]`).
pub const HIST_BINS: usize = 4096;

/// A histogram over `[-range, range]` whose range doubles (merging bin pairs exactly) when a
/// larger value arrives, so its size never grows.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    pub counts: Vec<u64>,
    pub range: f32,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram { counts: vec![0; HIST_BINS], range: 0.0 }
    }
}

impl Histogram {
    pub fn bin_width(&self) -> f32 {
        2.0 * self.range / self.counts.len() as f32
    }

    /// Centre of bin `i`.
    pub fn center(&self, i: usize) -> f32 {
        -self.range + (i as f32 + 0.5) * self.bin_width()
    }

    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    pub fn add(&mut self, values: &[f32]) {
        let absmax = values.iter().fold(0f32, |m, v| if v.is_finite() { m.max(v.abs()) } else { m });
        if absmax == 0.0 && self.range == 0.0 {
            // Nothing to place yet: count zeros in the middle once a range exists.
            self.range = f32::MIN_POSITIVE.max(1e-30);
        }
        if self.range == 0.0 {
            self.range = absmax;
        }
        while absmax > self.range {
            let nb = self.counts.len();
            let mut merged = vec![0u64; nb];
            for (j, &c) in self.counts.iter().enumerate() {
                merged[nb / 4 + j / 2] += c;
            }
            self.counts = merged;
            self.range *= 2.0;
        }
        let nb = self.counts.len();
        let inv = nb as f32 / (2.0 * self.range);
        for &v in values.iter().filter(|v| v.is_finite()) {
            let b = ((v + self.range) * inv) as usize;
            self.counts[b.min(nb - 1)] += 1;
        }
    }
}

/// Per-channel statistics of a value's last axis.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Channels {
    pub absmax: Vec<f32>,
    pub min: Vec<f32>,
    pub max: Vec<f32>,
    pub sum: Vec<f64>,
    pub rows: u64,
}

impl Channels {
    pub fn mean(&self) -> Vec<f64> {
        self.sum.iter().map(|s| s / self.rows.max(1) as f64).collect()
    }
}

/// `X^T X` (upper triangle filled on read) and the row count.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Gram {
    pub k: usize,
    pub xtx: Vec<f64>,
    pub rows: u64,
}

impl Gram {
    fn add(&mut self, x: &[f32], k: usize) {
        if self.k == 0 {
            self.k = k;
            self.xtx = vec![0.0; k * k];
        }
        // Rows in blocks: f64 accumulation of f32 products, upper triangle only.
        for row in x.chunks_exact(k) {
            let r: Vec<f64> = row.iter().map(|&v| v as f64).collect();
            for i in 0..k {
                let ri = r[i];
                if ri == 0.0 {
                    continue;
                }
                let dst = &mut self.xtx[i * k + i..(i + 1) * k];
                for (d, &rj) in dst.iter_mut().zip(&r[i..]) {
                    *d += ri * rj;
                }
            }
            self.rows += 1;
        }
    }

    /// The full symmetric matrix.
    pub fn symmetric(&self) -> Vec<f64> {
        let k = self.k;
        let mut m = self.xtx.clone();
        for i in 0..k {
            for j in 0..i {
                m[i * k + j] = m[j * k + i];
            }
        }
        m
    }
}

/// Everything gathered about one value.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueStats {
    pub min: f32,
    pub max: f32,
    pub hist: Option<Histogram>,
    pub channels: Option<Channels>,
    pub gram: Option<Gram>,
}

impl Default for ValueStats {
    fn default() -> Self {
        ValueStats { min: f32::INFINITY, max: f32::NEG_INFINITY, hist: None, channels: None, gram: None }
    }
}

impl ValueStats {
    fn add(&mut self, t: &Tensor, kinds: &[StatKind]) -> Result<()> {
        let x =
            t.as_slice::<f32>().map_err(|_| CompressError::Calibration(format!("a tapped value is {}", t.dtype())))?;
        for &v in x.iter().filter(|v| v.is_finite()) {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        let k = *t.shape().last().unwrap_or(&1);
        for kind in kinds {
            match kind {
                StatKind::MinMax => {}
                StatKind::Histogram => self.hist.get_or_insert_with(Histogram::default).add(x),
                StatKind::Channels => {
                    let c = self.channels.get_or_insert_with(|| Channels {
                        absmax: vec![0.0; k],
                        min: vec![f32::INFINITY; k],
                        max: vec![f32::NEG_INFINITY; k],
                        sum: vec![0.0; k],
                        rows: 0,
                    });
                    for row in x.chunks_exact(k) {
                        for (j, &v) in row.iter().enumerate().filter(|(_, v)| v.is_finite()) {
                            c.absmax[j] = c.absmax[j].max(v.abs());
                            c.min[j] = c.min[j].min(v);
                            c.max[j] = c.max[j].max(v);
                            c.sum[j] += v as f64;
                        }
                        c.rows += 1;
                    }
                }
                StatKind::Gram => self.gram.get_or_insert_with(Gram::default).add(x, k),
            }
        }
        Ok(())
    }
}

/// The statistics of one calibration pass, by outlet of the graph it ran on.
#[derive(Debug, Clone, Default)]
pub struct Statistics {
    pub values: BTreeMap<OutletId, ValueStats>,
    pub batches: usize,
}

impl Statistics {
    pub fn get(&self, o: OutletId) -> Result<&ValueStats> {
        self.values
            .get(&o)
            .ok_or_else(|| CompressError::Calibration(format!("no statistics for value {}:{}", o.node, o.slot)))
    }
}

/// A data set of model inputs, read batch by batch (each call starts again from the first).
pub trait BatchSource {
    /// Number of batches a pass yields.
    fn batches(&self) -> usize;
    /// Batch `i` as named inputs.
    fn batch(&self, i: usize) -> Result<Vec<(String, Tensor)>>;
}

/// Batches held in memory (tests, small data sets).
impl BatchSource for Vec<Vec<(String, Tensor)>> {
    fn batches(&self) -> usize {
        self.len()
    }
    fn batch(&self, i: usize) -> Result<Vec<(String, Tensor)>> {
        Ok(self[i].clone())
    }
}

/// Runs `graph` over every batch of `data`, gathering `points`. `progress` is called with the
/// number of batches done.
pub fn calibrate(
    graph: &Graph,
    points: &[StatPoint],
    data: &dyn BatchSource,
    threads: usize,
    progress: &mut dyn FnMut(usize),
) -> Result<Statistics> {
    let mut by_outlet: BTreeMap<OutletId, Vec<StatKind>> = BTreeMap::new();
    for p in points {
        let kinds = by_outlet.entry(p.outlet).or_default();
        if !kinds.contains(&p.kind) {
            kinds.push(p.kind);
        }
    }
    let mut stats = Statistics::default();
    if by_outlet.is_empty() {
        return Ok(stats);
    }
    if data.batches() == 0 {
        return Err(CompressError::Calibration("the calibration data set is empty".into()));
    }
    let mut tapped = graph.clone();
    let taps: Vec<(OutletId, Vec<StatKind>)> = by_outlet.into_iter().collect();
    for (i, (o, _)) in taps.iter().enumerate() {
        if graph.fact(*o).dtype != slimnn_tensor::DType::F32 {
            return Err(CompressError::Calibration(format!(
                "value of node '{}' is {}, only f32 values are calibrated",
                graph.node(o.node).name,
                graph.fact(*o).dtype
            )));
        }
        tapped.add_output(&format!("__slimnn_tap_{i}"), *o);
    }
    let first_tap = graph.outputs().len();
    let rt = Runnable::new(tapped, RuntimeConfig::with_threads(threads.max(1)))?;
    let mut state = rt.new_state();
    for b in 0..data.batches() {
        let inputs = data.batch(b)?;
        let outs = rt.run(&mut state, inputs).map_err(|e| CompressError::Calibration(format!("batch {b}: {e}")))?;
        for ((o, kinds), t) in taps.iter().zip(&outs[first_tap..]) {
            stats.values.entry(*o).or_default().add(t, kinds)?;
        }
        stats.batches += 1;
        progress(b + 1);
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_doubles_its_range_and_keeps_counts() {
        let mut h = Histogram::default();
        h.add(&[1.0, -1.0, 0.5]);
        assert_eq!(h.range, 1.0);
        h.add(&[3.0]);
        assert_eq!(h.range, 4.0);
        assert_eq!(h.total(), 4);
        // 0.5 is in the bin whose centre is within one bin width.
        let w = h.bin_width();
        let i = h.counts.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, _)| i).collect::<Vec<_>>();
        assert!(i.iter().any(|&b| (h.center(b) - 0.5).abs() <= w));
        assert!(i.iter().any(|&b| (h.center(b) - 3.0).abs() <= w));
    }

    #[test]
    fn channels_keep_each_last_axis_channel_apart() {
        let mut st = ValueStats::default();
        let t = Tensor::from_vec(vec![3, 2], vec![1.0f32, -4.0, -2.0, 0.5, f32::NAN, 3.0]).unwrap();
        st.add(&t, &[StatKind::Channels]).unwrap();
        let c = st.channels.unwrap();
        assert_eq!((&c.min, &c.max, &c.absmax), (&vec![-2.0, -4.0], &vec![1.0, 3.0], &vec![2.0, 4.0]));
        assert_eq!((c.rows, c.mean()), (3, vec![-1.0 / 3.0, -0.5 / 3.0]), "a NaN is left out of its channel");
    }

    #[test]
    fn gram_matches_x_transpose_x() {
        let mut g = Gram::default();
        g.add(&[1.0, 2.0, 3.0, 4.0], 2);
        // rows (1,2), (3,4): X^T X = [[10, 14], [14, 20]].
        assert_eq!(g.symmetric(), vec![10.0, 14.0, 14.0, 20.0]);
        assert_eq!(g.rows, 2);
    }
}

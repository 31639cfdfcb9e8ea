//! Prometheus metrics, rendered in the text exposition format at `/metrics`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

const LATENCY_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }

    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cumulative += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {}", self.count);
    }
}

#[derive(Default)]
struct Inner {
    requests: BTreeMap<(String, &'static str, u16), u64>,
    queue_depth: BTreeMap<String, usize>,
    cancelled: BTreeMap<String, u64>,
    request_seconds: BTreeMap<String, Histogram>,
    queue_seconds: BTreeMap<String, Histogram>,
    batch_seconds: BTreeMap<String, Histogram>,
    batch_rows: BTreeMap<String, Histogram>,
}

/// Counters and histograms per model; cheap enough to update on every request.
#[derive(Default)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

fn hist<'a>(m: &'a mut BTreeMap<String, Histogram>, model: &str, bounds: &'static [f64]) -> &'a mut Histogram {
    m.entry(model.to_string()).or_insert_with(|| Histogram::new(bounds))
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One finished request: its model ("" when none was named), protocol, status code, duration.
    pub fn request(&self, model: &str, protocol: &'static str, code: u16, took: Duration) {
        let mut m = self.lock();
        *m.requests.entry((model.to_string(), protocol, code)).or_default() += 1;
        if !model.is_empty() {
            hist(&mut m.request_seconds, model, LATENCY_BOUNDS).observe(took.as_secs_f64());
        }
    }

    pub fn set_queue_depth(&self, model: &str, depth: usize) {
        self.lock().queue_depth.insert(model.to_string(), depth);
    }

    pub fn cancelled(&self, model: &str) {
        *self.lock().cancelled.entry(model.to_string()).or_default() += 1;
    }

    pub fn observe_queue_wait(&self, model: &str, waited: Duration) {
        hist(&mut self.lock().queue_seconds, model, LATENCY_BOUNDS).observe(waited.as_secs_f64());
    }

    pub fn observe_batch(&self, model: &str, rows: usize, took: Duration) {
        let mut m = self.lock();
        hist(&mut m.batch_rows, model, BATCH_BOUNDS).observe(rows as f64);
        hist(&mut m.batch_seconds, model, LATENCY_BOUNDS).observe(took.as_secs_f64());
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let m = self.lock();
        let mut out = String::new();
        out.push_str("# HELP slimnn_requests_total Requests answered, by model, protocol and status code.\n");
        out.push_str("# TYPE slimnn_requests_total counter\n");
        for ((model, proto, code), n) in &m.requests {
            let _ =
                writeln!(out, "slimnn_requests_total{{model=\"{model}\",protocol=\"{proto}\",code=\"{code}\"}} {n}");
        }
        out.push_str("# HELP slimnn_queue_depth Requests waiting for a worker.\n# TYPE slimnn_queue_depth gauge\n");
        for (model, d) in &m.queue_depth {
            let _ = writeln!(out, "slimnn_queue_depth{{model=\"{model}\"}} {d}");
        }
        out.push_str("# HELP slimnn_cancelled_total Queued requests dropped because their caller left.\n");
        out.push_str("# TYPE slimnn_cancelled_total counter\n");
        for (model, n) in &m.cancelled {
            let _ = writeln!(out, "slimnn_cancelled_total{{model=\"{model}\"}} {n}");
        }
        let sections: [(&str, &str, &BTreeMap<String, Histogram>); 4] = [
            ("slimnn_request_duration_seconds", "Time from request to answer.", &m.request_seconds),
            ("slimnn_queue_wait_seconds", "Time a request waited before its batch ran.", &m.queue_seconds),
            ("slimnn_batch_duration_seconds", "Time one batched run took.", &m.batch_seconds),
            ("slimnn_batch_size", "Rows per batched run.", &m.batch_rows),
        ];
        for (name, help, map) in sections {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
            for (model, h) in map {
                h.render(&mut out, name, &format!("model=\"{model}\""));
            }
        }
        out
    }
}

//! Dynamic batching: requests for one model version wait in a bounded queue; a worker takes the
//! oldest, gathers compatible ones (same shapes past the first axis, or the same sequence-length
//! bucket for transformers) until the batch is full or the delay is up, runs them as one stacked
//! tensor, and hands each caller its own rows back.

use crate::config::ModelConfig;
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::model::{ModelSource, Signature};
use slimnn_runtime::Runnable;
use slimnn_tensor::Tensor;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

pub type Reply = Result<Vec<Tensor>, ServeError>;

/// A request's rows, its batching key and its own sequence length (see [`Job`]).
type BatchKey = (usize, Vec<Vec<usize>>, Option<usize>);

struct Job {
    inputs: Vec<Tensor>,
    rows: usize,
    /// Requests with equal keys can share a run: per input, the shape past the first axis
    /// (with the sequence axis rounded up to its bucket when padding).
    key: Vec<Vec<usize>>,
    /// The request's own sequence length when it is padded to a bucket.
    seq_len: Option<usize>,
    reply: oneshot::Sender<Reply>,
    enqueued: Instant,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
}

struct Shared {
    model: String,
    version: String,
    config: ModelConfig,
    input_names: Vec<String>,
    batching: bool,
    pad: bool,
    seq_outputs: Vec<bool>,
    runnable: Arc<Runnable>,
    metrics: Arc<Metrics>,
    queue: Mutex<Queue>,
    wake: Condvar,
}

/// The queue and workers in front of one model version's runnable.
pub struct Batcher {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Batcher {
    pub fn start(source: &ModelSource, sig: &Signature, runnable: Arc<Runnable>, metrics: Arc<Metrics>) -> Batcher {
        let batching = source.config.max_batch_size > 1 && sig.batchable();
        let shared = Arc::new(Shared {
            model: source.name.clone(),
            version: source.version.clone(),
            config: source.config.clone(),
            input_names: sig.inputs.iter().map(|s| s.name.clone()).collect(),
            batching,
            pad: batching && sig.sequence_paddable(),
            seq_outputs: sig.sequence_outputs(),
            runnable,
            metrics,
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closed: false }),
            wake: Condvar::new(),
        });
        let workers = (0..source.config.instances)
            .filter_map(|i| {
                let s = shared.clone();
                std::thread::Builder::new()
                    .name(format!("serve-{}-{i}", source.name))
                    .spawn(move || s.work())
                    .map_err(|e| tracing::error!(model = %source.name, error = %e, "could not start a worker"))
                    .ok()
            })
            .collect();
        Batcher { shared, workers: Mutex::new(workers) }
    }

    /// Queues one request (inputs already checked against the signature, in signature order).
    /// Fails at once with `Unavailable` when the queue is full or closed.
    pub fn submit(&self, inputs: Vec<Tensor>) -> Result<oneshot::Receiver<Reply>, ServeError> {
        let s = &self.shared;
        let (rows, key, seq_len) = s.batch_key(&inputs)?;
        let (tx, rx) = oneshot::channel();
        let mut q = s.lock();
        if q.closed {
            return Err(ServeError::Unavailable(format!("model '{}' is unloading", s.model)));
        }
        if q.jobs.len() >= s.config.queue_capacity {
            return Err(ServeError::Unavailable(format!(
                "model '{}': queue full ({} requests waiting); retry later",
                s.model,
                q.jobs.len()
            )));
        }
        q.jobs.push_back(Job { inputs, rows, key, seq_len, reply: tx, enqueued: Instant::now() });
        s.metrics.set_queue_depth(&s.model, q.jobs.len());
        drop(q);
        s.wake.notify_all();
        Ok(rx)
    }

    pub fn queue_depth(&self) -> usize {
        self.shared.lock().jobs.len()
    }

    /// Stops taking requests; workers finish what is queued, then exit.
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.wake.notify_all();
    }

    /// Waits for the workers to finish (after [`Batcher::close`]).
    pub fn join(&self) {
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }
}

impl Drop for Batcher {
    fn drop(&mut self) {
        self.close();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn batch_key(&self, inputs: &[Tensor]) -> Result<BatchKey, ServeError> {
        if !self.batching {
            return Ok((1, Vec::new(), None));
        }
        let rows = inputs.first().map(|t| t.shape()[0]).unwrap_or(1);
        for (t, name) in inputs.iter().zip(&self.input_names) {
            if t.shape()[0] != rows {
                return Err(ServeError::BadRequest(format!(
                    "input '{name}': batch size {} differs from input '{}' ({rows})",
                    t.shape()[0],
                    self.input_names[0]
                )));
            }
        }
        if self.pad {
            let len = inputs[0].shape()[1];
            if inputs.iter().all(|t| t.shape()[1] == len) {
                let bucket = self.config.sequence_buckets.iter().copied().filter(|&b| b >= len).min().unwrap_or(len);
                return Ok((rows, vec![vec![bucket]; inputs.len()], Some(len)));
            }
        }
        Ok((rows, inputs.iter().map(|t| t.shape()[1..].to_vec()).collect(), None))
    }

    fn work(self: Arc<Self>) {
        let mut state = self.runnable.new_state();
        while let Some(batch) = self.next_batch() {
            self.run_batch(&mut state, batch);
        }
    }

    /// The next batch to run, or `None` once closed and drained.
    fn next_batch(&self) -> Option<Vec<Job>> {
        let mut q = self.lock();
        let first = loop {
            match q.jobs.pop_front() {
                Some(j) if j.reply.is_closed() => self.metrics.cancelled(&self.model),
                Some(j) => break j,
                None if q.closed => return None,
                None => q = self.wake.wait(q).unwrap_or_else(|e| e.into_inner()),
            }
        };
        let mut rows = first.rows;
        let max = self.config.max_batch_size;
        let mut batch = vec![first];
        if self.batching {
            let deadline = Instant::now() + Duration::from_secs_f64(self.config.max_batch_delay_ms / 1e3);
            loop {
                let mut i = 0;
                while i < q.jobs.len() && rows < max {
                    let j = &q.jobs[i];
                    if j.reply.is_closed() {
                        q.jobs.remove(i);
                        self.metrics.cancelled(&self.model);
                    } else if j.key == batch[0].key && rows + j.rows <= max {
                        rows += j.rows;
                        batch.extend(q.jobs.remove(i));
                    } else {
                        i += 1;
                    }
                }
                let now = Instant::now();
                if rows >= max || q.closed || now >= deadline {
                    break;
                }
                q = self.wake.wait_timeout(q, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
            }
        }
        self.metrics.set_queue_depth(&self.model, q.jobs.len());
        Some(batch)
    }

    fn run_batch(&self, state: &mut slimnn_runtime::State, batch: Vec<Job>) {
        let started = Instant::now();
        let rows: usize = batch.iter().map(|j| j.rows).sum();
        for j in &batch {
            self.metrics.observe_queue_wait(&self.model, started.duration_since(j.enqueued));
        }
        let mut batch = batch;
        let result = if batch.len() == 1 && batch[0].seq_len.is_none() {
            let inputs = std::mem::take(&mut batch[0].inputs);
            self.run(state, inputs)
        } else {
            stack(&batch).and_then(|inputs| self.run(state, inputs))
        };
        self.metrics.observe_batch(&self.model, rows, started.elapsed());
        tracing::debug!(model = %self.model, version = %self.version, requests = batch.len(), rows,
            ms = started.elapsed().as_secs_f64() * 1e3, "batch");
        match result {
            Ok(outputs) if batch.len() == 1 && batch[0].seq_len.is_none() => {
                let _ = batch.into_iter().next().map(|j| j.reply.send(Ok(outputs)));
            }
            Ok(outputs) => {
                let bytes: Vec<Vec<u8>> = outputs.iter().map(Tensor::to_le_bytes).collect();
                let mut offset = 0;
                for j in batch {
                    let reply = split(&outputs, &bytes, offset, &j, &self.seq_outputs);
                    offset += j.rows;
                    let _ = j.reply.send(reply);
                }
            }
            Err(e) if batch.len() > 1 => {
                // One bad request must not fail its neighbours: run each alone to find it.
                tracing::warn!(model = %self.model, error = %e, "batched run failed; running its requests one by one");
                for j in batch {
                    let reply =
                        stack(std::slice::from_ref(&j)).and_then(|inputs| self.run(state, inputs)).and_then(|outs| {
                            if j.seq_len.is_some() {
                                let bytes: Vec<Vec<u8>> = outs.iter().map(Tensor::to_le_bytes).collect();
                                split(&outs, &bytes, 0, &j, &self.seq_outputs)
                            } else {
                                Ok(outs)
                            }
                        });
                    let _ = j.reply.send(reply);
                }
            }
            Err(e) => {
                let _ = batch.into_iter().next().map(|j| j.reply.send(Err(e)));
            }
        }
    }

    /// One run, with a panic in a kernel turned into an error (the worker and its model survive).
    fn run(&self, state: &mut slimnn_runtime::State, inputs: Vec<Tensor>) -> Reply {
        let named: Vec<(String, Tensor)> = self.input_names.iter().cloned().zip(inputs).collect();
        match std::panic::catch_unwind(AssertUnwindSafe(|| self.runnable.run(state, named))) {
            Ok(Ok(outs)) => Ok(outs),
            Ok(Err(e)) => Err(ServeError::BadRequest(format!("model '{}' could not run this input: {e}", self.model))),
            Err(_) => {
                *state = self.runnable.new_state();
                Err(ServeError::Internal(format!("model '{}' failed on this input (internal error)", self.model)))
            }
        }
    }
}

/// Stacks the jobs' inputs along the first axis, zero-padding the sequence axis to the bucket.
fn stack(batch: &[Job]) -> Result<Vec<Tensor>, ServeError> {
    let rows: usize = batch.iter().map(|j| j.rows).sum();
    let n_inputs = batch[0].inputs.len();
    let mut out = Vec::with_capacity(n_inputs);
    for i in 0..n_inputs {
        let first = &batch[0].inputs[i];
        let dtype = first.dtype();
        let mut inner: Vec<usize> = first.shape()[1..].to_vec();
        if batch[0].seq_len.is_some() {
            inner = batch[0].key[i].clone();
        }
        let row_bytes = inner.iter().product::<usize>() * dtype.size_of();
        let mut bytes = vec![0u8; rows * row_bytes];
        let mut offset = 0;
        for j in batch {
            let t = &j.inputs[i];
            let src = t.to_le_bytes();
            let src_row = t.shape()[1..].iter().product::<usize>() * dtype.size_of();
            for r in 0..j.rows {
                // Padding positions stay zero: token 0 with attention mask 0.
                bytes[offset + r * row_bytes..][..src_row].copy_from_slice(&src[r * src_row..][..src_row]);
            }
            offset += j.rows * row_bytes;
        }
        let mut shape = vec![rows];
        shape.extend(inner);
        out.push(Tensor::from_le_bytes(dtype, shape, &bytes).map_err(|e| ServeError::Internal(e.to_string()))?);
    }
    Ok(out)
}

/// One job's rows of the batch outputs (sequence outputs cut back to the job's own length);
/// `bytes` holds each output's data, converted once per batch rather than once per job.
fn split(outputs: &[Tensor], bytes: &[Vec<u8>], offset: usize, job: &Job, seq_outputs: &[bool]) -> Reply {
    outputs
        .iter()
        .enumerate()
        .map(|(k, o)| {
            let shape = o.shape();
            if shape.is_empty() || shape[0] < offset + job.rows {
                return Err(ServeError::Internal(format!("output {k} has shape {shape:?}; cannot split rows")));
            }
            let size = o.dtype().size_of();
            let row_bytes = shape[1..].iter().product::<usize>() * size;
            let all = &bytes[k];
            let rows = &all[offset * row_bytes..(offset + job.rows) * row_bytes];
            let mut new_shape = shape.to_vec();
            new_shape[0] = job.rows;
            let bytes = match job.seq_len {
                Some(len) if seq_outputs.get(k).copied().unwrap_or(false) && shape.len() >= 2 && shape[1] > len => {
                    let inner = shape[2..].iter().product::<usize>() * size;
                    new_shape[1] = len;
                    rows.chunks(row_bytes).flat_map(|r| &r[..len * inner]).copied().collect()
                }
                _ => rows.to_vec(),
            };
            Tensor::from_le_bytes(o.dtype(), new_shape, &bytes).map_err(|e| ServeError::Internal(e.to_string()))
        })
        .collect()
}

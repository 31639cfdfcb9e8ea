//! slimnn's CPU runtime.
//!
//! [`Runnable::new`] canonicalises a graph (constant folding, identity removal, LayerNorm and
//! GELU fusion) once. For each concrete input shape it then specialises the graph (shape
//! computations fold to constants) and lowers it to a [`plan`]: fused steps on the kernels of
//! `slimnn-kernels` (GEMM with bias/activation/residual epilogues, multi-head attention, layer
//! norm, ...) and the reference evaluator for everything else. Plans are cached per shape;
//! weights are packed once per runnable. A [`State`] holds one caller's buffers, recycled
//! between runs, so steady-state runs reuse memory instead of allocating it.
//!
//! ```no_run
//! # fn main() -> Result<(), slimnn_runtime::RuntimeError> {
//! # let graph = slimnn_ir::Graph::default();
//! # let inputs = vec![];
//! use slimnn_runtime::{Runnable, RuntimeConfig};
//! let runnable = Runnable::new(graph, RuntimeConfig::default())?;
//! let mut state = runnable.new_state();
//! let outputs = runnable.run(&mut state, inputs)?;
//! # Ok(()) }
//! ```
//!
//! A program that embeds the runtime should also install [`alloc::CacheLineAligned`] as its
//! global allocator, as the `slimnn` binary does: activations then start on cache lines, which
//! made int8 MiniLM 12% faster at batch 1.

pub mod alloc;
pub mod blockq;
pub mod conv;
mod exec;
mod fast;
mod fold;
mod lower;
mod optimize;
pub mod plan;
pub mod pool;
mod qdq;
mod samples;

pub use exec::State;
pub use fold::FoldConvBatchNorm;
pub use optimize::{optimize, OptimizeReport};
pub use plan::{Fusion, PlanSummary};

use slimnn_ir::{Graph, IrError};
use slimnn_kernels::KernelError;
use slimnn_tensor::Tensor;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Ir(#[from] IrError),
    #[error("kernel: {0}")]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    Tensor(#[from] slimnn_tensor::TensorError),
    #[error("thread pool: {0}")]
    Threads(String),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// How a runnable executes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeConfig {
    /// Worker threads (1 runs on the caller's thread only).
    pub threads: usize,
    /// Arithmetic of products with constant weights.
    pub precision: Precision,
    /// Attention's two products (`Q·Kᵀ`, `P·V`) in int8 on AMX tiles: Q and K quantized per
    /// token, the softmax weights to u8, V per column
    /// ([`slimnn_kernels::attention::AttnProducts::Int8`]). A request, like `precision`: where
    /// AMX is not granted or the head size is not 16, 32, 48 or 64, attention runs as
    /// `precision` says.
    pub int8_attention: bool,
}

impl RuntimeConfig {
    /// `threads` workers, f32 arithmetic.
    pub fn with_threads(threads: usize) -> Self {
        RuntimeConfig { threads, precision: Precision::F32, int8_attention: false }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig::with_threads(physical_cores())
    }
}

/// Arithmetic of the GEMMs whose weights are constants (the model's linear layers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 products, as the graph states.
    #[default]
    F32,
    /// Weights and activations rounded to bf16, products accumulated in f32: twice the f32
    /// rate on CPUs with AVX-512 BF16. Elsewhere the f32 kernels run (bf16 arithmetic without
    /// the instruction would be slower than f32). Weights stored as bf16 (`slimnn quantize
    /// --mode bf16`) lose nothing more; activations are rounded per product (~2^-9 relative).
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// `f32` or `bf16` (case-insensitive).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!("unknown precision '{s}' (expected f32 or bf16)")),
        }
    }
}

impl Precision {
    /// Whether products in this precision run in bf16 on this host.
    pub fn uses_bf16(self) -> bool {
        self == Precision::Bf16 && slimnn_kernels::gemm::bf16::native()
    }
}

/// Whether f32 GEMMs with constant weights may run on AMX-BF16 tiles, each value split into
/// three bf16 parts with f32 accuracy ([`slimnn_kernels::gemm::bf16x6`]), where the `amx` tier
/// is active: on unless `SLIMNN_F32_AMX=0` (then every f32 product runs on FMA units).
pub fn f32_tiles_allowed() -> bool {
    std::env::var_os("SLIMNN_F32_AMX").is_none_or(|v| v != "0")
}

/// Whether f32 GEMMs with enough rows run on AMX tiles here: allowed
/// ([`f32_tiles_allowed`]) and the `amx` tier active.
pub fn f32_tiles_available() -> bool {
    f32_tiles_allowed() && slimnn_kernels::gemm::bf16x6::native()
}

/// Physical cores of this machine (hyper-threads do not add FMA throughput).
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else { return logical };
    let mut cores = std::collections::HashSet::new();
    let mut physical = "0".to_string();
    for line in info.lines() {
        if let Some((k, v)) = line.split_once(':') {
            match k.trim() {
                "physical id" => physical = v.trim().to_string(),
                "core id" => {
                    cores.insert((physical.clone(), v.trim().to_string()));
                }
                _ => {}
            }
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}

/// An optimised model ready to run: immutable and shareable across threads; each caller
/// brings its own [`State`].
pub struct Runnable {
    graph: Graph,
    report: OptimizeReport,
    pool: Option<rayon::ThreadPool>,
    threads: usize,
    plans: Mutex<PlanCache>,
    packed: lower::PackCache,
    /// Whether batches of a CNN may run sample by sample ([`samples`]); `SLIMNN_SPLIT_BATCH=0`
    /// turns it off.
    split_batches: bool,
    /// `RuntimeConfig::int8_attention`.
    int8_attention: bool,
    /// Per input shapes: the samples per run when the batch is split, or `None`.
    splits: Mutex<HashMap<Vec<Vec<usize>>, Option<usize>>>,
}

/// Plans by input shapes, least recently used evicted beyond [`PlanCache::CAPACITY`]: a server
/// sees many sequence lengths and an LLM a new shape per decoded token, so an unbounded cache
/// would grow without end.
#[derive(Default)]
struct PlanCache {
    plans: HashMap<Vec<Vec<usize>>, (Arc<plan::Plan>, u64)>,
    clock: u64,
}

impl PlanCache {
    const CAPACITY: usize = 64;

    fn get(&mut self, shapes: &[Vec<usize>]) -> Option<Arc<plan::Plan>> {
        self.clock += 1;
        let now = self.clock;
        self.plans.get_mut(shapes).map(|(p, used)| {
            *used = now;
            p.clone()
        })
    }

    fn insert(&mut self, shapes: Vec<Vec<usize>>, plan: Arc<plan::Plan>) {
        if self.plans.len() >= Self::CAPACITY && !self.plans.contains_key(&shapes) {
            let oldest = self.plans.iter().min_by_key(|(_, (_, used))| *used).map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.plans.remove(&k);
            }
        }
        self.clock += 1;
        self.plans.insert(shapes, (plan, self.clock));
    }

    fn len(&self) -> usize {
        self.plans.len()
    }
}

/// Keeps `n` of a pool's workers awake for one run: each spins, running whatever work the
/// pool has, until dropped. A run hands its workers a burst of short tasks, one per step; a
/// worker that sleeps between them takes ~50-130 us to wake on a VM (measured here: two 50 us
/// tasks 200 us apart took 98-178 us, with a spinning worker 53 us), more than many steps
/// take. ONNX Runtime's pool spins the same way.
struct KeepAwake {
    /// Set once the run itself is on a worker: until then a spinner must not look for work,
    /// or it could take the run and leave the tasks it spawns to sleeping workers.
    started: Arc<std::sync::atomic::AtomicBool>,
    running: Arc<std::sync::atomic::AtomicBool>,
}

impl KeepAwake {
    fn start(pool: &rayon::ThreadPool, n: usize) -> KeepAwake {
        use std::sync::atomic::{AtomicBool, Ordering};
        let started = Arc::new(AtomicBool::new(false));
        let running = Arc::new(AtomicBool::new(true));
        for _ in 0..n {
            let (started, running) = (started.clone(), running.clone());
            pool.spawn(move || {
                while !started.load(Ordering::Acquire) && running.load(Ordering::Relaxed) {
                    std::hint::spin_loop();
                }
                while running.load(Ordering::Relaxed) {
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
            });
        }
        KeepAwake { started, running }
    }

    fn started(&self) {
        self.started.store(true, std::sync::atomic::Ordering::Release);
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        self.running.store(false, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Runnable {
    pub fn new(graph: Graph, config: RuntimeConfig) -> Result<Runnable> {
        let (graph, report) = optimize(graph)?;
        let threads = config.threads.max(1);
        let pool = if threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .thread_name(|i| format!("slimnn-{i}"))
                    .build()
                    .map_err(|e| RuntimeError::Threads(e.to_string()))?,
            )
        } else {
            None
        };
        Ok(Runnable {
            graph,
            report,
            pool,
            threads,
            plans: Default::default(),
            packed: lower::PackCache::new(config.precision.uses_bf16(), f32_tiles_available()),
            int8_attention: config.int8_attention,
            split_batches: std::env::var_os("SLIMNN_SPLIT_BATCH").is_none_or(|v| v != "0"),
            splits: Default::default(),
        })
    }

    /// The canonicalised graph this runnable executes.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub fn report(&self) -> &OptimizeReport {
        &self.report
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    pub fn new_state(&self) -> State {
        State::default()
    }

    /// The plan for one set of input shapes (built and cached on first use).
    pub fn plan_for(&self, shapes: &[Vec<usize>]) -> Result<Arc<plan::Plan>> {
        if let Some(p) = self.plans.lock().unwrap_or_else(|e| e.into_inner()).get(shapes) {
            return Ok(p);
        }
        let (specialized, rewrites) = optimize::specialize(&self.graph, shapes)?;
        let mut plan = lower::lower(&specialized, &self.packed, self.int8_attention)?;
        plan.rewrites = rewrites;
        let plan = Arc::new(plan);
        self.plans.lock().unwrap_or_else(|e| e.into_inner()).insert(shapes.to_vec(), plan.clone());
        Ok(plan)
    }

    /// How many shape-specialised plans are cached (at most 64).
    pub fn cached_plans(&self) -> usize {
        self.plans.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// `(batch, samples per run)` when inputs of these shapes run sample by sample ([`samples`]).
    fn sample_split(&self, shapes: &[Vec<usize>]) -> Result<Option<(usize, usize)>> {
        let n = shapes.first().and_then(|s| s.first()).copied().unwrap_or(0);
        if !self.split_batches || n < 2 || shapes.iter().any(|s| s.first() != Some(&n)) {
            return Ok(None);
        }
        // A graph declared for a fixed batch has no one-sample form.
        let fixed = |i: usize| matches!(self.graph.input_fact(i).shape.first(), Some(slimnn_tensor::Dim::Known(_)));
        if (0..shapes.len()).any(fixed) {
            return Ok(None);
        }
        if let Some(&split) = self.splits.lock().unwrap_or_else(|e| e.into_inner()).get(shapes) {
            return Ok(split.map(|s| (n, s)));
        }
        let one: Vec<Vec<usize>> = shapes.iter().map(|s| [&[1], &s[1..]].concat()).collect();
        let one = self.graph.specialized(&one)?;
        let split = samples::splittable(&self.graph.specialized(shapes)?, &one, n).then(|| {
            let run_bytes = if self.packed.f32_tiles() { samples::RUN_BYTES_ON_TILES } else { samples::RUN_BYTES };
            samples::samples_per_run(&one, run_bytes)
        });
        let mut splits = self.splits.lock().unwrap_or_else(|e| e.into_inner());
        if splits.len() >= PlanCache::CAPACITY {
            splits.clear();
        }
        splits.insert(shapes.to_vec(), split);
        Ok(split.map(|s| (n, s)))
    }

    /// Whether a run on inputs of these shapes goes sample by sample (a batch of a CNN whose
    /// samples are independent; see the `samples` module).
    pub fn splits_batch(&self, shapes: &[Vec<usize>]) -> Result<bool> {
        Ok(self.sample_split(shapes)?.is_some())
    }

    /// Runs `n` samples in contiguous groups, one group per thread, each group in runs of at
    /// most `per_run` samples.
    fn run_samples(&self, state: &mut State, bound: Vec<Tensor>, n: usize, per_run: usize) -> Result<Vec<Tensor>> {
        use rayon::prelude::*;
        let groups = self.threads.min(n);
        let per_group = n.div_ceil(groups);
        // Each group's samples in runs of nearly equal sizes.
        let mut runs_of: Vec<Vec<usize>> = Vec::with_capacity(groups);
        for g in (0..n).step_by(per_group) {
            let size = per_group.min(n - g);
            let runs = size.div_ceil(per_run.max(1));
            runs_of.push((0..runs).map(|r| (r + 1) * size / runs - r * size / runs).collect());
        }
        let sizes: Vec<usize> = runs_of.iter().flatten().copied().collect();
        let mut per_run_inputs: Vec<Vec<Tensor>> = sizes.iter().map(|_| Vec::with_capacity(bound.len())).collect();
        for t in &bound {
            for (inputs, part) in per_run_inputs.iter_mut().zip(samples::split(t, &sizes)?) {
                inputs.push(part);
            }
        }
        let mut plans = Vec::with_capacity(sizes.len());
        for &size in &sizes {
            let shapes: Vec<Vec<usize>> = bound.iter().map(|t| [&[size], &t.shape()[1..]].concat()).collect();
            plans.push(self.plan_for(&shapes)?);
        }
        // Per group: its state, its runs' inputs and their plans.
        type Group<'a> = (&'a mut State, &'a mut [Vec<Tensor>], &'a [Arc<plan::Plan>]);
        let mut work: Vec<Group> = Vec::with_capacity(groups);
        let (mut inputs_rest, mut plans_rest) = (per_run_inputs.as_mut_slice(), plans.as_slice());
        for (st, runs) in state.shards(runs_of.len()).iter_mut().zip(&runs_of) {
            let (inputs, rest) = inputs_rest.split_at_mut(runs.len());
            let (group_plans, prest) = plans_rest.split_at(runs.len());
            work.push((st, inputs, group_plans));
            (inputs_rest, plans_rest) = (rest, prest);
        }
        let run_group = |(st, inputs, plans): Group| {
            inputs.iter_mut().zip(plans).map(|(i, p)| exec::execute(p, st, std::mem::take(i), false)).collect()
        };
        let outs: Vec<Vec<Vec<Tensor>>> = match &self.pool {
            Some(pool) if groups > 1 => {
                pool.install(|| work.into_par_iter().map(run_group).collect::<Result<Vec<Vec<Vec<Tensor>>>>>())?
            }
            _ => work.into_iter().map(run_group).collect::<Result<Vec<Vec<Vec<Tensor>>>>>()?,
        };
        let mut results = outs.into_iter().flatten();
        let Some(first) = results.next() else { return Ok(vec![]) };
        let mut stacked: Vec<Vec<Tensor>> = first.into_iter().map(|t| vec![t]).collect();
        for outputs in results {
            for (s, t) in stacked.iter_mut().zip(outputs) {
                s.push(t);
            }
        }
        stacked.into_iter().map(samples::stack).collect()
    }

    /// Runs on named inputs; returns outputs in signature order.
    pub fn run(&self, state: &mut State, inputs: Vec<(String, Tensor)>) -> Result<Vec<Tensor>> {
        let bound = self.graph.bind_inputs(inputs)?;
        let shapes: Vec<Vec<usize>> = bound.iter().map(|t| t.shape().to_vec()).collect();
        if let Some((n, per_run)) = self.sample_split(&shapes)? {
            return self.run_samples(state, bound, n, per_run);
        }
        let plan = self.plan_for(&shapes)?;
        match &self.pool {
            Some(pool) => {
                let awake = KeepAwake::start(pool, self.threads - 1);
                pool.install(|| {
                    awake.started();
                    exec::execute(&plan, state, bound, true)
                })
            }
            None => exec::execute(&plan, state, bound, false),
        }
    }
}

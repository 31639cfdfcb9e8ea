//! Times a MiniLM (all-MiniLM-L6-v2) training step on slimnn's runtime: forward, loss and
//! the autodiff backward with parameters as inputs.
//!
//! ```text
//! cargo run --release -p slimnn-runtime --example minilm_train_step -- [batch] [seq] [threads] [steps]
//! ```
//! (defaults 8 128 2 5; set `PROFILE=1` for time per kernel kind). FLOPs are counted as 3x the
//! forward's 2.87 GFLOP per 128-token sequence, scaled linearly with the sequence length.

#[path = "common/minilm_step.rs"]
mod minilm_step;

use slimnn_runtime::{Runnable, RuntimeConfig};
use std::time::Instant;

fn main() -> Result<(), minilm_step::BoxError> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let arg = |i: usize, d: usize| args.get(i).copied().unwrap_or(d);
    let (batch, seq, threads, steps) = (arg(0, 8), arg(1, 128), arg(2, 2), arg(3, 5));
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/minilm");
    let t = Instant::now();
    let step = minilm_step::minilm_step_graph(&dir, None)?;
    println!(
        "step graph: {} nodes, {} parameters, built in {:.1?}",
        step.graph.nodes().len(),
        step.params.len(),
        t.elapsed()
    );
    let rt = Runnable::new(step.graph.clone(), RuntimeConfig::with_threads(threads))?;
    let inputs = minilm_step::step_inputs(&step, batch, seq, 30522)?;
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|(_, t)| t.shape().to_vec()).collect();
    let plan = rt.plan_for(&shapes)?;
    let summary = plan.summary();
    println!("plan: {} steps; kernels: {:?}", summary.steps, summary.kernels);
    if let Ok(kind) = std::env::var("SHOW_STEPS") {
        for s in plan.steps.iter().filter(|s| s.kernel.name() == kind) {
            println!("  {kind} {} -> {:?}", s.name, s.output_shapes);
        }
    }
    let mut st = rt.new_state();
    let t = Instant::now();
    let out = rt.run(&mut st, inputs.clone())?;
    println!("first step (plan + run): {:.1?}, loss {:?}", t.elapsed(), out[0].to_f64_vec());
    if std::env::var_os("PROFILE").is_some() {
        st.enable_profile();
    }
    let mut times = vec![];
    for _ in 0..steps {
        // The copy of the inputs (90 MB of parameters) is the caller's, outside the timing.
        let step_inputs = inputs.clone();
        let t = Instant::now();
        rt.run(&mut st, step_inputs)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let gflop = 3.0 * 2.87 * batch as f64 * seq as f64 / 128.0;
    println!(
        "batch {batch} seq {seq} threads {threads}: median {:.1} ms/step (min {:.1}) over {steps} steps, {:.1} GFLOP/step, {:.1} GFLOP/s",
        median * 1e3,
        times[0] * 1e3,
        gflop,
        gflop / median
    );
    for (kind, d, n) in st.profile() {
        println!("  {kind:40} {:8.1} ms/step  ({} calls/step)", d.as_secs_f64() * 1e3 / steps as f64, n / steps);
    }
    Ok(())
}

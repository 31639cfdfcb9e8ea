//! The step graph: model + loss + backward, run on the runtime.

use crate::{Parameters, Result, TrainError};
use slimnn_ir::autodiff::differentiate;
use slimnn_ir::{Graph, IrError, IrResult, OutletId};
use slimnn_runtime::{Runnable, RuntimeConfig, State};
use slimnn_tensor::Tensor;

/// Name of the model output that holds the logits (else the model's first output is used).
pub const LOGITS_OUTPUT: &str = "logits";

/// What one training step computes.
#[derive(Debug, Clone)]
pub struct StepOutput {
    pub loss: f32,
    pub logits: Tensor,
    /// One gradient per trainable parameter, in [`TrainGraph::trainable`] order.
    pub grads: Vec<Tensor>,
}

/// A model's step graph (outputs `loss`, `logits`, then `grad:<param>` per trainable parameter)
/// and its forward graph (output `logits`), each wrapped in a [`Runnable`]. Parameters are
/// graph inputs, so one plan per batch shape serves every step.
pub struct TrainGraph {
    step: Runnable,
    forward: Runnable,
    trainable: Vec<String>,
    step_inputs: Vec<String>,
    forward_inputs: Vec<String>,
}

fn input_names(g: &Graph) -> Vec<String> {
    (0..g.inputs().len()).map(|i| g.input_name(i).to_string()).collect()
}

/// The model's logits outlet: the output named [`LOGITS_OUTPUT`], else the first output.
pub fn logits_outlet(model: &Graph) -> IrResult<OutletId> {
    let outputs = model.outputs();
    outputs
        .iter()
        .find(|(n, _)| n == LOGITS_OUTPUT)
        .or_else(|| outputs.first())
        .map(|(_, o)| *o)
        .ok_or_else(|| IrError::Graph("the model has no outputs".into()))
}

impl TrainGraph {
    /// Builds the step graph of `model` (parameters already lifted to inputs named like
    /// `params`): `loss(graph, logits)` adds the loss and any inputs it needs, then autodiff
    /// adds the gradients of the loss with respect to every trainable parameter.
    pub fn new(
        model: &Graph,
        loss: &dyn Fn(&mut Graph, OutletId) -> IrResult<OutletId>,
        params: &Parameters,
        config: RuntimeConfig,
    ) -> Result<TrainGraph> {
        let logits = logits_outlet(model)?;
        let input_outlet = |g: &Graph, name: &str| -> Result<OutletId> {
            (0..g.inputs().len())
                .find(|&i| g.input_name(i) == name)
                .map(|i| OutletId::new(g.inputs()[i], 0))
                .ok_or_else(|| TrainError::Invalid(format!("parameter '{name}' is not an input of the model graph")))
        };
        for p in params.iter() {
            let o = input_outlet(model, &p.name)?;
            if model.fact(o).known_shape().as_deref() != Some(p.value.shape()) {
                return Err(TrainError::Invalid(format!(
                    "parameter '{}' is {:?} but the graph input is {}",
                    p.name,
                    p.value.shape(),
                    model.fact(o)
                )));
            }
        }
        let trainable = params.trainable_names();
        let mut g = model.clone();
        let loss_outlet = loss(&mut g, logits)?;
        let wrt = trainable.iter().map(|n| input_outlet(&g, n)).collect::<Result<Vec<_>>>()?;
        let grads = differentiate(&mut g, loss_outlet, &wrt)?;
        let mut outputs = vec![("loss".to_string(), loss_outlet), ("logits".to_string(), logits)];
        outputs.extend(trainable.iter().zip(grads).map(|(n, o)| (format!("grad:{n}"), o)));
        g.set_outputs(outputs);
        let mut forward = model.clone();
        forward.set_outputs(vec![("logits".to_string(), logits)]);
        Ok(TrainGraph {
            step_inputs: input_names(&g),
            forward_inputs: input_names(&forward),
            step: Runnable::new(g, config.clone())?,
            forward: Runnable::new(forward, config)?,
            trainable,
        })
    }

    /// Names of the parameters that get gradients, in output order.
    pub fn trainable(&self) -> &[String] {
        &self.trainable
    }

    /// Input names of the step graph: data, loss inputs (`target`, `teacher_logits`), parameters.
    pub fn step_inputs(&self) -> &[String] {
        &self.step_inputs
    }

    /// Input names of the forward graph: data and parameters.
    pub fn forward_inputs(&self) -> &[String] {
        &self.forward_inputs
    }

    /// The (canonicalised) step graph.
    pub fn step_graph(&self) -> &Graph {
        self.step.graph()
    }

    pub fn step_runnable(&self) -> &Runnable {
        &self.step
    }

    pub fn forward_runnable(&self) -> &Runnable {
        &self.forward
    }

    /// Runs one step on `inputs` (data, loss targets, and every parameter).
    pub fn step(&self, state: &mut State, inputs: Vec<(String, Tensor)>) -> Result<StepOutput> {
        let mut out = self.step.run(state, inputs)?.into_iter();
        let (Some(loss), Some(logits)) = (out.next(), out.next()) else {
            return Err(TrainError::Invalid("the step graph returned too few outputs".into()));
        };
        let loss = loss.cast(slimnn_tensor::DType::F32)?.as_slice::<f32>()?.first().copied().unwrap_or(f32::NAN);
        let grads: Vec<Tensor> = out.collect();
        if grads.len() != self.trainable.len() {
            return Err(TrainError::Invalid(format!(
                "the step graph returned {} gradients for {} parameters",
                grads.len(),
                self.trainable.len()
            )));
        }
        Ok(StepOutput { loss, logits, grads })
    }

    /// Runs the model alone (data inputs and every parameter); returns the logits.
    pub fn forward(&self, state: &mut State, inputs: Vec<(String, Tensor)>) -> Result<Tensor> {
        self.forward
            .run(state, inputs)?
            .into_iter()
            .next()
            .ok_or_else(|| TrainError::Invalid("the forward graph returned no output".into()))
    }
}

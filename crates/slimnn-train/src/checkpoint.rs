//! Checkpoints: one safetensors file written atomically. Tensors are the parameters
//! (`param:<name>`) and the optimizer state (`<kind>:<name>`, e.g. `exp_avg:fc1.weight`); the
//! header's metadata entry `slimnn.train` holds JSON with the progress (step, epoch, next batch,
//! seed), the optimizer's configuration and step count, the parameters' order and trainable
//! flags, and the log so far. One file means a crash leaves the previous checkpoint or the new
//! one, never a mix. Loading restores everything a resumed run needs to continue bit for bit.

use crate::log::TrainLog;
use crate::optim::{Optimizer, OptimizerConfig};
use crate::{file_err, write_atomic, Parameters, Result};
use safetensors::{Dtype, SafeTensors};
use slimnn_tensor::{DType, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const METADATA_KEY: &str = "slimnn.train";
const FORMAT_VERSION: u32 = 1;

/// Where a run stands: the next update is number `step`, batch `batch` of `epoch`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub step: u64,
    pub epoch: usize,
    pub batch: usize,
    /// The seed the batch order is drawn from (every batch is a function of it, the epoch and
    /// the batch index, so this is the whole random state).
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub params: Parameters,
    pub optimizer: Optimizer,
    pub progress: Progress,
    pub log: TrainLog,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ParamEntry {
    name: String,
    trainable: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct State {
    format_version: u32,
    progress: Progress,
    optimizer: OptimizerConfig,
    optimizer_steps: u64,
    parameters: Vec<ParamEntry>,
    log: TrainLog,
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Writes `ckpt` to `path` atomically.
pub fn save_checkpoint(path: &Path, ckpt: &Checkpoint) -> Result<()> {
    let state = State {
        format_version: FORMAT_VERSION,
        progress: ckpt.progress,
        optimizer: ckpt.optimizer.config.clone(),
        optimizer_steps: ckpt.optimizer.steps,
        parameters: ckpt.params.iter().map(|p| ParamEntry { name: p.name.clone(), trainable: p.trainable }).collect(),
        log: ckpt.log.clone(),
    };
    let json = serde_json::to_string(&state).map_err(|e| file_err(path, format!("checkpoint state: {e}")))?;
    let mut blobs: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for p in ckpt.params.iter() {
        blobs.push((format!("param:{}", p.name), p.value.shape().to_vec(), f32_bytes(p.value.as_slice::<f32>()?)));
    }
    for (kind, per_param) in &ckpt.optimizer.state {
        for (name, buf) in per_param {
            let shape = ckpt.params.get(name).map_or(vec![buf.len()], |p| p.value.shape().to_vec());
            blobs.push((format!("{kind}:{name}"), shape, f32_bytes(buf)));
        }
    }
    let views = blobs
        .iter()
        .map(|(n, shape, bytes)| {
            Ok((n.clone(), safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes)?))
        })
        .collect::<std::result::Result<Vec<_>, safetensors::SafeTensorError>>()
        .map_err(|e| file_err(path, format!("safetensors: {e}")))?;
    let metadata = HashMap::from([(METADATA_KEY.to_string(), json)]);
    let bytes =
        safetensors::serialize(views, Some(metadata)).map_err(|e| file_err(path, format!("safetensors: {e}")))?;
    write_atomic(path, &bytes)
}

/// Reads a checkpoint written by [`save_checkpoint`].
pub fn load_checkpoint(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| file_err(path, e))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| file_err(path, format!("not a safetensors checkpoint: {e}")))?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get(METADATA_KEY))
        .ok_or_else(|| file_err(path, format!("no '{METADATA_KEY}' metadata: not a slimnn-train checkpoint")))?;
    let state: State = serde_json::from_str(json).map_err(|e| file_err(path, format!("checkpoint state: {e}")))?;
    if state.format_version != FORMAT_VERSION {
        return Err(file_err(
            path,
            format!("checkpoint format {} is not supported (this build reads {FORMAT_VERSION})", state.format_version),
        ));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| file_err(path, format!("safetensors: {e}")))?;
    let read = |name: &str| -> Result<Tensor> {
        let view = st.tensor(name).map_err(|e| file_err(path, format!("tensor '{name}': {e}")))?;
        if view.dtype() != Dtype::F32 {
            return Err(file_err(path, format!("tensor '{name}' is {:?}, expected F32", view.dtype())));
        }
        Ok(Tensor::from_le_bytes(DType::F32, view.shape().to_vec(), view.data())?)
    };
    let mut params = Parameters::new();
    for entry in &state.parameters {
        params.push(&entry.name, read(&format!("param:{}", entry.name))?)?;
        if !entry.trainable {
            if let Some(p) = params.get_mut(&entry.name) {
                p.trainable = false;
            }
        }
    }
    let mut opt_state: BTreeMap<String, BTreeMap<String, Vec<f32>>> = BTreeMap::new();
    for name in st.names() {
        let Some((kind, param)) = name.split_once(':') else {
            return Err(file_err(path, format!("unexpected tensor '{name}'")));
        };
        if kind == "param" {
            continue;
        }
        let Some(p) = params.get(param) else {
            return Err(file_err(path, format!("optimizer state '{name}' names no parameter")));
        };
        let buf = read(name)?.into_vec::<f32>()?;
        if buf.len() != p.value.len() {
            return Err(file_err(
                path,
                format!("optimizer state '{name}' has {} values for {} parameter values", buf.len(), p.value.len()),
            ));
        }
        opt_state.entry(kind.to_string()).or_default().insert(param.to_string(), buf);
    }
    let optimizer = Optimizer { config: state.optimizer, steps: state.optimizer_steps, state: opt_state };
    Ok(Checkpoint { params, optimizer, progress: state.progress, log: state.log })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::StepRecord;

    #[test]
    fn round_trip_and_bad_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let mut params = Parameters::new();
        params
            .push("fc.weight", Tensor::from_vec(vec![2, 2], vec![1f32, -2.5, 3.25, f32::MIN_POSITIVE]).unwrap())
            .unwrap();
        params.push("fc.bias", Tensor::from_vec(vec![2], vec![0.1f32, 0.2]).unwrap()).unwrap();
        params.freeze(&["fc.bias".into()]).unwrap();
        let mut optimizer =
            Optimizer::new(OptimizerConfig::AdamW { lr: 0.1, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.0 });
        optimizer
            .step(&mut params, &[Tensor::from_vec(vec![2, 2], vec![0.5f32, 0.25, -1.0, 2.0]).unwrap()], 0.1)
            .unwrap();
        let log = TrainLog {
            recipe: serde_json::json!({"epochs": 3}),
            steps: vec![StepRecord {
                step: 0,
                epoch: 0,
                loss: 1.5,
                lr: 0.1,
                examples: 4,
                correct: 1,
                grad_norm: Some(2.0),
            }],
            epochs: vec![],
        };
        let ckpt = Checkpoint { params, optimizer, progress: Progress { step: 1, epoch: 0, batch: 1, seed: 9 }, log };
        let path = dir.join("ckpt.safetensors");
        save_checkpoint(&path, &ckpt).unwrap();
        let back = load_checkpoint(&path).unwrap();
        assert_eq!(back, ckpt);
        assert_eq!(back.params.trainable_names(), vec!["fc.weight"]);
        // No temporary files left behind.
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1);

        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        let e = load_checkpoint(&path).unwrap_err().to_string();
        assert!(e.contains("ckpt.safetensors") && e.contains("safetensors"), "{e}");
        std::fs::write(&path, b"junk").unwrap();
        assert!(load_checkpoint(&path).unwrap_err().to_string().contains("not a safetensors checkpoint"));
        let e = load_checkpoint(&dir.join("missing.safetensors")).unwrap_err().to_string();
        assert!(e.contains("missing.safetensors"), "{e}");
    }
}

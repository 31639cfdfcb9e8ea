//! Training on slimnn's graphs and runtime.
//!
//! A trainable model is an ordinary [`slimnn_ir::Graph`] whose parameters are `Input` nodes
//! ([`lift_parameters`] turns chosen `Const` initializers into inputs); the step graph adds a
//! loss ([`loss`]) and its backward nodes and runs on [`slimnn_runtime::Runnable`]. Around it:
//! optimizers ([`optim`]), learning-rate schedules ([`schedule`]), checkpoints
//! ([`checkpoint`]), recipes ([`recipe`]), and the [`Trainer`] loop with its JSON log and SVG
//! loss curve ([`log`]). See `doc/training.md`, "Training loop".

pub mod checkpoint;
pub mod graph;
pub mod log;
pub mod loss;
pub mod models;
pub mod optim;
pub mod params;
pub mod qat;
pub mod recipe;
pub mod schedule;
pub mod trainer;

pub use graph::{StepOutput, TrainGraph};
pub use params::{bake_parameters, glob_match, lift_parameters, Parameter, Parameters};
pub use recipe::Recipe;
pub use trainer::{Batch, Dataset, Evaluation, FitReport, TensorDataset, Trainer, WithTeacher};

/// Errors of training.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Ir(#[from] slimnn_ir::IrError),
    #[error(transparent)]
    Runtime(#[from] slimnn_runtime::RuntimeError),
    #[error(transparent)]
    Data(#[from] slimnn_data::DataError),
    #[error(transparent)]
    Tensor(#[from] slimnn_tensor::TensorError),
    /// A recipe that does not parse or validate; the message names the key (and line).
    #[error("recipe {origin}: {msg}")]
    Recipe { origin: String, msg: String },
    /// A file that cannot be read, written or understood.
    #[error("{path}: {msg}")]
    File { path: String, msg: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = TrainError> = std::result::Result<T, E>;

pub(crate) fn file_err(path: &std::path::Path, msg: impl std::fmt::Display) -> TrainError {
    TrainError::File { path: path.display().to_string(), msg: msg.to_string() }
}

/// Writes `bytes` to `path` through a temporary file in the same folder, synced and renamed
/// over `path`: readers see the old file or the new one, never a part.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    static COUNTER: AtomicUsize = AtomicUsize::new(0);
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let name = path.file_name().ok_or_else(|| file_err(path, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(file_err(path, e));
    }
    Ok(())
}

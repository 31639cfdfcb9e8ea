//! Model and tensor file formats: ONNX import and export ([`onnx`]), Hugging Face
//! BERT-family checkpoints ([`hf`]: `config.json` + `model.safetensors`), and `.npy` tensors
//! ([`npy`]). Every reader validates before it allocates, and every writer writes to a
//! temporary file renamed into place, so a failure never leaves a half-written file.

pub mod efficientnet;
mod error;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod npy;
pub mod onnx;
pub mod torch;

pub use error::FormatError;

pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// Loads any model slimnn reads as one graph: an `.onnx` file, a Hugging Face BERT-family
/// checkpoint folder (`config.json` + `model.safetensors`) or a PyTorch EfficientNet-Lite0
/// checkpoint (`.pth` / `.pt`, zip or legacy `torch.save`). The CLI and the server both load
/// through here, so they accept the same files.
pub fn load_model(path: &std::path::Path) -> Result<slimnn_ir::Graph> {
    if !path.exists() {
        return Err(FormatError::Invalid(format!("{}: no such file or folder", path.display())));
    }
    if path.is_dir() {
        if hf::is_checkpoint_dir(path) {
            return hf::load_bert(path);
        }
        let msg = format!("{}: a model folder needs config.json and model.safetensors", path.display());
        return Err(FormatError::Invalid(msg));
    }
    if torch::is_checkpoint(path) {
        // The one PyTorch architecture slimnn builds: EfficientNet-Lite0 (efficientnet_pytorch names).
        return efficientnet::load(path);
    }
    onnx::load(path)
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    let file_name =
        path.file_name().ok_or_else(|| FormatError::Invalid(format!("{} is not a file path", path.display())))?;
    let tmp = dir.join(format!(".{}.{}.tmp", file_name.to_string_lossy(), std::process::id()));
    let io = |source| FormatError::Io { path: path.display().to_string(), source };
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

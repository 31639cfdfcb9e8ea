//! Server and per-model configuration: flags, a JSON file, and each repository model's
//! `slimnn-model.json`. Flags override the file; the file overrides the defaults.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How one model is served.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Most rows (first-axis entries) merged into one run; 1 turns batching off.
    pub max_batch_size: usize,
    /// How long the first request of a batch may wait for others to join it.
    pub max_batch_delay_ms: f64,
    /// Runtime threads per run (default: physical cores).
    pub threads: Option<usize>,
    /// Arithmetic of the linear layers: `f32`, or `bf16` products where the CPU has AVX-512
    /// BF16.
    pub precision: slimnn_runtime::Precision,
    /// Attention's two products in int8 where AMX tiles are granted
    /// (`RuntimeConfig::int8_attention`).
    pub int8_attention: bool,
    /// Workers running batches side by side, each with its own buffers.
    pub instances: usize,
    /// Requests that may wait; one more is refused at once with 503 / UNAVAILABLE.
    pub queue_capacity: usize,
    /// Sequence lengths requests are padded up to (transformers only), so that requests of
    /// nearby lengths share a batch and the runtime sees few distinct shapes.
    pub sequence_buckets: Vec<usize>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            max_batch_size: 8,
            max_batch_delay_ms: 2.0,
            threads: None,
            precision: slimnn_runtime::Precision::F32,
            int8_attention: false,
            instances: 1,
            queue_capacity: 64,
            sequence_buckets: vec![16, 32, 64, 128, 256, 512],
        }
    }
}

impl ModelConfig {
    pub fn validate(&self, what: &str) -> Result<()> {
        if self.max_batch_size == 0 {
            bail!("{what}: max_batch_size must be at least 1");
        }
        if self.instances == 0 {
            bail!("{what}: instances must be at least 1");
        }
        if self.queue_capacity == 0 {
            bail!("{what}: queue_capacity must be at least 1");
        }
        if !(self.max_batch_delay_ms.is_finite() && self.max_batch_delay_ms >= 0.0) {
            bail!("{what}: max_batch_delay_ms must be a non-negative number");
        }
        if self.threads == Some(0) {
            bail!("{what}: threads must be at least 1");
        }
        Ok(())
    }
}

/// A model named in the server config file.
#[derive(Debug, Clone, Deserialize)]
pub struct FileModel {
    pub path: PathBuf,
    #[serde(flatten)]
    pub config: BTreeMap<String, serde_json::Value>,
}

/// The server config file (JSON). Every field is optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub host: Option<String>,
    pub http_port: Option<u16>,
    pub grpc_port: Option<u16>,
    pub max_body_bytes: Option<usize>,
    pub request_timeout_ms: Option<u64>,
    pub model_control: Option<bool>,
    pub log_format: Option<String>,
    pub model_repository: Option<PathBuf>,
    pub models: BTreeMap<String, FileModel>,
    /// Defaults for every model (a repository model's `slimnn-model.json` overrides them).
    pub model_defaults: Option<serde_json::Value>,
}

/// `slimnn serve` flags.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// A model to serve as NAME=PATH (an .onnx file or a checkpoint folder); repeatable.
    #[arg(long = "model", value_name = "NAME=PATH")]
    pub models: Vec<String>,
    /// A folder of models: DIR/NAME/VERSION/{model.onnx | checkpoint files}, optional DIR/NAME/slimnn-model.json.
    #[arg(long, value_name = "DIR")]
    pub model_repository: Option<PathBuf>,
    /// REST port (0 picks a free one).
    #[arg(long)]
    pub http_port: Option<u16>,
    /// gRPC port (0 picks a free one).
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// Address to listen on (default 0.0.0.0).
    #[arg(long)]
    pub host: Option<String>,
    /// A JSON config file (see doc/serving.md); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Default max batch size for every model (1: no batching).
    #[arg(long)]
    pub max_batch_size: Option<usize>,
    /// Default batching delay in milliseconds.
    #[arg(long)]
    pub max_batch_delay_ms: Option<f64>,
    /// Default runtime threads per model.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Default arithmetic of the models' linear layers: f32, or bf16 (where the CPU has
    /// AVX-512 BF16).
    #[arg(long)]
    pub precision: Option<slimnn_runtime::Precision>,
    /// Default workers per model.
    #[arg(long)]
    pub instances: Option<usize>,
    /// Default queue capacity per model (requests).
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Largest request body in bytes.
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Per-request timeout in milliseconds (queueing plus running).
    #[arg(long)]
    pub request_timeout_ms: Option<u64>,
    /// Enable the repository endpoints that load and unload models from disk.
    #[arg(long)]
    pub model_control: bool,
    /// Log format: text or json.
    #[arg(long)]
    pub log_format: Option<String>,
}

/// Everything the server runs with, after flags, file and defaults are merged.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub host: String,
    pub http_port: u16,
    pub grpc_port: u16,
    pub max_body_bytes: usize,
    pub request_timeout_ms: u64,
    pub model_control: bool,
    pub log_json: bool,
    pub model_repository: Option<PathBuf>,
    /// Models named directly: name, path, per-model overrides.
    pub models: Vec<(String, PathBuf, BTreeMap<String, serde_json::Value>)>,
    pub model_defaults: ModelConfig,
}

/// `base` with the keys of `overrides` applied (unknown keys are an error naming `what`).
pub fn merge_model_config(
    base: &ModelConfig,
    overrides: &BTreeMap<String, serde_json::Value>,
    what: &str,
) -> Result<ModelConfig> {
    let mut v = serde_json::to_value(base)?;
    if let Some(obj) = v.as_object_mut() {
        for (k, val) in overrides {
            obj.insert(k.clone(), val.clone());
        }
    }
    let cfg: ModelConfig = serde_json::from_value(v).with_context(|| format!("{what}: bad model config"))?;
    cfg.validate(what)?;
    Ok(cfg)
}

impl ServerConfig {
    pub fn from_args(args: &ServeArgs) -> Result<ServerConfig> {
        let file: FileConfig = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                serde_json::from_str(&text).with_context(|| format!("{}: bad server config", p.display()))?
            }
            None => FileConfig::default(),
        };
        let mut defaults = match &file.model_defaults {
            Some(v) => {
                let map: BTreeMap<String, serde_json::Value> =
                    serde_json::from_value(v.clone()).context("model_defaults must be an object")?;
                merge_model_config(&ModelConfig::default(), &map, "model_defaults")?
            }
            None => ModelConfig::default(),
        };
        if let Some(n) = args.max_batch_size {
            defaults.max_batch_size = n;
        }
        if let Some(d) = args.max_batch_delay_ms {
            defaults.max_batch_delay_ms = d;
        }
        if args.threads.is_some() {
            defaults.threads = args.threads;
        }
        if let Some(p) = args.precision {
            defaults.precision = p;
        }
        if let Some(n) = args.instances {
            defaults.instances = n;
        }
        if let Some(n) = args.queue_capacity {
            defaults.queue_capacity = n;
        }
        defaults.validate("model defaults")?;
        let mut models: Vec<(String, PathBuf, BTreeMap<String, serde_json::Value>)> =
            file.models.into_iter().map(|(name, m)| (name, m.path, m.config)).collect();
        for spec in &args.models {
            let (name, path) = spec.split_once('=').with_context(|| format!("--model '{spec}' must be NAME=PATH"))?;
            check_model_name(name)?;
            models.retain(|(n, _, _)| n != name);
            models.push((name.to_string(), PathBuf::from(path), BTreeMap::new()));
        }
        let model_repository = args.model_repository.clone().or(file.model_repository);
        if models.is_empty() && model_repository.is_none() {
            bail!("nothing to serve: give --model NAME=PATH or --model-repository DIR");
        }
        let log_format = args.log_format.clone().or(file.log_format).unwrap_or_else(|| "text".into());
        let log_json = match log_format.as_str() {
            "json" => true,
            "text" => false,
            other => bail!("--log-format '{other}': use text or json"),
        };
        Ok(ServerConfig {
            host: args.host.clone().or(file.host).unwrap_or_else(|| "0.0.0.0".into()),
            http_port: args.http_port.or(file.http_port).unwrap_or(8000),
            grpc_port: args.grpc_port.or(file.grpc_port).unwrap_or(8001),
            max_body_bytes: args.max_body_bytes.or(file.max_body_bytes).unwrap_or(64 << 20),
            request_timeout_ms: args.request_timeout_ms.or(file.request_timeout_ms).unwrap_or(30_000),
            model_control: args.model_control || file.model_control.unwrap_or(false),
            log_json,
            model_repository,
            models,
            model_defaults: defaults,
        })
    }
}

/// Model names appear in URLs and metric labels: keep them to `A-Za-z0-9._-`.
pub fn check_model_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.starts_with('.')
        || !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        bail!("model name '{name}': use letters, digits, '.', '_' and '-' (not starting with '.')");
    }
    Ok(())
}

/// Reads `DIR/NAME/slimnn-model.json` over `defaults` (absent file: the defaults).
pub fn repository_model_config(dir: &Path, defaults: &ModelConfig) -> Result<ModelConfig> {
    let p = dir.join("slimnn-model.json");
    if !p.is_file() {
        return Ok(defaults.clone());
    }
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let map: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&text).with_context(|| format!("{}: not a JSON object", p.display()))?;
    merge_model_config(defaults, &map, &p.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let file = dir.join("serve.json");
        std::fs::write(
            &file,
            r#"{"http_port": 9000, "grpc_port": 9001, "log_format": "json",
                "models": {"a": {"path": "a.onnx", "max_batch_size": 16}},
                "model_defaults": {"max_batch_delay_ms": 7}}"#,
        )
        .unwrap();
        let args = ServeArgs { config: Some(file.clone()), grpc_port: Some(0), ..Default::default() };
        let c = ServerConfig::from_args(&args).unwrap();
        assert_eq!((c.http_port, c.grpc_port, c.log_json), (9000, 0, true));
        assert_eq!(c.model_defaults.max_batch_delay_ms, 7.0);
        let (name, path, overrides) = &c.models[0];
        assert_eq!((name.as_str(), path.to_str().unwrap()), ("a", "a.onnx"));
        let cfg = merge_model_config(&c.model_defaults, overrides, "a").unwrap();
        assert_eq!((cfg.max_batch_size, cfg.max_batch_delay_ms), (16, 7.0));

        std::fs::write(&file, r#"{"models": {"a": {"path": "a.onnx", "max_bach_size": 16}}}"#).unwrap();
        let c = ServerConfig::from_args(&ServeArgs { config: Some(file.clone()), ..Default::default() }).unwrap();
        let err = merge_model_config(&c.model_defaults, &c.models[0].2, "a").unwrap_err();
        assert!(format!("{err:#}").contains("max_bach_size"), "{err:#}");
        std::fs::write(&file, r#"{"http_prot": 1}"#).unwrap();
        let err = ServerConfig::from_args(&ServeArgs { config: Some(file), ..Default::default() }).unwrap_err();
        assert!(format!("{err:#}").contains("http_prot"), "{err:#}");
        assert!(ServerConfig::from_args(&ServeArgs::default()).is_err(), "nothing to serve is an error");
        // Precision per model, by name; a bad name says which key.
        let bf16: BTreeMap<String, serde_json::Value> = [("precision".into(), "bf16".into())].into();
        let cfg = merge_model_config(&ModelConfig::default(), &bf16, "b").unwrap();
        assert_eq!(cfg.precision, slimnn_runtime::Precision::Bf16);
        let bad: BTreeMap<String, serde_json::Value> = [("precision".into(), "int3".into())].into();
        let err = merge_model_config(&ModelConfig::default(), &bad, "b").unwrap_err();
        assert!(format!("{err:#}").contains("int3"), "{err:#}");
        assert!(check_model_name("../etc").is_err());
    }
}

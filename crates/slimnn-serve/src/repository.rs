//! The model repository: which models and versions exist, their state (loading, ready, failed,
//! unloaded), and loading/unloading them while the server runs.
//!
//! Layout of a repository folder: `DIR/NAME/VERSION/` with `model.onnx` (or another single
//! `.onnx` file, or a checkpoint folder's files), optional `tokenizer.json` beside it or in
//! `DIR/NAME/`, and optional `DIR/NAME/slimnn-model.json` with the model's [`ModelConfig`].
//! Versions are positive integers; requests without a version get the highest ready one.

use crate::config::{self, ModelConfig, ServerConfig};
use crate::error::ServeError;
use crate::metrics::Metrics;
use crate::model::{tokenizer_for, LoadedModel, ModelSource};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

#[derive(Clone)]
pub enum VersionState {
    Loading,
    Ready(Arc<LoadedModel>),
    Failed(String),
    Unloaded,
}

impl VersionState {
    fn name(&self) -> &'static str {
        match self {
            VersionState::Loading => "LOADING",
            VersionState::Ready(_) => "READY",
            VersionState::Failed(_) => "UNAVAILABLE",
            VersionState::Unloaded => "UNAVAILABLE",
        }
    }
}

/// One line of `POST /v2/repository/index`.
#[derive(Debug, Serialize)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: &'static str,
    pub reason: String,
}

pub struct Repository {
    models: RwLock<BTreeMap<String, BTreeMap<u64, VersionState>>>,
    config: Arc<ServerConfig>,
    metrics: Arc<Metrics>,
    startup_done: AtomicBool,
}

impl Repository {
    pub fn new(config: Arc<ServerConfig>, metrics: Arc<Metrics>) -> Repository {
        Repository { models: RwLock::new(BTreeMap::new()), config, metrics, startup_done: AtomicBool::new(false) }
    }

    /// Every model name the configuration knows about (direct models and repository folders).
    pub fn configured_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.config.models.iter().map(|(n, _, _)| n.clone()).collect();
        if let Some(dir) = &self.config.model_repository {
            if let Ok(rd) = std::fs::read_dir(dir) {
                for e in rd.flatten() {
                    let name = e.file_name().to_string_lossy().to_string();
                    if e.path().is_dir() && config::check_model_name(&name).is_ok() && !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names.sort();
        names
    }

    /// Loads everything configured; a model that fails is recorded as failed, not fatal.
    pub fn load_all(&self) {
        if let Some(dir) = &self.config.model_repository {
            if !dir.is_dir() {
                tracing::error!(repository = %dir.display(), "model repository is not a folder");
            }
        }
        for name in self.configured_names() {
            if let Err(e) = self.load(&name) {
                tracing::error!(model = %name, error = %format!("{e:#}"), "model not loaded");
            }
        }
        self.startup_done.store(true, Ordering::SeqCst);
    }

    pub fn startup_done(&self) -> bool {
        self.startup_done.load(Ordering::SeqCst)
    }

    /// Where a model's versions come from, read from disk now (so edits are picked up on reload).
    fn sources(&self, name: &str) -> Result<Vec<(u64, Result<ModelSource>)>> {
        config::check_model_name(name)?;
        if let Some((_, path, overrides)) = self.config.models.iter().find(|(n, _, _)| n == name) {
            let cfg = config::merge_model_config(&self.config.model_defaults, overrides, name);
            let src = cfg.map(|config| ModelSource {
                name: name.to_string(),
                version: "1".into(),
                path: path.clone(),
                tokenizer: tokenizer_for(path),
                config,
            });
            return Ok(vec![(1, src)]);
        }
        let Some(repo) = &self.config.model_repository else { bail!("no model named '{name}'") };
        let dir = repo.join(name);
        if !dir.is_dir() {
            bail!("no model named '{name}' (no folder {})", dir.display());
        }
        let cfg = config::repository_model_config(&dir, &self.config.model_defaults);
        let mut out = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))?.flatten() {
            let Ok(version) = e.file_name().to_string_lossy().parse::<u64>() else { continue };
            if !e.path().is_dir() || version == 0 {
                continue;
            }
            let src = match &cfg {
                Ok(config) => version_source(name, version, &e.path(), &dir, config.clone()),
                Err(err) => Err(anyhow::anyhow!("{err:#}")),
            };
            out.push((version, src));
        }
        if out.is_empty() {
            bail!("{}: no version folders (1/, 2/, ...)", dir.display());
        }
        out.sort_by_key(|(v, _)| *v);
        Ok(out)
    }

    /// Loads (or reloads) every version of `name`. Versions already serving keep serving until
    /// their replacement is ready; a version that fails is recorded with the reason.
    pub fn load(&self, name: &str) -> Result<()> {
        let sources = match self.sources(name) {
            Ok(s) => s,
            Err(e) => {
                if self.config.model_repository.is_some() && config::check_model_name(name).is_ok() {
                    let mut models = self.write();
                    if let Some(vs) = models.get_mut(name) {
                        for st in vs.values_mut() {
                            *st = VersionState::Failed(format!("{e:#}"));
                        }
                    }
                }
                return Err(e);
            }
        };
        {
            let mut models = self.write();
            let entry = models.entry(name.to_string()).or_default();
            for (v, _) in &sources {
                entry.entry(*v).or_insert(VersionState::Loading);
            }
        }
        let wanted: Vec<u64> = sources.iter().map(|(v, _)| *v).collect();
        let mut first_err = None;
        for (v, src) in sources {
            let started = std::time::Instant::now();
            let state = match src.and_then(|s| LoadedModel::load(s, self.metrics.clone())) {
                Ok(m) => {
                    tracing::info!(model = %name, version = v, path = %m.source.path.display(),
                        ms = started.elapsed().as_millis() as u64, "model ready");
                    VersionState::Ready(Arc::new(m))
                }
                Err(e) => {
                    let reason = format!("{e:#}");
                    tracing::error!(model = %name, version = v, error = %reason, "model failed to load");
                    first_err.get_or_insert_with(|| anyhow::anyhow!("{name} version {v}: {reason}"));
                    VersionState::Failed(reason)
                }
            };
            self.write().entry(name.to_string()).or_default().insert(v, state);
        }
        // Versions whose folders are gone stop serving.
        if let Some(vs) = self.write().get_mut(name) {
            for (v, st) in vs.iter_mut() {
                if !wanted.contains(v) {
                    *st = VersionState::Unloaded;
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Stops serving every version of `name`; queued requests still finish.
    pub fn unload(&self, name: &str) -> Result<(), ServeError> {
        let mut models = self.write();
        let vs = models.get_mut(name).ok_or_else(|| ServeError::NotFound(format!("no model named '{name}'")))?;
        for st in vs.values_mut() {
            *st = VersionState::Unloaded;
        }
        tracing::info!(model = %name, "model unloaded");
        Ok(())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, BTreeMap<u64, VersionState>>> {
        self.models.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, BTreeMap<u64, VersionState>>> {
        self.models.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The model version a request is for: the named version, or the highest ready one.
    pub fn resolve(&self, name: &str, version: Option<&str>) -> Result<Arc<LoadedModel>, ServeError> {
        let models = self.read();
        let vs = models.get(name).ok_or_else(|| ServeError::NotFound(format!("no model named '{name}'")))?;
        let state = match version.filter(|v| !v.is_empty()) {
            Some(v) => {
                let n: u64 = v.parse().map_err(|_| {
                    ServeError::BadRequest(format!("model '{name}': version '{v}' is not a positive integer"))
                })?;
                let st =
                    vs.get(&n).ok_or_else(|| ServeError::NotFound(format!("model '{name}' has no version {n}")))?;
                (n, st)
            }
            None => match vs.iter().rev().find(|(_, st)| matches!(st, VersionState::Ready(_))) {
                Some((n, st)) => (*n, st),
                None => match vs.iter().next_back() {
                    Some((n, st)) => (*n, st),
                    None => return Err(ServeError::NotFound(format!("no model named '{name}'"))),
                },
            },
        };
        match state.1 {
            VersionState::Ready(m) => Ok(m.clone()),
            VersionState::Loading => {
                Err(ServeError::Unavailable(format!("model '{name}' version {} is still loading", state.0)))
            }
            VersionState::Failed(reason) => {
                Err(ServeError::Unavailable(format!("model '{name}' version {} failed to load: {reason}", state.0)))
            }
            VersionState::Unloaded => {
                Err(ServeError::Unavailable(format!("model '{name}' version {} is not loaded", state.0)))
            }
        }
    }

    /// Versions of a model with their states, for metadata.
    pub fn versions(&self, name: &str) -> Vec<String> {
        self.read()
            .get(name)
            .map(|vs| {
                vs.iter().filter(|(_, s)| matches!(s, VersionState::Ready(_))).map(|(v, _)| v.to_string()).collect()
            })
            .unwrap_or_default()
    }

    pub fn index(&self) -> Vec<IndexEntry> {
        let models = self.read();
        let mut out = Vec::new();
        for (name, vs) in models.iter() {
            for (v, st) in vs {
                let reason = match st {
                    VersionState::Failed(r) => r.clone(),
                    VersionState::Unloaded => "unloaded".into(),
                    _ => String::new(),
                };
                out.push(IndexEntry { name: name.clone(), version: v.to_string(), state: st.name(), reason });
            }
        }
        out
    }

    /// Every ready model version (for shutdown).
    pub fn loaded(&self) -> Vec<Arc<LoadedModel>> {
        self.read()
            .values()
            .flat_map(|vs| vs.values())
            .filter_map(|s| match s {
                VersionState::Ready(m) => Some(m.clone()),
                _ => None,
            })
            .collect()
    }

    /// Stops serving everything; returns what was loaded so the caller can wait for it to drain.
    pub fn unload_all(&self) -> Vec<Arc<LoadedModel>> {
        let loaded = self.loaded();
        for vs in self.write().values_mut() {
            for st in vs.values_mut() {
                *st = VersionState::Unloaded;
            }
        }
        loaded
    }
}

/// The model file or checkpoint folder inside a version folder.
fn version_source(name: &str, version: u64, vdir: &Path, model_dir: &Path, config: ModelConfig) -> Result<ModelSource> {
    let path: PathBuf = if vdir.join("model.onnx").is_file() {
        vdir.join("model.onnx")
    } else if slimnn_formats::hf::is_checkpoint_dir(vdir) {
        vdir.to_path_buf()
    } else {
        let onnx: Vec<PathBuf> = std::fs::read_dir(vdir)
            .with_context(|| format!("reading {}", vdir.display()))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "onnx"))
            .collect();
        match onnx.as_slice() {
            [one] => one.clone(),
            [] => bail!("{}: no model.onnx and no checkpoint (config.json + model.safetensors)", vdir.display()),
            _ => bail!("{}: several .onnx files; name the one to serve model.onnx", vdir.display()),
        }
    };
    let tokenizer = tokenizer_for(&path).or_else(|| {
        let p = model_dir.join("tokenizer.json");
        p.is_file().then_some(p)
    });
    Ok(ModelSource { name: name.to_string(), version: version.to_string(), path, tokenizer, config })
}

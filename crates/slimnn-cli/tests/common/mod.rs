//! Shared helpers for integration tests: where assets and the Python venv live, and running
//! ONNX Runtime through `scripts/ort_run.py`.
#![allow(dead_code)]

use slimnn_formats::npy;
use slimnn_tensor::Tensor;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repo root exists")
}

/// The assets folder (`SLIMNN_ASSETS` or `<repo>/assets`); panics with the fix when absent.
pub fn asset(rel: &str) -> PathBuf {
    let root = std::env::var_os("SLIMNN_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"));
    let p = root.join(rel);
    assert!(p.exists(), "{} is missing: run scripts/fetch-assets.sh", p.display());
    p
}

pub fn python() -> PathBuf {
    let venv = std::env::var_os("SLIMNN_VENV").map(PathBuf::from).unwrap_or_else(|| repo_root().join(".venv"));
    let p = venv.join("bin/python");
    assert!(p.exists(), "{} is missing: run scripts/setup-python.sh", p.display());
    p
}

/// Runs `model` in ONNX Runtime on named inputs; returns outputs by file stem.
pub fn ort_run(model: &Path, inputs: &[(String, Tensor)], work: &Path) -> Vec<(String, Tensor)> {
    let in_dir = work.join("in");
    let out_dir = work.join("out");
    let _ = std::fs::remove_dir_all(&in_dir);
    let _ = std::fs::remove_dir_all(&out_dir);
    std::fs::create_dir_all(&in_dir).unwrap();
    for (name, t) in inputs {
        npy::write(&in_dir.join(format!("{name}.npy")), t).unwrap();
    }
    let out = Command::new(python())
        .arg(repo_root().join("scripts/ort_run.py"))
        .arg(model)
        .arg("--input-dir")
        .arg(&in_dir)
        .arg("--output-dir")
        .arg(&out_dir)
        .arg("--threads")
        .arg("1")
        .output()
        .expect("python runs");
    assert!(out.status.success(), "ort_run.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let mut res: Vec<(String, Tensor)> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_stem().unwrap().to_string_lossy().to_string(), npy::read(&p).unwrap())
        })
        .collect();
    res.sort_by(|a, b| a.0.cmp(&b.0));
    res
}

/// A scratch directory removed when dropped; derefs to its path.
pub struct TestDir(tempfile::TempDir);

impl std::ops::Deref for TestDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        self.0.path()
    }
}

impl AsRef<Path> for TestDir {
    fn as_ref(&self) -> &Path {
        self.0.path()
    }
}

pub fn temp_dir(tag: &str) -> TestDir {
    TestDir(tempfile::Builder::new().prefix(&format!("slimnn-test-{tag}-")).tempdir().unwrap())
}

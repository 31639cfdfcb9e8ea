//! PyTorch checkpoint reader: both torch.save layouts on fixtures written by
//! `scripts/make_torch_fixtures.py` (stdlib pickle and zipfile opcode for opcode as torch
//! writes them), the real legacy EfficientNet-Lite0 checkpoint, and the error paths.

use slimnn_formats::torch::{self, CheckpointFormat};
use slimnn_tensor::DType;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/torch").join(name)
}

#[derive(serde::Deserialize)]
struct Expected {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    values: Vec<serde_json::Value>,
}

fn check_against_expected(file: &str, format: CheckpointFormat) {
    let sd = torch::load(&fixture(file)).unwrap();
    assert_eq!(sd.format, format);
    let expected: Vec<Expected> =
        serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    let names: Vec<&str> = sd.names().collect();
    let want: Vec<&str> = expected.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, want, "{file}: names in checkpoint order");
    for e in &expected {
        let t = sd.get(&e.name).unwrap();
        assert_eq!(t.dtype().name(), e.dtype, "{file} {}", e.name);
        assert_eq!(t.shape(), e.shape.as_slice(), "{file} {}", e.name);
        if t.dtype() == DType::I64 {
            let got = t.to_i64_vec().unwrap();
            let want: Vec<i64> = e.values.iter().map(|v| v.as_i64().unwrap()).collect();
            assert_eq!(got, want, "{file} {}", e.name);
        } else {
            let got = t.to_f64_vec();
            let want: Vec<f64> = e.values.iter().map(|v| v.as_f64().unwrap()).collect();
            assert_eq!(got, want, "{file} {}", e.name);
        }
    }
}

#[test]
fn zip_format_fixture() {
    check_against_expected("state_dict_zip.pt", CheckpointFormat::Zip);
}

#[test]
fn legacy_format_fixture() {
    check_against_expected("state_dict_legacy.pt", CheckpointFormat::Legacy);
}

#[test]
fn training_checkpoint_is_unwrapped() {
    let sd = torch::load(&fixture("training.pt")).unwrap();
    assert_eq!(sd.len(), 8);
    assert_eq!(sd.get("double").unwrap().to_f64_vec(), vec![std::f64::consts::PI, -std::f64::consts::E]);
}

#[test]
fn sniffing() {
    assert!(torch::is_checkpoint(&fixture("state_dict_zip.pt")));
    assert!(torch::is_checkpoint(&fixture("state_dict_legacy.pt")));
    assert!(!torch::is_checkpoint(&fixture("expected.json")));
}

fn load_err(path: &Path) -> String {
    torch::load(path).map(|_| ()).unwrap_err().to_string()
}

#[test]
fn missing_storage_names_file_tensor_and_key() {
    let e = load_err(&fixture("missing_storage.pt"));
    assert!(e.contains("missing_storage.pt"), "{e}");
    assert!(e.contains("tensor 'double'") && e.contains("storage '3' is missing"), "{e}");
    assert!(e.contains("missing_storage/data/3"), "{e}");
}

#[test]
fn pickle_that_is_not_a_state_dict() {
    let e = load_err(&fixture("bad_global.pt"));
    assert!(e.contains("bad_global.pt") && e.contains("not a state_dict: global __builtin__.eval"), "{e}");
    let e = load_err(&fixture("not_tensors.pt"));
    assert!(e.contains("not a state_dict: entry 'epoch' is a int"), "{e}");
}

#[test]
fn truncated_files_give_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for name in ["state_dict_zip.pt", "state_dict_legacy.pt"] {
        let bytes = std::fs::read(fixture(name)).unwrap();
        for cut in (0..bytes.len()).step_by(7) {
            let e = torch::parse(&bytes[..cut], name).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(name), "{name} cut at {cut}: {e}");
        }
        // Every flipped byte either still parses or fails cleanly.
        for at in 0..bytes.len() {
            let mut b = bytes.clone();
            b[at] ^= 0x5a;
            let _ = torch::parse(&b, name);
        }
        let path = dir.join(name);
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        let e = load_err(&path);
        assert!(e.contains(&path.display().to_string()), "{e}");
    }
    let e = load_err(&dir.join("absent.pth"));
    assert!(e.contains("absent.pth"), "{e}");
}

fn asset(rel: &str) -> Option<PathBuf> {
    let root = std::env::var_os("SLIMNN_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets"));
    let p = root.join(rel);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} is missing (run scripts/fetch-assets.sh)", p.display());
        None
    }
}

/// The real legacy checkpoint (TF-layout strides) against values numpy read from it through
/// `scripts/efficientnet_onnx.py`'s reader: first elements, sum and index-weighted sum.
#[test]
fn efficientnet_lite0_legacy_checkpoint() {
    let Some(path) = asset("efficientnet-lite0/efficientnet-lite0-57934424.pth") else { return };
    let sd = torch::load(&path).unwrap();
    assert_eq!(sd.format, CheckpointFormat::Legacy);
    assert_eq!(sd.len(), 296);
    assert_eq!(sd.iter().map(|(_, t)| t.len()).sum::<usize>(), 4_694_073);
    // (name, shape, first three values, sum, index-weighted sum)
    type Case<'a> = (&'a str, &'a [usize], [f64; 3], f64, f64);
    let cases: [Case; 3] = [
        (
            "_conv_stem.weight",
            &[32, 3, 3, 3],
            [-1.1103360652923584, -1.3087704181671143, -0.010156914591789246],
            -26.811376610887237,
            -6051.748981363955,
        ),
        (
            "_blocks.15._project_conv.weight",
            &[320, 1152, 1, 1],
            [0.03738270327448845, 0.029342927038669586, -0.028256788849830627],
            39.96609939538757,
            1073385.5900966348,
        ),
        (
            "_fc.bias",
            &[1000],
            [0.032053910195827484, -0.01598576083779335, 0.005290735047310591],
            -0.04981697298353538,
            500.01541675350745,
        ),
    ];
    for (name, shape, head, sum, weighted) in cases {
        let t = sd.get(name).unwrap();
        assert_eq!(t.dtype(), DType::F32, "{name}");
        assert_eq!(t.shape(), shape, "{name}");
        let v = t.to_f64_vec();
        assert_eq!(&v[..3], &head, "{name}");
        let s: f64 = v.iter().sum();
        let w: f64 = v.iter().enumerate().map(|(i, x)| i as f64 * x).sum();
        assert!((s - sum).abs() < 1e-9 * v.len() as f64, "{name}: sum {s} vs {sum}");
        assert!((w - weighted).abs() < 1e-9 * weighted.abs().max(1.0), "{name}: {w} vs {weighted}");
    }
    assert_eq!(sd.get("_bn0.num_batches_tracked").unwrap().dtype(), DType::I64);
}

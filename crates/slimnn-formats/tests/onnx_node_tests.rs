//! ONNX backend node tests: every case under `assets/onnx-node-tests/<suite>/` is imported and
//! run through the reference evaluator, and its outputs compared with the expected ones.
//!
//! `onnx-node-tests.manifest` lists the cases that must pass: one regex per line, matched
//! against `<suite>/<case>` (e.g. `1.12/test_relu`), optionally followed by `rtol=..` and
//! `atol=..`; `#` starts a comment. A line starting with `!` excludes the cases it matches. The
//! first matching line applies. Cases no line matches run
//! too and are only counted. A summary is printed and a report written to
//! `target/onnx-conformance.md`.
//!
//! Assets come from `scripts/fetch-assets.sh` (folder `<repo>/assets`, or `$SLIMNN_ASSETS`).
//! `SLIMNN_ONNX_CASES=<regex>` restricts the run to matching cases (for debugging).
//! `SLIMNN_WRITE_SUPPORTED_OPS=1` also writes `doc/SUPPORTED_OPS.md` (per op: the versions the
//! importer reads and the cases passing in each suite) after a full run.

use prost::Message;
use regex::Regex;
use slimnn_formats::onnx::{self, proto};
use slimnn_runtime::{Runnable, RuntimeConfig};
use slimnn_tensor::{DType, Tensor};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const SUITES: [&str; 2] = ["1.12", "current"];
const DEFAULT_RTOL: f64 = 1e-3;
const DEFAULT_ATOL: f64 = 1e-5;

struct Entry {
    re: Regex,
    exclude: bool,
    rtol: f64,
    atol: f64,
    line: usize,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn parse_manifest(text: &str) -> Result<Vec<Entry>, String> {
    let mut entries = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split(" #").next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (exclude, line) = match line.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, line),
        };
        let mut parts = line.split_whitespace();
        let pat = parts.next().unwrap_or("");
        let re = Regex::new(pat).map_err(|e| format!("manifest line {}: bad regex {pat:?}: {e}", i + 1))?;
        let (mut rtol, mut atol) = (DEFAULT_RTOL, DEFAULT_ATOL);
        for p in parts {
            let (k, v) =
                p.split_once('=').ok_or_else(|| format!("manifest line {}: expected key=value, got {p:?}", i + 1))?;
            let v: f64 = v.parse().map_err(|_| format!("manifest line {}: {k} is not a number: {v:?}", i + 1))?;
            match k {
                "rtol" => rtol = v,
                "atol" => atol = v,
                _ => return Err(format!("manifest line {}: unknown option {k:?}", i + 1)),
            }
        }
        entries.push(Entry { re, exclude, rtol, atol, line: i + 1 });
    }
    Ok(entries)
}

fn read_tensor(path: &Path) -> Result<Tensor, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let p = proto::TensorProto::decode(bytes.as_slice()).map_err(|e| format!("{}: {e}", path.display()))?;
    onnx::tensor_from_proto(&p, None).map_err(|e| format!("{}: {e}", path.display()))
}

fn numbered(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let k = name.strip_prefix(prefix)?.strip_suffix(".pb")?.parse().ok()?;
            Some((k, e.path()))
        })
        .collect();
    v.sort();
    v.into_iter().map(|(_, p)| p).collect()
}

fn compare(got: &Tensor, want: &Tensor, rtol: f64, atol: f64) -> Result<(), String> {
    if got.dtype() != want.dtype() {
        return Err(format!("dtype {} != expected {}", got.dtype(), want.dtype()));
    }
    if got.shape() != want.shape() {
        return Err(format!("shape {:?} != expected {:?}", got.shape(), want.shape()));
    }
    let exact = !want.dtype().is_float();
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    let mut worst: Option<(usize, f64, f64)> = None;
    let mut bad = 0usize;
    for (i, (&a, &b)) in g.iter().zip(&w).enumerate() {
        let ok = a == b || (a.is_nan() && b.is_nan()) || (!exact && (a - b).abs() <= atol + rtol * b.abs());
        if !ok {
            bad += 1;
            if worst.is_none_or(|(_, x, y)| (a - b).abs() > (x - y).abs() || (x - y).is_nan()) {
                worst = Some((i, a, b));
            }
        }
    }
    match worst {
        None => Ok(()),
        Some((i, a, b)) => Err(format!("{bad} of {} values differ; worst at {i}: got {a}, expected {b}", w.len())),
    }
}

fn run_case(dir: &Path, rtol: f64, atol: f64) -> Result<(), String> {
    let graph = onnx::load(&dir.join("model.onnx")).map_err(|e| format!("import: {e}"))?;
    let mut sets: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| e.to_string())?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir() && p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("test_data_set_")))
        .collect();
    sets.sort();
    if sets.is_empty() {
        return Err("no test_data_set_* folder".into());
    }
    for set in sets {
        let set_name = set.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let inputs = numbered(&set, "input_");
        if inputs.len() != graph.inputs().len() {
            return Err(format!("{set_name}: {} input files for {} graph inputs", inputs.len(), graph.inputs().len()));
        }
        let mut feed = Vec::new();
        for (k, p) in inputs.iter().enumerate() {
            feed.push((graph.input_name(k).to_string(), read_tensor(p)?));
        }
        let outs = graph.eval(feed.clone()).map_err(|e| format!("{set_name}: eval: {e}"))?;
        // The same case through the optimised runtime (canonicalised, specialised, lowered).
        let runnable = Runnable::new(graph.clone(), RuntimeConfig::with_threads(1))
            .map_err(|e| format!("{set_name}: runtime: {e}"))?;
        let fast = runnable.run(&mut runnable.new_state(), feed).map_err(|e| format!("{set_name}: runtime: {e}"))?;
        let expected = numbered(&set, "output_");
        if expected.len() != outs.len() || expected.len() != fast.len() {
            return Err(format!("{set_name}: {} outputs, expected {}", outs.len(), expected.len()));
        }
        for (k, ((got, quick), p)) in outs.iter().zip(&fast).zip(&expected).enumerate() {
            let want = read_tensor(p)?;
            compare(got, &want, rtol, atol)
                .map_err(|e| format!("{set_name}: output {k} ('{}'): {e}", graph.outputs()[k].0))?;
            compare(quick, &want, rtol, atol)
                .map_err(|e| format!("{set_name}: runtime output {k} ('{}'): {e}", graph.outputs()[k].0))?;
        }
    }
    Ok(())
}

/// Op types of a case's model (for the per-op report), read without importing it.
fn op_types(dir: &Path) -> Vec<String> {
    let Ok(bytes) = std::fs::read(dir.join("model.onnx")) else {
        return vec![];
    };
    let Ok(m) = proto::ModelProto::decode(bytes.as_slice()) else {
        return vec![];
    };
    let mut ops: Vec<String> = m.graph.iter().flat_map(|g| g.node.iter()).filter_map(|n| n.op_type.clone()).collect();
    ops.sort();
    ops.dedup();
    ops
}

fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| e.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

struct Outcome {
    key: String,
    listed: bool,
    result: Result<(), String>,
    ops: Vec<String>,
}

#[test]
fn onnx_node_tests() {
    let assets = std::env::var_os("SLIMNN_ASSETS").map(PathBuf::from).unwrap_or_else(|| repo_root().join("assets"));
    let root = assets.join("onnx-node-tests");
    assert!(
        root.is_dir(),
        "{} is missing: run `scripts/fetch-assets.sh` (or set SLIMNN_ASSETS to the assets folder)",
        root.display()
    );
    let manifest_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/onnx-node-tests.manifest");
    let text = std::fs::read_to_string(&manifest_path).expect("the manifest is part of the repository");
    let entries = parse_manifest(&text).unwrap_or_else(|e| panic!("{e}"));
    let only = std::env::var("SLIMNN_ONNX_CASES").ok().map(|r| Regex::new(&r).expect("SLIMNN_ONNX_CASES is a regex"));

    // Ops may panic on cases they do not handle; a panic is a failure of that case only.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut outcomes = Vec::new();
    let mut used = vec![false; entries.len()];
    for suite in SUITES {
        let sdir = root.join(suite);
        assert!(sdir.is_dir(), "{} is missing: run `scripts/fetch-assets.sh`", sdir.display());
        let mut cases: Vec<PathBuf> = std::fs::read_dir(&sdir)
            .expect("suite folder is readable")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.join("model.onnx").is_file())
            .collect();
        cases.sort();
        for case in cases {
            let key =
                format!("{suite}/{}", case.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
            if only.as_ref().is_some_and(|r| !r.is_match(&key)) {
                continue;
            }
            let entry = entries.iter().position(|e| e.re.is_match(&key));
            if let Some(i) = entry {
                used[i] = true;
            }
            let (rtol, atol) = entry.map_or((DEFAULT_RTOL, DEFAULT_ATOL), |i| (entries[i].rtol, entries[i].atol));
            let result = std::panic::catch_unwind(|| run_case(&case, rtol, atol))
                .unwrap_or_else(|e| Err(format!("panicked: {}", panic_message(e.as_ref()))));
            outcomes.push(Outcome {
                key,
                listed: entry.is_some_and(|i| !entries[i].exclude),
                result,
                ops: op_types(&case),
            });
        }
    }
    std::panic::set_hook(hook);

    let mut summary = String::new();
    for suite in SUITES {
        let of_suite: Vec<&Outcome> = outcomes.iter().filter(|o| o.key.starts_with(&format!("{suite}/"))).collect();
        let pass = of_suite.iter().filter(|o| o.result.is_ok()).count();
        let listed = of_suite.iter().filter(|o| o.listed).count();
        let listed_pass = of_suite.iter().filter(|o| o.listed && o.result.is_ok()).count();
        let unlisted_pass = pass - listed_pass;
        let _ = writeln!(
            summary,
            "onnx-node-tests/{suite}: {pass}/{} cases pass; allow-listed {listed_pass}/{listed}; {unlisted_pass} unlisted cases pass",
            of_suite.len()
        );
    }
    print!("{summary}");
    if only.is_none() {
        for (e, u) in entries.iter().zip(&used) {
            if !u {
                println!("manifest line {} ({}) matches no case", e.line, e.re.as_str());
            }
        }
    }
    write_report(&outcomes, &summary);
    if only.is_none() && std::env::var("SLIMNN_WRITE_SUPPORTED_OPS").is_ok_and(|v| v == "1") {
        write_supported_ops(&outcomes);
    }

    let failures: Vec<String> = outcomes
        .iter()
        .filter(|o| o.listed)
        .filter_map(|o| o.result.as_ref().err().map(|e| format!("{}: {e}", o.key)))
        .collect();
    for o in outcomes.iter().filter(|o| !o.listed && o.result.is_ok()) {
        println!("passes but is not allow-listed: {}", o.key);
    }
    assert!(failures.is_empty(), "{} allow-listed case(s) fail:\n{}", failures.len(), failures.join("\n"));
}

fn write_report(outcomes: &[Outcome], summary: &str) {
    let mut by_op: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| !is_expanded(&o.key)) {
        for op in &o.ops {
            let e = by_op.entry(op).or_default();
            e.1 += 1;
            if o.result.is_ok() {
                e.0 += 1;
            }
        }
    }
    let mut md = String::from(
        "# ONNX node test results\n\nGenerated by `cargo test -p slimnn-formats --test onnx_node_tests`.\n\n",
    );
    for line in summary.lines() {
        let _ = writeln!(md, "- {line}");
    }
    md.push_str(
        "\n## Per op (cases containing the op; `_expanded` cases left out)\n\n| op | pass | cases |\n|---|---|---|\n",
    );
    for (op, (p, t)) in &by_op {
        let _ = writeln!(md, "| {op} | {p} | {t} |");
    }
    md.push_str("\n## Failing cases\n\n| case | listed | error |\n|---|---|---|\n");
    for o in outcomes {
        if let Err(e) = &o.result {
            let mut e = e.replace('|', "\\|").replace('\n', " ");
            if e.len() > 300 {
                let cut = (0..=300).rev().find(|&i| e.is_char_boundary(i)).unwrap_or(0);
                e.truncate(cut);
                e.push('…');
            }
            let _ = writeln!(md, "| {} | {} | {e} |", o.key, if o.listed { "yes" } else { "" });
        }
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("onnx-conformance.md");
    if let Err(e) = std::fs::create_dir_all(&target).and_then(|_| std::fs::write(&path, md)) {
        println!("could not write {}: {e}", path.display());
    } else {
        println!("report: {}", path.display());
    }
}

/// Whether a case runs an op's function expansion rather than the op.
fn is_expanded(key: &str) -> bool {
    key.ends_with("_expanded") || key.contains("_expanded_ver")
}

/// Per op and suite: (cases passing, cases) among the cases whose model contains the op.
fn per_op_counts(outcomes: &[Outcome]) -> BTreeMap<&str, [(usize, usize); 2]> {
    let mut by_op: BTreeMap<&str, [(usize, usize); 2]> = BTreeMap::new();
    for o in outcomes.iter().filter(|o| !is_expanded(&o.key)) {
        let Some(s) = SUITES.iter().position(|s| o.key.starts_with(&format!("{s}/"))) else { continue };
        for op in &o.ops {
            let e = &mut by_op.entry(op).or_default()[s];
            e.1 += 1;
            if o.result.is_ok() {
                e.0 += 1;
            }
        }
    }
    by_op
}

fn versions_list(v: &[i64]) -> String {
    v.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", ")
}

/// Writes `doc/SUPPORTED_OPS.md`.
fn write_supported_ops(outcomes: &[Outcome]) {
    use slimnn_formats::onnx::op_versions::{NEWEST_OPSET, ONNX_VERSION, OP_VERSIONS};
    let counts = per_op_counts(outcomes);
    let cell = |op: &str, s: usize| match counts.get(op) {
        Some(c) if c[s].1 > 0 => format!("{}/{}", c[s].0, c[s].1),
        _ => "-".to_string(),
    };
    let mut md = String::from("# Supported ONNX ops\n\n");
    md.push_str(
        "Generated by `SLIMNN_WRITE_SUPPORTED_OPS=1 cargo test -p slimnn-formats --test onnx_node_tests`; do not\n\
         edit by hand.\n\n",
    );
    let _ = writeln!(
        md,
        "The importer reads default-domain opsets {} to {} (the newest onnx {ONNX_VERSION} defines) and decides per\n\
         node: a node's version is the newest version of its op not above the model's opset, and the node is read\n\
         when that version is listed below. Versions that only added types are read as the previous one; older\n\
         forms (attributes that later became inputs) are converted. Conditions that depend on attributes or\n\
         dtypes (e.g. Resize `tf_crop_and_resize`, blocked quantization, float8 and 4-bit types) are reported\n\
         when a model uses them.\n",
        onnx::MIN_OPSET,
        onnx::MAX_OPSET
    );
    md.push_str(
        "Conformance: the ONNX backend node tests of suites `1.12` and `current` (onnx 1.23.2); a case counts for\n\
         every op its model contains, `_expanded` cases left out; `-` means no case.\n\n",
    );
    for suite in SUITES {
        let of_suite: Vec<&Outcome> = outcomes.iter().filter(|o| o.key.starts_with(&format!("{suite}/"))).collect();
        let pass = of_suite.iter().filter(|o| o.result.is_ok()).count();
        let _ = writeln!(md, "- `{suite}`: {pass}/{} cases pass", of_suite.len());
    }
    md.push_str(
        "\n| op | versions read | newest version | 1.12 pass/cases | current pass/cases |\n|---|---|---|---|---|\n",
    );
    let mut ops: Vec<(&str, &[i64])> = onnx::supported_ops().filter(|(op, _)| *op != "Constant").collect();
    ops.sort_by_key(|(op, _)| *op);
    for (op, versions) in &ops {
        let newest = OP_VERSIONS.iter().find(|(n, _)| n == op).and_then(|(_, h)| h.last()).map_or(0, |v| v.0);
        let _ = writeln!(md, "| {op} | {} | {newest} | {} | {} |", versions_list(versions), cell(op, 0), cell(op, 1));
    }
    md.push_str("\n## Not mapped\n\nDefault-domain ops of onnx's table the importer does not read (cases containing them, 1.12 / current):\n\n");
    let unmapped: Vec<String> = OP_VERSIONS
        .iter()
        .filter(|(op, _)| onnx::supported_versions(op).is_none())
        .map(|(op, _)| format!("{op} ({} / {})", cell(op, 0), cell(op, 1)))
        .collect();
    md.push_str(&unmapped.join(", "));
    let _ = writeln!(md, "\n\nOpset {NEWEST_OPSET} is the newest in the table (scripts/gen_onnx_op_versions.py).");
    let path = repo_root().join("doc/SUPPORTED_OPS.md");
    match std::fs::write(&path, md) {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => panic!("could not write {}: {e}", path.display()),
    }
}

#[test]
fn manifest_parses() {
    let e = parse_manifest("# comment\n^1\\.12/test_relu$ rtol=1e-4 atol=0 # why\n\n^current/test_abs").unwrap();
    assert_eq!(e.len(), 2);
    assert_eq!((e[0].rtol, e[0].atol, e[0].line), (1e-4, 0.0, 2));
    assert_eq!((e[1].rtol, e[1].atol), (DEFAULT_RTOL, DEFAULT_ATOL));
    assert!(parse_manifest("x tol=1").is_err());
    let x = parse_manifest("! ^current/test_a$ # opset\n^current/test_").unwrap();
    assert!(x[0].exclude && !x[1].exclude);
    assert_eq!(x[0].re.as_str(), "^current/test_a$");
    assert!(parse_manifest("(").is_err());
    let dt = DType::F32;
    let a = Tensor::from_vec(vec![3], vec![1.0f32, f32::NAN, 3.0]).unwrap();
    let b = Tensor::from_vec(vec![3], vec![1.0005f32, f32::NAN, 3.0]).unwrap();
    assert_eq!(a.dtype(), dt);
    assert!(compare(&a, &b, 1e-3, 0.0).is_ok());
    assert!(compare(&a, &b, 1e-5, 0.0).is_err());
    let i = Tensor::from_vec(vec![1], vec![1i64]).unwrap();
    assert!(compare(&i, &Tensor::from_vec(vec![1], vec![2i64]).unwrap(), 1.0, 1.0).is_err());
}

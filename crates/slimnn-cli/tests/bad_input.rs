//! Bad input to the CLI: each case must end in a one-line error naming what is wrong, a
//! non-zero exit code, no panic, and no output file left behind.

mod common;

use common::*;
use slimnn_formats::npy;
use slimnn_tensor::Tensor;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Builds ONNX files with the `onnx` Python package (the reference writer of the format).
fn make_models(dir: &Path) {
    let script = r#"
import sys, onnx
from onnx import helper as h, TensorProto as T
d = sys.argv[1]
def save(nodes, name, inits=(), inputs=None):
    g = h.make_graph(nodes, 'g', inputs or [h.make_tensor_value_info('x', T.FLOAT, ['batch', 3])],
                     [h.make_tensor_value_info('y', T.FLOAT, None)], initializer=list(inits))
    m = h.make_model(g, opset_imports=[h.make_opsetid('', 17)])
    open(f'{d}/{name}.onnx', 'wb').write(m.SerializeToString())
save([h.make_node('Relu', ['x'], ['y'], name='relu')], 'good')
save([h.make_node('FancyOp', ['x'], ['t'], name='first_bad'), h.make_node('Relu', ['t'], ['u'], name='ok'),
      h.make_node('OtherOp', ['u'], ['y'], name='second_bad')], 'unknown_ops')
save([h.make_node('Add', ['x', 'ghost'], ['y'], name='add')], 'dangling')
big = T(); big.name = 'w'; big.data_type = T.FLOAT; big.dims.extend([1 << 40, 1 << 40])
save([h.make_node('Add', ['x', 'w'], ['y'], name='add')], 'huge_initializer', inits=[big])
"#;
    let out = Command::new(python()).arg("-c").arg(script).arg(dir).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let good = std::fs::read(dir.join("good.onnx")).unwrap();
    std::fs::write(dir.join("truncated.onnx"), &good[..good.len() * 2 / 3]).unwrap();
}

/// Runs slimnn, expects failure, returns the single stderr line.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_slimnn")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "slimnn {args:?} should fail; stderr: {err}");
    assert_ne!(out.status.code(), Some(101), "slimnn {args:?} panicked: {err}");
    assert!(!err.contains("panicked"), "slimnn {args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "slimnn {args:?}: expected one error line, got: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    lines[0].to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn bad_models_and_inputs_give_one_line_errors() {
    let dir = temp_dir("bad-input");
    make_models(&dir);
    let m = |name: &str| -> PathBuf { dir.join(format!("{name}.onnx")) };

    let e = fails(&["inspect", "/no/such/model.onnx"]);
    assert!(e.contains("/no/such/model.onnx"), "{e}");

    let e = fails(&["inspect", s(&m("truncated"))]);
    assert!(e.contains("truncated.onnx"), "{e}");

    let e = fails(&["inspect", s(&m("unknown_ops"))]);
    assert!(
        e.contains("first_bad") && e.contains("FancyOp") && e.contains("second_bad") && e.contains("OtherOp"),
        "{e}"
    );

    let e = fails(&["inspect", s(&m("dangling"))]);
    assert!(e.contains("ghost") && e.contains("add"), "{e}");

    let e = fails(&["inspect", s(&m("huge_initializer"))]);
    assert!(e.contains('w'), "{e}");

    // Inputs that do not fit the model's signature.
    let out_dir = dir.join("out");
    let run = |input: &Path| -> String {
        let spec = format!("x={}", s(input));
        fails(&["run", s(&m("good")), "--input", &spec, "--output-dir", s(&out_dir)])
    };
    let ints = dir.join("ints.npy");
    npy::write(&ints, &Tensor::from_vec(vec![1, 3], vec![1i64, 2, 3]).unwrap()).unwrap();
    let e = run(&ints);
    assert!(e.contains("'x'") && e.contains("f32") && e.contains("i64"), "{e}");
    let rank3 = dir.join("rank3.npy");
    npy::write(&rank3, &Tensor::from_vec(vec![1, 1, 3], vec![1f32, 2.0, 3.0]).unwrap()).unwrap();
    let e = run(&rank3);
    assert!(e.contains("'x'") && e.contains("rank"), "{e}");
    let wrong_dim = dir.join("wrong_dim.npy");
    npy::write(&wrong_dim, &Tensor::from_vec(vec![1, 4], vec![1f32, 2.0, 3.0, 4.0]).unwrap()).unwrap();
    let e = run(&wrong_dim);
    assert!(e.contains("dim 1 must be 3"), "{e}");
    let garbage = dir.join("garbage.npy");
    std::fs::write(&garbage, b"\x93NUMPY\x01\x00\x10\x00{'descr': '<f4'").unwrap();
    let e = run(&garbage);
    assert!(e.contains("garbage.npy"), "{e}");
    let missing = dir.join("missing.npy");
    let e = run(&missing);
    assert!(e.contains("missing.npy"), "{e}");
    let e = fails(&["run", s(&m("good")), "--input", "x", "--output-dir", s(&out_dir)]);
    assert!(e.contains("NAME=FILE.npy"), "{e}");
    assert!(!out_dir.exists() || std::fs::read_dir(&out_dir).unwrap().next().is_none(), "no outputs on failure");

    // The good model runs and writes its output.
    let ok = dir.join("ok.npy");
    npy::write(&ok, &Tensor::from_vec(vec![2, 3], vec![-1f32, 0.0, 1.0, 2.0, -3.0, 4.0]).unwrap()).unwrap();
    let spec = format!("x={}", s(&ok));
    let status = Command::new(env!("CARGO_BIN_EXE_slimnn"))
        .args(["run", s(&m("good")), "--input", &spec, "--output-dir", s(&out_dir)])
        .status()
        .unwrap();
    assert!(status.success());
    let y = npy::read(&out_dir.join("y.npy")).unwrap();
    assert_eq!(y.as_slice::<f32>().unwrap(), &[0.0, 0.0, 1.0, 2.0, 0.0, 4.0]);
}

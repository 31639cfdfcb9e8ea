//! `slimnn serve` end to end on MiniLM (ONNX): the official Python client (tritonclient) over
//! REST and gRPC gets the same outputs as `slimnn run`; bad requests are clear 4xx answers;
//! a full queue answers 503 at once and recovers; the repository loads, unloads and reports a
//! broken model; SIGTERM drains in-flight requests.

mod common;

use common::*;
use slimnn_formats::npy;
use slimnn_tensor::Tensor;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const SLIMNN: &str = env!("CARGO_BIN_EXE_slimnn");
/// Server vs `slimnn run`: batching pads to a sequence bucket, which may reorder float sums.
const ATOL: f64 = 2e-4;

/// MiniLM converted to ONNX once per test binary, with its tokenizer beside it.
fn minilm_onnx() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        // Shared by every test here, so it lives in cargo's per-target scratch dir
        // (overwritten each run) rather than in a directory removed on drop.
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("serve-model");
        std::fs::create_dir_all(&dir).unwrap();
        let out = dir.join("model.onnx");
        let st = Command::new(SLIMNN).arg("convert").arg(asset("minilm")).arg("-o").arg(&out).status().unwrap();
        assert!(st.success(), "slimnn convert failed");
        for f in ["tokenizer.json", "sentence_bert_config.json"] {
            std::fs::copy(asset("minilm").join(f), dir.join(f)).unwrap();
        }
        out
    })
    .clone()
}

struct Server {
    child: Child,
    http: String,
    grpc: String,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = Command::new(SLIMNN)
            .arg("serve")
            .args(["--host", "127.0.0.1", "--http-port", "0", "--grpc-port", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("slimnn serve starts");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut addr = |prefix: &str| -> String {
            let line = lines.next().expect("serve prints its addresses").unwrap();
            line.strip_prefix(prefix).unwrap_or_else(|| panic!("unexpected line '{line}'")).to_string()
        };
        let http = addr("slimnn serve: HTTP on http://");
        let grpc = addr("slimnn serve: gRPC on ");
        std::thread::spawn(move || lines.for_each(drop));
        let s = Server { child, http, grpc };
        let start = Instant::now();
        while request(&s.http, "GET", "/v2/health/ready", &[], b"").0 != 200 {
            assert!(start.elapsed() < Duration::from_secs(120), "server never became ready");
            std::thread::sleep(Duration::from_millis(100));
        }
        s
    }

    fn get(&self, path: &str) -> (u16, String) {
        request(&self.http, "GET", path, &[], b"")
    }

    fn post(&self, path: &str, body: &[u8]) -> (u16, String) {
        request(&self.http, "POST", path, &[], body)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.1 exchange (one request per connection); returns status and body text.
fn request(addr: &str, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
    let Ok(mut s) = TcpStream::connect(addr) else { return (0, String::new()) };
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("content-length")) {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Content-Type: application/json\r\n\r\n");
    // The server may answer (e.g. 413) before reading the whole body; a failed write is fine.
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn ids_case(ids: &[&[i64]]) -> Vec<(String, Tensor)> {
    let len = ids[0].len();
    let flat: Vec<i64> = ids.iter().flat_map(|r| r.iter().copied()).collect();
    let shape = vec![ids.len(), len];
    vec![
        ("input_ids".into(), Tensor::from_vec(shape.clone(), flat).unwrap()),
        ("attention_mask".into(), Tensor::from_vec(shape.clone(), vec![1i64; ids.len() * len]).unwrap()),
        ("token_type_ids".into(), Tensor::from_vec(shape, vec![0i64; ids.len() * len]).unwrap()),
    ]
}

fn infer_body(inputs: &[(String, Tensor)]) -> String {
    let tensors: Vec<String> = inputs
        .iter()
        .map(|(n, t)| {
            format!(
                r#"{{"name":"{n}","datatype":"INT64","shape":{:?},"data":{:?}}}"#,
                t.shape(),
                t.as_slice::<i64>().unwrap()
            )
        })
        .collect();
    format!(r#"{{"inputs":[{}]}}"#, tensors.join(","))
}

/// `slimnn run` on one case; outputs by name.
fn slimnn_run(model: &Path, case: &[(String, Tensor)], work: &Path) -> Vec<(String, Tensor)> {
    let out = work.join("out");
    let mut cmd = Command::new(SLIMNN);
    cmd.arg("run").arg(model).arg("--output-dir").arg(&out);
    for (n, t) in case {
        let p = work.join(format!("{n}.npy"));
        npy::write(&p, t).unwrap();
        cmd.arg("--input").arg(format!("{n}={}", p.display()));
    }
    assert!(cmd.status().unwrap().success(), "slimnn run failed");
    ["last_hidden_state", "sentence_embedding"]
        .iter()
        .map(|n| (n.to_string(), npy::read(&out.join(format!("{n}.npy"))).unwrap()))
        .collect()
}

#[test]
fn tritonclient_rest_and_grpc_match_slimnn_run() {
    let model = minilm_onnx();
    let work = temp_dir("serve-triton");
    let cases = [
        ids_case(&[&[101, 7592, 2088, 102]]),
        ids_case(&[&[101, 1037, 2158, 2003, 2652, 1037, 2858, 1012, 102, 2023, 102]]),
        ids_case(&[&[101, 2619, 3248, 2189, 2006, 1037, 102], &[101, 1996, 4937, 2003, 2006, 1996, 102]]),
        ids_case(&[&[101, 2307, 102]]),
    ];
    let server = Server::start(&["--model", &format!("minilm={}", model.display()), "--max-batch-delay-ms", "20"]);
    let cases_dir = work.join("cases");
    let mut expected = Vec::new();
    for (k, case) in cases.iter().enumerate() {
        let d = cases_dir.join(format!("case{k}"));
        std::fs::create_dir_all(&d).unwrap();
        for (n, t) in case {
            npy::write(&d.join(format!("{n}.npy")), t).unwrap();
        }
        let run_dir = work.join(format!("run{k}"));
        std::fs::create_dir_all(&run_dir).unwrap();
        expected.push(slimnn_run(&model, case, &run_dir));
    }
    let out_dir = work.join("answers");
    let script = repo_root().join("crates/slimnn-cli/tests/serve/tritonclient_check.py");
    let out = Command::new(python())
        .arg(&script)
        .args([&server.http, &server.grpc, "minilm"])
        .arg(&cases_dir)
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "tritonclient script failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for proto in ["http", "http_json", "http_async", "grpc"] {
        for (k, want) in expected.iter().enumerate() {
            for (name, t) in want {
                let got = npy::read(&out_dir.join(format!("{proto}/case{k}/{name}.npy"))).unwrap();
                let diff = got.max_abs_diff(t).unwrap_or_else(|| panic!("{proto} case{k} {name}: shape differs"));
                assert!(diff <= ATOL, "{proto} case{k} {name}: max |diff| {diff} > {ATOL}");
            }
        }
    }
    // gRPC bad requests: clear statuses naming the input, never an internal error.
    let codes: Vec<serde_json::Value> =
        stdout.lines().filter(|l| l.starts_with('{')).map(|l| serde_json::from_str(l).unwrap()).collect();
    let code =
        |case: &str| codes.iter().find(|c| c["case"] == case).unwrap_or_else(|| panic!("no {case} line")).clone();
    assert_eq!(code("wrong_dtype")["status"], "StatusCode.INVALID_ARGUMENT");
    assert!(code("wrong_dtype")["message"].as_str().unwrap().contains("input_ids"));
    assert_eq!(code("missing_input")["status"], "StatusCode.INVALID_ARGUMENT");
    assert!(code("missing_input")["message"].as_str().unwrap().contains("token_type_ids"));
    assert_eq!(code("wrong_shape")["status"], "StatusCode.INVALID_ARGUMENT");
    assert_eq!(code("unknown_model")["status"], "StatusCode.NOT_FOUND");

    // Embeddings endpoint: unit vectors of the model's width.
    let (st, body) = server.post("/v1/embeddings", br#"{"model":"minilm","input":["A man plays a guitar.","hi"]}"#);
    assert_eq!(st, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    for d in v["data"].as_array().unwrap() {
        let e: Vec<f64> = d["embedding"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(e.len(), 384);
        assert!((e.iter().map(|x| x * x).sum::<f64>().sqrt() - 1.0).abs() < 1e-3);
    }
    // Metrics saw the traffic.
    let (st, metrics) = server.get("/metrics");
    assert_eq!(st, 200);
    assert!(metrics.contains(r#"slimnn_requests_total{model="minilm",protocol="grpc",code="200"}"#), "{metrics}");
    assert!(metrics.contains("slimnn_batch_size_bucket"), "{metrics}");
}

#[test]
fn bad_requests_are_clear_4xx() {
    let model = minilm_onnx();
    let server = Server::start(&["--model", &format!("minilm={}", model.display()), "--max-body-bytes", "100000"]);
    let good = ids_case(&[&[101, 7592, 102]]);
    let (st, body) = server.post("/v2/models/minilm/infer", infer_body(&good).as_bytes());
    assert_eq!(st, 200, "{body}");

    let check = |what: &str, path: &str, body: &str, want: u16, needle: &str| {
        let (st, text) = server.post(path, body.as_bytes());
        assert_eq!(st, want, "{what}: status {st}, body {text}");
        assert!(text.contains(needle), "{what}: '{text}' does not mention '{needle}'");
    };
    let wrong_dtype = infer_body(&good).replacen("INT64", "FP32", 1);
    check("wrong dtype", "/v2/models/minilm/infer", &wrong_dtype, 400, "input 'input_ids'");
    let wrong_shape = infer_body(&good).replacen("[1, 3]", "[3]", 1);
    check("wrong shape", "/v2/models/minilm/infer", &wrong_shape, 400, "input 'input_ids'");
    let missing = infer_body(&good[..2]);
    check("missing input", "/v2/models/minilm/infer", &missing, 400, "input 'token_type_ids' is missing");
    let unknown_input = infer_body(&good).replacen("token_type_ids", "segment_ids", 1);
    check("unknown input", "/v2/models/minilm/infer", &unknown_input, 400, "'segment_ids'");
    check("malformed JSON", "/v2/models/minilm/infer", r#"{"inputs": [{"name": "#, 400, "not valid JSON");
    check("unknown model", "/v2/models/nope/infer", &infer_body(&good), 404, "no model named 'nope'");
    check(
        "unknown output",
        "/v2/models/minilm/infer",
        &infer_body(&good).replace(r#"]}"#, r#"],"outputs":[{"name":"logits"}]}"#),
        400,
        "output 'logits'",
    );
    let mismatched = infer_body(&good).replacen("[0, 0, 0]", "[0, 0]", 1);
    check("data/shape mismatch", "/v2/models/minilm/infer", &mismatched, 400, "token_type_ids");
    // Too large: refused from the Content-Length alone, before the body is read.
    let huge = vec![b' '; 2_000_000];
    let (st, text) = server.post("/v2/models/minilm/infer", &huge);
    assert_eq!(st, 413, "huge body: {text}");
    assert!(text.contains("limit"), "{text}");
    let (st, text) = request(
        &server.http,
        "POST",
        "/v2/models/minilm/infer",
        &[("Inference-Header-Content-Length", "99999".into())],
        infer_body(&good).as_bytes(),
    );
    assert_eq!(st, 400, "{text}");
    // Model control is off unless asked for.
    let (st, _) = server.post("/v2/repository/models/minilm/unload", b"");
    assert_eq!(st, 403);
    // Still serving after all that.
    let (st, _) = server.post("/v2/models/minilm/infer", infer_body(&good).as_bytes());
    assert_eq!(st, 200);
}

#[test]
fn full_queue_answers_503_at_once_and_recovers() {
    let model = minilm_onnx();
    let server = Server::start(&[
        "--model",
        &format!("minilm={}", model.display()),
        "--queue-capacity",
        "2",
        "--max-batch-size",
        "1",
        "--threads",
        "1",
    ]);
    let long: Vec<i64> = (0..256).map(|i| 1000 + i).collect();
    let body = infer_body(&ids_case(&[&long]));
    let results: Vec<(u16, Duration)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..24)
            .map(|_| {
                s.spawn(|| {
                    let t = Instant::now();
                    let (st, _) = server.post("/v2/models/minilm/infer", body.as_bytes());
                    (st, t.elapsed())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<Duration> = results.iter().filter(|(s, _)| *s == 503).map(|(_, t)| *t).collect();
    assert_eq!(ok + refused.len(), results.len(), "every request gets 200 or 503: {results:?}");
    assert!(ok >= 1 && !refused.is_empty(), "{ok} ok, {} refused", refused.len());
    assert!(refused.iter().all(|t| *t < Duration::from_secs(2)), "503s must be fast: {refused:?}");
    let (st, _) = server.post("/v2/models/minilm/infer", body.as_bytes());
    assert_eq!(st, 200, "serves again once the load is gone");
}

#[test]
fn repository_versions_control_and_failed_loads() {
    let model = minilm_onnx();
    let repo = temp_dir("serve-repo");
    for v in ["1", "2"] {
        let d = repo.join("minilm").join(v);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::symlink(&model, d.join("model.onnx")).unwrap();
    }
    std::fs::write(repo.join("minilm/slimnn-model.json"), r#"{"max_batch_size": 4, "max_batch_delay_ms": 1}"#).unwrap();
    std::fs::create_dir_all(repo.join("broken/1")).unwrap();
    std::fs::write(repo.join("broken/1/model.onnx"), b"not a model").unwrap();
    let server = Server::start(&["--model-repository", repo.to_str().unwrap(), "--model-control"]);

    let (_, index) = server.post("/v2/repository/index", b"");
    let index: serde_json::Value = serde_json::from_str(&index).unwrap();
    let state = |name: &str, v: &str| {
        index.as_array().unwrap().iter().find(|e| e["name"] == name && e["version"] == v).unwrap().clone()
    };
    assert_eq!(state("minilm", "1")["state"], "READY");
    assert_eq!(state("minilm", "2")["state"], "READY");
    assert_eq!(state("broken", "1")["state"], "UNAVAILABLE");
    assert!(state("broken", "1")["reason"].as_str().unwrap().contains("model.onnx"), "{index}");
    assert_eq!(server.get("/v2/models/broken/ready").0, 503);
    let body = infer_body(&ids_case(&[&[101, 7592, 102]]));
    let (st, text) = server.post("/v2/models/minilm/versions/1/infer", body.as_bytes());
    assert_eq!(st, 200, "{text}");
    assert!(text.contains(r#""model_version":"1""#));
    let (_, text) = server.post("/v2/models/minilm/infer", body.as_bytes());
    assert!(text.contains(r#""model_version":"2""#), "highest version by default: {text}");
    assert_eq!(server.post("/v2/models/broken/infer", body.as_bytes()).0, 503);

    assert_eq!(server.post("/v2/repository/models/minilm/unload", b"").0, 200);
    let (st, text) = server.post("/v2/models/minilm/infer", body.as_bytes());
    assert_eq!(st, 503, "{text}");
    // A new version appears on disk; load picks it up without a restart.
    let d = repo.join("minilm/3");
    std::fs::create_dir_all(&d).unwrap();
    std::os::unix::fs::symlink(&model, d.join("model.onnx")).unwrap();
    let (st, text) = server.post("/v2/repository/models/minilm/load", b"");
    assert_eq!(st, 200, "{text}");
    let (st, text) = server.post("/v2/models/minilm/infer", body.as_bytes());
    assert_eq!(st, 200, "{text}");
    assert!(text.contains(r#""model_version":"3""#), "{text}");
    let (st, _) = server.post("/v2/repository/models/broken/load", b"");
    assert_eq!(st, 400, "a model that still fails to load is reported, not served");
    assert_eq!(server.get("/v2/health/live").0, 200);
}

#[test]
fn sigterm_drains_in_flight_requests() {
    let model = minilm_onnx();
    let mut server =
        Server::start(&["--model", &format!("minilm={}", model.display()), "--max-batch-size", "1", "--threads", "1"]);
    let long: Vec<i64> = (0..384).map(|i| 1000 + i).collect();
    let body = infer_body(&ids_case(&[&long]));
    let addr = server.http.clone();
    let in_flight: Vec<_> = (0..3)
        .map(|_| {
            let (a, b) = (addr.clone(), body.clone());
            std::thread::spawn(move || request(&a, "POST", "/v2/models/minilm/infer", &[], b.as_bytes()).0)
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    for h in in_flight {
        assert_eq!(h.join().unwrap(), 200, "an in-flight request was dropped by the shutdown");
    }
    let status = server.child.wait().unwrap();
    assert!(status.success(), "serve exits cleanly after SIGTERM: {status}");
}

#[test]
fn request_timeout_answers_504_and_the_server_carries_on() {
    let model = minilm_onnx();
    let server = Server::start(&[
        "--model",
        &format!("minilm={}", model.display()),
        "--request-timeout-ms",
        "1",
        "--threads",
        "1",
    ]);
    let long: Vec<i64> = (0..512).map(|i| 1000 + i).collect();
    let (st, text) = server.post("/v2/models/minilm/infer", infer_body(&ids_case(&[&long])).as_bytes());
    assert_eq!(st, 504, "{text}");
    assert!(text.contains("timeout"), "{text}");
    assert_eq!(server.get("/v2/health/ready").0, 200);
}

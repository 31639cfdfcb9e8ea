//! A bounded, self-stopping HTTP load generator for `slimnn serve` (KServe v2 infer requests
//! with the binary-data extension, keep-alive connections).
//!
//! Closed loop (saturation): `--connections C` callers each send the next request as soon as the
//! last answer arrives. Open loop: `--rate R` requests per second on a fixed schedule whatever
//! the answers do (latency counted from the scheduled send time, so queueing is not hidden).
//! Every request ends as ok, 503, another status, or a client-side timeout; all are counted.
//!
//! ```sh
//! cargo run --release -p slimnn-serve --example loadgen -- --url 127.0.0.1:8000 --model minilm \
//!     --seq 128 --connections 32 --duration-s 20
//! ```

use clap::Parser;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Parser, Clone)]
struct Args {
    /// host:port of the server's HTTP listener.
    #[arg(long, default_value = "127.0.0.1:8000")]
    url: String,
    #[arg(long, default_value = "minilm")]
    model: String,
    /// Tokens per request (BERT-style inputs: input_ids, attention_mask, token_type_ids).
    #[arg(long, default_value_t = 128)]
    seq: usize,
    /// Rows per request.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Closed loop with this many concurrent callers (ignored with --rate).
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// Open loop: requests per second.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// Unmeasured warm-up before the timed window (closed loop).
    #[arg(long, default_value_t = 3.0)]
    warmup_s: f64,
    /// A request with no answer after this long counts as hung.
    #[arg(long, default_value_t = 60.0)]
    timeout_s: f64,
    /// Most connections the open loop may hold at once.
    #[arg(long, default_value_t = 4096)]
    max_connections: usize,
}

#[derive(Default)]
struct Tally {
    ok: Vec<f64>,
    unavailable: Vec<f64>,
    other: Vec<(u16, f64)>,
    hung: usize,
    failed_connect: usize,
}

fn request_bytes(a: &Args) -> Vec<u8> {
    let n = a.batch * a.seq;
    let names = ["input_ids", "attention_mask", "token_type_ids"];
    let header = format!(
        r#"{{"inputs":[{}],"outputs":[{{"name":"sentence_embedding","parameters":{{"binary_data":true}}}}]}}"#,
        names
            .iter()
            .map(|nm| format!(
                r#"{{"name":"{nm}","datatype":"INT64","shape":[{},{}],"parameters":{{"binary_data_size":{}}}}}"#,
                a.batch,
                a.seq,
                n * 8
            ))
            .collect::<Vec<_>>()
            .join(",")
    );
    let mut body = header.clone().into_bytes();
    for (k, _) in names.iter().enumerate() {
        for i in 0..n {
            let v: i64 = match k {
                0 if i % a.seq == 0 => 101,
                0 if i % a.seq == a.seq - 1 => 102,
                0 => 1000 + (i as i64 * 7919) % 20000,
                1 => 1,
                _ => 0,
            };
            body.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut req = format!(
        "POST /v2/models/{}/infer HTTP/1.1\r\nHost: {}\r\nContent-Type: application/octet-stream\r\n\
         Inference-Header-Content-Length: {}\r\nContent-Length: {}\r\n\r\n",
        a.model,
        a.url,
        header.len(),
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    req
}

/// Sends one request on `conn` and reads the answer; returns the status code.
async fn exchange(conn: &mut TcpStream, req: &[u8], buf: &mut Vec<u8>) -> std::io::Result<u16> {
    conn.write_all(req).await?;
    buf.clear();
    let mut chunk = [0u8; 16384];
    let (head_end, status, len) = loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..p]).to_ascii_lowercase();
            let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").and_then(|v| v.trim().parse::<usize>().ok()))
                .unwrap_or(0);
            break (p + 4, status, len);
        }
    };
    while buf.len() < head_end + len {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(status)
}

fn record(t: &Mutex<Tally>, r: Result<std::io::Result<u16>, tokio::time::error::Elapsed>, ms: f64) -> bool {
    let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
    match r {
        Ok(Ok(200)) => t.ok.push(ms),
        Ok(Ok(503)) => t.unavailable.push(ms),
        Ok(Ok(code)) => t.other.push((code, ms)),
        Ok(Err(_)) => {
            t.other.push((0, ms));
            return false;
        }
        Err(_) => {
            t.hung += 1;
            return false;
        }
    }
    true
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let a = Args::parse();
    let req = Arc::new(request_bytes(&a));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let timeout = Duration::from_secs_f64(a.timeout_s);
    let measured: f64;
    match a.rate {
        None => {
            let start = Instant::now();
            let measure_from = start + Duration::from_secs_f64(a.warmup_s);
            let end = measure_from + Duration::from_secs_f64(a.duration_s);
            let mut tasks = Vec::new();
            for _ in 0..a.connections {
                let (req, tally, url) = (req.clone(), tally.clone(), a.url.clone());
                tasks.push(tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut conn: Option<TcpStream> = None;
                    while Instant::now() < end {
                        if conn.is_none() {
                            match TcpStream::connect(&url).await {
                                Ok(c) => conn = Some(c),
                                Err(_) => {
                                    tally.lock().unwrap_or_else(|e| e.into_inner()).failed_connect += 1;
                                    tokio::time::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            }
                        }
                        let Some(c) = conn.as_mut() else { continue };
                        let t0 = Instant::now();
                        let r = tokio::time::timeout(timeout, exchange(c, &req, &mut buf)).await;
                        let done = Instant::now();
                        let ms = done.duration_since(t0).as_secs_f64() * 1e3;
                        // Count by completion time: a steady state has as many answers in the
                        // window as the server delivers, whenever each request started.
                        if done >= measure_from && done <= end {
                            if !record(&tally, r, ms) {
                                conn = None;
                            }
                        } else if !matches!(r, Ok(Ok(_))) {
                            conn = None;
                        }
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            measured = a.duration_s;
        }
        Some(rate) => {
            let pool: Arc<Mutex<Vec<TcpStream>>> = Arc::new(Mutex::new(Vec::new()));
            let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let start = Instant::now();
            let total = (rate * a.duration_s).round() as usize;
            let mut tasks = Vec::with_capacity(total);
            for i in 0..total {
                let at = start + Duration::from_secs_f64(i as f64 / rate);
                tokio::time::sleep_until(at.into()).await;
                let (req, tally, url, pool, open) =
                    (req.clone(), tally.clone(), a.url.clone(), pool.clone(), open.clone());
                let max_conns = a.max_connections;
                tasks.push(tokio::spawn(async move {
                    let pooled = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
                    let mut conn = match pooled {
                        Some(c) => c,
                        None => {
                            if open.load(std::sync::atomic::Ordering::SeqCst) >= max_conns {
                                tally.lock().unwrap_or_else(|e| e.into_inner()).failed_connect += 1;
                                return;
                            }
                            match TcpStream::connect(&url).await {
                                Ok(c) => {
                                    open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                                    c
                                }
                                Err(_) => {
                                    tally.lock().unwrap_or_else(|e| e.into_inner()).failed_connect += 1;
                                    return;
                                }
                            }
                        }
                    };
                    let mut buf = Vec::new();
                    let r = tokio::time::timeout(timeout, exchange(&mut conn, &req, &mut buf)).await;
                    let ms = at.elapsed().as_secs_f64() * 1e3;
                    if record(&tally, r, ms) {
                        pool.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
                    } else {
                        open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
            measured = start.elapsed().as_secs_f64();
        }
    }
    let mut t = tally.lock().unwrap_or_else(|e| e.into_inner());
    let sent = t.ok.len() + t.unavailable.len() + t.other.len() + t.hung;
    let ok = t.ok.len();
    let rows_per_s = ok as f64 * a.batch as f64 / measured;
    let (p50, p90, p99) = (pct(&mut t.ok, 0.5), pct(&mut t.ok, 0.9), pct(&mut t.ok, 0.99));
    let max_503 = t.unavailable.iter().copied().fold(0.0, f64::max);
    let p99_503 = pct(&mut t.unavailable, 0.99);
    let summary = serde_json::json!({
        "mode": if a.rate.is_some() { "open" } else { "closed" },
        "rate": a.rate, "connections": a.connections, "seq": a.seq, "batch": a.batch,
        "seconds": measured, "sent": sent, "ok": ok, "unavailable_503": t.unavailable.len(),
        "other": t.other.len(), "hung": t.hung, "failed_connect": t.failed_connect,
        "ok_rows_per_s": rows_per_s, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
        "p99_503_ms": p99_503, "max_503_ms": max_503,
        "other_codes": t.other.iter().map(|(c, _)| *c).collect::<std::collections::BTreeSet<_>>(),
    });
    println!("{summary}");
}

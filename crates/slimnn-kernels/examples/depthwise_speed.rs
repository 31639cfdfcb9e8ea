//! Channels-last depthwise convolution on EfficientNet-Lite0's shapes: GFLOP/s on one thread,
//! best of five timings, everything hot in cache.
//!
//! `[SHAPE=c,plane,k,stride] [PAD=p] cargo run --release -p slimnn-kernels --example depthwise_speed`

use slimnn_kernels::depthwise::{depthwise_nhwc, DwGeom};
use std::time::Instant;

fn main() {
    let tier = slimnn_kernels::cpu::tier();
    // (channels, plane, kernel, stride) of EfficientNet-Lite0's depthwise convolutions.
    let shapes: Vec<[usize; 4]> = match std::env::var("SHAPE") {
        Ok(v) => vec![v
            .split(',')
            .map(|d| d.parse().expect("SHAPE=c,plane,k,stride"))
            .collect::<Vec<_>>()
            .try_into()
            .expect("four numbers")],
        Err(_) => vec![
            [32, 112, 3, 1],
            [144, 56, 3, 1],
            [144, 56, 5, 2],
            [240, 28, 5, 1],
            [240, 28, 3, 2],
            [480, 14, 3, 1],
            [672, 14, 5, 1],
            [1152, 7, 5, 1],
        ],
    };
    for [c, hw, k, s] in shapes {
        let pad = std::env::var("PAD").map_or(k / 2, |p| p.parse().unwrap());
        let o = (hw + 2 * pad - k) / s + 1;
        let g = DwGeom { c, h: hw, w: hw, kh: k, kw: k, sh: s, sw: s, pt: pad, pl: pad, oh: o, ow: o };
        let xbuf: Vec<f32> = (0..hw * hw * c + 16).map(|i| (i % 7) as f32 * 0.1).collect();
        let skew = if std::env::var("ALIGN").is_ok() { xbuf.as_ptr().align_offset(64) } else { 0 };
        let x = &xbuf[skew..skew + hw * hw * c];
        let wbuf: Vec<f32> = (0..k * k * c + 16).map(|i| (i % 5) as f32 * 0.1).collect();
        let wskew = if std::env::var("ALIGN").is_ok() { wbuf.as_ptr().align_offset(64) } else { 0 };
        let w = &wbuf[wskew..wskew + k * k * c];
        let b = vec![0.1; c];
        let oskew: usize = std::env::var("OSKEW").map_or(0, |v| v.parse().unwrap());
        let mut obuf = vec![0.0; o * o * c + oskew + 16];
        let oskew = oskew + if std::env::var("ALIGN").is_ok() { obuf.as_ptr().align_offset(64) } else { 0 };
        let out = &mut obuf[oskew..oskew + o * o * c];
        let flops = 2.0 * (o * o * c * k * k) as f64;
        let reps = (std::env::var("FLOPS").map_or(2e8, |v| v.parse().unwrap()) / flops) as usize + 1;
        let mut best = f64::MAX;
        for _ in 0..5 {
            let t = Instant::now();
            for _ in 0..reps {
                depthwise_nhwc(tier, &g, x, w, Some(&b), Some((0.0, 6.0)), 0..o, out).expect("depthwise");
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        println!("{c} x {hw}x{hw}, {k}x{k} stride {s}: {:.3} ms, {:.1} GFLOP/s", best * 1e3, flops / best / 1e9);
    }
}

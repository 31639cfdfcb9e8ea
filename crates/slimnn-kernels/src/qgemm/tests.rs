use super::quantize::{quantize_dynamic_u8_with, quantize_rows_u8_with, quantize_u8_with};
use super::*;
use crate::gemm::Epilogue;
use proptest::prelude::*;

fn lcg(seed: &mut u64) -> u64 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    *seed >> 33
}

struct Case {
    m: usize,
    k: usize,
    n: usize,
    a: Vec<u8>,
    b: Vec<i8>,
    za: Vec<i32>,
    sa: Vec<f32>,
    sb: Vec<f32>,
    bias: Vec<f32>,
    res: Vec<f32>,
    /// Three outlier channels: values `m x 3`, weight rows `3 x n`.
    ox: Vec<f32>,
    ow: Vec<f32>,
}

fn case(m: usize, k: usize, n: usize, seed: u64) -> Case {
    let mut s = seed;
    Case {
        m,
        k,
        n,
        a: (0..m * k).map(|_| lcg(&mut s) as u8).collect(),
        b: (0..k * n).map(|_| lcg(&mut s) as u8 as i8).collect(),
        za: (0..m).map(|_| (lcg(&mut s) % 256) as i32).collect(),
        sa: (0..m).map(|_| 1e-3 * (1 + lcg(&mut s) % 100) as f32).collect(),
        sb: (0..n).map(|_| 1e-3 * (1 + lcg(&mut s) % 100) as f32).collect(),
        bias: (0..n).map(|_| (lcg(&mut s) % 200) as f32 / 100.0 - 1.0).collect(),
        res: (0..m * n).map(|_| (lcg(&mut s) % 200) as f32 / 100.0 - 1.0).collect(),
        ox: (0..m * 3).map(|_| (lcg(&mut s) % 4000) as f32 / 100.0 - 20.0).collect(),
        ow: (0..3 * n).map(|_| (lcg(&mut s) % 200) as f32 / 1000.0 - 0.1).collect(),
    }
}

fn close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: [{i}] got {g}, want {w}");
    }
}

/// Every output kind and epilogue variant of one case on one kernel against the reference.
fn check_case(c: &Case, kernel: QKernel, par: Par<'_>) {
    let Case { m, k, n, .. } = *c;
    let packed = PackedQB::with_kernel(kernel, &c.b, k, n, n, false).unwrap();
    let eps: Vec<QEpilogue> = vec![
        QEpilogue::new(c.sa[0], c.za[0], &c.sb[..1]),
        QEpilogue {
            a_zero: PerRow::Rows(&c.za),
            a_scale: PerRow::Rows(&c.sa),
            b_scale: &c.sb,
            bias: Some(&c.bias),
            activation: Activation::GeluErf,
            residual: Some(Residual { data: &c.res, ld: n }),
            outliers: Some(Outliers { x: &c.ox, ld: 3, w: &c.ow, k: 3 }),
        },
        QEpilogue::new(c.sa[0], c.za[0], &c.sb).with_bias(&c.bias).with_activation(Activation::Relu),
        QEpilogue::new(c.sa[0], c.za[0], &c.sb[..1]).with_outliers(Outliers { x: &c.ox[1..], ld: 3, w: &c.ow, k: 2 }),
    ];
    let tag = format!("{kernel} m={m} k={k} n={n}");
    for ep in &eps {
        let mut want = vec![0i32; m * n];
        reference_qgemm(m, k, n, &c.a, k, &c.b, n, QOutput::I32 { c: &mut want, ldc: n }, ep).unwrap();
        let mut got = vec![0i32; m * n];
        qgemm(m, &c.a, k, &packed, QOutput::I32 { c: &mut got, ldc: n }, ep, par).unwrap();
        assert_eq!(got, want, "{tag} i32");

        let mut want = vec![0f32; m * n];
        reference_qgemm(m, k, n, &c.a, k, &c.b, n, QOutput::F32 { c: &mut want, ldc: n }, ep).unwrap();
        let mut got = vec![0f32; m * n];
        qgemm(m, &c.a, k, &packed, QOutput::F32 { c: &mut got, ldc: n }, ep, par).unwrap();
        close(&got, &want, 2e-6, &format!("{tag} f32 {:?}", ep.activation));

        let (scale, zero) = (0.05, 100);
        let mut want = vec![0u8; m * n];
        reference_qgemm(m, k, n, &c.a, k, &c.b, n, QOutput::U8 { c: &mut want, ldc: n, scale, zero }, ep).unwrap();
        let mut got = vec![0u8; m * n];
        qgemm(m, &c.a, k, &packed, QOutput::U8 { c: &mut got, ldc: n, scale, zero }, ep, par).unwrap();
        // Activation rounding may move a value across a quantization boundary.
        let off = got.iter().zip(&want).filter(|(g, w)| g.abs_diff(**w) > 1).count();
        assert_eq!(off, 0, "{tag} u8");
        if ep.activation == Activation::None {
            assert_eq!(got, want, "{tag} u8 exact");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn qgemm_matches_reference_on_every_kernel(m in 1usize..20, k in 1usize..70, n in 1usize..100, seed: u64) {
        let c = case(m, k, n, seed);
        for kernel in QKernel::supported() {
            check_case(&c, kernel, Par::Seq);
        }
    }

    #[test]
    fn dynamic_quantization_matches_scalar(len in 0usize..300, seed: u64, spread in 0.01f32..100.0) {
        let mut s = seed;
        let x: Vec<f32> = (0..len).map(|_| ((lcg(&mut s) % 20001) as f32 / 10000.0 - 1.0) * spread).collect();
        let mut want = vec![0u8; len];
        let wp = quantize_dynamic_u8_with(CpuTier::Generic, &x, &mut want).unwrap();
        for tier in crate::cpu::supported_tiers() {
            let mut got = vec![0u8; len];
            let gp = quantize_dynamic_u8_with(tier, &x, &mut got).unwrap();
            prop_assert_eq!(gp, wp);
            prop_assert_eq!(&got, &want);
            let mut got = vec![0u8; len];
            quantize_u8_with(tier, &x, spread / 77.0, 3, &mut got).unwrap();
            let st: Vec<u8> = x.iter().map(|&v| quantize::quantize_one(v, spread / 77.0, 3)).collect();
            prop_assert_eq!(&got, &st);
        }
    }
}

#[test]
fn extremes_do_not_saturate() {
    // All A = 255 against B = -128 (and 127): vpmaddubsw would saturate its pair sums.
    for (av, bv) in [(255u8, -128i8), (255, 127), (128, -128), (0, -128)] {
        let (m, k, n) = (9, 67, 50);
        let a = vec![av; m * k];
        let b = vec![bv; k * n];
        for kernel in QKernel::supported() {
            let packed = PackedQB::with_kernel(kernel, &b, k, n, n, false).unwrap();
            let mut got = vec![0i32; m * n];
            let ep = QEpilogue::new(1.0, 0, &[1.0]);
            qgemm(m, &a, k, &packed, QOutput::I32 { c: &mut got, ldc: n }, &ep, Par::Seq).unwrap();
            assert!(got.iter().all(|&x| x == av as i32 * bv as i32 * k as i32), "{kernel} {av} x {bv}");
        }
    }
}

#[test]
fn large_and_threaded_match_reference() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let c = case(77, 390, 211, 5);
    for kernel in QKernel::supported() {
        check_case(&c, kernel, Par::Pool(&pool));
        check_case(&c, kernel, Par::Seq);
    }
}

#[test]
fn transposed_packing_and_strides() {
    let (m, k, n) = (5, 13, 21);
    let c = case(m, k, n, 9);
    let mut bt = vec![0i8; n * (k + 3)];
    for kk in 0..k {
        for j in 0..n {
            bt[j * (k + 3) + kk] = c.b[kk * n + j];
        }
    }
    // A with a row stride larger than k.
    let lda = k + 7;
    let mut a = vec![0u8; m * lda];
    for i in 0..m {
        a[i * lda..i * lda + k].copy_from_slice(&c.a[i * k..(i + 1) * k]);
    }
    let ep = QEpilogue::new(0.5, 3, &[0.25]);
    let mut want = vec![0i32; m * n];
    reference_qgemm(m, k, n, &c.a, k, &c.b, n, QOutput::I32 { c: &mut want, ldc: n }, &ep).unwrap();
    for kernel in QKernel::supported() {
        let p = PackedQB::with_kernel(kernel, &bt, k, n, k + 3, true).unwrap();
        for kk in 0..k {
            for j in 0..n {
                assert_eq!(p.get(kk, j), Some(c.b[kk * n + j]));
            }
        }
        assert_eq!(p.col_sums()[3], (0..k).map(|kk| c.b[kk * n + 3] as i32).sum::<i32>());
        let mut got = vec![0i32; m * (n + 2)];
        qgemm(m, &a, lda, &p, QOutput::I32 { c: &mut got, ldc: n + 2 }, &ep, Par::Seq).unwrap();
        for i in 0..m {
            assert_eq!(&got[i * (n + 2)..i * (n + 2) + n], &want[i * n..(i + 1) * n], "{kernel}");
        }
    }
}

#[test]
fn bad_arguments_are_errors() {
    let p = PackedQB::with_kernel(QKernel::Scalar, &[1; 6], 2, 3, 3, false).unwrap();
    let ep = QEpilogue::new(1.0, 0, &[1.0]);
    let mut c = vec![0f32; 6];
    assert!(qgemm(2, &[0; 3], 2, &p, QOutput::F32 { c: &mut c, ldc: 3 }, &ep, Par::Seq).is_err());
    assert!(qgemm(2, &[0; 4], 2, &p, QOutput::F32 { c: &mut c[..5], ldc: 3 }, &ep, Par::Seq).is_err());
    let bad = QEpilogue::new(1.0, 0, &[1.0, 2.0]);
    assert!(qgemm(2, &[0; 4], 2, &p, QOutput::F32 { c: &mut c, ldc: 3 }, &bad, Par::Seq).is_err());
    let rows = QEpilogue { a_zero: PerRow::Rows(&[0]), ..ep };
    assert!(qgemm(2, &[0; 4], 2, &p, QOutput::F32 { c: &mut c, ldc: 3 }, &rows, Par::Seq).is_err());
    let short_x = ep.with_outliers(Outliers { x: &[1.0; 3], ld: 2, w: &[0.5; 6], k: 2 });
    assert!(qgemm(2, &[0; 4], 2, &p, QOutput::F32 { c: &mut c, ldc: 3 }, &short_x, Par::Seq).is_err());
    let short_w = ep.with_outliers(Outliers { x: &[1.0; 4], ld: 2, w: &[0.5; 5], k: 2 });
    assert!(qgemm(2, &[0; 4], 2, &p, QOutput::F32 { c: &mut c, ldc: 3 }, &short_w, Par::Seq).is_err());
    assert!(PackedQB::with_kernel(QKernel::Scalar, &[1; 5], 2, 3, 3, false).is_err());
    let mut q = [0u8; 3];
    assert!(quantize_u8(&[1.0; 3], 0.0, 0, &mut q).is_err());
    assert!(quantize_dynamic_u8(&[1.0; 4], &mut q).is_err());
}

#[test]
fn dynamic_quantization_by_hand() {
    // Range [-1, 3] (0 included): scale 4/255, zero round(255/4) = 64.
    let x = [-1.0, 0.0, 3.0, 1.0];
    let mut q = [0u8; 4];
    let (s, z) = quantize_dynamic_u8(&x, &mut q).unwrap();
    assert_eq!((s, z), (4.0 / 255.0, 64));
    assert_eq!(q, [0, 64, 255, 128]);
    // All zeros: scale 1, zero 0.
    let (s, z) = quantize_dynamic_u8(&[0.0; 5], &mut [0; 5]).unwrap();
    assert_eq!((s, z), (1.0, 0));
    // NaN is ignored by the range and becomes 0.
    let mut q = [9u8; 3];
    let (s, _) = quantize_dynamic_u8(&[f32::NAN, 2.0, -2.0], &mut q).unwrap();
    assert_eq!((s, q[0]), (4.0 / 255.0, 0));
}

#[test]
fn per_row_quantization_matches_per_tensor_of_each_row() {
    let (rows, n) = (7, 45);
    let x: Vec<f32> = (0..rows * n).map(|i| ((i * 37 % 101) as f32 - 40.0) * (1 + i / n) as f32).collect();
    for tier in crate::cpu::supported_tiers() {
        let mut q = vec![0u8; rows * n];
        let (mut s, mut z) = (vec![0f32; rows], vec![0i32; rows]);
        quantize_rows_u8_with(tier, &x, n, &mut q, &mut s, &mut z).unwrap();
        for r in 0..rows {
            let mut qr = vec![0u8; n];
            let (sr, zr) = quantize_dynamic_u8_with(CpuTier::Generic, &x[r * n..(r + 1) * n], &mut qr).unwrap();
            assert_eq!((s[r], z[r]), (sr, zr as i32), "{tier} row {r}");
            assert_eq!(&q[r * n..(r + 1) * n], &qr[..], "{tier} row {r}");
        }
    }
}

/// f64 reference of `A·W` with W given as a dequantizing function.
fn wref(m: usize, k: usize, n: usize, a: &[f32], w: impl Fn(usize, usize) -> f32) -> Vec<f32> {
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k).map(|kk| a[i * k + kk] as f64 * w(kk, j) as f64).sum::<f64>() as f32;
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]
    #[test]
    fn int4_blocks_match_reference(m in 1usize..14, blocks in 1usize..5, n in 1usize..70, bsel in 0usize..3,
                                   zps: bool, seed: u64) {
        let block = [16, 32, 64][bsel];
        let k = blocks * block - (seed % 5) as usize; // a partial last block too
        let mut s = seed;
        let blob = block / 2;
        let b: Vec<u8> = (0..n * blocks * blob).map(|_| lcg(&mut s) as u8).collect();
        let scales: Vec<f32> = (0..n * blocks).map(|_| 0.01 * (1 + lcg(&mut s) % 50) as f32).collect();
        let zpb = blocks.div_ceil(2);
        let zp: Vec<u8> = (0..n * zpb).map(|_| lcg(&mut s) as u8).collect();
        let a: Vec<f32> = (0..m * k).map(|_| (lcg(&mut s) % 2001) as f32 / 1000.0 - 1.0).collect();
        let dq = |kk: usize, j: usize| {
            let byte = b[j * blocks * blob + (kk / block) * blob + (kk % block) / 2];
            let code = if kk.is_multiple_of(2) { byte & 15 } else { byte >> 4 };
            let blk = kk / block;
            let z = if zps { (zp[j * zpb + blk / 2] >> (4 * (blk % 2))) & 15 } else { 8 };
            (code as f32 - z as f32) * scales[j * blocks + blk]
        };
        let want = wref(m, k, n, &a, dq);
        for tier in crate::cpu::supported_tiers() {
            let p = PackedWeightOnly::from_nbits_with(tier, 4, k, n, block, &b, &scales, zps.then_some(&zp[..])).unwrap();
            prop_assert_eq!(p.get(k - 1, n - 1), Some(dq(k - 1, n - 1)));
            let mut got = vec![0f32; m * n];
            wgemm(m, &a, k, &p, &mut got, n, Epilogue::NONE, Par::Seq).unwrap();
            close(&got, &want, 1e-4, &format!("int4 {tier}"));
        }
    }

    #[test]
    fn int8_weight_only_matches_reference(m in 1usize..14, k in 1usize..90, n in 1usize..70, seed: u64) {
        let mut s = seed;
        let w: Vec<i8> = (0..k * n).map(|_| lcg(&mut s) as u8 as i8).collect();
        let scales: Vec<f32> = (0..n).map(|_| 0.001 * (1 + lcg(&mut s) % 50) as f32).collect();
        let a: Vec<f32> = (0..m * k).map(|_| (lcg(&mut s) % 2001) as f32 / 1000.0 - 1.0).collect();
        let bias: Vec<f32> = (0..n).map(|j| j as f32 * 0.01).collect();
        let mut want = wref(m, k, n, &a, |kk, j| w[kk * n + j] as f32 * scales[j]);
        for (i, v) in want.iter_mut().enumerate() {
            *v = (*v + bias[i % n]).max(0.0);
        }
        for tier in crate::cpu::supported_tiers() {
            let p = PackedWeightOnly::from_i8_with(tier, &w, k, n, n, &scales).unwrap();
            let mut got = vec![0f32; m * n];
            let ep = Epilogue::default().with_bias(&bias).with_activation(Activation::Relu);
            wgemm(m, &a, k, &p, &mut got, n, ep, Par::Seq).unwrap();
            close(&got, &want, 1e-4, &format!("int8 {tier}"));
        }
    }
}

#[test]
fn weight_only_threads_and_errors() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let (m, k, n) = (64, 256, 200);
    let w: Vec<i8> = (0..k * n).map(|i| (i % 251) as u8 as i8).collect();
    let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 - 8.0).collect();
    let p = PackedWeightOnly::from_i8(&w, k, n, n, &[0.01]).unwrap();
    let mut seq = vec![0f32; m * n];
    wgemm(m, &a, k, &p, &mut seq, n, Epilogue::NONE, Par::Seq).unwrap();
    let mut thr = vec![0f32; m * n];
    wgemm(m, &a, k, &p, &mut thr, n, Epilogue::NONE, Par::Pool(&pool)).unwrap();
    assert_eq!(seq, thr);
    assert!(wgemm(m, &a[1..], k, &p, &mut thr, n, Epilogue::NONE, Par::Seq).is_err());
    assert!(wgemm(m, &a, k, &p, &mut thr, n, Epilogue::NONE.accumulating(), Par::Seq).is_err());
    assert!(PackedWeightOnly::from_nbits(3, 32, 1, 32, &[0; 12], &[1.0], None).is_err());
    assert!(PackedWeightOnly::from_nbits(4, 64, 2, 32, &[0; 16], &[1.0; 4], None).is_err());
}

#[test]
fn tile_shapes_match_reference() {
    // AMX packs A (short rows, K not a multiple of 64) or reads it in place (K > 768): whole
    // and partial 16- and 32-row tiles, one and several 32-column panels, and (400 x 768) two
    // blocks of packed rows.
    for (m, k, n, seed) in [
        (77, 128, 70, 1),
        (16, 64, 32, 2),
        (48, 384, 100, 3),
        (33, 192, 65, 4),
        (5, 100, 31, 5),
        (77, 832, 70, 6),
        (48, 1024, 40, 7),
        (400, 768, 40, 8),
    ] {
        let c = case(m, k, n, seed);
        for kernel in QKernel::supported() {
            check_case(&c, kernel, Par::Seq);
        }
    }
}

#[test]
fn quantization_near_half_steps_matches_the_division() {
    // Values on and around `(k + 0.5) * scale`, where `x * (1 / scale)` can round differently
    // from `x / scale`: every tier must give the scalar (division) result.
    let mut s = 17u64;
    for _ in 0..200 {
        let scale = 1e-4 * (1 + lcg(&mut s) % 100_000) as f32 / 7.0;
        let zero = (lcg(&mut s) % 256) as u8;
        let mut x = Vec::new();
        for _ in 0..64 {
            let k = (lcg(&mut s) % 600) as f32 - 300.0;
            let v = (k + 0.5) * scale;
            x.extend([v, v.next_up(), v.next_down(), v.next_up().next_up(), v.next_down().next_down()]);
        }
        let want: Vec<u8> = x.iter().map(|&v| quantize::quantize_one(v, scale, zero)).collect();
        for tier in crate::cpu::supported_tiers() {
            let mut got = vec![0u8; x.len()];
            quantize_u8_with(tier, &x, scale, zero, &mut got).unwrap();
            assert_eq!(got, want, "{tier} scale {scale} zero {zero}");
        }
    }
}

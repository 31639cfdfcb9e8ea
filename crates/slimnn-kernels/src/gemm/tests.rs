use super::*;
use crate::reference;

fn tiers() -> Vec<CpuTier> {
    cpu::supported_tiers()
}

#[test]
fn two_by_two_by_hand_every_tier() {
    // [1 2; 3 4] x [5 6; 7 8] = [19 22; 43 50]
    let a = [1.0, 2.0, 3.0, 4.0];
    let b = [5.0, 6.0, 7.0, 8.0];
    for tier in tiers() {
        let mut c = [f32::NAN; 6];
        c[2] = 9.0;
        c[5] = 9.0;
        sgemm_tier(tier, 2, 2, 2, &a, 2, &b, 2, &mut c, 3, Epilogue::NONE, Par::Seq).unwrap();
        // ldc = 3: the third column is untouched.
        assert_eq!(c, [19.0, 22.0, 9.0, 43.0, 50.0, 9.0], "{tier}");
    }
}

#[test]
fn epilogue_order_by_hand() {
    // act(AB + bias + C_old) + residual, with AB = [19 22; 43 50].
    let a = [1.0, 2.0, 3.0, 4.0];
    let b = [5.0, 6.0, 7.0, 8.0];
    let bias = [-20.0, 1.0];
    let res = [0.5, 0.5, 1.0, 1.0];
    for tier in tiers() {
        let ep = Epilogue::default()
            .with_bias(&bias)
            .with_activation(Activation::Relu)
            .with_residual(&res, 2)
            .accumulating();
        let mut c = [0.0, 0.0, -100.0, 0.0];
        sgemm_tier(tier, 2, 2, 2, &a, 2, &b, 2, &mut c, 2, ep, Par::Seq).unwrap();
        assert_eq!(c, [0.5, 23.5, 1.0, 52.0], "{tier}");
        let ep = Epilogue::default().with_activation(Activation::RELU6);
        sgemm_tier(tier, 2, 2, 2, &a, 2, &b, 2, &mut c, 2, ep, Par::Seq).unwrap();
        assert_eq!(c, [6.0; 4], "{tier}");
        // Row bias [-40, 10] with column bias [-20, 1]: [19-60, 22-39; 43-10, 50+11].
        let row_bias = [-40.0, 10.0];
        let ep = Epilogue::default().with_bias(&bias).with_row_bias(&row_bias);
        sgemm_tier(tier, 2, 2, 2, &a, 2, &b, 2, &mut c, 2, ep, Par::Seq).unwrap();
        assert_eq!(c, [-41.0, -17.0, 33.0, 61.0], "{tier}");
    }
}

#[test]
fn packed_transposed_weight() {
    // A linear layer: y = x W^T with W = [out=3, in=2].
    let w = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
    let x = [2.0, 3.0];
    for tier in tiers() {
        let mut p = PackedB::empty(tier).unwrap();
        p.pack_transposed(&w, 2, 3, 2).unwrap();
        let mut y = [0.0; 3];
        gemm(1, &x, 2, &p, &mut y, 3, Epilogue::NONE, Par::Seq).unwrap();
        assert_eq!(y, [2.0, 3.0, 5.0], "{tier}");
    }
}

#[test]
fn k_zero_gives_epilogue_of_zero() {
    let bias = [1.0, -2.0, 3.0];
    for tier in tiers() {
        let mut c = [7.0; 6];
        let ep = Epilogue::default().with_bias(&bias).with_activation(Activation::Relu);
        sgemm_tier(tier, 2, 0, 3, &[], 0, &[], 3, &mut c, 3, ep, Par::Seq).unwrap();
        assert_eq!(c, [1.0, 0.0, 3.0, 1.0, 0.0, 3.0], "{tier}");
        let mut c = [7.0; 6];
        let ep = Epilogue::default().with_row_bias(&[0.5, -1.0]);
        sgemm_tier(tier, 2, 0, 3, &[], 0, &[], 3, &mut c, 3, ep, Par::Seq).unwrap();
        assert_eq!(c, [0.5, 0.5, 0.5, -1.0, -1.0, -1.0], "{tier}");
        let mut c = [7.0; 6];
        sgemm_tier(tier, 2, 0, 3, &[], 0, &[], 3, &mut c, 3, Epilogue::NONE.accumulating(), Par::Seq).unwrap();
        assert_eq!(c, [7.0; 6], "{tier}");
        let mut c = [7.0; 6];
        sgemm_tier(tier, 2, 0, 3, &[], 0, &[], 3, &mut c, 3, Epilogue::NONE, Par::Seq).unwrap();
        assert_eq!(c, [0.0; 6], "{tier}");
    }
}

#[test]
fn empty_m_or_n_is_a_no_op() {
    let mut c: [f32; 0] = [];
    sgemm(0, 3, 4, &[], 3, &[0.0; 12], 4, &mut c, 4, Epilogue::NONE, Par::Seq).unwrap();
    sgemm(2, 3, 0, &[0.0; 6], 3, &[], 0, &mut c, 0, Epilogue::NONE, Par::Seq).unwrap();
}

#[test]
fn rejects_bad_arguments() {
    let a = [0.0; 6];
    let b = [0.0; 6];
    let mut c = [0.0; 4];
    let call = |a: &[f32], lda, c: &mut [f32], ldc, ep| sgemm(2, 3, 2, a, lda, &b, 2, c, ldc, ep, Par::Seq);
    // lda < k
    let e = call(&a, 2, &mut c, 2, Epilogue::NONE).unwrap_err();
    assert!(e.to_string().contains("A: leading dimension"), "{e}");
    // A too short for its stride
    assert!(call(&a, 4, &mut c, 2, Epilogue::NONE).is_err());
    // C too short
    assert!(call(&a, 3, &mut c[..3], 2, Epilogue::NONE).is_err());
    // bias of the wrong length
    let bias = [0.0; 3];
    let e = call(&a, 3, &mut c, 2, Epilogue::default().with_bias(&bias)).unwrap_err();
    assert!(matches!(e, KernelError::Epilogue { .. }), "{e}");
    // row bias of the wrong length (m = 2)
    let e = call(&a, 3, &mut c, 2, Epilogue::default().with_row_bias(&bias)).unwrap_err();
    assert!(e.to_string().contains("row bias has 3 values"), "{e}");
    // residual too short
    let res = [0.0; 3];
    assert!(call(&a, 3, &mut c, 2, Epilogue::default().with_residual(&res, 2)).is_err());
    // inverted or NaN clip
    for (min, max) in [(1.0, 0.0), (f32::NAN, 1.0)] {
        let ep = Epilogue::default().with_activation(Activation::Clip { min, max });
        assert!(call(&a, 3, &mut c, 2, ep).is_err());
    }
    // B too short (unpacked)
    assert!(sgemm(2, 3, 2, &a, 3, &b[..5], 2, &mut c, 2, Epilogue::NONE, Par::Seq).is_err());
    // Nothing was written by the failed calls.
    assert_eq!(c, [0.0; 4]);
}

#[test]
fn unsupported_tier_is_an_error() {
    let best = cpu::detected_tier();
    if best == CpuTier::Amx {
        eprintln!("skipped: every tier is supported here");
        return;
    }
    let e = PackedB::empty(CpuTier::Amx).unwrap_err();
    assert!(matches!(e, KernelError::TierUnsupported { .. }), "{e}");
    let mut c = [0.0; 1];
    assert!(sgemm_tier(CpuTier::Amx, 1, 1, 1, &[1.0], 1, &[1.0], 1, &mut c, 1, Epilogue::NONE, Par::Seq).is_err());
}

fn lcg(seed: &mut u64) -> f32 {
    *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
}

fn check_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol * (1.0 + w.abs()), "{what}: [{i}] got {g}, want {w}");
    }
}

#[test]
fn threaded_matches_sequential_and_reference() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let (m, k, n) = (77, 300, 211);
    let mut seed = 1;
    let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
    let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
    let bias: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
    let row_bias: Vec<f32> = (0..m).map(|_| lcg(&mut seed)).collect();
    let ep = Epilogue::default().with_bias(&bias).with_row_bias(&row_bias).with_activation(Activation::GeluErf);
    let mut want = vec![0.0; m * n];
    reference::sgemm(m, k, n, &a, k, &b, n, &mut want, n, ep).unwrap();
    for tier in tiers() {
        for par in [Par::Seq, Par::Pool(&pool), Par::Current] {
            let mut c = vec![0.0; m * n];
            sgemm_tier(tier, m, k, n, &a, k, &b, n, &mut c, n, ep, par).unwrap();
            check_close(&c, &want, 1e-5, &format!("{tier} {par:?}"));
        }
    }
}

#[test]
fn split_k_with_accumulate_equals_one_call() {
    let (m, k, n) = (9, 700, 50);
    let mut seed = 7;
    let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
    let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
    for tier in tiers() {
        let mut whole = vec![0.0; m * n];
        let ep = Epilogue::default().with_activation(Activation::Silu);
        sgemm_tier(tier, m, k, n, &a, k, &b, n, &mut whole, n, ep, Par::Seq).unwrap();
        let mut split = vec![0.0; m * n];
        let k1 = 333;
        sgemm_tier(tier, m, k1, n, &a, k, &b, n, &mut split, n, Epilogue::NONE, Par::Seq).unwrap();
        sgemm_tier(tier, m, k - k1, n, &a[k1..], k, &b[k1 * n..], n, &mut split, n, ep.accumulating(), Par::Seq)
            .unwrap();
        check_close(&split, &whole, 1e-5, &tier.to_string());
    }
}

#[test]
fn unpacked_b_equals_packed_b_bit_for_bit() {
    // Rows past one MC block, k past one KC block, a partial last panel and a padded ldb: the
    // blocks packed as the tiles reach them hold what `PackedB` holds, summed in the same order.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let (m, k, n, ldb) = (300, 800, 130, 133);
    let mut seed = 11;
    let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
    let b: Vec<f32> = (0..k * ldb).map(|_| lcg(&mut seed)).collect();
    let bias: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
    let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
    let ep = Epilogue::default().with_bias(&bias).with_activation(Activation::Relu).with_residual(&res, n);
    let mut want = vec![0.0; m * n];
    reference::sgemm(m, k, n, &a, k, &b, ldb, &mut want, n, ep).unwrap();
    for tier in tiers() {
        let mut packed = PackedB::empty(tier).unwrap();
        packed.pack(&b, k, n, ldb).unwrap();
        for par in [Par::Seq, Par::Pool(&pool)] {
            let mut from_packed = vec![0.0; m * n];
            gemm(m, &a, k, &packed, &mut from_packed, n, ep, par).unwrap();
            let mut c = vec![0.0; m * n];
            sgemm_tier(tier, m, k, n, &a, k, &b, ldb, &mut c, n, ep, par).unwrap();
            assert!(c == from_packed, "{tier} {par:?}: unpacked and packed B differ");
            check_close(&c, &want, 1e-4, &format!("{tier} {par:?}"));
        }
    }
}

#[test]
fn nested_sgemm_inside_pool_tasks() {
    // Many small products run from inside pool tasks, each with its own scratch.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let (m, k, n) = (128, 32, 128);
    let mut seed = 3;
    let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
    let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
    let mut want = vec![0.0; m * n];
    reference::sgemm(m, k, n, &a, k, &b, n, &mut want, n, Epilogue::NONE).unwrap();
    let mut outs = vec![vec![0.0f32; m * n]; 8];
    pool.install(|| {
        rayon::scope(|s| {
            for out in outs.iter_mut() {
                let (a, b) = (&a, &b);
                s.spawn(move |_| {
                    sgemm(m, k, n, a, k, b, n, out, n, Epilogue::NONE, Par::Current).unwrap();
                });
            }
        })
    });
    for out in &outs {
        check_close(out, &want, 1e-5, "nested");
    }
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::bf16_to_f32(bf16::round_bf16_bits(x))).collect()
}

#[test]
fn bf16_rounding_by_hand() {
    use bf16::round_bf16_bits as r;
    assert_eq!(r(1.0), 0x3f80);
    // 1 + 2^-8 is a tie between 1 and 1 + 2^-7: to even (1).
    assert_eq!(r(1.0 + 1.0 / 256.0), 0x3f80);
    // 1 + 3 * 2^-8 ties between 1 + 2^-7 (odd) and 1 + 2^-6: to even, up.
    assert_eq!(r(1.0 + 3.0 / 256.0), 0x3f82);
    assert_eq!(r(-2.5), 0xc020);
    assert_eq!(r(f32::MAX), 0x7f80, "rounds up to infinity");
    assert_eq!(r(f32::INFINITY), 0x7f80);
    assert_eq!(r(-1e-40), 0x8000, "denormals flush to signed zero");
    assert!(bf16::bf16_to_f32(r(f32::NAN)).is_nan());
}

#[test]
fn bf16_conversion_matches_scalar_rounding_bit_for_bit() {
    // Every length mod 32 (the vector body and its masked tail), values from many binades.
    let mut seed = 11u64;
    for k in [1usize, 2, 15, 16, 17, 31, 32, 33, 63, 64, 100] {
        let m = 3;
        let a: Vec<f32> = (0..m * (k + 1)).map(|i| lcg(&mut seed) * 10f32.powi((i % 9) as i32 - 4)).collect();
        for tier in tiers() {
            let k2 = k.div_ceil(2);
            let mut got = vec![f32::NAN; m * k2];
            bf16::convert_a(m, k, &a, k + 1, &mut got, tier, Par::Seq);
            for i in 0..m {
                for p in 0..k2 {
                    let lo = a[i * (k + 1) + 2 * p];
                    let hi = if 2 * p + 1 < k { a[i * (k + 1) + 2 * p + 1] } else { 0.0 };
                    let want = bf16::round_bf16_bits(lo) as u32 | (bf16::round_bf16_bits(hi) as u32) << 16;
                    assert_eq!(got[i * k2 + p].to_bits(), want, "{tier} k={k} row {i} pair {p}");
                }
            }
        }
    }
}

#[test]
fn bf16_gemm_matches_reference_on_rounded_inputs() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut seed = 5;
    // Odd k (a half-empty last pair), edge tiles in both directions, several K blocks.
    // m = 300 converts A in parallel blocks of rows.
    for (m, k, n) in [(1, 1, 1), (7, 3, 5), (9, 31, 50), (77, 300, 211), (16, 1700, 96), (300, 41, 20)] {
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let bias: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
        let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
        let row_bias: Vec<f32> = (0..m).map(|_| lcg(&mut seed)).collect();
        let ep = Epilogue::default()
            .with_bias(&bias)
            .with_row_bias(&row_bias)
            .with_activation(Activation::GeluErf)
            .with_residual(&res, n);
        let mut want = vec![0.0; m * n];
        reference::sgemm(m, k, n, &round_bf16(&a), k, &round_bf16(&b), n, &mut want, n, ep).unwrap();
        let mut bt = vec![0.0; n * k];
        for kk in 0..k {
            for j in 0..n {
                bt[j * k + kk] = b[kk * n + j];
            }
        }
        for tier in tiers() {
            let mut p = PackedB::empty(tier).unwrap();
            p.pack_bf16(&b, k, n, n).unwrap();
            let mut pt = PackedB::empty(tier).unwrap();
            pt.pack_transposed_bf16(&bt, k, n, k).unwrap();
            assert!(p.is_bf16() && p.k() == k && p.n() == n);
            assert_eq!(p.get(k - 1, n - 1), Some(round_bf16(&[b[k * n - 1]])[0]));
            for par in [Par::Seq, Par::Pool(&pool)] {
                for packed in [&p, &pt] {
                    let mut c = vec![0.0; m * n];
                    gemm(m, &a, k, packed, &mut c, n, ep, par).unwrap();
                    check_close(&c, &want, 2e-5, &format!("bf16 {tier} {m}x{k}x{n} {par:?}"));
                }
            }
            // Refilled as f32, the same buffer multiplies in f32 again.
            p.pack(&b, k, n, n).unwrap();
            assert!(!p.is_bf16());
        }
    }
}

#[test]
fn bf16_error_against_f32_is_bounded() {
    // The cost of rounding both operands: ~2^-9 relative per product, averaging out over k.
    let (m, k, n) = (32, 384, 64);
    let mut seed = 9;
    let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
    let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
    let mut exact = vec![0.0; m * n];
    reference::sgemm(m, k, n, &a, k, &b, n, &mut exact, n, Epilogue::NONE).unwrap();
    let mut p = PackedB::empty(cpu::tier()).unwrap();
    p.pack_bf16(&b, k, n, n).unwrap();
    let mut c = vec![0.0; m * n];
    gemm(m, &a, k, &p, &mut c, n, Epilogue::NONE, Par::Seq).unwrap();
    let scale = (k as f32).sqrt() / 3.0; // typical |C|
    let worst = c.iter().zip(&exact).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    assert!(worst < 0.02 * scale, "worst {worst} vs typical magnitude {scale}");
    assert!(worst > 0.0, "bf16 products must differ from f32 somewhere");
}

#[test]
fn bf16_packing_holds_every_rounded_value() {
    // The vector packer (native tiers) and the scalar one agree with per-value rounding.
    let mut seed = 21;
    for (k, n) in [(1, 1), (5, 17), (32, 48), (33, 100), (128, 32)] {
        let b: Vec<f32> = (0..k * (n + 3)).map(|_| lcg(&mut seed) * 7.0).collect();
        for tier in tiers() {
            let mut p = PackedB::empty(tier).unwrap();
            p.pack_bf16(&b, k, n, n + 3).unwrap();
            for kk in 0..k {
                for j in 0..n {
                    let want = bf16::bf16_to_f32(bf16::round_bf16_bits(b[kk * (n + 3) + j]));
                    assert_eq!(p.get(kk, j), Some(want), "{tier} {k}x{n} at ({kk}, {j})");
                }
            }
            // Padding columns and the odd row's partner are zero.
            let nr = p.nr();
            let data = p.data();
            let last = (n - 1) / nr;
            for q in 0..k.div_ceil(2) {
                for jj in (n - last * nr)..nr {
                    assert_eq!(data[last * p.panel_stride() + q * nr + jj].to_bits(), 0, "{tier} pad");
                }
            }
        }
    }
}

/// Values over many binades, with the special cases a split must keep.
fn split_cases(seed: &mut u64, len: usize) -> Vec<f32> {
    let special = [0.0, -0.0, 1.0, f32::MAX, -f32::MAX, f32::MIN_POSITIVE, 1e-40, f32::INFINITY, -f32::INFINITY];
    (0..len)
        .map(|i| match i % 13 {
            12 => special[(i / 13) % special.len()],
            b => lcg(seed) * 10f32.powi(b as i32 * 6 - 36),
        })
        .collect()
}

#[test]
fn bf16x6_split_is_exact_for_normal_values() {
    let join = |p: [u16; 3]| p.iter().map(|&b| bf16::bf16_to_f32(b) as f64).sum::<f64>();
    let mut seed = 3;
    for x in split_cases(&mut seed, 5000) {
        let parts = bf16x6::split3(x);
        if x.is_infinite() {
            assert_eq!(parts, [bf16::round_bf16_bits(x), 0, 0], "{x}");
        } else if x.abs() >= 2f32.powi(-100) {
            // Normal with every part normal: the sum is exact.
            assert_eq!(join(parts), x as f64, "{x}: {parts:?}");
        } else {
            // Parts below f32's normal range flush to zero, as the tiles read them.
            assert!((join(parts) - x as f64).abs() <= 2f64.powi(-126), "{x}: {parts:?}");
        }
    }
    // hi is truncated: f32::MAX stays finite (rounded, it would be infinity).
    assert!(join(bf16x6::split3(f32::MAX)).is_finite());
    let nan = bf16x6::split3(f32::from_bits(0x7f80_0001));
    assert!(bf16::bf16_to_f32(nan[0]).is_nan() && nan[1..] == [0, 0], "NaN keeps a NaN hi part: {nan:?}");
}

#[test]
fn bf16x6_conversion_matches_scalar_split_bit_for_bit() {
    let mut seed = 13u64;
    for k in [1usize, 2, 15, 16, 17, 31, 32, 33, 63, 64, 100] {
        let m = 3;
        let mut a = split_cases(&mut seed, m * (k + 1));
        a[0] = f32::from_bits(0x7f80_0001); // a NaN with its payload in the low bits
        let rows = bf16x6::slot_rows(k);
        for tier in tiers() {
            let layout = bf16x6::Layout::of(tier);
            let mut got = vec![f32::NAN; layout.a_len(m, k)];
            bf16x6::convert_a(m, k, &a, k + 1, &mut got, tier, Par::Seq);
            let mut want = vec![0.0; layout.a_len(m, k)];
            for i in 0..m {
                for kk in 0..k {
                    for (q, bits) in bf16x6::split3(a[i * (k + 1) + kk]).into_iter().enumerate() {
                        let (at, high) = layout.a_slot(i, rows, kk, q);
                        bf16x6::set_half(&mut want[at], high, bits);
                    }
                }
            }
            if layout == bf16x6::Layout::Rows {
                // Rows hold exactly their slots; tiles pad to groups of 16 rows with zeros.
                assert_eq!(got.len(), m * rows);
            }
            let (g, w): (Vec<u32>, Vec<u32>) = got.iter().zip(&want).map(|(g, w)| (g.to_bits(), w.to_bits())).unzip();
            assert_eq!(g, w, "{tier} k={k}");
        }
    }
}

/// Largest `|got - exact| / sum_k |a b|` over C, with `exact` from the f64 reference.
fn relative_error(m: usize, k: usize, n: usize, a: &[f32], b: &[f32], got: &[f32]) -> f64 {
    let mut worst = 0f64;
    for i in 0..m {
        for j in 0..n {
            let (mut s, mut mag) = (0f64, 0f64);
            for kk in 0..k {
                let p = a[i * k + kk] as f64 * b[kk * n + j] as f64;
                s += p;
                mag += p.abs();
            }
            worst = worst.max((got[i * n + j] as f64 - s).abs() / mag.max(f64::MIN_POSITIVE));
        }
    }
    worst
}

#[test]
fn bf16x6_gemm_is_as_accurate_as_f32() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
    let mut seed = 17;
    // Edge tiles both ways (rows not a multiple of 16, columns of 48), K not a multiple of a
    // tile step, several K blocks (576 slots = 384 values each), parallel conversion of A.
    for (m, k, n) in [(1, 1, 1), (7, 3, 5), (17, 31, 50), (77, 300, 211), (16, 1700, 96), (300, 41, 20), (64, 800, 144)]
    {
        let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
        let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
        let mut bt = vec![0.0; n * k];
        for kk in 0..k {
            for j in 0..n {
                bt[j * k + kk] = b[kk * n + j];
            }
        }
        let mut f32_c = vec![0.0; m * n];
        sgemm(m, k, n, &a, k, &b, n, &mut f32_c, n, Epilogue::NONE, Par::Seq).unwrap();
        let f32_err = relative_error(m, k, n, &a, &b, &f32_c);
        for tier in tiers() {
            let mut p = PackedB::empty(tier).unwrap();
            p.pack_bf16x6(&b, k, n, n).unwrap();
            let mut pt = PackedB::empty(tier).unwrap();
            pt.pack_transposed_bf16x6(&bt, k, n, k).unwrap();
            assert!(p.is_bf16x6() && !p.is_bf16() && p.k() == k && p.n() == n);
            assert_eq!(p.get(k - 1, n - 1), Some(b[k * n - 1]), "the parts add up to the value");
            for par in [Par::Seq, Par::Pool(&pool)] {
                for packed in [&p, &pt] {
                    let mut c = vec![f32::NAN; m * n];
                    gemm(m, &a, k, packed, &mut c, n, Epilogue::NONE, par).unwrap();
                    let err = relative_error(m, k, n, &a, &b, &c);
                    // Within a small factor of the f32 kernel's error (measured: 0.5-1.8x).
                    assert!(
                        err <= 3.0 * f32_err.max(2f64.powi(-24)),
                        "{tier} {m}x{k}x{n} {par:?}: {err:e} against f32's {f32_err:e}"
                    );
                }
            }
        }
    }
}

#[test]
fn bf16x6_gemm_epilogue_and_accumulate() {
    let mut seed = 19;
    let (m, k, n) = (40, 200, 100);
    let a: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed)).collect();
    let b: Vec<f32> = (0..k * n).map(|_| lcg(&mut seed)).collect();
    let bias: Vec<f32> = (0..n).map(|_| lcg(&mut seed)).collect();
    let res: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
    let old: Vec<f32> = (0..m * n).map(|_| lcg(&mut seed)).collect();
    let ep =
        Epilogue::default().with_bias(&bias).with_activation(Activation::GeluErf).with_residual(&res, n).accumulating();
    let mut want = old.clone();
    reference::sgemm(m, k, n, &a, k, &b, n, &mut want, n, ep).unwrap();
    for tier in tiers() {
        let mut p = PackedB::empty(tier).unwrap();
        p.pack_bf16x6(&b, k, n, n).unwrap();
        let mut c = old.clone();
        gemm(m, &a, k, &p, &mut c, n, ep, Par::Seq).unwrap();
        check_close(&c, &want, 1e-5, &format!("bf16x6 {tier}"));
        // Special values propagate as in f32: an infinite input makes its row infinite or NaN.
        let mut a2 = a.clone();
        a2[0] = f32::INFINITY;
        a2[k] = f32::NAN;
        let mut c = vec![0.0; m * n];
        gemm(m, &a2, k, &p, &mut c, n, Epilogue::NONE, Par::Seq).unwrap();
        assert!(c[..n].iter().all(|x| x.is_infinite() || x.is_nan()), "{tier} inf row");
        assert!(c[n..2 * n].iter().all(|x| x.is_nan()), "{tier} NaN row");
        assert!(c[2 * n..].iter().all(|x| x.is_finite()), "{tier} other rows");
    }
}

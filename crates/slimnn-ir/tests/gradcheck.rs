//! Gradient checks for `slimnn_ir::autodiff`: for every op with a backward rule, random shapes
//! and values from a seeded generator, float64, loss = sum(out * R) with R random; the gradient
//! of every float input from the backward graph is compared with central differences
//! `(L(x + h) - L(x - h)) / 2h`, h = 1e-6, by `|a - n| / max(1, |a|, |n|)`, which must stay
//! <= 1e-6. Values are kept away from kinks (ReLU at 0, Clip bounds, max ties, rounding edges)
//! so the finite differences see a smooth function.
//!
//! Run with `cargo test -p slimnn-ir --test gradcheck -- --nocapture --test-threads=1` to see
//! the figure per op.

use slimnn_ir::autodiff::{batch_norm_train, differentiate};
use slimnn_ir::ops::*;
use slimnn_ir::{Fact, Graph, IrError, Op, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};

const STEP: f64 = 1e-6;
const TOLERANCE: f64 = 1e-6;

/// SplitMix64: small, seeded, reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    fn uniform(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }
    /// In `lo..=hi`.
    fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo + 1) as u64) as usize
    }
    fn coin(&mut self, p: f64) -> bool {
        self.unit() < p
    }
    fn shape(&mut self, rank_lo: usize, rank_hi: usize, dim_hi: usize) -> Vec<usize> {
        let r = self.int(rank_lo, rank_hi);
        (0..r).map(|_| self.int(1, dim_hi)).collect()
    }
    /// Uniform values at least `gap` away from every point in `kinks`.
    fn values_away(&mut self, n: usize, lo: f64, hi: f64, kinks: &[f64], gap: f64) -> Vec<f64> {
        (0..n)
            .map(|_| loop {
                let v = self.uniform(lo, hi);
                if kinks.iter().all(|k| (v - k).abs() > gap) {
                    break v;
                }
            })
            .collect()
    }
    /// Distinct values (pairwise at least 0.05 apart) in random order, so max/min have no ties.
    fn distinct(&mut self, n: usize) -> Vec<f64> {
        let mut v: Vec<f64> = (0..n).map(|i| -1.0 + 0.1 * i as f64 + self.uniform(0.0, 0.05)).collect();
        for i in (1..n).rev() {
            let j = self.int(0, i);
            v.swap(i, j);
        }
        v
    }
}

/// A forward graph under construction with the values of its inputs.
struct Case {
    g: Graph,
    feeds: Vec<(String, Tensor)>,
    rng: Rng,
}

impl Case {
    fn new(seed: u64) -> Case {
        Case { g: Graph::default(), feeds: vec![], rng: Rng::new(seed) }
    }

    fn input_values(&mut self, shape: &[usize], v: Vec<f64>) -> OutletId {
        let name = format!("x{}", self.feeds.len());
        let o = self.g.add_input(&name, Fact::known(DType::F64, shape)).unwrap();
        self.feeds.push((name, Tensor::from_vec(shape.to_vec(), v).unwrap()));
        o
    }

    /// An input declared with `dims` (possibly symbolic), fed with values of shape `shape`.
    fn input_dims(&mut self, dims: Vec<Dim>, shape: &[usize], lo: f64, hi: f64) -> OutletId {
        let name = format!("x{}", self.feeds.len());
        let o = self.g.add_input(&name, Fact::new(DType::F64, dims)).unwrap();
        let v = (0..shape.iter().product()).map(|_| self.rng.uniform(lo, hi)).collect();
        self.feeds.push((name, tensor(shape, v)));
        o
    }

    fn input(&mut self, shape: &[usize], lo: f64, hi: f64) -> OutletId {
        let n = shape.iter().product();
        let v = (0..n).map(|_| self.rng.uniform(lo, hi)).collect();
        self.input_values(shape, v)
    }

    fn konst(&mut self, t: Tensor) -> OutletId {
        let name = format!("c{}", self.g.nodes().len());
        self.g.add_const(&name, t).unwrap()
    }

    fn ints(&mut self, v: &[i64]) -> OutletId {
        self.konst(Tensor::from_vec(vec![v.len()], v.to_vec()).unwrap())
    }

    fn scalar(&mut self, v: f64) -> OutletId {
        self.konst(Tensor::scalar(v))
    }

    fn node(&mut self, op: impl Into<Op>, inputs: Vec<OutletId>) -> Vec<OutletId> {
        let name = format!("n{}", self.g.nodes().len());
        self.g.add_node(&name, op, inputs).unwrap()
    }

    fn one(&mut self, op: impl Into<Op>, inputs: Vec<OutletId>) -> OutletId {
        self.node(op, inputs)[0]
    }
}

fn tensor(shape: &[usize], v: Vec<f64>) -> Tensor {
    Tensor::from_vec(shape.to_vec(), v).unwrap()
}

/// Adds `loss = sum_i sum(outs[i] * R_i)` and returns it.
fn add_loss(c: &mut Case, outs: &[OutletId]) -> OutletId {
    let mut terms = vec![];
    for &o in outs {
        let shape = c.g.fact(o).known_shape().expect("gradcheck outputs have known shapes");
        let n = shape.iter().product();
        let r: Vec<f64> = (0..n).map(|_| c.rng.uniform(-1.0, 1.0)).collect();
        let r = c.konst(tensor(&shape, r));
        let prod = c.one(Binary(BinaryOp::Mul), vec![o, r]);
        let red = Reduce { op: ReduceOp::Sum, axes: None, keepdims: false, noop_with_empty_axes: false };
        terms.push(c.one(red, vec![prod]));
    }
    let mut loss = terms[0];
    for &t in &terms[1..] {
        loss = c.one(Binary(BinaryOp::Add), vec![loss, t]);
    }
    loss
}

/// Max relative error between the backward graph's gradients and central differences, over
/// every element of every float input of `c`.
fn gradcheck(mut c: Case, outs: &[OutletId]) -> f64 {
    let loss = add_loss(&mut c, outs);
    gradcheck_loss(c, loss)
}

/// [`gradcheck`] for a graph that already ends in a scalar `loss`.
fn gradcheck_loss(c: Case, loss: OutletId) -> f64 {
    let mut forward = c.g.clone();
    forward.add_output("loss", loss);
    // Every float input fed, in feed order.
    let float_feeds: Vec<usize> = (0..c.feeds.len()).filter(|&k| c.feeds[k].1.dtype().is_float()).collect();
    let wrt: Vec<OutletId> = float_feeds
        .iter()
        .map(|&k| {
            let id = c.g.inputs().iter().copied().find(|&i| c.g.node(i).name == c.feeds[k].0).expect("fed input");
            OutletId::new(id, 0)
        })
        .collect();
    let mut g = c.g.clone();
    let grads = differentiate(&mut g, loss, &wrt).unwrap_or_else(|e| panic!("differentiate: {e}"));
    for (k, &gr) in grads.iter().enumerate() {
        g.add_output(&format!("grad{k}"), gr);
    }
    g.check_consistency().unwrap();
    let analytic = g.eval(c.feeds.clone()).unwrap_or_else(|e| panic!("backward eval: {e}"));
    // Outputs the case graph already had come first.
    let skip = c.g.outputs().len();
    let eval_loss = |feeds: Vec<(String, Tensor)>| forward.eval(feeds).unwrap()[skip].to_f64_vec()[0];
    let mut worst: f64 = 0.0;
    for (n, &k) in float_feeds.iter().enumerate() {
        let t = &c.feeds[k].1;
        let a = analytic[skip + n].to_f64_vec();
        assert_eq!(analytic[skip + n].shape(), t.shape(), "gradient {n} has the input's shape");
        let base = t.to_f64_vec();
        for (j, &aj) in a.iter().enumerate() {
            let at = |delta: f64| {
                let mut v = base.clone();
                v[j] += delta;
                let mut feeds = c.feeds.clone();
                feeds[k].1 = tensor(t.shape(), v);
                eval_loss(feeds)
            };
            let numeric = (at(STEP) - at(-STEP)) / (2.0 * STEP);
            let err = (aj - numeric).abs() / 1f64.max(aj.abs()).max(numeric.abs());
            assert!(err.is_finite(), "input {k} element {j}: analytic {aj}, numeric {numeric}");
            worst = worst.max(err);
        }
    }
    worst
}

/// Runs `cases` random cases of `build` (seeded from the op name), prints and checks the worst
/// relative error.
fn check(op: &str, cases: usize, build: impl Fn(&mut Case) -> Vec<OutletId>) {
    let seed = op.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let mut worst: f64 = 0.0;
    for k in 0..cases {
        let mut c = Case::new(seed.wrapping_add(k as u64));
        let outs = build(&mut c);
        let err = gradcheck(c, &outs);
        assert!(err <= TOLERANCE, "{op} case {k}: relative error {err:.3e} > {TOLERANCE:e}");
        worst = worst.max(err);
    }
    println!("gradcheck {op:<24} max rel err {worst:.2e} over {cases} cases");
}

/// Two shapes that broadcast together: suffixes of one output shape with some dims set to 1.
fn broadcast_pair(rng: &mut Rng) -> (Vec<usize>, Vec<usize>) {
    let out = rng.shape(0, 4, 4);
    let part = |rng: &mut Rng| -> Vec<usize> {
        let r = rng.int(0, out.len());
        out[out.len() - r..].iter().map(|&d| if rng.coin(0.3) { 1 } else { d }).collect()
    };
    (part(rng), part(rng))
}

// ---------------------------------------------------------------------------------------------
// Elementwise

fn binary_case(op: BinaryOp, c: &mut Case, lo: f64, hi: f64, b_lo: f64, b_hi: f64) -> Vec<OutletId> {
    let (sa, sb) = broadcast_pair(&mut c.rng);
    let a = c.input(&sa, lo, hi);
    let b = c.input(&sb, b_lo, b_hi);
    vec![c.one(Binary(op), vec![a, b])]
}

#[test]
fn add_sub_mul() {
    for (name, op) in [("Add", BinaryOp::Add), ("Sub", BinaryOp::Sub), ("Mul", BinaryOp::Mul)] {
        check(name, 8, |c| binary_case(op, c, -2.0, 2.0, -2.0, 2.0));
    }
}

#[test]
fn div() {
    check("Div", 8, |c| {
        let (sa, sb) = broadcast_pair(&mut c.rng);
        let a = c.input(&sa, -2.0, 2.0);
        let n = sb.iter().product();
        let v = c.rng.values_away(n, -2.0, 2.0, &[0.0], 0.5);
        let b = c.input_values(&sb, v);
        vec![c.one(Binary(BinaryOp::Div), vec![a, b])]
    });
}

#[test]
fn pow() {
    check("Pow", 8, |c| binary_case(BinaryOp::Pow, c, 0.5, 2.0, -1.5, 2.5));
    // Integer exponent (a constant): only the base gets a gradient.
    check("Pow (int exponent)", 4, |c| {
        let shape = c.rng.shape(1, 3, 4);
        let n = shape.iter().product();
        let v = c.rng.values_away(n, -2.0, 2.0, &[0.0], 0.2);
        let a = c.input_values(&shape, v);
        let e = c.konst(Tensor::scalar(3i64));
        vec![c.one(Binary(BinaryOp::Pow), vec![a, e])]
    });
}

#[test]
fn max_min() {
    for (name, op) in [("Max", BinaryOp::Max), ("Min", BinaryOp::Min)] {
        check(name, 8, |c| {
            let (sa, sb) = broadcast_pair(&mut c.rng);
            // a on a grid of odd tenths, b on even tenths (plus small noise): never within 0.02.
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let va = (0..na).map(|_| (2 * c.rng.int(0, 20) as i64 - 20) as f64 * 0.1 + 0.1).collect();
            let vb =
                (0..nb).map(|_| (2 * c.rng.int(0, 20) as i64 - 20) as f64 * 0.1 + c.rng.uniform(-0.02, 0.02)).collect();
            let a = c.input_values(&sa, va);
            let b = c.input_values(&sb, vb);
            vec![c.one(Binary(op), vec![a, b])]
        });
    }
}

#[test]
fn prelu() {
    check("PRelu", 8, |c| {
        let xs = c.rng.shape(1, 4, 4);
        let r = c.rng.int(0, xs.len());
        let ss: Vec<usize> = xs[xs.len() - r..].iter().map(|&d| if c.rng.coin(0.4) { 1 } else { d }).collect();
        let n = xs.iter().product();
        let v = c.rng.values_away(n, -2.0, 2.0, &[0.0], 0.01);
        let x = c.input_values(&xs, v);
        let s = c.input(&ss, -0.5, 0.5);
        vec![c.one(Binary(BinaryOp::PRelu), vec![x, s])]
    });
}

#[test]
fn where_op() {
    check("Where", 8, |c| {
        let (sx, sy) = broadcast_pair(&mut c.rng);
        let x = c.input(&sx, -2.0, 2.0);
        let y = c.input(&sy, -2.0, 2.0);
        let sc = broadcast_pair(&mut c.rng).0;
        let cs: Vec<usize> = sc.iter().rev().take(sx.len().max(sy.len())).rev().copied().collect();
        // The condition broadcasts too: keep its dims 1 or equal to the values' broadcast.
        let xy = slimnn_tensor::broadcast_shapes(&sx, &sy).unwrap();
        let cs: Vec<usize> =
            cs.iter().enumerate().map(|(i, _)| if c.rng.coin(0.5) { 1 } else { xy[xy.len() - cs.len() + i] }).collect();
        let n = cs.iter().product();
        let cond: Vec<bool> = (0..n).map(|_| c.rng.coin(0.5)).collect();
        let cond = c.konst(Tensor::from_vec(cs, cond).unwrap());
        vec![c.one(Where, vec![cond, x, y])]
    });
}

#[test]
fn cast_identity() {
    check("Cast", 4, |c| {
        let s = c.rng.shape(0, 3, 4);
        let x = c.input(&s, -2.0, 2.0);
        vec![c.one(Cast { to: DType::F64 }, vec![x])]
    });
    check("Identity", 4, |c| {
        let s = c.rng.shape(0, 3, 4);
        let x = c.input(&s, -2.0, 2.0);
        vec![c.one(Identity, vec![x])]
    });
    // f32 -> f64: the gradient comes back as f32.
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::known(DType::F32, &[3])).unwrap();
    let y = g.add_node("up", Cast { to: DType::F64 }, vec![x]).unwrap()[0];
    let r = g.add_const("r", tensor(&[3], vec![1.0, -2.0, 0.5])).unwrap();
    let p = g.add_node("p", Binary(BinaryOp::Mul), vec![y, r]).unwrap()[0];
    let red = Reduce { op: ReduceOp::Sum, axes: None, keepdims: false, noop_with_empty_axes: false };
    let loss = g.add_node("loss", red, vec![p]).unwrap()[0];
    let d = differentiate(&mut g, loss, &[x]).unwrap();
    g.add_output("dx", d[0]);
    let out = g.eval(vec![("x".into(), Tensor::from_vec(vec![3], vec![1f32, 2.0, 3.0]).unwrap())]).unwrap();
    assert_eq!(out[0].as_slice::<f32>().unwrap(), &[1.0, -2.0, 0.5]);
}

#[test]
fn clip() {
    check("Clip", 8, |c| {
        let s = c.rng.shape(0, 3, 5);
        let n = s.iter().product();
        let lo = c.rng.uniform(-1.0, -0.2);
        let hi = c.rng.uniform(0.2, 1.0);
        let v = c.rng.values_away(n, -2.0, 2.0, &[lo, hi], 0.01);
        let x = c.input_values(&s, v);
        let bound_shape: &[usize] = if c.rng.coin(0.5) { &[] } else { &[1] };
        let lo = c.input_values(bound_shape, vec![lo]);
        let hi = c.input_values(bound_shape, vec![hi]);
        vec![c.one(Clip, vec![x, lo, hi])]
    });
}

// ---------------------------------------------------------------------------------------------
// Linear algebra

#[test]
fn matmul() {
    // (rank of a, rank of b) pairs, batch dims broadcasting.
    let pairs = [(1, 1), (1, 2), (2, 1), (2, 2), (3, 2), (2, 3), (3, 3), (4, 3), (1, 3), (3, 1), (4, 2)];
    for (ra, rb) in pairs {
        check(&format!("MatMul {ra}-d @ {rb}-d"), 3, |c| {
            let (m, k, n) = (c.rng.int(1, 4), c.rng.int(1, 4), c.rng.int(1, 4));
            let batch = c.rng.shape(2, 2, 3);
            let bdims = |c: &mut Case, r: usize| -> Vec<usize> {
                let extra = r.saturating_sub(2);
                batch[2 - extra..].iter().map(|&d| if c.rng.coin(0.3) { 1 } else { d }).collect()
            };
            let mut sa = bdims(c, ra);
            sa.extend(if ra == 1 { vec![k] } else { vec![m, k] });
            let mut sb = bdims(c, rb);
            sb.extend(if rb == 1 { vec![k] } else { vec![k, n] });
            let a = c.input(&sa, -1.0, 1.0);
            let b = c.input(&sb, -1.0, 1.0);
            vec![c.one(MatMul, vec![a, b])]
        });
    }
}

#[test]
fn gemm() {
    check("Gemm", 16, |c| {
        let (m, k, n) = (c.rng.int(1, 4), c.rng.int(1, 4), c.rng.int(1, 4));
        let (ta, tb) = (c.rng.coin(0.5), c.rng.coin(0.5));
        let alpha = [1.0, 0.5, -1.5][c.rng.int(0, 2)];
        let beta = [1.0, 0.25, 2.0][c.rng.int(0, 2)];
        let a = c.input(&if ta { [k, m] } else { [m, k] }, -1.0, 1.0);
        let b = c.input(&if tb { [n, k] } else { [k, n] }, -1.0, 1.0);
        let cs: Vec<Vec<usize>> = vec![vec![], vec![n], vec![1, n], vec![m, 1], vec![m, n], vec![1]];
        let mut ins = vec![a, b];
        let pick = c.rng.int(0, cs.len());
        if pick < cs.len() {
            ins.push(c.input(&cs[pick], -1.0, 1.0));
        }
        vec![c.one(Gemm { alpha, beta, trans_a: ta, trans_b: tb }, ins)]
    });
}

// ---------------------------------------------------------------------------------------------
// Normalisation, reductions

#[test]
fn batch_norm_inference() {
    check("BatchNormalization", 8, |c| {
        let mut s = c.rng.shape(1, 4, 3);
        if s.len() >= 2 {
            s[1] = c.rng.int(1, 4);
        }
        let ch = if s.len() == 1 { 1 } else { s[1] };
        let x = c.input(&s, -2.0, 2.0);
        let scale = c.input(&[ch], 0.5, 1.5);
        let bias = c.input(&[ch], -1.0, 1.0);
        let mean = c.input(&[ch], -0.5, 0.5);
        let var = c.input(&[ch], 0.5, 2.0);
        vec![c.one(BatchNorm { epsilon: 1e-3 }, vec![x, scale, bias, mean, var])]
    });
}

#[test]
fn batch_norm_training() {
    check("batch_norm_train", 6, |c| {
        let mut s = c.rng.shape(2, 4, 3);
        s[0] = c.rng.int(2, 3);
        let ch = s[1];
        let x = c.input(&s, -2.0, 2.0);
        let scale = c.input(&[ch], 0.5, 1.5);
        let bias = c.input(&[ch], -1.0, 1.0);
        vec![batch_norm_train(&mut c.g, x, scale, bias, 1e-3).unwrap()]
    });
}

#[test]
fn reduce() {
    let ops = [
        (ReduceOp::Sum, -2.0, 2.0),
        (ReduceOp::Mean, -2.0, 2.0),
        (ReduceOp::SumSquare, -2.0, 2.0),
        (ReduceOp::L1, -2.0, 2.0),
        (ReduceOp::L2, -2.0, 2.0),
        (ReduceOp::LogSum, 0.5, 2.0),
        (ReduceOp::LogSumExp, -2.0, 2.0),
        (ReduceOp::Prod, 0.5, 1.5),
        (ReduceOp::Max, 0.0, 0.0),
        (ReduceOp::Min, 0.0, 0.0),
    ];
    for (op, lo, hi) in ops {
        let red = Reduce { op, axes: None, keepdims: false, noop_with_empty_axes: false };
        check(red.name(), 8, |c| {
            let s = c.rng.shape(1, 4, 4);
            let n = s.iter().product();
            let v = match op {
                ReduceOp::Max | ReduceOp::Min => c.rng.distinct(n),
                ReduceOp::L1 => c.rng.values_away(n, lo, hi, &[0.0], 0.01),
                _ => (0..n).map(|_| c.rng.uniform(lo, hi)).collect(),
            };
            let x = c.input_values(&s, v);
            let mut axes: Vec<i64> = vec![];
            for a in 0..s.len() as i64 {
                if c.rng.coin(0.5) {
                    axes.push(if c.rng.coin(0.3) { a - s.len() as i64 } else { a });
                }
            }
            let keepdims = c.rng.coin(0.5);
            let axes = if axes.is_empty() && c.rng.coin(0.5) { None } else { Some(axes) };
            let as_input = axes.as_ref().is_some_and(|a| !a.is_empty()) && c.rng.coin(0.3);
            let red =
                Reduce { op, axes: if as_input { None } else { axes.clone() }, keepdims, noop_with_empty_axes: false };
            let mut ins = vec![x];
            if as_input {
                ins.push(c.ints(axes.as_deref().unwrap_or_default()));
            }
            vec![c.one(red, ins)]
        });
    }
}

#[test]
fn global_pool() {
    for max in [false, true] {
        let name = if max { "GlobalMaxPool" } else { "GlobalAveragePool" };
        check(name, 6, |c| {
            let s = c.rng.shape(3, 4, 3);
            let n = s.iter().product();
            let v = if max { c.rng.distinct(n) } else { (0..n).map(|_| c.rng.uniform(-2.0, 2.0)).collect() };
            let x = c.input_values(&s, v);
            vec![c.one(GlobalPool { max }, vec![x])]
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Shape ops

#[test]
fn reshape_family() {
    check("Reshape", 6, |c| {
        let s = c.rng.shape(1, 4, 4);
        let x = c.input(&s, -2.0, 2.0);
        let n: usize = s.iter().product();
        let spec = c.ints(&[-1, if n.is_multiple_of(2) { 2 } else { 1 }]);
        vec![c.one(Reshape { allowzero: false }, vec![x, spec])]
    });
    check("Flatten", 6, |c| {
        let s = c.rng.shape(1, 4, 4);
        let axis = c.rng.int(0, s.len()) as i64;
        let x = c.input(&s, -2.0, 2.0);
        vec![c.one(Flatten { axis }, vec![x])]
    });
    check("Transpose", 6, |c| {
        let s = c.rng.shape(1, 4, 4);
        let mut perm: Vec<usize> = (0..s.len()).collect();
        for i in (1..perm.len()).rev() {
            let j = c.rng.int(0, i);
            perm.swap(i, j);
        }
        let x = c.input(&s, -2.0, 2.0);
        let perm = if c.rng.coin(0.2) { None } else { Some(perm) };
        vec![c.one(Transpose { perm }, vec![x])]
    });
    check("Unsqueeze", 6, |c| {
        let s = c.rng.shape(0, 3, 4);
        let x = c.input(&s, -2.0, 2.0);
        let axes = if c.rng.coin(0.5) { vec![0, -1] } else { vec![s.len() as i64] };
        vec![c.one(Unsqueeze { axes }, vec![x])]
    });
    check("Squeeze", 6, |c| {
        let mut s = c.rng.shape(1, 3, 4);
        s.insert(c.rng.int(0, s.len()), 1);
        let x = c.input(&s, -2.0, 2.0);
        let ones: Vec<i64> = s.iter().enumerate().filter(|(_, &d)| d == 1).map(|(i, _)| i as i64).collect();
        let axes = if c.rng.coin(0.5) { None } else { Some(vec![ones[0]]) };
        vec![c.one(Squeeze { axes }, vec![x])]
    });
    check("Expand", 6, |c| {
        let (sx, _) = broadcast_pair(&mut c.rng);
        let mut target: Vec<usize> = sx.iter().map(|&d| if d == 1 { c.rng.int(1, 3) } else { d }).collect();
        if c.rng.coin(0.5) {
            target.insert(0, c.rng.int(1, 3));
        }
        let x = c.input(&sx, -2.0, 2.0);
        let t: Vec<i64> = target.iter().map(|&d| d as i64).collect();
        let t = c.ints(&t);
        vec![c.one(Expand, vec![x, t])]
    });
}

#[test]
fn concat_split() {
    check("Concat", 8, |c| {
        let s = c.rng.shape(1, 3, 4);
        let axis = c.rng.int(0, s.len() - 1);
        let parts = c.rng.int(1, 3);
        let ins: Vec<OutletId> = (0..parts)
            .map(|_| {
                let mut si = s.clone();
                si[axis] = c.rng.int(1, 3);
                c.input(&si, -2.0, 2.0)
            })
            .collect();
        let axis = if c.rng.coin(0.3) { axis as i64 - s.len() as i64 } else { axis as i64 };
        vec![c.one(Concat { axis }, ins)]
    });
    check("Split", 8, |c| {
        let s = c.rng.shape(1, 3, 5);
        let axis = c.rng.int(0, s.len() - 1);
        let parts = c.rng.int(1, s[axis].min(3));
        let x = c.input(&s, -2.0, 2.0);
        let outs = c.node(Split { axis: axis as i64, split: None, num_outputs: parts }, vec![x]);
        // Only some parts reach the loss: the others' gradients are zeros.
        let used: Vec<OutletId> = outs.iter().copied().filter(|_| c.rng.coin(0.6)).collect();
        if used.is_empty() {
            vec![outs[0]]
        } else {
            used
        }
    });
}

#[test]
fn slice() {
    check("Slice", 24, |c| {
        let s = c.rng.shape(1, 3, 6);
        let x = c.input(&s, -2.0, 2.0);
        let naxes = c.rng.int(1, s.len());
        let mut axes: Vec<i64> = (0..s.len() as i64).collect();
        for i in (1..axes.len()).rev() {
            let j = c.rng.int(0, i);
            axes.swap(i, j);
        }
        axes.truncate(naxes);
        let (mut starts, mut ends, mut steps) = (vec![], vec![], vec![]);
        for &a in &axes {
            let d = s[a as usize] as i64;
            let step = [1, 1, 2, 3, -1, -2][c.rng.int(0, 5)];
            let st = c.rng.int(0, d as usize) as i64 - if c.rng.coin(0.3) { d } else { 0 };
            let mut en = c.rng.int(0, d as usize) as i64 - if c.rng.coin(0.3) { d } else { 0 };
            if c.rng.coin(0.2) {
                en = if step > 0 { i64::MAX } else { i64::MIN };
            }
            starts.push(st);
            ends.push(en);
            steps.push(step);
        }
        let ins = vec![x, c.ints(&starts), c.ints(&ends), c.ints(&axes), c.ints(&steps)];
        vec![c.one(Slice, ins)]
    });
}

#[test]
fn pad_tile() {
    check("Pad", 8, |c| {
        let s = c.rng.shape(1, 3, 4);
        let x = c.input(&s, -2.0, 2.0);
        let r = s.len();
        // Begin and end pads, some negative (cropping) but leaving at least one element.
        let mut pads = vec![0i64; 2 * r];
        for a in 0..r {
            let crop = (s[a] as i64 - 1).min(1);
            pads[a] = c.rng.int(0, 2) as i64 - if c.rng.coin(0.3) { crop } else { 0 };
            pads[a + r] = c.rng.int(0, 2) as i64 - if c.rng.coin(0.3) && pads[a] >= 0 { crop } else { 0 };
        }
        let pads = c.ints(&pads);
        let value = c.input(&[], -1.0, 1.0);
        vec![c.one(Pad { mode: PadMode::Constant }, vec![x, pads, value])]
    });
    check("Pad (axes)", 4, |c| {
        let s = c.rng.shape(2, 3, 4);
        let x = c.input(&s, -2.0, 2.0);
        let pads = c.ints(&[1, 2]);
        let zero = c.scalar(0.0);
        let axes = c.ints(&[-1]);
        vec![c.one(Pad { mode: PadMode::Constant }, vec![x, pads, zero, axes])]
    });
    check("Tile", 8, |c| {
        let s = c.rng.shape(1, 3, 3);
        let x = c.input(&s, -2.0, 2.0);
        let reps: Vec<i64> = s.iter().map(|_| c.rng.int(1, 3) as i64).collect();
        let reps = c.ints(&reps);
        vec![c.one(Tile, vec![x, reps])]
    });
}

// ---------------------------------------------------------------------------------------------
// Structure: fan-out, unreachable parameters, errors, symbolic dims

#[test]
fn fan_out_accumulates() {
    // x feeds Mul (twice), Exp and a Reshape / ReduceSum chain: its gradient sums all four.
    check("fan-out", 4, |c| {
        let s = c.rng.shape(1, 3, 4);
        let x = c.input(&s, -1.0, 1.0);
        let w = c.input(&s, -1.0, 1.0);
        let sq = c.one(Binary(BinaryOp::Mul), vec![x, x]);
        let ex = c.one(Unary(UnaryOp::Exp), vec![x]);
        let xw = c.one(Binary(BinaryOp::Mul), vec![x, w]);
        let a = c.one(Binary(BinaryOp::Add), vec![sq, ex]);
        let b = c.one(Binary(BinaryOp::Sub), vec![a, xw]);
        let red = Reduce { op: ReduceOp::Sum, axes: None, keepdims: true, noop_with_empty_axes: false };
        let total = c.one(red, vec![x]);
        vec![b, total, xw]
    });
    // Exact: d/dx of sum(x*x + x) at x = [1, 2] is 2x + 1.
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::known(DType::F64, &[2])).unwrap();
    let sq = g.add_node("sq", Binary(BinaryOp::Mul), vec![x, x]).unwrap()[0];
    let s = g.add_node("s", Binary(BinaryOp::Add), vec![sq, x]).unwrap()[0];
    let red = Reduce { op: ReduceOp::Sum, axes: None, keepdims: false, noop_with_empty_axes: false };
    let loss = g.add_node("loss", red, vec![s]).unwrap()[0];
    let d = differentiate(&mut g, loss, &[x]).unwrap();
    g.add_output("dx", d[0]);
    let out = g.eval(vec![("x".into(), tensor(&[2], vec![1.0, 2.0]))]).unwrap();
    assert_eq!(out[0].to_f64_vec(), vec![3.0, 5.0]);
}

#[test]
fn unreachable_parameters_get_zeros() {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::new(DType::F64, vec![Dim::sym("batch"), Dim::Known(3)])).unwrap();
    let used = g.add_input("used", Fact::known(DType::F64, &[3])).unwrap();
    let unused = g.add_input("unused", Fact::known(DType::F64, &[2, 2])).unwrap();
    let unused_sym = g.add_input("unused_sym", Fact::new(DType::F64, vec![Dim::sym("batch"), Dim::Known(2)])).unwrap();
    // Reaches the loss only through a Shape (no gradient flows through it).
    let through_shape = g.add_input("through_shape", Fact::known(DType::F64, &[4])).unwrap();
    let sh = g.add_node("sh", Shape { start: 0, end: None }, vec![through_shape]).unwrap()[0];
    let shf = g.add_node("shf", Cast { to: DType::F64 }, vec![sh]).unwrap()[0];
    let m = g.add_node("m", Binary(BinaryOp::Mul), vec![x, used]).unwrap()[0];
    let m2 = g.add_node("m2", Binary(BinaryOp::Mul), vec![m, shf]).unwrap()[0];
    let red = Reduce { op: ReduceOp::Sum, axes: None, keepdims: false, noop_with_empty_axes: false };
    let loss = g.add_node("loss", red, vec![m2]).unwrap()[0];
    let before = g.nodes().len();
    let grads = differentiate(&mut g, loss, &[used, unused, unused_sym, through_shape]).unwrap();
    // Nothing is emitted for x's gradient (not asked for) beyond what `used` needs.
    assert!(g.nodes()[before..].iter().all(|n| n.name.starts_with("grad/")), "backward nodes are named grad/...");
    for (k, gr) in grads.iter().enumerate() {
        g.add_output(&format!("g{k}"), *gr);
    }
    g.check_consistency().unwrap();
    let out = g
        .eval(vec![
            ("x".into(), tensor(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0])),
            ("used".into(), tensor(&[3], vec![1.0, 1.0, 1.0])),
            ("unused".into(), tensor(&[2, 2], vec![1.0; 4])),
            ("unused_sym".into(), tensor(&[2, 2], vec![1.0; 4])),
            ("through_shape".into(), tensor(&[4], vec![1.0; 4])),
        ])
        .unwrap();
    assert_eq!(out[0].to_f64_vec(), vec![20.0, 28.0, 36.0]);
    assert_eq!((out[1].shape(), out[1].to_f64_vec()), (&[2usize, 2][..], vec![0.0; 4]));
    assert_eq!((out[2].shape(), out[2].to_f64_vec()), (&[2usize, 2][..], vec![0.0; 4]));
    assert_eq!((out[3].shape(), out[3].to_f64_vec()), (&[4usize][..], vec![0.0; 4]));
}

#[test]
fn missing_backward_names_node_and_op() {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::known(DType::F64, &[4])).unwrap();
    let d = g.add_const("d", Tensor::scalar(1.5f64)).unwrap();
    let m = g.add_node("the_mod", Binary(BinaryOp::Mod { fmod: true }), vec![x, d]).unwrap()[0];
    let red = Reduce { op: ReduceOp::Sum, axes: None, keepdims: false, noop_with_empty_axes: false };
    let loss = g.add_node("loss", red, vec![m]).unwrap()[0];
    let err = differentiate(&mut g, loss, &[x]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, IrError::Node { .. }), "{msg}");
    assert!(msg.contains("the_mod") && msg.contains("Mod") && msg.contains("no backward"), "{msg}");

    // A non-scalar loss and a non-float wrt are rejected with a message.
    let mut g2 = Graph::default();
    let x = g2.add_input("x", Fact::known(DType::F64, &[4])).unwrap();
    let e = differentiate(&mut g2, x, &[x]).unwrap_err().to_string();
    assert!(e.contains("scalar"), "{e}");
    let i = g2.add_input("i", Fact::known(DType::I64, &[])).unwrap();
    let e = differentiate(&mut g2, i, &[x]).unwrap_err().to_string();
    assert!(e.contains("float"), "{e}");
}

/// A small classifier with a symbolic batch: y = softmax-free logits of relu-free layers so it
/// needs only rules of this file's first part: mean over batch of ((x W + b) * (x W + b)).
fn symbolic_model() -> (Graph, OutletId, Vec<OutletId>) {
    let mut g = Graph::default();
    let batch = Dim::sym("batch");
    let x = g.add_input("x", Fact::new(DType::F64, vec![batch.clone(), Dim::Known(2), Dim::Known(3)])).unwrap();
    let w = g.add_input("w", Fact::known(DType::F64, &[3, 4])).unwrap();
    let b = g.add_input("b", Fact::known(DType::F64, &[4])).unwrap();
    let h = g.add_node("fc", MatMul, vec![x, w]).unwrap()[0];
    let h = g.add_node("bias", Binary(BinaryOp::Add), vec![h, b]).unwrap()[0];
    let sq = g.add_node("sq", Binary(BinaryOp::Mul), vec![h, h]).unwrap()[0];
    // Flatten the batch away through a Reshape whose spec keeps the symbolic dim (-1).
    let spec = g.add_const("spec", Tensor::from_vec(vec![2], vec![-1i64, 8]).unwrap()).unwrap();
    let flat = g.add_node("flat", Reshape { allowzero: false }, vec![sq, spec]).unwrap()[0];
    let red = Reduce { op: ReduceOp::Mean, axes: None, keepdims: false, noop_with_empty_axes: false };
    let loss = g.add_node("loss", red, vec![flat]).unwrap()[0];
    (g, loss, vec![x, w, b])
}

#[test]
fn symbolic_batch() {
    let (mut g, loss, wrt) = symbolic_model();
    let forward = {
        let mut f = g.clone();
        f.add_output("loss", loss);
        f
    };
    let grads = differentiate(&mut g, loss, &wrt).unwrap();
    g.add_output("loss", loss);
    for (k, gr) in grads.iter().enumerate() {
        g.add_output(&format!("g{k}"), *gr);
    }
    g.check_consistency().unwrap();
    let mut rng = Rng::new(7);
    for batch in [1usize, 3, 5] {
        let feeds = vec![
            ("x".to_string(), tensor(&[batch, 2, 3], (0..batch * 6).map(|_| rng.uniform(-1.0, 1.0)).collect())),
            ("w".to_string(), tensor(&[3, 4], (0..12).map(|_| rng.uniform(-1.0, 1.0)).collect())),
            ("b".to_string(), tensor(&[4], (0..4).map(|_| rng.uniform(-1.0, 1.0)).collect())),
        ];
        // The symbolic graph evaluates at any batch, and its specialised copy gives the same.
        let direct = g.eval(feeds.clone()).unwrap();
        let shapes: Vec<Vec<usize>> = feeds.iter().map(|(_, t)| t.shape().to_vec()).collect();
        let special = g.specialized(&shapes).unwrap();
        special.check_consistency().unwrap();
        let folded = special.eval(feeds.clone()).unwrap();
        for (a, b) in direct.iter().zip(&folded) {
            assert_eq!(a.shape(), b.shape());
            assert!(a.max_abs_diff(b).unwrap() < 1e-12);
        }
        // And it matches central differences.
        let mut worst: f64 = 0.0;
        for (k, (_, t)) in feeds.iter().enumerate() {
            let base = t.to_f64_vec();
            let a = direct[k + 1].to_f64_vec();
            assert_eq!(direct[k + 1].shape(), t.shape());
            for j in 0..base.len() {
                let at = |delta: f64| {
                    let mut v = base.clone();
                    v[j] += delta;
                    let mut f = feeds.clone();
                    f[k].1 = tensor(t.shape(), v);
                    forward.eval(f).unwrap()[0].to_f64_vec()[0]
                };
                let n = (at(STEP) - at(-STEP)) / (2.0 * STEP);
                worst = worst.max((a[j] - n).abs() / 1f64.max(a[j].abs()).max(n.abs()));
            }
        }
        assert!(worst <= TOLERANCE, "batch {batch}: {worst:e}");
        println!("gradcheck symbolic batch={batch:<12} max rel err {worst:.2e}");
    }
}

#[test]
fn gradients_have_input_dtype_and_names() {
    let (mut g, loss, wrt) = symbolic_model();
    let before = g.nodes().len();
    let grads = differentiate(&mut g, loss, &wrt).unwrap();
    for (w, gr) in wrt.iter().zip(&grads) {
        assert_eq!(g.fact(*gr).dtype, g.fact(*w).dtype);
        assert_eq!(g.fact(*gr).rank(), g.fact(*w).rank());
    }
    // Parameters' gradients keep known shapes, the input's keeps its symbolic batch dim.
    assert_eq!(g.fact(grads[1]).shape, vec![Dim::Known(3), Dim::Known(4)]);
    assert_eq!(g.fact(grads[2]).shape, vec![Dim::Known(4)]);
    let names: std::collections::HashSet<&str> = g.nodes()[before..].iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names.len(), g.nodes().len() - before, "backward node names are unique");
    assert!(names.iter().any(|n| n.starts_with("grad/fc/")));
}

// ---------------------------------------------------------------------------------------------
// Ops whose backward is a gradient op

#[test]
fn unary() {
    use UnaryOp::*;
    // (op, value range, kinks to stay away from)
    let ops: Vec<(UnaryOp, f64, f64, Vec<f64>)> = vec![
        (Neg, -2.0, 2.0, vec![]),
        (Abs, -2.0, 2.0, vec![0.0]),
        (Sqrt, 0.3, 3.0, vec![]),
        (Reciprocal, -2.0, 2.0, vec![0.0]),
        (Exp, -2.0, 2.0, vec![]),
        (Log, 0.3, 3.0, vec![]),
        (Erf, -2.0, 2.0, vec![]),
        (Tanh, -2.0, 2.0, vec![]),
        (Sigmoid, -4.0, 4.0, vec![]),
        (Relu, -2.0, 2.0, vec![0.0]),
        (Softplus, -3.0, 3.0, vec![]),
        (LeakyRelu { alpha: 0.1 }, -2.0, 2.0, vec![0.0]),
        (Elu { alpha: 0.7 }, -2.0, 2.0, vec![0.0]),
        (HardSigmoid { alpha: 0.2, beta: 0.5 }, -4.0, 4.0, vec![-2.5, 2.5]),
        (HardSwish, -4.5, 4.5, vec![-3.0, 3.0]),
        (Gelu { tanh: false }, -3.0, 3.0, vec![]),
        (Gelu { tanh: true }, -3.0, 3.0, vec![]),
        (Sin, -3.0, 3.0, vec![]),
        (Cos, -3.0, 3.0, vec![]),
    ];
    for (op, lo, hi, kinks) in ops {
        let name = format!("{op:?}");
        check(&name, 4, |c| {
            let s = c.rng.shape(0, 3, 4);
            let n = s.iter().product();
            let gap = if kinks.is_empty() { 0.0 } else { 0.01 };
            let v = c.rng.values_away(n, lo, hi, &kinks, gap);
            let x = c.input_values(&s, v);
            vec![c.one(Unary(op), vec![x])]
        });
    }
}

#[test]
fn piecewise_constant_unary_is_an_error() {
    let mut g = Graph::default();
    let x = g.add_input("x", Fact::known(DType::F64, &[3])).unwrap();
    let r = g.add_node("rounding", Unary(UnaryOp::Round), vec![x]).unwrap()[0];
    let red = Reduce { op: ReduceOp::Sum, axes: None, keepdims: false, noop_with_empty_axes: false };
    let loss = g.add_node("loss", red, vec![r]).unwrap()[0];
    let msg = differentiate(&mut g, loss, &[x]).unwrap_err().to_string();
    assert!(msg.contains("rounding") && msg.contains("Round"), "{msg}");
}

#[test]
fn softmax() {
    for log in [false, true] {
        let name = if log { "LogSoftmax" } else { "Softmax" };
        check(name, 8, |c| {
            let s = c.rng.shape(1, 4, 4);
            let x = c.input(&s, -3.0, 3.0);
            let r = s.len() as i64;
            let axis = c.rng.int(0, s.len() - 1) as i64 - if c.rng.coin(0.3) { r } else { 0 };
            let legacy_2d = c.rng.coin(0.3);
            let y = if log {
                c.one(LogSoftmax { axis, legacy_2d }, vec![x])
            } else {
                c.one(Softmax { axis, legacy_2d }, vec![x])
            };
            vec![y]
        });
    }
}

#[test]
fn layer_norm() {
    check("LayerNormalization", 10, |c| {
        let s = c.rng.shape(1, 4, 4);
        let axis = c.rng.int(0, s.len() - 1);
        let x = c.input(&s, -2.0, 2.0);
        // Scale over the normalised dims (sometimes with some set to 1 or fewer of them).
        let tail = &s[axis..];
        let keep = c.rng.int(1, tail.len());
        let ps: Vec<usize> = tail[tail.len() - keep..].iter().map(|&d| if c.rng.coin(0.2) { 1 } else { d }).collect();
        let scale = c.input(&ps, 0.5, 1.5);
        let mut ins = vec![x, scale];
        if c.rng.coin(0.7) {
            ins.push(c.input(&ps, -1.0, 1.0));
        }
        let axis = if c.rng.coin(0.3) { axis as i64 - s.len() as i64 } else { axis as i64 };
        vec![c.one(LayerNorm::new(axis, 1e-3), ins)]
    });
}

#[test]
fn conv() {
    check("Conv", 12, |c| {
        let spatial = c.rng.int(1, 2);
        let group = [1, 1, 2][c.rng.int(0, 2)];
        let (cin, cout) = (group * c.rng.int(1, 2), group * c.rng.int(1, 2));
        let kernel: Vec<usize> = (0..spatial).map(|_| c.rng.int(1, 3)).collect();
        let strides: Vec<usize> = (0..spatial).map(|_| c.rng.int(1, 2)).collect();
        let dilations: Vec<usize> = (0..spatial).map(|_| c.rng.int(1, 2)).collect();
        let pads: Vec<usize> = (0..2 * spatial).map(|_| c.rng.int(0, 1)).collect();
        let mut xs = vec![c.rng.int(1, 2), cin];
        for d in 0..spatial {
            xs.push((kernel[d] - 1) * dilations[d] + c.rng.int(1, 4));
        }
        let mut ws = vec![cout, cin / group];
        ws.extend(&kernel);
        let x = c.input(&xs, -1.0, 1.0);
        let w = c.input(&ws, -1.0, 1.0);
        let mut ins = vec![x, w];
        if c.rng.coin(0.6) {
            ins.push(c.input(&[cout], -1.0, 1.0));
        }
        let attrs = ConvAttrs { kernel_shape: None, strides, pads, dilations, group, auto_pad: AutoPad::NotSet };
        vec![c.one(Conv { attrs }, ins)]
    });
}

#[test]
fn pool() {
    for kind in
        [PoolKind::Max, PoolKind::Average { count_include_pad: false }, PoolKind::Average { count_include_pad: true }]
    {
        let name = match kind {
            PoolKind::Max => "MaxPool".to_string(),
            PoolKind::Average { count_include_pad } => format!("AveragePool include_pad={count_include_pad}"),
        };
        check(&name, 8, |c| {
            let spatial = c.rng.int(1, 2);
            let kernel: Vec<usize> = (0..spatial).map(|_| c.rng.int(1, 3)).collect();
            let strides: Vec<usize> = (0..spatial).map(|_| c.rng.int(1, 2)).collect();
            let pads: Vec<usize> = (0..2 * spatial).map(|i| c.rng.int(0, 1).min(kernel[i % spatial] - 1)).collect();
            let mut xs = vec![c.rng.int(1, 2), c.rng.int(1, 2)];
            xs.extend(kernel.iter().map(|&k| k + c.rng.int(0, 3)));
            let n = xs.iter().product();
            let v = if kind == PoolKind::Max {
                c.rng.distinct(n)
            } else {
                (0..n).map(|_| c.rng.uniform(-1.0, 1.0)).collect()
            };
            let x = c.input_values(&xs, v);
            let attrs = PoolAttrs { kernel_shape: kernel, strides, pads, ..Default::default() };
            vec![c.one(Pool { kind, attrs }, vec![x])]
        });
    }
}

#[test]
fn gather() {
    check("Gather", 10, |c| {
        let s = c.rng.shape(1, 3, 4);
        let axis = c.rng.int(0, s.len() - 1);
        let d = s[axis] as i64;
        let x = c.input(&s, -2.0, 2.0);
        let is = c.rng.shape(0, 2, 3);
        let n = is.iter().product();
        // Repeats and negative indices included.
        let idx: Vec<i64> =
            (0..n).map(|_| c.rng.int(0, d as usize - 1) as i64 - if c.rng.coin(0.3) { d } else { 0 }).collect();
        let idx = c.konst(Tensor::from_vec(is, idx).unwrap());
        let axis = if c.rng.coin(0.3) { axis as i64 - s.len() as i64 } else { axis as i64 };
        vec![c.one(Gather { axis }, vec![x, idx])]
    });
}

/// FakeQuant is piecewise constant in x, so central differences cannot check it: its gradient is
/// checked against the straight-through estimator and the LSQ step-size formula, computed here.
#[test]
fn fake_quant_gradient_is_ste_and_lsq() {
    let mut rng = Rng::new(11);
    let mut worst: f64 = 0.0;
    for case in 0..6 {
        let per_channel = case % 2 == 1;
        let (qmin, qmax) = if case < 4 { (-128, 127) } else { (0, 255) };
        let s = vec![2, 3, 4];
        let n: usize = s.iter().product();
        let channels = s[1];
        let scales: Vec<f64> = (0..if per_channel { channels } else { 1 }).map(|_| rng.uniform(0.005, 0.03)).collect();
        let zps: Vec<f64> = scales.iter().map(|_| if qmin == 0 { rng.int(100, 150) as f64 } else { 0.0 }).collect();
        // Values across and beyond the representable range, away from rounding edges.
        let xv: Vec<f64> = (0..n)
            .map(|i| {
                let ch = if per_channel { (i / 4) % channels } else { 0 };
                let q = rng.uniform(-200.0, 200.0).round() + rng.uniform(-0.4, 0.4);
                q * scales[ch]
            })
            .collect();
        let rv: Vec<f64> = (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect();
        let mut g = Graph::default();
        let x = g.add_input("x", Fact::known(DType::F64, &s)).unwrap();
        let sshape = if per_channel { vec![channels] } else { vec![] };
        let sc = g.add_input("scale", Fact::known(DType::F64, &sshape)).unwrap();
        let zp = g.add_const("zp", tensor(&sshape, zps.clone())).unwrap();
        let axis = per_channel.then_some(1);
        let y = g.add_node("fq", FakeQuant { qmin, qmax, axis }, vec![x, sc, zp]).unwrap()[0];
        let r = g.add_const("r", tensor(&s, rv.clone())).unwrap();
        let p = g.add_node("p", Binary(BinaryOp::Mul), vec![y, r]).unwrap()[0];
        let red = Reduce { op: ReduceOp::Sum, axes: None, keepdims: false, noop_with_empty_axes: false };
        let loss = g.add_node("loss", red, vec![p]).unwrap()[0];
        let grads = differentiate(&mut g, loss, &[x, sc]).unwrap();
        g.add_output("dx", grads[0]);
        g.add_output("dscale", grads[1]);
        let out = g
            .eval(vec![("x".into(), tensor(&s, xv.clone())), ("scale".into(), tensor(&sshape, scales.clone()))])
            .unwrap();
        let (dx, ds) = (out[0].to_f64_vec(), out[1].to_f64_vec());
        let mut want_ds = vec![0.0; scales.len()];
        for i in 0..n {
            let ch = if per_channel { (i / 4) % channels } else { 0 };
            let v = xv[i] / scales[ch];
            let q = v.round() + zps[ch];
            let (want_dx, dyds) = if q < f64::from(qmin) {
                (0.0, f64::from(qmin) - zps[ch])
            } else if q > f64::from(qmax) {
                (0.0, f64::from(qmax) - zps[ch])
            } else {
                (rv[i], v.round() - v)
            };
            worst = worst.max((dx[i] - want_dx).abs());
            want_ds[ch] += rv[i] * dyds;
        }
        for (a, b) in ds.iter().zip(&want_ds) {
            worst = worst.max((a - b).abs() / 1f64.max(a.abs()).max(b.abs()));
        }
    }
    assert!(worst <= 1e-9, "{worst:e}");
    println!("gradcheck {:<24} max rel err {worst:.2e} over 6 cases (against STE / LSQ)", "FakeQuant");
}

// ---------------------------------------------------------------------------------------------
// Whole models with a symbolic batch

/// Mean cross-entropy of `logits` `[batch, classes]` against one-hot `targets` (same shape).
fn cross_entropy(c: &mut Case, logits: OutletId, targets: OutletId) -> OutletId {
    let logp = c.one(LogSoftmax { axis: -1, legacy_2d: false }, vec![logits]);
    let picked = c.one(Binary(BinaryOp::Mul), vec![logp, targets]);
    let per_row = c.one(
        Reduce { op: ReduceOp::Sum, axes: Some(vec![1]), keepdims: false, noop_with_empty_axes: false },
        vec![picked],
    );
    let mean =
        c.one(Reduce { op: ReduceOp::Mean, axes: None, keepdims: false, noop_with_empty_axes: false }, vec![per_row]);
    c.one(Unary(UnaryOp::Neg), vec![mean])
}

fn one_hot(c: &mut Case, batch: usize, classes: usize) -> OutletId {
    let mut v = vec![0.0; batch * classes];
    for r in 0..batch {
        v[r * classes + c.rng.int(0, classes - 1)] = 1.0;
    }
    let name = format!("x{}", c.feeds.len());
    let o = c.g.add_input(&name, Fact::new(DType::F64, vec![Dim::sym("batch"), Dim::Known(classes)])).unwrap();
    c.feeds.push((name, tensor(&[batch, classes], v)));
    o
}

/// Conv -> batch norm (training form) -> Relu -> MaxPool -> Flatten -> Gemm -> Relu -> Gemm ->
/// cross-entropy, batch symbolic; checked as declared and after `Graph::specialized`.
#[test]
fn small_cnn_with_symbolic_batch() {
    for (k, batch) in [2usize, 3].into_iter().enumerate() {
        for specialise in [false, true] {
            let mut c = Case::new(100 + k as u64);
            let b = Dim::sym("batch");
            let x = c.input_dims(
                vec![b.clone(), Dim::Known(1), Dim::Known(6), Dim::Known(6)],
                &[batch, 1, 6, 6],
                -1.0,
                1.0,
            );
            let w1 = c.input(&[3, 1, 3, 3], -0.5, 0.5);
            let b1 = c.input(&[3], -0.1, 0.1);
            let conv = ConvAttrs { pads: vec![1, 1, 1, 1], ..Default::default() };
            let h = c.one(Conv { attrs: conv }, vec![x, w1, b1]);
            let gamma = c.input(&[3], 0.5, 1.5);
            let beta = c.input(&[3], -0.5, 0.5);
            let h = batch_norm_train(&mut c.g, h, gamma, beta, 1e-3).unwrap();
            // Shift away from 0 so no Relu input sits at its kink.
            let h = c.one(Unary(UnaryOp::Relu), vec![h]);
            let pool = PoolAttrs { kernel_shape: vec![2, 2], strides: vec![2, 2], ..Default::default() };
            let h = c.one(Pool { kind: PoolKind::Max, attrs: pool }, vec![h]);
            let h = c.one(Flatten { axis: 1 }, vec![h]);
            let w2 = c.input(&[27, 5], -0.5, 0.5);
            let b2 = c.input(&[5], -0.1, 0.1);
            let h = c.one(Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: false }, vec![h, w2, b2]);
            let h = c.one(Unary(UnaryOp::Tanh), vec![h]);
            let w3 = c.input(&[4, 5], -0.5, 0.5);
            let logits = c.one(Gemm { alpha: 1.0, beta: 1.0, trans_a: false, trans_b: true }, vec![h, w3]);
            let t = one_hot(&mut c, batch, 4);
            let loss = cross_entropy(&mut c, logits, t);
            let mut loss = loss;
            if specialise {
                // Specialising renumbers nodes: find the loss again through an output.
                c.g.add_output("loss", loss);
                let shapes: Vec<Vec<usize>> = c.feeds.iter().map(|(_, t)| t.shape().to_vec()).collect();
                c.g = c.g.specialized(&shapes).unwrap();
                loss = c.g.outputs()[0].1;
            }
            let err = gradcheck_loss(c, loss);
            assert!(err <= TOLERANCE, "batch {batch}: {err:e}");
            println!(
                "gradcheck {:<24} max rel err {err:.2e} (specialised: {specialise})",
                format!("CNN batch={batch}")
            );
        }
    }
}

/// Embedding Gather -> LayerNorm -> single-head self-attention (activation x activation
/// MatMuls, Softmax) -> residual -> GELU MLP -> mean-pooled classifier, batch and sequence
/// symbolic.
#[test]
fn attention_block_with_symbolic_dims() {
    for (k, (batch, seq)) in [(1usize, 3usize), (2, 4)].into_iter().enumerate() {
        let mut c = Case::new(200 + k as u64);
        let (bd, sd) = (Dim::sym("batch"), Dim::sym("seq"));
        let (vocab, d) = (7, 4);
        let table = c.input(&[vocab, d], -1.0, 1.0);
        let ids: Vec<i64> = (0..batch * seq).map(|_| c.rng.int(0, vocab - 1) as i64).collect();
        let ids_in = c.g.add_input("ids", Fact::new(DType::I64, vec![bd.clone(), sd.clone()])).unwrap();
        let emb = c.one(Gather { axis: 0 }, vec![table, ids_in]);
        let extra = c.input_dims(vec![bd.clone(), sd.clone(), Dim::Known(d)], &[batch, seq, d], -0.5, 0.5);
        let h = c.one(Binary(BinaryOp::Add), vec![emb, extra]);
        let ln_s = c.input(&[d], 0.5, 1.5);
        let ln_b = c.input(&[d], -0.5, 0.5);
        let h = c.one(LayerNorm::new(-1, 1e-3), vec![h, ln_s, ln_b]);
        let wq = c.input(&[d, d], -0.5, 0.5);
        let wk = c.input(&[d, d], -0.5, 0.5);
        let wv = c.input(&[d, d], -0.5, 0.5);
        let q = c.one(MatMul, vec![h, wq]);
        let kk = c.one(MatMul, vec![h, wk]);
        let v = c.one(MatMul, vec![h, wv]);
        let kt = c.one(Transpose { perm: Some(vec![0, 2, 1]) }, vec![kk]);
        let scores = c.one(MatMul, vec![q, kt]);
        let scale = c.scalar(0.5);
        let scores = c.one(Binary(BinaryOp::Mul), vec![scores, scale]);
        let att = c.one(Softmax { axis: -1, legacy_2d: false }, vec![scores]);
        let ctx = c.one(MatMul, vec![att, v]);
        let h = c.one(Binary(BinaryOp::Add), vec![h, ctx]);
        let w1 = c.input(&[d, 6], -0.5, 0.5);
        let b1 = c.input(&[6], -0.1, 0.1);
        let f = c.one(MatMul, vec![h, w1]);
        let f = c.one(Binary(BinaryOp::Add), vec![f, b1]);
        let f = c.one(Unary(UnaryOp::Gelu { tanh: false }), vec![f]);
        let pooled = c.one(
            Reduce { op: ReduceOp::Mean, axes: Some(vec![1]), keepdims: false, noop_with_empty_axes: false },
            vec![f],
        );
        let wc = c.input(&[6, 3], -0.5, 0.5);
        let logits = c.one(MatMul, vec![pooled, wc]);
        let t = one_hot(&mut c, batch, 3);
        let loss = cross_entropy(&mut c, logits, t);
        // The ids are an integer input: fed, but not differentiated.
        c.feeds.push(("ids".into(), Tensor::from_vec(vec![batch, seq], ids).unwrap()));
        let err = gradcheck_loss(c, loss);
        assert!(err <= TOLERANCE, "batch {batch} seq {seq}: {err:e}");
        println!("gradcheck {:<24} max rel err {err:.2e}", format!("attention b={batch} s={seq}"));
    }
}

/// Dims unknown when the graph is built: whether an operand was broadcast is only known at run
/// time, so the backward graph sums over such axes through run-time shapes.
#[test]
fn broadcast_decided_at_run_time() {
    let cases: [(&[usize], &[usize]); 5] =
        [(&[4, 3], &[1, 3]), (&[1, 3], &[4, 3]), (&[4, 3], &[4, 3]), (&[2, 1, 3], &[2, 5, 1]), (&[1, 1], &[3, 2])];
    let mut worst: f64 = 0.0;
    for (k, (sa, sb)) in cases.into_iter().enumerate() {
        for op in [BinaryOp::Add, BinaryOp::Mul, BinaryOp::Sub] {
            let mut c = Case::new(300 + k as u64);
            let a = c.input_dims(vec![Dim::Unknown; sa.len()], sa, -1.0, 1.0);
            let b = c.input_dims(vec![Dim::Unknown; sb.len()], sb, -1.0, 1.0);
            let y = c.one(Binary(op), vec![a, b]);
            let sq = c.one(Unary(UnaryOp::Sin), vec![y]);
            let red = Reduce { op: ReduceOp::Sum, axes: None, keepdims: false, noop_with_empty_axes: false };
            let loss = c.one(red, vec![sq]);
            worst = worst.max(gradcheck_loss(c, loss));
        }
    }
    assert!(worst <= TOLERANCE, "{worst:e}");
    println!("gradcheck {:<24} max rel err {worst:.2e} over 15 cases", "run-time broadcast");
}

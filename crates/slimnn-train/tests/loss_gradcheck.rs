//! Every loss builder differentiated by autodiff matches central finite differences in float64:
//! max over coordinates of |analytic - numeric| / max(1, |analytic|, |numeric|) <= 1e-6.

use slimnn_data::datasets::Rng;
use slimnn_ir::autodiff::differentiate;
use slimnn_ir::{Fact, Graph, IrResult, OutletId};
use slimnn_tensor::{DType, Dim, Tensor};
use slimnn_train::loss::{cosine, cross_entropy, kl_divergence, mse, LossConfig, TARGET_INPUT, TEACHER_INPUT};

const ROWS: usize = 3;
const COLS: usize = 5;

fn random(rng: &mut Rng, scale: f64) -> Vec<f64> {
    (0..ROWS * COLS).map(|_| rng.normal() * scale).collect()
}

fn tensor(v: &[f64]) -> Tensor {
    Tensor::from_f64s(DType::F64, vec![ROWS, COLS], v).unwrap()
}

/// Probability rows (softmax of random values), as cross-entropy targets.
fn probabilities(rng: &mut Rng) -> Vec<f64> {
    let v = random(rng, 1.0);
    v.chunks(COLS)
        .flat_map(|r| {
            let s: f64 = r.iter().map(|x| x.exp()).sum();
            r.iter().map(move |x| x.exp() / s).collect::<Vec<_>>()
        })
        .collect()
}

/// Builds `loss(a, b)` on two f64 inputs, differentiates it with respect to both, and compares
/// each gradient with central differences of the reference evaluator.
fn check(name: &str, build: impl Fn(&mut Graph, OutletId, OutletId) -> IrResult<OutletId>, a: &[f64], b: &[f64]) {
    let mut g = Graph::default();
    let fact = Fact::new(DType::F64, vec![Dim::sym("batch"), Dim::Known(COLS)]);
    let xa = g.add_input("a", fact.clone()).unwrap();
    let xb = g.add_input("b", fact).unwrap();
    let loss = build(&mut g, xa, xb).unwrap();
    let grads = differentiate(&mut g, loss, &[xa, xb]).unwrap();
    g.set_outputs(vec![("loss".into(), loss), ("da".into(), grads[0]), ("db".into(), grads[1])]);
    let eval = |a: &[f64], b: &[f64]| g.eval(vec![("a".into(), tensor(a)), ("b".into(), tensor(b))]).unwrap();
    let out = eval(a, b);
    let h = 1e-6;
    let mut worst = 0f64;
    for (which, analytic) in [(0, out[1].to_f64_vec()), (1, out[2].to_f64_vec())] {
        for i in 0..ROWS * COLS {
            let shifted = |d: f64| {
                let (mut a, mut b) = (a.to_vec(), b.to_vec());
                if which == 0 {
                    a[i] += d
                } else {
                    b[i] += d
                }
                eval(&a, &b)[0].to_f64_vec()[0]
            };
            let numeric = (shifted(h) - shifted(-h)) / (2.0 * h);
            let err = (analytic[i] - numeric).abs() / 1f64.max(analytic[i].abs()).max(numeric.abs());
            worst = worst.max(err);
            assert!(err <= 1e-6, "{name}: d/d{}[{i}] autodiff {} vs numeric {numeric}", ["a", "b"][which], analytic[i]);
        }
    }
    println!("{name}: max relative error {worst:.2e}");
}

#[test]
fn losses_match_finite_differences_in_f64() {
    let mut rng = Rng::new(42);
    let (logits, other) = (random(&mut rng, 2.0), random(&mut rng, 2.0));
    let target = probabilities(&mut rng);
    check("cross-entropy", cross_entropy, &logits, &target);
    check("KL T=1", |g, s, t| kl_divergence(g, s, t, 1.0), &logits, &other);
    check("KL T=3", |g, s, t| kl_divergence(g, s, t, 3.0), &logits, &other);
    check("MSE", mse, &logits, &other);
    check("cosine", cosine, &logits, &other);
}

#[test]
fn distill_config_matches_finite_differences_in_f64() {
    // alpha * CE(target) + (1 - alpha) * KL_T(teacher || student), differentiated in the student.
    let mut rng = Rng::new(7);
    let (student, teacher, target) = (random(&mut rng, 2.0), random(&mut rng, 2.0), probabilities(&mut rng));
    let config = LossConfig::Distill { temperature: 2.0, alpha: 0.3, label_smoothing: 0.0 };
    let mut g = Graph::default();
    let x = g.add_input("student", Fact::new(DType::F64, vec![Dim::sym("batch"), Dim::Known(COLS)])).unwrap();
    let loss = config.build(&mut g, x).unwrap();
    let grad = differentiate(&mut g, loss, &[x]).unwrap()[0];
    g.set_outputs(vec![("loss".into(), loss), ("grad".into(), grad)]);
    let eval = |s: &[f64]| {
        g.eval(vec![
            ("student".into(), tensor(s)),
            (TARGET_INPUT.into(), tensor(&target)),
            (TEACHER_INPUT.into(), tensor(&teacher)),
        ])
        .unwrap()
    };
    let analytic = eval(&student)[1].to_f64_vec();
    for i in 0..ROWS * COLS {
        let shifted = |d: f64| {
            let mut s = student.clone();
            s[i] += d;
            eval(&s)[0].to_f64_vec()[0]
        };
        let numeric = (shifted(1e-6) - shifted(-1e-6)) / 2e-6;
        let err = (analytic[i] - numeric).abs() / 1f64.max(analytic[i].abs()).max(numeric.abs());
        assert!(err <= 1e-6, "distill: d/dstudent[{i}] autodiff {} vs numeric {numeric}", analytic[i]);
    }
}

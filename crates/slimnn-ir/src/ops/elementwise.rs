//! Elementwise ops: unary maps, broadcasting binary ops, Where, Cast, Clip, Identity.

use super::util::{broadcast_dims, expect_inputs, next_index};
use super::OpDef;
use crate::{op_bail, Fact, IrError, IrResult};
use slimnn_tensor::{bf16, checked_numel, dispatch_dtype, f16, strides_of, DType, Dim, Element, Tensor};

/// Unary elementwise functions. Parameterised ones carry their ONNX attributes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UnaryOp {
    Neg,
    Abs,
    Sqrt,
    Reciprocal,
    Exp,
    Log,
    Erf,
    Tanh,
    Sigmoid,
    Relu,
    Not,
    Floor,
    Ceil,
    Round,
    Sign,
    Sin,
    Cos,
    Softplus,
    LeakyRelu {
        alpha: f32,
    },
    Elu {
        alpha: f32,
    },
    HardSigmoid {
        alpha: f32,
        beta: f32,
    },
    HardSwish,
    /// `approximate == "tanh"` in ONNX Gelu-20.
    Gelu {
        tanh: bool,
    },
}

/// A unary elementwise op; output has the input's dtype and shape (`Not` takes bool).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Unary(pub UnaryOp);

/// Binary elementwise functions with numpy broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    /// ONNX `Mod`; `fmod` selects C fmod semantics (sign of the dividend).
    Mod {
        fmod: bool,
    },
    /// `PRelu(x, slope)`: x if x >= 0 else slope * x.
    PRelu,
    Equal,
    Less,
    LessOrEqual,
    Greater,
    GreaterOrEqual,
    And,
    Or,
    Xor,
}

/// A broadcasting binary elementwise op. Comparisons output bool; `Pow` keeps the base dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Binary(pub BinaryOp);

/// `Where(cond, x, y)` with broadcasting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Where;

/// Converts to `to` (ONNX `Cast`; see `Tensor::cast` for the rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cast {
    pub to: DType,
}

/// `Clip(x, min, max)`: the importer always supplies both bounds (absent ones become the
/// dtype's lowest / highest value), so inputs are exactly three.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Clip;

/// Passes its input through (also what inference-mode `Dropout` imports as).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity;

// ---------------------------------------------------------------------------------------------
// Shared helpers (also used by the other op families).

/// A plain element type with typed access to tensors (the tensor crate keeps its own
/// conversion trait private, so generic op code goes through this one).
pub(crate) trait Elem: Element + PartialOrd {
    fn slice(t: &Tensor) -> IrResult<&[Self]>;
    fn tensor(shape: Vec<usize>, values: Vec<Self>) -> IrResult<Tensor>;
}

macro_rules! elem {
    ($($t:ty),*) => {$(
        impl Elem for $t {
            fn slice(t: &Tensor) -> IrResult<&[Self]> {
                Ok(t.as_slice::<$t>()?)
            }
            fn tensor(shape: Vec<usize>, values: Vec<Self>) -> IrResult<Tensor> {
                Ok(Tensor::from_vec(shape, values)?)
            }
        }
    )*};
}
elem!(f32, f64, f16, bf16, i8, u8, i16, i32, i64, bool);

/// Float or integer (what ONNX calls "numeric").
pub(crate) fn is_numeric(dt: DType) -> bool {
    dt.is_float() || dt.is_integer()
}

/// A walk over the output of a numpy broadcast. Size-1 axes are dropped and adjacent axes
/// merged where every input's strides allow, so inner runs are as long as possible.
pub(crate) struct Broadcast {
    /// The broadcast output shape.
    pub shape: Vec<usize>,
    dims: Vec<usize>,
    /// Per input, its element stride along each of `dims` (0 on broadcast axes).
    strides: Vec<Vec<usize>>,
}

impl Broadcast {
    pub fn new(op: &'static str, shapes: &[&[usize]]) -> IrResult<Broadcast> {
        let rank = shapes.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut shape = vec![1usize; rank];
        for s in shapes {
            for (i, &d) in s.iter().enumerate() {
                let o = &mut shape[rank - s.len() + i];
                if *o == 1 {
                    *o = d;
                } else if d != 1 && d != *o {
                    let all: Vec<String> = shapes.iter().map(|s| format!("{s:?}")).collect();
                    op_bail!(op, "cannot broadcast shapes {}", all.join(" and "));
                }
            }
        }
        let full: Vec<Vec<usize>> = shapes
            .iter()
            .map(|s| {
                let st = strides_of(s);
                (0..rank)
                    .map(|ax| match ax.checked_sub(rank - s.len()) {
                        Some(i) if s[i] != 1 => st[i],
                        _ => 0,
                    })
                    .collect()
            })
            .collect();
        let mut dims: Vec<usize> = Vec::new();
        let mut strides = vec![Vec::new(); shapes.len()];
        for ax in 0..rank {
            if shape[ax] == 1 {
                continue;
            }
            // Axis `ax` continues the previous kept axis when, for every input, stepping the
            // previous axis equals stepping `ax` over its whole length.
            let merge =
                !dims.is_empty() && full.iter().zip(&strides).all(|(f, s)| s.last() == Some(&(f[ax] * shape[ax])));
            if let (true, Some(last)) = (merge, dims.last_mut()) {
                *last *= shape[ax];
                for (f, s) in full.iter().zip(strides.iter_mut()) {
                    if let Some(l) = s.last_mut() {
                        *l = f[ax];
                    }
                }
            } else {
                dims.push(shape[ax]);
                for (f, s) in full.iter().zip(strides.iter_mut()) {
                    s.push(f[ax]);
                }
            }
        }
        Ok(Broadcast { shape, dims, strides })
    }

    /// Input `k`'s stride along the innermost run.
    pub fn inner_stride(&self, k: usize) -> usize {
        self.strides[k].last().copied().unwrap_or(0)
    }

    /// Calls `f(offsets, len)` for each run of `len` consecutive output elements, in output
    /// order; `offsets[k]` is input `k`'s flat index of the run's first element.
    pub fn for_each_run(&self, mut f: impl FnMut(&[usize], usize)) {
        if self.shape.contains(&0) {
            return;
        }
        let n_in = self.strides.len();
        let Some((&len, outer)) = self.dims.split_last() else {
            f(&vec![0; n_in], 1);
            return;
        };
        let mut idx = vec![0; outer.len()];
        let mut offs = vec![0; n_in];
        loop {
            for (o, st) in offs.iter_mut().zip(&self.strides) {
                *o = idx.iter().zip(st).map(|(i, s)| i * s).sum();
            }
            f(&offs, len);
            if !next_index(&mut idx, outer) {
                break;
            }
        }
    }
}

/// `f` applied to the numpy broadcast of `a` (shape `sa`) and `b` (shape `sb`).
pub(crate) fn broadcast_map2<A: Copy, B: Copy, O: Element>(
    op: &'static str,
    (a, sa): (&[A], &[usize]),
    (b, sb): (&[B], &[usize]),
    mut f: impl FnMut(A, B) -> O,
) -> IrResult<(Vec<usize>, Vec<O>)> {
    if sa == sb {
        return Ok((sa.to_vec(), a.iter().zip(b).map(|(&x, &y)| f(x, y)).collect()));
    }
    let plan = Broadcast::new(op, &[sa, sb])?;
    let mut out = Vec::with_capacity(checked_numel(&plan.shape, O::DTYPE)?);
    let (ia, ib) = (plan.inner_stride(0), plan.inner_stride(1));
    plan.for_each_run(|o, len| {
        let (a, b) = (&a[o[0]..], &b[o[1]..]);
        match (ia, ib) {
            (1, 1) => out.extend(a[..len].iter().zip(&b[..len]).map(|(&x, &y)| f(x, y))),
            (1, 0) => out.extend(a[..len].iter().map(|&x| f(x, b[0]))),
            (0, 1) => out.extend(b[..len].iter().map(|&y| f(a[0], y))),
            _ => out.extend((0..len).map(|j| f(a[j * ia], b[j * ib]))),
        }
    });
    Ok((plan.shape, out))
}

/// `f` applied to the numpy broadcast of three inputs.
pub(crate) fn broadcast_map3<A: Copy, B: Copy, C: Copy, O: Element>(
    op: &'static str,
    (a, sa): (&[A], &[usize]),
    (b, sb): (&[B], &[usize]),
    (c, sc): (&[C], &[usize]),
    mut f: impl FnMut(A, B, C) -> O,
) -> IrResult<(Vec<usize>, Vec<O>)> {
    let plan = Broadcast::new(op, &[sa, sb, sc])?;
    let mut out = Vec::with_capacity(checked_numel(&plan.shape, O::DTYPE)?);
    let (ia, ib, ic) = (plan.inner_stride(0), plan.inner_stride(1), plan.inner_stride(2));
    plan.for_each_run(|o, len| {
        let (a, b, c) = (&a[o[0]..], &b[o[1]..], &c[o[2]..]);
        out.extend((0..len).map(|j| f(a[j * ia], b[j * ib], c[j * ic])));
    });
    Ok((plan.shape, out))
}

/// Error function for f64, accurate to a few ulps: a positive-term series for |x| < 3 (no
/// cancellation), a continued fraction for erfc beyond, and ±1 from 6 on (erfc(6) < 2^-55).
pub(crate) fn erf(x: f64) -> f64 {
    let a = x.abs();
    if x.is_nan() {
        return x;
    }
    let r = if a < 3.0 {
        // erf(a) = 2/sqrt(pi) * exp(-a^2) * sum_n (2a^2)^n a / (1*3*...*(2n+1))
        let t = 2.0 * a * a;
        let (mut term, mut sum, mut n) = (a, a, 0u32);
        while term > sum * 1e-17 && n < 400 {
            n += 1;
            term *= t / f64::from(2 * n + 1);
            sum += term;
        }
        std::f64::consts::FRAC_2_SQRT_PI * (-a * a).exp() * sum
    } else if a < 6.0 {
        // erfc(a) = exp(-a^2)/sqrt(pi) * 1/(a + (1/2)/(a + 1/(a + (3/2)/(a + ...)))),
        // evaluated bottom-up with enough terms for full precision at a >= 3.
        let mut f = a;
        for k in (1..=80).rev() {
            f = a + f64::from(k) * 0.5 / f;
        }
        1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
    } else {
        1.0
    };
    r.copysign(x)
}

// ---------------------------------------------------------------------------------------------
// Unary

impl UnaryOp {
    fn onnx_name(self) -> &'static str {
        use UnaryOp::*;
        match self {
            Neg => "Neg",
            Abs => "Abs",
            Sqrt => "Sqrt",
            Reciprocal => "Reciprocal",
            Exp => "Exp",
            Log => "Log",
            Erf => "Erf",
            Tanh => "Tanh",
            Sigmoid => "Sigmoid",
            Relu => "Relu",
            Not => "Not",
            Floor => "Floor",
            Ceil => "Ceil",
            Round => "Round",
            Sign => "Sign",
            Sin => "Sin",
            Cos => "Cos",
            Softplus => "Softplus",
            LeakyRelu { .. } => "LeakyRelu",
            Elu { .. } => "Elu",
            HardSigmoid { .. } => "HardSigmoid",
            HardSwish => "HardSwish",
            Gelu { .. } => "Gelu",
        }
    }

    /// The dtypes ONNX defines the op for.
    fn allows(self, dt: DType) -> bool {
        use UnaryOp::*;
        match self {
            Not => dt == DType::Bool,
            Abs | Sign => is_numeric(dt),
            Neg | Relu => dt.is_float() || (dt.is_integer() && dt.is_signed()),
            _ => dt.is_float(),
        }
    }

    /// The function on floats.
    fn apply_f64(self, x: f64) -> f64 {
        use UnaryOp::*;
        match self {
            Neg => -x,
            Abs => x.abs(),
            Sqrt => x.sqrt(),
            Reciprocal => 1.0 / x,
            Exp => x.exp(),
            Log => x.ln(),
            Erf => erf(x),
            Tanh => x.tanh(),
            Sigmoid => {
                // Split by sign so exp never overflows.
                if x >= 0.0 {
                    1.0 / (1.0 + (-x).exp())
                } else {
                    let e = x.exp();
                    e / (1.0 + e)
                }
            }
            Relu => {
                if x < 0.0 {
                    0.0
                } else {
                    x
                }
            }
            Not => f64::NAN,
            Floor => x.floor(),
            Ceil => x.ceil(),
            Round => x.round_ties_even(),
            Sign => {
                if x > 0.0 {
                    1.0
                } else if x < 0.0 {
                    -1.0
                } else if x == 0.0 {
                    0.0
                } else {
                    x
                }
            }
            Sin => x.sin(),
            Cos => x.cos(),
            // ln(1 + e^x) = max(x, 0) + ln(1 + e^-|x|), which never overflows.
            Softplus => x.max(0.0) + (-x.abs()).exp().ln_1p(),
            LeakyRelu { alpha } => {
                if x < 0.0 {
                    f64::from(alpha) * x
                } else {
                    x
                }
            }
            Elu { alpha } => {
                if x < 0.0 {
                    f64::from(alpha) * x.exp_m1()
                } else {
                    x
                }
            }
            HardSigmoid { alpha, beta } => (f64::from(alpha) * x + f64::from(beta)).clamp(0.0, 1.0),
            HardSwish => x * (x / 6.0 + 0.5).clamp(0.0, 1.0),
            Gelu { tanh: false } => 0.5 * x * (1.0 + erf(x * std::f64::consts::FRAC_1_SQRT_2)),
            Gelu { tanh: true } => {
                let k = (2.0 / std::f64::consts::PI).sqrt();
                0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
            }
        }
    }

    /// The function on integers (only the ops [`UnaryOp::allows`] admits for them); wraps
    /// like the integer type does once cast back.
    fn apply_i64(self, x: i64) -> i64 {
        match self {
            UnaryOp::Neg => x.wrapping_neg(),
            UnaryOp::Abs => x.wrapping_abs(),
            UnaryOp::Sign => x.signum(),
            UnaryOp::Relu => x.max(0),
            _ => 0,
        }
    }
}

fn unary_typed<T: Elem>(op: UnaryOp, x: &Tensor) -> IrResult<Tensor> {
    let v = T::slice(x)?;
    let out: Vec<T> = if T::DTYPE.is_float() {
        v.iter().map(|&e| T::from_f64(op.apply_f64(e.to_f64()))).collect()
    } else if T::DTYPE == DType::Bool {
        v.iter().map(|&e| T::from_i64(i64::from(e.to_i64() == 0))).collect()
    } else {
        v.iter().map(|&e| T::from_i64(op.apply_i64(e.to_i64()))).collect()
    };
    T::tensor(x.shape().to_vec(), out)
}

impl OpDef for Unary {
    fn name(&self) -> &'static str {
        self.0.onnx_name()
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let name = self.name();
        expect_inputs(name, inputs, 1, 1)?;
        let dt = inputs[0].dtype;
        if !self.0.allows(dt) {
            op_bail!(name, "not defined for {dt} inputs");
        }
        Ok(vec![Fact::new(dt, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        let name = self.name();
        expect_inputs(name, inputs, 1, 1)?;
        let x = inputs[0];
        let dt = x.dtype();
        if !self.0.allows(dt) {
            op_bail!(name, "not defined for {dt} inputs");
        }
        let y = dispatch_dtype!(dt, unary_typed(self.0, x), block => op_bail!(name, "not defined for {dt} inputs"))?;
        Ok(vec![y])
    }
}

// ---------------------------------------------------------------------------------------------
// Binary

impl BinaryOp {
    fn onnx_name(self) -> &'static str {
        use BinaryOp::*;
        match self {
            Add => "Add",
            Sub => "Sub",
            Mul => "Mul",
            Div => "Div",
            Pow => "Pow",
            Max => "Max",
            Min => "Min",
            Mod { .. } => "Mod",
            PRelu => "PRelu",
            Equal => "Equal",
            Less => "Less",
            LessOrEqual => "LessOrEqual",
            Greater => "Greater",
            GreaterOrEqual => "GreaterOrEqual",
            And => "And",
            Or => "Or",
            Xor => "Xor",
        }
    }

    /// Checks the input dtypes and returns the output dtype.
    fn output_dtype(self, a: DType, b: DType) -> IrResult<DType> {
        use BinaryOp::*;
        let name = self.onnx_name();
        match self {
            And | Or | Xor => {
                if a != DType::Bool || b != DType::Bool {
                    op_bail!(name, "expects bool inputs, got {a} and {b}");
                }
                return Ok(DType::Bool);
            }
            Pow => {
                if !is_numeric(a) || !is_numeric(b) {
                    op_bail!(name, "expects numeric inputs, got {a} and {b}");
                }
                return Ok(a);
            }
            _ => {}
        }
        if a != b {
            op_bail!(name, "input dtypes differ: {a} and {b}");
        }
        match self {
            Equal if !matches!(a, DType::Block(_)) => Ok(DType::Bool),
            _ if !is_numeric(a) => op_bail!(name, "not defined for {a} inputs"),
            Less | LessOrEqual | Greater | GreaterOrEqual => Ok(DType::Bool),
            Mod { fmod: false } if a.is_float() => {
                op_bail!(name, "fmod=0 is only defined for integers; {a} inputs need fmod=1")
            }
            _ => Ok(a),
        }
    }

    /// Arithmetic on floats (Add, Sub, Mul, Div, Max, Min, Mod, PRelu).
    fn apply_f64(self, x: f64, y: f64) -> f64 {
        use BinaryOp::*;
        match self {
            Add => x + y,
            Sub => x - y,
            Mul => x * y,
            Div => x / y,
            // NaN propagates, as numpy's maximum / minimum do.
            Max if x.is_nan() || y.is_nan() => f64::NAN,
            Min if x.is_nan() || y.is_nan() => f64::NAN,
            Max => x.max(y),
            Min => x.min(y),
            // Rust's float `%` is C fmod; fmod=0 is rejected for floats.
            Mod { .. } => x % y,
            PRelu => {
                if x < 0.0 {
                    y * x
                } else {
                    x
                }
            }
            _ => f64::NAN,
        }
    }

    /// Arithmetic on integers, wrapping as the integer type does once cast back; `None` on
    /// division by zero.
    fn apply_i64(self, x: i64, y: i64) -> Option<i64> {
        use BinaryOp::*;
        Some(match self {
            Add => x.wrapping_add(y),
            Sub => x.wrapping_sub(y),
            Mul => x.wrapping_mul(y),
            // Truncates toward zero, like C integer division.
            Div => {
                if y == 0 {
                    return None;
                }
                x.wrapping_div(y)
            }
            Max => x.max(y),
            Min => x.min(y),
            Mod { fmod } => {
                if y == 0 {
                    return None;
                }
                let r = x.wrapping_rem(y);
                // fmod=0 takes the divisor's sign (Python `%`).
                if !fmod && r != 0 && (r < 0) != (y < 0) {
                    r + y
                } else {
                    r
                }
            }
            PRelu => {
                if x < 0 {
                    y.wrapping_mul(x)
                } else {
                    x
                }
            }
            _ => 0,
        })
    }
}

fn arith_typed<T: Elem>(op: BinaryOp, a: &Tensor, b: &Tensor) -> IrResult<Tensor> {
    let name = op.onnx_name();
    let (x, y) = ((T::slice(a)?, a.shape()), (T::slice(b)?, b.shape()));
    let (shape, out) = if T::DTYPE.is_float() {
        broadcast_map2(name, x, y, |p: T, q: T| T::from_f64(op.apply_f64(p.to_f64(), q.to_f64())))?
    } else {
        let mut zero_div = false;
        let r = broadcast_map2(name, x, y, |p: T, q: T| match op.apply_i64(p.to_i64(), q.to_i64()) {
            Some(v) => T::from_i64(v),
            None => {
                zero_div = true;
                T::default()
            }
        })?;
        if zero_div {
            op_bail!(name, "integer division by zero");
        }
        r
    };
    T::tensor(shape, out)
}

fn compare_typed<T: Elem>(op: BinaryOp, a: &Tensor, b: &Tensor) -> IrResult<Tensor> {
    let name = op.onnx_name();
    let (x, y) = ((T::slice(a)?, a.shape()), (T::slice(b)?, b.shape()));
    // Native comparisons: IEEE semantics for floats (NaN compares false, -0 == 0).
    let (shape, out) = match op {
        BinaryOp::Equal => broadcast_map2(name, x, y, |p: T, q: T| p == q)?,
        BinaryOp::Less => broadcast_map2(name, x, y, |p: T, q: T| p < q)?,
        BinaryOp::LessOrEqual => broadcast_map2(name, x, y, |p: T, q: T| p <= q)?,
        BinaryOp::Greater => broadcast_map2(name, x, y, |p: T, q: T| p > q)?,
        _ => broadcast_map2(name, x, y, |p: T, q: T| p >= q)?,
    };
    Ok(Tensor::from_vec(shape, out)?)
}

/// `base ^ exponent` for integers: exact with wrapping for exponents >= 0; a negative exponent
/// gives the truncated reciprocal power (0 unless |base| == 1), `None` for 0 to a negative power.
fn int_pow(base: i64, exp: i64) -> Option<i64> {
    if exp < 0 {
        return match base {
            0 => None,
            1 => Some(1),
            -1 => Some(if exp % 2 == 0 { 1 } else { -1 }),
            _ => Some(0),
        };
    }
    let (mut acc, mut b, mut e) = (1i64, base, exp as u64);
    while e > 0 {
        if e & 1 == 1 {
            acc = acc.wrapping_mul(b);
        }
        b = b.wrapping_mul(b);
        e >>= 1;
    }
    Some(acc)
}

fn pow_typed<T: Elem>(a: &Tensor, b: &Tensor) -> IrResult<Tensor> {
    const NAME: &str = "Pow";
    let x = (T::slice(a)?, a.shape());
    let (shape, out) = if b.dtype().is_integer() {
        let e = b.to_i64_vec()?;
        let y = (e.as_slice(), b.shape());
        if T::DTYPE.is_float() {
            broadcast_map2(NAME, x, y, |p: T, q: i64| T::from_f64(p.to_f64().powf(q as f64)))?
        } else {
            let mut zero_neg = false;
            let r = broadcast_map2(NAME, x, y, |p: T, q: i64| {
                T::from_i64(int_pow(p.to_i64(), q).unwrap_or_else(|| {
                    zero_neg = true;
                    0
                }))
            })?;
            if zero_neg {
                op_bail!(NAME, "integer zero raised to a negative power");
            }
            r
        }
    } else {
        let e = b.to_f64_vec();
        let y = (e.as_slice(), b.shape());
        broadcast_map2(NAME, x, y, |p: T, q: f64| T::from_f64(p.to_f64().powf(q)))?
    };
    T::tensor(shape, out)
}

impl OpDef for Binary {
    fn name(&self) -> &'static str {
        self.0.onnx_name()
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        let name = self.name();
        expect_inputs(name, inputs, 2, 2)?;
        let (a, b) = (inputs[0], inputs[1]);
        let dt = self.0.output_dtype(a.dtype, b.dtype)?;
        let mut shape = broadcast_dims(name, &a.shape, &b.shape)?;
        if self.0 == BinaryOp::PRelu {
            // The slope broadcasts to X, never the other way round.
            let grows = b.rank() > a.rank()
                || a.shape.iter().zip(&shape).any(|(x, o)| x == &Dim::Known(1) && o != &Dim::Known(1));
            if grows {
                op_bail!(
                    name,
                    "slope shape {} does not broadcast to input shape {}",
                    super::util::show_dims(&b.shape),
                    super::util::show_dims(&a.shape)
                );
            }
            // Where X's dim is 1 the slope's must be too, even if only symbolically known.
            for (o, x) in shape.iter_mut().zip(&a.shape) {
                if x == &Dim::Known(1) {
                    *o = Dim::Known(1);
                }
            }
        }
        Ok(vec![Fact::new(dt, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        use BinaryOp::*;
        let name = self.name();
        expect_inputs(name, inputs, 2, 2)?;
        let (a, b) = (inputs[0], inputs[1]);
        self.0.output_dtype(a.dtype(), b.dtype())?;
        let dt = a.dtype();
        let bad_dtype = || IrError::op(name, format!("not defined for {dt} inputs"));
        let y = match self.0 {
            And | Or | Xor => {
                let f = match self.0 {
                    And => |p: bool, q: bool| p && q,
                    Or => |p: bool, q: bool| p || q,
                    _ => |p: bool, q: bool| p != q,
                };
                let (shape, out) =
                    broadcast_map2(name, (a.as_slice::<bool>()?, a.shape()), (b.as_slice::<bool>()?, b.shape()), f)?;
                Tensor::from_vec(shape, out)?
            }
            Equal | Less | LessOrEqual | Greater | GreaterOrEqual => {
                dispatch_dtype!(dt, compare_typed(self.0, a, b), block => Err(bad_dtype()))?
            }
            Pow => dispatch_dtype!(dt, pow_typed(a, b), block => Err(bad_dtype()))?,
            _ => dispatch_dtype!(dt, arith_typed(self.0, a, b), block => Err(bad_dtype()))?,
        };
        if self.0 == PRelu && y.shape() != a.shape() {
            op_bail!(name, "slope shape {:?} does not broadcast to input shape {:?}", b.shape(), a.shape());
        }
        Ok(vec![y])
    }
}

// ---------------------------------------------------------------------------------------------
// Where, Cast, Clip, Identity

fn where_typed<T: Elem>(cond: &Tensor, x: &Tensor, y: &Tensor) -> IrResult<Tensor> {
    let (shape, out) = broadcast_map3(
        "Where",
        (cond.as_slice::<bool>()?, cond.shape()),
        (T::slice(x)?, x.shape()),
        (T::slice(y)?, y.shape()),
        |c: bool, p: T, q: T| if c { p } else { q },
    )?;
    T::tensor(shape, out)
}

fn where_dtype(cond: DType, x: DType, y: DType) -> IrResult<DType> {
    if cond != DType::Bool {
        op_bail!("Where", "condition must be bool, got {cond}");
    }
    if x != y {
        op_bail!("Where", "value dtypes differ: {x} and {y}");
    }
    if let DType::Block(_) = x {
        op_bail!("Where", "not defined for {x} values");
    }
    Ok(x)
}

impl OpDef for Where {
    fn name(&self) -> &'static str {
        "Where"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Where", inputs, 3, 3)?;
        let dt = where_dtype(inputs[0].dtype, inputs[1].dtype, inputs[2].dtype)?;
        let xy = broadcast_dims("Where", &inputs[1].shape, &inputs[2].shape)?;
        let shape = broadcast_dims("Where", &inputs[0].shape, &xy)?;
        Ok(vec![Fact::new(dt, shape)])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Where", inputs, 3, 3)?;
        let (c, x, y) = (inputs[0], inputs[1], inputs[2]);
        let dt = where_dtype(c.dtype(), x.dtype(), y.dtype())?;
        let out = dispatch_dtype!(dt, where_typed(c, x, y), block => op_bail!("Where", "not defined for {dt} values"))?;
        Ok(vec![out])
    }
}

impl OpDef for Cast {
    fn name(&self) -> &'static str {
        "Cast"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Cast", inputs, 1, 1)?;
        if let DType::Block(_) = self.to {
            op_bail!("Cast", "cannot cast to the block format {}", self.to);
        }
        Ok(vec![Fact::new(self.to, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Cast", inputs, 1, 1)?;
        if let DType::Block(_) = self.to {
            op_bail!("Cast", "cannot cast to the block format {}", self.to);
        }
        Ok(vec![inputs[0].cast(self.to)?])
    }
}

fn clip_typed<T: Elem>(x: &Tensor, lo: &Tensor, hi: &Tensor) -> IrResult<Tensor> {
    let (lo, hi) = (T::slice(lo)?[0], T::slice(hi)?[0]);
    // min(max(x, lo), hi), so lo > hi gives hi everywhere; NaN inputs stay NaN.
    let out = T::slice(x)?
        .iter()
        .map(|&v| {
            let v = if v < lo { lo } else { v };
            if v > hi {
                hi
            } else {
                v
            }
        })
        .collect();
    T::tensor(x.shape().to_vec(), out)
}

fn check_clip_dtypes(x: DType, lo: DType, hi: DType) -> IrResult<()> {
    if !is_numeric(x) {
        op_bail!("Clip", "not defined for {x} inputs");
    }
    if lo != x || hi != x {
        op_bail!("Clip", "bounds must have the input dtype {x}, got {lo} and {hi}");
    }
    Ok(())
}

impl OpDef for Clip {
    fn name(&self) -> &'static str {
        "Clip"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Clip", inputs, 3, 3)?;
        check_clip_dtypes(inputs[0].dtype, inputs[1].dtype, inputs[2].dtype)?;
        for (what, f) in [("min", inputs[1]), ("max", inputs[2])] {
            let scalar = match f.shape.as_slice() {
                [] => true,
                [d] => !matches!(d, Dim::Known(n) if *n != 1),
                _ => false,
            };
            if !scalar {
                op_bail!("Clip", "{what} must be a scalar, got shape {}", super::util::show_dims(&f.shape));
            }
        }
        Ok(vec![Fact::new(inputs[0].dtype, inputs[0].shape.clone())])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Clip", inputs, 3, 3)?;
        let (x, lo, hi) = (inputs[0], inputs[1], inputs[2]);
        let dt = x.dtype();
        check_clip_dtypes(dt, lo.dtype(), hi.dtype())?;
        for (what, t) in [("min", lo), ("max", hi)] {
            if t.rank() > 1 || t.len() != 1 {
                op_bail!("Clip", "{what} must be a scalar, got shape {:?}", t.shape());
            }
        }
        let y = dispatch_dtype!(dt, clip_typed(x, lo, hi), block => op_bail!("Clip", "not defined for {dt} inputs"))?;
        Ok(vec![y])
    }
}

impl OpDef for Identity {
    fn name(&self) -> &'static str {
        "Identity"
    }

    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        expect_inputs("Identity", inputs, 1, 1)?;
        Ok(vec![inputs[0].without_value()])
    }

    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        expect_inputs("Identity", inputs, 1, 1)?;
        Ok(vec![inputs[0].clone()])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t<T: Elem>(shape: &[usize], v: Vec<T>) -> Tensor {
        T::tensor(shape.to_vec(), v).unwrap()
    }

    fn run(op: impl OpDef, inputs: &[&Tensor]) -> Tensor {
        op.eval(inputs).unwrap().remove(0)
    }

    fn f32s(x: &Tensor) -> Vec<f32> {
        x.as_slice::<f32>().unwrap().to_vec()
    }

    fn unary_f64(op: UnaryOp, xs: &[f64]) -> Vec<f64> {
        run(Unary(op), &[&t(&[xs.len()], xs.to_vec())]).as_slice::<f64>().unwrap().to_vec()
    }

    fn assert_close(got: &[f64], want: &[f64], tol: f64) {
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= tol, "got {got:?}, want {want:?}");
        }
    }

    #[test]
    fn erf_known_values() {
        let cases = [
            (0.0, 0.0),
            (0.1, 0.1124629160182849),
            (0.5, 0.5204998778130465),
            (1.0, 0.8427007929497149),
            (2.0, 0.9953222650189527),
            (3.0, 0.9999779095030014),
            (4.0, 0.9999999845827421),
            (-1.0, -0.8427007929497149),
            (10.0, 1.0),
        ];
        for (x, want) in cases {
            assert!((erf(x) - want).abs() < 1e-15, "erf({x}) = {}", erf(x));
        }
        // In the tail, erfc = 1 - erf keeps its relative accuracy.
        assert!(((1.0 - erf(5.0)) / 1.537_459_794_428_035e-12 - 1.0).abs() < 1e-4);
        assert!(erf(f64::NAN).is_nan());
    }

    #[test]
    fn unary_float_functions() {
        use UnaryOp::*;
        assert_eq!(unary_f64(Neg, &[1.0, -2.0]), [-1.0, 2.0]);
        assert_eq!(unary_f64(Abs, &[-3.0]), [3.0]);
        assert_eq!(unary_f64(Sqrt, &[4.0]), [2.0]);
        assert!(unary_f64(Sqrt, &[-1.0])[0].is_nan());
        assert_eq!(unary_f64(Reciprocal, &[4.0, 0.0]), [0.25, f64::INFINITY]);
        assert_eq!(unary_f64(Exp, &[0.0]), [1.0]);
        assert_eq!(unary_f64(Log, &[1.0, 0.0]), [0.0, f64::NEG_INFINITY]);
        assert_close(&unary_f64(Erf, &[0.5]), &[0.5204998778130465], 1e-15);
        assert_eq!(unary_f64(Tanh, &[0.0]), [0.0]);
        assert_close(&unary_f64(Sigmoid, &[0.0, 1.0, -1000.0, 1000.0]), &[0.5, 0.7310585786300049, 0.0, 1.0], 1e-15);
        assert_eq!(unary_f64(Relu, &[-1.0, 0.0, 2.0]), [0.0, 0.0, 2.0]);
        assert_eq!(unary_f64(Floor, &[-1.5, 1.5]), [-2.0, 1.0]);
        assert_eq!(unary_f64(Ceil, &[-1.5, 1.5]), [-1.0, 2.0]);
        // Half to even, as ONNX Round.
        assert_eq!(unary_f64(Round, &[0.5, 1.5, 2.5, -0.5, -1.5, 0.4]), [0.0, 2.0, 2.0, -0.0, -2.0, 0.0]);
        assert_eq!(unary_f64(Sign, &[-3.0, 0.0, 2.0]), [-1.0, 0.0, 1.0]);
        let s = unary_f64(Sign, &[-0.0, f64::NAN]);
        assert!(s[0] == 0.0 && s[0].is_sign_positive() && s[1].is_nan());
        assert_eq!(unary_f64(Sin, &[0.0]), [0.0]);
        assert_eq!(unary_f64(Cos, &[0.0]), [1.0]);
        assert_close(&unary_f64(Softplus, &[0.0, 1000.0, -1000.0]), &[std::f64::consts::LN_2, 1000.0, 0.0], 1e-15);
        assert_close(&unary_f64(LeakyRelu { alpha: 0.5 }, &[-2.0, 3.0]), &[-1.0, 3.0], 0.0);
        assert_close(&unary_f64(Elu { alpha: 1.0 }, &[-1.0, 2.0]), &[-0.6321205588285577, 2.0], 1e-15);
        assert_close(&unary_f64(HardSigmoid { alpha: 0.25, beta: 0.5 }, &[1.0, 10.0, -10.0]), &[0.75, 1.0, 0.0], 0.0);
        assert_close(&unary_f64(HardSwish, &[3.0, -3.0, 1.0]), &[3.0, 0.0, 2.0 / 3.0], 1e-15);
        assert_close(
            &unary_f64(Gelu { tanh: false }, &[1.0, -2.0, 0.0]),
            &[0.8413447460685429, -0.04550026389635842, 0.0],
            1e-15,
        );
        assert_close(&unary_f64(Gelu { tanh: true }, &[1.0]), &[0.8411919906082768], 1e-15);
    }

    #[test]
    fn unary_dtypes() {
        // f32 is computed in f64 and rounded once.
        let y = run(Unary(UnaryOp::Sigmoid), &[&t(&[1], vec![1f32])]);
        assert_eq!(f32s(&y), [0.7310586]);
        let y = run(Unary(UnaryOp::Exp), &[&t(&[2], vec![f16::from_f32(0.0), f16::from_f32(1.0)])]);
        assert_eq!(y.as_slice::<f16>().unwrap(), &[f16::from_f32(1.0), f16::from_f64(std::f64::consts::E)]);
        // Integer ops wrap like the integer type.
        let y = run(Unary(UnaryOp::Neg), &[&t(&[3], vec![-128i8, 5, 0])]);
        assert_eq!(y.as_slice::<i8>().unwrap(), &[-128, -5, 0]);
        let y = run(Unary(UnaryOp::Abs), &[&t(&[2], vec![200u8, 0])]);
        assert_eq!(y.as_slice::<u8>().unwrap(), &[200, 0]);
        let y = run(Unary(UnaryOp::Relu), &[&t(&[3], vec![-4i64, 0, 7])]);
        assert_eq!(y.as_slice::<i64>().unwrap(), &[0, 0, 7]);
        let y = run(Unary(UnaryOp::Sign), &[&t(&[3], vec![-4i32, 0, 7])]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[-1, 0, 1]);
        let y = run(Unary(UnaryOp::Not), &[&t(&[2], vec![true, false])]);
        assert_eq!(y.as_slice::<bool>().unwrap(), &[false, true]);

        let bad = [
            (UnaryOp::Sqrt, DType::I32),
            (UnaryOp::Not, DType::F32),
            (UnaryOp::Neg, DType::U8),
            (UnaryOp::Abs, DType::Bool),
            (UnaryOp::Floor, DType::I64),
        ];
        for (op, dt) in bad {
            let f = Fact::known(dt, &[2]);
            let e = Unary(op).output_facts(&[&f]).unwrap_err();
            assert!(matches!(e, IrError::Op { op: n, .. } if n == op.onnx_name()), "{e}");
            assert!(Unary(op).eval(&[&Tensor::zeros(dt, vec![2]).unwrap()]).is_err());
        }
        assert!(Unary(UnaryOp::Exp).output_facts(&[]).is_err());
        let f = Fact::new(DType::F32, vec![Dim::sym("b"), Dim::Known(3)]);
        assert_eq!(Unary(UnaryOp::Exp).output_facts(&[&f]).unwrap(), vec![f.clone()]);
    }

    #[test]
    fn names_follow_onnx() {
        assert_eq!(Unary(UnaryOp::Relu).name(), "Relu");
        assert_eq!(Unary(UnaryOp::Gelu { tanh: true }).name(), "Gelu");
        assert_eq!(Unary(UnaryOp::HardSwish).name(), "HardSwish");
        assert_eq!(Unary(UnaryOp::LeakyRelu { alpha: 0.1 }).name(), "LeakyRelu");
        assert_eq!(Binary(BinaryOp::Add).name(), "Add");
        assert_eq!(Binary(BinaryOp::Mod { fmod: true }).name(), "Mod");
        assert_eq!(Binary(BinaryOp::PRelu).name(), "PRelu");
        assert_eq!(Binary(BinaryOp::GreaterOrEqual).name(), "GreaterOrEqual");
        assert_eq!(Where.name(), "Where");
        assert_eq!(Clip.name(), "Clip");
    }

    #[test]
    fn binary_broadcasting() {
        let a = t(&[2, 1], vec![1f32, 2.0]);
        let b = t(&[3], vec![10f32, 20.0, 30.0]);
        let y = run(Binary(BinaryOp::Sub), &[&a, &b]);
        assert_eq!(y.shape(), &[2, 3]);
        assert_eq!(f32s(&y), [-9.0, -19.0, -29.0, -8.0, -18.0, -28.0]);
        let y = run(Binary(BinaryOp::Mul), &[&t(&[], vec![2f32]), &b]);
        assert_eq!(f32s(&y), [20.0, 40.0, 60.0]);
        let e = Binary(BinaryOp::Add).eval(&[&t(&[2], vec![1f32, 2.0]), &b]).unwrap_err();
        assert!(e.to_string().contains("cannot broadcast"), "{e}");
        // Zero-size dims broadcast like any other.
        let y = run(Binary(BinaryOp::Add), &[&t(&[0, 1], Vec::<f32>::new()), &b]);
        assert_eq!(y.shape(), &[0, 3]);

        let fa = Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(1), Dim::Known(4)]);
        let fb = Fact::known(DType::F32, &[3, 1]);
        let out = Binary(BinaryOp::Add).output_facts(&[&fa, &fb]).unwrap();
        assert_eq!(out, vec![Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(3), Dim::Known(4)])]);
        let fc = Fact::known(DType::F32, &[5]);
        assert!(Binary(BinaryOp::Add).output_facts(&[&fa, &fc]).is_err());
    }

    #[test]
    fn binary_dtype_rules() {
        let f = |dt| Fact::known(dt, &[2]);
        let out = |op, a, b| Binary(op).output_facts(&[&f(a), &f(b)]).map(|v| v[0].dtype);
        assert_eq!(out(BinaryOp::Add, DType::I32, DType::I32), Ok(DType::I32));
        assert!(out(BinaryOp::Add, DType::F32, DType::F16).is_err());
        assert!(out(BinaryOp::Add, DType::Bool, DType::Bool).is_err());
        assert_eq!(out(BinaryOp::Less, DType::F32, DType::F32), Ok(DType::Bool));
        assert!(out(BinaryOp::Less, DType::Bool, DType::Bool).is_err());
        assert_eq!(out(BinaryOp::Equal, DType::Bool, DType::Bool), Ok(DType::Bool));
        assert_eq!(out(BinaryOp::Pow, DType::F32, DType::I64), Ok(DType::F32));
        assert!(out(BinaryOp::Pow, DType::F32, DType::Bool).is_err());
        assert_eq!(out(BinaryOp::And, DType::Bool, DType::Bool), Ok(DType::Bool));
        assert!(out(BinaryOp::Or, DType::I32, DType::I32).is_err());
        assert!(out(BinaryOp::Mod { fmod: false }, DType::F32, DType::F32).is_err());
        assert_eq!(out(BinaryOp::Mod { fmod: true }, DType::F32, DType::F32), Ok(DType::F32));
        assert!(Binary(BinaryOp::Add).output_facts(&[&f(DType::F32)]).is_err());
        let e = Binary(BinaryOp::Add).eval(&[&t(&[1], vec![1f32]), &t(&[1], vec![1f64])]).unwrap_err();
        assert!(e.to_string().contains("Add"), "{e}");
    }

    #[test]
    fn integer_arithmetic() {
        let a = t(&[4], vec![7i32, -7, 7, -7]);
        let b = t(&[4], vec![2i32, 2, -2, -2]);
        let y = run(Binary(BinaryOp::Div), &[&a, &b]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[3, -3, -3, 3]);
        let zero = t(&[1], vec![0i32]);
        let e = Binary(BinaryOp::Div).eval(&[&a, &zero]).unwrap_err();
        assert!(e.to_string().contains("division by zero"), "{e}");
        assert!(Binary(BinaryOp::Mod { fmod: false }).eval(&[&a, &zero]).is_err());

        let a = t(&[2], vec![-7i64, 7]);
        let b = t(&[2], vec![3i64, -3]);
        let y = run(Binary(BinaryOp::Mod { fmod: false }), &[&a, &b]);
        assert_eq!(y.as_slice::<i64>().unwrap(), &[2, -2]);
        let y = run(Binary(BinaryOp::Mod { fmod: true }), &[&a, &b]);
        assert_eq!(y.as_slice::<i64>().unwrap(), &[-1, 1]);
        let y = run(Binary(BinaryOp::Mod { fmod: true }), &[&t(&[2], vec![5.5f32, -5.5]), &t(&[], vec![2f32])]);
        assert_eq!(f32s(&y), [1.5, -1.5]);

        // Wrapping in the element type.
        let y = run(Binary(BinaryOp::Add), &[&t(&[2], vec![250u8, 3]), &t(&[2], vec![10u8, 5])]);
        assert_eq!(y.as_slice::<u8>().unwrap(), &[4, 8]);
        let y = run(Binary(BinaryOp::Sub), &[&t(&[1], vec![3u8]), &t(&[1], vec![5u8])]);
        assert_eq!(y.as_slice::<u8>().unwrap(), &[254]);
        let y = run(Binary(BinaryOp::Mul), &[&t(&[1], vec![100i8]), &t(&[1], vec![3i8])]);
        assert_eq!(y.as_slice::<i8>().unwrap(), &[44]);
        let y = run(Binary(BinaryOp::Max), &[&t(&[2], vec![1i16, 9]), &t(&[2], vec![5i16, 2])]);
        assert_eq!(y.as_slice::<i16>().unwrap(), &[5, 9]);
    }

    #[test]
    fn float_min_max_prelu() {
        let a = t(&[3], vec![1f32, f32::NAN, -2.0]);
        let b = t(&[3], vec![2f32, 0.0, -3.0]);
        let y = f32s(&run(Binary(BinaryOp::Max), &[&a, &b]));
        assert_eq!((y[0], y[2]), (2.0, -2.0));
        assert!(y[1].is_nan());
        let y = f32s(&run(Binary(BinaryOp::Min), &[&a, &b]));
        assert_eq!((y[0], y[2]), (1.0, -3.0));

        let x = t(&[2, 2], vec![-2f32, 3.0, -4.0, 5.0]);
        let slope = t(&[2], vec![0.5f32, 0.25]);
        assert_eq!(f32s(&run(Binary(BinaryOp::PRelu), &[&x, &slope])), [-1.0, 3.0, -2.0, 5.0]);
        // The slope may not grow X.
        let big = t(&[3, 2], vec![0f32; 6]);
        assert!(Binary(BinaryOp::PRelu).eval(&[&t(&[1, 2], vec![1f32, 2.0]), &big]).is_err());
        let fx = Fact::known(DType::F32, &[1, 2]);
        let fs = Fact::known(DType::F32, &[3, 2]);
        assert!(Binary(BinaryOp::PRelu).output_facts(&[&fx, &fs]).is_err());
        let fs = Fact::known(DType::F32, &[1, 1, 2]);
        assert!(Binary(BinaryOp::PRelu).output_facts(&[&fx, &fs]).is_err());
    }

    #[test]
    fn pow_exponent_types() {
        let y = run(Binary(BinaryOp::Pow), &[&t(&[2], vec![2f32, 4.0]), &t(&[2], vec![3i64, -1])]);
        assert_eq!(f32s(&y), [8.0, 0.25]);
        let y = run(Binary(BinaryOp::Pow), &[&t(&[2], vec![4f32, 2.0]), &t(&[], vec![0.5f64])]);
        assert_eq!(f32s(&y), [2.0, std::f32::consts::SQRT_2]);
        let y = run(Binary(BinaryOp::Pow), &[&t(&[5], vec![2i64, 2, -1, 3, -2]), &t(&[5], vec![10i32, -1, -3, 0, 3])]);
        assert_eq!(y.as_slice::<i64>().unwrap(), &[1024, 0, -1, 1, -8]);
        let y = run(Binary(BinaryOp::Pow), &[&t(&[1], vec![3i32]), &t(&[1], vec![2.5f32])]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[15]);
        assert!(Binary(BinaryOp::Pow).eval(&[&t(&[1], vec![0i32]), &t(&[1], vec![-1i32])]).is_err());
    }

    #[test]
    fn comparisons_and_logic() {
        let a = t(&[4], vec![1f32, 2.0, f32::NAN, -0.0]);
        let b = t(&[4], vec![2f32, 2.0, f32::NAN, 0.0]);
        let cmp = |op| run(Binary(op), &[&a, &b]).as_slice::<bool>().unwrap().to_vec();
        assert_eq!(cmp(BinaryOp::Equal), [false, true, false, true]);
        assert_eq!(cmp(BinaryOp::Less), [true, false, false, false]);
        assert_eq!(cmp(BinaryOp::LessOrEqual), [true, true, false, true]);
        assert_eq!(cmp(BinaryOp::Greater), [false, false, false, false]);
        assert_eq!(cmp(BinaryOp::GreaterOrEqual), [false, true, false, true]);
        let y = run(Binary(BinaryOp::Equal), &[&t(&[2], vec![5i64, 6]), &t(&[], vec![6i64])]);
        assert_eq!(y.as_slice::<bool>().unwrap(), &[false, true]);

        let p = t(&[4], vec![true, true, false, false]);
        let q = t(&[4], vec![true, false, true, false]);
        let logic = |op| run(Binary(op), &[&p, &q]).as_slice::<bool>().unwrap().to_vec();
        assert_eq!(logic(BinaryOp::And), [true, false, false, false]);
        assert_eq!(logic(BinaryOp::Or), [true, true, true, false]);
        assert_eq!(logic(BinaryOp::Xor), [false, true, true, false]);
    }

    #[test]
    fn where_broadcasts_three_ways() {
        let c = t(&[2, 1], vec![true, false]);
        let x = t(&[3], vec![1i64, 2, 3]);
        let y = t(&[], vec![-1i64]);
        let out = run(Where, &[&c, &x, &y]);
        assert_eq!(out.shape(), &[2, 3]);
        assert_eq!(out.as_slice::<i64>().unwrap(), &[1, 2, 3, -1, -1, -1]);
        let fc = Fact::new(DType::Bool, vec![Dim::sym("b"), Dim::Known(1)]);
        let fx = Fact::known(DType::F32, &[3]);
        let fy = Fact::known(DType::F32, &[1, 1]);
        assert_eq!(
            Where.output_facts(&[&fc, &fx, &fy]).unwrap(),
            vec![Fact::new(DType::F32, vec![Dim::sym("b"), Dim::Known(3)])]
        );
        assert!(Where.output_facts(&[&fx, &fx, &fy]).is_err());
        assert!(Where.output_facts(&[&fc, &fx, &Fact::known(DType::F64, &[1])]).is_err());
        assert!(Where.eval(&[&c, &x, &t(&[2], vec![1i64, 2])]).is_err());
    }

    #[test]
    fn cast_clip_identity() {
        let x = t(&[3], vec![-1.7f32, 0.0, 2.9]);
        let y = run(Cast { to: DType::I32 }, &[&x]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[-1, 0, 2]);
        let f = Fact::new(DType::F32, vec![Dim::sym("n")]);
        assert_eq!(
            Cast { to: DType::Bool }.output_facts(&[&f]).unwrap(),
            vec![Fact::new(DType::Bool, f.shape.clone())]
        );
        let q8 = DType::Block(slimnn_tensor::BlockKind::Q8_0);
        assert!(Cast { to: q8 }.output_facts(&[&f]).is_err());
        assert!(Cast { to: q8 }.eval(&[&x]).is_err());

        let x = t(&[4], vec![-5f32, 0.5, 7.0, f32::NAN]);
        let y = f32s(&run(Clip, &[&x, &t(&[], vec![0f32]), &t(&[1], vec![6f32])]));
        assert_eq!(&y[..3], &[0.0, 0.5, 6.0]);
        assert!(y[3].is_nan());
        // min > max clips everything to max.
        let y = run(Clip, &[&t(&[2], vec![1i32, 9]), &t(&[], vec![5i32]), &t(&[], vec![3i32])]);
        assert_eq!(y.as_slice::<i32>().unwrap(), &[3, 3]);
        assert!(Clip.eval(&[&x, &t(&[2], vec![0f32, 1.0]), &t(&[], vec![1f32])]).is_err());
        assert!(Clip.eval(&[&x, &t(&[], vec![0f64]), &t(&[], vec![1f32])]).is_err());
        assert!(Clip.eval(&[&x]).is_err());
        let fx = Fact::known(DType::F32, &[4]);
        let s = Fact::known(DType::F32, &[]);
        assert!(Clip.output_facts(&[&fx, &s, &Fact::known(DType::F32, &[2])]).is_err());
        assert_eq!(Clip.output_facts(&[&fx, &s, &s]).unwrap(), vec![fx.clone()]);
        let fb = Fact::known(DType::Bool, &[4]);
        let sb = Fact::known(DType::Bool, &[]);
        assert!(Clip.output_facts(&[&fb, &sb, &sb]).is_err());

        let k = Fact::from_tensor(std::sync::Arc::new(t(&[1], vec![1f32])));
        assert_eq!(Identity.output_facts(&[&k]).unwrap()[0].konst, None);
        assert_eq!(run(Identity, &[&x]).shape(), &[4]);
    }

    #[test]
    fn broadcast_plan_merges_axes() {
        let p = Broadcast::new("t", &[&[2, 3, 4], &[2, 3, 4]]).unwrap();
        assert_eq!(p.dims, [24]);
        let p = Broadcast::new("t", &[&[1, 32, 5, 5], &[1, 32, 1, 1]]).unwrap();
        assert_eq!((p.dims.as_slice(), p.strides[1].as_slice()), (&[32, 25][..], &[1, 0][..]));
        let p = Broadcast::new("t", &[&[], &[]]).unwrap();
        let mut runs = vec![];
        p.for_each_run(|o, len| runs.push((o.to_vec(), len)));
        assert_eq!(runs, [(vec![0, 0], 1)]);
    }

    /// Independent broadcasting: map each output multi-index back to the inputs.
    fn naive_broadcast(a: &[i64], sa: &[usize], b: &[i64], sb: &[usize]) -> Option<(Vec<usize>, Vec<i64>)> {
        let rank = sa.len().max(sb.len());
        let pad =
            |s: &[usize]| -> Vec<usize> { std::iter::repeat_n(1, rank - s.len()).chain(s.iter().copied()).collect() };
        let (pa, pb) = (pad(sa), pad(sb));
        let mut out = vec![];
        for i in 0..rank {
            out.push(match (pa[i], pb[i]) {
                (x, y) if x == y => x,
                (1, y) => y,
                (x, 1) => x,
                _ => return None,
            });
        }
        let n: usize = out.iter().product();
        let flat = |shape: &[usize], idx: &[usize]| {
            idx.iter().zip(shape).fold(0, |acc, (&i, &d)| acc * d + if d == 1 { 0 } else { i })
        };
        let vals = (0..n)
            .map(|mut f| {
                let mut idx = vec![0; rank];
                for ax in (0..rank).rev() {
                    idx[ax] = f % out[ax];
                    f /= out[ax];
                }
                a[flat(&pa, &idx)] - b[flat(&pb, &idx)]
            })
            .collect();
        Some((out, vals))
    }

    fn shape_pair() -> impl Strategy<Value = (Vec<usize>, Vec<usize>)> {
        (prop::collection::vec(0usize..4, 0..5), prop::collection::vec(any::<(bool, bool)>(), 5), 0usize..5, 0usize..5)
            .prop_map(|(base, ones, ra, rb)| {
                let take = |r: usize, pick: fn(&(bool, bool)) -> bool| -> Vec<usize> {
                    let r = r.min(base.len());
                    (base.len() - r..base.len()).map(|i| if pick(&ones[i]) { 1 } else { base[i] }).collect()
                };
                (take(ra, |o| o.0), take(rb, |o| o.1))
            })
    }

    proptest! {
        #[test]
        fn binary_broadcast_matches_index_mapping((sa, sb) in shape_pair(), seed in any::<u64>()) {
            let na: usize = sa.iter().product();
            let nb: usize = sb.iter().product();
            let a: Vec<i64> = (0..na as u64).map(|i| (i.wrapping_mul(seed | 1) % 97) as i64).collect();
            let b: Vec<i64> = (0..nb as u64).map(|i| (i.wrapping_add(seed) % 89) as i64).collect();
            let want = naive_broadcast(&a, &sa, &b, &sb).unwrap();
            let y = run(Binary(BinaryOp::Sub), &[&t(&sa, a.clone()), &t(&sb, b.clone())]);
            prop_assert_eq!(y.shape(), want.0.as_slice());
            prop_assert_eq!(y.as_slice::<i64>().unwrap(), want.1.as_slice());
            // The f64 path agrees too.
            let af: Vec<f64> = a.iter().map(|&v| v as f64).collect();
            let bf: Vec<f64> = b.iter().map(|&v| v as f64).collect();
            let y = run(Binary(BinaryOp::Sub), &[&t(&sa, af), &t(&sb, bf)]);
            let wf: Vec<f64> = want.1.iter().map(|&v| v as f64).collect();
            prop_assert_eq!(y.as_slice::<f64>().unwrap(), wf.as_slice());
        }

        #[test]
        fn binary_broadcast_rejects_mismatch(a in 2usize..5, b in 2usize..5, lead in 0usize..3) {
            prop_assume!(a != b);
            let sa = vec![lead + 1, a];
            let sb = vec![b];
            let r = Binary(BinaryOp::Add).eval(&[&t(&sa, vec![0i64; (lead + 1) * a]), &t(&sb, vec![0i64; b])]);
            prop_assert!(r.is_err());
        }
    }
}

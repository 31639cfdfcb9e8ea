//! Elementwise ops: unary maps, broadcasting binary ops, Where, Cast, Clip, Identity.

use super::util::todo_op;
use slimnn_tensor::DType;

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
    LeakyRelu { alpha: f32 },
    Elu { alpha: f32 },
    HardSigmoid { alpha: f32, beta: f32 },
    HardSwish,
    /// `approximate == "tanh"` in ONNX Gelu-20.
    Gelu { tanh: bool },
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
    Mod { fmod: bool },
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

todo_op!(Unary, "Unary");
todo_op!(Binary, "Binary");
todo_op!(Where, "Where");
todo_op!(Cast, "Cast");
todo_op!(Clip, "Clip");
todo_op!(Identity, "Identity");

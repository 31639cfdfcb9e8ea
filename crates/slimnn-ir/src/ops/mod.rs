//! The canonical ops: one closed enum, [`Op`], whose variants each wrap a struct
//! implementing [`OpDef`]. An op's `output_facts` validates its inputs and attributes and
//! infers output types and shapes; `eval` is the reference semantics, written for clarity.
//!
//! Canonical ops are portable and serialisable; ONNX spellings that differ across opsets
//! (axes as attributes or inputs, optional inputs in the middle) are normalised by the
//! importer so each op has one form here.

mod conv;
mod elementwise;
mod gatherq;
mod grad;
mod linalg;
mod llm;
mod nbits;
mod nn;
mod pool;
mod quant;
mod reduce;
mod resize;
mod rowquant;
mod shape;
mod source;
pub(crate) mod util;

pub(crate) use shape::slice_range;

pub use conv::{AutoPad, Conv, ConvAttrs, ConvTranspose};
pub use elementwise::{Binary, BinaryOp, Cast, Clip, Identity, Unary, UnaryOp, Where};
pub use gatherq::GatherBlockQuantized;
pub use grad::{
    ConvGradInput, ConvGradWeight, FakeQuant, FakeQuantGrad, GatherGrad, LayerNormGrad, PoolGrad, SoftmaxGrad,
    UnaryGrad,
};
pub use linalg::{Gemm, MatMul};
pub use llm::{BlockGather, BlockMatMul, CausalAttention, RmsNorm, Rope};
pub use nbits::MatMulNBits;
pub use nn::{BatchNorm, LayerNorm, LogSoftmax, Softmax};
pub use pool::{GlobalPool, Pool, PoolAttrs, PoolKind};
pub use quant::{
    ConvInteger, DequantizeLinear, DynamicQuantizeLinear, MatMulInteger, QLinearConv, QLinearMatMul, QuantizeLinear,
};
pub use reduce::{ArgReduce, Reduce, ReduceOp};
pub use resize::{CoordMode, NearestMode, Resize, ResizeMode, ResizeTarget};
pub use rowquant::{row_params, DynamicRowQuantMatMul, SLIMNN_DOMAIN};
pub use shape::{
    Concat, ConstantOfShape, Expand, Flatten, Gather, Pad, PadMode, Range, Reshape, Shape, Slice, Split, Squeeze, Tile,
    Transpose, Unsqueeze,
};
pub use source::{Const, Input};

use crate::{Fact, IrResult};
use slimnn_tensor::Tensor;

/// What every op provides.
pub trait OpDef {
    /// The op's name as ONNX spells it (used in messages and exports).
    fn name(&self) -> &'static str;
    /// Validates inputs and attributes; infers one fact per output.
    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>>;
    /// Reference semantics: computes the outputs from concrete inputs.
    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>>;
}

macro_rules! define_ops {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// Every canonical op. Adding a variant makes the compiler list each place to touch.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Op {
            $($variant($ty)),*
        }

        impl Op {
            pub fn as_def(&self) -> &dyn OpDef {
                match self {
                    $(Op::$variant(op) => op),*
                }
            }
        }

        $(impl From<$ty> for Op {
            fn from(op: $ty) -> Op {
                Op::$variant(op)
            }
        })*
    };
}

define_ops! {
    Input(Input),
    Const(Const),
    Unary(Unary),
    Binary(Binary),
    Where(Where),
    Cast(Cast),
    Clip(Clip),
    Identity(Identity),
    MatMul(MatMul),
    Gemm(Gemm),
    Softmax(Softmax),
    LogSoftmax(LogSoftmax),
    LayerNorm(LayerNorm),
    BatchNorm(BatchNorm),
    Reduce(Reduce),
    ArgReduce(ArgReduce),
    Shape(Shape),
    Reshape(Reshape),
    Transpose(Transpose),
    Unsqueeze(Unsqueeze),
    Squeeze(Squeeze),
    Concat(Concat),
    Slice(Slice),
    Split(Split),
    Expand(Expand),
    Gather(Gather),
    ConstantOfShape(ConstantOfShape),
    Range(Range),
    Flatten(Flatten),
    Pad(Pad),
    Tile(Tile),
    Conv(Conv),
    ConvTranspose(ConvTranspose),
    Pool(Pool),
    GlobalPool(GlobalPool),
    Resize(Resize),
    QuantizeLinear(QuantizeLinear),
    DequantizeLinear(DequantizeLinear),
    DynamicQuantizeLinear(DynamicQuantizeLinear),
    MatMulInteger(MatMulInteger),
    ConvInteger(ConvInteger),
    QLinearMatMul(QLinearMatMul),
    QLinearConv(QLinearConv),
    BlockMatMul(BlockMatMul),
    BlockGather(BlockGather),
    RmsNorm(RmsNorm),
    Rope(Rope),
    CausalAttention(CausalAttention),
    MatMulNBits(MatMulNBits),
    GatherBlockQuantized(GatherBlockQuantized),
    DynamicRowQuantMatMul(DynamicRowQuantMatMul),
    UnaryGrad(UnaryGrad),
    SoftmaxGrad(SoftmaxGrad),
    LayerNormGrad(LayerNormGrad),
    ConvGradInput(ConvGradInput),
    ConvGradWeight(ConvGradWeight),
    PoolGrad(PoolGrad),
    GatherGrad(GatherGrad),
    FakeQuant(FakeQuant),
    FakeQuantGrad(FakeQuantGrad),
}

impl OpDef for Op {
    fn name(&self) -> &'static str {
        self.as_def().name()
    }
    fn output_facts(&self, inputs: &[&Fact]) -> IrResult<Vec<Fact>> {
        self.as_def().output_facts(inputs)
    }
    fn eval(&self, inputs: &[&Tensor]) -> IrResult<Vec<Tensor>> {
        self.as_def().eval(inputs)
    }
}

//! Lowered plans: a shape-specialised list of steps over value slots.

use slimnn_ir::Op;
use slimnn_kernels::{Activation, PackedB};
use slimnn_tensor::Tensor;
use std::sync::Arc;

/// Index of a value in a plan.
pub type Slot = usize;

/// The arithmetic of attention's two products: bf16 with `Precision::Bf16`, int8 with
/// `RuntimeConfig::int8_attention`.
pub use slimnn_kernels::attention::AttnProducts;

/// A lowered op: a chosen kernel with its prepared operands. Valid only on the machine (CPU
/// tier) that built it; never serialised.
#[derive(Debug)]
pub enum Kernel {
    /// The reference evaluator's implementation of a canonical op.
    Ref(Op),
    /// `act(A·W + bias) + residual` with `W` packed; inputs `[a, residual?]`, A is
    /// `[.., k]` flattened to `m x k`.
    Gemm { packed: Arc<PackedB>, bias: Option<Arc<[f32]>>, activation: Activation, residual: bool },
    /// `act(op(A)·op(B) + bias) + residual` with both operands run-time tensors, batched;
    /// inputs `[a, b, bias?, residual?]`.
    MatMul(Arc<crate::lower::matmul::MatMulKernel>),
    /// Multi-head scaled dot-product attention on projections laid out `[batch, seq, heads *
    /// head_dim]`; inputs `[q, k, v, mask?]`, or `[qkv, mask?]` when `fused_qkv` (one
    /// projection `[batch, seq, 3 * heads * head_dim]`, Q then K then V); the mask is additive,
    /// broadcast to `[batch, heads, seq_q, seq_k]`; output `[batch, seq_q, heads * head_dim]`.
    /// `products`: the arithmetic of both products.
    Attention {
        heads: usize,
        head_dim: usize,
        scale: f32,
        mask_shape: Option<[usize; 4]>,
        fused_qkv: bool,
        products: AttnProducts,
    },
    /// Layer normalisation over the last axis; inputs `[x]`.
    LayerNorm { scale: Arc<[f32]>, bias: Arc<[f32]>, epsilon: f32 },
    /// Layer normalisation over the last axis with run-time scale (and bias); inputs
    /// `[x, scale, bias?]` (parameters as inputs).
    LayerNormDyn { epsilon: f32 },
    /// Softmax over the last axis.
    Softmax,
    /// The input's values under the output's shape (Reshape, Squeeze, Unsqueeze, Flatten,
    /// Identity, a sum over size-1 axes): the input's buffer is moved when this step is its
    /// last reader, else copied. Input `[x, ..]` (shape operands ignored).
    View,
    /// f32 transpose with any permutation, as output dims (adjacent dims merged) and the
    /// input's element stride per output dim; input `[x]`.
    Transpose(Arc<StridedBroadcast>),
    /// Element-wise f32 function without a GEMM-epilogue form (erf, exp, tanh, sigmoid).
    Unary(slimnn_kernels::grad::FastUnary),
    /// `a op b` with both operands broadcast to the output along any axes.
    BinaryStrided(FastBinary, Arc<StridedBroadcast>),
    /// `dy * f'(x)`; inputs `[x, dy]`.
    ActivationGrad(slimnn_kernels::grad::GradActivation),
    /// Softmax (log-softmax) backward over the last axis; inputs `[y, dy]`.
    SoftmaxGrad { log: bool },
    /// Layer-norm backward over rows of the last `n` values; inputs `[x, scale, dy]`, outputs
    /// `[dx, dscale, dbias]`.
    LayerNormGrad { n: usize, epsilon: f32 },
    /// Scatter-add of a row gather's gradient; inputs `[table (shape only), i64 indices, dy]`.
    GatherGrad { inner: usize },
    /// Elementwise f32 activation.
    Activation(Activation),
    /// `a op b` on f32, output shaped as `a`, `b` lined up as the [`Broadcast`] says.
    Binary(FastBinary, Broadcast),
    /// Sum over a run of adjacent axes: `out[o, i] = Σ_j x[o, j, i]` with `len` values of `j`
    /// and `inner` of `i`.
    ReduceSum { len: usize, inner: usize },
    /// Rows of a constant f32 table gathered by i64 indices (embeddings).
    Embedding { table: Arc<Tensor> },
    /// Rows of a run-time f32 table (a parameter); inputs `[table, i64 indices]`.
    EmbeddingDyn,
    /// 2-d NCHW convolution with its fused bias, activation and residual; inputs
    /// `[x, residual?]`.
    Conv(Arc<crate::conv::ConvKernel>),
    /// Convolutions of training graphs (run-time weights, gradients) as im2col + GEMM.
    ConvTrain(Arc<crate::conv::ConvTrainKernel>),
    /// 2-d max / average pooling, or its gradient (inputs `[x, dy]`).
    Pool(Arc<crate::pool::PoolKernel>),
    /// Mean over the spatial dims of `[n, c, spatial...]`, or of `[n, spatial.., c]` when
    /// `channels_last` (the input is a channels-last convolution's output).
    GlobalAveragePool { channels_last: bool },
    /// Integer kernels of quantized graphs (quantize, dequantize, u8 x i8 GEMM).
    Quant(Arc<crate::lower::quant::QuantKernel>),
    /// LLM ops on block-quantized weights ([`crate::blockq`]).
    BlockQ(crate::blockq::BlockKernel),
}

/// How the second operand of a fast binary op lines up with the first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Broadcast {
    /// Same shape.
    Same,
    /// One value.
    Scalar,
    /// `b` (a suffix of `a`'s shape) repeated over `a`, e.g. position embeddings.
    Repeat,
    /// One value of `b` per row of `n` values of `a` (`b` is `a`'s shape with the last dim 1),
    /// e.g. a token mask over hidden states.
    PerRow(usize),
}

/// Numpy broadcasting in general: the output's dims (adjacent dims that broadcast alike merged)
/// and each operand's element stride per dim (0 where it is broadcast).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StridedBroadcast {
    pub dims: Vec<usize>,
    pub a_strides: Vec<usize>,
    pub b_strides: Vec<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastBinary {
    Add,
    Sub,
    Mul,
    Div,
}

#[derive(Debug)]
pub struct Step {
    pub name: String,
    pub kernel: Kernel,
    pub inputs: Vec<Slot>,
    pub outputs: Vec<Slot>,
    pub output_shapes: Vec<Vec<usize>>,
    /// Slots whose last reader is this step (freed after it runs).
    pub frees: Vec<Slot>,
}

/// A fusion made (or refused) while lowering, for `slimnn inspect --optimized`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Fusion {
    pub kind: String,
    pub nodes: Vec<String>,
    pub note: String,
}

#[derive(Debug)]
pub struct Plan {
    pub steps: Vec<Step>,
    pub slots: usize,
    pub inputs: Vec<Slot>,
    pub outputs: Vec<Slot>,
    pub consts: Vec<(Slot, Arc<Tensor>)>,
    pub fusions: Vec<Fusion>,
    /// Graph rewrites made for these shapes before lowering: patches applied per pass.
    pub rewrites: Vec<(String, usize)>,
}

/// A plan in numbers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlanSummary {
    pub steps: usize,
    pub kernels: std::collections::BTreeMap<String, usize>,
    pub fusions: Vec<Fusion>,
    pub rewrites: Vec<(String, usize)>,
}

impl Kernel {
    pub fn name(&self) -> String {
        match self {
            Kernel::Ref(op) => format!("ref:{}", slimnn_ir::OpDef::name(op)),
            Kernel::Gemm { packed, bias, activation, residual } => {
                let mut s = if packed.is_bf16() {
                    "gemm_bf16"
                } else if packed.is_bf16x6() {
                    "gemm_x6"
                } else {
                    "gemm"
                }
                .to_string();
                if bias.is_some() {
                    s.push_str("+bias");
                }
                if *activation != Activation::None {
                    s.push_str(&format!("+{activation:?}").to_lowercase());
                }
                if *residual {
                    s.push_str("+residual");
                }
                s
            }
            Kernel::MatMul(k) => k.name(),
            Kernel::Attention { products: AttnProducts::F32, .. } => "attention".into(),
            Kernel::Attention { products: AttnProducts::Bf16, .. } => "attention_bf16".into(),
            Kernel::Attention { products: AttnProducts::Int8, .. } => "attention_int8".into(),
            Kernel::LayerNorm { .. } => "layer_norm".into(),
            Kernel::LayerNormDyn { .. } => "layer_norm".into(),
            Kernel::Softmax => "softmax".into(),
            Kernel::ActivationGrad(a) => format!("{a:?}_grad").to_lowercase(),
            Kernel::SoftmaxGrad { log: false } => "softmax_grad".into(),
            Kernel::SoftmaxGrad { log: true } => "log_softmax_grad".into(),
            Kernel::LayerNormGrad { .. } => "layer_norm_grad".into(),
            Kernel::GatherGrad { .. } => "gather_grad".into(),
            Kernel::Activation(a) => format!("{a:?}").to_lowercase(),
            Kernel::Binary(b, _) => format!("{b:?}").to_lowercase(),
            Kernel::Unary(f) => format!("{f:?}").to_lowercase(),
            Kernel::View => "view".into(),
            Kernel::Transpose(_) => "transpose".into(),
            Kernel::BinaryStrided(b, _) => format!("{b:?}_broadcast").to_lowercase(),
            Kernel::ReduceSum { .. } => "reduce_sum".into(),
            Kernel::Embedding { .. } | Kernel::EmbeddingDyn => "embedding".into(),
            Kernel::Conv(k) => k.name(),
            Kernel::ConvTrain(k) => k.name(),
            Kernel::Pool(k) => k.name(),
            Kernel::GlobalAveragePool { channels_last: false } => "global_average_pool".into(),
            Kernel::GlobalAveragePool { channels_last: true } => "global_average_pool (nhwc)".into(),
            Kernel::Quant(q) => q.name(),
            Kernel::BlockQ(k) => k.name(),
        }
    }
}

impl Plan {
    pub fn summary(&self) -> PlanSummary {
        let mut kernels = std::collections::BTreeMap::new();
        for s in &self.steps {
            *kernels.entry(s.kernel.name()).or_insert(0) += 1;
        }
        PlanSummary { steps: self.steps.len(), kernels, fusions: self.fusions.clone(), rewrites: self.rewrites.clone() }
    }
}

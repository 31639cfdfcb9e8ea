//! Matrix products.

use super::util::todo_op;

/// Numpy `matmul`: batched over leading dims with broadcasting; 1-d operands are promoted
/// and the added dim removed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatMul;

/// `alpha * op(A) @ op(B) + beta * C` on 2-d operands; `C` (optional third input)
/// broadcasts to the output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gemm {
    pub alpha: f32,
    pub beta: f32,
    pub trans_a: bool,
    pub trans_b: bool,
}

todo_op!(MatMul, "MatMul");
todo_op!(Gemm, "Gemm");

//! Reductions.

use super::util::todo_op;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    Mean,
    Max,
    Min,
    Prod,
    L1,
    L2,
    SumSquare,
    LogSum,
    LogSumExp,
}

/// A reduction over `axes` (all axes when `None`, unless `noop_with_empty_axes`, in which case
/// the input passes through). Axes always arrive as an attribute: the importer reads them from
/// the constant input of newer opsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reduce {
    pub op: ReduceOp,
    pub axes: Option<Vec<i64>>,
    pub keepdims: bool,
    pub noop_with_empty_axes: bool,
}

/// `ArgMax` (`max == true`) or `ArgMin` along one axis; output is i64.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArgReduce {
    pub max: bool,
    pub axis: i64,
    pub keepdims: bool,
    pub select_last_index: bool,
}

todo_op!(Reduce, "Reduce");
todo_op!(ArgReduce, "ArgReduce");

//! Pooling.

use super::conv::AutoPad;
use super::util::todo_op;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolKind {
    Max,
    /// `count_include_pad`: divide by the full window size, padding included.
    Average { count_include_pad: bool },
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolAttrs {
    pub kernel_shape: Vec<usize>,
    pub strides: Vec<usize>,
    /// Begin pads for every spatial dim, then end pads; empty means 0.
    pub pads: Vec<usize>,
    pub dilations: Vec<usize>,
    pub ceil_mode: bool,
    pub auto_pad: AutoPad,
}

/// `MaxPool` / `AveragePool` over the spatial dims of NC... inputs (only output Y).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    pub kind: PoolKind,
    pub attrs: PoolAttrs,
}

/// `GlobalAveragePool` (`max == false`) / `GlobalMaxPool`: spatial dims reduce to 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GlobalPool {
    pub max: bool,
}

todo_op!(Pool, "Pool");
todo_op!(GlobalPool, "GlobalPool");

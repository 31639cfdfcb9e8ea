//! slimnn's typed graph IR.
//!
//! A [`Graph`] is an arena of [`Node`]s; wires are [`OutletId`]s (node, output slot) and every
//! outlet carries a [`Fact`] (dtype, symbolic shape, constant value when known). Facts are
//! inferred when a node is added, so an ill-typed graph cannot be built. Rewrites go through a
//! [`Patch`]; passes run to a fixpoint under a [`PassRunner`] that checks consistency after
//! each one. [`Graph::eval`] is the reference evaluator: plain Rust that defines what every op
//! means.
//!
//! ```
//! use slimnn_ir::{Graph, Fact, ops::{Binary, BinaryOp}};
//! use slimnn_tensor::{DType, Dim, Tensor};
//! let mut g = Graph::default();
//! let x = g.add_input("x", Fact::new(DType::F32, vec![Dim::sym("batch"), Dim::Known(2)])).unwrap();
//! let two = g.add_const("two", Tensor::scalar(2f32)).unwrap();
//! let y = g.add_node("double", Binary(BinaryOp::Mul), vec![x, two]).unwrap();
//! g.add_output("y", y[0]);
//! let out = g.eval(vec![("x".into(), Tensor::from_vec(vec![1, 2], vec![1f32, 3.0]).unwrap())]).unwrap();
//! assert_eq!(out[0].as_slice::<f32>().unwrap(), &[2.0, 6.0]);
//! ```

pub mod autodiff;
mod error;
mod eval;
mod fact;
mod graph;
pub mod ops;
mod pass;
pub mod passes;
mod patch;

pub use error::{IrError, IrResult};
pub use fact::Fact;
pub use graph::{Graph, Node, NodeId, OutletId};
pub use ops::{Op, OpDef};
pub use pass::{Pass, PassReport, PassRunner};
pub use patch::{Patch, Wire};

//! CPU kernels for slimnn with run-time ISA dispatch.
//!
//! The crate is built for the baseline ISA; AVX2, AVX-512 and AMX code lives in
//! `#[target_feature]` functions reached only through a [`CpuTier`] that [`cpu`] detected at
//! run time. `SLIMNN_CPU_TIER=generic|avx2|avx512|amx` caps the tier so one host can test every
//! kernel set. Each optimised kernel has a scalar counterpart in [`reference`] and property
//! tests against it.
//!
//! Kernels:
//! * [`gemm`]: f32 GEMM `C = act(A·B + bias [+ C]) + residual` with B packed once
//!   ([`PackedB`]), a fused [`Epilogue`] and optional threading ([`Par`]); [`sgemm`] packs B on
//!   the fly.
//! * [`rows`]: row-wise softmax (optionally scaled and masked), layer norm, activations and
//!   broadcasting binary ops.
//! * [`matmul`]: batched products of two run-time operands (broadcast batch dims, transposed
//!   operands, batch reductions), B packed per call into thread-local scratch.
//! * [`grad`]: backward kernels of training graphs (activation derivatives, softmax and layer
//!   norm backward, gather scatter-add).
//! * [`attention`]: multi-head attention on `[batch, seq, heads * head_dim]` projections.
//! * [`depthwise`]: depthwise convolution on channels-last images.
//! * [`qgemm`]: `u8 x i8 -> i32` GEMM (AVX-512 VNNI, AVX-VNNI, AVX2) with dequantize /
//!   requantize epilogues, activation quantization, weight-only int8 / int4 GEMM.
//!
//! ```
//! use slimnn_kernels::{cpu, gemm, Activation, Epilogue, PackedB, Par};
//!
//! println!("kernels: {}", cpu::describe());
//! // A: 2 x 3, B: 3 x 2 (packed once, e.g. a weight), C: 2 x 2.
//! let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
//! let b = [1.0, 0.0, 0.0, 1.0, 1.0, -1.0];
//! let packed = PackedB::new(&b, 3, 2, 2).unwrap();
//! let bias = [0.5, 0.0];
//! let mut c = [0.0f32; 4];
//! let ep = Epilogue::default().with_bias(&bias).with_activation(Activation::Relu);
//! gemm(2, &a, 3, &packed, &mut c, 2, ep, Par::Seq).unwrap();
//! // Row 0: [1 + 3 + 0.5, 2 - 3] -> relu -> [4.5, 0]
//! assert_eq!(c, [4.5, 0.0, 10.5, 0.0]);
//! ```

mod amx;
pub mod attention;
pub mod blockq;
pub mod cpu;
pub mod depthwise;
pub mod direct;
mod error;
pub mod gemm;
pub mod grad;
mod math;
pub mod matmul;
pub mod qgemm;
pub mod reference;
pub mod rows;
mod simd;

pub use attention::{AttnDims, AttnMask};
pub use cpu::CpuTier;
pub use error::KernelError;
pub use gemm::{gemm, sgemm, sgemm_tier, Activation, Epilogue, PackedB, Par, Residual};
pub use rows::BinaryOp;

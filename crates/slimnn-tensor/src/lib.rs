//! Tensors for slimnn: element types ([`DType`]), shapes with symbolic dims ([`Dim`]),
//! quantization parameters ([`QuantParams`]), block formats ([`BlockFormat`]) and the
//! owned, typed [`Tensor`] value every other crate passes around.
//!
//! ```
//! use slimnn_tensor::{Tensor, DType};
//! let t = Tensor::from_vec(vec![2, 3], vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
//! assert_eq!(t.dtype(), DType::F32);
//! assert_eq!(t.as_slice::<f32>().unwrap()[4], 5.0);
//! ```

mod block;
mod dtype;
mod error;
mod quant;
mod shape;
mod tensor;

pub use block::{block_format, BlockFormat, BlockKind, Q4K, Q4_0, Q4_1, Q6K, Q8_0};
pub use dtype::{DType, Element};
pub use error::TensorError;
pub use quant::QuantParams;
pub use shape::{broadcast_shapes, checked_numel, strides_of, Dim, MAX_TENSOR_BYTES_ENV};
pub use tensor::{IntoData, Tensor, TensorData};

pub use half::{bf16, f16};

pub type Result<T, E = TensorError> = std::result::Result<T, E>;

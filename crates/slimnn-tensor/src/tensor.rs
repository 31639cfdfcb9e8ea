use crate::{bf16, checked_numel, f16, BlockKind, DType, Element, QuantParams, Result, TensorError};
use std::sync::Arc;

/// Typed storage of a tensor, one variant per plain dtype plus raw block-format bytes.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    F32(Vec<f32>),
    F64(Vec<f64>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    I8(Vec<i8>),
    U8(Vec<u8>),
    I16(Vec<i16>),
    I32(Vec<i32>),
    I64(Vec<i64>),
    Bool(Vec<bool>),
    Block { kind: BlockKind, bytes: Vec<u8> },
}

/// Runs `$body` with `$v` bound to the typed `Vec` of a [`TensorData`] (block data excluded:
/// `$block` is evaluated instead).
#[macro_export]
macro_rules! match_data {
    ($data:expr, $v:ident => $body:expr, block => $block:expr) => {
        match $data {
            $crate::TensorData::F32($v) => $body,
            $crate::TensorData::F64($v) => $body,
            $crate::TensorData::F16($v) => $body,
            $crate::TensorData::BF16($v) => $body,
            $crate::TensorData::I8($v) => $body,
            $crate::TensorData::U8($v) => $body,
            $crate::TensorData::I16($v) => $body,
            $crate::TensorData::I32($v) => $body,
            $crate::TensorData::I64($v) => $body,
            $crate::TensorData::Bool($v) => $body,
            $crate::TensorData::Block { .. } => $block,
        }
    };
}

/// Calls generic `$f::<T>(args)` for the Rust type `T` of a plain dtype; `$other` for blocks.
#[macro_export]
macro_rules! dispatch_dtype {
    ($dt:expr, $f:ident ( $($arg:expr),* ), block => $other:expr) => {
        match $dt {
            $crate::DType::F32 => $f::<f32>($($arg),*),
            $crate::DType::F64 => $f::<f64>($($arg),*),
            $crate::DType::F16 => $f::<$crate::f16>($($arg),*),
            $crate::DType::BF16 => $f::<$crate::bf16>($($arg),*),
            $crate::DType::I8 => $f::<i8>($($arg),*),
            $crate::DType::U8 => $f::<u8>($($arg),*),
            $crate::DType::I16 => $f::<i16>($($arg),*),
            $crate::DType::I32 => $f::<i32>($($arg),*),
            $crate::DType::I64 => $f::<i64>($($arg),*),
            $crate::DType::Bool => $f::<bool>($($arg),*),
            $crate::DType::Block(_) => $other,
        }
    };
}

/// Conversion between `Vec<T>` and [`TensorData`] for each element type.
pub trait IntoData: Element {
    fn into_data(v: Vec<Self>) -> TensorData;
    fn slice_of(d: &TensorData) -> Option<&[Self]>;
    fn slice_of_mut(d: &mut TensorData) -> Option<&mut [Self]>;
    fn vec_of(d: TensorData) -> std::result::Result<Vec<Self>, TensorData>;
}

macro_rules! into_data {
    ($t:ty, $v:ident) => {
        impl IntoData for $t {
            fn into_data(v: Vec<Self>) -> TensorData {
                TensorData::$v(v)
            }
            fn slice_of(d: &TensorData) -> Option<&[Self]> {
                match d {
                    TensorData::$v(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_of_mut(d: &mut TensorData) -> Option<&mut [Self]> {
                match d {
                    TensorData::$v(v) => Some(v),
                    _ => None,
                }
            }
            fn vec_of(d: TensorData) -> std::result::Result<Vec<Self>, TensorData> {
                match d {
                    TensorData::$v(v) => Ok(v),
                    other => Err(other),
                }
            }
        }
    };
}
into_data!(f32, F32);
into_data!(f64, F64);
into_data!(f16, F16);
into_data!(bf16, BF16);
into_data!(i8, I8);
into_data!(u8, U8);
into_data!(i16, I16);
into_data!(i32, I32);
into_data!(i64, I64);
into_data!(bool, Bool);

/// An owned tensor: a concrete shape, typed row-major data, and optional quantization
/// parameters (`real = scale * (q - zero_point)`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    shape: Vec<usize>,
    data: TensorData,
    quant: Option<Arc<QuantParams>>,
}

impl Tensor {
    /// Builds a tensor from a shape and row-major values.
    pub fn from_vec<T: IntoData>(shape: Vec<usize>, values: Vec<T>) -> Result<Tensor> {
        let numel = checked_numel(&shape, T::DTYPE)?;
        if numel != values.len() {
            return Err(TensorError::LengthMismatch { shape, numel, len: values.len() });
        }
        Ok(Tensor { shape, data: T::into_data(values), quant: None })
    }

    pub fn scalar<T: IntoData>(v: T) -> Tensor {
        Tensor { shape: vec![], data: T::into_data(vec![v]), quant: None }
    }

    /// A tensor of block-quantized data; `shape`'s element count must fill whole blocks.
    pub fn from_blocks(shape: Vec<usize>, kind: BlockKind, bytes: Vec<u8>) -> Result<Tensor> {
        let dtype = DType::Block(kind);
        let numel = checked_numel(&shape, dtype)?;
        let f = crate::block_format(kind);
        if numel % f.block_len() != 0 || bytes.len() != numel / f.block_len() * f.block_bytes() {
            return Err(TensorError::Invalid(format!(
                "{} bytes do not hold {numel} values of {}",
                bytes.len(),
                f.name()
            )));
        }
        Ok(Tensor { shape, data: TensorData::Block { kind, bytes }, quant: None })
    }

    /// A tensor of `dtype` filled with zeros (false for bool).
    pub fn zeros(dtype: DType, shape: Vec<usize>) -> Result<Tensor> {
        fn z<T: IntoData>(shape: Vec<usize>) -> Result<Tensor> {
            let n = checked_numel(&shape, T::DTYPE)?;
            Tensor::from_vec(shape, vec![T::default(); n])
        }
        dispatch_dtype!(dtype, z(shape), block => Err(TensorError::Invalid("zeros of a block format".into())))
    }

    /// Builds a tensor of `dtype` from f64 values (rounded and saturated as Rust `as` does).
    pub fn from_f64s(dtype: DType, shape: Vec<usize>, values: &[f64]) -> Result<Tensor> {
        fn f<T: IntoData>(shape: Vec<usize>, values: &[f64]) -> Result<Tensor> {
            Tensor::from_vec(shape, values.iter().map(|&v| T::from_f64(v)).collect())
        }
        dispatch_dtype!(dtype, f(shape, values), block => Err(TensorError::Invalid("from_f64s of a block format".into())))
    }

    /// Builds a tensor of `dtype` from i64 values (wrapping as Rust `as` does).
    pub fn from_i64s(dtype: DType, shape: Vec<usize>, values: &[i64]) -> Result<Tensor> {
        fn f<T: IntoData>(shape: Vec<usize>, values: &[i64]) -> Result<Tensor> {
            Tensor::from_vec(shape, values.iter().map(|&v| T::from_i64(v)).collect())
        }
        dispatch_dtype!(dtype, f(shape, values), block => Err(TensorError::Invalid("from_i64s of a block format".into())))
    }

    pub fn dtype(&self) -> DType {
        match &self.data {
            TensorData::Block { kind, .. } => DType::Block(*kind),
            d => match_data!(d, v => element_dtype(v), block => unreachable!()),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn data(&self) -> &TensorData {
        &self.data
    }

    pub fn into_data(self) -> TensorData {
        self.data
    }

    pub fn quant(&self) -> Option<&QuantParams> {
        self.quant.as_deref()
    }

    pub fn with_quant(mut self, q: Option<QuantParams>) -> Tensor {
        self.quant = q.map(Arc::new);
        self
    }

    pub fn as_slice<T: IntoData>(&self) -> Result<&[T]> {
        T::slice_of(&self.data).ok_or(TensorError::DType { expected: T::DTYPE, actual: self.dtype() })
    }

    pub fn as_mut_slice<T: IntoData>(&mut self) -> Result<&mut [T]> {
        let actual = self.dtype();
        T::slice_of_mut(&mut self.data).ok_or(TensorError::DType { expected: T::DTYPE, actual })
    }

    pub fn into_vec<T: IntoData>(self) -> Result<Vec<T>> {
        let actual = self.dtype();
        T::vec_of(self.data).map_err(|_| TensorError::DType { expected: T::DTYPE, actual })
    }

    /// Same data, new shape with the same element count.
    pub fn into_shape(mut self, shape: Vec<usize>) -> Result<Tensor> {
        let numel = checked_numel(&shape, self.dtype())?;
        if numel != self.len() {
            return Err(TensorError::LengthMismatch { shape, numel, len: self.len() });
        }
        self.shape = shape;
        Ok(self)
    }

    /// All values as f64 (block formats are dequantized).
    pub fn to_f64_vec(&self) -> Vec<f64> {
        match &self.data {
            TensorData::Block { kind, bytes } => {
                let f = crate::block_format(*kind);
                let mut out = vec![0f32; self.len()];
                f.dequantize(bytes, &mut out);
                out.into_iter().map(f64::from).collect()
            }
            d => match_data!(d, v => v.iter().map(|x| x.to_f64()).collect(), block => unreachable!()),
        }
    }

    /// All values as i64 (floats truncated toward zero).
    pub fn to_i64_vec(&self) -> Result<Vec<i64>> {
        match_data!(&self.data, v => Ok(v.iter().map(|x| x.to_i64()).collect()),
            block => Err(TensorError::Invalid("integer view of a block format".into())))
    }

    /// Converts to `to` following ONNX `Cast`: float to int truncates toward zero (saturating),
    /// anything to bool is `!= 0`, bool to number is 0/1. Block formats dequantize to floats.
    pub fn cast(&self, to: DType) -> Result<Tensor> {
        if self.dtype() == to {
            return Ok(Tensor { shape: self.shape.clone(), data: self.data.clone(), quant: None });
        }
        let shape = self.shape.clone();
        if to.is_float()
            || to == DType::Bool
            || self.dtype().is_float()
            || matches!(self.data, TensorData::Block { .. })
        {
            if let DType::Block(_) = to {
                return Err(TensorError::Cast { from: self.dtype(), to });
            }
            Tensor::from_f64s(to, shape, &self.to_f64_vec())
        } else {
            Tensor::from_i64s(to, shape, &self.to_i64_vec()?)
        }
    }

    /// Little-endian bytes of the data (bools as one byte each), as ONNX `raw_data`,
    /// `.npy` and safetensors store them.
    pub fn to_le_bytes(&self) -> Vec<u8> {
        fn bytes<T: Copy, const N: usize>(v: &[T], f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
            v.iter().flat_map(|x| f(*x)).collect()
        }
        match &self.data {
            TensorData::F32(v) => bytes(v, f32::to_le_bytes),
            TensorData::F64(v) => bytes(v, f64::to_le_bytes),
            TensorData::F16(v) => bytes(v, f16::to_le_bytes),
            TensorData::BF16(v) => bytes(v, bf16::to_le_bytes),
            TensorData::I8(v) => bytes(v, i8::to_le_bytes),
            TensorData::U8(v) => v.clone(),
            TensorData::I16(v) => bytes(v, i16::to_le_bytes),
            TensorData::I32(v) => bytes(v, i32::to_le_bytes),
            TensorData::I64(v) => bytes(v, i64::to_le_bytes),
            TensorData::Bool(v) => v.iter().map(|&b| b as u8).collect(),
            TensorData::Block { bytes, .. } => bytes.clone(),
        }
    }

    /// Builds a tensor from little-endian bytes; the byte count must match the shape exactly.
    pub fn from_le_bytes(dtype: DType, shape: Vec<usize>, raw: &[u8]) -> Result<Tensor> {
        let numel = checked_numel(&shape, dtype)?;
        if let DType::Block(kind) = dtype {
            return Tensor::from_blocks(shape, kind, raw.to_vec());
        }
        let want = numel * dtype.size_of();
        if raw.len() != want {
            return Err(TensorError::Invalid(format!(
                "{} bytes given for {numel} values of {dtype} (expected {want})",
                raw.len()
            )));
        }
        fn parse<T: IntoData, const N: usize>(
            raw: &[u8],
            shape: Vec<usize>,
            f: impl Fn([u8; N]) -> T,
        ) -> Result<Tensor> {
            let v = raw.chunks_exact(N).map(|c| f(c.try_into().expect("chunks_exact yields N bytes"))).collect();
            Tensor::from_vec(shape, v)
        }
        match dtype {
            DType::F32 => parse(raw, shape, f32::from_le_bytes),
            DType::F64 => parse(raw, shape, f64::from_le_bytes),
            DType::F16 => parse(raw, shape, f16::from_le_bytes),
            DType::BF16 => parse(raw, shape, bf16::from_le_bytes),
            DType::I8 => parse(raw, shape, i8::from_le_bytes),
            DType::U8 => Tensor::from_vec(shape, raw.to_vec()),
            DType::I16 => parse(raw, shape, i16::from_le_bytes),
            DType::I32 => parse(raw, shape, i32::from_le_bytes),
            DType::I64 => parse(raw, shape, i64::from_le_bytes),
            DType::Bool => Tensor::from_vec(shape, raw.iter().map(|&b| b != 0).collect()),
            DType::Block(_) => unreachable!("handled above"),
        }
    }

    /// Largest absolute difference to `other` (compared as f64), `None` if shapes differ.
    pub fn max_abs_diff(&self, other: &Tensor) -> Option<f64> {
        if self.shape != other.shape {
            return None;
        }
        let (a, b) = (self.to_f64_vec(), other.to_f64_vec());
        Some(a.iter().zip(&b).fold(
            0f64,
            |m, (x, y)| {
                if x == y || (x.is_nan() && y.is_nan()) {
                    m
                } else {
                    m.max((x - y).abs())
                }
            },
        ))
    }
}

fn element_dtype<T: Element>(_: &[T]) -> DType {
    T::DTYPE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_view() {
        let t = Tensor::from_vec(vec![2, 2], vec![1i64, 2, 3, 4]).unwrap();
        assert_eq!(t.dtype(), DType::I64);
        assert!(t.as_slice::<f32>().is_err());
        assert!(Tensor::from_vec(vec![3], vec![1f32]).is_err());
        let r = t.into_shape(vec![4]).unwrap();
        assert_eq!(r.shape(), &[4]);
    }

    #[test]
    fn cast_follows_onnx() {
        let t = Tensor::from_vec(vec![3], vec![-1.7f32, 0.0, 2.9]).unwrap();
        assert_eq!(t.cast(DType::I32).unwrap().as_slice::<i32>().unwrap(), &[-1, 0, 2]);
        assert_eq!(t.cast(DType::Bool).unwrap().as_slice::<bool>().unwrap(), &[true, false, true]);
        let i = Tensor::from_vec(vec![2], vec![300i64, -1]).unwrap();
        assert_eq!(i.cast(DType::U8).unwrap().as_slice::<u8>().unwrap(), &[44, 255]);
    }

    #[test]
    fn bytes_roundtrip_every_dtype() {
        for dt in DType::PLAIN {
            let t = Tensor::from_f64s(dt, vec![2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]).unwrap();
            let back = Tensor::from_le_bytes(dt, vec![2, 3], &t.to_le_bytes()).unwrap();
            assert_eq!(t, back, "{dt}");
        }
        assert!(Tensor::from_le_bytes(DType::F32, vec![2], &[0; 7]).is_err());
    }
}

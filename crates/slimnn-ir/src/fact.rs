use slimnn_tensor::{DType, Dim, Tensor};
use std::fmt;
use std::sync::Arc;

/// What is known about a value before run time: its dtype, its shape (dims may be symbolic
/// or unknown) and, for constants, the value itself. Constant folding is fact propagation.
#[derive(Debug, Clone, PartialEq)]
pub struct Fact {
    pub dtype: DType,
    pub shape: Vec<Dim>,
    pub konst: Option<Arc<Tensor>>,
}

impl Fact {
    pub fn new(dtype: DType, shape: Vec<Dim>) -> Fact {
        Fact { dtype, shape, konst: None }
    }

    /// A fact with every dim known.
    pub fn known(dtype: DType, shape: &[usize]) -> Fact {
        Fact::new(dtype, shape.iter().map(|&d| Dim::Known(d)).collect())
    }

    pub fn from_tensor(t: Arc<Tensor>) -> Fact {
        Fact { dtype: t.dtype(), shape: t.shape().iter().map(|&d| Dim::Known(d)).collect(), konst: Some(t) }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The shape if every dim is known.
    pub fn known_shape(&self) -> Option<Vec<usize>> {
        self.shape.iter().map(Dim::as_known).collect()
    }

    /// Same type and shape, dropping the constant value.
    pub fn without_value(&self) -> Fact {
        Fact { dtype: self.dtype, shape: self.shape.clone(), konst: None }
    }
}

impl fmt::Display for Fact {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[", self.dtype)?;
        for (i, d) in self.shape.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{d}")?;
        }
        f.write_str("]")?;
        if self.konst.is_some() {
            f.write_str(" const")?;
        }
        Ok(())
    }
}

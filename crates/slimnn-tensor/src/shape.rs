use crate::{DType, Result, TensorError};
use std::fmt;
use std::sync::Arc;

/// Environment variable that caps the bytes one tensor may take.
pub const MAX_TENSOR_BYTES_ENV: &str = "SLIMNN_MAX_TENSOR_BYTES";

/// One dimension of a shape known before run time: a number, a named symbol (`batch`,
/// `sequence`) bound when inputs arrive, or unknown (computed at run time only).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(usize),
    Sym(Arc<str>),
    Unknown,
}

impl Dim {
    pub fn sym(name: &str) -> Dim {
        Dim::Sym(name.into())
    }

    pub fn as_known(&self) -> Option<usize> {
        match self {
            Dim::Known(n) => Some(*n),
            _ => None,
        }
    }

    /// Broadcasts two dims (numpy rules); `None` when they provably disagree.
    pub fn broadcast(&self, other: &Dim) -> Option<Dim> {
        match (self, other) {
            (Dim::Known(1), d) | (d, Dim::Known(1)) => Some(d.clone()),
            (Dim::Known(a), Dim::Known(b)) => (a == b).then_some(Dim::Known(*a)),
            (Dim::Sym(a), Dim::Sym(b)) if a == b => Some(self.clone()),
            (Dim::Known(n), _) | (_, Dim::Known(n)) => Some(Dim::Known(*n)),
            _ => Some(Dim::Unknown),
        }
    }
}

impl From<usize> for Dim {
    fn from(n: usize) -> Dim {
        Dim::Known(n)
    }
}

impl fmt::Display for Dim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dim::Known(n) => write!(f, "{n}"),
            Dim::Sym(s) => f.write_str(s),
            Dim::Unknown => f.write_str("?"),
        }
    }
}

/// The byte limit, read once per process (it sits on the path of every tensor allocation).
fn byte_limit() -> u128 {
    static LIMIT: std::sync::OnceLock<u128> = std::sync::OnceLock::new();
    *LIMIT.get_or_init(|| {
        if let Some(v) = std::env::var(MAX_TENSOR_BYTES_ENV).ok().and_then(|v| v.parse::<u128>().ok()) {
            return v;
        }
        physical_memory().unwrap_or(16 << 30)
    })
}

fn physical_memory() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u128 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Element count of `shape`, checked for overflow and against the memory limit (physical
/// memory, or [`MAX_TENSOR_BYTES_ENV`]) so a hostile shape never triggers a huge allocation.
pub fn checked_numel(shape: &[usize], dtype: DType) -> Result<usize> {
    let mut n: usize = 1;
    for &d in shape {
        n = n.checked_mul(d).ok_or_else(|| TensorError::Overflow { shape: shape.to_vec() })?;
    }
    let bytes = match dtype {
        DType::Block(k) => {
            let f = crate::block_format(k);
            (n as u128).div_ceil(f.block_len() as u128) * f.block_bytes() as u128
        }
        d => n as u128 * d.size_of() as u128,
    };
    let limit = byte_limit();
    if bytes > limit {
        return Err(TensorError::TooLarge { shape: shape.to_vec(), dtype, bytes, limit, env: MAX_TENSOR_BYTES_ENV });
    }
    Ok(n)
}

/// Row-major strides (in elements) of a shape.
pub fn strides_of(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Numpy multidirectional broadcast of two concrete shapes.
pub fn broadcast_shapes(a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let n = a.len().max(b.len());
    let mut out = vec![0; n];
    for i in 0..n {
        let da = if i + a.len() >= n { a[i + a.len() - n] } else { 1 };
        let db = if i + b.len() >= n { b[i + b.len() - n] } else { 1 };
        out[i] = match (da, db) {
            (x, y) if x == y => x,
            (1, y) => y,
            (x, 1) => x,
            _ => return Err(TensorError::Broadcast { a: a.to_vec(), b: b.to_vec() }),
        };
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broadcast() {
        assert_eq!(broadcast_shapes(&[2, 1, 3], &[4, 1]).unwrap(), vec![2, 4, 3]);
        assert!(broadcast_shapes(&[2, 3], &[4]).is_err());
        assert_eq!(Dim::sym("b").broadcast(&Dim::Known(1)), Some(Dim::sym("b")));
        assert_eq!(Dim::Known(2).broadcast(&Dim::Known(3)), None);
    }

    #[test]
    fn numel_guards() {
        assert!(matches!(checked_numel(&[usize::MAX, 2], DType::F32), Err(TensorError::Overflow { .. })));
        assert!(matches!(checked_numel(&[1 << 40, 1 << 20], DType::F32), Err(TensorError::TooLarge { .. })));
        assert_eq!(checked_numel(&[2, 3], DType::F32).unwrap(), 6);
        assert_eq!(strides_of(&[2, 3, 4]), vec![12, 4, 1]);
    }
}

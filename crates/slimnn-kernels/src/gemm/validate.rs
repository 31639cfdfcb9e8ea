//! Argument checks shared by the GEMM entry points and the reference.

use super::{Activation, Epilogue};
use crate::error::KernelError;

pub(crate) const KERNEL: &str = "sgemm";

/// Checks that a row-major `rows x cols` matrix with row stride `ld` fits in `len` values.
pub(crate) fn matrix_extent(name: &str, len: usize, rows: usize, cols: usize, ld: usize) -> Result<(), KernelError> {
    if rows == 0 || cols == 0 {
        return Ok(());
    }
    if ld < cols {
        return Err(KernelError::shape(
            KERNEL,
            format!("{name}: leading dimension ld={ld} is less than its {cols} columns"),
        ));
    }
    let need = (rows - 1)
        .checked_mul(ld)
        .and_then(|x| x.checked_add(cols))
        .ok_or_else(|| KernelError::shape(KERNEL, format!("{name}: {rows} x {cols} overflows")))?;
    if len < need {
        return Err(KernelError::shape(
            KERNEL,
            format!("{name}: {rows} x {cols} with ld={ld} needs {need} values, got {len}"),
        ));
    }
    Ok(())
}

/// Checks a GEMM's operands (B already validated) and epilogue.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_gemm(
    m: usize,
    k: usize,
    n: usize,
    a_len: usize,
    lda: usize,
    c_len: usize,
    ldc: usize,
    ep: &Epilogue<'_>,
) -> Result<(), KernelError> {
    matrix_extent("A", a_len, m, k, lda)?;
    matrix_extent("C", c_len, m, n, ldc)?;
    if let Some(bias) = ep.bias {
        if bias.len() != n {
            return Err(KernelError::epilogue(KERNEL, format!("bias has {} values, expected n = {n}", bias.len())));
        }
    }
    if let Some(bias) = ep.row_bias {
        if bias.len() != m {
            return Err(KernelError::epilogue(KERNEL, format!("row bias has {} values, expected m = {m}", bias.len())));
        }
    }
    if let Some(r) = ep.residual {
        matrix_extent("residual", r.data.len(), m, n, r.ld)
            .map_err(|e| KernelError::epilogue(KERNEL, e.to_string()))?;
    }
    if let Activation::Clip { min, max } = ep.activation {
        if min.is_nan() || max.is_nan() || min > max {
            return Err(KernelError::epilogue(
                KERNEL,
                format!("clip bounds must satisfy min <= max, got [{min}, {max}]"),
            ));
        }
    }
    Ok(())
}

//! f32 GEMM: `C = act(A·B + bias [+ C]) + residual`, with B packed ahead of time.
//!
//! * A is row-major `m x k` with row stride `lda`, read in place.
//! * B is a [`PackedB`]: NR-wide column panels for one [`CpuTier`]'s micro-kernel.
//! * C is row-major `m x n` with row stride `ldc`.
//!
//! The driver blocks M (MC rows), N (NC columns) and K (KC) for the caches and calls the tier's
//! register-blocked micro-kernel (`avx512_sgemm_8x48`, `avx2_sgemm_6x16`, `scalar_sgemm_4x8`)
//! per tile. The [`Epilogue`] runs on each tile right after its last K block, while the tile is
//! still in L1. [`Par`] splits the work into disjoint blocks of C over a rayon pool.
//!
//! A B packed with [`PackedB::pack_bf16`] runs the same driver on bf16 pairs ([`bf16`]):
//! AVX-512 BF16's `vdpbf16ps` where present, twice the multiply-adds per instruction.

pub mod bf16;
pub mod bf16x6;
pub(crate) mod driver;
pub(crate) mod kernels;
mod pack;
pub(crate) mod validate;

pub(crate) use pack::AlignedVec;
pub use pack::PackedB;

use crate::cpu::{self, CpuTier};
use crate::error::{check_tier, KernelError};

/// Element-wise activation applied in the GEMM epilogue.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Activation {
    /// Identity.
    #[default]
    None,
    /// `max(x, 0)`.
    Relu,
    /// `min(max(x, min), max)`; ReLU6 is `Clip { min: 0, max: 6 }`. Requires `min <= max`.
    Clip { min: f32, max: f32 },
    /// `0.5 x (1 + erf(x / sqrt 2))` (the exact GELU; erf within 1e-6).
    GeluErf,
    /// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`.
    GeluTanh,
    /// `x * sigmoid(x)` (SiLU, swish).
    Silu,
}

impl Activation {
    /// `Clip { min: 0, max: 6 }`.
    pub const RELU6: Activation = Activation::Clip { min: 0.0, max: 6.0 };
}

/// A matrix added after the activation: `m x n` row-major with row stride `ld`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Residual<'a> {
    pub data: &'a [f32],
    pub ld: usize,
}

/// What happens to each output element `s = sum_k A[i][k] * B[k][j]`:
///
/// `C[i][j] = act(s + bias[j] + row_bias[i] + (accumulate ? C[i][j] : 0)) + residual[i][j]`
///
/// Absent parts drop out: the default epilogue is plain `C = A·B`. `accumulate` adds the old C
/// before the activation, so a product split over K in several calls (activation only on the
/// last) gives the same result as one call.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Epilogue<'a> {
    /// One value per column of C (`n` values).
    pub bias: Option<&'a [f32]>,
    /// One value per row of C (`m` values): a convolution's bias in the `W · columns` form.
    pub row_bias: Option<&'a [f32]>,
    pub activation: Activation,
    pub residual: Option<Residual<'a>>,
    /// Add the GEMM into C instead of overwriting it.
    pub accumulate: bool,
}

impl<'a> Epilogue<'a> {
    /// Plain `C = A·B`.
    pub const NONE: Epilogue<'static> =
        Epilogue { bias: None, row_bias: None, activation: Activation::None, residual: None, accumulate: false };

    pub fn with_bias(mut self, bias: &'a [f32]) -> Self {
        self.bias = Some(bias);
        self
    }

    pub fn with_row_bias(mut self, row_bias: &'a [f32]) -> Self {
        self.row_bias = Some(row_bias);
        self
    }

    pub fn with_activation(mut self, activation: Activation) -> Self {
        self.activation = activation;
        self
    }

    pub fn with_residual(mut self, data: &'a [f32], ld: usize) -> Self {
        self.residual = Some(Residual { data, ld });
        self
    }

    pub fn accumulating(mut self) -> Self {
        self.accumulate = true;
        self
    }

    /// True when the epilogue has nothing to do after the products are stored.
    fn is_store_only(&self) -> bool {
        self.bias.is_none() && self.row_bias.is_none() && self.residual.is_none() && self.activation == Activation::None
    }
}

/// How a GEMM may use threads.
#[derive(Clone, Copy, Debug, Default)]
pub enum Par<'a> {
    /// The calling thread only; no rayon involvement.
    #[default]
    Seq,
    /// Split across this pool's threads (the caller blocks until done).
    Pool(&'a rayon::ThreadPool),
    /// Split across the current rayon pool (the global one outside any `install`).
    Current,
}

impl Par<'_> {
    /// Threads this setting can use.
    pub fn threads(&self) -> usize {
        match self {
            Par::Seq => 1,
            Par::Pool(p) => p.current_num_threads().max(1),
            Par::Current => rayon::current_num_threads().max(1),
        }
    }

    /// Runs `task(0..tasks)`, task 0 on the calling thread and the others spawned on this
    /// setting's pool; returns when all are done.
    pub(crate) fn run_tasks(&self, tasks: usize, task: impl Fn(usize) + Sync) {
        fn spawn_rest<'s>(s: &rayon::Scope<'s>, tasks: usize, task: &'s (impl Fn(usize) + Sync)) {
            for t in 1..tasks {
                s.spawn(move |_| task(t));
            }
            task(0);
        }
        match self {
            _ if tasks <= 1 => (0..tasks).for_each(task),
            Par::Pool(pool) => pool.scope(|s| spawn_rest(s, tasks, &task)),
            _ => rayon::scope(|s| spawn_rest(s, tasks, &task)),
        }
    }
}

/// `C = epilogue(A·B)` with B pre-packed: A is `m x b.k()` (stride `lda`), C is `m x b.n()`
/// (stride `ldc`). Uses the kernels of `b.tier()`.
#[allow(clippy::too_many_arguments)]
pub fn gemm(
    m: usize,
    a: &[f32],
    lda: usize,
    b: &PackedB,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    validate::check_gemm(m, b.k(), b.n(), a.len(), lda, c.len(), ldc, &epilogue)?;
    // Re-checked so that a `PackedB` can never drive kernels the host lacks.
    check_tier(b.tier())?;
    driver::run(m, a, lda, b, c, ldc, &epilogue, par);
    Ok(())
}

/// `C = epilogue(A·B)` with B unpacked (row-major `k x n`, stride `ldb`), using the active
/// tier ([`cpu::tier`]). B is packed block by block as the tiles reach it, into a small
/// thread-local buffer that stays in cache (and is reused by later calls, so they do not
/// allocate). For a B used more than once, pack it once with [`PackedB`] and call [`gemm`].
#[allow(clippy::too_many_arguments)]
pub fn sgemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    sgemm_tier(cpu::tier(), m, k, n, a, lda, b, ldb, c, ldc, epilogue, par)
}

/// [`sgemm`] with the kernels of `tier`, which the host must support (tests and benchmarks use
/// this to cover every tier).
#[allow(clippy::too_many_arguments)]
pub fn sgemm_tier(
    tier: CpuTier,
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    lda: usize,
    b: &[f32],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    epilogue: Epilogue<'_>,
    par: Par<'_>,
) -> Result<(), KernelError> {
    validate::check_gemm(m, k, n, a.len(), lda, c.len(), ldc, &epilogue)?;
    validate::matrix_extent("B", b.len(), k, n, ldb)?;
    check_tier(tier)?;
    driver::run_unpacked(tier, (m, k, n), a, lda, b, ldb, c, ldc, &epilogue, par);
    Ok(())
}

#[cfg(test)]
mod tests;

//! Row-wise f32 kernels: softmax (optionally scaled and masked), layer normalisation,
//! element-wise activations and broadcasting binary ops.
//!
//! One generic body per kernel, instantiated for the scalar (`f32`), AVX2 (`__m256`) and
//! AVX-512 (`__m512`) lanes of the crate's `Simd` trait and chosen at run time from [`cpu::tier`]. Row tails
//! shorter than a vector go through the one-lane instantiation of the same math. Every kernel
//! is sequential; callers split rows over threads. [`reference`](mod@reference) holds f64 scalar
//! counterparts.

use crate::cpu::{self, CpuTier};
use crate::error::{check_tier, KernelError};
use crate::gemm::Activation;
use crate::math;
use crate::simd::Simd;

const KERNEL: &str = "rows";

/// Defines `$name(tier, args..)`, which runs `$body::<S>(args..)` with the lanes of `tier`.
/// The tier must be supported by the host (callers pass [`cpu::tier`] or a checked tier).
macro_rules! tiered {
    ($(#[$m:meta])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) => $body:ident) => {
        $(#[$m])*
        #[allow(clippy::too_many_arguments)]
        fn $name(tier: CpuTier, $($arg: $ty),*) {
            debug_assert!(tier.is_supported());
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) {
                    // SAFETY: avx512f is enabled here; the body's own contract is the caller's.
                    unsafe { $body::<std::arch::x86_64::__m512>($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) {
                    // SAFETY: avx2 and fma are enabled here.
                    unsafe { $body::<std::arch::x86_64::__m256>($($arg),*) }
                }
                match tier {
                    // SAFETY: the tier is supported (see above), so its features are present;
                    // the pointer contracts are checked by the public wrappers.
                    CpuTier::Avx512 | CpuTier::Amx => return unsafe { avx512($($arg),*) },
                    CpuTier::Avx2 => return unsafe { avx2($($arg),*) },
                    CpuTier::Generic => {}
                }
            }
            // SAFETY: one-lane code needs no extension.
            unsafe { $body::<f32>($($arg),*) }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Softmax

pub(crate) use tiered;

/// What the row kernels need beyond [`Simd`]: horizontal reductions (as trees, so a row's
/// reduction does not serialise 16 dependent operations) and softmax's `e^x`.
pub(crate) trait Lanes: Simd {
    /// Largest lane (NaN if a NaN lane wins a comparison; softmax then gives NaN, as it must).
    unsafe fn hmax(self) -> f32;
    /// Sum of the lanes.
    unsafe fn hsum(self) -> f32;
    /// A running sum of many vectors: the vector itself for SIMD lanes (each lane adds only
    /// `n / LANES` values), f64 for one lane (which adds all `n`).
    type Acc: Copy;
    unsafe fn acc_zero() -> Self::Acc;
    unsafe fn acc_add(acc: Self::Acc, v: Self) -> Self::Acc;
    unsafe fn acc_total(acc: Self::Acc) -> f64;
    /// `e^x` for `x <= 0` (or NaN, which propagates), exactly 0 where the true value is below
    /// f32's normal range, so `-inf` (masked) positions get exactly 0.
    unsafe fn exp_nonpos(self) -> Self;
}

/// [`math::exp`] with results at or below `e^-87` (where it clamps) flushed to 0; the true
/// values there are below 1.7e-38.
#[inline(always)]
unsafe fn exp_flush<S: Simd>(x: S) -> S {
    // keep = clamp((x + 87) * 2^20, 0, 1): 0 at or below -87, else 1, because f32 values near
    // -87 are 2^-17 apart. NaN stays NaN (min/max return their second operand on NaN).
    let keep = S::splat(1.0).min(S::splat(1_048_576.0).mul(S::zero().max(x.add(S::splat(87.0)))));
    math::exp(x).mul(keep)
}

impl Lanes for f32 {
    #[inline(always)]
    unsafe fn hmax(self) -> f32 {
        self
    }
    #[inline(always)]
    unsafe fn hsum(self) -> f32 {
        self
    }
    type Acc = f64;
    #[inline(always)]
    unsafe fn acc_zero() -> f64 {
        0.0
    }
    #[inline(always)]
    unsafe fn acc_add(acc: f64, v: f32) -> f64 {
        acc + v as f64
    }
    #[inline(always)]
    unsafe fn acc_total(acc: f64) -> f64 {
        acc
    }
    #[inline(always)]
    unsafe fn exp_nonpos(self) -> Self {
        exp_flush(self)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_exp {
    use super::{exp_flush, Lanes};
    use crate::simd::Simd;
    use std::arch::x86_64::*;

    impl Lanes for __m256 {
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            let h = _mm_max_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps::<1>(self));
            let h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)))
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            let h = _mm_add_ps(_mm256_castps256_ps128(self), _mm256_extractf128_ps::<1>(self));
            let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)))
        }
        type Acc = Self;
        #[inline(always)]
        unsafe fn acc_zero() -> Self {
            Self::zero()
        }
        #[inline(always)]
        unsafe fn acc_add(acc: Self, v: Self) -> Self {
            acc.add(v)
        }
        #[inline(always)]
        unsafe fn acc_total(acc: Self) -> f64 {
            acc.hsum() as f64
        }
        #[inline(always)]
        unsafe fn exp_nonpos(self) -> Self {
            exp_flush(self)
        }
    }

    impl Lanes for __m512 {
        #[inline(always)]
        unsafe fn hmax(self) -> f32 {
            _mm512_reduce_max_ps(self)
        }
        #[inline(always)]
        unsafe fn hsum(self) -> f32 {
            _mm512_reduce_add_ps(self)
        }
        type Acc = Self;
        #[inline(always)]
        unsafe fn acc_zero() -> Self {
            Self::zero()
        }
        #[inline(always)]
        unsafe fn acc_add(acc: Self, v: Self) -> Self {
            acc.add(v)
        }
        #[inline(always)]
        unsafe fn acc_total(acc: Self) -> f64 {
            acc.hsum() as f64
        }
        /// Cephes' reduction `x = n ln2 + r` with `n` rounded inside one FMA (the magic-number
        /// trick), a degree-5 minimax polynomial for `e^r` on `|r| <= ln2/2` (relative error
        /// 1.4e-7 with f32 coefficients), and `vscalefps` applying `2^n`. Ten operations on
        /// the FMA ports per vector, against thirteen for [`crate::math::exp`] plus the flush.
        ///
        /// Lanes at or below -87 (results near or under f32's normal range) are zeroed by the scale's mask
        /// rather than scaled to subnormals: every subnormal result costs a microcode assist,
        /// and attention over padded sequences has most of its scores there (MiniLM's
        /// attention with 118 of 128 keys masked took 4.7x as long as unmasked).
        #[inline(always)]
        unsafe fn exp_nonpos(self) -> Self {
            const LOG2E: f32 = std::f32::consts::LOG2_E;
            const LN2_HI: f32 = 0.693_359_4;
            const LN2_LO: f32 = -2.121_944_4e-4;
            // 1.5 * 2^23: adding it rounds |t| < 2^22 to an integer in the low mantissa bits.
            const MAGIC: f32 = 12_582_912.0;
            // Below -104, e^x rounds to 0 whatever n is; the bound keeps n*ln2 exact and turns
            // -inf into a finite value (max returns x when x is NaN).
            let x = _mm512_max_ps(_mm512_set1_ps(-104.0), self);
            let magic = _mm512_set1_ps(MAGIC);
            let n = _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(LOG2E), magic), magic);
            let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_HI), x);
            let r = _mm512_fmadd_ps(n, _mm512_set1_ps(-LN2_LO), r);
            let mut p = _mm512_set1_ps(EXP_POLY5[5]);
            for &c in EXP_POLY5[..5].iter().rev() {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            // Not-less-or-equal, unordered: NaN lanes are kept (and propagate).
            let normal = _mm512_cmp_ps_mask::<_CMP_NLE_UQ>(self, _mm512_set1_ps(-87.0));
            _mm512_maskz_scalef_ps(normal, p, n)
        }
    }

    /// Minimax (relative error) coefficients of `e^r` on `[-ln2/2, ln2/2]`, constant first
    /// (Remez exchange in f64, rounded to f32).
    const EXP_POLY5: [f32; 6] = [1.000_000_1, 0.999_999_7, 0.499_988_94, 0.166_675_75, 0.041_915_383, 0.008_297_655];
}

/// `z = x (* scale if SCALED) (+ mask if MASKED)` stored to `dst`; returns `z` (for the running
/// max).
#[inline(always)]
unsafe fn softmax_load<T: Simd, const MASKED: bool, const SCALED: bool>(
    src: *const f32,
    mask: *const f32,
    dst: *mut f32,
    scale: T,
) -> T {
    let x = T::load(src);
    let x = if SCALED { x.mul(scale) } else { x };
    let z = if MASKED { x.add(T::load(mask)) } else { x };
    z.store(dst);
    z
}

/// Softmax of `x * scale + mask` over `R` independent rows of `n` values, row `r` from
/// `src[r]` into `dst[r]` (which may equal `src[r]`) with mask row `mask[r]` (or none if
/// null). Rows go through each pass together so that their dependency chains (the exp
/// polynomial, the horizontal max and sum) overlap. A row that is all `-inf` becomes NaN (as
/// ONNX's Softmax). Unless `normalise`, rows keep the unnormalised `e^(z - max)`; `inv[r]`
/// receives `1 / sum` (NaN for a row of NaN).
///
/// # Safety
/// Every pointer valid for `n` f32 (masks unless null); `S`'s features available.
#[inline(always)]
unsafe fn softmax_group<S: Lanes, const R: usize, const MASKED: bool, const SCALED: bool>(
    src: [*const f32; R],
    dst: [*mut f32; R],
    mask: [*const f32; R],
    n: usize,
    scale: f32,
    normalise: bool,
) -> [f32; R] {
    let l = S::LANES;
    let full = n - n % l;
    // Masks are only read when MASKED (then none is null).
    let at = |p: *const f32, j: usize| p.wrapping_add(j);
    let vs = S::splat(scale);
    let mut vmax = [S::splat(f32::NEG_INFINITY); R];
    let mut j = 0;
    while j < full {
        for r in 0..R {
            vmax[r] = vmax[r].max(softmax_load::<S, MASKED, SCALED>(src[r].add(j), at(mask[r], j), dst[r].add(j), vs));
        }
        j += l;
    }
    let mut max = [0f32; R];
    for r in 0..R {
        max[r] = vmax[r].hmax();
        for j in full..n {
            let z = softmax_load::<f32, MASKED, SCALED>(src[r].add(j), at(mask[r], j), dst[r].add(j), scale);
            if z > max[r] {
                max[r] = z;
            }
        }
        // All -inf: finish the passes harmlessly, then overwrite the row with NaN.
        if max[r] == f32::NEG_INFINITY {
            vmax[r] = S::zero();
        } else {
            vmax[r] = S::splat(max[r]);
        }
    }
    let mut vsum = [S::acc_zero(); R];
    let mut j = 0;
    while j < full {
        for r in 0..R {
            let e = S::load(dst[r].add(j)).sub(vmax[r]).exp_nonpos();
            e.store(dst[r].add(j));
            vsum[r] = S::acc_add(vsum[r], e);
        }
        j += l;
    }
    let mut inv = [0f32; R];
    for r in 0..R {
        let mut sum = S::acc_total(vsum[r]);
        for j in full..n {
            let e = (*dst[r].add(j) - max[r]).exp_nonpos();
            *dst[r].add(j) = e;
            sum += e as f64;
        }
        inv[r] = (1.0 / sum) as f32;
    }
    if normalise {
        let vinv: [S; R] = std::array::from_fn(|r| S::splat(inv[r]));
        let mut j = 0;
        while j < full {
            for r in 0..R {
                S::load(dst[r].add(j)).mul(vinv[r]).store(dst[r].add(j));
            }
            j += l;
        }
        for r in 0..R {
            for j in full..n {
                *dst[r].add(j) *= inv[r];
            }
        }
    }
    for r in 0..R {
        if max[r] == f32::NEG_INFINITY {
            for j in 0..n {
                *dst[r].add(j) = f32::NAN;
            }
            inv[r] = f32::NAN;
        }
    }
    inv
}

/// Rows handled together by [`softmax_group`].
const SOFTMAX_GROUP: usize = 4;

/// Softmax of `rows` rows of `n` values, `src` to `dst` (may be equal); row `r` uses mask row
/// `mask + r * mask_stride` unless `mask` is null. With `inv` non-null, rows stay unnormalised
/// and `inv[r]` receives row `r`'s `1 / sum`.
///
/// # Safety
/// Pointers valid for every row they reach (`inv` for `rows` values); `S`'s features
/// available.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_rows_body<S: Lanes>(
    src: *const f32,
    dst: *mut f32,
    rows: usize,
    n: usize,
    scale: f32,
    mask: *const f32,
    mask_stride: usize,
    inv: *mut f32,
) {
    // Compile-time variants drop the mask loads and the multiply by 1 (attention folds its
    // scale into Kᵀ).
    let (m, st) = (mask, mask_stride);
    match (mask.is_null(), scale == 1.0) {
        (true, true) => softmax_rows_groups::<S, false, false>(src, dst, rows, n, scale, m, st, inv),
        (true, false) => softmax_rows_groups::<S, false, true>(src, dst, rows, n, scale, m, st, inv),
        (false, true) => softmax_rows_groups::<S, true, false>(src, dst, rows, n, scale, m, st, inv),
        (false, false) => softmax_rows_groups::<S, true, true>(src, dst, rows, n, scale, m, st, inv),
    }
}

/// [`softmax_rows_body`] with the mask's presence known at compile time.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn softmax_rows_groups<S: Lanes, const MASKED: bool, const SCALED: bool>(
    src: *const f32,
    dst: *mut f32,
    rows: usize,
    n: usize,
    scale: f32,
    mask: *const f32,
    mask_stride: usize,
    inv: *mut f32,
) {
    const G: usize = SOFTMAX_GROUP;
    let mask_at = |r: usize| mask.wrapping_add(r * mask_stride);
    let put = |r0: usize, got: &[f32]| {
        if !inv.is_null() {
            for (i, &v) in got.iter().enumerate() {
                *inv.add(r0 + i) = v;
            }
        }
    };
    let mut r0 = 0;
    while r0 + G <= rows {
        let got = softmax_group::<S, G, MASKED, SCALED>(
            std::array::from_fn(|i| src.add((r0 + i) * n)),
            std::array::from_fn(|i| dst.add((r0 + i) * n)),
            std::array::from_fn(|i| mask_at(r0 + i)),
            n,
            scale,
            inv.is_null(),
        );
        put(r0, &got);
        r0 += G;
    }
    while r0 < rows {
        let got = softmax_group::<S, 1, MASKED, SCALED>(
            [src.add(r0 * n)],
            [dst.add(r0 * n)],
            [mask_at(r0)],
            n,
            scale,
            inv.is_null(),
        );
        put(r0, &got);
        r0 += 1;
    }
}

tiered!(fn softmax_rows_tier(src: *const f32, dst: *mut f32, rows: usize, n: usize, scale: f32, mask: *const f32, mask_stride: usize, inv: *mut f32) => softmax_rows_body);

/// `y[r * ld + j] *= f[r]` for `j < n`, `r < rows`.
///
/// # Safety
/// `y` valid for `(rows - 1) * ld + n` f32, `f` for `rows`; `S`'s features available.
#[inline(always)]
unsafe fn scale_rows_body<S: Simd>(y: *mut f32, rows: usize, n: usize, ld: usize, f: *const f32) {
    for r in 0..rows {
        let (y, v) = (y.add(r * ld), *f.add(r));
        let vs = S::splat(v);
        let mut j = 0;
        while j + S::LANES <= n {
            S::load(y.add(j)).mul(vs).store(y.add(j));
            j += S::LANES;
        }
        while j < n {
            *y.add(j) *= v;
            j += 1;
        }
    }
}

tiered!(fn scale_rows_tier(y: *mut f32, rows: usize, n: usize, ld: usize, f: *const f32) => scale_rows_body);

fn check_rows(what: &str, len: usize, n: usize) -> Result<usize, KernelError> {
    if n == 0 {
        return if len == 0 {
            Ok(0)
        } else {
            Err(KernelError::shape(KERNEL, format!("{what}: rows of 0 values but {len} values given")))
        };
    }
    if !len.is_multiple_of(n) {
        return Err(KernelError::shape(KERNEL, format!("{what}: {len} values are not whole rows of {n}")));
    }
    Ok(len / n)
}

fn check_same(what: &str, a: usize, b: usize) -> Result<(), KernelError> {
    if a != b {
        return Err(KernelError::shape(KERNEL, format!("{what}: input has {a} values, output {b}")));
    }
    Ok(())
}

/// Softmax of each row of `n` values of `x` into `out` (same length).
pub fn softmax(x: &[f32], n: usize, out: &mut [f32]) -> Result<(), KernelError> {
    softmax_with(cpu::tier(), x, n, out)
}

/// [`softmax`] with the lanes of `tier`, which the host must support.
pub fn softmax_with(tier: CpuTier, x: &[f32], n: usize, out: &mut [f32]) -> Result<(), KernelError> {
    check_tier(tier)?;
    check_same("softmax", x.len(), out.len())?;
    let rows = check_rows("softmax", x.len(), n)?;
    softmax_rows_tier(tier, x.as_ptr(), out.as_mut_ptr(), rows, n, 1.0, std::ptr::null(), 0, std::ptr::null_mut());
    Ok(())
}

/// In place: `row = softmax(row * scale + mask)`, `mask` (if any) as long as `row`. A row whose
/// every value is `-inf` after masking becomes NaN, as ONNX's Softmax.
pub fn softmax_scaled_masked(row: &mut [f32], scale: f32, mask: Option<&[f32]>) -> Result<(), KernelError> {
    softmax_scaled_masked_with(cpu::tier(), row, scale, mask)
}

/// [`softmax_scaled_masked`] with the lanes of `tier`, which the host must support.
pub fn softmax_scaled_masked_with(
    tier: CpuTier,
    row: &mut [f32],
    scale: f32,
    mask: Option<&[f32]>,
) -> Result<(), KernelError> {
    check_tier(tier)?;
    if let Some(m) = mask {
        if m.len() != row.len() {
            return Err(KernelError::shape(KERNEL, format!("softmax mask of {} for a row of {}", m.len(), row.len())));
        }
    }
    let p = row.as_mut_ptr();
    let m = mask.map_or(std::ptr::null(), <[f32]>::as_ptr);
    softmax_rows_tier(tier, p, p, 1, row.len(), scale, m, 0, std::ptr::null_mut());
    Ok(())
}

/// In place on `rows` rows of `n` in `s`: row `r` gets `softmax(row * scale + mask row)` where
/// the mask row starts at `r * mask_stride` (0 repeats one row). With `inv` (one value per
/// row), rows are left unnormalised (`e^(z - max)`) and `inv[r]` receives `1 / sum`, for the
/// caller to apply to a smaller product (attention's `P·V`). The caller has checked `tier`.
pub(crate) fn softmax_block(
    tier: CpuTier,
    s: &mut [f32],
    n: usize,
    scale: f32,
    mask: Option<(&[f32], usize)>,
    inv: Option<&mut [f32]>,
) -> Result<(), KernelError> {
    let rows = check_rows("softmax block", s.len(), n)?;
    let (m, stride) = match mask {
        Some((m, stride)) => {
            let need = if rows == 0 { 0 } else { (rows - 1) * stride + n };
            if m.len() < need {
                return Err(KernelError::shape(KERNEL, format!("softmax block mask of {} needs {need}", m.len())));
            }
            (m.as_ptr(), stride)
        }
        None => (std::ptr::null(), 0),
    };
    let inv = match inv {
        Some(inv) if inv.len() < rows => {
            return Err(KernelError::shape(KERNEL, format!("{} sums for {rows} softmax rows", inv.len())));
        }
        Some(inv) => inv.as_mut_ptr(),
        None => std::ptr::null_mut(),
    };
    let p = s.as_mut_ptr();
    softmax_rows_tier(tier, p, p, rows, n, scale, m, stride, inv);
    Ok(())
}

/// `y[r * ld + j] *= f[r]` for `r < f.len()`, `j < n`. The caller has checked `tier`.
pub(crate) fn scale_rows(tier: CpuTier, y: &mut [f32], n: usize, ld: usize, f: &[f32]) -> Result<(), KernelError> {
    let rows = f.len();
    if rows > 0 && (n > ld || y.len() < (rows - 1) * ld + n) {
        return Err(KernelError::shape(KERNEL, format!("scale_rows: {rows} rows of {n} (stride {ld}) in {}", y.len())));
    }
    if rows > 0 {
        scale_rows_tier(tier, y.as_mut_ptr(), rows, n, ld, f.as_ptr());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Layer normalisation

/// `(x - hi) - lo`: `x` minus the mean held as an f32 pair, so the centred value keeps the
/// f64 mean's accuracy even when the mean is large (`x - hi` is exact when `x` is near `hi`).
#[inline(always)]
unsafe fn centred<T: Simd>(x: *const f32, hi: T, lo: T) -> T {
    T::load(x).sub(hi).sub(lo)
}

/// Layer norm of `R` rows of `n` (`n >= 1`) at once (their reduction chains overlap): mean
/// from values shifted by each row's first value (f32 lanes, f64 total), variance from the
/// centred values, both exact enough for rows with a large common offset.
///
/// # Safety
/// Every `x[r]`, `y[r]` valid for `n` f32, `scale` and `bias` for `n`; `S`'s features
/// available.
#[inline(always)]
unsafe fn layer_norm_group<S: Lanes, const R: usize>(
    x: [*const f32; R],
    y: [*mut f32; R],
    n: usize,
    scale: *const f32,
    bias: *const f32,
    eps: f32,
) {
    let l = S::LANES;
    let full = n - n % l;
    let x0: [f32; R] = std::array::from_fn(|r| *x[r]);
    let v0: [S; R] = std::array::from_fn(|r| S::splat(x0[r]));
    let mut acc = [S::zero(); R];
    let mut j = 0;
    while j < full {
        for r in 0..R {
            acc[r] = acc[r].add(S::load(x[r].add(j)).sub(v0[r]));
        }
        j += l;
    }
    let mut hi = [0f32; R];
    let mut lo = [0f32; R];
    for r in 0..R {
        let mut shifted = acc[r].hsum() as f64;
        for j in full..n {
            shifted += (*x[r].add(j) - x0[r]) as f64;
        }
        let mean = x0[r] as f64 + shifted / n as f64;
        hi[r] = mean as f32;
        lo[r] = (mean - hi[r] as f64) as f32;
    }
    let vhi: [S; R] = std::array::from_fn(|r| S::splat(hi[r]));
    let vlo: [S; R] = std::array::from_fn(|r| S::splat(lo[r]));
    let mut acc = [S::zero(); R];
    let mut j = 0;
    while j < full {
        for r in 0..R {
            let d = centred(x[r].add(j), vhi[r], vlo[r]);
            acc[r] = d.mul_add(d, acc[r]);
        }
        j += l;
    }
    let mut inv = [0f32; R];
    for r in 0..R {
        let mut sq = acc[r].hsum() as f64;
        for j in full..n {
            let d = centred::<f32>(x[r].add(j), hi[r], lo[r]) as f64;
            sq += d * d;
        }
        inv[r] = (1.0 / (sq / n as f64 + eps as f64).sqrt()) as f32;
    }
    let vinv: [S; R] = std::array::from_fn(|r| S::splat(inv[r]));
    let mut j = 0;
    while j < full {
        let (sc, bi) = (S::load(scale.add(j)), S::load(bias.add(j)));
        for r in 0..R {
            let d = centred(x[r].add(j), vhi[r], vlo[r]);
            d.mul(vinv[r]).mul_add(sc, bi).store(y[r].add(j));
        }
        j += l;
    }
    for r in 0..R {
        for j in full..n {
            let d = centred::<f32>(x[r].add(j), hi[r], lo[r]);
            *y[r].add(j) = d * inv[r] * *scale.add(j) + *bias.add(j);
        }
    }
}

/// Layer norm of `rows` rows of `n` (`n >= 1`), four rows at a time.
///
/// # Safety
/// `x`, `y` valid for `rows * n` f32, `scale` and `bias` for `n`; `S`'s features available.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn layer_norm_body<S: Lanes>(
    x: *const f32,
    y: *mut f32,
    rows: usize,
    n: usize,
    scale: *const f32,
    bias: *const f32,
    eps: f32,
) {
    const G: usize = 4;
    let mut r0 = 0;
    while r0 + G <= rows {
        let xs = std::array::from_fn(|i| x.add((r0 + i) * n));
        let ys = std::array::from_fn(|i| y.add((r0 + i) * n));
        layer_norm_group::<S, G>(xs, ys, n, scale, bias, eps);
        r0 += G;
    }
    while r0 < rows {
        layer_norm_group::<S, 1>([x.add(r0 * n)], [y.add(r0 * n)], n, scale, bias, eps);
        r0 += 1;
    }
}

tiered!(fn layer_norm_tier(x: *const f32, y: *mut f32, rows: usize, n: usize, scale: *const f32, bias: *const f32, eps: f32) => layer_norm_body);

/// Layer normalisation of each row of `n` values: `(x - mean) / sqrt(var + eps) * scale + bias`
/// with the biased variance; `scale` and `bias` hold `n` values.
pub fn layer_norm(
    x: &[f32],
    n: usize,
    scale: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    layer_norm_with(cpu::tier(), x, n, scale, bias, eps, out)
}

/// [`layer_norm`] with the lanes of `tier`, which the host must support.
pub fn layer_norm_with(
    tier: CpuTier,
    x: &[f32],
    n: usize,
    scale: &[f32],
    bias: &[f32],
    eps: f32,
    out: &mut [f32],
) -> Result<(), KernelError> {
    check_tier(tier)?;
    check_same("layer_norm", x.len(), out.len())?;
    let rows = check_rows("layer_norm", x.len(), n)?;
    if scale.len() != n || bias.len() != n {
        return Err(KernelError::shape(
            KERNEL,
            format!("layer_norm: scale ({}) and bias ({}) must hold {n} values", scale.len(), bias.len()),
        ));
    }
    if rows > 0 {
        layer_norm_tier(tier, x.as_ptr(), out.as_mut_ptr(), rows, n, scale.as_ptr(), bias.as_ptr(), eps);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Activations

const ACT_RELU: u8 = 1;
const ACT_CLIP: u8 = 2;
const ACT_GELU_ERF: u8 = 3;
const ACT_GELU_TANH: u8 = 4;
const ACT_SILU: u8 = 5;

/// The GEMM epilogue's activation math (same functions, same NaN behaviour).
#[inline(always)]
unsafe fn act<T: Simd, const A: u8>(x: T, lo: f32, hi: f32) -> T {
    // NaN propagates: min/max return their second operand when either is NaN.
    match A {
        ACT_RELU => T::zero().max(x),
        ACT_CLIP => T::splat(hi).min(T::splat(lo).max(x)),
        ACT_GELU_ERF => math::gelu_erf(x),
        ACT_GELU_TANH => math::gelu_tanh(x),
        ACT_SILU => math::silu(x),
        _ => x,
    }
}

#[inline(always)]
unsafe fn map_body_a<S: Simd, const A: u8>(x: *const f32, y: *mut f32, len: usize, lo: f32, hi: f32) {
    let l = S::LANES;
    let mut j = 0;
    while j + l <= len {
        act::<S, A>(S::load(x.add(j)), lo, hi).store(y.add(j));
        j += l;
    }
    while j < len {
        *y.add(j) = act::<f32, A>(*x.add(j), lo, hi);
        j += 1;
    }
}

/// # Safety
/// `x`, `y` valid for `len` f32; `S`'s features available.
#[inline(always)]
unsafe fn map_body<S: Simd>(x: *const f32, y: *mut f32, len: usize, act: Activation) {
    match act {
        Activation::None => std::ptr::copy(x, y, len),
        Activation::Relu => map_body_a::<S, ACT_RELU>(x, y, len, 0.0, 0.0),
        Activation::Clip { min, max } => map_body_a::<S, ACT_CLIP>(x, y, len, min, max),
        Activation::GeluErf => map_body_a::<S, ACT_GELU_ERF>(x, y, len, 0.0, 0.0),
        Activation::GeluTanh => map_body_a::<S, ACT_GELU_TANH>(x, y, len, 0.0, 0.0),
        Activation::Silu => map_body_a::<S, ACT_SILU>(x, y, len, 0.0, 0.0),
    }
}

tiered!(fn map_tier(x: *const f32, y: *mut f32, len: usize, act: Activation) => map_body);

/// `out[i] = act(x[i])` with the GEMM epilogue's activation math.
pub fn map_activation(x: &[f32], act: Activation, out: &mut [f32]) -> Result<(), KernelError> {
    map_activation_with(cpu::tier(), x, act, out)
}

/// [`map_activation`] with the lanes of `tier`, which the host must support.
pub fn map_activation_with(tier: CpuTier, x: &[f32], act: Activation, out: &mut [f32]) -> Result<(), KernelError> {
    check_tier(tier)?;
    check_same("map_activation", x.len(), out.len())?;
    if let Activation::Clip { min, max } = act {
        if min.is_nan() || max.is_nan() || min > max {
            return Err(KernelError::shape(KERNEL, format!("clip range [{min}, {max}] is empty")));
        }
    }
    map_tier(tier, x.as_ptr(), out.as_mut_ptr(), x.len(), act);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Binary ops

/// An element-wise binary operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
}

#[inline(always)]
unsafe fn op<T: Simd, const O: u8>(a: T, b: T) -> T {
    match O {
        0 => a.add(b),
        1 => a.sub(b),
        2 => a.mul(b),
        _ => a.div(b),
    }
}

/// `y = a op b` over `rows` rows of `n`; `b` advances by `b_stride` per row (0 repeats one row)
/// or is one scalar when `b_scalar`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn binary_body_o<S: Simd, const O: u8>(
    a: *const f32,
    b: *const f32,
    y: *mut f32,
    rows: usize,
    n: usize,
    b_stride: usize,
    b_scalar: bool,
) {
    let l = S::LANES;
    if b_scalar {
        let (vb, sb) = (S::splat(*b), *b);
        let len = rows * n;
        let mut j = 0;
        while j + l <= len {
            op::<S, O>(S::load(a.add(j)), vb).store(y.add(j));
            j += l;
        }
        while j < len {
            *y.add(j) = op::<f32, O>(*a.add(j), sb);
            j += 1;
        }
        return;
    }
    for r in 0..rows {
        let (a, b, y) = (a.add(r * n), b.add(r * b_stride), y.add(r * n));
        let mut j = 0;
        while j + l <= n {
            op::<S, O>(S::load(a.add(j)), S::load(b.add(j))).store(y.add(j));
            j += l;
        }
        while j < n {
            *y.add(j) = op::<f32, O>(*a.add(j), *b.add(j));
            j += 1;
        }
    }
}

/// # Safety
/// See [`binary_body_o`]; `S`'s features available.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn binary_body<S: Simd>(
    op: BinaryOp,
    a: *const f32,
    b: *const f32,
    y: *mut f32,
    rows: usize,
    n: usize,
    b_stride: usize,
    b_scalar: bool,
) {
    match op {
        BinaryOp::Add => binary_body_o::<S, 0>(a, b, y, rows, n, b_stride, b_scalar),
        BinaryOp::Sub => binary_body_o::<S, 1>(a, b, y, rows, n, b_stride, b_scalar),
        BinaryOp::Mul => binary_body_o::<S, 2>(a, b, y, rows, n, b_stride, b_scalar),
        BinaryOp::Div => binary_body_o::<S, 3>(a, b, y, rows, n, b_stride, b_scalar),
    }
}

tiered!(fn binary_tier(op: BinaryOp, a: *const f32, b: *const f32, y: *mut f32, rows: usize, n: usize, b_stride: usize, b_scalar: bool) => binary_body);

/// `out = a op b` where `b` has `a`'s length, one value (a scalar), or `k` values repeated over
/// `a` taken as rows of `k` (`a.len()` a multiple of `k`).
pub fn binary(op: BinaryOp, a: &[f32], b: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    binary_with(cpu::tier(), op, a, b, out)
}

/// [`binary`] with the lanes of `tier`, which the host must support.
pub fn binary_with(tier: CpuTier, op: BinaryOp, a: &[f32], b: &[f32], out: &mut [f32]) -> Result<(), KernelError> {
    check_tier(tier)?;
    check_same("binary", a.len(), out.len())?;
    if a.is_empty() {
        return Ok(());
    }
    let (rows, n, b_stride, scalar) = if b.len() == a.len() {
        (1, a.len(), 0, false)
    } else if b.len() == 1 {
        (1, a.len(), 0, true)
    } else if !b.is_empty() && a.len().is_multiple_of(b.len()) {
        (a.len() / b.len(), b.len(), 0, false)
    } else {
        return Err(KernelError::shape(
            KERNEL,
            format!("binary: {} values do not broadcast over {}", b.len(), a.len()),
        ));
    };
    binary_tier(tier, op, a.as_ptr(), b.as_ptr(), out.as_mut_ptr(), rows, n, b_stride, scalar);
    Ok(())
}

/// Scalar references in f64 (obviously correct, for the property tests).
pub mod reference {
    use super::BinaryOp;
    use crate::gemm::Activation;

    /// Softmax of `x * scale + mask`: `z = x * scale + mask` and `z - max` rounded to f32 as any
    /// f32 kernel must (the f32 rounding of `z - max` alone is up to `|z - max| * 2^-24`
    /// relative in `e^(z - max)`), then `exp` and the normalisation in f64. All `-inf` gives
    /// NaN.
    pub fn softmax_scaled_masked(x: &[f32], scale: f32, mask: Option<&[f32]>) -> Vec<f64> {
        let z: Vec<f32> = x.iter().enumerate().map(|(j, &v)| v * scale + mask.map_or(0.0, |m| m[j])).collect();
        let max = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            return vec![f64::NAN; x.len()];
        }
        let e: Vec<f64> = z.iter().map(|&v| ((v - max) as f64).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }

    /// Layer norm of one row in f64.
    pub fn layer_norm(x: &[f32], scale: &[f32], bias: &[f32], eps: f32) -> Vec<f64> {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let inv = 1.0 / (var + eps as f64).sqrt();
        x.iter()
            .zip(scale.iter().zip(bias))
            .map(|(&v, (&s, &b))| (v as f64 - mean) * inv * s as f64 + b as f64)
            .collect()
    }

    /// The activation in f64 (as [`crate::reference::activation`]).
    pub fn activation(act: Activation, x: f32) -> f64 {
        crate::reference::activation(act, x as f64)
    }

    /// `a op b` in f32 (each is one correctly rounded operation).
    pub fn binary(op: BinaryOp, a: f32, b: f32) -> f32 {
        match op {
            BinaryOp::Add => a + b,
            BinaryOp::Sub => a - b,
            BinaryOp::Mul => a * b,
            BinaryOp::Div => a / b,
        }
    }
}

/// Rounds every value to the nearest f16 (ties to even, f16 subnormals and overflow to
/// infinity included) and back to f32, as a `Cast` to float16 and back does: the
/// `GatherBlockQuantized` tables with f16 scales produce f16 rows.
pub fn round_through_f16(v: &mut [f32]) {
    round_through_f16_with(cpu::tier(), v)
}

/// [`round_through_f16`] with the kernels of `tier` (an unsupported tier runs the scalar code).
pub fn round_through_f16_with(tier: CpuTier, v: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if tier >= CpuTier::Avx512 && tier.is_supported() {
        // SAFETY: AVX-512 F is present (the tier is supported).
        return unsafe { x86_f16::round_avx512(v) };
    }
    let _ = tier;
    for x in v {
        *x = half::f16::from_f32(*x).to_f32();
    }
}

#[cfg(target_arch = "x86_64")]
mod x86_f16 {
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX-512 F must be present.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn round_avx512(v: &mut [f32]) {
        const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
        let mut chunks = v.chunks_exact_mut(16);
        for c in &mut chunks {
            let x = _mm512_loadu_ps(c.as_ptr());
            _mm512_storeu_ps(c.as_mut_ptr(), _mm512_cvtph_ps(_mm512_cvtps_ph::<RNE>(x)));
        }
        for x in chunks.into_remainder() {
            *x = half::f16::from_f32(*x).to_f32();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::supported_tiers;
    use proptest::prelude::*;

    fn close(got: f32, want: f64, rel: f64, abs: f64) -> bool {
        if want.is_nan() {
            return got.is_nan();
        }
        (got as f64 - want).abs() <= abs + rel * want.abs()
    }

    #[test]
    fn softmax_hand_values() {
        // softmax([0, ln 2, ln 3]) = [1, 2, 3] / 6
        let x = [0.0, 2f32.ln(), 3f32.ln()];
        for tier in supported_tiers() {
            let mut y = [0.0; 3];
            softmax_with(tier, &x, 3, &mut y).unwrap();
            for (g, w) in y.iter().zip([1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0]) {
                assert!((g - w).abs() < 1e-7, "{tier}: {y:?}");
            }
        }
    }

    #[test]
    fn softmax_masked_rows() {
        for tier in supported_tiers() {
            // Masked (-inf and -1e30) positions get exactly 0; scale 0.5 on [2, 2] -> [1, 1].
            let mut row = vec![2.0f32; 37];
            let mut mask = vec![f32::NEG_INFINITY; 37];
            mask[3] = 0.0;
            mask[30] = 0.0;
            mask[36] = -1e30;
            softmax_scaled_masked_with(tier, &mut row, 0.5, Some(&mask)).unwrap();
            for (j, &v) in row.iter().enumerate() {
                let want = if j == 3 || j == 30 { 0.5 } else { 0.0 };
                assert_eq!(v, want, "{tier} at {j}");
            }
            // Everything masked: NaN, as ONNX.
            let mut row = vec![1.0f32; 20];
            let mask = vec![f32::NEG_INFINITY; 20];
            softmax_scaled_masked_with(tier, &mut row, 1.0, Some(&mask)).unwrap();
            assert!(row.iter().all(|v| v.is_nan()), "{tier}");
            // A NaN input poisons its row.
            let mut row = vec![1.0f32; 20];
            row[7] = f32::NAN;
            softmax_scaled_masked_with(tier, &mut row, 1.0, None).unwrap();
            assert!(row.iter().all(|v| v.is_nan()), "{tier}");
        }
    }

    #[test]
    fn softmax_flushes_results_below_the_normal_range() {
        // e^(x - max) for x - max in (-104, -87] is subnormal or 0 in f32: every tier gives
        // exactly 0 there (subnormals cost microcode assists), and e^-86 stays normal.
        // One 0, so the sum is 1 and y = e^x.
        let mut x: Vec<f32> = [-86.0, -87.0, -88.0, -95.0, -103.0, -120.0].repeat(6);
        x[17] = 0.0;
        for tier in supported_tiers() {
            let mut y = vec![0.0; x.len()];
            softmax_with(tier, &x, x.len(), &mut y).unwrap();
            for (j, (&v, &xv)) in y.iter().zip(&x).enumerate() {
                if xv <= -87.0 {
                    assert_eq!(v.to_bits(), 0, "{tier} at {j} ({xv})");
                } else {
                    assert!(v.is_normal(), "{tier} at {j} ({xv}): {v}");
                }
            }
        }
    }

    #[test]
    fn softmax_errors() {
        let mut y = [0.0; 4];
        assert!(softmax(&[1.0; 4], 3, &mut y).is_err());
        assert!(softmax(&[1.0; 3], 3, &mut y).is_err());
        assert!(softmax(&[1.0; 4], 0, &mut y).is_err());
        assert!(softmax(&[], 0, &mut []).is_ok());
        assert!(softmax_scaled_masked(&mut y, 1.0, Some(&[0.0; 3])).is_err());
        assert!(softmax_block(cpu::tier(), &mut y, 2, 1.0, Some((&[0.0; 3], 2)), None).is_err());
        assert!(softmax_block(cpu::tier(), &mut y, 2, 1.0, Some((&[0.0; 2], 0)), None).is_ok());
        assert!(softmax_block(cpu::tier(), &mut y, 2, 1.0, None, Some(&mut [0.0])).is_err());
        assert!(scale_rows(cpu::tier(), &mut y, 2, 1, &[1.0, 1.0]).is_err());
        assert!(scale_rows(cpu::tier(), &mut y, 2, 2, &[1.0; 3]).is_err());
    }

    #[test]
    fn unnormalised_block_then_scale_rows() {
        let (rows, n) = (3, 21);
        let x = normalish(rows * n, 0.0, 2.0, 9);
        let mask = normalish(n, 0.0, 1.0, 10);
        for tier in supported_tiers() {
            let mut s = x.clone();
            let mut inv = [0.0; 3];
            softmax_block(tier, &mut s, n, 0.5, Some((&mask, 0)), Some(&mut inv)).unwrap();
            // Rows of P·V with V = identity are P's rows: scale them as attention does.
            scale_rows(tier, &mut s, n, n, &inv).unwrap();
            for r in 0..rows {
                let want = reference::softmax_scaled_masked(&x[r * n..(r + 1) * n], 0.5, Some(&mask));
                for (g, w) in s[r * n..(r + 1) * n].iter().zip(&want) {
                    assert!(close(*g, *w, 1e-6, 0.0), "{tier}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn layer_norm_hand_values() {
        // [1, 2, 3, 4]: mean 2.5, var 1.25.
        let x = [1.0f32, 2.0, 3.0, 4.0];
        let inv = 1.0 / (1.25f64 + 1e-5).sqrt();
        for tier in supported_tiers() {
            let mut y = [0.0; 4];
            layer_norm_with(tier, &x, 4, &[1.0, 2.0, 1.0, 1.0], &[0.0, 0.0, 0.0, 10.0], 1e-5, &mut y).unwrap();
            let want = [-1.5 * inv, -inv, 0.5 * inv, 10.0 + 1.5 * inv];
            for (g, w) in y.iter().zip(want) {
                assert!((*g as f64 - w).abs() < 1e-6, "{tier}: {y:?}");
            }
        }
        let mut y = [0.0; 4];
        assert!(layer_norm(&x, 4, &[1.0; 3], &[0.0; 4], 1e-5, &mut y).is_err());
        assert!(layer_norm(&x, 3, &[1.0; 3], &[0.0; 3], 1e-5, &mut y).is_err());
        assert!(layer_norm(&x, 4, &[1.0; 4], &[0.0; 4], 1e-5, &mut y[..3]).is_err());
    }

    /// Deterministic pseudo-normal values (sum of uniforms), mean `mu`, sd about `sd`.
    fn normalish(len: usize, mu: f32, sd: f32, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let mut u = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 40) as f32 / (1u64 << 24) as f32
        };
        (0..len).map(|_| mu + sd * ((0..12).map(|_| u()).sum::<f32>() - 6.0)).collect()
    }

    #[test]
    fn layer_norm_matches_f64_with_large_offset() {
        for (mu, sd) in [(0.0f32, 1.0f32), (100.0, 1.0), (1000.0, 0.5), (-300.0, 3.0)] {
            let n = 384;
            let x = normalish(n * 5, mu, sd, mu as u64 + 7);
            let scale = normalish(n, 1.0, 0.2, 3);
            let bias = normalish(n, 0.0, 0.1, 4);
            for tier in supported_tiers() {
                let mut y = vec![0.0; x.len()];
                layer_norm_with(tier, &x, n, &scale, &bias, 1e-12, &mut y).unwrap();
                for r in 0..5 {
                    let want = reference::layer_norm(&x[r * n..(r + 1) * n], &scale, &bias, 1e-12);
                    for (j, w) in want.iter().enumerate() {
                        let g = y[r * n + j];
                        assert!((g as f64 - w).abs() < 1e-5, "{tier} mu {mu}: {g} vs {w}");
                    }
                }
            }
        }
    }

    #[test]
    fn activations_and_binary_hand_values() {
        for tier in supported_tiers() {
            let x: Vec<f32> = (0..19).map(|i| i as f32 - 9.0).collect();
            let mut y = vec![0.0; 19];
            map_activation_with(tier, &x, Activation::Relu, &mut y).unwrap();
            assert_eq!(y[0], 0.0);
            assert_eq!(y[18], 9.0);
            map_activation_with(tier, &x, Activation::RELU6, &mut y).unwrap();
            assert_eq!(y[18], 6.0);
            assert_eq!(y[9], 0.0);
            map_activation_with(tier, &x, Activation::GeluErf, &mut y).unwrap();
            assert!((y[10] - 0.841_344_7).abs() < 1e-6, "{tier}");
            map_activation_with(tier, &x, Activation::None, &mut y).unwrap();
            assert_eq!(y, x);
            let mut nan = [f32::NAN];
            map_activation_with(tier, &[f32::NAN], Activation::Relu, &mut nan).unwrap();
            assert!(nan[0].is_nan());

            let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
            let mut o = [0.0; 6];
            binary_with(tier, BinaryOp::Sub, &a, &[1.0, 2.0, 3.0], &mut o).unwrap();
            assert_eq!(o, [0.0, 0.0, 0.0, 3.0, 3.0, 3.0]);
            binary_with(tier, BinaryOp::Div, &a, &[2.0], &mut o).unwrap();
            assert_eq!(o, [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
            binary_with(tier, BinaryOp::Mul, &a, &a, &mut o).unwrap();
            assert_eq!(o, [1.0, 4.0, 9.0, 16.0, 25.0, 36.0]);
        }
        let mut o = [0.0; 6];
        assert!(binary(BinaryOp::Add, &[1.0; 6], &[1.0; 4], &mut o).is_err());
        assert!(binary(BinaryOp::Add, &[1.0; 6], &[], &mut o).is_err());
        assert!(binary(BinaryOp::Add, &[1.0; 6], &[1.0], &mut o[..5]).is_err());
        assert!(map_activation(&[1.0], Activation::Clip { min: 1.0, max: 0.0 }, &mut o[..1]).is_err());
    }

    fn acts() -> impl Strategy<Value = Activation> {
        prop_oneof![
            Just(Activation::None),
            Just(Activation::Relu),
            Just(Activation::RELU6),
            Just(Activation::GeluErf),
            Just(Activation::GeluTanh),
            Just(Activation::Silu),
        ]
    }

    fn ops() -> impl Strategy<Value = BinaryOp> {
        prop_oneof![Just(BinaryOp::Add), Just(BinaryOp::Sub), Just(BinaryOp::Mul), Just(BinaryOp::Div)]
    }

    proptest! {
        #[test]
        fn softmax_matches_reference(
            rows in 1usize..10,
            n in 1usize..80,
            scale in 0.05f32..2.0,
            seed in any::<u64>(),
            mask_kind in 0u8..3,
        ) {
            let x = normalish(rows * n, 0.0, 3.0, seed);
            // Mask: none, finite offsets, or -inf on every third position (never all).
            let mask: Option<Vec<f32>> = match mask_kind {
                0 => None,
                1 => Some(normalish(n, 0.0, 2.0, seed ^ 1)),
                _ => Some((0..n).map(|j| if j % 3 == 1 { f32::NEG_INFINITY } else { 0.0 }).collect()),
            };
            for tier in supported_tiers() {
                for r in 0..rows {
                    let mut row = x[r * n..(r + 1) * n].to_vec();
                    softmax_scaled_masked_with(tier, &mut row, scale, mask.as_deref()).unwrap();
                    let want = reference::softmax_scaled_masked(&x[r * n..(r + 1) * n], scale, mask.as_deref());
                    for (g, w) in row.iter().zip(&want) {
                        prop_assert!(close(*g, *w, 1e-6, 1e-30), "{tier}: {g} vs {w}");
                    }
                }
                let mut plain = vec![0.0; x.len()];
                softmax_with(tier, &x, n, &mut plain).unwrap();
                for r in 0..rows {
                    let want = reference::softmax_scaled_masked(&x[r * n..(r + 1) * n], 1.0, None);
                    for (g, w) in plain[r * n..(r + 1) * n].iter().zip(&want) {
                        prop_assert!(close(*g, *w, 1e-6, 1e-30), "{tier}: {g} vs {w}");
                    }
                }
            }
        }

        #[test]
        fn softmax_narrow_inputs_within_1e6(n in 1usize..300, seed in any::<u64>()) {
            let x = normalish(n, 0.0, 1.0, seed);
            for tier in supported_tiers() {
                let mut y = vec![0.0; n];
                softmax_with(tier, &x, n, &mut y).unwrap();
                let want = reference::softmax_scaled_masked(&x, 1.0, None);
                for (g, w) in y.iter().zip(&want) {
                    prop_assert!(close(*g, *w, 1e-6, 0.0), "{tier}: {g} vs {w}");
                }
            }
        }

        #[test]
        fn layer_norm_matches_reference(
            rows in 1usize..10,
            n in 1usize..100,
            mu in -200f32..200.0,
            seed in any::<u64>(),
        ) {
            let x = normalish(rows * n, mu, 1.0, seed);
            let scale = normalish(n, 1.0, 0.5, seed ^ 2);
            let bias = normalish(n, 0.0, 0.5, seed ^ 3);
            for tier in supported_tiers() {
                let mut y = vec![0.0; x.len()];
                layer_norm_with(tier, &x, n, &scale, &bias, 1e-5, &mut y).unwrap();
                for r in 0..rows {
                    let want = reference::layer_norm(&x[r * n..(r + 1) * n], &scale, &bias, 1e-5);
                    for (g, w) in y[r * n..(r + 1) * n].iter().zip(&want) {
                        prop_assert!((*g as f64 - w).abs() < 1e-5, "{tier}: {g} vs {w}");
                    }
                }
            }
        }

        #[test]
        fn activation_matches_reference(len in 0usize..100, act in acts(), seed in any::<u64>()) {
            let x = normalish(len, 0.0, 4.0, seed);
            for tier in supported_tiers() {
                let mut y = vec![0.0; len];
                map_activation_with(tier, &x, act, &mut y).unwrap();
                for (&v, &g) in x.iter().zip(&y) {
                    let w = reference::activation(act, v);
                    prop_assert!(close(g, w, 2e-6, 2e-6), "{tier} {act:?}({v}) = {g}, want {w}");
                }
            }
        }

        #[test]
        fn binary_matches_reference(
            rows in 1usize..5,
            n in 1usize..40,
            kind in 0u8..3,
            op in ops(),
            seed in any::<u64>(),
        ) {
            let a = normalish(rows * n, 0.0, 3.0, seed);
            let b = match kind {
                0 => normalish(rows * n, 1.0, 3.0, seed ^ 5),
                1 => vec![0.75],
                _ => normalish(n, 1.0, 3.0, seed ^ 6),
            };
            for tier in supported_tiers() {
                let mut y = vec![0.0; a.len()];
                binary_with(tier, op, &a, &b, &mut y).unwrap();
                for (i, &g) in y.iter().enumerate() {
                    let bv = match kind { 0 => b[i], 1 => b[0], _ => b[i % n] };
                    let w = reference::binary(op, a[i], bv);
                    prop_assert!(g == w || (g.is_nan() && w.is_nan()), "{tier} {op:?}: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn f16_rounding_matches_the_scalar_conversion_bit_for_bit() {
        // Ties, f16 subnormals, the overflow edge, zeros of both signs, NaN-free.
        let mut v: Vec<f32> =
            vec![0.0, -0.0, 1.0 + 1.0 / 2048.0, 1.0 + 3.0 / 2048.0, 65504.0, 65520.0, 7e4, 1e-6, -3e-8];
        let mut seed = 3u64;
        v.extend((0..1000).map(|i| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let m = ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
            m * 10f32.powi(i % 12 - 7)
        }));
        let want: Vec<u32> = v.iter().map(|&x| half::f16::from_f32(x).to_f32().to_bits()).collect();
        for tier in cpu::supported_tiers() {
            let mut got = v.clone();
            round_through_f16_with(tier, &mut got);
            let got: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "{tier}");
        }
    }
}

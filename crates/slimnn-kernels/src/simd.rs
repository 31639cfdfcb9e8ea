//! A minimal f32 vector abstraction so one generic body serves every tier.
//!
//! Implementations: `f32` (one lane, portable), `__m256` (AVX2 + FMA) and `__m512` (AVX-512F).
//! Every method is `#[inline(always)]` and carries no target feature of its own: a generic body
//! is instantiated inside a `#[target_feature]` function of the matching tier, where the
//! intrinsics then inline. Method bodies are unsafe contexts (edition 2021 `unsafe fn`): the
//! contract is the trait's, stated once below.

/// f32 lanes of one SIMD register.
///
/// # Safety
/// Implementors' methods may use ISA extensions: callers must only use them inside code compiled
/// with (or running under a run-time check for) the implementor's target features. Pointer
/// arguments must be valid for `LANES` f32 reads or writes (no alignment needed).
pub(crate) unsafe trait Simd: Copy {
    const LANES: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(x: f32) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(self, p: *mut f32);
    unsafe fn add(self, o: Self) -> Self;
    unsafe fn sub(self, o: Self) -> Self;
    unsafe fn mul(self, o: Self) -> Self;
    unsafe fn div(self, o: Self) -> Self;
    unsafe fn min(self, o: Self) -> Self;
    unsafe fn max(self, o: Self) -> Self;
    /// `self * b + c`, fused.
    unsafe fn mul_add(self, b: Self, c: Self) -> Self;
    /// Clears the sign bit.
    unsafe fn abs(self) -> Self;
    /// The sign bit of `sign` on the magnitude of `self` (`self` must be non-negative).
    unsafe fn with_sign_of(self, sign: Self) -> Self;
    /// Rounds to the nearest integer, ties to even.
    unsafe fn round(self) -> Self;
    /// `2^self` for integer-valued `self` in `-126..=127`.
    unsafe fn pow2i(self) -> Self;
    /// Hints that the cache line holding `p` will be read or written soon.
    #[inline(always)]
    unsafe fn prefetch(_p: *const f32) {}
    /// Hints that the cache line holding `p` will be needed later: fetch it into L2 only.
    /// Never faults, whatever the address.
    #[inline(always)]
    unsafe fn prefetch_l2(_p: *const f32) {}
}

// SAFETY: plain scalar arithmetic, valid everywhere.
unsafe impl Simd for f32 {
    const LANES: usize = 1;
    #[inline(always)]
    unsafe fn zero() -> Self {
        0.0
    }
    #[inline(always)]
    unsafe fn splat(x: f32) -> Self {
        x
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        p.read_unaligned()
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        p.write_unaligned(self)
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        self * o
    }
    #[inline(always)]
    unsafe fn div(self, o: Self) -> Self {
        self / o
    }
    #[inline(always)]
    unsafe fn min(self, o: Self) -> Self {
        // Same NaN behaviour as `minps`: the second operand wins unless `self < o`.
        if self < o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    unsafe fn max(self, o: Self) -> Self {
        if self > o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    unsafe fn mul_add(self, b: Self, c: Self) -> Self {
        // A plain multiply-add: `f32::mul_add` is a libm call on targets without FMA.
        self * b + c
    }
    #[inline(always)]
    unsafe fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    unsafe fn with_sign_of(self, sign: Self) -> Self {
        f32::from_bits(self.to_bits() | (sign.to_bits() & 0x8000_0000))
    }
    #[inline(always)]
    unsafe fn round(self) -> Self {
        self.round_ties_even()
    }
    #[inline(always)]
    unsafe fn pow2i(self) -> Self {
        f32::from_bits(((self as i32 + 127) as u32) << 23)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::Simd;
    use std::arch::x86_64::*;

    // SAFETY: every method uses AVX/AVX2/FMA only; the trait contract leaves it to callers to
    // run them on an AVX2+FMA host (the `Avx2` tier or above).
    unsafe impl Simd for __m256 {
        const LANES: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm256_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm256_storeu_ps(p, self)
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            _mm256_add_ps(self, o)
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            _mm256_sub_ps(self, o)
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            _mm256_mul_ps(self, o)
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            _mm256_div_ps(self, o)
        }
        #[inline(always)]
        unsafe fn min(self, o: Self) -> Self {
            _mm256_min_ps(self, o)
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            _mm256_max_ps(self, o)
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            _mm256_fmadd_ps(self, b, c)
        }
        #[inline(always)]
        unsafe fn abs(self) -> Self {
            _mm256_andnot_ps(_mm256_set1_ps(-0.0), self)
        }
        #[inline(always)]
        unsafe fn with_sign_of(self, sign: Self) -> Self {
            _mm256_or_ps(self, _mm256_and_ps(sign, _mm256_set1_ps(-0.0)))
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self)
        }
        #[inline(always)]
        unsafe fn pow2i(self) -> Self {
            let i = _mm256_add_epi32(_mm256_cvtps_epi32(self), _mm256_set1_epi32(127));
            _mm256_castsi256_ps(_mm256_slli_epi32::<23>(i))
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const f32) {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        }
    }

    // SAFETY: every method uses AVX-512F only; callers run them on the `Avx512` tier or above.
    unsafe impl Simd for __m512 {
        const LANES: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> Self {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> Self {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            _mm512_loadu_ps(p)
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            _mm512_storeu_ps(p, self)
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            _mm512_add_ps(self, o)
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            _mm512_sub_ps(self, o)
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            _mm512_mul_ps(self, o)
        }
        #[inline(always)]
        unsafe fn div(self, o: Self) -> Self {
            _mm512_div_ps(self, o)
        }
        #[inline(always)]
        unsafe fn min(self, o: Self) -> Self {
            _mm512_min_ps(self, o)
        }
        #[inline(always)]
        unsafe fn max(self, o: Self) -> Self {
            _mm512_max_ps(self, o)
        }
        #[inline(always)]
        unsafe fn mul_add(self, b: Self, c: Self) -> Self {
            _mm512_fmadd_ps(self, b, c)
        }
        #[inline(always)]
        unsafe fn abs(self) -> Self {
            _mm512_abs_ps(self)
        }
        #[inline(always)]
        unsafe fn with_sign_of(self, sign: Self) -> Self {
            let s = _mm512_and_si512(_mm512_castps_si512(sign), _mm512_set1_epi32(i32::MIN));
            _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(self), s))
        }
        #[inline(always)]
        unsafe fn round(self) -> Self {
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(self)
        }
        #[inline(always)]
        unsafe fn pow2i(self) -> Self {
            let i = _mm512_add_epi32(_mm512_cvtps_epi32(self), _mm512_set1_epi32(127));
            _mm512_castsi512_ps(_mm512_slli_epi32::<23>(i))
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            _mm_prefetch::<_MM_HINT_T0>(p as *const i8)
        }
        #[inline(always)]
        unsafe fn prefetch_l2(p: *const f32) {
            _mm_prefetch::<_MM_HINT_T1>(p as *const i8)
        }
    }
}

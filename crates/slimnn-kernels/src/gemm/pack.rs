//! B packed into NR-wide column panels, each `k x NR` row-major, zero-padded and 64-byte aligned
//! (or, for bf16, `ceil(k/2) x NR` slots holding pairs of rows: see [`super::bf16`]; or f32 values
//! as three bf16 parts each: see [`super::bf16x6`]).

use super::kernels::tile_shape;
use super::validate::{matrix_extent, KERNEL};
use crate::cpu::{self, CpuTier};
use crate::error::{check_tier, KernelError};

/// One cache line of f32.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// A growable f32 buffer whose start is 64-byte aligned.
#[derive(Clone, Default)]
pub(crate) struct AlignedVec {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedVec {
    /// Sets the length to `len`; contents are unspecified (callers overwrite them).
    pub(crate) fn resize(&mut self, len: usize) {
        let lines = len.div_ceil(16);
        if self.lines.len() < lines {
            self.lines.resize(lines, Line::default());
        }
        self.len = len;
    }

    pub(crate) fn as_slice(&self) -> &[f32] {
        // SAFETY: `lines` holds at least `len` f32 (resize keeps lines*16 >= len), `Line` is a
        // repr(C) array of f32 with no padding, and the borrow ties the slice to `self`.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, with a unique borrow of `self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

/// The right-hand matrix of a GEMM, packed once for the kernels of one [`CpuTier`].
///
/// Column panels of `nr` columns (the tier's micro-tile width) are stored one after another; a
/// panel is `k` rows of `nr` contiguous values, the last panel zero-padded. Panels start on
/// 64-byte boundaries. A `PackedB` is only valid on the machine (tier) that made it: never
/// serialise it.
#[derive(Clone)]
pub struct PackedB {
    tier: CpuTier,
    k: usize,
    n: usize,
    nr: usize,
    panel_stride: usize,
    slots: Slots,
    data: AlignedVec,
}

/// What a panel's 32-bit slots hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slots {
    F32,
    /// bf16 pairs of consecutive rows.
    Bf16,
    /// Three bf16 parts of each f32 value, in tile steps ([`super::bf16x6`]).
    Bf16x6,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedB")
            .field("tier", &self.tier)
            .field("k", &self.k)
            .field("n", &self.n)
            .field("nr", &self.nr)
            .field("slots", &self.slots)
            .finish()
    }
}

impl PackedB {
    /// Packs row-major `b` (`k x n`, row stride `ldb`) for the active tier ([`cpu::tier`]).
    pub fn new(b: &[f32], k: usize, n: usize, ldb: usize) -> Result<Self, KernelError> {
        let mut p = Self::empty(cpu::tier())?;
        p.pack(b, k, n, ldb)?;
        Ok(p)
    }

    /// Packs `b` given transposed: `bt` is `n x k` row-major with row stride `ldbt`, so
    /// `B[kk][j] = bt[j * ldbt + kk]` (e.g. a linear layer's `[out, in]` weight).
    pub fn from_transposed(bt: &[f32], k: usize, n: usize, ldbt: usize) -> Result<Self, KernelError> {
        let mut p = Self::empty(cpu::tier())?;
        p.pack_transposed(bt, k, n, ldbt)?;
        Ok(p)
    }

    /// An empty (`0 x 0`) packed matrix for `tier`, to be filled by [`PackedB::pack`] or
    /// [`PackedB::pack_transposed`]; refilling reuses the allocation, so a `PackedB` doubles as
    /// caller-owned scratch for repeated GEMMs. Fails when the host cannot run `tier`.
    pub fn empty(tier: CpuTier) -> Result<Self, KernelError> {
        check_tier(tier)?;
        let (_, nr) = tile_shape(tier);
        Ok(PackedB { tier, k: 0, n: 0, nr, panel_stride: 0, slots: Slots::F32, data: AlignedVec::default() })
    }

    /// Replaces the contents with row-major `b` (`k x n`, row stride `ldb`).
    pub fn pack(&mut self, b: &[f32], k: usize, n: usize, ldb: usize) -> Result<(), KernelError> {
        matrix_extent("B", b.len(), k, n, ldb)?;
        self.layout(k, n)?;
        let (nr, stride) = (self.nr, self.panel_stride);
        let dst = self.data.as_mut_slice();
        for (p, panel) in dst.chunks_exact_mut(stride.max(1)).enumerate().take(n.div_ceil(nr)) {
            let j0 = p * nr;
            let w = nr.min(n - j0);
            for kk in 0..k {
                let src = &b[kk * ldb + j0..kk * ldb + j0 + w];
                let row = &mut panel[kk * nr..(kk + 1) * nr];
                row[..w].copy_from_slice(src);
                row[w..].fill(0.0);
            }
            panel[k * nr..].fill(0.0);
        }
        Ok(())
    }

    /// Replaces the contents with `B` given transposed (see [`PackedB::from_transposed`]).
    pub fn pack_transposed(&mut self, bt: &[f32], k: usize, n: usize, ldbt: usize) -> Result<(), KernelError> {
        matrix_extent("B transposed", bt.len(), n, k, ldbt)?;
        self.layout(k, n)?;
        let (nr, stride) = (self.nr, self.panel_stride);
        let dst = self.data.as_mut_slice();
        for (p, panel) in dst.chunks_exact_mut(stride.max(1)).enumerate().take(n.div_ceil(nr)) {
            let j0 = p * nr;
            let w = nr.min(n - j0);
            if w < nr {
                panel.fill(0.0);
            } else {
                panel[k * nr..].fill(0.0);
            }
            for jj in (0..w).filter(|_| k > 0) {
                let src = &bt[(j0 + jj) * ldbt..(j0 + jj) * ldbt + k];
                for (kk, &v) in src.iter().enumerate() {
                    panel[kk * nr + jj] = v;
                }
            }
        }
        Ok(())
    }

    /// Replaces the contents with row-major `b` (`k x n`, row stride `ldb`) rounded to bf16,
    /// for [`super::gemm`] to multiply in bf16 with f32 accumulation (A is rounded per call).
    pub fn pack_bf16(&mut self, b: &[f32], k: usize, n: usize, ldb: usize) -> Result<(), KernelError> {
        matrix_extent("B", b.len(), k, n, ldb)?;
        if !super::bf16::native_for(self.tier) || !self.nr.is_multiple_of(16) {
            return self.fill_bf16(k, n, |kk, j| b[kk * ldb + j]);
        }
        // Attention packs K and V per call: the vector path keeps that cheap.
        let k2 = self.layout_bf16(k, n)?;
        let (nr, stride) = (self.nr, self.panel_stride);
        let dst = self.data.as_mut_slice();
        for (p, panel) in dst.chunks_exact_mut(stride.max(1)).enumerate().take(n.div_ceil(nr)) {
            let j0 = p * nr;
            let w = nr.min(n - j0);
            for q in 0..k2 {
                let lo = &b[2 * q * ldb + j0..][..w];
                let hi = (2 * q + 1 < k).then(|| &b[(2 * q + 1) * ldb + j0..][..w]);
                super::bf16::pack_pair_row(self.tier, lo, hi, &mut panel[q * nr..(q + 1) * nr]);
            }
            panel[k2 * nr..].fill(0.0);
        }
        Ok(())
    }

    /// Replaces the contents with `B` given transposed (`n x k`, row stride `ldbt`) rounded to
    /// bf16 (see [`PackedB::pack_bf16`]).
    pub fn pack_transposed_bf16(&mut self, bt: &[f32], k: usize, n: usize, ldbt: usize) -> Result<(), KernelError> {
        matrix_extent("B transposed", bt.len(), n, k, ldbt)?;
        self.fill_bf16(k, n, |kk, j| bt[j * ldbt + kk])
    }

    /// Packs `B[kk][j] = at(kk, j)` as bf16 pairs: panel row `p` holds rows `2p` and `2p + 1`.
    fn fill_bf16(&mut self, k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Result<(), KernelError> {
        let k2 = self.layout_bf16(k, n)?;
        let (nr, stride) = (self.nr, self.panel_stride);
        let dst = self.data.as_mut_slice();
        for (p, panel) in dst.chunks_exact_mut(stride.max(1)).enumerate().take(n.div_ceil(nr)) {
            panel.fill(0.0);
            let j0 = p * nr;
            for jj in 0..nr.min(n - j0) {
                for q in 0..k2 {
                    let hi = if 2 * q + 1 < k { at(2 * q + 1, j0 + jj) } else { 0.0 };
                    panel[q * nr + jj] = super::bf16::pair(at(2 * q, j0 + jj), hi);
                }
            }
        }
        Ok(())
    }

    /// Sizes the buffer for `k x n` bf16 values: `ceil(k/2)` rows of pair slots, returned.
    fn layout_bf16(&mut self, k: usize, n: usize) -> Result<usize, KernelError> {
        let k2 = k.div_ceil(2);
        self.layout(k2, n)?;
        self.k = k;
        self.slots = Slots::Bf16;
        Ok(k2)
    }

    /// Replaces the contents with row-major `b` (`k x n`, row stride `ldb`) as three bf16 parts
    /// per value, for [`super::gemm`] to multiply with f32 accuracy on AMX-BF16 tiles (see
    /// [`super::bf16x6`]; on other tiers a portable kernel runs, far slower than f32: pack this
    /// way only where [`super::bf16x6::native`] holds).
    pub fn pack_bf16x6(&mut self, b: &[f32], k: usize, n: usize, ldb: usize) -> Result<(), KernelError> {
        matrix_extent("B", b.len(), k, n, ldb)?;
        self.fill_bf16x6(k, n, |kk, j| b[kk * ldb + j])
    }

    /// Replaces the contents with `B` given transposed (`n x k`, row stride `ldbt`) as three bf16
    /// parts per value (see [`PackedB::pack_bf16x6`]).
    pub fn pack_transposed_bf16x6(&mut self, bt: &[f32], k: usize, n: usize, ldbt: usize) -> Result<(), KernelError> {
        matrix_extent("B transposed", bt.len(), n, k, ldbt)?;
        self.fill_bf16x6(k, n, |kk, j| bt[j * ldbt + kk])
    }

    fn fill_bf16x6(&mut self, k: usize, n: usize, at: impl Fn(usize, usize) -> f32) -> Result<(), KernelError> {
        use super::bf16x6::{set_half, slot_rows, split3, Layout, TILE_NR};
        let layout = Layout::of(self.tier);
        let nr = if layout == Layout::Tiles { TILE_NR } else { tile_shape(self.tier).1 };
        self.layout_nr(slot_rows(k), n, nr)?;
        self.k = k;
        self.slots = Slots::Bf16x6;
        let stride = self.panel_stride;
        let dst = self.data.as_mut_slice();
        for (p, panel) in dst.chunks_exact_mut(stride.max(1)).enumerate().take(n.div_ceil(nr)) {
            panel.fill(0.0);
            let j0 = p * nr;
            for kk in 0..k {
                for jj in 0..nr.min(n - j0) {
                    for (q, bits) in split3(at(kk, j0 + jj)).into_iter().enumerate() {
                        let (slot, high) = layout.b_slot(nr, kk, q, jj);
                        set_half(&mut panel[slot], high, bits);
                    }
                }
            }
        }
        Ok(())
    }

    /// Sizes the buffer for `k x n` f32 slots.
    fn layout(&mut self, k: usize, n: usize) -> Result<(), KernelError> {
        self.layout_nr(k, n, tile_shape(self.tier).1)
    }

    /// Sizes the buffer for `k x n` slots in panels `nr` wide.
    fn layout_nr(&mut self, k: usize, n: usize, nr: usize) -> Result<(), KernelError> {
        self.slots = Slots::F32;
        self.nr = nr;
        let too_big = || KernelError::shape(KERNEL, format!("packed B of {k} x {n} is too large"));
        // Round panels up to whole cache lines so every panel starts 64-byte aligned.
        let panel_stride = k.checked_mul(self.nr).and_then(|s| s.checked_next_multiple_of(16)).ok_or_else(too_big)?;
        let total = panel_stride
            .checked_mul(n.div_ceil(self.nr))
            .filter(|&t| t <= isize::MAX as usize / 4)
            .ok_or_else(too_big)?;
        self.k = k;
        self.n = n;
        self.panel_stride = panel_stride;
        self.data.resize(total);
        Ok(())
    }

    /// The tier whose kernels this packing is for.
    pub fn tier(&self) -> CpuTier {
        self.tier
    }

    /// Rows of B (the GEMM's inner dimension).
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether B is held as bf16 (products in bf16, accumulation in f32).
    pub fn is_bf16(&self) -> bool {
        self.slots == Slots::Bf16
    }

    /// Whether B is held as three bf16 parts per value (f32-accurate products on AMX tiles).
    pub fn is_bf16x6(&self) -> bool {
        self.slots == Slots::Bf16x6
    }

    /// Rows of slots in a panel: `k`, `ceil(k/2)` pairs for bf16, whole tile steps for bf16x6.
    pub(crate) fn slot_rows(&self) -> usize {
        match self.slots {
            Slots::F32 => self.k,
            Slots::Bf16 => self.k.div_ceil(2),
            Slots::Bf16x6 => super::bf16x6::slot_rows(self.k),
        }
    }

    /// Columns of B.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Panel width: the tier's micro-tile width.
    pub fn nr(&self) -> usize {
        self.nr
    }

    pub(crate) fn panel_stride(&self) -> usize {
        self.panel_stride
    }

    pub(crate) fn data(&self) -> &[f32] {
        self.data.as_slice()
    }

    /// Unpacks `B[kk][j]` (tests and debugging).
    pub fn get(&self, kk: usize, j: usize) -> Option<f32> {
        if kk >= self.k || j >= self.n {
            return None;
        }
        let p = j / self.nr;
        let data = self.data.as_slice();
        let slot = |row: usize| data.get(p * self.panel_stride + row * self.nr + j % self.nr).copied();
        Some(match self.slots {
            Slots::F32 => slot(kk)?,
            Slots::Bf16 => super::bf16::slot_half(slot(kk / 2)?, kk % 2 == 1),
            Slots::Bf16x6 => {
                let layout = super::bf16x6::Layout::of(self.tier);
                let part = |q: usize| {
                    let (at, high) = layout.b_slot(self.nr, kk, q, j % self.nr);
                    data.get(p * self.panel_stride + at).map(|&s| super::bf16::slot_half(s, high))
                };
                // hi + (mid + lo): the parts' sum, exact for normal values.
                part(0)? + (part(1)? + part(2)?)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_panels_with_zero_padding() {
        for tier in crate::cpu::supported_tiers() {
            let (k, n) = (3, 21);
            let b: Vec<f32> = (0..k * 25).map(|i| i as f32).collect();
            let p = PackedB::empty(tier).and_then(|mut p| p.pack(&b, k, n, 25).map(|_| p)).unwrap();
            let nr = p.nr();
            assert_eq!((p.k(), p.n(), p.tier()), (k, n, tier));
            for kk in 0..k {
                for j in 0..n {
                    assert_eq!(p.get(kk, j), Some(b[kk * 25 + j]));
                }
            }
            assert_eq!(p.get(k, 0), None);
            assert_eq!(p.get(0, n), None);
            // Padding columns of the last panel are zero.
            let last = (n - 1) / nr;
            let panel = &p.data()[last * p.panel_stride()..][..k * nr];
            for kk in 0..k {
                for jj in (n - last * nr)..nr {
                    assert_eq!(panel[kk * nr + jj], 0.0);
                }
            }
            assert_eq!(p.data().as_ptr() as usize % 64, 0);
            assert_eq!(p.panel_stride() % 16, 0);
        }
    }

    #[test]
    fn transposed_matches_row_major() {
        for tier in crate::cpu::supported_tiers() {
            let (k, n) = (5, 37);
            let b: Vec<f32> = (0..k * n).map(|i| (i as f32).sin()).collect();
            let mut bt = vec![0.0; n * (k + 2)];
            for kk in 0..k {
                for j in 0..n {
                    bt[j * (k + 2) + kk] = b[kk * n + j];
                }
            }
            let mut p1 = PackedB::empty(tier).unwrap();
            p1.pack(&b, k, n, n).unwrap();
            let mut p2 = PackedB::empty(tier).unwrap();
            // Refill a previously larger packing: stale data must not leak.
            p2.pack(&vec![7.0; 64 * 64], 64, 64, 64).unwrap();
            p2.pack_transposed(&bt, k, n, k + 2).unwrap();
            assert_eq!(p1.data(), p2.data());
        }
    }

    #[test]
    fn rejects_short_buffers() {
        let e = PackedB::new(&[0.0; 5], 2, 3, 3).unwrap_err();
        assert!(matches!(e, KernelError::Shape { .. }), "{e}");
        let e = PackedB::new(&[0.0; 6], 2, 3, 2).unwrap_err();
        assert!(e.to_string().contains("ld"), "{e}");
        assert!(PackedB::from_transposed(&[0.0; 5], 3, 2, 3).is_err());
        assert!(PackedB::new(&[], 0, 3, 3).is_ok());
        assert!(PackedB::new(&[], 3, 0, 0).is_ok());
        assert!(PackedB::new(&[], usize::MAX, usize::MAX, usize::MAX).is_err());
    }
}

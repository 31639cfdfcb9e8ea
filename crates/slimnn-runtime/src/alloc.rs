//! A global allocator that starts every large allocation on a cache line.
//!
//! The runtime's activations are plain `Vec<f32>`s, and glibc places a large allocation
//! (one it maps from the kernel) 16 bytes past a page boundary. Channels-last rows of 16, 32 or
//! 144 channels then straddle cache lines, and so does every 64-byte vector load and store of
//! them: the depthwise kernel ran EfficientNet's 144 x 56x56 5x5 stride-2 layer in 0.13-0.14 ms
//! on such a buffer and in 0.09-0.10 ms on an aligned one (`ALIGN=1 SHAPE=144,56,5,2 cargo run
//! --release -p slimnn-kernels --example depthwise_speed`).
//!
//! `Vec` cannot ask for more alignment than its element's, so the alignment comes from the
//! allocator. A binary opts in (the `slimnn` CLI and server do):
//!
//! ```
//! #[global_allocator]
//! static ALLOC: slimnn_runtime::alloc::CacheLineAligned = slimnn_runtime::alloc::CacheLineAligned;
//!
//! fn main() {
//!     let activations = vec![0f32; 1 << 20];
//!     assert_eq!(activations.as_ptr() as usize % 64, 0);
//! }
//! ```

use std::alloc::{GlobalAlloc, Layout, System};

/// Allocations of at least this many bytes start on a 64-byte boundary.
pub const LARGE: usize = 4096;
const LINE: usize = 64;

/// [`System`], with every allocation of at least [`LARGE`] bytes aligned to a cache line.
pub struct CacheLineAligned;

/// The layout actually asked of [`System`] for `layout`. Deterministic in `layout`, so `dealloc`
/// hands back the layout `alloc` used.
fn inner(layout: Layout) -> Layout {
    if layout.size() >= LARGE && layout.align() < LINE {
        // A size is valid for any power-of-two alignment it does not overflow when rounded to.
        Layout::from_size_align(layout.size(), LINE).unwrap_or(layout)
    } else {
        layout
    }
}

// SAFETY: every call forwards to `System` with `inner(layout)`, which has the caller's size and
// at least its alignment, and the same mapping is applied when the block is freed or resized.
unsafe impl GlobalAlloc for CacheLineAligned {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        System.alloc(inner(layout))
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        System.alloc_zeroed(inner(layout))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, inner(layout))
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let (old, new) = (inner(layout), Layout::from_size_align(new_size, layout.align()).map(inner));
        match new {
            // Same alignment on both sides: `System` may resize in place.
            Ok(new) if new.align() == old.align() => System.realloc(ptr, old, new_size),
            Ok(new) => {
                let out = System.alloc(new);
                if !out.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, out, layout.size().min(new_size));
                    System.dealloc(ptr, old);
                }
                out
            }
            Err(_) => std::ptr::null_mut(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_blocks_start_on_a_line_and_keep_their_contents() {
        let a = CacheLineAligned;
        unsafe {
            for size in [LARGE, 100_000, 1 << 22] {
                let l = Layout::from_size_align(size, 4).unwrap();
                let p = a.alloc(l);
                assert!(!p.is_null());
                assert_eq!(p as usize % LINE, 0, "{size} bytes");
                p.write_bytes(7, size);
                // Growing past the threshold from below, shrinking below it, and growing.
                let q = a.realloc(p, l, size * 2);
                assert_eq!(q as usize % LINE, 0);
                assert!((0..size).all(|i| *q.add(i) == 7));
                let l2 = Layout::from_size_align(size * 2, 4).unwrap();
                let r = a.realloc(q, l2, 100);
                assert!((0..100).all(|i| *r.add(i) == 7));
                let l3 = Layout::from_size_align(100, 4).unwrap();
                let s = a.realloc(r, l3, size);
                assert_eq!(s as usize % LINE, 0);
                assert!((0..100).all(|i| *s.add(i) == 7));
                a.dealloc(s, l);
            }
            let z = Layout::from_size_align(LARGE * 3, 8).unwrap();
            let p = a.alloc_zeroed(z);
            assert_eq!(p as usize % LINE, 0);
            assert!((0..LARGE * 3).all(|i| *p.add(i) == 0));
            a.dealloc(p, z);
        }
    }
}

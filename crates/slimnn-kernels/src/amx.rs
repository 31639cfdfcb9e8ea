//! AMX tile state and the tile loops of the bf16 and int8 kernels (inline assembly: the AMX
//! intrinsics are not stable Rust). Every kernel uses one configuration, all eight tiles 16 rows x
//! 64 bytes; tiles keep their contents between `asm!` blocks, since nothing else in the program
//! touches them.
//!
//! Measured on the development VM (Xeon with AMX, 2 cores): `tdpbusd` issues every ~5 ns with
//! operands in tiles and `tileloadd` every ~2.5 ns from L1; a 2 x 2 step (four loads, four
//! products) runs at 81% of the register-only rate from L1 and 61% from L2 (`amx_speed`). At
//! short K the GEMMs lose most to what each block adds: zeroing, the stores, the epilogue.

#![cfg(target_arch = "x86_64")]

use std::arch::asm;

/// Palette 1 with all eight tiles 16 rows x 64 bytes.
#[repr(C, align(64))]
struct Config([u8; 64]);

thread_local! {
    /// Whether this thread's tiles hold [`Config`] (set by [`configure`], cleared by [`release`]).
    static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Loads the tile configuration on this thread unless it is loaded already: `ldtilecfg` costs
/// ~57 ns here, and the bf16 GEMM asks once per 32 x 48 tile.
///
/// # Safety
/// The OS must have granted this process the AMX tile state.
#[inline(always)]
pub(crate) unsafe fn configure() {
    if CONFIGURED.get() {
        return;
    }
    let mut c = Config([0; 64]);
    c.0[0] = 1;
    for t in 0..8 {
        c.0[16 + 2 * t] = 64;
        c.0[48 + t] = 16;
    }
    asm!("ldtilecfg [{}]", in(reg) c.0.as_ptr(), options(nostack, readonly));
    CONFIGURED.set(true);
}

/// Returns the tiles to their init state (the OS then need not save them on a context switch).
///
/// # Safety
/// As [`configure`].
#[inline(always)]
pub(crate) unsafe fn release() {
    asm!("tilerelease", options(nostack, nomem));
    CONFIGURED.set(false);
}

/// Zeroes the accumulator tiles 0-3.
#[inline(always)]
pub(crate) unsafe fn zero_acc() {
    asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
}

/// One K step of the 2 x 2 block: two A row tiles (`{a}`, `{a2}`) and two B column tiles
/// (`{b}`, `{b} + 64`) loaded, their four products added to tmm0..3.
macro_rules! products_2x2 {
    ($op:literal) => {
        concat!(
            "tileloadd tmm4, [{a} + {lda}*1]\n",
            "tileloadd tmm6, [{b} + {ldb}*1]\n",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]\n",
            "tileloadd tmm5, [{a2} + {lda}*1]\n",
            $op,
            " tmm0, tmm4, tmm6\n",
            $op,
            " tmm1, tmm4, tmm7\n",
            $op,
            " tmm2, tmm5, tmm6\n",
            $op,
            " tmm3, tmm5, tmm7\n",
        )
    };
}

/// One K step of one A row tile (`{a}`) times two B column tiles (`{b}`, `{b} + 64`): tmm0,
/// tmm1.
macro_rules! products_1x2 {
    ($op:literal) => {
        concat!(
            "tileloadd tmm4, [{a} + {lda}*1]\n",
            "tileloadd tmm6, [{b} + {ldb}*1]\n",
            "tileloadd tmm7, [{b} + {ldb}*1 + 64]\n",
            $op,
            " tmm0, tmm4, tmm6\n",
            $op,
            " tmm1, tmm4, tmm7\n",
        )
    };
}

/// The 2 x 2 loop's assembly (shared by the plain loop and the zero-loop-store block): `{n}`
/// steps of two A row tiles (`{a}`, `{a2}`, each moving `{astep}` bytes a step) times two B
/// column tiles (`{b}`, `{b} + 64`) into tmm0..3.
macro_rules! steps_2x2 {
    ($op:literal) => {
        concat!(
            "2:\n",
            products_2x2!($op),
            "add {a}, {astep}\n",
            "add {a2}, {astep}\n",
            "add {b}, {bstep}\n",
            "dec {n}\n",
            "jnz 2b",
        )
    };
}

/// Defines a tile loop of one dot-product instruction (`tdpbf16ps` on bf16 pairs, `tdpbusd` on
/// u8 x i8 groups of four) and one block shape (row tiles x column tiles). Every loop runs `kb`
/// steps; a step moves 64 bytes along A's rows and 16 rows (`16 ldb` bytes) down B; `lda`,
/// `ldb` are in bytes.
macro_rules! tile_loop {
    (2x2, $op:literal, $x2x2:ident) => {
        /// tmm0..3 += A (2 row tiles: rows 0-15 at `a`, 16-31 at `a + 16 lda`) x B (column
        /// tiles at `b` and `b + 64`): tmm0 / tmm1 rows 0-15, tmm2 / tmm3 rows 16-31.
        #[inline(always)]
        pub(crate) unsafe fn $x2x2(kb: usize, a: *const u8, lda: usize, b: *const u8, ldb: usize) {
            if kb == 0 {
                return;
            }
            asm!(
                steps_2x2!($op),
                n = inout(reg) kb => _,
                a = inout(reg) a => _,
                a2 = inout(reg) a.add(16 * lda) => _,
                b = inout(reg) b => _,
                lda = in(reg) lda,
                ldb = in(reg) ldb,
                bstep = in(reg) 16 * ldb,
                astep = in(reg) 64usize,
                options(nostack, readonly),
            );
        }

    };
    (2x1, $op:literal, $x2x1:ident) => {
        /// As the 2 x 2 loop with one column tile at `b`: tmm0 (rows 0-15) and tmm2 (16-31).
        #[inline(always)]
        pub(crate) unsafe fn $x2x1(kb: usize, a: *const u8, lda: usize, b: *const u8, ldb: usize) {
            if kb == 0 {
                return;
            }
            asm!(
                "2:",
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1]",
                "tileloadd tmm5, [{a2} + {lda}*1]",
                concat!($op, " tmm0, tmm4, tmm6"),
                concat!($op, " tmm2, tmm5, tmm6"),
                "add {a}, 64",
                "add {a2}, 64",
                "add {b}, {bstep}",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) kb => _,
                a = inout(reg) a => _,
                a2 = inout(reg) a.add(16 * lda) => _,
                b = inout(reg) b => _,
                lda = in(reg) lda,
                ldb = in(reg) ldb,
                bstep = in(reg) 16 * ldb,
                options(nostack, readonly),
            );
        }

    };
    (block 2x2, $op:literal, $name:ident) => {
        /// The 2 x 2 loop from zeroed accumulators, stored to `c` (row stride `ldc` bytes), in
        /// one assembly block: for the int8 GEMM's short loops (6 steps at K = 384) zeroing,
        /// loop and stores as three blocks ran 2-4% slower than the old hand-written block,
        /// this form 5-8% faster (`amx_speed` probe). A's tiles move `astep` bytes a step (64
        /// along rows in place; more when A is packed tile after tile).
        #[allow(clippy::too_many_arguments)]
        #[inline(always)]
        pub(crate) unsafe fn $name(
            kb: usize,
            a: *const u8,
            lda: usize,
            astep: usize,
            b: *const u8,
            ldb: usize,
            c: *mut u8,
            ldc: usize,
        ) {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "test {n}, {n}",
                "jz 3f",
                steps_2x2!($op),
                "3:",
                "tilestored [{c} + {ldc}*1], tmm0",
                "tilestored [{c} + {ldc}*1 + 64], tmm1",
                "tilestored [{c2} + {ldc}*1], tmm2",
                "tilestored [{c2} + {ldc}*1 + 64], tmm3",
                n = inout(reg) kb => _,
                a = inout(reg) a => _,
                a2 = inout(reg) a.add(16 * lda) => _,
                b = inout(reg) b => _,
                lda = in(reg) lda,
                ldb = in(reg) ldb,
                bstep = in(reg) 16 * ldb,
                astep = in(reg) astep,
                c = in(reg) c,
                c2 = in(reg) c.add(16 * ldc),
                ldc = in(reg) ldc,
                options(nostack),
            );
        }
    };
    (block 1x2, $op:literal, $name:ident) => {
        /// One row tile and two column tiles from zeroed accumulators, stored to `c` (see the
        /// 2 x 2 block).
        #[allow(clippy::too_many_arguments)]
        #[inline(always)]
        pub(crate) unsafe fn $name(
            kb: usize,
            a: *const u8,
            lda: usize,
            astep: usize,
            b: *const u8,
            ldb: usize,
            c: *mut u8,
            ldc: usize,
        ) {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "test {n}, {n}",
                "jz 3f",
                "2:",
                products_1x2!($op),
                "add {a}, {astep}",
                "add {b}, {bstep}",
                "dec {n}",
                "jnz 2b",
                "3:",
                "tilestored [{c} + {ldc}*1], tmm0",
                "tilestored [{c} + {ldc}*1 + 64], tmm1",
                n = inout(reg) kb => _,
                a = inout(reg) a => _,
                b = inout(reg) b => _,
                lda = in(reg) lda,
                ldb = in(reg) ldb,
                bstep = in(reg) 16 * ldb,
                astep = in(reg) astep,
                c = in(reg) c,
                ldc = in(reg) ldc,
                options(nostack),
            );
        }
    };
    (step 2x2, $op:literal, $name:ident) => {
        /// One K step of the 2 x 2 loop (A row tiles at `a` and `a + 16 lda`, B column tiles at
        /// `b` and `b + 64`), for callers that run other work between steps: the tile unit
        /// works through a step's products while the core runs what follows.
        #[inline(always)]
        pub(crate) unsafe fn $name(a: *const u8, lda: usize, b: *const u8, ldb: usize) {
            asm!(
                products_2x2!($op),
                a = in(reg) a,
                a2 = in(reg) a.add(16 * lda),
                b = in(reg) b,
                lda = in(reg) lda,
                ldb = in(reg) ldb,
                options(nostack, readonly),
            );
        }
    };
    (step 1x2, $op:literal, $name:ident) => {
        /// One K step of one row tile (`a`) times two column tiles (`b`, `b + 64`): tmm0, tmm1.
        #[inline(always)]
        pub(crate) unsafe fn $name(a: *const u8, lda: usize, b: *const u8, ldb: usize) {
            asm!(
                products_1x2!($op),
                a = in(reg) a,
                b = in(reg) b,
                lda = in(reg) lda,
                ldb = in(reg) ldb,
                options(nostack, readonly),
            );
        }
    };
    (1x3, $op:literal, $x1x3:ident) => {
        /// One row tile and three column tiles (`b`, `b + 64`, `b + 128`): tmm0..2.
        #[inline(always)]
        pub(crate) unsafe fn $x1x3(kb: usize, a: *const u8, lda: usize, b: *const u8, ldb: usize) {
            if kb == 0 {
                return;
            }
            asm!(
                "2:",
                "tileloadd tmm4, [{a} + {lda}*1]",
                "tileloadd tmm5, [{b} + {ldb}*1]",
                "tileloadd tmm6, [{b} + {ldb}*1 + 64]",
                "tileloadd tmm7, [{b} + {ldb}*1 + 128]",
                concat!($op, " tmm0, tmm4, tmm5"),
                concat!($op, " tmm1, tmm4, tmm6"),
                concat!($op, " tmm2, tmm4, tmm7"),
                "add {a}, 64",
                "add {b}, {bstep}",
                "dec {n}",
                "jnz 2b",
                n = inout(reg) kb => _,
                a = inout(reg) a => _,
                b = inout(reg) b => _,
                lda = in(reg) lda,
                ldb = in(reg) ldb,
                bstep = in(reg) 16 * ldb,
                options(nostack, readonly),
            );
        }
    };
}

tile_loop!(2x2, "tdpbf16ps", bf16_2x2);
tile_loop!(2x1, "tdpbf16ps", bf16_2x1);
tile_loop!(1x3, "tdpbf16ps", bf16_1x3);
tile_loop!(block 2x2, "tdpbf16ps", bf16_block_2x2);
tile_loop!(block 2x2, "tdpbusd", int8_block_2x2);
tile_loop!(block 2x2, "tdpbssd", int8ss_block_2x2);
tile_loop!(block 1x2, "tdpbusd", int8_block_1x2);
// Signed A (weights) times unsigned B (activations): the convolutions' weights-on-the-left GEMM.
tile_loop!(block 2x2, "tdpbsud", int8su_block_2x2);
tile_loop!(step 2x2, "tdpbusd", int8_step_2x2);
tile_loop!(step 1x2, "tdpbusd", int8_step_1x2);

/// Stores tmm0..3 as the 2 x 2 block at `c` (row stride `ldc` bytes): tmm0 / tmm1 rows 0-15
/// at columns 0 / +64 bytes, tmm2 / tmm3 rows 16-31.
#[inline(always)]
pub(crate) unsafe fn store_2x2(c: *mut u8, ldc: usize) {
    asm!(
        "tilestored [{c} + {ldc}*1], tmm0",
        "tilestored [{c} + {ldc}*1 + 64], tmm1",
        "tilestored [{c2} + {ldc}*1], tmm2",
        "tilestored [{c2} + {ldc}*1 + 64], tmm3",
        c = in(reg) c,
        c2 = in(reg) c.add(16 * ldc),
        ldc = in(reg) ldc,
        options(nostack),
    );
}

/// Stores tmm0 / tmm1 as one row tile at `c` / `c + 64`.
#[inline(always)]
pub(crate) unsafe fn store_1x2(c: *mut u8, ldc: usize) {
    asm!(
        "tilestored [{c} + {ldc}*1], tmm0",
        "tilestored [{c} + {ldc}*1 + 64], tmm1",
        c = in(reg) c,
        ldc = in(reg) ldc,
        options(nostack),
    );
}

/// Stores tmm0 (rows 0-15) and tmm2 (rows 16-31) at `c`.
#[inline(always)]
pub(crate) unsafe fn store_2x1(c: *mut u8, ldc: usize) {
    asm!(
        "tilestored [{c} + {ldc}*1], tmm0",
        "tilestored [{c2} + {ldc}*1], tmm2",
        c = in(reg) c,
        c2 = in(reg) c.add(16 * ldc),
        ldc = in(reg) ldc,
        options(nostack),
    );
}

/// Stores tmm0..2 as one row tile at `c`, `c + 64`, `c + 128`.
#[inline(always)]
pub(crate) unsafe fn store_1x3(c: *mut u8, ldc: usize) {
    asm!(
        "tilestored [{c} + {ldc}*1], tmm0",
        "tilestored [{c} + {ldc}*1 + 64], tmm1",
        "tilestored [{c} + {ldc}*1 + 128], tmm2",
        c = in(reg) c,
        ldc = in(reg) ldc,
        options(nostack),
    );
}

#[cfg(test)]
mod tests {
    use crate::cpu::CpuTier;

    /// A release forgets the configuration: the next `configure` loads it again (else the
    /// tile instructions after it would fault), and the tiles work as before.
    #[test]
    fn tiles_are_configured_again_after_a_release() {
        if !CpuTier::Amx.is_supported() {
            return;
        }
        let mut c = super::Config([0; 64]);
        let mut out = [7i32; 16 * 16];
        // SAFETY: the OS granted the tile state (checked above); the store writes 16 rows of
        // 64 bytes into `out`.
        unsafe {
            for _ in 0..2 {
                super::configure();
                super::configure();
                super::zero_acc();
                std::arch::asm!("tilestored [{p} + {s}*1], tmm0", p = in(reg) out.as_mut_ptr(), s = in(reg) 64usize);
                assert!(out.iter().all(|&x| x == 0));
                out = [7; 16 * 16];
                super::release();
            }
            std::arch::asm!("sttilecfg [{}]", in(reg) c.0.as_mut_ptr(), options(nostack));
        }
        assert!(c.0.iter().all(|&b| b == 0), "released tiles keep no configuration");
    }
}

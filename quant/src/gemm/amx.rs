//! The AMX-INT8 panel kernel: one tile multiply per activation block and 16 tokens.
//!
//! The panel's code lines are already in the layout AMX wants for its second operand (a
//! 64-byte row per four columns, four codes of each of 16 weight rows), and the batch's
//! activation rows are the first operand as they lie in memory (16 tokens × 32 bytes at a
//! stride of one activation row). `tdpbsud` (signed activations × unsigned codes) gives the
//! exact integer sums of 16 tokens × 16 rows for one block at once; the sums of up to
//! [`CHUNK`] blocks are stored, and their float contributions are then formed by the VNNI
//! kernel's own function ([`super::x86::contribution`]), so that both kernels are the same
//! arithmetic and bit-identical to the reference. Q6_K, whose sub-scales change every 16
//! columns, takes two half-block multiplies.
//!
//! Linux hands out the 8 KiB tile state only to a process that asks for it
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`): [`available`] asks once.

use core::arch::asm;
use core::arch::x86_64::*;
use core::sync::atomic::{AtomicU8, Ordering};

use super::x86::{contribution, family_tag, K_QUANT, MINIMUM, OFFSET, SIX_BIT};
use super::{Family, Panel, PanelLine, Q8Batch, LINES_PER_BLOCK, PANEL_ROWS};
use crate::blocks::BLOCK_LEN;

/// Tokens per tile multiply (the rows of a tile).
const TILE_TOKENS: usize = 16;

/// Activation blocks whose integer sums are stored before their float step (8 KiB).
const CHUNK: usize = 8;

/// Whether AMX-INT8 can be used: 0 not yet probed, 1 yes, 2 no.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether this CPU has AMX-TILE and AMX-INT8, the OS enables their state, and this
/// process was granted it (probed once; later calls read the answer).
pub(super) fn available() -> bool {
    match STATE.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let ok = probe();
            STATE.store(if ok { 1 } else { 2 }, Ordering::Relaxed);
            ok
        }
    }
}

fn probe() -> bool {
    const OSXSAVE: u32 = 1 << 27;
    const AMX_TILE_AND_INT8: u32 = 3 << 24;
    const XTILE_CFG_AND_DATA: u64 = 3 << 17;
    if __cpuid(1).ecx & OSXSAVE == 0 || __cpuid_count(7, 0).edx & AMX_TILE_AND_INT8 != AMX_TILE_AND_INT8 {
        return false;
    }
    let (low, high): (u32, u32);
    // SAFETY: `xgetbv` with ECX = 0 reads XCR0; OSXSAVE (checked above) says it exists.
    unsafe {
        asm!("xgetbv", in("ecx") 0u32, out("eax") low, out("edx") high, options(nomem, nostack, preserves_flags))
    };
    let xcr0 = (u64::from(high) << 32) | u64::from(low);
    xcr0 & XTILE_CFG_AND_DATA == XTILE_CFG_AND_DATA && request_tile_state()
}

/// Asks Linux for the tile data state (granted to the whole process).
#[cfg(target_os = "linux")]
fn request_tile_state() -> bool {
    const SYS_ARCH_PRCTL: i64 = 158;
    const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
    const XFEATURE_XTILEDATA: i64 = 18;
    let status: i64;
    // SAFETY: the `arch_prctl` system call with these arguments only changes the process's
    // permitted extended state; the kernel clobbers RCX and R11 and nothing else.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") SYS_ARCH_PRCTL => status,
            in("rdi") ARCH_REQ_XCOMP_PERM,
            in("rsi") XFEATURE_XTILEDATA,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        )
    };
    status == 0
}

/// Elsewhere the tile state's permission protocol is unknown: no AMX.
#[cfg(not(target_os = "linux"))]
fn request_tile_state() -> bool {
    false
}

/// The 64-byte tile configuration `ldtilecfg` reads (palette 1).
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    /// Bytes per row of tiles 0..16.
    bytes_per_row: [u16; 16],
    /// Rows of tiles 0..16.
    rows: [u8; 16],
}

impl TileConfig {
    /// The tiles for `tokens` activation rows. Whole blocks: tiles 0 and 3 activations
    /// (`tokens` × 32 bytes), 1 and 4 codes (8 lines), 2 and 5 sums (`tokens` × 16 i32), two
    /// sets for two blocks in flight. Half blocks (Q6_K): tiles 0 and 1 the low and high 16
    /// activations, 2 and 3 their 4 code lines, 4 and 5 their sums.
    fn new(tokens: usize, half_blocks: bool) -> Self {
        let mut config =
            TileConfig { palette: 1, start_row: 0, reserved: [0; 14], bytes_per_row: [0; 16], rows: [0; 16] };
        let tokens = tokens as u8;
        let tiles: [(u8, u16); 6] = if half_blocks {
            [(tokens, 16), (tokens, 16), (4, 64), (4, 64), (tokens, 64), (tokens, 64)]
        } else {
            [(tokens, 32), (8, 64), (tokens, 64), (tokens, 32), (8, 64), (tokens, 64)]
        };
        for (i, (rows, bytes)) in tiles.into_iter().enumerate() {
            config.rows[i] = rows;
            config.bytes_per_row[i] = bytes;
        }
        config
    }
}

/// Integer sums of [`CHUNK`] blocks for 16 tokens × 16 rows, 64-byte aligned for the
/// float step's loads.
#[repr(C, align(64))]
struct ChunkSums([[[i32; PANEL_ROWS]; TILE_TOKENS]; CHUNK]);

/// See [`super::PanelGemm::run`]; the caller has checked every length, that this CPU has
/// AVX-512 F, BW and VNNI, and that [`available`] said yes.
pub(super) fn gemm(panel: &Panel<'_>, family: Family, x: &Q8Batch<'_>, out: &mut [f32], stride: usize) {
    let (tag, offset) = family_tag(family);
    let mut low = ChunkSums([[[0; PANEL_ROWS]; TILE_TOKENS]; CHUNK]);
    let mut high = ChunkSums([[[0; PANEL_ROWS]; TILE_TOKENS]; CHUNK]);
    let mut t0 = 0;
    let mut configured = 0;
    while t0 < x.tokens {
        let tokens = (x.tokens - t0).min(TILE_TOKENS);
        if tokens != configured {
            // `ldtilecfg` costs hundreds of cycles: once per call and tile height.
            let config = TileConfig::new(tokens, family == Family::SixBit);
            // SAFETY: `config` is a valid palette-1 configuration: every tile's rows ≤ 16
            // and bytes per row ≤ 64, and each multiply's shapes agree (activation bytes
            // / 4 = code rows).
            unsafe { asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly)) };
            configured = tokens;
        }
        // SAFETY: as `super::x86::gemm` (lengths checked by `run`, AVX-512 present), and
        // the tile state was granted (`available`).
        unsafe {
            match tag {
                OFFSET => group::<OFFSET>(panel, offset, x, t0, tokens, out, stride, &mut low, &mut high),
                MINIMUM => group::<MINIMUM>(panel, offset, x, t0, tokens, out, stride, &mut low, &mut high),
                K_QUANT => group::<K_QUANT>(panel, offset, x, t0, tokens, out, stride, &mut low, &mut high),
                _ => group::<SIX_BIT>(panel, offset, x, t0, tokens, out, stride, &mut low, &mut high),
            }
        }
        t0 += tokens;
    }
    // SAFETY: `tilerelease` returns the tile state to its initial (unused) state, so that
    // context switches do not save it while Petrel is not multiplying.
    unsafe { asm!("tilerelease", options(nomem, nostack)) };
}

/// Tokens `t0 .. t0 + tokens` (at most 16) against the whole panel, the integer sums
/// passing through `low` and `high` (Q6_K's high halves).
#[allow(clippy::too_many_arguments)] // one group of one product: its operands and scratch
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn group<const FAM: u8>(
    panel: &Panel<'_>,
    offset: i32,
    x: &Q8Batch<'_>,
    t0: usize,
    tokens: usize,
    out: &mut [f32],
    stride: usize,
    low: &mut ChunkSums,
    high: &mut ChunkSums,
) {
    let half_blocks = FAM == SIX_BIT;
    let blocks = panel.blocks;
    let cols = blocks * BLOCK_LEN;
    let first = &x.qs[t0 * cols..(t0 + tokens) * cols];
    let (scales, sums) = (&x.scales[t0 * blocks..], &x.sums[t0 * blocks..]);
    let (activations, lines) = (first.as_ptr(), panel.lines.as_ptr());
    let mut lanes = [[_mm512_setzero_ps(); 4]; TILE_TOKENS];
    let mut start = 0;
    while start < blocks {
        let n = (blocks - start).min(CHUNK);
        for j in 0..n {
            let b = start + j;
            // SAFETY: the activation tile reads `tokens` rows of 32 bytes at column 32 b of
            // `first` (rows of `cols` bytes, `b < blocks`); the code tiles read lines
            // `12 b .. 12 b + 8` of the panel; the sum tiles write `tokens` rows of 64 bytes
            // into chunk slot `j`, which holds 16.
            unsafe {
                let (a, w) = (activations.add(b * BLOCK_LEN), lines.add(b * LINES_PER_BLOCK));
                let (c, c_high) = (low.0[j].as_mut_ptr(), high.0[j].as_mut_ptr());
                if half_blocks {
                    asm!(
                        "tilezero tmm4",
                        "tilezero tmm5",
                        "tileloadd tmm0, [{a} + {a_stride}]",
                        "tileloadd tmm1, [{a_high} + {a_stride}]",
                        "tileloadd tmm2, [{w} + {line}]",
                        "tileloadd tmm3, [{w_high} + {line}]",
                        "tdpbsud tmm4, tmm0, tmm2",
                        "tdpbsud tmm5, tmm1, tmm3",
                        "tilestored [{c} + {line}], tmm4",
                        "tilestored [{c_high} + {line}], tmm5",
                        a = in(reg) a,
                        a_high = in(reg) a.add(16),
                        a_stride = in(reg) cols,
                        w = in(reg) w,
                        w_high = in(reg) w.add(4),
                        line = in(reg) 64usize,
                        c = in(reg) c,
                        c_high = in(reg) c_high,
                        options(nostack),
                    );
                } else if j % 2 == 0 {
                    asm!(
                        "tilezero tmm2",
                        "tileloadd tmm0, [{a} + {a_stride}]",
                        "tileloadd tmm1, [{w} + {line}]",
                        "tdpbsud tmm2, tmm0, tmm1",
                        "tilestored [{c} + {line}], tmm2",
                        a = in(reg) a,
                        a_stride = in(reg) cols,
                        w = in(reg) w,
                        line = in(reg) 64usize,
                        c = in(reg) c,
                        options(nostack),
                    );
                } else {
                    asm!(
                        "tilezero tmm5",
                        "tileloadd tmm3, [{a} + {a_stride}]",
                        "tileloadd tmm4, [{w} + {line}]",
                        "tdpbsud tmm5, tmm3, tmm4",
                        "tilestored [{c} + {line}], tmm5",
                        a = in(reg) a,
                        a_stride = in(reg) cols,
                        w = in(reg) w,
                        line = in(reg) 64usize,
                        c = in(reg) c,
                        options(nostack),
                    );
                }
            }
        }
        // `start` is a multiple of CHUNK (of 4), so block `start + j` goes to lane `j % 4`.
        for (t, lane) in lanes.iter_mut().enumerate().take(tokens) {
            let mut acc = *lane;
            for j0 in (0..n).step_by(4) {
                for (k, acc) in acc.iter_mut().enumerate() {
                    let (j, b) = (j0 + k, start + j0 + k);
                    if j >= n {
                        break;
                    }
                    // SAFETY: slot `j` row `t` was just written (t < tokens), record `b` is
                    // 12 aligned lines, and token `t`'s block `b` is 32 bytes of `first`.
                    let part = unsafe {
                        let sum = _mm512_load_si512(low.0[j][t].as_ptr() as *const __m512i);
                        let sum_high = if half_blocks {
                            _mm512_load_si512(high.0[j][t].as_ptr() as *const __m512i)
                        } else {
                            _mm512_setzero_si512()
                        };
                        let record: *const PanelLine = lines.add(b * LINES_PER_BLOCK);
                        let block_x = activations.add(t * cols + b * BLOCK_LEN);
                        contribution::<FAM>(
                            record,
                            offset,
                            sum,
                            sum_high,
                            block_x,
                            scales[t * blocks + b],
                            sums[t * blocks + b],
                        )
                    };
                    *acc = _mm512_add_ps(*acc, part);
                }
            }
            *lane = acc;
        }
        start += n;
    }
    let mask: __mmask16 = if panel.rows >= 16 { 0xFFFF } else { (1u16 << panel.rows) - 1 };
    for (t, l) in lanes.iter().enumerate().take(tokens) {
        let result = _mm512_add_ps(_mm512_add_ps(l[0], l[1]), _mm512_add_ps(l[2], l[3]));
        let at = (t0 + t) * stride;
        // SAFETY: `run` checked `out.len() >= (tokens - 1) * stride + rows`, so the `rows`
        // unmasked lanes from `at` lie inside `out`; masked-off lanes are not accessed.
        unsafe { _mm512_mask_storeu_ps(out[at..].as_mut_ptr(), mask, result) };
    }
}

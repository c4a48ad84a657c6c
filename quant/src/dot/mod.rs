//! Block dot products between a quantized weight row and a row of 8-bit activations.
//!
//! # The reference arithmetic
//!
//! Every kernel, scalar or SIMD, computes the same thing in the same order, so that the
//! SIMD versions are **bit-identical** to [`scalar`]. The unit of work is the *activation
//! block* `b` of 32 values (scale `d_x`, exact code sum `sum_x`); a classic weight block
//! covers one, a K-quant super-block of 256 weights covers eight (`b = 8 S + s`: sub-block
//! `s` of super-block `S`, whose 32-weight sub-blocks align with activation blocks).
//! 1. per activation block `b`, an exact integer dot product `isum_b` between the weight
//!    codes and the activation codes: unsigned codes for Q4_x (nibbles), Q5_x and Q4_K /
//!    Q5_K (0..32), signed bytes for Q8_0; for Q6_K the exact
//!    `scaled_b = sc_{2s} * Σ_{l<16} (q_l - 32) x_l + sc_{2s+1} * Σ_{l>=16} (q_l - 32) x_l`
//!    with the signed 8-bit sub-scales of its two 16-weight sub-blocks (all in i32: the
//!    bound is `2 * 128 * 32 * 127 * 16 < 2^31`);
//! 2. per activation block, a float contribution, each product rounded to f32 separately
//!    (no FMA), `d_w`, `m_w`, `dmin_w` the block's f16 fields as f32:
//!    - Q4_0: `(d_w * d_x) * (isum_b - 8 * sum_x)`
//!    - Q4_1, Q5_1: `(d_w * d_x) * isum_b + (m_w * d_x) * sum_x`
//!    - Q5_0: `(d_w * d_x) * (isum_b - 16 * sum_x)`
//!    - Q8_0: `(d_w * d_x) * isum_b`
//!    - Q4_K, Q5_K (sub-block scale `sc_s`, minimum `m_s`, both 6-bit):
//!      `(d_w * d_x) * (sc_s * isum_b) - (dmin_w * d_x) * (m_s * sum_x)`, the two
//!      integer products exact in i32 before conversion
//!    - Q6_K: `(d_w * d_x) * scaled_b`
//! 3. contributions accumulate into four lanes, activation block `b` into lane `b % 4`, in
//!    increasing `b`;
//! 4. the result is `(lane0 + lane1) + (lane2 + lane3)`.
//!
//! Four lanes let SIMD kernels reduce four blocks' integer sums with one horizontal add
//! chain and keep the float accumulation in one 128-bit register; a super-block of eight
//! activation blocks is exactly two such groups. Every integer step is exact, so a kernel
//! may compute `isum_b` in any order or decomposition (e.g. as `Σ q x - 32 Σ x`).

#[cfg(all(target_arch = "arm", target_feature = "dsp"))]
mod cortex_m;
#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
mod neon;
pub mod scalar;
#[cfg(target_arch = "x86_64")]
mod x86;

use crate::activation::Q8Row;
use crate::blocks::WeightFormat;

/// A dot product of one weight row (raw block bytes) with one activation row.
pub type DotFn = fn(row: &[u8], x: Q8Row<'_>) -> f32;

/// Dot products of one weight row with four activation rows (bit-identical to four
/// [`DotFn`] calls; the weight blocks are unpacked once).
pub type Dot4Fn = fn(row: &[u8], xs: &[Q8Row<'_>; 4]) -> [f32; 4];

/// Instruction sets Petrel has kernels for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// Portable Rust, the reference.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 VNNI (256-bit `vpdpbusd`, needs AVX-512 VL) on top of AVX2.
    Avx512Vnni,
    /// aarch64 NEON with the dot-product extension (`sdot`; Armv8.2-A and later).
    NeonDot,
    /// aarch64 NEON with the int8 matrix-multiply extension (`smmla`; Armv8.6-A and later).
    NeonI8mm,
    /// Arm M-profile DSP extension (`SMLAD`, `SXTB16`; Cortex-M4, M7, M33, M55, M85).
    CortexMDsp,
    /// Arm M-profile vector extension, Helium/MVE (`VMLADAVA`; Cortex-M55, M85), on top of
    /// DSP. Needs this crate's `helium` feature (see the `cortex_m` module).
    Helium,
}

impl Isa {
    /// Every instruction set this build's target architecture has kernels for, the
    /// reference first, then in increasing order of preference.
    #[cfg(target_arch = "x86_64")]
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::Avx2, Isa::Avx512Vnni];
    /// Every instruction set this build's target architecture has kernels for, the
    /// reference first, then in increasing order of preference.
    #[cfg(target_arch = "aarch64")]
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::NeonDot, Isa::NeonI8mm];
    /// Every instruction set this build's target architecture has kernels for, the
    /// reference first, then in increasing order of preference.
    #[cfg(all(target_arch = "arm", feature = "helium"))]
    pub const ALL: [Isa; 3] = [Isa::Scalar, Isa::CortexMDsp, Isa::Helium];
    /// Every instruction set this build's target architecture has kernels for, the
    /// reference first, then in increasing order of preference.
    #[cfg(all(target_arch = "arm", not(feature = "helium")))]
    pub const ALL: [Isa; 2] = [Isa::Scalar, Isa::CortexMDsp];
    /// Every instruction set this build's target architecture has kernels for: only the
    /// reference.
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64", target_arch = "arm")))]
    pub const ALL: [Isa; 1] = [Isa::Scalar];

    /// Whether this CPU runs kernels for `self`: detected at run time with `std`, from the
    /// compile-time target features otherwise. Every kernel family (`Kernels`,
    /// `W4Kernels`, the lookup-table kernel) asks here.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => x86::has_avx2(),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni => x86::has_avx512vnni(),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot => {
                #[cfg(feature = "std")]
                {
                    std::arch::is_aarch64_feature_detected!("dotprod")
                }
                #[cfg(not(feature = "std"))]
                {
                    cfg!(target_feature = "dotprod")
                }
            }
            #[cfg(target_arch = "aarch64")]
            Isa::NeonI8mm => {
                #[cfg(feature = "std")]
                {
                    std::arch::is_aarch64_feature_detected!("i8mm")
                }
                #[cfg(not(feature = "std"))]
                {
                    cfg!(target_feature = "i8mm")
                }
            }
            #[cfg(target_arch = "arm")]
            Isa::CortexMDsp => cfg!(target_feature = "dsp"),
            #[cfg(target_arch = "arm")]
            Isa::Helium => cfg!(all(target_feature = "dsp", feature = "helium")),
            _ => false,
        }
    }

    /// A short lower-case name (`scalar`, `avx2`, `avx512vnni`, `neon-dotprod`,
    /// `neon-i8mm`, `cortex-m-dsp`, `helium`).
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
            Isa::NeonDot => "neon-dotprod",
            Isa::NeonI8mm => "neon-i8mm",
            Isa::CortexMDsp => "cortex-m-dsp",
            Isa::Helium => "helium",
        }
    }
}

/// The dot-product kernels for one instruction set.
///
/// Build it with [`Kernels::detect`] (best available), [`Kernels::scalar`] or
/// [`Kernels::for_isa`]; a SIMD table can only be obtained on a CPU that supports it.
#[derive(Clone, Copy, Debug)]
pub struct Kernels {
    isa: Isa,
    /// One kernel per format, indexed by `WeightFormat as usize` (the order of
    /// [`WeightFormat::ALL`]).
    dot: [DotFn; 8],
    /// As `dot`, four activation rows at a time.
    dot4: [Dot4Fn; 8],
}

impl Kernels {
    /// The portable scalar reference.
    pub const fn scalar() -> Self {
        Kernels {
            isa: Isa::Scalar,
            dot: [
                scalar::dot_q4_0,
                scalar::dot_q4_1,
                scalar::dot_q8_0,
                scalar::dot_q5_0,
                scalar::dot_q5_1,
                scalar::dot_q4_k,
                scalar::dot_q5_k,
                scalar::dot_q6_k,
            ],
            dot4: [
                |row, xs| scalar::dot4(WeightFormat::Q4_0, row, xs),
                |row, xs| scalar::dot4(WeightFormat::Q4_1, row, xs),
                |row, xs| scalar::dot4(WeightFormat::Q8_0, row, xs),
                |row, xs| scalar::dot4(WeightFormat::Q5_0, row, xs),
                |row, xs| scalar::dot4(WeightFormat::Q5_1, row, xs),
                |row, xs| scalar::dot4(WeightFormat::Q4_K, row, xs),
                |row, xs| scalar::dot4(WeightFormat::Q5_K, row, xs),
                |row, xs| scalar::dot4(WeightFormat::Q6_K, row, xs),
            ],
        }
    }

    /// The kernels for `isa`, or `None` if this CPU (or this build) cannot run them.
    ///
    /// Formats without a kernel for `isa` use the reference (bit-identical anyway): on
    /// aarch64 Q4_0, Q4_1 and Q8_0 (NEON covers Q5_0, Q5_1 and the K-quants; i8mm uses the
    /// dotprod kernels), on Cortex-M everything but Q8_0. The table still carries `isa`,
    /// which the W4 kernels follow (`W4Kernels::for_isa`).
    pub fn for_isa(isa: Isa) -> Option<Self> {
        match isa {
            Isa::Scalar => Some(Self::scalar()),
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Isa::NeonDot | Isa::NeonI8mm if isa.is_supported() => {
                let mut k = Kernels { isa, ..Self::scalar() };
                neon::install(&mut k.dot, &mut k.dot4);
                Some(k)
            }
            #[cfg(all(target_arch = "aarch64", not(target_feature = "neon")))]
            Isa::NeonDot | Isa::NeonI8mm if isa.is_supported() => Some(Kernels { isa, ..Self::scalar() }),
            #[cfg(all(target_arch = "arm", target_feature = "dsp"))]
            Isa::CortexMDsp if isa.is_supported() => {
                let mut k = Kernels { isa, ..Self::scalar() };
                k.dot[WeightFormat::Q8_0 as usize] = cortex_m::dot_q8_0_dsp;
                k.dot4[WeightFormat::Q8_0 as usize] = cortex_m::dot4_q8_0_dsp;
                Some(k)
            }
            #[cfg(all(target_arch = "arm", target_feature = "dsp", feature = "helium"))]
            Isa::Helium if isa.is_supported() => {
                let mut k = Kernels { isa, ..Self::scalar() };
                k.dot[WeightFormat::Q8_0 as usize] = cortex_m::dot_q8_0_helium;
                k.dot4[WeightFormat::Q8_0 as usize] = cortex_m::dot4_q8_0_helium;
                Some(k)
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if isa.is_supported() => Some(Kernels { isa, dot: x86::AVX2_DOT, dot4: x86::AVX2_DOT4 }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if isa.is_supported() => Some(Kernels { isa, dot: x86::VNNI_DOT, dot4: x86::VNNI_DOT4 }),
            _ => None,
        }
    }

    /// The fastest kernels this CPU runs (detected at run time with `std`, otherwise
    /// from the compile-time target features).
    pub fn detect() -> Self {
        Isa::ALL.iter().rev().find_map(|&isa| Self::for_isa(isa)).unwrap_or_else(Self::scalar)
    }

    /// The instruction set of these kernels.
    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// The kernel for weights in `format`.
    #[inline]
    pub fn for_format(&self, format: WeightFormat) -> DotFn {
        self.dot[format as usize]
    }

    /// The four-row kernel for weights in `format`.
    #[inline]
    pub fn for_format_x4(&self, format: WeightFormat) -> Dot4Fn {
        self.dot4[format as usize]
    }

    /// `Σ_j w_j x_j` for one weight row in `format` against one activation row.
    ///
    /// # Panics
    /// If `row` does not hold exactly the blocks of `format` that cover `x.blocks()`
    /// activation blocks.
    #[inline]
    pub fn dot(&self, format: WeightFormat, row: &[u8], x: Q8Row<'_>) -> f32 {
        (self.for_format(format))(row, x)
    }
}

/// Checks that `row` and `x` describe the same number of weights (for the K-quants a whole
/// number of super-blocks); every kernel calls it before touching memory, which is what
/// makes the SIMD kernels' unchecked loads sound. Returns the number of activation blocks.
#[inline(always)]
fn check_lengths(format: WeightFormat, row: &[u8], x: &Q8Row<'_>) -> usize {
    let blocks = x.scales.len();
    let per = format.activation_blocks();
    assert!(
        blocks.is_multiple_of(per)
            && row.len() == blocks / per * format.block_bytes()
            && x.qs.len() == blocks * crate::BLOCK_LEN
            && x.sums.len() == blocks,
        "dot product operands disagree in length"
    );
    blocks
}

/// Step 4 of the reference arithmetic.
#[inline(always)]
fn combine_lanes(lanes: [f32; 4]) -> f32 {
    (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])
}

#[cfg(test)]
pub(crate) mod tests;

/// Asks the CPU to start loading `data` into cache (x86-64: `prefetcht0` per 64-byte
/// line; a no-op elsewhere). Decode streams every weight matrix from memory once per
/// token; prefetching a few rows ahead overlaps that latency with the current row's math.
#[inline(always)]
pub fn prefetch(data: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(64) {
        // SAFETY: a prefetch never faults and has no architectural effect; the address
        // comes from a live slice.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T1 }>(line.as_ptr() as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

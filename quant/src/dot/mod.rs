//! Block dot products between a quantized weight row and a row of 8-bit activations.
//!
//! # The reference arithmetic
//!
//! Every kernel, scalar or SIMD, computes the same thing in the same order, so that the
//! SIMD versions are **bit-identical** to [`scalar`]:
//! 1. per block `b`, an exact integer dot product `isum_b` between the weight codes and the
//!    activation codes (unsigned nibbles for Q4_x, signed bytes for Q8_0);
//! 2. per block, a float contribution, each product rounded to f32 separately (no FMA):
//!    - Q4_0: `(d_w * d_x) * (isum_b - 8 * sum_x)`
//!    - Q4_1: `(d_w * d_x) * isum_b + (m_w * d_x) * sum_x`
//!    - Q8_0: `(d_w * d_x) * isum_b`
//! 3. contributions accumulate into four lanes, block `b` into lane `b % 4`;
//! 4. the result is `(lane0 + lane1) + (lane2 + lane3)`.
//!
//! Four lanes let SIMD kernels reduce four blocks' integer sums with one horizontal add
//! chain and keep the float accumulation in one 128-bit register.

#[cfg(all(target_arch = "arm", target_feature = "dsp"))]
mod cortex_m;
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
    q4_0: DotFn,
    q4_1: DotFn,
    q8_0: DotFn,
    q4_0_x4: Dot4Fn,
    q4_1_x4: Dot4Fn,
    q8_0_x4: Dot4Fn,
}

impl Kernels {
    /// The portable scalar reference.
    pub const fn scalar() -> Self {
        Kernels {
            isa: Isa::Scalar,
            q4_0: scalar::dot_q4_0,
            q4_1: scalar::dot_q4_1,
            q8_0: scalar::dot_q8_0,
            q4_0_x4: |row, xs| scalar::dot4(WeightFormat::Q4_0, row, xs),
            q4_1_x4: |row, xs| scalar::dot4(WeightFormat::Q4_1, row, xs),
            q8_0_x4: |row, xs| scalar::dot4(WeightFormat::Q8_0, row, xs),
        }
    }

    /// The kernels for `isa`, or `None` if this CPU (or this build) cannot run them.
    ///
    /// Formats without a kernel for `isa` use the reference (bit-identical anyway): on
    /// aarch64 all three block formats, on Cortex-M Q4_0 and Q4_1. The table still carries
    /// `isa`, which the W4 kernels follow (`W4Kernels::for_isa`).
    pub fn for_isa(isa: Isa) -> Option<Self> {
        match isa {
            Isa::Scalar => Some(Self::scalar()),
            #[cfg(target_arch = "aarch64")]
            Isa::NeonDot | Isa::NeonI8mm if isa.is_supported() => Some(Kernels { isa, ..Self::scalar() }),
            #[cfg(all(target_arch = "arm", target_feature = "dsp"))]
            Isa::CortexMDsp if isa.is_supported() => {
                Some(Kernels { isa, q8_0: cortex_m::dot_q8_0_dsp, q8_0_x4: cortex_m::dot4_q8_0_dsp, ..Self::scalar() })
            }
            #[cfg(all(target_arch = "arm", target_feature = "dsp", feature = "helium"))]
            Isa::Helium if isa.is_supported() => Some(Kernels {
                isa,
                q8_0: cortex_m::dot_q8_0_helium,
                q8_0_x4: cortex_m::dot4_q8_0_helium,
                ..Self::scalar()
            }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 if isa.is_supported() => Some(Kernels {
                isa,
                q4_0: x86::dot_q4_0_avx2,
                q4_1: x86::dot_q4_1_avx2,
                q8_0: x86::dot_q8_0_avx2,
                q4_0_x4: x86::dot4_q4_0_avx2,
                q4_1_x4: x86::dot4_q4_1_avx2,
                q8_0_x4: x86::dot4_q8_0_avx2,
            }),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Vnni if isa.is_supported() => Some(Kernels {
                isa,
                q4_0: x86::dot_q4_0_vnni,
                q4_1: x86::dot_q4_1_vnni,
                q8_0: x86::dot_q8_0_vnni,
                q4_0_x4: x86::dot4_q4_0_vnni,
                q4_1_x4: x86::dot4_q4_1_vnni,
                q8_0_x4: x86::dot4_q8_0_vnni,
            }),
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
        match format {
            WeightFormat::Q4_0 => self.q4_0,
            WeightFormat::Q4_1 => self.q4_1,
            WeightFormat::Q8_0 => self.q8_0,
        }
    }

    /// The four-row kernel for weights in `format`.
    #[inline]
    pub fn for_format_x4(&self, format: WeightFormat) -> Dot4Fn {
        match format {
            WeightFormat::Q4_0 => self.q4_0_x4,
            WeightFormat::Q4_1 => self.q4_1_x4,
            WeightFormat::Q8_0 => self.q8_0_x4,
        }
    }

    /// `Σ_j w_j x_j` for one weight row in `format` against one activation row.
    ///
    /// # Panics
    /// If `row` does not hold exactly `x.blocks()` blocks of `format`.
    #[inline]
    pub fn dot(&self, format: WeightFormat, row: &[u8], x: Q8Row<'_>) -> f32 {
        (self.for_format(format))(row, x)
    }
}

/// Checks that `row` and `x` describe the same number of blocks; every kernel calls it
/// before touching memory, which is what makes the SIMD kernels' unchecked loads sound.
#[inline(always)]
fn check_lengths(format: WeightFormat, row: &[u8], x: &Q8Row<'_>) -> usize {
    let blocks = x.scales.len();
    assert!(
        row.len() == blocks * format.block_bytes() && x.qs.len() == blocks * crate::BLOCK_LEN && x.sums.len() == blocks,
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
mod tests;

/// Asks the CPU to start loading `data` into cache (x86-64: `prefetcht0` per 64-byte
/// line; a no-op elsewhere). Decode streams every weight matrix from memory once per
/// token; prefetching a few rows ahead overlaps that latency with the current row's math.
#[inline(always)]
pub fn prefetch(data: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(64) {
        // SAFETY: a prefetch never faults and has no architectural effect; the address
        // comes from a live slice.
        unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(line.as_ptr() as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

//! Petrel's number formats and integer kernels.
//!
//! `no_std`, no allocation. The crate holds:
//! - [`blocks`]: the weight block formats Petrel reads from GGUF files (Q4_0, Q4_1, Q5_0,
//!   Q5_1, Q8_0 in blocks of 32; the K-quants Q4_K, Q5_K, Q6_K in super-blocks of 256),
//!   their byte layouts, validation (finite scales), dequantization and a round-to-nearest
//!   quantizer;
//! - [`activation`]: the 8-bit activation blocks that the integer dot products consume
//!   (dynamic, per block of 32, absmax scaling);
//! - [`w4`]: symmetric int4 weights in 16-row panels with per-channel or per-group f16
//!   scales, int4/int8 activations scaled per token and group, and the W4A4 / W4A8 / W4A16 matrix kernels;
//! - [`dot`]: block dot products — a scalar reference, x86 SIMD versions (AVX2, AVX-512
//!   VNNI) for every format and aarch64 NEON dotprod versions for Q5_x and the K-quants,
//!   all bit-identical to it — and [`dot::Kernels`], the dispatch table;
//! - [`gemm`]: prefill matrix products on block weights, 16 rows unpacked once per batch
//!   into a panel and multiplied with AVX-512 VNNI, bit-identical to [`dot`]'s reference;
//! - Cortex-M kernels (DSP and Helium) for Q8_0 and W4, from the primitives in `cortex_m`.
#![no_std]
#![forbid(unsafe_op_in_unsafe_fn)]

#[cfg(feature = "std")]
extern crate std;

#[cfg(feature = "alloc")]
extern crate alloc;

pub mod activation;
pub mod blocks;
#[cfg(all(target_arch = "arm", target_feature = "dsp"))]
pub(crate) mod cortex_m;
pub mod dot;
pub mod float;
pub mod gemm;
pub mod hadamard;
#[cfg(feature = "alloc")]
pub mod ptq;
pub mod rng;
pub mod w4;

pub use activation::{quantize_row_q8, Q8Row, Q8RowMut};
pub use blocks::{WeightFormat, BLOCK_LEN, K_BLOCK_LEN};
pub use dot::Kernels;
pub use float::FloatKernels;

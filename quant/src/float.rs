//! f32 vector kernels for attention: dot product, `y += a·x`, and `exp` in place.
//!
//! Unlike the integer kernels these are not bit-identical across instruction sets (the
//! SIMD versions sum in a different order and use a polynomial `exp`); they agree with the
//! scalar versions to a few ulps, which the tests check.
//!
//! The exception is the tile kernels of batched attention ([`FloatKernels::tile_scores`],
//! [`FloatKernels::tile_exp`], [`FloatKernels::tile_pv`]): they fix the order of every
//! operation (separate multiply and add, no FMA; sums in the trees documented on each), so
//! the scalar and SIMD versions agree bit for bit and a query's result depends on nothing
//! but its own data.

/// Keys per tile of the attention tile kernels.
pub const KEY_TILE: usize = 16;

/// `exp` kernels and friends for one instruction set; build with [`FloatKernels::detect`].
#[derive(Clone, Copy, Debug)]
pub struct FloatKernels {
    dot: fn(&[f32], &[f32]) -> f32,
    axpy: fn(&mut [f32], f32, &[f32]),
    exp_sub: fn(&mut [f32], f32) -> f32,
    silu_mul: fn(&mut [f32], &[f32]),
    gelu_tanh_mul: fn(&mut [f32], &[f32]),
    tile_scores: fn(&[f32], &[f32], usize, usize, &mut [f32; KEY_TILE]),
    tile_exp: fn(&mut [f32; KEY_TILE], usize, f32) -> f32,
    tile_pv: fn(&mut [f32], &[f32; KEY_TILE], usize, &[f32], usize),
    tile_scores_f16: fn(&[f32], &[u16], usize, usize, &mut [f32; KEY_TILE]),
    tile_pv_f16: fn(&mut [f32], &[f32; KEY_TILE], usize, &[u16], usize),
    tile_scores_i8: fn(&[f32], &[i8], usize, usize, &mut [f32; KEY_TILE]),
    tile_pv_i8: fn(&mut [f32], &[f32; KEY_TILE], usize, &[i8], usize),
}

/// An element of a key/value cache row that the attention tile kernels read: `f32`, an
/// IEEE half stored as its bits (`u16`), or a signed 8-bit code (`i8`, whose row scale the
/// caller applies); each widened exactly to f32 on load.
pub trait KvElement: Copy + 'static {
    /// How the SIMD kernels load eight of them.
    const KIND: ElementKind;
    /// The value as f32 (exact).
    fn to_f32(self) -> f32;
}

/// The storage kinds of [`KvElement`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementKind {
    /// f32.
    Single,
    /// f16 bits.
    Half,
    /// i8 codes.
    Byte,
}

impl KvElement for f32 {
    const KIND: ElementKind = ElementKind::Single;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}

impl KvElement for u16 {
    const KIND: ElementKind = ElementKind::Half;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        crate::blocks::f16_to_f32(self)
    }
}

impl KvElement for i8 {
    const KIND: ElementKind = ElementKind::Byte;
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

impl FloatKernels {
    /// Portable versions (eight independent accumulators, so the compiler can vectorize).
    pub const fn scalar() -> Self {
        FloatKernels {
            dot: scalar::dot,
            axpy: scalar::axpy,
            exp_sub: scalar::exp_sub,
            silu_mul: scalar::silu_mul,
            gelu_tanh_mul: scalar::gelu_tanh_mul,
            tile_scores: scalar::tile_scores,
            tile_exp: scalar::tile_exp,
            tile_pv: scalar::tile_pv,
            tile_scores_f16: scalar::tile_scores,
            tile_pv_f16: scalar::tile_pv,
            tile_scores_i8: scalar::tile_scores,
            tile_pv_i8: scalar::tile_pv,
        }
    }

    /// The AVX2 table (the caller checked AVX2 and FMA).
    #[cfg(target_arch = "x86_64")]
    fn avx2_unchecked() -> Self {
        FloatKernels {
            dot: x86::dot,
            axpy: x86::axpy,
            exp_sub: x86::exp_sub,
            silu_mul: x86::silu_mul,
            gelu_tanh_mul: x86::gelu_tanh_mul,
            tile_scores: x86::tile_scores,
            tile_exp: x86::tile_exp,
            tile_pv: x86::tile_pv,
            tile_scores_f16: x86::tile_scores,
            tile_pv_f16: x86::tile_pv,
            tile_scores_i8: x86::tile_scores,
            tile_pv_i8: x86::tile_pv,
        }
    }

    /// Without x86 SIMD: NEON tile kernels on aarch64 (NEON is part of the base ISA), else
    /// the portable versions.
    fn fallback() -> Self {
        #[cfg(target_arch = "aarch64")]
        return FloatKernels {
            tile_scores: neon::tile_scores,
            tile_pv: neon::tile_pv,
            tile_scores_f16: neon::tile_scores,
            tile_pv_f16: neon::tile_pv,
            tile_scores_i8: neon::tile_scores,
            tile_pv_i8: neon::tile_pv,
            ..Self::scalar()
        };
        #[cfg(not(target_arch = "aarch64"))]
        Self::scalar()
    }

    /// The AVX2 versions, where this CPU has AVX2 and FMA.
    pub fn avx2() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if crate::dot::Kernels::for_isa(crate::dot::Isa::Avx2).is_some() {
            return Some(Self::avx2_unchecked());
        }
        None
    }

    /// The fastest versions this CPU runs: AVX-512 tile kernels for attention where the
    /// CPU has AVX-512 F (with the AVX2 versions of the rest), else [`FloatKernels::avx2`],
    /// NEON tile kernels on aarch64, else the portable ones.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(avx2) = Self::avx2() {
            if crate::dot::Kernels::for_isa(crate::dot::Isa::Avx512Vnni).is_some() {
                return FloatKernels {
                    tile_scores: x86::tile_scores_avx512,
                    tile_exp: x86::tile_exp_avx512,
                    tile_pv: x86::tile_pv_avx512,
                    tile_scores_f16: x86::tile_scores_avx512,
                    tile_pv_f16: x86::tile_pv_avx512,
                    tile_scores_i8: x86::tile_scores_avx512,
                    tile_pv_i8: x86::tile_pv_avx512,
                    ..avx2
                };
            }
            return avx2;
        }
        Self::fallback()
    }

    /// `Σ a_i b_i` over the shorter of the two slices.
    #[inline]
    pub fn dot(&self, a: &[f32], b: &[f32]) -> f32 {
        (self.dot)(a, b)
    }

    /// `y_i += a · x_i` over the shorter of the two slices.
    #[inline]
    pub fn axpy(&self, y: &mut [f32], a: f32, x: &[f32]) {
        (self.axpy)(y, a, x)
    }

    /// `gate_i = silu(gate_i) · up_i` with `silu(x) = x / (1 + e^-x)` (SwiGLU), over the
    /// shorter of the two slices.
    #[inline]
    pub fn silu_mul(&self, gate: &mut [f32], up: &[f32]) {
        (self.silu_mul)(gate, up)
    }

    /// `gate_i = gelu(gate_i) · up_i` with GELU's tanh approximation
    /// `0.5 x (1 + tanh(√(2/π) (x + 0.044715 x³)))` (GeGLU), over the shorter of the two
    /// slices. The SIMD version computes `tanh` from `e^-2|z|` and agrees with the scalar one
    /// to about 1e-6 relative.
    #[inline]
    pub fn gelu_tanh_mul(&self, gate: &mut [f32], up: &[f32]) {
        (self.gelu_tanh_mul)(gate, up)
    }

    /// `x_i = exp(x_i - shift)` for every element; returns `Σ x_i` after the update.
    /// Inputs must be `≤ shift` (softmax), so no result overflows.
    #[inline]
    pub fn exp_sub(&self, x: &mut [f32], shift: f32) -> f32 {
        (self.exp_sub)(x, shift)
    }

    /// Scores of one query against the first `n` of a tile of [`KEY_TILE`] keys, key `j`
    /// being `keys[j * stride..][..q.len()]`; `out[j] = 0` for `j ≥ n`. Each score is
    /// `((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))`, where `a_l` sums `q[d] · k[d]`
    /// over `d ≡ l (mod 8)` in increasing `d`, from zero, each product and sum rounded
    /// separately (the SIMD version reduces eight keys at once, with no per-key horizontal
    /// sum). Bit-identical across instruction sets.
    #[inline]
    pub fn tile_scores(&self, q: &[f32], keys: &[f32], stride: usize, n: usize, out: &mut [f32; KEY_TILE]) {
        let n = n.min(KEY_TILE);
        if n > 0 {
            assert!(keys.len() >= (n - 1) * stride + q.len());
        }
        (self.tile_scores)(q, keys, stride, n, out)
    }

    /// [`FloatKernels::tile_scores`] on keys stored as f16 bits: bit-identical to it on the
    /// keys widened to f32.
    #[inline]
    pub fn tile_scores_f16(&self, q: &[f32], keys: &[u16], stride: usize, n: usize, out: &mut [f32; KEY_TILE]) {
        let n = n.min(KEY_TILE);
        if n > 0 {
            assert!(keys.len() >= (n - 1) * stride + q.len());
        }
        (self.tile_scores_f16)(q, keys, stride, n, out)
    }

    /// `x_j = exp(x_j - shift)` for `j < n` (with [`exp_poly`]) and `x_j = 0` above; returns
    /// the sum of the tile in the fixed tree `t_i = x_i + x_{i+8}`, `u_i = t_i + t_{i+4}`,
    /// `(u_0 + u_2) + (u_1 + u_3)`. Inputs must be `≤ shift`. Bit-identical across
    /// instruction sets.
    #[inline]
    pub fn tile_exp(&self, x: &mut [f32; KEY_TILE], n: usize, shift: f32) -> f32 {
        (self.tile_exp)(x, n.min(KEY_TILE), shift)
    }

    /// `out_i = out_i + p_j · v_j[i]` for `j = 0, 1, …, n - 1` in order (separate multiply
    /// and add), where row `v_j` is `values[j * stride..][..out.len()]`. Bit-identical
    /// across instruction sets.
    #[inline]
    pub fn tile_pv(&self, out: &mut [f32], p: &[f32; KEY_TILE], n: usize, values: &[f32], stride: usize) {
        let n = n.min(KEY_TILE);
        if n > 0 {
            assert!(values.len() >= (n - 1) * stride + out.len());
        }
        (self.tile_pv)(out, p, n, values, stride)
    }

    /// [`FloatKernels::tile_scores`] on keys stored as i8 codes (the caller multiplies each
    /// score by its key's scale): bit-identical to it on the codes widened to f32.
    #[inline]
    pub fn tile_scores_i8(&self, q: &[f32], keys: &[i8], stride: usize, n: usize, out: &mut [f32; KEY_TILE]) {
        let n = n.min(KEY_TILE);
        if n > 0 {
            assert!(keys.len() >= (n - 1) * stride + q.len());
        }
        (self.tile_scores_i8)(q, keys, stride, n, out)
    }

    /// [`FloatKernels::tile_pv`] on values stored as i8 codes (the caller folds each value
    /// row's scale into its weight `p_j`): bit-identical to it on the codes widened to f32.
    #[inline]
    pub fn tile_pv_i8(&self, out: &mut [f32], p: &[f32; KEY_TILE], n: usize, values: &[i8], stride: usize) {
        let n = n.min(KEY_TILE);
        if n > 0 {
            assert!(values.len() >= (n - 1) * stride + out.len());
        }
        (self.tile_pv_i8)(out, p, n, values, stride)
    }

    /// [`FloatKernels::tile_pv`] on values stored as f16 bits: bit-identical to it on the
    /// values widened to f32.
    #[inline]
    pub fn tile_pv_f16(&self, out: &mut [f32], p: &[f32; KEY_TILE], n: usize, values: &[u16], stride: usize) {
        let n = n.min(KEY_TILE);
        if n > 0 {
            assert!(values.len() >= (n - 1) * stride + out.len());
        }
        (self.tile_pv_f16)(out, p, n, values, stride)
    }
}

/// `e^x` for `x ≤ 0` (clamped below at -87), computed exactly as the SIMD lanes of
/// [`FloatKernels::tile_exp`] do: Cody–Waite reduction and a degree-6 polynomial, every
/// operation rounded separately. Relative error about 3e-7.
#[inline]
pub fn exp_poly(x: f32) -> f32 {
    let x = if x > -87.0 { x } else { -87.0 };
    let k = libm::rintf(x * core::f32::consts::LOG2_E);
    let r = x - k * LN2_HI;
    let r = r - k * LN2_LO;
    let mut p = 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    p * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

/// `√(2/π)`, GELU's tanh-approximation constant.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// `ln 2` split so that `k · LN2_HI` is exact for the `|k| ≤ 126` of [`exp_poly`].
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;

mod scalar {
    use super::{exp_poly, KvElement, KEY_TILE};

    pub(super) fn tile_scores<T: KvElement>(q: &[f32], keys: &[T], stride: usize, n: usize, out: &mut [f32; KEY_TILE]) {
        let len = q.len();
        for (j, o) in out.iter_mut().enumerate() {
            if j >= n {
                *o = 0.0;
                continue;
            }
            let mut a = [0f32; 8];
            for (d, (&x, &k)) in q.iter().zip(&keys[j * stride..j * stride + len]).enumerate() {
                a[d % 8] += x * k.to_f32();
            }
            *o = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
        }
    }

    pub(super) fn tile_exp(x: &mut [f32; KEY_TILE], n: usize, shift: f32) -> f32 {
        for (j, v) in x.iter_mut().enumerate() {
            *v = if j < n { exp_poly(*v - shift) } else { 0.0 };
        }
        tile_sum(x)
    }

    pub(super) fn tile_sum(x: &[f32; KEY_TILE]) -> f32 {
        let t: [f32; 8] = core::array::from_fn(|i| x[i] + x[i + 8]);
        let u: [f32; 4] = core::array::from_fn(|i| t[i] + t[i + 4]);
        (u[0] + u[2]) + (u[1] + u[3])
    }

    pub(super) fn tile_pv<T: KvElement>(out: &mut [f32], p: &[f32; KEY_TILE], n: usize, values: &[T], stride: usize) {
        let len = out.len();
        for (j, &w) in p[..n].iter().enumerate() {
            let row = &values[j * stride..j * stride + len];
            for (o, &v) in out.iter_mut().zip(row) {
                *o += w * v.to_f32();
            }
        }
    }

    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let mut acc = [0f32; 8];
        let (ca, cb) = (a[..n].chunks_exact(8), b[..n].chunks_exact(8));
        let (ra, rb) = (ca.remainder(), cb.remainder());
        for (x, y) in ca.zip(cb) {
            for i in 0..8 {
                acc[i] += x[i] * y[i];
            }
        }
        let mut sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
        for (x, y) in ra.iter().zip(rb) {
            sum += x * y;
        }
        sum
    }

    pub(super) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y += a * x;
        }
    }

    pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            *g = *g / (1.0 + libm::expf(-*g)) * u;
        }
    }

    pub(super) fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
        for (g, &u) in gate.iter_mut().zip(up) {
            let x = *g;
            *g = 0.5 * x * (1.0 + libm::tanhf(super::SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x))) * u;
        }
    }

    pub(super) fn exp_sub(x: &mut [f32], shift: f32) -> f32 {
        let mut sum = 0f32;
        for v in x.iter_mut() {
            *v = libm::expf(*v - shift);
            sum += *v;
        }
        sum
    }
}

/// NEON tile kernels for attention: the scalar reference's operations in its order
/// (eight lanes `d % 8` as two 4-lane registers, separate multiply and add), so they agree
/// with it bit for bit.
#[cfg(target_arch = "aarch64")]
mod neon {
    use core::arch::aarch64::*;

    use super::{scalar, ElementKind, KvElement, KEY_TILE};

    /// Four consecutive elements at `p` widened to f32 (halves through the exact scalar
    /// conversion: the f16 vector type is not stable in Rust).
    ///
    /// # Safety
    /// `p` must point at four readable elements.
    #[inline(always)]
    unsafe fn load4<T: KvElement>(p: *const T) -> float32x4_t {
        // SAFETY: the caller's four elements.
        unsafe {
            match T::KIND {
                ElementKind::Single => vld1q_f32(p as *const f32),
                ElementKind::Byte => {
                    let bytes = vreinterpret_s8_s32(vld1_dup_s32((p as *const i32).cast()));
                    vcvtq_f32_s32(vmovl_s16(vget_low_s16(vmovl_s8(bytes))))
                }
                ElementKind::Half => {
                    let wide: [f32; 4] = core::array::from_fn(|i| (*p.add(i)).to_f32());
                    vld1q_f32(wide.as_ptr())
                }
            }
        }
    }

    pub(super) fn tile_scores<T: KvElement>(q: &[f32], keys: &[T], stride: usize, n: usize, out: &mut [f32; KEY_TILE]) {
        let len = q.len();
        let full = len / 8 * 8;
        if n > 0 {
            assert!(n <= KEY_TILE && keys.len() >= (n - 1) * stride + len);
        }
        for (j, o) in out.iter_mut().enumerate() {
            if j >= n {
                *o = 0.0;
                continue;
            }
            let row = &keys[j * stride..j * stride + len];
            // SAFETY: NEON is part of aarch64; every load reads 4 of the `len` elements of
            // `q` and of `row` below `full`.
            unsafe {
                let (mut low, mut high) = (vdupq_n_f32(0.0), vdupq_n_f32(0.0));
                let mut d = 0;
                while d < full {
                    low = vaddq_f32(low, vmulq_f32(vld1q_f32(q.as_ptr().add(d)), load4(row.as_ptr().add(d))));
                    high = vaddq_f32(high, vmulq_f32(vld1q_f32(q.as_ptr().add(d + 4)), load4(row.as_ptr().add(d + 4))));
                    d += 8;
                }
                let mut a = [0f32; 8];
                vst1q_f32(a.as_mut_ptr(), low);
                vst1q_f32(a.as_mut_ptr().add(4), high);
                for d in full..len {
                    a[d % 8] += q[d] * row[d].to_f32();
                }
                *o = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
            }
        }
    }

    pub(super) fn tile_pv<T: KvElement>(out: &mut [f32], p: &[f32; KEY_TILE], n: usize, values: &[T], stride: usize) {
        let len = out.len();
        if n == 0 {
            return;
        }
        assert!(values.len() >= (n - 1) * stride + len);
        let full = len / 16 * 16;
        let po = out.as_mut_ptr();
        let mut i = 0;
        while i < full {
            // SAFETY: NEON is part of aarch64; i + 16 <= len, and each row holds `len`
            // elements from `j * stride` (checked above).
            unsafe {
                let mut o = [
                    vld1q_f32(po.add(i)),
                    vld1q_f32(po.add(i + 4)),
                    vld1q_f32(po.add(i + 8)),
                    vld1q_f32(po.add(i + 12)),
                ];
                for (j, &w) in p[..n].iter().enumerate() {
                    let (wv, row) = (vdupq_n_f32(w), values.as_ptr().add(j * stride + i));
                    for (b, ob) in o.iter_mut().enumerate() {
                        *ob = vaddq_f32(*ob, vmulq_f32(wv, load4(row.add(4 * b))));
                    }
                }
                for (b, ob) in o.iter().enumerate() {
                    vst1q_f32(po.add(i + 4 * b), *ob);
                }
            }
            i += 16;
        }
        if i < len {
            scalar::tile_pv(&mut out[i..], p, n, &values[i..], stride);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::{scalar, KvElement, KEY_TILE, LN2_HI, LN2_LO};

    /// Eight consecutive elements at `p + i` widened to f32 (`vcvtph2ps` for halves).
    macro_rules! load8 {
        ($t:ty, $p:expr, $i:expr) => {
            match <$t as KvElement>::KIND {
                super::ElementKind::Half => _mm256_cvtph_ps(_mm_loadu_si128($p.add($i) as *const __m128i)),
                super::ElementKind::Byte => {
                    _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64($p.add($i) as *const __m128i)))
                }
                super::ElementKind::Single => _mm256_loadu_ps($p.add($i) as *const f32),
            }
        };
    }

    pub(super) fn tile_scores<T: KvElement>(q: &[f32], keys: &[T], stride: usize, n: usize, out: &mut [f32; KEY_TILE]) {
        if n == 0 {
            *out = [0.0; KEY_TILE];
            return;
        }
        assert!(n <= KEY_TILE && keys.len() >= (n - 1) * stride + q.len());
        // SAFETY: as for `dot`; reads rows `j * stride..j * stride + q.len()` for `j < n`.
        unsafe { tile_scores_avx2(q, keys, stride, n, out) }
    }

    pub(super) fn tile_exp(x: &mut [f32; KEY_TILE], n: usize, shift: f32) -> f32 {
        // SAFETY: as for `dot`.
        unsafe { tile_exp_avx2(x, n, shift) }
    }

    pub(super) fn tile_pv<T: KvElement>(out: &mut [f32], p: &[f32; KEY_TILE], n: usize, values: &[T], stride: usize) {
        let len = out.len();
        if n == 0 {
            return;
        }
        assert!(values.len() >= (n - 1) * stride + len);
        // SAFETY: as for `dot`; reads rows `j * stride..j * stride + len` for `j < n`.
        unsafe { tile_pv_avx2(out, p, n, values, stride) }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_scores_avx2<T: KvElement>(
        q: &[f32],
        keys: &[T],
        stride: usize,
        n: usize,
        out: &mut [f32; KEY_TILE],
    ) {
        let len = q.len();
        let full = len / 8 * 8;
        let (pq, pk) = (q.as_ptr(), keys.as_ptr());
        for g in 0..KEY_TILE / 8 {
            let first = 8 * g;
            if first >= n {
                out[first..first + 8].fill(0.0);
                continue;
            }
            // Keys past `n` repeat the last one (in bounds); their scores are zeroed below.
            let rows: [usize; 8] = core::array::from_fn(|r| (first + r).min(n - 1) * stride);
            let mut acc = [_mm256_setzero_ps(); 8];
            let mut i = 0;
            while i < full {
                // SAFETY: i + 8 <= len, and every row holds len elements.
                unsafe {
                    let qv = _mm256_loadu_ps(pq.add(i));
                    for (a, &row) in acc.iter_mut().zip(&rows) {
                        *a = _mm256_add_ps(*a, _mm256_mul_ps(qv, load8!(T, pk, row + i)));
                    }
                }
                i += 8;
            }
            if full < len {
                for (a, &row) in acc.iter_mut().zip(&rows) {
                    let mut lanes = [0f32; 8];
                    // SAFETY: lanes holds 8 elements.
                    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *a) };
                    for d in full..len {
                        lanes[d % 8] += q[d] * keys[row + d].to_f32();
                    }
                    // SAFETY: as above.
                    *a = unsafe { _mm256_loadu_ps(lanes.as_ptr()) };
                }
            }
            let h01 = _mm256_hadd_ps(acc[0], acc[1]);
            let h23 = _mm256_hadd_ps(acc[2], acc[3]);
            let h45 = _mm256_hadd_ps(acc[4], acc[5]);
            let h67 = _mm256_hadd_ps(acc[6], acc[7]);
            let (h0123, h4567) = (_mm256_hadd_ps(h01, h23), _mm256_hadd_ps(h45, h67));
            let sum = _mm256_add_ps(
                _mm256_permute2f128_ps::<0x20>(h0123, h4567),
                _mm256_permute2f128_ps::<0x31>(h0123, h4567),
            );
            // SAFETY: out holds KEY_TILE elements and first + 8 <= KEY_TILE.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(first), sum) };
            for o in out[n.clamp(first, first + 8)..first + 8].iter_mut() {
                *o = 0.0;
            }
        }
    }

    /// The lanes of [`super::exp_poly`], operation for operation.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8_exact(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let k = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(core::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_sub_ps(x, _mm256_mul_ps(k, _mm256_set1_ps(LN2_HI)));
        let r = _mm256_sub_ps(r, _mm256_mul_ps(k, _mm256_set1_ps(LN2_LO)));
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(c));
        }
        let scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn tile_exp_avx2(x: &mut [f32; KEY_TILE], n: usize, shift: f32) -> f32 {
        let px = x.as_mut_ptr();
        let s = _mm256_set1_ps(shift);
        let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let mut e = [_mm256_setzero_ps(); 2];
        for (h, eh) in e.iter_mut().enumerate() {
            // SAFETY: x holds 16 elements.
            let v = unsafe { _mm256_loadu_ps(px.add(8 * h)) };
            let keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(n as i32 - 8 * h as i32), lane);
            *eh = _mm256_and_ps(exp8_exact(_mm256_sub_ps(v, s)), _mm256_castsi256_ps(keep));
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(px.add(8 * h), *eh) };
        }
        hsum(_mm256_add_ps(e[0], e[1]))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile_pv_avx2<T: KvElement>(out: &mut [f32], p: &[f32; KEY_TILE], n: usize, values: &[T], stride: usize) {
        let len = out.len();
        let (po, pv) = (out.as_mut_ptr(), values.as_ptr());
        let mut i = 0;
        while i + 64 <= len {
            // SAFETY: i + 64 <= len; the caller checked the rows' extent.
            unsafe {
                let mut o: [__m256; 8] = core::array::from_fn(|b| _mm256_loadu_ps(po.add(i + 8 * b)));
                for (j, &w) in p[..n].iter().enumerate() {
                    let wv = _mm256_set1_ps(w);
                    let row = pv.add(j * stride + i);
                    for (b, ob) in o.iter_mut().enumerate() {
                        *ob = _mm256_add_ps(*ob, _mm256_mul_ps(wv, load8!(T, row, 8 * b)));
                    }
                }
                for (b, ob) in o.iter().enumerate() {
                    _mm256_storeu_ps(po.add(i + 8 * b), *ob);
                }
            }
            i += 64;
        }
        while i + 8 <= len {
            // SAFETY: i + 8 <= len; as above.
            unsafe {
                let mut o = _mm256_loadu_ps(po.add(i));
                for (j, &w) in p[..n].iter().enumerate() {
                    o = _mm256_add_ps(o, _mm256_mul_ps(_mm256_set1_ps(w), load8!(T, pv, j * stride + i)));
                }
                _mm256_storeu_ps(po.add(i), o);
            }
            i += 8;
        }
        if i < len {
            let tail = &values[i..];
            scalar::tile_pv(&mut out[i..], p, n, tail, stride);
        }
    }

    /// [`tile_scores`] on AVX-512: sixteen keys at once, key `r` in the low half of
    /// accumulator `r` and key `r + 8` in its high half, each half holding the reference's
    /// eight lanes `d % 8`; the final tree `((a0+a1)+(a2+a3))+((a4+a5)+(a6+a7))` runs in
    /// place (pairs, quads, halves), so the scores equal the scalar ones bit for bit.
    pub(super) fn tile_scores_avx512<T: KvElement>(
        q: &[f32],
        keys: &[T],
        stride: usize,
        n: usize,
        out: &mut [f32; KEY_TILE],
    ) {
        if n == 0 {
            *out = [0.0; KEY_TILE];
            return;
        }
        assert!(n <= KEY_TILE && keys.len() >= (n - 1) * stride + q.len());
        // SAFETY: `FloatKernels::detect` hands this out only with AVX-512 F, AVX2, FMA and
        // F16C; reads rows `j * stride..j * stride + q.len()` for `j < n`.
        unsafe { tile_scores_512(q, keys, stride, n, out) }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn tile_scores_512<T: KvElement>(q: &[f32], keys: &[T], stride: usize, n: usize, out: &mut [f32; KEY_TILE]) {
        let len = q.len();
        let full = len / 8 * 8;
        let (pq, pk) = (q.as_ptr(), keys.as_ptr());
        // Keys past `n` repeat the last one (in bounds); their scores are zeroed below.
        let rows: [usize; KEY_TILE] = core::array::from_fn(|r| r.min(n - 1) * stride);
        let pair = |low: __m256, high: __m256| {
            _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                _mm512_castps_pd(_mm512_castps256_ps512(low)),
                _mm256_castps_pd(high),
            ))
        };
        let mut acc = [_mm512_setzero_ps(); 8];
        let mut i = 0;
        while i < full {
            // SAFETY: i + 8 <= len, and every row holds len elements.
            unsafe {
                let q8 = _mm256_loadu_ps(pq.add(i));
                let qv = pair(q8, q8);
                for (r, a) in acc.iter_mut().enumerate() {
                    let k = pair(load8!(T, pk, rows[r] + i), load8!(T, pk, rows[r + 8] + i));
                    *a = _mm512_add_ps(*a, _mm512_mul_ps(qv, k));
                }
            }
            i += 8;
        }
        if full < len {
            for (r, a) in acc.iter_mut().enumerate() {
                let mut lanes = [0f32; 16];
                // SAFETY: lanes holds 16 elements.
                unsafe { _mm512_storeu_ps(lanes.as_mut_ptr(), *a) };
                for d in full..len {
                    lanes[d % 8] += q[d] * keys[rows[r] + d].to_f32();
                    lanes[8 + d % 8] += q[d] * keys[rows[r + 8] + d].to_f32();
                }
                // SAFETY: as above.
                *a = unsafe { _mm512_loadu_ps(lanes.as_ptr()) };
            }
        }
        let mut sums = [[0f32; 16]; 8];
        for (a, sum) in acc.iter().zip(&mut sums) {
            let pairs = _mm512_add_ps(*a, _mm512_permute_ps::<0b10_11_00_01>(*a));
            let quads = _mm512_add_ps(pairs, _mm512_permute_ps::<0b01_00_11_10>(pairs));
            let halves = _mm512_add_ps(quads, _mm512_shuffle_f32x4::<0b10_11_00_01>(quads, quads));
            // SAFETY: `sum` holds 16 elements.
            unsafe { _mm512_storeu_ps(sum.as_mut_ptr(), halves) };
        }
        for (j, o) in out.iter_mut().enumerate() {
            *o = if j < n { sums[j % 8][8 * (j / 8)] } else { 0.0 };
        }
    }

    /// [`tile_exp`] on AVX-512: the sixteen scores in one register, [`super::exp_poly`]
    /// lane for lane, and the sum in the reference's tree (halves, then [`hsum`]).
    pub(super) fn tile_exp_avx512(x: &mut [f32; KEY_TILE], n: usize, shift: f32) -> f32 {
        // SAFETY: `FloatKernels::detect` hands this out only with AVX-512 F, AVX2 and FMA.
        unsafe { tile_exp_512(x, n, shift) }
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tile_exp_512(x: &mut [f32; KEY_TILE], n: usize, shift: f32) -> f32 {
        // SAFETY: `x` holds 16 elements.
        let v = unsafe { _mm512_loadu_ps(x.as_ptr()) };
        let keep: __mmask16 = if n >= KEY_TILE { 0xFFFF } else { (1u16 << n) - 1 };
        let e = _mm512_maskz_mov_ps(keep, exp16_exact(_mm512_sub_ps(v, _mm512_set1_ps(shift))));
        // SAFETY: as above.
        unsafe { _mm512_storeu_ps(x.as_mut_ptr(), e) };
        let high = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
        hsum(_mm256_add_ps(_mm512_castps512_ps256(e), high))
    }

    /// The lanes of [`super::exp_poly`], operation for operation, sixteen wide.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    fn exp16_exact(x: __m512) -> __m512 {
        let x = _mm512_max_ps(x, _mm512_set1_ps(-87.0));
        let k = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(core::f32::consts::LOG2_E),
        ));
        let r = _mm512_sub_ps(x, _mm512_mul_ps(k, _mm512_set1_ps(LN2_HI)));
        let r = _mm512_sub_ps(r, _mm512_mul_ps(k, _mm512_set1_ps(LN2_LO)));
        let mut p = _mm512_set1_ps(1.0 / 720.0);
        for c in [1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            p = _mm512_add_ps(_mm512_mul_ps(p, r), _mm512_set1_ps(c));
        }
        let scale = _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)));
        _mm512_mul_ps(p, _mm512_castsi512_ps(scale))
    }

    /// [`tile_pv`] on AVX-512 (the same per-element operations, 16 lanes wide).
    pub(super) fn tile_pv_avx512<T: KvElement>(
        out: &mut [f32],
        p: &[f32; KEY_TILE],
        n: usize,
        values: &[T],
        stride: usize,
    ) {
        let len = out.len();
        if n == 0 {
            return;
        }
        assert!(values.len() >= (n - 1) * stride + len);
        // SAFETY: as for `tile_scores_avx512`; reads rows `j * stride..j * stride + len`.
        unsafe { tile_pv_512(out, p, n, values, stride) }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn tile_pv_512<T: KvElement>(out: &mut [f32], p: &[f32; KEY_TILE], n: usize, values: &[T], stride: usize) {
        let len = out.len();
        let (po, pv) = (out.as_mut_ptr(), values.as_ptr());
        let load16 = |at: *const T| {
            // SAFETY: the caller's row holds 16 elements at `at`.
            unsafe {
                let (low, high) = (load8!(T, at, 0), load8!(T, at, 8));
                _mm512_castpd_ps(_mm512_insertf64x4::<1>(
                    _mm512_castps_pd(_mm512_castps256_ps512(low)),
                    _mm256_castps_pd(high),
                ))
            }
        };
        let mut i = 0;
        while i + 64 <= len {
            // SAFETY: i + 64 <= len; the caller checked the rows' extent.
            unsafe {
                let mut o: [__m512; 4] = core::array::from_fn(|b| _mm512_loadu_ps(po.add(i + 16 * b)));
                for (j, &w) in p[..n].iter().enumerate() {
                    let wv = _mm512_set1_ps(w);
                    let row = pv.add(j * stride + i);
                    for (b, ob) in o.iter_mut().enumerate() {
                        *ob = _mm512_add_ps(*ob, _mm512_mul_ps(wv, load16(row.add(16 * b))));
                    }
                }
                for (b, ob) in o.iter().enumerate() {
                    _mm512_storeu_ps(po.add(i + 16 * b), *ob);
                }
            }
            i += 64;
        }
        while i + 16 <= len {
            // SAFETY: i + 16 <= len; as above.
            unsafe {
                let mut o = _mm512_loadu_ps(po.add(i));
                for (j, &w) in p[..n].iter().enumerate() {
                    o = _mm512_add_ps(o, _mm512_mul_ps(_mm512_set1_ps(w), load16(pv.add(j * stride + i))));
                }
                _mm512_storeu_ps(po.add(i), o);
            }
            i += 16;
        }
        if i < len {
            // SAFETY: AVX2 is present; the remaining rows' extent was checked by the caller.
            unsafe { tile_pv_avx2(&mut out[i..], p, n, &values[i..], stride) };
        }
    }

    pub(super) fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        // SAFETY: `FloatKernels::detect` hands these out only when AVX2 and FMA are present;
        // the kernel reads `n` elements of each slice.
        unsafe { dot_avx2(&a[..n], &b[..n]) }
    }

    pub(super) fn axpy(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len().min(x.len());
        // SAFETY: as for `dot`; reads and writes `n` elements.
        unsafe { axpy_avx2(&mut y[..n], a, &x[..n]) }
    }

    pub(super) fn exp_sub(x: &mut [f32], shift: f32) -> f32 {
        // SAFETY: as for `dot`.
        unsafe { exp_sub_avx2(x, shift) }
    }

    pub(super) fn silu_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        // SAFETY: as for `dot`; reads and writes `n` elements.
        unsafe { silu_mul_avx2(&mut gate[..n], &up[..n]) }
    }

    /// `silu(x) · u` for eight lanes: `e^-|x|` stays in (0, 1], so the sigmoid is
    /// `1 / (1 + e)` for `x ≥ 0` and `e / (1 + e)` below, with no overflow anywhere.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn silu_mul_avx2(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
        let sign = _mm256_set1_ps(-0.0);
        let one = _mm256_set1_ps(1.0);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices.
            unsafe {
                let x = _mm256_loadu_ps(pg.add(i));
                let e = exp8(_mm256_or_ps(x, sign));
                let denominator = _mm256_add_ps(one, e);
                let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(x, _mm256_setzero_ps());
                let sigmoid = _mm256_div_ps(_mm256_blendv_ps(one, e, negative), denominator);
                _mm256_storeu_ps(pg.add(i), _mm256_mul_ps(_mm256_mul_ps(x, sigmoid), _mm256_loadu_ps(pu.add(i))));
            }
            i += 8;
        }
        scalar::silu_mul(&mut gate[i..], &up[i..]);
    }

    pub(super) fn gelu_tanh_mul(gate: &mut [f32], up: &[f32]) {
        let n = gate.len().min(up.len());
        // SAFETY: as for `dot`; reads and writes `n` elements.
        unsafe { gelu_tanh_mul_avx2(&mut gate[..n], &up[..n]) }
    }

    /// `gelu(x) · u` for eight lanes: `tanh(z) = sign(z) (1 − e) / (1 + e)` with
    /// `e = e^-2|z|` in (0, 1], so nothing overflows.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn gelu_tanh_mul_avx2(gate: &mut [f32], up: &[f32]) {
        let n = gate.len();
        let (pg, pu) = (gate.as_mut_ptr(), up.as_ptr());
        let sign = _mm256_set1_ps(-0.0);
        let (one, half) = (_mm256_set1_ps(1.0), _mm256_set1_ps(0.5));
        let (c, k) = (_mm256_set1_ps(super::SQRT_2_OVER_PI), _mm256_set1_ps(0.044_715));
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices.
            unsafe {
                let x = _mm256_loadu_ps(pg.add(i));
                let z = _mm256_mul_ps(c, _mm256_add_ps(x, _mm256_mul_ps(k, _mm256_mul_ps(_mm256_mul_ps(x, x), x))));
                let magnitude = _mm256_andnot_ps(sign, z);
                let e = exp8(_mm256_mul_ps(_mm256_set1_ps(-2.0), magnitude));
                let t = _mm256_div_ps(_mm256_sub_ps(one, e), _mm256_add_ps(one, e));
                let tanh = _mm256_or_ps(t, _mm256_and_ps(z, sign));
                let gelu = _mm256_mul_ps(_mm256_mul_ps(half, x), _mm256_add_ps(one, tanh));
                _mm256_storeu_ps(pg.add(i), _mm256_mul_ps(gelu, _mm256_loadu_ps(pu.add(i))));
            }
            i += 8;
        }
        scalar::gelu_tanh_mul(&mut gate[i..], &up[i..]);
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        while i + 16 <= n {
            // SAFETY: i + 16 <= n for both slices.
            unsafe {
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), _mm256_loadu_ps(pb.add(i + 8)), acc1);
            }
            i += 16;
        }
        let mut sum = hsum(_mm256_add_ps(acc0, acc1));
        while i < n {
            sum += a[i] * b[i];
            i += 1;
        }
        sum
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn axpy_avx2(y: &mut [f32], a: f32, x: &[f32]) {
        let n = y.len();
        let (py, px) = (y.as_mut_ptr(), x.as_ptr());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n for both slices.
            unsafe {
                _mm256_storeu_ps(py.add(i), _mm256_fmadd_ps(va, _mm256_loadu_ps(px.add(i)), _mm256_loadu_ps(py.add(i))))
            };
            i += 8;
        }
        while i < n {
            y[i] += a * x[i];
            i += 1;
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// `e^x` for eight lanes, `x ≤ 0` (results underflow to 0 below about -87): Cody–Waite
    /// reduction `x = k ln2 + r`, then a degree-6 polynomial for `e^r` on |r| ≤ ln2/2
    /// (relative error about 2e-7), scaled by `2^k` through the exponent bits.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let x = _mm256_max_ps(x, _mm256_set1_ps(-87.0));
        let k = _mm256_round_ps(
            _mm256_mul_ps(x, _mm256_set1_ps(core::f32::consts::LOG2_E)),
            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
        );
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693_145_75), x);
        let r = _mm256_fnmadd_ps(k, _mm256_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm256_set1_ps(1.0 / 720.0);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0 / 120.0));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0 / 24.0));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0 / 6.0));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0));
        let scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
        _mm256_mul_ps(p, _mm256_castsi256_ps(scale))
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn exp_sub_avx2(x: &mut [f32], shift: f32) -> f32 {
        let n = x.len();
        let p = x.as_mut_ptr();
        let s = _mm256_set1_ps(shift);
        let mut acc = _mm256_setzero_ps();
        let mut i = 0;
        while i + 8 <= n {
            // SAFETY: i + 8 <= n.
            unsafe {
                let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), s));
                _mm256_storeu_ps(p.add(i), e);
                acc = _mm256_add_ps(acc, e);
            }
            i += 8;
        }
        let mut sum = hsum(acc);
        while i < n {
            x[i] = libm::expf(x[i] - shift);
            sum += x[i];
            i += 1;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_agrees_with_scalar() {
        let (s, d) = (FloatKernels::scalar(), FloatKernels::detect());
        for n in [0usize, 1, 7, 8, 15, 16, 17, 64, 100] {
            let a: std::vec::Vec<f32> = (0..n).map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.3).collect();
            let b: std::vec::Vec<f32> = (0..n).map(|i| ((i * 11 % 23) as f32 - 11.0) * 0.2).collect();
            let scale: f32 = a.iter().zip(&b).map(|(x, y)| (x * y).abs()).sum::<f32>() + 1.0;
            assert!((s.dot(&a, &b) - d.dot(&a, &b)).abs() <= 1e-5 * scale, "dot {n}");
            let (mut y1, mut y2) = (b.clone(), b.clone());
            s.axpy(&mut y1, 0.7, &a);
            d.axpy(&mut y2, 0.7, &a);
            for (u, v) in y1.iter().zip(&y2) {
                assert!((u - v).abs() <= 1e-6 * (1.0 + u.abs()));
            }
            let mut e1: std::vec::Vec<f32> = a.iter().map(|v| v * 10.0).collect();
            let mut e2 = e1.clone();
            let shift = e1.iter().copied().fold(0f32, f32::max);
            let (t1, t2) = (s.exp_sub(&mut e1, shift), d.exp_sub(&mut e2, shift));
            assert!((t1 - t2).abs() <= 1e-5 * t1.max(1.0), "exp sum {n}: {t1} vs {t2}");
            for (u, v) in e1.iter().zip(&e2) {
                assert!((u - v).abs() <= 1e-6 * u.max(1e-30) + 1e-37, "exp {u} vs {v}");
            }
        }
    }

    #[test]
    fn f16_tile_kernels_equal_the_f32_ones_on_widened_rows() {
        let val = |i: usize, m: usize| ((i * 2_654_435_761 % m) as f32 / m as f32 - 0.5) * 4.0;
        for fk in every_set() {
            for len in [1usize, 7, 8, 13, 64, 70, 136, 256] {
                let q: std::vec::Vec<f32> = (0..len).map(|i| val(i + 5, 1009)).collect();
                let stride = len + 5;
                let half: std::vec::Vec<u16> =
                    (0..KEY_TILE * stride).map(|i| half::f16::from_f32(val(i, 997)).to_bits()).collect();
                let wide: std::vec::Vec<f32> = half.iter().map(|&h| half::f16::from_bits(h).to_f32()).collect();
                for n in [1, 5, 8, 9, 16] {
                    let (mut a1, mut a2) = ([0.25f32; KEY_TILE], [0.5f32; KEY_TILE]);
                    fk.tile_scores(&q, &wide, stride, n, &mut a1);
                    fk.tile_scores_f16(&q, &half, stride, n, &mut a2);
                    assert_eq!(a1.map(f32::to_bits), a2.map(f32::to_bits), "scores {len} {n}");
                    let p: [f32; KEY_TILE] = core::array::from_fn(|j| val(j + len, 89).abs());
                    let (mut o1, mut o2) = (q.clone(), q.clone());
                    fk.tile_pv(&mut o1, &p, n, &wide, stride);
                    fk.tile_pv_f16(&mut o2, &p, n, &half, stride);
                    assert_eq!(o1, o2, "pv {len} {n}");
                }
            }
        }
    }

    #[test]
    fn i8_tile_kernels_equal_the_f32_ones_on_widened_rows() {
        for fk in every_set() {
            for len in [1usize, 7, 8, 13, 64, 70, 136] {
                let q: std::vec::Vec<f32> = (0..len).map(|i| (i as f32 * 0.71).sin()).collect();
                let stride = len + 3;
                let codes: std::vec::Vec<i8> =
                    (0..KEY_TILE * stride).map(|i| ((i * 37) % 255) as i32 as u8 as i8).collect();
                let wide: std::vec::Vec<f32> = codes.iter().map(|&c| c as f32).collect();
                for n in [1, 5, 8, 9, 16] {
                    let (mut a1, mut a2) = ([0.25f32; KEY_TILE], [0.5f32; KEY_TILE]);
                    fk.tile_scores(&q, &wide, stride, n, &mut a1);
                    fk.tile_scores_i8(&q, &codes, stride, n, &mut a2);
                    assert_eq!(a1.map(f32::to_bits), a2.map(f32::to_bits), "scores {len} {n}");
                    let p: [f32; KEY_TILE] = core::array::from_fn(|j| 0.01 * j as f32);
                    let (mut o1, mut o2) = (q.clone(), q.clone());
                    fk.tile_pv(&mut o1, &p, n, &wide, stride);
                    fk.tile_pv_i8(&mut o2, &p, n, &codes, stride);
                    assert_eq!(o1, o2, "pv {len} {n}");
                }
            }
        }
    }

    #[test]
    fn tile_kernels_agree_with_scalar_bit_for_bit() {
        for d in every_set() {
            tile_kernels_agree(&d);
        }
    }

    /// The scalar kernels, the AVX2 ones where present, and the detected ones (AVX-512 or
    /// NEON tile kernels where present).
    fn every_set() -> std::vec::Vec<FloatKernels> {
        [Some(FloatKernels::scalar()), FloatKernels::avx2(), Some(FloatKernels::detect())]
            .into_iter()
            .flatten()
            .collect()
    }

    fn tile_kernels_agree(d: &FloatKernels) {
        let s = FloatKernels::scalar();
        let val = |i: usize, m: usize| ((i * 2_654_435_761 % m) as f32 / m as f32 - 0.5) * 4.0;
        for len in [0usize, 1, 3, 7, 8, 13, 64, 70, 100, 136] {
            let q: std::vec::Vec<f32> = (0..len).map(|i| val(i + 5, 1009)).collect();
            let stride = len + 3;
            let keys: std::vec::Vec<f32> = (0..KEY_TILE * stride).map(|i| val(i, 997)).collect();
            for n in [0, 1, 5, 8, 9, 16] {
                let (mut a1, mut a2) = ([0.25f32; KEY_TILE], [0.5f32; KEY_TILE]);
                s.tile_scores(&q, &keys, stride, n, &mut a1);
                d.tile_scores(&q, &keys, stride, n, &mut a2);
                assert_eq!(a1.map(f32::to_bits), a2.map(f32::to_bits), "scores {len} {n}");
                for (j, &v) in a1.iter().enumerate() {
                    let want: f32 =
                        if j < n { q.iter().zip(&keys[j * stride..]).map(|(x, k)| x * k).sum() } else { 0.0 };
                    assert!((v - want).abs() <= 1e-4 * (1.0 + want.abs()), "score {len} {n} {j}: {v} vs {want}");
                }
            }
            let values: std::vec::Vec<f32> = (0..KEY_TILE * stride).map(|i| val(i, 991)).collect();
            for n in [0, 1, 9, 16] {
                let mut x1: [f32; KEY_TILE] = core::array::from_fn(|j| val(j + len, 89) * 30.0 - 60.0);
                let mut x2 = x1;
                let (t1, t2) = (s.tile_exp(&mut x1, n, 0.0), d.tile_exp(&mut x2, n, 0.0));
                assert_eq!(t1.to_bits(), t2.to_bits(), "exp sum {len} {n}");
                assert_eq!(x1.map(f32::to_bits), x2.map(f32::to_bits), "exp {len} {n}");
                for (j, &e) in x1.iter().enumerate() {
                    let want = if j < n { libm::expf(val(j + len, 89) * 30.0 - 60.0) } else { 0.0 };
                    assert!((e - want).abs() <= 1e-6 * want + 1e-37, "exp {e} vs {want}");
                }
                let (mut o1, mut o2) = (q.clone(), q.clone());
                s.tile_pv(&mut o1, &x1, n, &values, stride);
                d.tile_pv(&mut o2, &x1, n, &values, stride);
                assert_eq!(o1, o2, "pv {len} {n}");
            }
        }
    }

    #[test]
    fn silu_agrees_with_scalar_everywhere() {
        let (s, d) = (FloatKernels::scalar(), FloatKernels::detect());
        let gate: std::vec::Vec<f32> = (0..203).map(|i| (i as f32 - 101.0) * 0.9).collect();
        let up: std::vec::Vec<f32> = (0..203).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.5).collect();
        let (mut g1, mut g2) = (gate.clone(), gate.clone());
        s.silu_mul(&mut g1, &up);
        d.silu_mul(&mut g2, &up);
        for ((a, b), x) in g1.iter().zip(&g2).zip(&gate) {
            assert!((a - b).abs() <= 1e-6 * (1.0 + a.abs()), "silu({x}): {a} vs {b}");
        }
    }

    #[test]
    fn gelu_agrees_with_scalar_everywhere() {
        let (s, d) = (FloatKernels::scalar(), FloatKernels::detect());
        let gate: std::vec::Vec<f32> =
            (0..403).map(|i| (i as f32 - 201.0) * 0.07).chain([-30.0, 30.0, 0.0, -0.0]).collect();
        let up: std::vec::Vec<f32> = (0..gate.len()).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.5).collect();
        let (mut g1, mut g2) = (gate.clone(), gate.clone());
        s.gelu_tanh_mul(&mut g1, &up);
        d.gelu_tanh_mul(&mut g2, &up);
        for ((a, b), x) in g1.iter().zip(&g2).zip(&gate) {
            assert!((a - b).abs() <= 2e-6 * (1.0 + a.abs()), "gelu({x}): {a} vs {b}");
        }
    }

    #[test]
    fn exp_covers_the_softmax_range() {
        let d = FloatKernels::detect();
        let mut x: std::vec::Vec<f32> = (0..200).map(|i| -(i as f32) * 0.5).collect();
        let expected: std::vec::Vec<f32> = x.iter().map(|&v| libm::expf(v)).collect();
        d.exp_sub(&mut x, 0.0);
        for (got, want) in x.iter().zip(&expected) {
            assert!((got - want).abs() <= 1e-6 * want + 1e-37, "{got} vs {want}");
        }
    }
}

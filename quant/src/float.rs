//! f32 vector kernels for attention: dot product, `y += a·x`, and `exp` in place.
//!
//! Unlike the integer kernels these are not bit-identical across instruction sets (the
//! SIMD versions sum in a different order and use a polynomial `exp`); they agree with the
//! scalar versions to a few ulps, which the tests check.

/// `exp` kernels and friends for one instruction set; build with [`FloatKernels::detect`].
#[derive(Clone, Copy, Debug)]
pub struct FloatKernels {
    dot: fn(&[f32], &[f32]) -> f32,
    axpy: fn(&mut [f32], f32, &[f32]),
    exp_sub: fn(&mut [f32], f32) -> f32,
    silu_mul: fn(&mut [f32], &[f32]),
}

impl FloatKernels {
    /// Portable versions (eight independent accumulators, so the compiler can vectorize).
    pub const fn scalar() -> Self {
        FloatKernels { dot: scalar::dot, axpy: scalar::axpy, exp_sub: scalar::exp_sub, silu_mul: scalar::silu_mul }
    }

    /// The fastest versions this CPU runs.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if crate::dot::Kernels::for_isa(crate::dot::Isa::Avx2).is_some() {
            return FloatKernels { dot: x86::dot, axpy: x86::axpy, exp_sub: x86::exp_sub, silu_mul: x86::silu_mul };
        }
        Self::scalar()
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

    /// `x_i = exp(x_i - shift)` for every element; returns `Σ x_i` after the update.
    /// Inputs must be `≤ shift` (softmax), so no result overflows.
    #[inline]
    pub fn exp_sub(&self, x: &mut [f32], shift: f32) -> f32 {
        (self.exp_sub)(x, shift)
    }
}

mod scalar {
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

    pub(super) fn exp_sub(x: &mut [f32], shift: f32) -> f32 {
        let mut sum = 0f32;
        for v in x.iter_mut() {
            *v = libm::expf(*v - shift);
            sum += *v;
        }
        sum
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::*;

    use super::scalar;

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

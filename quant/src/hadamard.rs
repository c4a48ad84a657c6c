//! Orthonormal Hadamard transforms for QuaRot-style rotations, and (with the `alloc`
//! feature) seeded random orthogonal matrices.
//!
//! # The transform
//!
//! [`Hadamard`] is the orthonormal matrix of order `n = m · p`, `p = 2^k`,
//!
//! ```text
//! H = (H_m ⊗ H_p) / sqrt(n)
//! H[a·p + b][c·p + d] = H_m[a][c] · (-1)^popcount(b & d) / sqrt(n)     (a, c < m; b, d < p)
//! ```
//!
//! where `H_p` is the Sylvester–Hadamard matrix (the matrix of [`fwht`]) and `H_m` is a
//! ±1 matrix with `H_m · H_mᵀ = m · I` from one of the [`Construction`]s (`H_1 = [1]`).
//! Vectors are plain `f32` slices of length `n`; index `i = a·p + b` means `m` contiguous
//! sub-vectors of length `p`. `H` is orthogonal (`H·Hᵀ = I`) but, for `m > 1`, in general
//! not symmetric, so [`Hadamard::apply`] (`x ← H·x`) and [`Hadamard::apply_transpose`]
//! (`x ← Hᵀ·x`) differ.
//!
//! # Folding a rotation into weights
//!
//! If a linear layer `y = W·x` (`W` row-major, `rows × n`) is to read a rotated input
//! `x' = H·x`, replace `W` by `W·Hᵀ`: its row `r` is `(H·w_r)ᵀ`, so call
//! [`Hadamard::apply`] on every row `w_r`; then `(W·Hᵀ)(H·x) = W·x`. If instead the
//! layer's *output* is to come out rotated (`y' = H·y`), replace `W` by `H·W`, i.e. call
//! [`Hadamard::apply`] on every column of `W`.

/// Largest supported order of the non-power-of-two factor `m` (the sign matrix `H_m` is
/// stored as `MAX_M` bit rows of a `u64`).
pub const MAX_M: usize = 64;

/// In-place fast Walsh–Hadamard transform: `x ← H_p · x` with `H_p` the *unnormalized*
/// Sylvester–Hadamard matrix of order `p = x.len()`, `H_p[b][d] = (-1)^popcount(b & d)`
/// (entries ±1, so the result is `sqrt(p)` times an orthonormal transform and applying it
/// twice multiplies by `p`). Costs `p·log2(p)` additions.
///
/// # Panics
///
/// If `x.len()` is not a power of two (`0` is not one; length 1 is the identity).
pub fn fwht(x: &mut [f32]) {
    let n = x.len();
    assert!(n.is_power_of_two(), "fwht: length {n} is not a power of two");
    let mut h = 1;
    while h < n {
        for chunk in x.chunks_exact_mut(2 * h) {
            let (lo, hi) = chunk.split_at_mut(h);
            for (a, b) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*a, *b);
                *a = u + v;
                *b = u - v;
            }
        }
        h *= 2;
    }
}

/// How the ±1 factor `H_m` of a [`Hadamard`] is built. `χ` is the quadratic character
/// modulo the prime `q` (`χ(0) = 0`, `χ(x) = 1` for a nonzero square, `-1` otherwise) and
/// `Q[x][y] = χ(y − x)` (`x, y ∈ 0..q`) the Jacobsthal matrix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Construction {
    /// `m = 1`, `H_1 = [1]`: `n` is a power of two and `H` is the normalized Sylvester
    /// matrix.
    Sylvester,
    /// Paley I, `q` prime `≡ 3 (mod 4)`, `m = q + 1`: `H_m = I + S` with
    /// `S = [[0, 1ᵀ], [−1, Q]]` (row/column 0 is the border, row/column `1 + x` belongs to
    /// `x ∈ 0..q`). Entry-wise: `H[0][0] = 1`, `H[0][1+y] = 1`, `H[1+x][0] = −1`,
    /// `H[1+x][1+x] = 1`, `H[1+x][1+y] = χ(y − x)` for `x ≠ y`.
    PaleyI {
        /// The prime, `≡ 3 (mod 4)`.
        q: u32,
    },
    /// Paley II, `q` prime `≡ 1 (mod 4)`, `m = 2(q + 1)`: with the symmetric conference
    /// matrix `C = [[0, 1ᵀ], [1, Q]]` (same index order as Paley I),
    /// `H[2i + s][2j + t] = A[s][t]` where `C[i][j] = 0` and `C[i][j] · B[s][t]` otherwise,
    /// `A = [[1, 1], [1, −1]]`, `B = [[1, −1], [−1, −1]]` (`s, t ∈ {0, 1}`).
    PaleyII {
        /// The prime, `≡ 1 (mod 4)`.
        q: u32,
    },
}

impl Construction {
    /// The order `m` of the ±1 matrix this construction builds.
    pub const fn m(self) -> usize {
        match self {
            Construction::Sylvester => 1,
            Construction::PaleyI { q } => q as usize + 1,
            Construction::PaleyII { q } => 2 * (q as usize + 1),
        }
    }
}

/// Every construction with `m ≤ MAX_M`, by increasing `m` (Paley I first where both give
/// the same `m`). [`Hadamard::new`] takes the first entry that fits `n`.
const CONSTRUCTIONS: [Construction; 14] = [
    Construction::Sylvester,
    Construction::PaleyI { q: 3 },
    Construction::PaleyI { q: 7 },
    Construction::PaleyI { q: 11 },
    Construction::PaleyII { q: 5 },
    Construction::PaleyI { q: 19 },
    Construction::PaleyI { q: 23 },
    Construction::PaleyII { q: 13 },
    Construction::PaleyI { q: 31 },
    Construction::PaleyII { q: 17 },
    Construction::PaleyI { q: 43 },
    Construction::PaleyI { q: 47 },
    Construction::PaleyI { q: 59 },
    Construction::PaleyII { q: 29 },
];

/// Quadratic character modulo the prime `q ≤ 63`: returns `χ` as a closure-free table in a
/// bit mask (`bit x` set ⇔ `x` is a nonzero square mod `q`).
fn squares_mod(q: usize) -> u64 {
    let mut sq = 0u64;
    for x in 1..q {
        sq |= 1 << ((x * x) % q);
    }
    sq
}

/// `χ(v mod q)` for the square mask from [`squares_mod`].
fn chi(sq: u64, q: usize, v: usize) -> i8 {
    let v = v % q;
    if v == 0 {
        0
    } else if sq >> v & 1 == 1 {
        1
    } else {
        -1
    }
}

/// The ±1 matrix of `c` as bit rows: bit `col` of `rows[row]` set ⇔ `H_m[row][col] = −1`.
fn sign_rows(c: Construction) -> [u64; MAX_M] {
    let mut rows = [0u64; MAX_M];
    match c {
        Construction::Sylvester => {}
        Construction::PaleyI { q } => {
            let q = q as usize;
            let sq = squares_mod(q);
            for (i, row) in rows.iter_mut().enumerate().take(q + 1) {
                for j in 0..=q {
                    let e = match (i, j) {
                        (0, _) => 1,
                        (_, 0) => -1,
                        _ if i == j => 1,
                        // Q[x][y] = χ(y − x) with x = i − 1, y = j − 1.
                        _ => chi(sq, q, j + q - i),
                    };
                    if e < 0 {
                        *row |= 1 << j;
                    }
                }
            }
        }
        Construction::PaleyII { q } => {
            let q = q as usize;
            let sq = squares_mod(q);
            for i in 0..=q {
                for j in 0..=q {
                    let cij = match (i, j) {
                        (0, 0) => 0,
                        (0, _) | (_, 0) => 1,
                        _ => chi(sq, q, j + q - i),
                    };
                    for s in 0..2 {
                        for t in 0..2 {
                            let e = if cij == 0 {
                                if s == 1 && t == 1 {
                                    -1
                                } else {
                                    1
                                }
                            } else if s == 0 && t == 0 {
                                cij
                            } else {
                                -cij
                            };
                            if e < 0 {
                                rows[2 * i + s] |= 1 << (2 * j + t);
                            }
                        }
                    }
                }
            }
        }
    }
    rows
}

/// Transpose of an `m × m` bit-row matrix.
fn transpose_rows(rows: &[u64; MAX_M], m: usize) -> [u64; MAX_M] {
    let mut t = [0u64; MAX_M];
    for (i, row) in rows.iter().enumerate().take(m) {
        for (j, tj) in t.iter_mut().enumerate().take(m) {
            *tj |= (row >> j & 1) << i;
        }
    }
    t
}

/// Width of the column tiles that the `H_m` mixing step processes at once.
const TILE: usize = 8;

/// The orthonormal Hadamard matrix `H = (H_m ⊗ H_p) / sqrt(n)` of order `n = m · p`,
/// `p = 2^k`, applied in place to `f32` vectors of length `n` (see the [module
/// docs](self) for the exact entry formula and index order `i = a·p + b`).
///
/// Holds no heap memory: the `m × m` sign matrix and its transpose are two `[u64; 64]`
/// bit-row arrays (≈1 KiB in all). `apply` costs `n·log2(p)` additions for the Walsh
/// transforms plus `n·m` for the mixing, and uses a 2 KiB stack buffer.
#[derive(Clone, Debug, PartialEq)]
pub struct Hadamard {
    n: usize,
    m: usize,
    p: usize,
    construction: Construction,
    /// `1 / sqrt(n)`.
    scale: f32,
    /// Bit `c` of `neg[a]` set ⇔ `H_m[a][c] = −1`.
    neg: [u64; MAX_M],
    /// Bit `c` of `neg_t[a]` set ⇔ `H_m[c][a] = −1`.
    neg_t: [u64; MAX_M],
}

impl Hadamard {
    /// The transform of order `n`, or `None` if `n` is not `m · 2^k` for an `m` that one
    /// of the [`Construction`]s gives (all `m ≤ 64`: 1, 4, 8, 12, 20, 24, 28, 32, 36, 44,
    /// 48, 60). Takes the smallest such `m` (so `m = 1` when `n` is a power of two, and
    /// Paley I before Paley II for `m = 12`); `n = 0` gives `None`.
    ///
    /// Examples: `576 = 36·16` (Paley II, q = 17), `1536 = 12·128` (Paley I, q = 11),
    /// `112 = 28·4` (Paley II, q = 13); `208 = 13·16` has none (`52` would need the
    /// field with 25 elements).
    pub fn new(n: usize) -> Option<Hadamard> {
        if n == 0 {
            return None;
        }
        let construction =
            CONSTRUCTIONS.into_iter().find(|c| n.is_multiple_of(c.m()) && (n / c.m()).is_power_of_two())?;
        Some(Self::with_construction(n, construction))
    }

    /// The transform of order `n` built with a given construction.
    ///
    /// # Panics
    ///
    /// If `n / construction.m()` is not a whole power of two, or the construction is not
    /// valid (`q` not a prime of the right residue mod 4, or `m > 64`).
    pub fn with_construction(n: usize, construction: Construction) -> Hadamard {
        let valid_q = |q: u32, r: u32| q >= 3 && q % 4 == r && (2..q).all(|d| !q.is_multiple_of(d));
        let ok = match construction {
            Construction::Sylvester => true,
            Construction::PaleyI { q } => valid_q(q, 3),
            Construction::PaleyII { q } => valid_q(q, 1),
        };
        let m = construction.m();
        assert!(ok && m <= MAX_M, "Hadamard: invalid construction {construction:?}");
        assert!(n.is_multiple_of(m) && (n / m).is_power_of_two(), "Hadamard: n = {n} is not {m} times a power of two");
        let neg = sign_rows(construction);
        Hadamard {
            n,
            m,
            p: n / m,
            construction,
            scale: 1.0 / libm::sqrtf(n as f32),
            neg,
            neg_t: transpose_rows(&neg, m),
        }
    }

    /// The order `n` of the transform (the vector length `apply` takes).
    pub fn n(&self) -> usize {
        self.n
    }

    /// The order `m` of the ±1 factor `H_m` (1 when `n` is a power of two).
    pub fn m(&self) -> usize {
        self.m
    }

    /// The power-of-two order `p = n / m` of the Sylvester factor: the length of each of
    /// the `m` contiguous sub-vectors.
    pub fn block_len(&self) -> usize {
        self.p
    }

    /// Which construction built `H_m`.
    pub fn construction(&self) -> Construction {
        self.construction
    }

    /// The entry `H_m[row][col]` (±1) of the unnormalized factor.
    ///
    /// # Panics
    ///
    /// If `row` or `col` is `≥ m`.
    pub fn sign(&self, row: usize, col: usize) -> i8 {
        assert!(row < self.m && col < self.m, "Hadamard::sign: index out of range");
        1 - 2 * (self.neg[row] >> col & 1) as i8
    }

    /// `x ← H · x` (orthonormal, so `‖x‖` is preserved up to rounding).
    ///
    /// # Panics
    ///
    /// If `x.len() != n`.
    pub fn apply(&self, x: &mut [f32]) {
        self.transform(x, &self.neg);
    }

    /// `x ← Hᵀ · x = H⁻¹ · x` (undoes [`apply`](Self::apply) up to rounding).
    ///
    /// # Panics
    ///
    /// If `x.len() != n`.
    pub fn apply_transpose(&self, x: &mut [f32]) {
        self.transform(x, &self.neg_t);
    }

    fn transform(&self, x: &mut [f32], neg: &[u64; MAX_M]) {
        assert_eq!(x.len(), self.n, "Hadamard: vector length {} != n = {}", x.len(), self.n);
        let (m, p) = (self.m, self.p);
        for block in x.chunks_exact_mut(p) {
            fwht(block);
        }
        if m == 1 {
            for v in x.iter_mut() {
                *v *= self.scale;
            }
            return;
        }
        // Mix across a for every b: x[a·p + b] ← Σ_c H_m[a][c] · x[c·p + b], TILE values of
        // b at a time.
        let mut buf = [[0.0f32; TILE]; MAX_M];
        let mut b0 = 0;
        while b0 < p {
            let w = TILE.min(p - b0);
            for (c, row) in buf.iter_mut().enumerate().take(m) {
                row[..w].copy_from_slice(&x[c * p + b0..c * p + b0 + w]);
            }
            for (a, &bits) in neg.iter().enumerate().take(m) {
                let mut acc = [0.0f32; TILE];
                for (c, row) in buf.iter().enumerate().take(m) {
                    let s = if bits >> c & 1 == 1 { -1.0f32 } else { 1.0 };
                    for (t, v) in acc.iter_mut().zip(row.iter()) {
                        *t += s * v;
                    }
                }
                for (dst, v) in x[a * p + b0..a * p + b0 + w].iter_mut().zip(acc.iter()) {
                    *dst = v * self.scale;
                }
            }
            b0 += w;
        }
    }
}

/// A seeded random `n × n` orthogonal matrix, row-major (`out[i·n + j] = Q[i][j]`),
/// Haar-distributed, rounded to `f32`. Deterministic for a seed on every platform.
///
/// Definition: a SplitMix64 stream seeded with `seed` yields uniforms
/// `u = (next() >> 11) · 2⁻⁵³`; Box–Muller turns each pair `(u1, u2)` into
/// `r·cos θ, r·sin θ` with `r = sqrt(−2 ln(1 − u1))`, `θ = 2π·u2`; these fill a Gaussian
/// matrix `A` in row-major order. `Q` is the `Q` factor of `A = Q·R` with
/// `diag(R) > 0` (i.e. Householder `Q` times `sign(diag(R))` column-wise, which makes it
/// Haar), computed in `f64` by modified Gram–Schmidt over the columns with one
/// re-orthogonalization pass. All arithmetic is IEEE `f64` in a fixed order and the
/// transcendental functions are `libm`'s, hence bit-reproducible.
///
/// Costs about `4n³` flops and `8n²` bytes of scratch (1536: a few seconds).
#[cfg(feature = "alloc")]
pub fn random_orthogonal(n: usize, seed: u64) -> alloc::vec::Vec<f32> {
    use alloc::vec;
    use alloc::vec::Vec;

    use crate::rng::SplitMix64;

    /// `Σ a_i b_i` with four accumulators in a fixed order.
    fn dot(a: &[f64], b: &[f64]) -> f64 {
        let mut s = [0.0f64; 4];
        let (ac, bc) = (a.chunks_exact(4), b.chunks_exact(4));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for k in 0..4 {
                s[k] += x[k] * y[k];
            }
        }
        let mut t = (s[0] + s[1]) + (s[2] + s[3]);
        for (x, y) in ar.iter().zip(br) {
            t += x * y;
        }
        t
    }

    let mut rng = SplitMix64(seed);
    // Column-major working copy: w[j·n + i] = A[i][j].
    let mut w = vec![0.0f64; n * n];
    let mut pending: Option<f64> = None;
    for i in 0..n {
        for j in 0..n {
            let z = match pending.take() {
                Some(z) => z,
                None => {
                    let u1 = 1.0 - rng.uniform();
                    let u2 = rng.uniform();
                    let r = libm::sqrt(-2.0 * libm::log(u1));
                    let theta = 2.0 * core::f64::consts::PI * u2;
                    pending = Some(r * libm::sin(theta));
                    r * libm::cos(theta)
                }
            };
            w[j * n + i] = z;
        }
    }
    for j in 0..n {
        let (done, rest) = w.split_at_mut(j * n);
        let v = &mut rest[..n];
        for _pass in 0..2 {
            for qi in done.chunks_exact(n) {
                let r = dot(qi, v);
                for (vk, qk) in v.iter_mut().zip(qi) {
                    *vk -= r * qk;
                }
            }
        }
        let norm = libm::sqrt(dot(v, v));
        assert!(norm > 0.0, "random_orthogonal: rank-deficient Gaussian sample");
        for vk in v.iter_mut() {
            *vk /= norm;
        }
    }
    let mut out: Vec<f32> = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = w[j * n + i] as f32;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// Dense definition: `H[i][j]` from the module-level formula, in f64.
    fn dense_entry(h: &Hadamard, i: usize, j: usize) -> f64 {
        let p = h.block_len();
        let (a, b, c, d) = (i / p, i % p, j / p, j % p);
        let walsh = if (b & d).count_ones() % 2 == 0 { 1.0 } else { -1.0 };
        f64::from(h.sign(a, c)) * walsh / (h.n() as f64).sqrt()
    }

    /// Small deterministic pseudo-random vector.
    fn test_vector(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    const SIZES: [usize; 20] = [1, 2, 4, 8, 12, 16, 20, 24, 28, 36, 44, 60, 64, 112, 120, 128, 240, 576, 768, 1536];

    #[test]
    fn fwht_matches_sylvester() {
        for n in [1usize, 2, 4, 8, 32] {
            for j in 0..n {
                let mut e = vec![0.0f32; n];
                e[j] = 1.0;
                fwht(&mut e);
                for (i, &v) in e.iter().enumerate() {
                    let want = if (i & j).count_ones() % 2 == 0 { 1.0 } else { -1.0 };
                    assert_eq!(v, want, "n={n} i={i} j={j}");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "not a power of two")]
    fn fwht_rejects_non_power_of_two() {
        fwht(&mut [0.0; 12]);
    }

    #[test]
    fn sign_matrices_are_hadamard() {
        for c in CONSTRUCTIONS {
            let m = c.m();
            let h = Hadamard::with_construction(m, c);
            assert_eq!(h.m(), m);
            for i in 0..m {
                for j in 0..m {
                    let s: i32 = (0..m).map(|k| i32::from(h.sign(i, k)) * i32::from(h.sign(j, k))).sum();
                    assert_eq!(s, if i == j { m as i32 } else { 0 }, "{c:?} rows {i},{j}");
                }
            }
            // Bits outside the m × m block stay clear.
            for a in 0..MAX_M {
                let mask = if m == 64 { 0 } else { !0u64 << m };
                assert_eq!(h.neg[a] & mask, 0);
                assert_eq!(h.neg_t[a] & mask, 0);
                if a >= m {
                    assert_eq!(h.neg[a], 0);
                }
            }
        }
    }

    #[test]
    fn paley_first_rows() {
        // Paley I, q = 3: Q = [[0, 1, -1], [-1, 0, 1], [1, -1, 0]].
        let h = Hadamard::with_construction(4, Construction::PaleyI { q: 3 });
        let want = [[1, 1, 1, 1], [-1, 1, 1, -1], [-1, -1, 1, 1], [-1, 1, -1, 1]];
        for (i, row) in want.iter().enumerate() {
            for (j, &e) in row.iter().enumerate() {
                assert_eq!(h.sign(i, j), e, "({i},{j})");
            }
        }
        // Paley II, q = 5: C[0][0] = 0 → block A; C[0][1] = 1 → block B.
        let h = Hadamard::with_construction(12, Construction::PaleyII { q: 5 });
        assert_eq!([h.sign(0, 0), h.sign(0, 1), h.sign(1, 0), h.sign(1, 1)], [1, 1, 1, -1]);
        assert_eq!([h.sign(0, 2), h.sign(0, 3), h.sign(1, 2), h.sign(1, 3)], [1, -1, -1, -1]);
    }

    #[test]
    fn new_picks_smallest_m() {
        let m_of = |n| Hadamard::new(n).map(|h| h.m());
        assert_eq!(m_of(576), Some(36));
        assert_eq!(Hadamard::new(576).unwrap().construction(), Construction::PaleyII { q: 17 });
        assert_eq!(m_of(1536), Some(12));
        assert_eq!(Hadamard::new(1536).unwrap().construction(), Construction::PaleyI { q: 11 });
        assert_eq!(m_of(64), Some(1));
        assert_eq!(m_of(1), Some(1));
        assert_eq!(m_of(12), Some(12));
        assert_eq!(m_of(24), Some(12));
        assert_eq!(m_of(40), Some(20));
        assert_eq!(m_of(112), Some(28)); // 7·16 = 28·4 (Paley II, q = 13)
        assert_eq!(m_of(44 * 8), Some(44));
        assert_eq!(m_of(60 * 2), Some(60));
        for n in [0usize, 3, 6, 7, 13 * 16, 17 * 4, 52, 100, 9 * 2, 36 * 3] {
            assert_eq!(m_of(n), None, "n={n}");
        }
        for n in 1..=4096usize {
            if let Some(h) = Hadamard::new(n) {
                assert_eq!(h.n(), n);
                assert_eq!(h.m() * h.block_len(), n);
                assert!(h.block_len().is_power_of_two());
            }
        }
    }

    #[test]
    fn apply_matches_dense_definition() {
        for n in SIZES {
            let h = Hadamard::new(n).unwrap();
            // Columns: apply(e_j) = H[:, j]; rows: apply_transpose(e_i) = H[i, :].
            for j in 0..n {
                let mut e = vec![0.0f32; n];
                e[j] = 1.0;
                h.apply(&mut e);
                let mut f = vec![0.0f32; n];
                f[j] = 1.0;
                h.apply_transpose(&mut f);
                for i in 0..n {
                    assert!((f64::from(e[i]) - dense_entry(&h, i, j)).abs() < 1e-6, "n={n} H[{i}][{j}]");
                    assert!((f64::from(f[i]) - dense_entry(&h, j, i)).abs() < 1e-6, "n={n} H[{j}][{i}]");
                }
            }
            // A random vector against the dense product.
            let x = test_vector(n, n as u32);
            let mut y = x.clone();
            h.apply(&mut y);
            let mut z = x.clone();
            h.apply_transpose(&mut z);
            for i in 0..n {
                let want: f64 = (0..n).map(|j| dense_entry(&h, i, j) * f64::from(x[j])).sum();
                let want_t: f64 = (0..n).map(|j| dense_entry(&h, j, i) * f64::from(x[j])).sum();
                assert!((f64::from(y[i]) - want).abs() < 1e-5, "n={n} i={i}");
                assert!((f64::from(z[i]) - want_t).abs() < 1e-5, "n={n} i={i}");
            }
        }
    }

    #[test]
    fn h_times_h_transpose_is_identity() {
        for n in SIZES {
            let h = Hadamard::new(n).unwrap();
            // rows[i] = H[i, :] = Hᵀ e_i.
            let rows: Vec<Vec<f32>> = (0..n)
                .map(|i| {
                    let mut e = vec![0.0f32; n];
                    e[i] = 1.0;
                    h.apply_transpose(&mut e);
                    e
                })
                .collect();
            // (H·Hᵀ)[:, j] = H · (Hᵀ e_j), by the fast transform.
            for (j, row) in rows.iter().enumerate() {
                let mut col = row.clone();
                h.apply(&mut col);
                for (i, &v) in col.iter().enumerate() {
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((v - want).abs() < 1e-5, "n={n} (HHᵀ)[{i}][{j}] = {v}");
                }
            }
            // (H·Hᵀ)[i][j] = row_i · row_j, explicitly (quadratic in n, so only up to 576).
            if n <= 576 {
                for i in 0..n {
                    for j in 0..n {
                        let s: f64 = rows[i].iter().zip(&rows[j]).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
                        let want = if i == j { 1.0 } else { 0.0 };
                        assert!((s - want).abs() < 1e-5, "n={n} (HHᵀ)[{i}][{j}] = {s}");
                    }
                }
            }
        }
    }

    #[test]
    fn round_trip_and_norm() {
        for n in SIZES {
            let h = Hadamard::new(n).unwrap();
            let x = test_vector(n, 7 + n as u32);
            let norm = |v: &[f32]| v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt();
            let mut y = x.clone();
            h.apply(&mut y);
            assert!((norm(&y) - norm(&x)).abs() < 1e-5 * norm(&x).max(1.0), "n={n}");
            h.apply_transpose(&mut y);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5, "n={n}");
            }
            let mut y = x.clone();
            h.apply_transpose(&mut y);
            h.apply(&mut y);
            for (a, b) in y.iter().zip(&x) {
                assert!((a - b).abs() < 1e-5, "n={n}");
            }
        }
    }

    #[test]
    fn weight_folding_identity() {
        // (W·Hᵀ)(H·x) = W·x with rows of W·Hᵀ = H·w_r.
        let n = 576;
        let h = Hadamard::new(n).unwrap();
        let x = test_vector(n, 1);
        let mut hx = x.clone();
        h.apply(&mut hx);
        for r in 0..4u32 {
            let w = test_vector(n, 100 + r);
            let mut hw = w.clone();
            h.apply(&mut hw);
            let a: f64 = w.iter().zip(&x).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            let b: f64 = hw.iter().zip(&hx).map(|(a, b)| f64::from(*a) * f64::from(*b)).sum();
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    #[test]
    #[should_panic(expected = "vector length")]
    fn apply_rejects_wrong_length() {
        Hadamard::new(12).unwrap().apply(&mut [0.0; 24]);
    }

    #[cfg(feature = "alloc")]
    #[test]
    fn random_orthogonal_is_orthogonal_and_deterministic() {
        for n in [0usize, 1, 2, 5, 64, 96] {
            let q = random_orthogonal(n, 42);
            assert_eq!(q.len(), n * n);
            for i in 0..n {
                for j in 0..n {
                    let rr: f64 = (0..n).map(|k| f64::from(q[i * n + k]) * f64::from(q[j * n + k])).sum();
                    let cc: f64 = (0..n).map(|k| f64::from(q[k * n + i]) * f64::from(q[k * n + j])).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((rr - want).abs() < 1e-5, "n={n} QQᵀ[{i}][{j}] = {rr}");
                    assert!((cc - want).abs() < 1e-5, "n={n} QᵀQ[{i}][{j}] = {cc}");
                }
            }
            assert_eq!(q, random_orthogonal(n, 42), "n={n}");
            if n > 1 {
                assert_ne!(q, random_orthogonal(n, 43), "n={n}");
            }
        }
        // Pin the definition (values from an independent NumPy implementation of the doc
        // comment: SplitMix64 → Box–Muller → QR with sign(diag(R)) fixed).
        let q = random_orthogonal(3, 0);
        let want = [
            -0.9987721,
            -0.03212708,
            -0.03771186,
            -0.022326443,
            -0.38764483,
            0.9215384,
            0.04422514,
            -0.9212488,
            -0.38645154,
        ];
        for (a, b) in q.iter().zip(want) {
            assert!((a - b).abs() <= 2.0 * f32::EPSILON, "{q:?}");
        }
        let det = q[0] * (q[4] * q[8] - q[5] * q[7]) - q[1] * (q[3] * q[8] - q[5] * q[6])
            + q[2] * (q[3] * q[7] - q[4] * q[6]);
        assert!((det.abs() - 1.0).abs() < 1e-5);
    }
}

//! Ridge regression in closed form: `(A + λI) B = C` for a symmetric positive
//! semi-definite `A` by Cholesky factorization, for one or many right-hand sides.

use anyhow::{bail, Result};

/// The lower-triangular Cholesky factor `L` (`n × n`, row-major) of `A + λI`.
pub fn cholesky(a: &[f64], n: usize, lambda: f64) -> Result<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let mut s = a[i * n + j] + if i == j { lambda } else { 0.0 };
            for k in 0..j {
                s -= l[i * n + k] * l[j * n + k];
            }
            if i == j {
                if s <= 0.0 {
                    bail!("the regression's normal matrix is not positive definite (raise the ridge strength)");
                }
                l[i * n + i] = s.sqrt();
            } else {
                l[i * n + j] = s / l[j * n + j];
            }
        }
    }
    Ok(l)
}

/// Solves `L Lᵀ β = c` for one right-hand side `c` (`n` long) with the factor of
/// [`cholesky`].
pub fn solve(l: &[f64], c: &[f64], n: usize) -> Vec<f64> {
    let mut z = vec![0f64; n];
    for i in 0..n {
        let s: f64 = (0..i).map(|k| l[i * n + k] * z[k]).sum();
        z[i] = (c[i] - s) / l[i * n + i];
    }
    let mut beta = vec![0f64; n];
    for i in (0..n).rev() {
        let s: f64 = (i + 1..n).map(|k| l[k * n + i] * beta[k]).sum();
        beta[i] = (z[i] - s) / l[i * n + i];
    }
    beta
}

/// Solves `(A + λI) β = c` (`A` is `n × n`, row-major).
pub fn ridge_solve(a: &[f64], c: &[f64], n: usize, lambda: f64) -> Result<Vec<f64>> {
    Ok(solve(&cholesky(a, n, lambda)?, c, n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ridge_solve_recovers_a_linear_map() {
        // A = MᵀM for a well-conditioned M; c = A β.
        let n = 5;
        let m: Vec<f64> =
            (0..n * n).map(|i| ((i * 7 + 3) % 11) as f64 - 5.0 + if i % (n + 1) == 0 { 9.0 } else { 0.0 }).collect();
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                a[i * n + j] = (0..n).map(|k| m[k * n + i] * m[k * n + j]).sum();
            }
        }
        let beta = [1.0, -2.0, 0.5, 3.0, -0.25];
        let c: Vec<f64> = (0..n).map(|i| (0..n).map(|j| a[i * n + j] * beta[j]).sum()).collect();
        let solved = ridge_solve(&a, &c, n, 0.0).expect("positive definite");
        for (s, b) in solved.iter().zip(beta) {
            assert!((s - b).abs() < 1e-9, "{solved:?}");
        }
        assert!(ridge_solve(&vec![0.0; n * n], &c, n, 0.0).is_err());
    }
}

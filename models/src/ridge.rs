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

/// Standardized inputs of a regression, from running sums over `rows` samples.
pub struct Standardized {
    /// Per-input means (`n`).
    pub mean: Vec<f64>,
    /// Per-input standard deviations (`n`, floored at 1e-6).
    pub std: Vec<f64>,
    /// The inputs' correlation matrix (`n × n`, row-major): the normal matrix of the
    /// standardized regression.
    pub correlation: Vec<f64>,
}

/// Means, standard deviations and correlations of `n` inputs from `sum_x` (`n`) and the
/// upper triangle of `sum_xx` (`Σ x xᵀ`, `n × n`, row-major; entries below the diagonal
/// are not read) over `rows` samples.
pub fn standardize(sum_x: &[f64], sum_xx: &[f64], rows: f64) -> Standardized {
    let n = sum_x.len();
    let mean: Vec<f64> = sum_x.iter().map(|s| s / rows).collect();
    let cov = |i: usize, j: usize| {
        let (i, j) = (i.min(j), i.max(j));
        sum_xx[i * n + j] / rows - mean[i] * mean[j]
    };
    let std: Vec<f64> = (0..n).map(|i| cov(i, i).max(0.0).sqrt().max(1e-6)).collect();
    let mut correlation = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            correlation[i * n + j] = cov(i, j) / (std[i] * std[j]);
        }
    }
    Standardized { mean, std, correlation }
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

    #[test]
    fn standardize_matches_the_sample_moments() {
        let samples = [[1.0, 2.0], [3.0, 1.0], [5.0, 6.0], [-1.0, 0.5]];
        let (mut sum_x, mut sum_xx) = (vec![0f64; 2], vec![0f64; 4]);
        for x in &samples {
            for i in 0..2 {
                sum_x[i] += x[i];
                for j in i..2 {
                    sum_xx[i * 2 + j] += x[i] * x[j];
                }
            }
        }
        let s = standardize(&sum_x, &sum_xx, samples.len() as f64);
        let mean = [2.0, 2.375];
        let var = |i: usize| samples.iter().map(|x| (x[i] - mean[i]).powi(2)).sum::<f64>() / 4.0;
        let cov01 = samples.iter().map(|x| (x[0] - mean[0]) * (x[1] - mean[1])).sum::<f64>() / 4.0;
        assert!((s.mean[0] - mean[0]).abs() < 1e-12 && (s.mean[1] - mean[1]).abs() < 1e-12);
        assert!((s.std[1] - var(1).sqrt()).abs() < 1e-12);
        assert!((s.correlation[0] - 1.0).abs() < 1e-12);
        let r = cov01 / (var(0) * var(1)).sqrt();
        assert!((s.correlation[1] - r).abs() < 1e-12 && (s.correlation[2] - r).abs() < 1e-12);
    }
}

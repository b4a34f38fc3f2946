//! The stage-1 frame-balancing MILP (makespan minimisation on identical machines), solved with
//! good_lp: pure-Rust microlp by default, HiGHS under the `highs` cargo feature.
//!
//! Frames of identical cost are grouped into classes, so the variables are integer counts
//! `x[k][r]` (frames of class k on rank r), not one binary per frame:
//!
//! ```text
//! minimise T
//!   sum_r x[k][r] = n_k                  for every class k
//!   sum_k c_k x[k][r] <= T               for every rank r
//!   x[k][r] in {0..n_k},  T >= 0
//! ```
//!
//! This is the classic P||C_max formulation (Graham 1969; Lawler et al. 1993, "Sequencing and
//! Scheduling") aggregated by job type ("high-multiplicity" scheduling, Hochbaum & Shamir 1991).

use good_lp::{
    constraint, variable, variables, Expression, ResolutionError, Solution, SolverModel, Variable,
    WithInitialSolution, WithMipGap, WithTimeLimit,
};

use crate::error::{Error, Result};

/// Name of the solver used by [`solve_counts`] in this build.
pub const SOLVER_NAME: &str = if cfg!(feature = "highs") {
    "highs"
} else {
    "microlp"
};

/// Most integer variables (classes x ranks) handed to the solver; larger problems use LPT only.
pub const MAX_INT_VARS: usize = 40_000;

/// Solve the class-count MILP. `costs[k]` > 0 is the cost of a class-k frame (any unit; it is
/// rescaled), `counts[k]` how many there are, `warm[k][r]` a feasible start (e.g. from LPT).
/// Returns `x[k][r]` with every row summing to `counts[k]` exactly.
pub fn solve_counts(
    costs: &[f64],
    counts: &[u64],
    ranks: usize,
    warm: &[Vec<u64>],
    time_limit_s: f64,
    mip_gap: f64,
) -> Result<Vec<Vec<u64>>> {
    if costs.len() != counts.len() || warm.len() != counts.len() || ranks == 0 {
        return Err(Error::Solver("malformed class data".into()));
    }
    if costs.len().saturating_mul(ranks) > MAX_INT_VARS {
        return Err(Error::Solver(format!(
            "{} classes x {ranks} ranks exceeds {MAX_INT_VARS} integer variables",
            costs.len()
        )));
    }
    let cmax = costs.iter().copied().fold(0.0, f64::max);
    if !(cmax.is_finite() && cmax > 0.0) {
        return Err(Error::Solver(
            "class costs must be positive and finite".into(),
        ));
    }
    if counts.iter().any(|&n| n > i32::MAX as u64) {
        return Err(Error::Solver(
            "a class has more frames than i32::MAX".into(),
        ));
    }
    let scaled: Vec<f64> = costs.iter().map(|c| c / cmax).collect();

    let mut vars = variables!();
    let t = vars.add(variable().min(0.0));
    let x: Vec<Vec<Variable>> = counts
        .iter()
        .map(|&n| {
            (0..ranks)
                .map(|_| vars.add(variable().integer().min(0).max(n as f64)))
                .collect()
        })
        .collect();

    let warm_t = (0..ranks)
        .map(|r| {
            scaled
                .iter()
                .zip(warm)
                .map(|(c, w)| c * w.get(r).copied().unwrap_or(0) as f64)
                .sum::<f64>()
        })
        .fold(0.0, f64::max);
    let mut initial: Vec<(Variable, f64)> = vec![(t, warm_t)];
    for (xk, wk) in x.iter().zip(warm) {
        for (r, &v) in xk.iter().enumerate() {
            initial.push((v, wk.get(r).copied().unwrap_or(0) as f64));
        }
    }

    let mut constraints = Vec::with_capacity(counts.len() + ranks);
    for (xk, &n) in x.iter().zip(counts) {
        let sum: Expression = xk.iter().sum();
        constraints.push(constraint!(sum == n as f64));
    }
    for r in 0..ranks {
        let load: Expression = x.iter().zip(&scaled).map(|(xk, &c)| c * xk[r]).sum();
        constraints.push(constraint!(load <= t));
    }

    let problem = vars.minimise(t);
    #[cfg(feature = "highs")]
    let model = problem.using(good_lp::solvers::highs::highs);
    #[cfg(not(feature = "highs"))]
    let model = problem.using(good_lp::solvers::microlp::microlp);
    let model = model
        .with_initial_solution(initial)
        .with_time_limit(time_limit_s.max(0.0))
        .with_mip_gap(mip_gap.max(0.0) as f32)
        .map_err(|e| Error::Solver(e.to_string()))?
        .with_all(constraints);
    let solution = model
        .solve()
        .map_err(|e: ResolutionError| Error::Solver(e.to_string()))?;

    let mut out = Vec::with_capacity(counts.len());
    for (xk, &n) in x.iter().zip(counts) {
        let row: Vec<u64> = xk
            .iter()
            .map(|&v| solution.value(v).round().max(0.0) as u64)
            .collect();
        if row.iter().sum::<u64>() != n {
            return Err(Error::Solver(
                "the solution does not assign every frame exactly once".into(),
            ));
        }
        out.push(row);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_perfect_split_lpt_misses() {
        // Classic LPT counter-example (Graham): jobs 3,3,2,2,2 on 2 machines; LPT gives 7, optimum 6.
        let costs = [3.0, 2.0];
        let counts = [2, 3];
        let warm = vec![vec![1, 1], vec![2, 1]]; // LPT: {3,2,2}=7, {3,2}=5
        let x = solve_counts(&costs, &counts, 2, &warm, 5.0, 0.0).unwrap();
        let loads: Vec<f64> = (0..2)
            .map(|r| costs[0] * x[0][r] as f64 + costs[1] * x[1][r] as f64)
            .collect();
        assert_eq!(loads.iter().copied().fold(0.0, f64::max), 6.0, "{x:?}");
    }

    #[test]
    fn rejects_malformed_input() {
        assert!(solve_counts(&[1.0], &[1, 2], 2, &[vec![1]], 1.0, 0.0).is_err());
        assert!(solve_counts(&[0.0], &[2], 2, &[vec![1, 1]], 1.0, 0.0).is_err());
    }
}

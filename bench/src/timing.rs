//! Timing of short calls on a shared machine: the best of several runs, in the calling
//! thread's on-CPU time where Linux reports it (so that time slices lost to other processes
//! count less), else wall time. The same method as `bench/llama/ggml_mulmat.c`
//! (`CLOCK_THREAD_CPUTIME_ID`), so their figures compare.

use std::time::{Duration, Instant};

/// Nanoseconds the calling thread has run on a CPU (Linux `schedstat`); `None` where
/// unavailable.
pub fn thread_cpu_ns() -> Option<u64> {
    std::fs::read_to_string("/proc/thread-self/schedstat").ok()?.split_whitespace().next()?.parse().ok()
}

/// How long and how often [`seconds_per_call`] measures.
#[derive(Clone, Copy, Debug)]
pub struct Budget {
    /// Each run calls the function for at least this long (wall time).
    pub min: Duration,
    /// Runs; the best is kept.
    pub runs: usize,
}

impl Budget {
    /// The default budget (`quick`: a shorter one for development).
    pub fn new(quick: bool) -> Self {
        if quick {
            Budget { min: Duration::from_millis(40), runs: 3 }
        } else {
            Budget { min: Duration::from_millis(150), runs: 5 }
        }
    }
}

/// Best seconds per call of `f` over `budget.runs` runs of at least `budget.min` each
/// (after one warm-up call), in on-CPU time of this thread where available.
pub fn seconds_per_call(mut f: impl FnMut(), budget: Budget) -> f64 {
    f();
    let mut best = f64::MAX;
    for _ in 0..budget.runs.max(1) {
        let (start, cpu_start, mut calls) = (Instant::now(), thread_cpu_ns(), 0u32);
        while calls == 0 || start.elapsed() < budget.min {
            f();
            calls += 1;
        }
        let secs = match (cpu_start, thread_cpu_ns()) {
            (Some(a), Some(b)) if b > a => (b - a) as f64 * 1e-9,
            _ => start.elapsed().as_secs_f64(),
        };
        best = best.min(secs / f64::from(calls));
    }
    best
}

//! Data parallelism for the forward pass: a thread pool on `std` (rayon), plain
//! sequential loops without it. The model code calls the same function either way.

/// Runs chunked work on a fixed number of threads (one, the caller's, without `std`).
#[derive(Debug)]
pub struct ThreadPool {
    #[cfg(feature = "std")]
    pool: Option<rayon::ThreadPool>,
    threads: usize,
}

impl ThreadPool {
    /// A pool of `threads` threads (at least one). Without `std`, always one.
    pub fn new(threads: usize) -> Self {
        let threads = threads.max(1);
        #[cfg(feature = "std")]
        {
            let pool =
                (threads > 1).then(|| rayon::ThreadPoolBuilder::new().num_threads(threads).build().ok()).flatten();
            let threads = if pool.is_some() { threads } else { 1 };
            ThreadPool { pool, threads }
        }
        #[cfg(not(feature = "std"))]
        {
            let _ = threads;
            ThreadPool { threads: 1 }
        }
    }

    /// Number of threads that run work.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` with the pool's threads ready for [`ThreadPool::for_each_chunk`]: on `std`
    /// the whole of `f` runs inside the pool, so the parallel loops it starts are forked
    /// from a worker (cheap work stealing) instead of being injected from outside and
    /// waited for with a sleeping latch, which costs tens of microseconds per loop.
    pub fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        #[cfg(feature = "std")]
        if let Some(pool) = &self.pool {
            return pool.install(f);
        }
        f()
    }

    /// Calls `f(index, chunk)` for each `chunk_len`-long chunk of `data` (the last may be
    /// shorter), in parallel when the pool has several threads.
    pub fn for_each_chunk<T: Send>(&self, data: &mut [T], chunk_len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
        let chunk_len = chunk_len.max(1);
        #[cfg(feature = "std")]
        if let Some(pool) = &self.pool {
            use rayon::prelude::*;
            let f = &f;
            // Inside `run` this forks on the current worker; elsewhere it enters the pool.
            if rayon::current_thread_index().is_some() {
                data.par_chunks_mut(chunk_len).enumerate().for_each(|(i, c)| f(i, c));
            } else {
                pool.install(|| data.par_chunks_mut(chunk_len).enumerate().for_each(|(i, c)| f(i, c)));
            }
            return;
        }
        for (i, c) in data.chunks_mut(chunk_len).enumerate() {
            f(i, c);
        }
    }
}

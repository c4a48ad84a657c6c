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
            let pool = (threads > 1)
                .then(|| rayon::ThreadPoolBuilder::new().num_threads(threads).build().ok())
                .flatten();
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

    /// Calls `f(index, chunk)` for each `chunk_len`-long chunk of `data` (the last may be
    /// shorter), in parallel when the pool has several threads.
    pub fn for_each_chunk<T: Send>(&self, data: &mut [T], chunk_len: usize, f: impl Fn(usize, &mut [T]) + Sync + Send) {
        let chunk_len = chunk_len.max(1);
        #[cfg(feature = "std")]
        if let Some(pool) = &self.pool {
            use rayon::prelude::*;
            pool.install(|| data.par_chunks_mut(chunk_len).enumerate().for_each(|(i, c)| f(i, c)));
            return;
        }
        for (i, c) in data.chunks_mut(chunk_len).enumerate() {
            f(i, c);
        }
    }
}

//! Data parallelism for the forward pass: a team of threads that all run the same forward
//! code (SPMD), each computing its share of every matrix product and attention, then
//! exchanging results.
//!
//! Why not a work-stealing pool: a decode step is ~240 parallel operations of a few to a
//! few hundred microseconds. Pool workers that park between them must be woken for every
//! operation, and on virtual machines waking an idle vCPU costs as much as the operation
//! (measured here: rayon gave no speed-up at all at 2 threads). Team members instead wait
//! at a spinning barrier, as llama.cpp's threads do, so they stay on their cores for the
//! whole forward pass.
//!
//! Each member keeps private copies of the activations; after computing its share it
//! publishes it in its exchange slot and copies the other members' shares from theirs
//! ([`Member::all_gather`]). Without `std`, or with one thread, a team is the caller alone
//! and every exchange is a no-op.

use alloc::vec::Vec;
use core::ops::Range;
use core::sync::atomic::{AtomicUsize, Ordering};

/// A fixed number of threads that run forward passes together.
#[derive(Debug)]
pub struct Team {
    threads: usize,
    barrier: SpinBarrier,
    slots: Vec<spin::Mutex<Vec<f32>>>,
}

impl Team {
    /// A team of `threads` threads (at least one; always one without `std`).
    pub fn new(threads: usize) -> Self {
        let threads = if cfg!(feature = "std") { threads.max(1) } else { 1 };
        Team {
            threads,
            barrier: SpinBarrier::new(threads),
            slots: (0..threads).map(|_| spin::Mutex::new(Vec::new())).collect(),
        }
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` on every member at once (the caller is member 0, the leader) and returns
    /// the leader's result. Threads are started for the call and joined before it returns.
    pub fn run<R>(&self, f: impl Fn(&Member<'_>) -> R + Sync) -> R {
        self.run_led(
            |member| {
                f(member);
            },
            |member| f(member),
        )
    }

    /// Runs `leader` on the calling thread as member 0 and `worker` on every other member,
    /// all at once, and returns the leader's result. Unlike [`Team::run`], the leader's
    /// closure needs neither `Send` nor `Sync`, so it can hold callbacks and exclusive
    /// borrows; the leader tells the workers what to do next through shared state and
    /// [`Member::barrier`]. This keeps one team for a whole generation, so the decode loop
    /// starts no threads.
    pub fn run_led<R>(&self, worker: impl Fn(&Member<'_>) + Sync, leader: impl FnOnce(&Member<'_>) -> R) -> R {
        let member = |index| Member { index, team: self };
        #[cfg(feature = "std")]
        if self.threads > 1 {
            return std::thread::scope(|scope| {
                for index in 1..self.threads {
                    let (worker, member) = (&worker, &member);
                    scope.spawn(move || worker(&member(index)));
                }
                leader(&member(0))
            });
        }
        let _ = worker;
        leader(&member(0))
    }
}

/// One thread's view of its team during [`Team::run`].
#[derive(Debug)]
pub struct Member<'t> {
    index: usize,
    team: &'t Team,
}

impl Member<'_> {
    /// This member's index (0 is the leader).
    pub fn index(&self) -> usize {
        self.index
    }

    /// True for the member that returns [`Team::run`]'s result.
    pub fn is_leader(&self) -> bool {
        self.index == 0
    }

    /// The contiguous part of `0..n` this member works on (parts differ by at most one).
    pub fn share(&self, n: usize) -> Range<usize> {
        share_of(self.index, self.team.threads, n)
    }

    /// Waits until every member has arrived.
    pub fn barrier(&self) {
        self.team.barrier.wait();
    }

    /// Completes `data` (`outer × n × width` values) on every member: each member computed
    /// rows `self.share(n)` (each `width` wide) for every outer index, and receives the
    /// other members' rows.
    pub fn all_gather(&self, data: &mut [f32], outer: usize, n: usize, width: usize) {
        self.exchange(data, outer, n, width, true);
    }

    /// As [`Member::all_gather`], but only the leader receives the other rows.
    pub fn gather_to_leader(&self, data: &mut [f32], outer: usize, n: usize, width: usize) {
        self.exchange(data, outer, n, width, self.is_leader());
    }

    fn exchange(&self, data: &mut [f32], outer: usize, n: usize, width: usize, receive: bool) {
        let threads = self.team.threads;
        if threads == 1 {
            return;
        }
        let mine = self.share(n);
        {
            let mut slot = self.team.slots[self.index].lock();
            slot.clear();
            for o in 0..outer {
                slot.extend_from_slice(&data[(o * n + mine.start) * width..(o * n + mine.end) * width]);
            }
        }
        self.barrier();
        if receive {
            for other in (0..threads).filter(|&m| m != self.index) {
                let theirs = share_of(other, threads, n);
                let len = theirs.len() * width;
                let slot = self.team.slots[other].lock();
                for o in 0..outer {
                    data[(o * n + theirs.start) * width..(o * n + theirs.end) * width]
                        .copy_from_slice(&slot[o * len..(o + 1) * len]);
                }
            }
        }
        // Nobody may overwrite its slot (in the next exchange) before all have read it.
        self.barrier();
    }
}

fn share_of(index: usize, parts: usize, n: usize) -> Range<usize> {
    let (base, extra) = (n / parts, n % parts);
    let start = index * base + index.min(extra);
    start..start + base + usize::from(index < extra)
}

/// A reusable barrier that spins (with a CPU pause hint) instead of parking threads.
#[derive(Debug)]
struct SpinBarrier {
    threads: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
}

impl SpinBarrier {
    fn new(threads: usize) -> Self {
        SpinBarrier { threads, arrived: AtomicUsize::new(0), generation: AtomicUsize::new(0) }
    }

    fn wait(&self) {
        let generation = self.generation.load(Ordering::Acquire);
        if self.arrived.fetch_add(1, Ordering::AcqRel) + 1 == self.threads {
            self.arrived.store(0, Ordering::Relaxed);
            self.generation.fetch_add(1, Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while self.generation.load(Ordering::Acquire) == generation {
            core::hint::spin_loop();
            spins = spins.wrapping_add(1);
            // On an oversubscribed machine, let the thread we are waiting for run.
            #[cfg(feature = "std")]
            if spins.is_multiple_of(1024) {
                std::thread::yield_now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn shares_cover_the_range_exactly() {
        for parts in 1..5 {
            for n in 0..20 {
                let mut next = 0;
                for i in 0..parts {
                    let r = share_of(i, parts, n);
                    assert_eq!(r.start, next);
                    next = r.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn all_gather_assembles_every_members_rows() {
        let (outer, n, width) = (3, 7, 2);
        let expected = |o: usize, r: usize, w: usize| (o * 100 + r * 10 + w) as f32;
        for threads in [1, 2, 3] {
            let team = Team::new(threads);
            for _ in 0..50 {
                let leader_view = team.run(|m| {
                    let mut data = vec![-1.0; outer * n * width];
                    for o in 0..outer {
                        for r in m.share(n) {
                            for w in 0..width {
                                data[(o * n + r) * width + w] = expected(o, r, w);
                            }
                        }
                    }
                    m.all_gather(&mut data, outer, n, width);
                    for o in 0..outer {
                        for r in 0..n {
                            for w in 0..width {
                                assert_eq!(data[(o * n + r) * width + w], expected(o, r, w));
                            }
                        }
                    }
                    data
                });
                assert_eq!(leader_view.len(), outer * n * width);
            }
        }
    }
}

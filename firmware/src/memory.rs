//! RAM accounting: the heap (a fixed arena, with its peak use tracked) and the stack's
//! high-water mark (painted at start-up, scanned at the end).
//!
//! This is board support, the one place besides the kernels where the firmware needs
//! `unsafe`: a global allocator, and raw writes to the unused stack.

use core::alloc::{GlobalAlloc, Layout};
use core::mem::MaybeUninit;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicUsize, Ordering};

use embedded_alloc::LlffHeap;

/// Bytes of the heap arena: the session's KV cache, scratch and the tokenizer's tables
/// (measured: see README.md). Everything is allocated before decoding starts.
pub const HEAP_BYTES: usize = 224 * 1024;

#[link_section = ".uninit.heap"]
static mut HEAP_MEMORY: [MaybeUninit<u8>; HEAP_BYTES] = [MaybeUninit::uninit(); HEAP_BYTES];

/// The global allocator: a linked-list heap over [`HEAP_BYTES`], counting bytes in use.
pub struct CountingHeap {
    heap: LlffHeap,
    in_use: AtomicUsize,
    peak: AtomicUsize,
    allocations: AtomicUsize,
}

#[global_allocator]
pub static HEAP: CountingHeap = CountingHeap {
    heap: LlffHeap::empty(),
    in_use: AtomicUsize::new(0),
    peak: AtomicUsize::new(0),
    allocations: AtomicUsize::new(0),
};

impl CountingHeap {
    /// Hands the arena to the heap; call once, first thing.
    pub fn init(&self) {
        // SAFETY: called once at start-up, before any allocation; the arena is a static that
        // nothing else touches.
        unsafe { self.heap.init(addr_of_mut!(HEAP_MEMORY) as usize, HEAP_BYTES) }
    }

    /// Most bytes ever allocated at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    /// Allocations made so far (successful or not).
    pub fn allocations(&self) -> usize {
        self.allocations.load(Ordering::Relaxed)
    }

    /// Bytes allocated now.
    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }
}

// SAFETY: forwards to `LlffHeap`, a correct allocator, and only adds counters.
unsafe impl GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.allocations.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded contract.
        let p = unsafe { self.heap.alloc(layout) };
        if !p.is_null() {
            let now = self.in_use.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        self.in_use.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { self.heap.dealloc(ptr, layout) }
    }
}

extern "C" {
    /// End of `.uninit` (the last static data), from cortex-m-rt's linker script: the
    /// stack may grow down to here.
    static __euninit: u32;
    /// Top of the stack (end of RAM), from cortex-m-rt's linker script.
    static _stack_start: u32;
}

const PAINT: u32 = 0x5AFE_C0DE;
/// Bytes below the current stack pointer left unpainted (this function's own frame).
const PAINT_MARGIN: usize = 256;

/// Fills the unused stack with a pattern; call early in `main`.
pub fn paint_stack() {
    let bottom = addr_of!(__euninit) as usize;
    let top = cortex_m::register::msp::read() as usize - PAINT_MARGIN;
    let mut at = (bottom + 3) & !3;
    while at < top {
        // SAFETY: `bottom..top` is RAM between the static data and the live stack frames,
        // which nothing uses yet; word-aligned.
        unsafe { (at as *mut u32).write_volatile(PAINT) };
        at += 4;
    }
}

/// Stack bytes ever used: from the top of the stack to the lowest word no longer painted.
pub fn stack_high_water() -> usize {
    let bottom = (addr_of!(__euninit) as usize + 3) & !3;
    let top = addr_of!(_stack_start) as usize;
    let mut at = bottom;
    // SAFETY: reads words of the stack region painted by `paint_stack`.
    while at < top && unsafe { (at as *const u32).read_volatile() } == PAINT {
        at += 4;
    }
    top - at
}

/// Bytes from the bottom of the stack region to its top: what the stack may use.
pub fn stack_room() -> usize {
    addr_of!(_stack_start) as usize - addr_of!(__euninit) as usize
}

//! An instruction counter from SysTick.
//!
//! SysTick counts core clock cycles. Under QEMU with `-icount shift=0`, virtual time
//! advances one nanosecond per guest instruction, so its ticks count instructions at a
//! fixed ratio; [`Counter::calibrate`] measures that ratio on a loop of known length, so the
//! counts do not depend on the machine's clock. On a real board the same ticks are cycles.
//!
//! The 24-bit counter wraps every 2^24 ticks; the SysTick exception counts the wraps.

use core::arch::asm;
use core::sync::atomic::{AtomicU32, Ordering};

use cortex_m::peripheral::{syst::SystClkSource, SYST};
use cortex_m_rt::exception;

const RELOAD: u32 = 0x00FF_FFFF;
static WRAPS: AtomicU32 = AtomicU32::new(0);

#[exception]
fn SysTick() {
    WRAPS.fetch_add(1, Ordering::Relaxed);
}

/// A running SysTick and the instructions-per-tick ratio measured on this machine.
pub struct Counter {
    /// Instructions per 1,000 ticks.
    milli_instructions_per_tick: u64,
    calibration_ticks: u64,
}

impl Counter {
    /// Starts SysTick on the core clock and calibrates it.
    pub fn start(mut syst: SYST) -> Self {
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(RELOAD);
        syst.clear_current();
        syst.enable_interrupt();
        syst.enable_counter();
        // The current value reads 0 until the first reload.
        while SYST::get_current() == 0 {}
        let mut counter = Counter { milli_instructions_per_tick: 1000, calibration_ticks: 0 };
        counter.calibrate();
        counter
    }

    /// Ticks since start.
    pub fn ticks(&self) -> u64 {
        loop {
            let before = WRAPS.load(Ordering::Relaxed);
            let current = SYST::get_current();
            if WRAPS.load(Ordering::Relaxed) == before {
                return before as u64 * (RELOAD as u64 + 1) + (RELOAD - current) as u64;
            }
        }
    }

    /// Ticks to instructions.
    pub fn instructions(&self, ticks: u64) -> u64 {
        ticks * self.milli_instructions_per_tick / 1000
    }

    /// Times a loop of `2 × LOOPS` instructions (`subs`, `bne`).
    fn calibrate(&mut self) {
        const LOOPS: u32 = 4_000_000;
        let start = self.ticks();
        // SAFETY: a register-only countdown loop.
        unsafe {
            asm!("2:", "subs {n}, {n}, #1", "bne 2b", n = inout(reg) LOOPS => _, options(nomem, nostack));
        }
        let ticks = (self.ticks() - start).max(1);
        self.calibration_ticks = ticks;
        self.milli_instructions_per_tick = 2 * LOOPS as u64 * 1000 / ticks;
    }

    /// Ticks the calibration loop took.
    pub fn calibration_ticks(&self) -> u64 {
        self.calibration_ticks
    }

    /// The calibrated ratio, instructions per 1,000 ticks.
    pub fn milli_instructions_per_tick(&self) -> u64 {
        self.milli_instructions_per_tick
    }
}

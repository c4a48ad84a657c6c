//! Board support shared by the firmware's images: logging to the host ([`say!`]), the
//! instruction counter ([`counter`]), the heap and stack accounting ([`memory`]), and the
//! failure path (a message and exit code 1 for errors, panics and HardFaults).
#![no_std]

extern crate alloc;

pub mod counter;
pub mod log;
pub mod memory;

use cortex_m_rt::{exception, ExceptionFrame};
use cortex_m_semihosting::debug::{exit, EXIT_FAILURE};
#[cfg(all(feature = "defmt-log", not(feature = "semihosting-log")))]
use defmt_semihosting as _;

/// Logs `message` as an error and exits with status 1.
pub fn fail(message: &str) -> ! {
    say!("error: {}", message);
    exit(EXIT_FAILURE);
    loop {
        cortex_m::asm::bkpt();
    }
}

/// Panics (an out-of-memory one included) log without allocating, then exit with 1.
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    #[cfg(all(feature = "defmt-log", not(feature = "semihosting-log")))]
    defmt::println!("error: panic: {}", defmt::Display2Format(info));
    #[cfg(feature = "semihosting-log")]
    cortex_m_semihosting::hprintln!("error: panic: {}", info);
    exit(EXIT_FAILURE);
    loop {
        cortex_m::asm::bkpt();
    }
}

#[exception]
unsafe fn HardFault(frame: &ExceptionFrame) -> ! {
    say!("error: HardFault at pc {}", frame.pc());
    exit(EXIT_FAILURE);
    loop {
        cortex_m::asm::bkpt();
    }
}

//! `say!`: one line to the host, through defmt (feature `defmt-log`, the default) or plain
//! semihosting (feature `semihosting-log`). Format strings use `{}` only, which both accept.

#[cfg(all(feature = "defmt-log", not(feature = "semihosting-log")))]
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { defmt::println!($($arg)*) };
}

#[cfg(feature = "semihosting-log")]
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => { cortex_m_semihosting::hprintln!($($arg)*) };
}

#[cfg(not(any(feature = "defmt-log", feature = "semihosting-log")))]
compile_error!("enable a log backend: `defmt-log` (default) or `semihosting-log`");

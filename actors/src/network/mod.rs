//! Host networking (TapPool) and DNS (Dns) actors.

pub mod dns;
pub mod taps;

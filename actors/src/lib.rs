//! bangerd's actor tree.
//!
//! ```text
//! supervisor            root: spawns the children linked, restarts them
//! ├── store             the sled database; every durable record
//! ├── events            lifecycle events, backlog kept in the store
//! ├── kernels           kernel records; publication window for new kernels
//! ├── images            image records; publication window for new images
//! ├── taps              TapPool: bridge, warm TAPs, NAT, guest address leases
//! ├── dns               the `vm.` DNS server and its records
//! └── router            owns the listening socket; one task per connection
//! ```
//!
//! Actors are found by their registered name ([`names`]) at the moment they
//! are needed, so a request never holds a reference to a dead incarnation
//! of an actor that its supervisor has since replaced.

pub mod ask;
pub mod events;
pub mod fsutil;
pub mod images;
pub mod kernels;
pub mod layout;
pub mod network;
pub mod records;
pub mod router;
pub mod store;
pub mod supervisor;
pub mod vms;

/// Registered actor names.
pub mod names {
    pub const SUPERVISOR: &str = "supervisor";
    pub const STORE: &str = "store";
    pub const EVENTS: &str = "events";
    pub const ROUTER: &str = "router";
    pub const KERNELS: &str = "kernels";
    pub const IMAGES: &str = "images";
    pub const TAPS: &str = "taps";
    pub const DNS: &str = "dns";
    pub const VMS: &str = "vms";
}

/// Milliseconds since the Unix epoch, for timestamps that travel.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

//! The wire protocol between banger clients (CLI, tests, benchmarks) and `bangerd`.
//!
//! Every message is a postcard-encoded value in a frame prefixed by its length
//! as a big-endian `u32`; a frame larger than [`MAX_FRAME_LEN`] is refused.
//! The first exchange on a connection is a version handshake
//! ([`ClientMessage::Hello`] / [`ServerMessage::Hello`]). After it the client
//! sends requests tagged with an id; the daemon answers each with zero or
//! more [`Progress`] events and exactly one final [`ServerMessage::Reply`].
//!
//! postcard encodes enum variants by index and is not self-describing, so the
//! rule for evolving these types is: append variants and fields, never
//! reorder or remove them, and bump [`PROTOCOL_VERSION`] when an old peer
//! could misread a new message. `tests/golden.rs` pins the bytes.

pub mod agent;
pub mod client;
mod error;
mod frame;
pub mod images;
mod messages;
pub mod network;
pub mod paths;
pub mod vms;

pub use error::{ErrorData, ErrorKind};
pub use frame::{
    codec, decode, encode, is_frame_too_large, FrameCodec, FrameError, FrameTooLarge, Framed,
    TruncatedFrame,
};
pub use images::*;
pub use messages::*;
pub use network::*;
pub use vms::*;

/// Version of the wire format. A daemon refuses a client with another one.
pub const PROTOCOL_VERSION: u32 = 1;

/// Hard upper bound for one frame's payload, in bytes.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

/// Version of this build of banger (shared by the CLI and the daemon).
pub const BANGER_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Features this build understands; exchanged in the handshake so a peer can adapt.
pub const FEATURES: &[&str] = &[
    "progress-stream",
    "events",
    "cancel",
    "debug-actors",
    "vm",
    "exec-io",
];

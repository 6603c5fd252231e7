//! Firecracker backend (being written).

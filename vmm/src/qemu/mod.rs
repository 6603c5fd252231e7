//! QEMU backend (being written).

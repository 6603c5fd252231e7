//! Image building blocks, independent of the actor system: OCI registry
//! pulls with a digest-addressed layer cache ([`registry`], [`cache`]),
//! hostile-layer-safe unpacking with whiteouts ([`unpack`]) and ext4
//! rootfs building ([`ext4`]), and the cache of unpacked trees per layer
//! chain ([`treecache`]). The `ImageRegistry` actor drives them.

pub mod cache;
pub mod ext4;
pub mod kernel;
pub mod registry;
pub mod testing;
pub mod treecache;
pub mod unpack;

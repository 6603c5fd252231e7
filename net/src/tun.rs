//! TAP devices through `/dev/net/tun`: creating a persistent TAP (netlink
//! cannot make one that a VMM can later attach to with the right flags) and
//! opening an existing one, as a VMM does.
//!
//! Flags: banger creates TAPs with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`,
//! single-queue. `IFF_NO_PI` drops the 4-byte packet-information header;
//! `IFF_VNET_HDR` is what both VMMs use (Firecracker always; QEMU's
//! `-netdev tap` with `vnet_hdr` on or auto) so that virtio-net offloads
//! work. The vnet-header flag is really chosen again by whoever attaches
//! next, but single- versus multi-queue is fixed at creation: a VMM must not
//! ask for `IFF_MULTI_QUEUE` (QEMU `queues=N`) on these TAPs.
//!
//! The ioctls act in the network namespace of the calling thread.

use std::ffi::CString;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use crate::error::NetError;
use crate::ifname::validate_ifname;

const TUN_PATH: &str = "/dev/net/tun";

// <linux/if_tun.h>: _IOW('T', n, int).
const TUNSETIFF: u32 = 0x4004_54ca;
const TUNSETPERSIST: u32 = 0x4004_54cb;
const TUNSETOWNER: u32 = 0x4004_54cc;
const TUNSETGROUP: u32 = 0x4004_54ce;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Fail with `EBUSY` instead of attaching if the device already exists.
const IFF_TUN_EXCL: libc::c_short = 0x8000_u16 as libc::c_short;

/// The flags banger creates its TAPs with (see the module documentation).
const TAP_FLAGS: libc::c_short = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;

/// `struct ifreq` with the `ifr_flags` member of its union (40 bytes).
#[repr(C)]
struct IfReqFlags {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReqFlags {
    fn new(name: &str, flags: libc::c_short) -> Self {
        let mut req = IfReqFlags {
            name: [0; libc::IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        // validate_ifname guarantees at most 15 bytes, leaving the NUL.
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        req
    }
}

/// Who may attach to a TAP besides root. A VMM running as an unprivileged
/// user needs its uid (or gid) here to open the TAP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TapOptions {
    /// `TUNSETOWNER`: this uid may attach.
    pub owner_uid: Option<u32>,
    /// `TUNSETGROUP`: members of this gid may attach.
    pub owner_gid: Option<u32>,
}

/// An Ethernet MAC address, printed as `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The address from a netlink `IFLA_ADDRESS`, if it is 6 bytes long.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(bytes).ok().map(MacAddr)
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn open_tun(name: &str) -> Result<File, NetError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(TUN_PATH)
        .map_err(|source| NetError::Tun {
            op: "open /dev/net/tun",
            link: name.to_owned(),
            source,
        })
}

fn ioctl_ifreq(file: &File, name: &str, req: &mut IfReqFlags) -> Result<(), NetError> {
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a
    // valid, exclusively borrowed, correctly laid out 40-byte ifreq.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            TUNSETIFF as libc::Ioctl,
            req as *mut IfReqFlags,
        )
    };
    if rc < 0 {
        let source = io::Error::last_os_error();
        if source.raw_os_error() == Some(libc::EBUSY) {
            return Err(NetError::AlreadyExists {
                name: name.to_owned(),
            });
        }
        return Err(NetError::Tun {
            op: "TUNSETIFF",
            link: name.to_owned(),
            source,
        });
    }
    Ok(())
}

fn ioctl_int(
    file: &File,
    name: &str,
    op: &'static str,
    request: u32,
    value: libc::c_ulong,
) -> Result<(), NetError> {
    // SAFETY: these TUN ioctls take their argument by value; no memory is
    // passed to the kernel.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as libc::Ioctl, value) };
    if rc < 0 {
        return Err(NetError::Tun {
            op,
            link: name.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Creates the persistent TAP `name` (it outlives this call, unattached,
/// until deleted). Fails with [`NetError::AlreadyExists`] if any interface of
/// that name exists. Synchronous: a handful of ioctls, microseconds.
pub(crate) fn create_persistent_tap(name: &str, opts: &TapOptions) -> Result<(), NetError> {
    validate_ifname(name)?;
    let file = open_tun(name)?;
    let mut req = IfReqFlags::new(name, TAP_FLAGS | IFF_TUN_EXCL);
    ioctl_ifreq(&file, name, &mut req)?;
    // Until TUNSETPERSIST succeeds the device lives only as long as `file`,
    // so an early return here leaves nothing behind.
    if let Some(uid) = opts.owner_uid {
        ioctl_int(
            &file,
            name,
            "TUNSETOWNER",
            TUNSETOWNER,
            libc::c_ulong::from(uid),
        )?;
    }
    if let Some(gid) = opts.owner_gid {
        ioctl_int(
            &file,
            name,
            "TUNSETGROUP",
            TUNSETGROUP,
            libc::c_ulong::from(gid),
        )?;
    }
    ioctl_int(&file, name, "TUNSETPERSIST", TUNSETPERSIST, 1)?;
    Ok(())
}

/// Attaches to the existing TAP `name` the way a VMM does, returning the
/// queue's file descriptor (blocking mode). Frames read from and written to
/// it are raw Ethernet frames, preceded by a `virtio_net_hdr` if `vnet_hdr`.
/// While it is open the TAP has carrier. Fails with
/// [`NetError::NotFound`] rather than creating a TAP.
pub fn open_tap(name: &str, vnet_hdr: bool) -> Result<File, NetError> {
    validate_ifname(name)?;
    let c_name = CString::new(name).map_err(|_| NetError::NotFound {
        kind: "TAP",
        name: name.to_owned(),
    })?;
    // SAFETY: `c_name` is a valid NUL-terminated string for the call.
    if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
        return Err(NetError::NotFound {
            kind: "TAP",
            name: name.to_owned(),
        });
    }
    let file = open_tun(name)?;
    let flags = IFF_TAP | IFF_NO_PI | if vnet_hdr { IFF_VNET_HDR } else { 0 };
    let mut req = IfReqFlags::new(name, flags);
    ioctl_ifreq(&file, name, &mut req)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<IfReqFlags>(), 40);
        assert_eq!(std::mem::offset_of!(IfReqFlags, flags), 16);
        let req = IfReqFlags::new("abcdefghijklmno", TAP_FLAGS);
        assert_eq!(&req.name[..15], b"abcdefghijklmno");
        assert_eq!(req.name[15], 0);
        assert_eq!(IFF_TUN_EXCL as u16, 0x8000);
        assert_eq!(TAP_FLAGS, 0x5002);
    }

    #[test]
    fn mac_display() {
        let mac = MacAddr([0x02, 0xab, 0, 1, 0xff, 0x10]);
        assert_eq!(mac.to_string(), "02:ab:00:01:ff:10");
        assert_eq!(MacAddr::from_slice(&[1, 2, 3]), None);
        assert_eq!(
            MacAddr::from_slice(&[1, 2, 3, 4, 5, 6]),
            Some(MacAddr([1, 2, 3, 4, 5, 6]))
        );
    }
}

//! The protocol between bangerd and the guest agent (`banger-agent`).
//!
//! The transport is one byte stream: the virtio-serial port
//! [`AGENT_SERIAL_NAME`] under QEMU, or vsock port [`AGENT_VSOCK_PORT`]
//! under Firecracker (hybrid vsock: the host writes `CONNECT <port>\n` on
//! the VMM's Unix socket first). Several requests share it, each tagged
//! with an `id` the host picks.
//!
//! Frames are postcard values in COBS encoding, each ended by a `0x00`
//! byte ([`AgentCodec`]). A serial port keeps no connection boundaries:
//! after a host reconnect the guest may still hold half a frame from the
//! old session. COBS lets either side drop bytes up to the next `0x00` and
//! carry on, so a torn frame costs one message, never the stream. A frame
//! larger than [`MAX_AGENT_FRAME`] is dropped the same way.
//!
//! Append-only, like the client protocol: new variants and fields go at
//! the end, and [`AGENT_PROTOCOL_VERSION`] is bumped when an old peer could
//! misread a new message.

use bytes::{BufMut, BytesMut};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use std::marker::PhantomData;

/// Version of the agent protocol, exchanged in [`HostToAgent::Hello`].
pub const AGENT_PROTOCOL_VERSION: u32 = 1;
/// Name of the QEMU virtio-serial port (`/dev/virtio-ports/<name>` in the guest).
pub const AGENT_SERIAL_NAME: &str = "banger.agent";
/// vsock port the agent listens on under Firecracker.
pub const AGENT_VSOCK_PORT: u32 = 1024;
/// Largest encoded frame either side accepts.
pub const MAX_AGENT_FRAME: usize = 1024 * 1024;
/// Largest chunk of process output or input carried in one frame.
pub const MAX_IO_CHUNK: usize = 64 * 1024;

/// Kernel command line keys banger passes to every VM (read by the agent;
/// the systemd path reads `ip=`/`nameserver=`/`systemd.hostname=` instead).
pub mod cmdline {
    /// Guest address with prefix, `172.30.0.5/24`.
    pub const IP: &str = "banger.ip";
    /// Default gateway.
    pub const GATEWAY: &str = "banger.gw";
    /// Resolver address.
    pub const DNS: &str = "banger.dns";
    /// MAC address of the NIC to configure (the agent matches by MAC,
    /// never by name: the kernel may rename it).
    pub const MAC: &str = "banger.mac";
    /// The VM's hostname.
    pub const HOSTNAME: &str = "banger.hostname";
}

/// Messages from the host to the agent.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum HostToAgent {
    /// Starts a session. The agent answers with [`AgentToHost::Hello`] and
    /// kills processes started by earlier sessions that did not ask to
    /// outlive them (their host side is gone).
    Hello { version: u32, session: u64 },
    /// Asks for [`AgentToHost::Health`].
    Health { id: u64 },
    /// Asks for the listening TCP/UDP sockets ([`AgentToHost::Ports`]).
    Ports { id: u64 },
    /// Starts a process; answered by `Started`, then `Output`* and `Exited`
    /// (or `Failed`).
    Exec { id: u64, request: ExecRequest },
    /// Bytes for the stdin of process `id`.
    Stdin { id: u64, data: Vec<u8> },
    /// Closes the stdin of process `id`.
    StdinClose { id: u64 },
    /// New terminal size for a process started with a TTY.
    Resize { id: u64, size: TtySize },
    /// Sends a signal (a Linux signal number) to process `id`.
    Signal { id: u64, signal: i32 },
    /// Cleanly powers the guest off (or reboots it); answered by `Done`
    /// before it happens.
    PowerOff { id: u64, reboot: bool },
}

/// Messages from the agent to the host.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum AgentToHost {
    Hello {
        version: u32,
        session: u64,
        agent_version: String,
        /// True when the agent runs as the guest's init.
        pid1: bool,
    },
    Health {
        id: u64,
        health: GuestHealth,
    },
    Ports {
        id: u64,
        ports: Vec<ListeningPort>,
    },
    /// The process of request `id` started.
    Started {
        id: u64,
        pid: u32,
    },
    Output {
        id: u64,
        stream: OutputStream,
        data: Vec<u8>,
    },
    /// The process of request `id` ended; its output has all been sent.
    Exited {
        id: u64,
        status: ExitStatus,
    },
    /// Request `id` failed (e.g. the program does not exist).
    Failed {
        id: u64,
        message: String,
    },
    /// Request `id` was accepted and has no other answer.
    Done {
        id: u64,
    },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ExecRequest {
    /// Program and arguments; the program is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment (on top of a sane default with `PATH`, `HOME`, `TERM`).
    pub env: Vec<(String, String)>,
    /// Working directory; default `/root`.
    pub cwd: Option<String>,
    /// Run on a pseudo-terminal of this size (output then all arrives as `Stdout`).
    pub tty: Option<TtySize>,
    /// Whether the host will send stdin; otherwise stdin is `/dev/null`.
    pub stdin: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout,
    Stderr,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    Signal(i32),
}

impl ExitStatus {
    /// The shell convention: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct GuestHealth {
    pub agent_version: String,
    pub pid1: bool,
    pub hostname: String,
    pub uptime_ms: u64,
    /// 1, 5 and 15 minute load averages, in hundredths.
    pub load_centi: [u32; 3],
    pub mem_total_kib: u64,
    pub mem_available_kib: u64,
    /// Non-loopback interfaces with their IPv4 addresses (`name addr/prefix`).
    pub addresses: Vec<String>,
    /// `systemctl is-system-running` when the guest runs systemd.
    pub system_state: Option<String>,
    /// Whether something listens on TCP port 22.
    pub sshd_listening: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct ListeningPort {
    /// `tcp`, `tcp6`, `udp` or `udp6`.
    pub proto: String,
    pub address: String,
    pub port: u16,
    /// The owning process when it could be found.
    pub pid: Option<u32>,
    pub process: Option<String>,
}

/// Encodes one frame (COBS body plus the `0x00` terminator).
pub fn encode_agent_frame<T: Serialize>(msg: &T) -> Result<Vec<u8>, postcard::Error> {
    postcard::to_stdvec_cobs(msg)
}

/// A tokio-util codec for agent frames: decodes `In`, encodes `Out`.
/// Undecodable or oversized frames are skipped (counted in `dropped`), never
/// fatal: see the module docs.
#[derive(Debug)]
pub struct AgentCodec<In, Out> {
    /// Frames skipped because they did not decode or were too large.
    pub dropped: u64,
    /// Inside an oversized frame: discard bytes until the next terminator.
    discarding: bool,
    _marker: PhantomData<fn(Out) -> In>,
}

impl<In, Out> Default for AgentCodec<In, Out> {
    fn default() -> Self {
        Self {
            dropped: 0,
            discarding: false,
            _marker: PhantomData,
        }
    }
}

/// The codec the host side uses.
pub type HostCodec = AgentCodec<AgentToHost, HostToAgent>;
/// The codec the agent uses.
pub type GuestCodec = AgentCodec<HostToAgent, AgentToHost>;

impl<In: DeserializeOwned, Out> tokio_util::codec::Decoder for AgentCodec<In, Out> {
    type Item = In;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<In>, std::io::Error> {
        loop {
            let Some(end) = src.iter().position(|b| *b == 0) else {
                if src.len() > MAX_AGENT_FRAME {
                    src.clear();
                    if !self.discarding {
                        self.discarding = true;
                        self.dropped += 1;
                    }
                }
                return Ok(None);
            };
            let mut frame = src.split_to(end + 1);
            if std::mem::take(&mut self.discarding) {
                continue;
            }
            if frame.len() == 1 {
                // A lone terminator (line noise, or a peer resynchronising).
                continue;
            }
            if frame.len() > MAX_AGENT_FRAME {
                self.dropped += 1;
                continue;
            }
            match postcard::from_bytes_cobs::<In>(&mut frame[..]) {
                Ok(msg) => return Ok(Some(msg)),
                Err(_) => {
                    self.dropped += 1;
                    continue;
                }
            }
        }
    }
}

impl<In, Out: Serialize> tokio_util::codec::Encoder<Out> for AgentCodec<In, Out> {
    type Error = std::io::Error;

    fn encode(&mut self, item: Out, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        let bytes = encode_agent_frame(&item)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
        if bytes.len() > MAX_AGENT_FRAME {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "agent frame of {} bytes exceeds the {MAX_AGENT_FRAME}-byte limit",
                    bytes.len()
                ),
            ));
        }
        dst.reserve(bytes.len());
        dst.put_slice(&bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_util::codec::{Decoder, Encoder};

    #[test]
    fn round_trip_and_resync_after_garbage() {
        let mut host = HostCodec::default();
        let mut guest = GuestCodec::default();
        let mut wire = BytesMut::new();
        // A torn frame from an old session, then two real ones.
        wire.put_slice(&[7, 1, 2, 3, 0]);
        host.encode(HostToAgent::Health { id: 9 }, &mut wire)
            .unwrap();
        host.encode(
            HostToAgent::Stdin {
                id: 1,
                data: vec![0, 0, 255],
            },
            &mut wire,
        )
        .unwrap();
        assert_eq!(
            guest.decode(&mut wire).unwrap(),
            Some(HostToAgent::Health { id: 9 })
        );
        assert_eq!(
            guest.decode(&mut wire).unwrap(),
            Some(HostToAgent::Stdin {
                id: 1,
                data: vec![0, 0, 255]
            })
        );
        assert_eq!(guest.decode(&mut wire).unwrap(), None);
        assert_eq!(guest.dropped, 1);
    }

    #[test]
    fn oversized_frames_are_skipped_not_fatal() {
        let mut guest = GuestCodec::default();
        let mut wire = BytesMut::new();
        wire.put_slice(&vec![1u8; MAX_AGENT_FRAME + 10]);
        assert_eq!(guest.decode(&mut wire).unwrap(), None);
        wire.put_slice(&[5, 5, 0]);
        let mut host = HostCodec::default();
        host.encode(HostToAgent::Ports { id: 2 }, &mut wire)
            .unwrap();
        assert_eq!(
            guest.decode(&mut wire).unwrap(),
            Some(HostToAgent::Ports { id: 2 })
        );
        assert_eq!(guest.dropped, 1);
    }

    #[test]
    fn shell_code_convention() {
        assert_eq!(ExitStatus::Code(3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
    }
}

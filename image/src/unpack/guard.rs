//! A structural guard between the decompressor and the tar parser.
//!
//! [`TarGuard`] follows the tar block structure of the decompressed stream
//! byte by byte before `astral-tokio-tar` sees it, and fails the stream when
//! it sees something the unpacker refuses on principle:
//!
//! - more decompressed bytes than the image budget allows (bombs whose
//!   payload is never written, e.g. a whiteout with a 1 TB body, or junk after
//!   the end-of-archive marker);
//! - extension headers (PAX `x`/`g`, GNU `L`/`K`) larger than
//!   [`MAX_EXTENSION_BYTES`]: the tar parser buffers those in memory;
//! - GNU sparse members (never produced by image builders);
//! - headers whose checksum does not verify, and malformed PAX records;
//! - a stream that ends mid-header, mid-member or before the end-of-archive
//!   marker (truncation).
//!
//! It mirrors the parser's view of member sizes (a PAX `size` record
//! overrides the header of the next member), so a desynchronised stream shows
//! up as a checksum failure here or in the parser, never as a silently
//! different file.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, ReadBuf};

/// Largest PAX or GNU long-name extension body accepted (the parser keeps
/// these in memory).
pub(crate) const MAX_EXTENSION_BYTES: u64 = 1 << 20;

/// Decompressed bytes allowed per member on top of `max_image_bytes`:
/// header, PAX header and padding of an ordinary member fit easily.
pub(crate) const STREAM_OVERHEAD_PER_ENTRY: u64 = 8 * 1024;

/// Fixed slack on top of that, larger than what the reader can run ahead
/// of the staging thread, so data that is written always hits
/// `max_image_bytes` first.
pub(crate) const STREAM_SLACK: u64 = 16 << 20;

const BLOCK: usize = 512;

/// Why the guard stopped the stream. Travels inside an `io::Error` through
/// the tar parser and is recovered with [`find_violation`].
#[derive(Debug)]
pub(crate) enum Violation {
    /// The stream ended before the end-of-archive marker.
    Truncated { path: Option<String> },
    /// Decompressed bytes exceeded the budget.
    StreamTooLarge { path: Option<String>, limit: u64 },
    /// An extension header body is larger than [`MAX_EXTENSION_BYTES`].
    ExtensionTooLarge { path: Option<String>, size: u64 },
    /// A member type the unpacker refuses before parsing (GNU sparse).
    Unsupported {
        path: Option<String>,
        what: &'static str,
    },
    /// Header checksum, numeric field or PAX record is malformed.
    Malformed {
        path: Option<String>,
        what: &'static str,
    },
    /// The blob reader or the decompressor failed; the cause is the source.
    Decompress(io::Error),
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Violation::Truncated { .. } => write!(f, "layer stream truncated"),
            Violation::StreamTooLarge { limit, .. } => {
                write!(f, "decompressed stream exceeds {limit} bytes")
            }
            Violation::ExtensionTooLarge { size, .. } => {
                write!(f, "extension header of {size} bytes")
            }
            Violation::Unsupported { what, .. } => write!(f, "unsupported member: {what}"),
            Violation::Malformed { what, .. } => write!(f, "malformed tar: {what}"),
            Violation::Decompress(_) => write!(f, "reading the layer stream failed"),
        }
    }
}

impl std::error::Error for Violation {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Violation::Decompress(e) => Some(e),
            _ => None,
        }
    }
}

impl Violation {
    fn into_io(self) -> io::Error {
        let kind = match &self {
            Violation::Truncated { .. } => io::ErrorKind::UnexpectedEof,
            Violation::Decompress(e) => e.kind(),
            _ => io::ErrorKind::InvalidData,
        };
        io::Error::new(kind, self)
    }
}

/// Finds a guard violation anywhere in an error's source chain (the parser
/// may wrap the error it got from the guard).
pub(crate) fn find_violation(err: &io::Error) -> Option<&Violation> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = err
        .get_ref()
        .map(|e| e as &(dyn std::error::Error + 'static));
    while let Some(e) = cur {
        if let Some(v) = e.downcast_ref::<Violation>() {
            return Some(v);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(inner) = io.get_ref() {
                cur = Some(inner as &(dyn std::error::Error + 'static));
                continue;
            }
        }
        cur = e.source();
    }
    None
}

#[derive(Debug)]
enum State {
    /// Collecting a 512-byte header; `len` bytes so far.
    Header { len: usize },
    /// Inside a member body.
    Body { remaining: u64, collect: Collect },
    /// Inside the padding after a body.
    Pad { remaining: u64 },
    /// After the end-of-archive marker: bytes are only counted.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collect {
    Nothing,
    Pax,
    LongName,
}

/// Byte budget shared by all layers of one image.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Budget {
    /// Decompressed bytes already consumed by earlier layers.
    pub consumed: u64,
    /// Members already seen in earlier layers.
    pub entries: u64,
    /// `Limits::max_image_bytes`.
    pub max_image_bytes: u64,
}

/// Decompressed bytes a chain of layers with `entries` members in all may
/// stream under `max_image_bytes` (what [`TarGuard`] enforces).
pub(crate) fn stream_allowance(max_image_bytes: u64, entries: u64) -> u64 {
    Budget {
        consumed: 0,
        entries,
        max_image_bytes,
    }
    .allowed()
}

impl Budget {
    fn allowed(&self) -> u64 {
        self.max_image_bytes
            .saturating_add(STREAM_SLACK)
            .saturating_add(STREAM_OVERHEAD_PER_ENTRY.saturating_mul(self.entries))
    }
}

/// See the module documentation.
pub(crate) struct TarGuard<R> {
    inner: R,
    state: State,
    header: [u8; BLOCK],
    ext: Vec<u8>,
    pending_pax_size: Option<u64>,
    pending_name: Option<String>,
    current_name: Option<String>,
    budget: Budget,
    end_seen: bool,
    /// Padding that follows the body being read.
    pad_after: u64,
}

impl<R> fmt::Debug for TarGuard<R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TarGuard")
            .field("state", &self.state)
            .field("budget", &self.budget)
            .field("end_seen", &self.end_seen)
            .finish_non_exhaustive()
    }
}

impl<R: AsyncRead + Unpin> TarGuard<R> {
    pub(crate) fn new(inner: R, budget: Budget) -> Self {
        TarGuard {
            inner,
            state: State::Header { len: 0 },
            header: [0; BLOCK],
            ext: Vec::new(),
            pending_pax_size: None,
            pending_name: None,
            current_name: None,
            budget,
            end_seen: false,
            pad_after: 0,
        }
    }

    /// The end-of-archive marker (a zero block) has been seen.
    pub(crate) fn end_seen(&self) -> bool {
        self.end_seen
    }

    /// Budget after this layer (consumed bytes and member count).
    pub(crate) fn budget(&self) -> Budget {
        self.budget
    }

    fn fail(&self, v: Violation) -> io::Error {
        v.into_io()
    }

    fn name(&self) -> Option<String> {
        self.current_name.clone()
    }

    /// Advances the structure over `data`, which the inner reader just
    /// produced.
    fn advance(&mut self, mut data: &[u8]) -> Result<(), Violation> {
        self.budget.consumed = self.budget.consumed.saturating_add(data.len() as u64);
        if self.budget.consumed > self.budget.allowed() {
            return Err(Violation::StreamTooLarge {
                path: self.name(),
                limit: self.budget.allowed(),
            });
        }
        while !data.is_empty() {
            match &mut self.state {
                State::End => return Ok(()),
                State::Header { len } => {
                    let take = (BLOCK - *len).min(data.len());
                    self.header[*len..*len + take].copy_from_slice(&data[..take]);
                    *len += take;
                    data = &data[take..];
                    if *len == BLOCK {
                        self.on_header()?;
                    }
                }
                State::Body { remaining, collect } => {
                    let take = (*remaining).min(data.len() as u64) as usize;
                    if *collect != Collect::Nothing {
                        self.ext.extend_from_slice(&data[..take]);
                    }
                    *remaining -= take as u64;
                    data = &data[take..];
                    if *remaining == 0 {
                        let collect = *collect;
                        self.on_body_end(collect)?;
                    }
                }
                State::Pad { remaining } => {
                    let take = (*remaining).min(data.len() as u64) as usize;
                    *remaining -= take as u64;
                    data = &data[take..];
                    if *remaining == 0 {
                        self.state = State::Header { len: 0 };
                    }
                }
            }
        }
        Ok(())
    }

    fn on_header(&mut self) -> Result<(), Violation> {
        let h = &self.header;
        if h.iter().all(|b| *b == 0) {
            self.end_seen = true;
            self.state = State::End;
            return Ok(());
        }
        let header_name = ustar_name(h);
        let malformed = |what| Violation::Malformed {
            path: Some(header_name.clone()),
            what,
        };
        let sum: u64 = h[..148]
            .iter()
            .chain(&h[156..])
            .map(|b| u64::from(*b))
            .sum::<u64>()
            + 8 * 32;
        let cksum = numeric(&h[148..156]).ok_or_else(|| malformed("header checksum field"))?;
        if sum != cksum {
            return Err(malformed("header checksum mismatch"));
        }
        let header_size = numeric(&h[124..136]).ok_or_else(|| malformed("header size field"))?;
        let is_ustar = &h[257..263] == b"ustar\0" && &h[263..265] == b"00";
        let typeflag = h[156];
        let ext_limit = |size: u64| {
            if size > MAX_EXTENSION_BYTES {
                Err(Violation::ExtensionTooLarge {
                    path: Some(header_name.clone()),
                    size,
                })
            } else {
                Ok(())
            }
        };
        let (size, collect) = match typeflag {
            b'x' | b'X' if is_ustar => {
                ext_limit(header_size)?;
                (header_size, Collect::Pax)
            }
            b'x' => return Err(malformed("PAX header on a non-ustar header")),
            b'g' => {
                ext_limit(header_size)?;
                // The parser hands a global header out as a member and
                // attaches (and thereby consumes) pending local records.
                self.pending_pax_size = None;
                self.pending_name = None;
                (header_size, Collect::Nothing)
            }
            b'L' => {
                ext_limit(header_size)?;
                (header_size, Collect::LongName)
            }
            b'K' => {
                ext_limit(header_size)?;
                (header_size, Collect::Nothing)
            }
            b'S' => {
                return Err(Violation::Unsupported {
                    path: Some(header_name),
                    what: "GNU sparse file",
                })
            }
            _ => {
                self.budget.entries = self.budget.entries.saturating_add(1);
                self.current_name = Some(self.pending_name.take().unwrap_or(header_name));
                let size = self.pending_pax_size.take().unwrap_or(header_size);
                (size, Collect::Nothing)
            }
        };
        self.ext.clear();
        self.enter_body(size, collect)
    }

    fn enter_body(&mut self, size: u64, collect: Collect) -> Result<(), Violation> {
        if size == 0 {
            self.pad_after = 0;
            self.state = State::Body {
                remaining: 0,
                collect,
            };
            return self.on_body_end(collect);
        }
        self.state = State::Body {
            remaining: size,
            collect,
        };
        self.pad_after = (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64;
        Ok(())
    }

    fn on_body_end(&mut self, collect: Collect) -> Result<(), Violation> {
        match collect {
            Collect::Nothing => {}
            Collect::Pax => {
                let records = std::mem::take(&mut self.ext);
                self.parse_pax(&records)?;
            }
            Collect::LongName => {
                let raw = std::mem::take(&mut self.ext);
                let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
                self.pending_name = Some(String::from_utf8_lossy(&raw[..end]).into_owned());
            }
        }
        let pad = std::mem::take(&mut self.pad_after);
        self.state = if pad == 0 {
            State::Header { len: 0 }
        } else {
            State::Pad { remaining: pad }
        };
        Ok(())
    }

    fn parse_pax(&mut self, mut data: &[u8]) -> Result<(), Violation> {
        let name = self.current_name.clone();
        let malformed = |what| Violation::Malformed {
            path: name.clone(),
            what,
        };
        while !data.is_empty() {
            let space = data
                .iter()
                .position(|b| *b == b' ')
                .ok_or_else(|| malformed("PAX record without length"))?;
            let len: usize = std::str::from_utf8(&data[..space])
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| malformed("PAX record length"))?;
            if len <= space + 1 || len > data.len() || data[len - 1] != b'\n' {
                return Err(malformed("PAX record length"));
            }
            let record = &data[space + 1..len - 1];
            let eq = record
                .iter()
                .position(|b| *b == b'=')
                .ok_or_else(|| malformed("PAX record without '='"))?;
            let (key, value) = (&record[..eq], &record[eq + 1..]);
            match key {
                b"size" => {
                    let size = std::str::from_utf8(value)
                        .ok()
                        .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                        .and_then(|s| s.parse::<u64>().ok())
                        .ok_or_else(|| malformed("PAX size record"))?;
                    self.pending_pax_size = Some(size);
                }
                b"path" => {
                    self.pending_name = Some(String::from_utf8_lossy(value).into_owned());
                }
                _ => {}
            }
            data = &data[len..];
        }
        Ok(())
    }
}

/// Parses a numeric header field the way the tar parser does: base-256 when
/// the high bit is set, otherwise octal text up to the first NUL, trimmed.
fn numeric(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        let tail = &field[field.len().saturating_sub(8)..];
        let mut v: u64 = 0;
        for (i, b) in tail.iter().enumerate() {
            let b = if i == 0 && field.len() == 8 {
                b ^ 0x80
            } else {
                *b
            };
            v = (v << 8) | u64::from(b);
        }
        if field.len() > 8 && field[1..field.len() - 8].iter().any(|b| *b != 0) {
            return None;
        }
        return Some(v);
    }
    let end = field.iter().position(|b| *b == 0).unwrap_or(field.len());
    let text = std::str::from_utf8(&field[..end]).ok()?;
    u64::from_str_radix(text.trim(), 8).ok()
}

/// The ustar `prefix/name` of a header, for error messages.
fn ustar_name(h: &[u8; BLOCK]) -> String {
    let cut = |f: &[u8]| {
        let end = f.iter().position(|b| *b == 0).unwrap_or(f.len());
        String::from_utf8_lossy(&f[..end]).into_owned()
    };
    let name = cut(&h[..100]);
    let is_ustar = &h[257..263] == b"ustar\0";
    if is_ustar {
        let prefix = cut(&h[345..500]);
        if !prefix.is_empty() {
            return format!("{prefix}/{name}");
        }
    }
    name
}

impl<R: AsyncRead + Unpin> AsyncRead for TarGuard<R> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => {
                if find_violation(&e).is_some() {
                    return Poll::Ready(Err(e));
                }
                Poll::Ready(Err(this.fail(Violation::Decompress(e))))
            }
            Poll::Ready(Ok(())) => {
                let new = &buf.filled()[before..];
                if new.is_empty() && buf.remaining() > 0 {
                    // End of the decompressed stream.
                    return match this.state {
                        State::End | State::Header { len: 0 } => Poll::Ready(Ok(())),
                        _ => {
                            Poll::Ready(Err(this.fail(Violation::Truncated { path: this.name() })))
                        }
                    };
                }
                match this.advance(new) {
                    Ok(()) => Poll::Ready(Ok(())),
                    Err(v) => Poll::Ready(Err(this.fail(v))),
                }
            }
        }
    }
}

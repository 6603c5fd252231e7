//! Framing: a big-endian `u32` length, then a postcard payload.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::{Decoder, Encoder};

use crate::MAX_FRAME_LEN;

/// A byte stream carrying length-delimited protocol frames.
pub type Framed<S> = tokio_util::codec::Framed<S, FrameCodec>;

const HEADER: usize = 4;

/// The frame codec: a big-endian `u32` payload length, then the payload.
///
/// Unlike `LengthDelimitedCodec`, it leaves the header in the buffer until
/// the whole frame has arrived, so at EOF any buffered byte means a
/// truncated frame, and an empty buffer a clean end between frames.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrameCodec;

/// The error inside the `io::Error` a [`FrameCodec`] returns for a length
/// prefix over [`MAX_FRAME_LEN`]; see [`is_frame_too_large`].
#[derive(Debug, thiserror::Error)]
#[error("frame of {len} bytes exceeds the limit of {max} bytes")]
pub struct FrameTooLarge {
    pub len: usize,
    pub max: usize,
}

/// The error inside the `io::Error` for a stream that ended mid-frame.
#[derive(Debug, thiserror::Error)]
#[error("stream ended inside a frame ({buffered} bytes of it received)")]
pub struct TruncatedFrame {
    pub buffered: usize,
}

/// Whether a framing error is an oversized length prefix.
pub fn is_frame_too_large(err: &std::io::Error) -> bool {
    err.get_ref()
        .is_some_and(|inner| inner.is::<FrameTooLarge>())
}

impl Decoder for FrameCodec {
    type Item = BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        if buf.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        if len > MAX_FRAME_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                FrameTooLarge {
                    len,
                    max: MAX_FRAME_LEN,
                },
            ));
        }
        if buf.len() < HEADER + len {
            // Reserve only what this (bounded) frame still needs.
            buf.reserve(HEADER + len - buf.len());
            return Ok(None);
        }
        buf.advance(HEADER);
        Ok(Some(buf.split_to(len)))
    }

    fn decode_eof(&mut self, buf: &mut BytesMut) -> Result<Option<BytesMut>, std::io::Error> {
        match self.decode(buf)? {
            Some(frame) => Ok(Some(frame)),
            None if buf.is_empty() => Ok(None),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                TruncatedFrame {
                    buffered: buf.len(),
                },
            )),
        }
    }
}

impl Encoder<Bytes> for FrameCodec {
    type Error = std::io::Error;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        if payload.len() > MAX_FRAME_LEN {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                FrameTooLarge {
                    len: payload.len(),
                    max: MAX_FRAME_LEN,
                },
            ));
        }
        dst.reserve(HEADER + payload.len());
        dst.put_u32(payload.len() as u32);
        dst.extend_from_slice(&payload);
        Ok(())
    }
}

/// Errors of encoding or decoding one frame's payload.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame payload is {len} bytes, over the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame payload could not be decoded")]
    Malformed(#[source] postcard::Error),
    #[error("message could not be encoded")]
    Encode(#[source] postcard::Error),
}

/// The frame codec both sides use: `u32` big-endian length, at most [`MAX_FRAME_LEN`].
pub fn codec() -> FrameCodec {
    FrameCodec
}

/// Encodes one message as a frame payload.
pub fn encode<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    let bytes = postcard::to_stdvec(msg).map_err(FrameError::Encode)?;
    if bytes.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: bytes.len(),
            max: MAX_FRAME_LEN,
        });
    }
    Ok(Bytes::from(bytes))
}

/// Decodes one frame payload. Never panics, whatever the bytes; trailing
/// bytes after a complete message are refused so garbage is not mistaken
/// for a valid message.
pub fn decode<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: payload.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let (msg, rest) = postcard::take_from_bytes(payload).map_err(FrameError::Malformed)?;
    if !rest.is_empty() {
        return Err(FrameError::Malformed(
            postcard::Error::DeserializeBadEncoding,
        ));
    }
    Ok(msg)
}

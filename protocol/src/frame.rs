//! Framing: a big-endian `u32` length, then a postcard payload.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

use crate::MAX_FRAME_LEN;

/// A byte stream carrying length-delimited protocol frames.
pub type Framed<S> = tokio_util::codec::Framed<S, LengthDelimitedCodec>;

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
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .big_endian()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
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

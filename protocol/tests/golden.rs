//! Golden-byte tests: pin the exact wire encoding of representative messages.
//!
//! IF THESE FAIL, YOU CHANGED THE WIRE FORMAT. postcard is not
//! self-describing: an enum variant travels as its index (a varint), a struct
//! as its fields in declaration order, integers as LEB128-style varints,
//! strings and vectors as a varint length then the items, `Option` as a
//! 0/1 tag. Reordering, removing or inserting a variant or field silently
//! changes what an older peer reads. Append new variants and fields at the
//! end instead, or, when an old peer could misread the new bytes, bump
//! `PROTOCOL_VERSION` and then update these bytes on purpose.

use std::fmt::Debug;

use banger_protocol::{
    codec, decode, encode, ActorInfo, ActorStatus, ClientMessage, ErrorData, ErrorKind, Event,
    EventKind, Hello, Progress, Request, Response, ServerHello, ServerMessage, MAX_FRAME_LEN,
    PROTOCOL_VERSION,
};
use bytes::BytesMut;
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::Encoder;

/// Asserts `value` encodes to exactly `expected` and that `expected` decodes
/// back to `value`.
fn assert_golden<T>(value: &T, expected: &[u8])
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    let bytes = encode(value).expect("encode");
    assert_eq!(
        &bytes[..],
        expected,
        "wire bytes of {value:?} changed (actual {:?}): see the comment at the top of this file",
        &bytes[..]
    );
    let back: T = decode(expected).expect("golden bytes must decode");
    assert_eq!(&back, value, "golden bytes decode to a different value");
}

#[test]
fn constants() {
    assert_eq!(PROTOCOL_VERSION, 1);
    assert_eq!(MAX_FRAME_LEN, 4 * 1024 * 1024);
}

#[test]
fn client_hello() {
    let msg = ClientMessage::Hello(Hello {
        protocol_version: 1,
        client_version: "0.1.0".into(),
        features: vec!["a".into()],
    });
    #[rustfmt::skip]
    let expected = [
        0x00,                               // ClientMessage::Hello
        0x01,                               // protocol_version = 1
        0x05, b'0', b'.', b'1', b'.', b'0', // client_version = "0.1.0"
        0x01, 0x01, b'a',                   // features = ["a"]
    ];
    assert_golden(&msg, &expected);
}

#[test]
fn request_ping() {
    let msg = ClientMessage::Request {
        id: 7,
        request: Request::Ping,
    };
    #[rustfmt::skip]
    let expected = [
        0x01, // ClientMessage::Request
        0x07, // id = 7
        0x00, // Request::Ping
    ];
    assert_golden(&msg, &expected);
}

#[test]
fn request_debug_kill_actor_with_two_byte_varint_id() {
    let msg = ClientMessage::Request {
        id: 300,
        request: Request::DebugKillActor {
            name: "store".into(),
        },
    };
    #[rustfmt::skip]
    let expected = [
        0x01,                                 // ClientMessage::Request
        0xAC, 0x02,                           // id = 300 = 0b10_0101100: 0x2C|0x80, then 2
        0x06,                                 // Request::DebugKillActor
        0x05, b's', b't', b'o', b'r', b'e',   // name = "store"
    ];
    assert_golden(&msg, &expected);
}

#[test]
fn request_debug_progress() {
    let msg = ClientMessage::Request {
        id: 1,
        request: Request::DebugProgress {
            steps: 3,
            interval_ms: 10,
        },
    };
    #[rustfmt::skip]
    let expected = [
        0x01, // ClientMessage::Request
        0x01, // id = 1
        0x09, // Request::DebugProgress
        0x03, // steps = 3
        0x0A, // interval_ms = 10
    ];
    assert_golden(&msg, &expected);
}

#[test]
fn cancel() {
    #[rustfmt::skip]
    let expected = [
        0x02, // ClientMessage::Cancel
        0x07, // id = 7
    ];
    assert_golden(&ClientMessage::Cancel { id: 7 }, &expected);
}

#[test]
fn server_hello() {
    let msg = ServerMessage::Hello(ServerHello {
        protocol_version: 1,
        daemon_version: "0.1.0".into(),
        features: vec!["cancel".into()],
        pid: 4242,
    });
    #[rustfmt::skip]
    let expected = [
        0x00,                                             // ServerMessage::Hello
        0x01,                                             // protocol_version = 1
        0x05, b'0', b'.', b'1', b'.', b'0',               // daemon_version
        0x01, 0x06, b'c', b'a', b'n', b'c', b'e', b'l',   // features = ["cancel"]
        0x92, 0x21,                                       // pid = 4242 = 33*128 + 18
    ];
    assert_golden(&msg, &expected);
}

#[test]
fn progress_all_fields() {
    let msg = ServerMessage::Progress {
        id: 9,
        progress: Progress {
            stage: "boot".into(),
            detail: "step 2/3".into(),
            bytes_done: Some(128),
            bytes_total: Some(4096),
            elapsed_ms: 1500,
        },
    };
    #[rustfmt::skip]
    let expected = [
        0x01,                                                 // ServerMessage::Progress
        0x09,                                                 // id = 9
        0x04, b'b', b'o', b'o', b't',                         // stage
        0x08, b's', b't', b'e', b'p', b' ', b'2', b'/', b'3', // detail
        0x01, 0x80, 0x01,                                     // bytes_done = Some(128)
        0x01, 0x80, 0x20,                                     // bytes_total = Some(4096 = 32*128)
        0xDC, 0x0B,                                           // elapsed_ms = 1500 = 11*128 + 92
    ];
    assert_golden(&msg, &expected);
}

#[test]
fn reply_ok_actors() {
    let msg = ServerMessage::Reply {
        id: 2,
        result: Ok(Response::Actors(vec![ActorInfo {
            name: "store".into(),
            id: "0.3".into(),
            status: ActorStatus::Running,
            parent: Some("supervisor".into()),
            restart_count: 1,
            uptime_ms: 65_000,
        }])),
    };
    #[rustfmt::skip]
    let expected = [
        0x02,                                   // ServerMessage::Reply
        0x02,                                   // id = 2
        0x00,                                   // Ok
        0x05,                                   // Response::Actors
        0x01,                                   // one ActorInfo
        0x05, b's', b't', b'o', b'r', b'e',     // name
        0x03, b'0', b'.', b'3',                 // id
        0x00,                                   // status = Running
        0x01, 0x0A,                             // parent = Some(10 bytes)
        b's', b'u', b'p', b'e', b'r', b'v', b'i', b's', b'o', b'r',
        0x01,                                   // restart_count = 1
        0xE8, 0xFB, 0x03,                       // uptime_ms = 65000 = 3*16384 + 123*128 + 104
    ];
    assert_golden(&msg, &expected);
}

#[test]
fn reply_err_not_found() {
    let msg = ServerMessage::Reply {
        id: 3,
        result: Err(ErrorData {
            kind: ErrorKind::NotFound,
            message: "no actor x".into(),
            causes: vec!["lookup".into()],
            hint: Some("see debug actors".into()),
        }),
    };
    #[rustfmt::skip]
    let expected = [
        0x02,                                                       // ServerMessage::Reply
        0x03,                                                       // id = 3
        0x01,                                                       // Err
        0x02,                                                       // kind = NotFound
        0x0A, b'n', b'o', b' ', b'a', b'c', b't', b'o', b'r', b' ', b'x', // message
        0x01, 0x06, b'l', b'o', b'o', b'k', b'u', b'p',             // causes = ["lookup"]
        0x01, 0x10,                                                 // hint = Some(16 bytes)
        b's', b'e', b'e', b' ', b'd', b'e', b'b', b'u', b'g', b' ',
        b'a', b'c', b't', b'o', b'r', b's',
    ];
    assert_golden(&msg, &expected);
}

#[test]
fn event_actor_restarted() {
    let msg = ServerMessage::Event {
        id: 4,
        event: Event {
            seq: 130,
            at_unix_ms: 1_700_000_000_000,
            kind: EventKind::ActorRestarted {
                name: "router".into(),
                restart_count: 2,
            },
        },
    };
    #[rustfmt::skip]
    let expected = [
        0x03,                                   // ServerMessage::Event
        0x04,                                   // id = 4
        0x82, 0x01,                             // seq = 130
        0x80, 0xD0, 0x95, 0xFF, 0xBC, 0x31,     // at_unix_ms = 1_700_000_000_000
        0x03,                                   // EventKind::ActorRestarted
        0x06, b'r', b'o', b'u', b't', b'e', b'r', // name
        0x02,                                   // restart_count = 2
    ];
    assert_golden(&msg, &expected);
}

#[test]
fn connection_error_version_mismatch() {
    let msg = ServerMessage::Error(ErrorData::new(ErrorKind::VersionMismatch, "v"));
    #[rustfmt::skip]
    let expected = [
        0x04,       // ServerMessage::Error
        0x09,       // kind = VersionMismatch
        0x01, b'v', // message
        0x00,       // causes = []
        0x00,       // hint = None
    ];
    assert_golden(&msg, &expected);
}

/// Every `ErrorKind` keeps its index: clients branch on these.
#[test]
fn error_kind_indices() {
    let kinds = [
        ErrorKind::Internal,
        ErrorKind::InvalidRequest,
        ErrorKind::NotFound,
        ErrorKind::AlreadyExists,
        ErrorKind::InvalidState,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::Cancelled,
        ErrorKind::PermissionDenied,
        ErrorKind::VersionMismatch,
        ErrorKind::FrameTooLarge,
        ErrorKind::MalformedFrame,
        ErrorKind::ShuttingDown,
    ];
    for (index, kind) in kinds.into_iter().enumerate() {
        let index = u8::try_from(index).expect("fits a one-byte varint");
        assert_golden(&kind, &[index]);
    }
}

/// Every `Request` variant keeps its index (unit variants, or the tag byte
/// followed by the fields).
#[test]
fn request_indices() {
    assert_golden(&Request::Ping, &[0]);
    assert_golden(&Request::Version, &[1]);
    assert_golden(&Request::Status, &[2]);
    assert_golden(&Request::Shutdown, &[3]);
    assert_golden(&Request::ConfigShow, &[4]);
    assert_golden(&Request::DebugActors, &[5]);
    assert_golden(
        &Request::DebugKillActor {
            name: String::new(),
        },
        &[6, 0],
    );
    assert_golden(&Request::SubscribeEvents { since: None }, &[7, 0]);
    assert_golden(&Request::SubscribeEvents { since: Some(5) }, &[7, 1, 5]);
    assert_golden(&Request::Doctor, &[8]);
    assert_golden(
        &Request::DebugProgress {
            steps: 0,
            interval_ms: 0,
        },
        &[9, 0, 0],
    );
}

/// The frame header: a big-endian `u32` length before the payload.
#[test]
fn frame_header_is_big_endian_u32() {
    let payload = encode(&ClientMessage::Request {
        id: 7,
        request: Request::Ping,
    })
    .expect("encode");
    let mut out = BytesMut::new();
    codec().encode(payload, &mut out).expect("frame");
    assert_eq!(&out[..], &[0x00, 0x00, 0x00, 0x03, 0x01, 0x07, 0x00]);
}

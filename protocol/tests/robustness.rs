//! Robustness of decoding and framing against hostile or broken input: no
//! byte sequence may panic the decoder, truncation is always detected, and
//! the frame codec refuses oversized frames without allocating for them and
//! tells a truncated frame from a clean end of stream.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use banger_protocol::{
    codec, decode, encode, ActorInfo, ActorStatus, ClientMessage, ErrorData, ErrorKind, Event,
    EventKind, FrameError, Hello, Progress, Request, Response, ServerHello, ServerMessage,
    MAX_FRAME_LEN,
};
use bytes::Bytes;
use futures::StreamExt;
use proptest::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio_util::codec::FramedRead;

// ---------------------------------------------------------------------------
// An allocator that counts allocations of at least MAX_FRAME_LEN bytes, so the
// oversized-frame test can prove the codec refused the frame *before*
// reserving a buffer for it. Nothing else in this binary allocates that much
// (serde caps speculative pre-allocation at 1 MiB).

struct CountingAlloc;

static HUGE_ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() >= MAX_FRAME_LEN {
            HUGE_ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: forwarded contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size >= MAX_FRAME_LEN {
            HUGE_ALLOCS.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: forwarded contract.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// Strategies for valid messages.

fn text() -> impl Strategy<Value = String> {
    "[a-z0-9 ./é-]{0,24}"
}

fn error_kind() -> impl Strategy<Value = ErrorKind> {
    prop::sample::select(vec![
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
    ])
}

fn error_data() -> impl Strategy<Value = ErrorData> {
    (
        error_kind(),
        text(),
        prop::collection::vec(text(), 0..3),
        prop::option::of(text()),
    )
        .prop_map(|(kind, message, causes, hint)| ErrorData {
            kind,
            message,
            causes,
            hint,
        })
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        Just(Request::Ping),
        Just(Request::Version),
        Just(Request::Status),
        Just(Request::Shutdown),
        Just(Request::ConfigShow),
        Just(Request::DebugActors),
        text().prop_map(|name| Request::DebugKillActor { name }),
        prop::option::of(any::<u64>()).prop_map(|since| Request::SubscribeEvents { since }),
        Just(Request::Doctor),
        (any::<u32>(), any::<u64>())
            .prop_map(|(steps, interval_ms)| Request::DebugProgress { steps, interval_ms }),
    ]
}

fn client_message() -> impl Strategy<Value = ClientMessage> {
    prop_oneof![
        (any::<u32>(), text(), prop::collection::vec(text(), 0..4)).prop_map(
            |(protocol_version, client_version, features)| ClientMessage::Hello(Hello {
                protocol_version,
                client_version,
                features,
            })
        ),
        (any::<u64>(), request()).prop_map(|(id, request)| ClientMessage::Request { id, request }),
        any::<u64>().prop_map(|id| ClientMessage::Cancel { id }),
    ]
}

fn actor_info() -> impl Strategy<Value = ActorInfo> {
    (
        text(),
        text(),
        prop::sample::select(vec![
            ActorStatus::Running,
            ActorStatus::Restarting,
            ActorStatus::Stopped,
            ActorStatus::Escalated,
        ]),
        prop::option::of(text()),
        any::<u32>(),
        any::<u64>(),
    )
        .prop_map(
            |(name, id, status, parent, restart_count, uptime_ms)| ActorInfo {
                name,
                id,
                status,
                parent,
                restart_count,
                uptime_ms,
            },
        )
}

fn response() -> impl Strategy<Value = Response> {
    prop_oneof![
        Just(Response::Pong),
        Just(Response::ShuttingDown),
        Just(Response::Done),
        Just(Response::SubscriptionEnded),
        prop::collection::vec(actor_info(), 0..4).prop_map(Response::Actors),
        (text(), text()).prop_map(|(name, id)| Response::ActorKilled { name, id }),
    ]
}

fn event_kind() -> impl Strategy<Value = EventKind> {
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(pid, version)| EventKind::DaemonStarted { pid, version }),
        Just(EventKind::DaemonStopping),
        text().prop_map(|name| EventKind::ActorStarted { name }),
        (text(), any::<u32>()).prop_map(|(name, restart_count)| EventKind::ActorRestarted {
            name,
            restart_count
        }),
        (text(), text()).prop_map(|(name, reason)| EventKind::ActorFailed { name, reason }),
        (text(), any::<u32>(), any::<u64>()).prop_map(|(name, restarts, window_ms)| {
            EventKind::RestartIntensityExceeded {
                name,
                restarts,
                window_ms,
            }
        }),
    ]
}

fn server_message() -> impl Strategy<Value = ServerMessage> {
    prop_oneof![
        (
            any::<u32>(),
            text(),
            prop::collection::vec(text(), 0..4),
            any::<u32>()
        )
            .prop_map(|(protocol_version, daemon_version, features, pid)| {
                ServerMessage::Hello(ServerHello {
                    protocol_version,
                    daemon_version,
                    features,
                    pid,
                })
            }),
        (
            any::<u64>(),
            text(),
            text(),
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u64>()),
            any::<u64>()
        )
            .prop_map(|(id, stage, detail, bytes_done, bytes_total, elapsed_ms)| {
                ServerMessage::Progress {
                    id,
                    progress: Progress {
                        stage,
                        detail,
                        bytes_done,
                        bytes_total,
                        elapsed_ms,
                    },
                }
            }),
        (any::<u64>(), response()).prop_map(|(id, r)| ServerMessage::Reply { id, result: Ok(r) }),
        (any::<u64>(), error_data())
            .prop_map(|(id, e)| ServerMessage::Reply { id, result: Err(e) }),
        (any::<u64>(), any::<u64>(), any::<u64>(), event_kind()).prop_map(
            |(id, seq, at_unix_ms, kind)| ServerMessage::Event {
                id,
                event: Event {
                    seq,
                    at_unix_ms,
                    kind
                },
            }
        ),
        error_data().prop_map(ServerMessage::Error),
    ]
}

// ---------------------------------------------------------------------------
// Decoding.

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2048))]

    /// Arbitrary bytes may decode or not, but never panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..4096)) {
        let _ = decode::<ClientMessage>(&bytes);
        let _ = decode::<ServerMessage>(&bytes);
    }

    /// Bytes that start with a valid variant tag reach deeper into the
    /// decoder than uniformly random ones.
    #[test]
    fn tagged_garbage_never_panics(
        tag in 0u8..6,
        rest in prop::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = vec![tag];
        bytes.extend_from_slice(&rest);
        let _ = decode::<ClientMessage>(&bytes);
        let _ = decode::<ServerMessage>(&bytes);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn client_messages_round_trip(msg in client_message()) {
        let bytes = encode(&msg).expect("encode");
        prop_assert_eq!(decode::<ClientMessage>(&bytes).expect("decode"), msg);
    }

    #[test]
    fn server_messages_round_trip(msg in server_message()) {
        let bytes = encode(&msg).expect("encode");
        prop_assert_eq!(decode::<ServerMessage>(&bytes).expect("decode"), msg);
    }

    /// Every strict prefix of a valid message is refused: postcard reads
    /// fields in a fixed order and a varint's continuation bit or a length
    /// prefix always asks for the missing bytes, so a prefix can never be
    /// a complete message.
    #[test]
    fn client_message_prefixes_are_refused(msg in client_message()) {
        let bytes = encode(&msg).expect("encode");
        for len in 0..bytes.len() {
            let res = decode::<ClientMessage>(&bytes[..len]);
            prop_assert!(
                matches!(res, Err(FrameError::Malformed(_))),
                "prefix {:?} of {:?} decoded as {:?}", &bytes[..len], msg, res
            );
        }
    }

    #[test]
    fn server_message_prefixes_are_refused(msg in server_message()) {
        let bytes = encode(&msg).expect("encode");
        for len in 0..bytes.len() {
            let res = decode::<ServerMessage>(&bytes[..len]);
            prop_assert!(
                matches!(res, Err(FrameError::Malformed(_))),
                "prefix {:?} of {:?} decoded as {:?}", &bytes[..len], msg, res
            );
        }
    }

    /// A valid message followed by anything is refused (no silent garbage).
    #[test]
    fn trailing_bytes_are_refused(
        msg in client_message(),
        extra in prop::collection::vec(any::<u8>(), 1..16),
    ) {
        let mut bytes = encode(&msg).expect("encode").to_vec();
        bytes.extend_from_slice(&extra);
        prop_assert!(decode::<ClientMessage>(&bytes).is_err());
    }

    /// Corrupted valid messages never panic; whatever still decodes is a
    /// well-formed value that round-trips.
    #[test]
    fn flipped_client_messages_never_panic(
        msg in client_message(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let mut bytes = encode(&msg).expect("encode").to_vec();
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        if let Ok(decoded) = decode::<ClientMessage>(&bytes) {
            let again = encode(&decoded).expect("re-encode");
            prop_assert_eq!(decode::<ClientMessage>(&again).expect("re-decode"), decoded);
        }
    }

    #[test]
    fn flipped_server_messages_never_panic(
        msg in server_message(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..4),
    ) {
        let mut bytes = encode(&msg).expect("encode").to_vec();
        for (at, mask) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= mask;
        }
        if let Ok(decoded) = decode::<ServerMessage>(&bytes) {
            let again = encode(&decoded).expect("re-encode");
            prop_assert_eq!(decode::<ServerMessage>(&again).expect("re-decode"), decoded);
        }
    }
}

#[test]
fn decode_refuses_payload_over_the_limit() {
    let payload = vec![0u8; MAX_FRAME_LEN + 1];
    assert!(matches!(
        decode::<ClientMessage>(&payload),
        Err(FrameError::TooLarge { len, max }) if len == MAX_FRAME_LEN + 1 && max == MAX_FRAME_LEN
    ));
}

// ---------------------------------------------------------------------------
// Framing.

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// `payload` framed with the real codec header.
fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(payload.len())
        .expect("u32")
        .to_be_bytes()
        .to_vec();
    out.extend_from_slice(payload);
    out
}

/// Everything a `FramedRead` with the protocol codec yields for `input`.
async fn read_all(input: &[u8]) -> Vec<std::io::Result<Bytes>> {
    let mut reader = FramedRead::new(input, codec());
    let mut out = Vec::new();
    while let Some(item) = reader.next().await {
        let stop = item.is_err();
        out.push(item.map(|b| b.freeze()));
        if stop {
            break;
        }
    }
    out
}

fn is_too_large(err: &std::io::Error) -> bool {
    banger_protocol::is_frame_too_large(err)
}

#[test]
fn oversized_length_prefix_is_an_error_without_allocating_it() {
    runtime().block_on(async {
        let before = HUGE_ALLOCS.load(Ordering::SeqCst);
        for len in [MAX_FRAME_LEN as u32 + 1, u32::MAX] {
            // Only the header: a codec that trusted it would reserve `len` bytes.
            let input = len.to_be_bytes();
            let items = read_all(&input).await;
            assert_eq!(items.len(), 1, "one error then the end, got {items:?}");
            let err = items[0]
                .as_ref()
                .expect_err("oversized frame must be an error");
            assert!(
                is_too_large(err),
                "expected the frame-length error, got {err:?}"
            );
        }
        // A valid frame before the oversized one is still delivered.
        let mut input = frame(&encode(&ClientMessage::Cancel { id: 1 }).expect("encode"));
        input.extend_from_slice(&(MAX_FRAME_LEN as u32 + 1).to_be_bytes());
        let items = read_all(&input).await;
        assert_eq!(items.len(), 2);
        assert_eq!(&items[0].as_ref().expect("first frame")[..], &[0x02, 0x01]);
        assert!(is_too_large(items[1].as_ref().expect_err("then the error")));
        assert_eq!(
            HUGE_ALLOCS.load(Ordering::SeqCst),
            before,
            "the codec allocated a buffer for a frame it refuses"
        );

        // The boundary: exactly MAX_FRAME_LEN is accepted (and this proves
        // the counter sees big allocations at all).
        let big = frame(&vec![0u8; MAX_FRAME_LEN]);
        assert!(
            HUGE_ALLOCS.load(Ordering::SeqCst) > before,
            "allocation counter is not live"
        );
        let items = read_all(&big).await;
        assert_eq!(items.len(), 1);
        assert_eq!(
            items[0].as_ref().expect("max-size frame").len(),
            MAX_FRAME_LEN
        );
    });
}

#[test]
fn clean_eof_between_frames_ends_the_stream() {
    runtime().block_on(async {
        assert!(
            read_all(&[]).await.is_empty(),
            "empty input: no frames, no error"
        );

        let a = encode(&ClientMessage::Request {
            id: 1,
            request: Request::Ping,
        })
        .expect("a");
        let b = encode(&ClientMessage::Cancel { id: 1 }).expect("b");
        let mut input = frame(&a);
        input.extend_from_slice(&frame(&b));
        let items = read_all(&input).await;
        assert_eq!(items.len(), 2, "two frames then None, got {items:?}");
        assert_eq!(items[0].as_ref().expect("a"), &a);
        assert_eq!(items[1].as_ref().expect("b"), &b);
    });
}

#[test]
fn truncated_frame_then_eof_is_an_error() {
    runtime().block_on(async {
        let payload = encode(&ClientMessage::Request {
            id: 1,
            request: Request::DebugKillActor {
                name: "store".into(),
            },
        })
        .expect("encode");
        let whole = frame(&payload);
        // Cut inside the header and inside the payload (the cut right after
        // the header has its own test below).
        for cut in [1, 3, 5, whole.len() - 1] {
            let mut input = frame(&encode(&ClientMessage::Cancel { id: 9 }).expect("encode"));
            input.extend_from_slice(&whole[..cut]);
            let items = read_all(&input).await;
            assert_eq!(
                items.len(),
                2,
                "cut at {cut}: one frame then an error, got {items:?}"
            );
            assert!(
                items[0].is_ok(),
                "cut at {cut}: the complete frame is delivered"
            );
            let err = items[1]
                .as_ref()
                .expect_err("truncation must be an error, not None");
            assert!(!is_too_large(err), "cut at {cut}: wrong error {err:?}");
        }
    });
}

/// A complete header announcing a non-empty payload, then EOF, is a
/// truncated frame too (tokio-util's `LengthDelimitedCodec` gets this wrong:
/// it consumes the header into its state, so the protocol has its own codec).
#[test]
fn header_only_then_eof_is_an_error() {
    runtime().block_on(async {
        let items = read_all(&7u32.to_be_bytes()).await;
        assert_eq!(
            items.len(),
            1,
            "a header for 7 bytes then EOF must yield an error, got {items:?}"
        );
        assert!(items[0].is_err(), "got {items:?}");
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Frames split across arbitrary read boundaries are reassembled exactly.
    #[test]
    fn frames_survive_arbitrary_read_boundaries(
        msgs in prop::collection::vec(server_message(), 1..8),
        pipe_size in 1usize..32,
    ) {
        let payloads: Vec<Bytes> = msgs.iter().map(|m| encode(m).expect("encode")).collect();
        let mut input = Vec::new();
        for p in &payloads {
            input.extend_from_slice(&frame(p));
        }
        let got = runtime().block_on(async move {
            let (mut tx, rx) = tokio::io::duplex(pipe_size);
            let writer = tokio::spawn(async move {
                tx.write_all(&input).await.expect("write");
            });
            let mut reader = FramedRead::new(rx, codec());
            let mut got = Vec::new();
            while let Some(item) = reader.next().await {
                got.push(decode::<ServerMessage>(&item.expect("frame")).expect("decode"));
            }
            writer.await.expect("writer");
            got
        });
        prop_assert_eq!(got, msgs);
    }
}

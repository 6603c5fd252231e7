//! Hostile and broken input on the socket: malformed, oversized and
//! truncated frames, requests before the handshake, a wrong protocol
//! version, a client vanishing mid-request. Each case checks what the
//! offending connection sees, then that a fresh client still gets a Pong.

use std::time::{Duration, Instant};

use banger_protocol::{
    encode, ClientMessage, ErrorKind, Hello, Request, Response, ServerMessage, MAX_FRAME_LEN,
};
use banger_tests::{actors, all_running, error_chain, wait, RawConnection, TestDaemon};

const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// A fresh client completes a handshake and gets a Pong.
async fn assert_serving(d: &TestDaemon) {
    let mut client = d.client().await;
    match tokio::time::timeout(READ_TIMEOUT, client.request(Request::Ping)).await {
        Ok(Ok(Response::Pong)) => {}
        Ok(Ok(other)) => panic!("Ping answered {other:?}"),
        Ok(Err(e)) => panic!("Ping failed: {}", error_chain(&e)),
        Err(_) => panic!("Ping not answered within {READ_TIMEOUT:?}"),
    }
}

/// Reads the next frame, which must be a connection error of `kind`.
async fn expect_error(conn: &mut RawConnection, kind: ErrorKind) {
    match conn.recv_message(READ_TIMEOUT).await {
        ServerMessage::Error(e) => {
            assert_eq!(e.kind, kind, "error kind ({e:?})");
            assert!(!e.message.is_empty(), "the error says what went wrong");
        }
        other => panic!("expected a {kind:?} error, got {other:?}"),
    }
}

async fn expect_pong(conn: &mut RawConnection, id: u64) {
    conn.send(&ClientMessage::Request {
        id,
        request: Request::Ping,
    })
    .await;
    match conn.recv_message(READ_TIMEOUT).await {
        ServerMessage::Reply {
            id: rid,
            result: Ok(Response::Pong),
        } if rid == id => {}
        other => panic!("expected Pong for request {id}, got {other:?}"),
    }
}

#[tokio::test]
async fn handshake_then_ping_on_a_raw_connection() {
    let d = TestDaemon::start();
    let mut conn = RawConnection::connect(&d.socket()).await;
    conn.send(&ClientMessage::Hello(Hello::current())).await;
    match conn.recv_message(READ_TIMEOUT).await {
        ServerMessage::Hello(h) => {
            assert_eq!(h.protocol_version, banger_protocol::PROTOCOL_VERSION);
            assert_eq!(h.pid, d.pid());
        }
        other => panic!("expected the server hello, got {other:?}"),
    }
    expect_pong(&mut conn, 1).await;
}

#[tokio::test]
async fn malformed_payload_after_handshake_keeps_the_connection() {
    let d = TestDaemon::start();
    let mut conn = RawConnection::connect_handshaken(&d.socket()).await;
    // 0xFF is no ClientMessage variant; an empty payload is no message at all.
    for payload in [&[0xFF, 0xFF, 0xFF][..], &[], &[0x01]] {
        conn.send_payload(payload).await;
        expect_error(&mut conn, ErrorKind::MalformedFrame).await;
    }
    // A valid message with trailing garbage is malformed too.
    let mut trailing = encode(&ClientMessage::Request {
        id: 1,
        request: Request::Ping,
    })
    .expect("encode")
    .to_vec();
    trailing.push(0);
    conn.send_payload(&trailing).await;
    expect_error(&mut conn, ErrorKind::MalformedFrame).await;

    expect_pong(&mut conn, 2).await;
    assert_serving(&d).await;
}

#[tokio::test]
async fn oversized_frame_is_refused_and_closes() {
    let d = TestDaemon::start();
    let mut conn = RawConnection::connect_handshaken(&d.socket()).await;
    let len = u32::try_from(MAX_FRAME_LEN + 1).expect("fits u32");
    conn.send_raw(&len.to_be_bytes()).await;
    // Some payload bytes follow, as a real sender would send.
    let _ = conn.try_send_raw(&[0u8; 1024]).await;
    expect_error(&mut conn, ErrorKind::FrameTooLarge).await;
    conn.expect_closed(READ_TIMEOUT).await;
    assert_serving(&d).await;
}

#[tokio::test]
async fn huge_length_prefix_is_refused_and_closes() {
    let d = TestDaemon::start();
    let mut conn = RawConnection::connect_handshaken(&d.socket()).await;
    conn.send_raw(&u32::MAX.to_be_bytes()).await;
    expect_error(&mut conn, ErrorKind::FrameTooLarge).await;
    conn.expect_closed(READ_TIMEOUT).await;
    assert_serving(&d).await;
}

#[tokio::test]
async fn truncated_frame_then_eof_closes() {
    let d = TestDaemon::start();
    let payload = encode(&ClientMessage::Request {
        id: 1,
        request: Request::DebugKillActor { name: "x".into() },
    })
    .expect("encode");
    let mut frame = u32::try_from(payload.len())
        .expect("u32")
        .to_be_bytes()
        .to_vec();
    frame.extend_from_slice(&payload);
    // Cut inside the header, right after it, and inside the payload.
    for cut in [2, 4, frame.len() - 1] {
        let mut conn = RawConnection::connect_handshaken(&d.socket()).await;
        conn.send_raw(&frame[..cut]).await;
        conn.shutdown_write().await;
        conn.expect_closed(READ_TIMEOUT).await;
    }
    assert_serving(&d).await;
    // The truncated kill request was never executed.
    let mut client = d.client().await;
    let list = actors(&mut client).await;
    assert!(
        all_running(&list) && list.iter().all(|a| a.restart_count == 0),
        "{list:?}"
    );
}

#[tokio::test]
async fn request_before_handshake_is_refused() {
    let d = TestDaemon::start();
    let mut conn = RawConnection::connect(&d.socket()).await;
    conn.send(&ClientMessage::Request {
        id: 1,
        request: Request::Ping,
    })
    .await;
    match conn.recv_message(READ_TIMEOUT).await {
        ServerMessage::Error(e) => assert!(!e.message.is_empty()),
        other => panic!("expected an error before the handshake, got {other:?}"),
    }
    conn.expect_closed(READ_TIMEOUT).await;
    assert_serving(&d).await;
}

#[tokio::test]
async fn cancel_before_handshake_is_refused() {
    let d = TestDaemon::start();
    let mut conn = RawConnection::connect(&d.socket()).await;
    conn.send(&ClientMessage::Cancel { id: 1 }).await;
    match conn.recv_message(READ_TIMEOUT).await {
        ServerMessage::Error(e) => assert!(!e.message.is_empty()),
        other => panic!("expected an error before the handshake, got {other:?}"),
    }
    conn.expect_closed(READ_TIMEOUT).await;
    assert_serving(&d).await;
}

#[tokio::test]
async fn garbage_before_handshake_is_refused() {
    let d = TestDaemon::start();
    let mut conn = RawConnection::connect(&d.socket()).await;
    conn.send_payload(b"GET / HTTP/1.1\r\n\r\n").await;
    match conn.recv_message(READ_TIMEOUT).await {
        ServerMessage::Error(e) => assert!(!e.message.is_empty()),
        other => panic!("expected an error before the handshake, got {other:?}"),
    }
    conn.expect_closed(READ_TIMEOUT).await;
    assert_serving(&d).await;
}

#[tokio::test]
async fn wrong_protocol_version_is_refused() {
    let d = TestDaemon::start();
    for version in [0, banger_protocol::PROTOCOL_VERSION + 1, u32::MAX] {
        let mut conn = RawConnection::connect(&d.socket()).await;
        let hello = Hello {
            protocol_version: version,
            client_version: "9.9.9".into(),
            features: vec![],
        };
        conn.send(&ClientMessage::Hello(hello)).await;
        expect_error(&mut conn, ErrorKind::VersionMismatch).await;
        conn.expect_closed(READ_TIMEOUT).await;
    }
    assert_serving(&d).await;
}

#[tokio::test]
async fn client_vanishing_mid_request_does_not_disturb_the_daemon() {
    let d = TestDaemon::start();
    for _ in 0..3 {
        let mut conn = RawConnection::connect_handshaken(&d.socket()).await;
        conn.send(&ClientMessage::Request {
            id: 1,
            request: Request::DebugProgress {
                steps: 1_000,
                interval_ms: 10,
            },
        })
        .await;
        match conn.recv_message(READ_TIMEOUT).await {
            ServerMessage::Progress { id: 1, .. } => {}
            other => panic!("expected progress, got {other:?}"),
        }
        drop(conn);
    }
    assert_serving(&d).await;

    // The abandoned connections go away: only the probing one remains.
    let mut client = d.client().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let open = match client.request(Request::Status).await {
            Ok(Response::Status(s)) => s.open_connections,
            other => panic!("Status answered {other:?}"),
        };
        if open == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} connections still open; only 1 should be"
        );
        tokio::time::sleep(wait::POLL_INTERVAL).await;
    }
    let list = actors(&mut client).await;
    assert!(all_running(&list), "{list:?}");
    assert!(
        list.iter().all(|a| a.restart_count == 0),
        "nothing restarted: {list:?}"
    );
}

#[tokio::test]
async fn cancel_ends_a_stream_with_cancelled() {
    let d = TestDaemon::start();
    let mut conn = RawConnection::connect_handshaken(&d.socket()).await;
    conn.send(&ClientMessage::Request {
        id: 5,
        request: Request::DebugProgress {
            steps: 10_000,
            interval_ms: 10,
        },
    })
    .await;
    match conn.recv_message(READ_TIMEOUT).await {
        ServerMessage::Progress { id: 5, .. } => {}
        other => panic!("expected progress, got {other:?}"),
    }
    conn.send(&ClientMessage::Cancel { id: 5 }).await;
    loop {
        match conn.recv_message(READ_TIMEOUT).await {
            ServerMessage::Progress { id: 5, .. } => {}
            ServerMessage::Reply {
                id: 5,
                result: Err(e),
            } => {
                assert_eq!(e.kind, ErrorKind::Cancelled, "{e:?}");
                break;
            }
            other => panic!("expected a Cancelled reply, got {other:?}"),
        }
    }
    // Cancelling an unknown id is harmless; the connection still works.
    conn.send(&ClientMessage::Cancel { id: 999 }).await;
    expect_pong(&mut conn, 6).await;
}

#[tokio::test]
async fn progress_stream_counts_steps_then_done() {
    let d = TestDaemon::start();
    let mut client = d.client().await;
    let mut steps = 0;
    let reply = client
        .request_with_progress(
            Request::DebugProgress {
                steps: 4,
                interval_ms: 5,
            },
            |_| steps += 1,
        )
        .await;
    assert!(matches!(reply, Ok(Response::Done)), "{reply:?}");
    assert_eq!(steps, 4);
}

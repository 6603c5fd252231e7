mod common;
use std::time::{Duration, Instant};
use banger_dns::Limits;
use common::*;
use hickory_proto::rr::RecordType;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tmp_perf() {
    let (server, _r) = start(config(Limits { client_rate: None, ..Limits::default() })).await;
    let addr = server.local_addr();
    let handle = std::thread::spawn(move || {
        let s = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut q = bytes(&query("web.vm.", RecordType::A));
        let mut buf = [0u8; 2048];
        let start = Instant::now();
        let mut got = 0u64;
        let mut sent = 0u64;
        // window of 64 outstanding
        while start.elapsed() < Duration::from_secs(3) {
            while sent - got < 64 { q[..2].copy_from_slice(&(sent as u16).to_be_bytes()); s.send_to(&q, addr).unwrap(); sent += 1; }
            match s.recv_from(&mut buf) { Ok(_) => got += 1, Err(_) => { got = sent; } }
        }
        (got as f64 / start.elapsed().as_secs_f64(), sent)
    });
    let (qps, sent) = handle.join().unwrap();
    eprintln!("TMPPERF qps={qps:.0} sent={sent} stats={:?}", server.stats());
}

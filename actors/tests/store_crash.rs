//! Crash test of the Store's durability contract: a child process writes
//! records through the Store actor and prints each key once the write is
//! acknowledged; the parent SIGKILLs it at a random moment, reopens the
//! database and checks that every acknowledged record is there, intact.
//! Repeated for many rounds on the same database, so earlier rounds'
//! records must survive later crashes too. Every other write is a
//! `PutAll` into two trees, which must be all or nothing even when it was
//! not acknowledged.
//!
//! `harness = false`: the same binary is the parent and, with `--child`,
//! the writer.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_actors::ask::ask_ref;
use banger_actors::store::{Store, StoreArgs, StoreMsg};
use banger_protocol::ErrorData;
use ractor::Actor;
use rand::Rng;

const ROUNDS: u32 = 25;
const TREE: &str = "crash";
/// The second tree of the `PutAll` writes (odd `i`).
const PAIRED: &str = "crash-paired";
const T: Duration = Duration::from_secs(10);

fn key(round: u32, i: u64) -> Vec<u8> {
    let mut k = round.to_be_bytes().to_vec();
    k.extend_from_slice(&i.to_be_bytes());
    k
}

fn value(round: u32, i: u64) -> Vec<u8> {
    // Varying sizes, some spanning several sled pages.
    let len = 16 + ((i * 7919 + u64::from(round) * 104_729) % 9000) as usize;
    let seed = format!("r{round}i{i};");
    seed.as_bytes().iter().copied().cycle().take(len).collect()
}

async fn child(dir: PathBuf, round: u32) {
    let (store, _) = Actor::spawn(None, Store, StoreArgs { path: dir })
        .await
        .expect("open store");
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let res: Result<(), ErrorData> = ask_ref(
            "store",
            &store,
            |reply| match i % 2 {
                0 => StoreMsg::Put {
                    tree: TREE.into(),
                    key: key(round, i),
                    value: value(round, i),
                    reply,
                },
                _ => StoreMsg::PutAll {
                    puts: vec![
                        (TREE.into(), key(round, i), value(round, i)),
                        (PAIRED.into(), key(round, i), value(round + 1, i)),
                    ],
                    reply,
                },
            },
            T,
        )
        .await
        .expect("store call");
        res.expect("put");
        writeln!(out, "{i}").expect("stdout");
        out.flush().expect("flush");
    }
}

fn run_round(exe: &Path, dir: &Path, round: u32) -> Vec<u64> {
    let mut child = Command::new(exe)
        .arg("--child")
        .arg(dir)
        .arg(round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(i) = line.trim().parse::<u64>() {
                if tx.send(i).is_err() {
                    break;
                }
            }
        }
    });
    // Wait for the first acknowledgement, then kill at a random moment.
    let mut acked = vec![rx
        .recv_timeout(Duration::from_secs(30))
        .expect("child never acknowledged a write")];
    let delay = Duration::from_millis(rand::thread_rng().gen_range(1..400));
    let until = Instant::now() + delay;
    while let Ok(i) = rx.recv_timeout(until.saturating_duration_since(Instant::now())) {
        acked.push(i);
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    child.wait().expect("wait");
    reader.join().expect("reader");
    acked.extend(rx.try_iter());
    acked
}

async fn get(
    store: &ractor::ActorRef<StoreMsg>,
    tree: &str,
    key: Vec<u8>,
) -> Result<Option<Vec<u8>>, String> {
    let got: Result<Option<Vec<u8>>, ErrorData> = ask_ref(
        "store",
        store,
        |reply| StoreMsg::Get {
            tree: tree.into(),
            key,
            reply,
        },
        T,
    )
    .await
    .map_err(|e| e.to_string())?;
    got.map_err(|e| e.to_string())
}

async fn verify(dir: &Path, expected: &[(u32, Vec<u64>)]) -> Result<usize, String> {
    let (store, handle) = Actor::spawn(
        None,
        Store,
        StoreArgs {
            path: dir.to_path_buf(),
        },
    )
    .await
    .map_err(|e| format!("database did not reopen cleanly: {e}"))?;
    let mut checked = 0;
    for (round, acks) in expected {
        for &i in acks {
            let got = get(&store, TREE, key(*round, i)).await?;
            if i % 2 == 1 {
                if get(&store, PAIRED, key(*round, i)).await? != Some(value(round + 1, i)) {
                    return Err(format!(
                        "round {round} record {i}: the acknowledged PutAll's second write is missing or corrupted"
                    ));
                }
            }
            match got {
                Some(v) if v == value(*round, i) => checked += 1,
                Some(_) => {
                    return Err(format!(
                        "round {round} record {i}: acknowledged value is corrupted"
                    ))
                }
                None => {
                    return Err(format!(
                        "round {round} record {i}: acknowledged write is missing"
                    ))
                }
            }
        }
    }
    // All or nothing, acknowledged or not: the odd keys of TREE are
    // exactly the keys of PAIRED.
    let scan = |tree: &'static str| {
        let store = store.clone();
        async move {
            let entries: Result<Vec<(Vec<u8>, Vec<u8>)>, ErrorData> = ask_ref(
                "store",
                &store,
                |reply| StoreMsg::Scan {
                    tree: tree.into(),
                    prefix: Vec::new(),
                    reply,
                },
                T,
            )
            .await
            .map_err(|e| e.to_string())?;
            entries
                .map(|e| e.into_iter().map(|(k, _)| k).collect::<Vec<_>>())
                .map_err(|e| e.to_string())
        }
    };
    let odd: Vec<Vec<u8>> = scan(TREE)
        .await?
        .into_iter()
        .filter(|k| k.last().is_some_and(|b| b % 2 == 1))
        .collect();
    let paired = scan(PAIRED).await?;
    if odd != paired {
        return Err(format!(
            "a PutAll was applied in part: {} odd keys in {TREE}, {} keys in {PAIRED}",
            odd.len(),
            paired.len()
        ));
    }
    store.stop(None);
    handle.await.map_err(|e| e.to_string())?;
    Ok(checked)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    if args.get(1).map(String::as_str) == Some("--child") {
        let dir = PathBuf::from(&args[2]);
        let round: u32 = args[3].parse().expect("round");
        rt.block_on(child(dir, round));
        return;
    }
    // Under `cargo test`, libtest-style filters may be passed: ignore them.
    let exe = std::env::current_exe().expect("current_exe");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("db");
    let mut expected: Vec<(u32, Vec<u64>)> = Vec::new();
    let mut failed = 0;
    for round in 0..ROUNDS {
        let acked = run_round(&exe, &dir, round);
        let n = acked.len();
        expected.push((round, acked));
        match rt.block_on(verify(&dir, &expected)) {
            Ok(checked) => println!(
                "round {round}: {n} acknowledged writes before SIGKILL; {checked} records verified"
            ),
            Err(e) => {
                println!("round {round}: FAILED: {e}");
                failed += 1;
                break;
            }
        }
    }
    println!(
        "test store_crash::acknowledged_writes_survive_sigkill ... {}",
        if failed == 0 { "ok" } else { "FAILED" }
    );
    println!("{} passed, {} failed", u32::from(failed == 0), failed);
    if failed > 0 {
        std::process::exit(1);
    }
}

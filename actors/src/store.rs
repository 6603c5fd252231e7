//! The Store actor: owns the sled database. Every durable record of the
//! daemon goes through it, as (tree, key, value) bytes; typed records are
//! postcard-encoded by their owners.
//!
//! Durability contract: a write is acknowledged only after sled has
//! flushed it to the file, so an acknowledged write survives the daemon
//! being killed at any moment (tested by `tests/crash.rs`). The flush is
//! awaited outside the mailbox (group commit): reads that come after a
//! write see it at once, and concurrent writers share one fsync.

use std::path::PathBuf;
use std::time::Duration;

use banger_protocol::{ErrorData, ErrorKind, StoreStats};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{de::DeserializeOwned, Serialize};
use tracing::{info, warn};

use crate::{ask::ask, names};

/// Errors of the store, as seen by callers.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database at {}", path.display())]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    #[error("database operation failed")]
    Db(#[from] sled::Error),
}

impl From<StoreError> for ErrorData {
    fn from(err: StoreError) -> Self {
        ErrorData::from_error(ErrorKind::Internal, &err)
            .with_hint("check free disk space and `banger daemon logs`")
    }
}

pub type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// One write of [`StoreMsg::PutAll`]: tree, key, value.
pub type TreePut = (String, Vec<u8>, Vec<u8>);

pub enum StoreMsg {
    /// Writes `value` at `key`; answered once the write is on disk.
    Put {
        tree: String,
        key: Vec<u8>,
        value: Vec<u8>,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    /// Writes and removes in one atomic, durable step.
    Batch {
        tree: String,
        puts: Entries,
        removes: Vec<Vec<u8>>,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    /// Writes entries of several trees in one atomic, durable step.
    PutAll {
        puts: Vec<TreePut>,
        reply: RpcReplyPort<Result<(), ErrorData>>,
    },
    Get {
        tree: String,
        key: Vec<u8>,
        reply: RpcReplyPort<Result<Option<Vec<u8>>, ErrorData>>,
    },
    /// Removes `key`; answers whether it existed, once the removal is on disk.
    Delete {
        tree: String,
        key: Vec<u8>,
        reply: RpcReplyPort<Result<bool, ErrorData>>,
    },
    /// Every entry of `tree` whose key starts with `prefix`, in key order.
    Scan {
        tree: String,
        prefix: Vec<u8>,
        reply: RpcReplyPort<Result<Entries, ErrorData>>,
    },
    /// The last `limit` entries of `tree` in key order.
    Tail {
        tree: String,
        limit: usize,
        reply: RpcReplyPort<Result<Entries, ErrorData>>,
    },
    Stats {
        reply: RpcReplyPort<Result<StoreStats, ErrorData>>,
    },
}

impl std::fmt::Debug for StoreMsg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            StoreMsg::Put { .. } => "Put",
            StoreMsg::Batch { .. } => "Batch",
            StoreMsg::PutAll { .. } => "PutAll",
            StoreMsg::Get { .. } => "Get",
            StoreMsg::Delete { .. } => "Delete",
            StoreMsg::Scan { .. } => "Scan",
            StoreMsg::Tail { .. } => "Tail",
            StoreMsg::Stats { .. } => "Stats",
        };
        f.write_str(name)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Store;

#[derive(Debug, Clone)]
pub struct StoreArgs {
    pub path: PathBuf,
}

#[derive(Debug)]
pub struct StoreState {
    db: sled::Db,
    path: PathBuf,
}

/// Opens the database, waiting briefly if a previous incarnation of this
/// actor (killed, not yet dropped) still holds its file lock.
fn open(path: &PathBuf) -> Result<sled::Db, StoreError> {
    let mut attempt = 0;
    loop {
        match sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()
        {
            Ok(db) => return Ok(db),
            Err(err) => {
                let locked = matches!(&err, sled::Error::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock)
                    || err.to_string().contains("lock");
                attempt += 1;
                if !locked || attempt >= 40 {
                    return Err(StoreError::Open {
                        path: path.clone(),
                        source: err,
                    });
                }
                std::thread::sleep(Duration::from_millis(25));
            }
        }
    }
}

impl StoreState {
    /// Answers a write once it is on disk, without holding the mailbox:
    /// the write is already applied (later reads see it), and the flush
    /// runs beside the next messages. Writes that arrive meanwhile share
    /// the flush that covers them (sled makes everything up to a log
    /// position stable at once), so parallel writers pay for one fsync
    /// rather than queueing one each behind the others.
    fn ack_when_durable<T: Send + 'static>(
        &self,
        reply: RpcReplyPort<Result<T, ErrorData>>,
        value: T,
    ) {
        let db = self.db.clone();
        // A blocking flush on the blocking pool: sled 0.34's `flush_async`
        // deadlocks when several run at once (spacejam/sled#1308), and
        // here several do.
        tokio::task::spawn_blocking(move || {
            let res = db
                .flush()
                .map(|_| value)
                .map_err(|e| ErrorData::from(StoreError::from(e)));
            let _ = reply.send(res);
        });
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    /// `puts` in one sled transaction over the trees they name.
    fn put_all(&self, puts: &[TreePut]) -> Result<(), StoreError> {
        use sled::transaction::{TransactionError, Transactional};
        let mut names: Vec<&str> = Vec::new();
        let at: Vec<usize> = puts
            .iter()
            .map(|(tree, _, _)| match names.iter().position(|n| n == tree) {
                Some(i) => i,
                None => {
                    names.push(tree);
                    names.len() - 1
                }
            })
            .collect();
        let trees = names
            .iter()
            .map(|n| self.tree(n))
            .collect::<Result<Vec<_>, _>>()?;
        trees[..]
            .transaction(|views| {
                for (&i, (_, key, value)) in at.iter().zip(puts) {
                    views[i].insert(key.as_slice(), value.as_slice())?;
                }
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
            })
            .map_err(|e| match e {
                TransactionError::Storage(e) => StoreError::Db(e),
                TransactionError::Abort(()) => {
                    StoreError::Db(sled::Error::ReportableBug("transaction aborted".into()))
                }
            })
    }

    fn stats(&self) -> Result<StoreStats, StoreError> {
        let mut records = 0u64;
        let mut trees = 0u64;
        for name in self.db.tree_names() {
            if name.as_ref() == b"__sled__default" {
                continue;
            }
            trees += 1;
            records += self.db.open_tree(name)?.len() as u64;
        }
        Ok(StoreStats {
            path: self.path.display().to_string(),
            trees,
            records,
            size_on_disk: self.db.size_on_disk()?,
        })
    }
}

impl Actor for Store {
    type Msg = StoreMsg;
    type State = StoreState;
    type Arguments = StoreArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<StoreMsg>,
        args: StoreArgs,
    ) -> Result<StoreState, ActorProcessingErr> {
        let path = args.path.clone();
        let db = tokio::task::spawn_blocking(move || open(&path)).await??;
        info!(path = %args.path.display(), recovered = db.was_recovered(), "store opened");
        Ok(StoreState {
            db,
            path: args.path,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<StoreMsg>,
        state: &mut StoreState,
    ) -> Result<(), ActorProcessingErr> {
        let db = state.db.clone();
        let flushed = tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        if let Err(err) = flushed {
            warn!(error = %err, "store flush on stop failed");
        }
        info!("store closed");
        Ok(())
    }

    async fn handle(
        &self,
        _myself: ActorRef<StoreMsg>,
        msg: StoreMsg,
        state: &mut StoreState,
    ) -> Result<(), ActorProcessingErr> {
        // Domain errors go back through the reply port; only a failure to
        // even reach the database would be worth dying for, and sled
        // reports those as errors too, so the actor never returns Err.
        match msg {
            StoreMsg::Put {
                tree,
                key,
                value,
                reply,
            } => match state.tree(&tree).and_then(|t| Ok(t.insert(key, value)?)) {
                Ok(_) => state.ack_when_durable(reply, ()),
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            StoreMsg::Batch {
                tree,
                puts,
                removes,
                reply,
            } => {
                let mut batch = sled::Batch::default();
                for (k, v) in puts {
                    batch.insert(k, v);
                }
                for k in removes {
                    batch.remove(k);
                }
                match state.tree(&tree).and_then(|t| Ok(t.apply_batch(batch)?)) {
                    Ok(()) => state.ack_when_durable(reply, ()),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            StoreMsg::PutAll { puts, reply } => match state.put_all(&puts) {
                Ok(()) => state.ack_when_durable(reply, ()),
                Err(e) => {
                    let _ = reply.send(Err(e.into()));
                }
            },
            StoreMsg::Get { tree, key, reply } => {
                let res =
                    (|| Ok::<_, StoreError>(state.tree(&tree)?.get(key)?.map(|v| v.to_vec())))();
                let _ = reply.send(res.map_err(ErrorData::from));
            }
            StoreMsg::Delete { tree, key, reply } => {
                match state.tree(&tree).and_then(|t| Ok(t.remove(key)?)) {
                    Ok(old) => state.ack_when_durable(reply, old.is_some()),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            StoreMsg::Scan {
                tree,
                prefix,
                reply,
            } => {
                let res = (|| {
                    state
                        .tree(&tree)?
                        .scan_prefix(prefix)
                        .map(|kv| {
                            kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                                .map_err(StoreError::from)
                        })
                        .collect::<Result<Entries, StoreError>>()
                })();
                let _ = reply.send(res.map_err(ErrorData::from));
            }
            StoreMsg::Tail { tree, limit, reply } => {
                let res = (|| {
                    let mut out = state
                        .tree(&tree)?
                        .iter()
                        .rev()
                        .take(limit)
                        .map(|kv| {
                            kv.map(|(k, v)| (k.to_vec(), v.to_vec()))
                                .map_err(StoreError::from)
                        })
                        .collect::<Result<Entries, StoreError>>()?;
                    out.reverse();
                    Ok::<_, StoreError>(out)
                })();
                let _ = reply.send(res.map_err(ErrorData::from));
            }
            StoreMsg::Stats { reply } => {
                let _ = reply.send(state.stats().map_err(ErrorData::from));
            }
        }
        Ok(())
    }
}

fn put_msg(
    tree: &str,
    key: &[u8],
    value: Vec<u8>,
    reply: RpcReplyPort<Result<(), ErrorData>>,
) -> StoreMsg {
    StoreMsg::Put {
        tree: tree.to_string(),
        key: key.to_vec(),
        value,
        reply,
    }
}

/// Typed access to the Store actor for other actors and request handlers.
/// Looks the actor up on every call, so it follows restarts.
#[derive(Debug, Clone, Copy)]
pub struct StoreClient {
    pub timeout: Duration,
}

impl StoreClient {
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }

    pub async fn put<T: Serialize>(
        &self,
        tree: &str,
        key: &[u8],
        value: &T,
    ) -> Result<(), ErrorData> {
        self.put_raw(tree, key, encode_record(value)?).await
    }

    /// Like [`put`](Self::put), but waits out a restart of the Store actor
    /// for up to `patience`: for writes that must not be lost to a store
    /// restarting at that moment (a VM's state changes).
    pub async fn put_patiently<T: Serialize>(
        &self,
        tree: &str,
        key: &[u8],
        value: &T,
        patience: Duration,
    ) -> Result<(), ErrorData> {
        let value = encode_record(value)?;
        crate::ask::ask_patiently(
            names::STORE,
            |reply| put_msg(tree, key, value.clone(), reply),
            self.timeout,
            patience,
        )
        .await?
    }

    /// Sends a put at once and returns the wait for its answer. The write
    /// is queued in the Store's mailbox before anything the caller sends
    /// after this returns (a later delete of the same key cannot overtake
    /// it), while the caller's own mailbox need not wait for the disk.
    pub fn put_sent<T: Serialize>(
        &self,
        tree: &str,
        key: &[u8],
        value: &T,
    ) -> impl std::future::Future<Output = Result<(), ErrorData>> + Send + 'static {
        let msg = encode_record(value).map(|value| {
            let (tree, key) = (tree.to_string(), key.to_vec());
            move |reply| StoreMsg::Put {
                tree,
                key,
                value,
                reply,
            }
        });
        self.sent(msg)
    }

    /// [`Self::put_sent`] for writes to several trees, applied in one
    /// atomic step ([`StoreMsg::PutAll`]).
    pub fn put_all_sent(
        &self,
        puts: Vec<TreePut>,
    ) -> impl std::future::Future<Output = Result<(), ErrorData>> + Send + 'static {
        self.sent(Ok(move |reply| StoreMsg::PutAll { puts, reply }))
    }

    /// Casts the message `msg` builds now and returns the wait for its answer.
    fn sent(
        &self,
        msg: Result<impl FnOnce(RpcReplyPort<Result<(), ErrorData>>) -> StoreMsg, ErrorData>,
    ) -> impl std::future::Future<Output = Result<(), ErrorData>> + Send + 'static {
        let sent = msg.and_then(|msg| {
            let actor = crate::ask::lookup::<StoreMsg>(names::STORE)?;
            let (tx, rx) = ractor::concurrency::oneshot();
            actor
                .cast(msg(tx.into()))
                .map_err(|_| crate::ask::unavailable(names::STORE, "is not running"))?;
            Ok(rx)
        });
        let timeout = self.timeout;
        async move {
            match tokio::time::timeout(timeout, sent?).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(crate::ask::unavailable(
                    names::STORE,
                    "stopped before answering",
                )),
                Err(_) => Err(crate::ask::timed_out(names::STORE, timeout)),
            }
        }
    }

    pub async fn put_raw(&self, tree: &str, key: &[u8], value: Vec<u8>) -> Result<(), ErrorData> {
        ask(
            names::STORE,
            |reply| put_msg(tree, key, value, reply),
            self.timeout,
        )
        .await?
    }

    pub async fn batch(
        &self,
        tree: &str,
        puts: Entries,
        removes: Vec<Vec<u8>>,
    ) -> Result<(), ErrorData> {
        let tree = tree.to_string();
        ask(
            names::STORE,
            |reply| StoreMsg::Batch {
                tree,
                puts,
                removes,
                reply,
            },
            self.timeout,
        )
        .await?
    }

    pub async fn get<T: DeserializeOwned>(
        &self,
        tree: &str,
        key: &[u8],
    ) -> Result<Option<T>, ErrorData> {
        let tree_name = tree.to_string();
        let key = key.to_vec();
        let raw = ask(
            names::STORE,
            |reply| StoreMsg::Get {
                tree: tree_name,
                key,
                reply,
            },
            self.timeout,
        )
        .await??;
        raw.map(|bytes| decode_record(tree, &bytes)).transpose()
    }

    pub async fn delete(&self, tree: &str, key: &[u8]) -> Result<bool, ErrorData> {
        let tree = tree.to_string();
        let key = key.to_vec();
        ask(
            names::STORE,
            |reply| StoreMsg::Delete { tree, key, reply },
            self.timeout,
        )
        .await?
    }

    pub async fn scan_raw(&self, tree: &str, prefix: &[u8]) -> Result<Entries, ErrorData> {
        let tree = tree.to_string();
        let prefix = prefix.to_vec();
        ask(
            names::STORE,
            |reply| StoreMsg::Scan {
                tree,
                prefix,
                reply,
            },
            self.timeout,
        )
        .await?
    }

    pub async fn tail_raw(&self, tree: &str, limit: usize) -> Result<Entries, ErrorData> {
        let tree = tree.to_string();
        ask(
            names::STORE,
            |reply| StoreMsg::Tail { tree, limit, reply },
            self.timeout,
        )
        .await?
    }

    pub async fn stats(&self) -> Result<StoreStats, ErrorData> {
        ask(
            names::STORE,
            |reply| StoreMsg::Stats { reply },
            self.timeout,
        )
        .await?
    }
}

pub fn encode_record<T: Serialize>(value: &T) -> Result<Vec<u8>, ErrorData> {
    postcard::to_stdvec(value).map_err(|e| {
        ErrorData::from_error(ErrorKind::Internal, &e).with_cause("encoding a store record")
    })
}

pub fn decode_record<T: DeserializeOwned>(tree: &str, bytes: &[u8]) -> Result<T, ErrorData> {
    postcard::from_bytes(bytes).map_err(|e| {
        ErrorData::new(
            ErrorKind::Internal,
            format!("a record in store tree `{tree}` is unreadable"),
        )
        .with_cause(e.to_string())
        .with_hint("the database may have been written by an incompatible banger version")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_scan_tail_delete_roundtrip() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, handle) = Actor::spawn(
            None,
            Store,
            StoreArgs {
                path: dir.path().join("db"),
            },
        )
        .await
        .expect("spawn");
        let t = Duration::from_secs(5);
        for i in 0u8..5 {
            let res: Result<(), ErrorData> = crate::ask::ask_ref(
                "store",
                &store,
                |reply| StoreMsg::Put {
                    tree: "t".into(),
                    key: vec![b'k', i],
                    value: vec![i],
                    reply,
                },
                t,
            )
            .await
            .expect("call");
            res.expect("put");
        }
        let got = crate::ask::ask_ref(
            "store",
            &store,
            |reply| StoreMsg::Get {
                tree: "t".into(),
                key: vec![b'k', 3],
                reply,
            },
            t,
        )
        .await
        .expect("call")
        .expect("get");
        assert_eq!(got, Some(vec![3]));
        let tail = crate::ask::ask_ref(
            "store",
            &store,
            |reply| StoreMsg::Tail {
                tree: "t".into(),
                limit: 2,
                reply,
            },
            t,
        )
        .await
        .expect("call")
        .expect("tail");
        assert_eq!(
            tail.iter().map(|(_, v)| v[0]).collect::<Vec<_>>(),
            vec![3, 4]
        );
        let existed = crate::ask::ask_ref(
            "store",
            &store,
            |reply| StoreMsg::Delete {
                tree: "t".into(),
                key: vec![b'k', 0],
                reply,
            },
            t,
        )
        .await
        .expect("call")
        .expect("delete");
        assert!(existed);
        let all = crate::ask::ask_ref(
            "store",
            &store,
            |reply| StoreMsg::Scan {
                tree: "t".into(),
                prefix: b"k".to_vec(),
                reply,
            },
            t,
        )
        .await
        .expect("call")
        .expect("scan");
        assert_eq!(all.len(), 4);
        let stats = crate::ask::ask_ref("store", &store, |reply| StoreMsg::Stats { reply }, t)
            .await
            .expect("call")
            .expect("stats");
        assert_eq!((stats.trees, stats.records), (1, 4));
        store.stop(None);
        handle.await.expect("join");
    }
}

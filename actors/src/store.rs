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
    /// The database failed with an I/O error and could not be opened again
    /// yet (the next request tries again).
    #[error("the database at {} is closed after an I/O error and could not be opened again", path.display())]
    Closed {
        path: PathBuf,
        /// Opening it failed because the disk is full.
        full: bool,
    },
    /// A write that adds data was refused: the disk has no room for the
    /// ballast the database keeps for removals (see [`Ballast`]).
    #[error("no space left on device for banger's database at {}", path.display())]
    NoRoom { path: PathBuf },
}

/// Whether `err` says the disk is full. sled hands out copies of the
/// error it keeps, which have the kind but not the OS error number.
fn disk_full(err: &sled::Error) -> bool {
    matches!(err, sled::Error::Io(e)
        if e.raw_os_error() == Some(libc::ENOSPC) || e.kind() == std::io::ErrorKind::StorageFull)
}

impl StoreError {
    /// An I/O error: sled answers every later operation with it, so the
    /// database must be opened again.
    fn is_io(&self) -> bool {
        matches!(self, StoreError::Db(sled::Error::Io(_)))
    }
}

impl From<StoreError> for ErrorData {
    fn from(err: StoreError) -> Self {
        let full = match &err {
            StoreError::Db(e) | StoreError::Open { source: e, .. } => disk_full(e),
            StoreError::Closed { full, .. } => *full,
            StoreError::NoRoom { .. } => true,
        };
        if full {
            return ErrorData::from_error(ErrorKind::InvalidState, &err).with_hint(
                "the disk holding banger's state is full: free space or delete VMs/images",
            );
        }
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
    /// A flush beside the mailbox failed with an I/O error.
    Failed,
    /// A removal whose flush found the disk full: done again once the
    /// ballast is freed and the database opened again.
    DeleteWithBallast {
        tree: String,
        key: Vec<u8>,
        reply: RpcReplyPort<Result<bool, ErrorData>>,
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
            StoreMsg::Failed => "Failed",
            StoreMsg::DeleteWithBallast { .. } => "DeleteWithBallast",
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
    /// `None` only while it could not be opened again after a failure.
    db: Option<sled::Db>,
    /// Why it could not be opened again: the disk is full.
    full: bool,
    path: PathBuf,
    /// sled stops working for good after an I/O error (a full disk, say):
    /// it answers every later operation with that error, even once space
    /// is freed. When one is seen, the database is closed and opened
    /// again before the next message: what was acknowledged is on disk,
    /// and what failed was answered with an error.
    failed: bool,
    ballast: Ballast,
}

/// Room kept for removals on the disk that holds the database.
const BALLAST_BYTES: u64 = 4 << 20;

/// A file of [`BALLAST_BYTES`] beside the database. On a full disk sled
/// cannot even record a removal, so a failed create could not be undone
/// nor a VM deleted, and the space would never come back. A removal that
/// finds the disk full frees the ballast and is done again; writes that
/// add data first make the ballast again, and are refused (the disk is
/// full) while there is no room for it.
#[derive(Debug)]
struct Ballast {
    path: PathBuf,
    /// Known to be there (made or found), so writes need not look.
    made: bool,
}

impl Ballast {
    fn beside(db: &std::path::Path) -> Self {
        let mut name = db.file_name().unwrap_or_default().to_os_string();
        name.push(".ballast");
        Self {
            path: db.with_file_name(name),
            made: false,
        }
    }

    /// Makes the ballast if it is missing (its blocks allocated, not a
    /// sparse file); a half-made one is removed.
    fn ensure(&mut self) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        if self.made || self.path.exists() {
            self.made = true;
            return Ok(());
        }
        let tmp = self.path.with_extension("ballast.tmp");
        let made = (|| {
            let mut file = std::fs::File::create(&tmp)?;
            // SAFETY: fallocate on a file we own.
            let r = unsafe { libc::fallocate(file.as_raw_fd(), 0, 0, BALLAST_BYTES as i64) };
            if r != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() != Some(libc::EOPNOTSUPP) {
                    return Err(err);
                }
                let zeros = vec![0u8; 64 << 10];
                for _ in 0..BALLAST_BYTES / zeros.len() as u64 {
                    file.write_all(&zeros)?;
                }
            }
            file.sync_all()?;
            std::fs::rename(&tmp, &self.path)
        })();
        match made {
            Ok(()) => self.made = true,
            Err(_) => {
                let _ = std::fs::remove_file(&tmp);
            }
        }
        made
    }

    /// Frees the ballast; whether there was one.
    fn release(&mut self) -> bool {
        self.made = false;
        let freed = std::fs::remove_file(&self.path).is_ok();
        if freed {
            warn!(path = %self.path.display(), "the disk is full: freed the store's ballast for a removal");
        }
        freed
    }
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
        myself: &ActorRef<StoreMsg>,
        reply: RpcReplyPort<Result<T, ErrorData>>,
        value: T,
    ) {
        self.ack_when_durable_or(myself, reply, value, None::<fn(_) -> StoreMsg>);
    }

    /// [`Self::ack_when_durable`]; when the flush finds the disk full and
    /// `on_full` is given, the reply goes into the message it makes (sent
    /// to this actor) instead of answering with the error.
    fn ack_when_durable_or<T: Send + 'static>(
        &self,
        myself: &ActorRef<StoreMsg>,
        reply: RpcReplyPort<Result<T, ErrorData>>,
        value: T,
        on_full: Option<
            impl FnOnce(RpcReplyPort<Result<T, ErrorData>>) -> StoreMsg + Send + 'static,
        >,
    ) {
        let db = match self.db() {
            Ok(db) => db.clone(),
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let me = myself.clone();
        // A blocking flush on the blocking pool: sled 0.34's `flush_async`
        // deadlocks when several run at once (spacejam/sled#1308), and
        // here several do.
        tokio::task::spawn_blocking(move || match db.flush() {
            Ok(_) => {
                let _ = reply.send(Ok(value));
            }
            Err(e) if on_full.is_some() && disk_full(&e) => {
                if let Some(retry) = on_full {
                    let _ = me.cast(retry(reply));
                }
            }
            Err(e) => {
                let err = StoreError::from(e);
                if err.is_io() {
                    let _ = me.cast(StoreMsg::Failed);
                }
                let _ = reply.send(Err(err.into()));
            }
        });
    }

    /// Room for a write that adds data: the ballast is there, or can be
    /// made again.
    fn room(&mut self) -> Result<(), StoreError> {
        match self.ballast.ensure() {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Err(StoreError::NoRoom {
                path: self.path.clone(),
            }),
            Err(e) => {
                // Not a full disk (say, a read-only ballast path): writes
                // go on without the reserve rather than fail.
                warn!(path = %self.ballast.path.display(), error = %e, "cannot make the store's ballast");
                Ok(())
            }
        }
    }

    /// Removes `key`. With `retry`, a removal that finds the disk full is
    /// done again after the ballast is freed (see [`Ballast`]).
    async fn delete(
        &mut self,
        myself: &ActorRef<StoreMsg>,
        tree: String,
        key: Vec<u8>,
        reply: RpcReplyPort<Result<bool, ErrorData>>,
        retry: bool,
    ) {
        let remove = |s: &Self| s.tree(&tree).and_then(|t| Ok(t.remove(key.as_slice())?));
        let mut removed = remove(self);
        // The disk is full: the removal itself, or the database could not
        // be opened again after an earlier write found it full.
        let full = match &removed {
            Err(StoreError::Db(e)) => disk_full(e),
            Err(StoreError::Closed { full, .. }) => *full,
            _ => false,
        };
        if retry && full && self.ballast.release() {
            self.reopen().await;
            removed = remove(self);
        }
        let existed = match self.check(removed) {
            Ok(old) => old.is_some(),
            Err(e) => {
                let _ = reply.send(Err(e.into()));
                return;
            }
        };
        let on_full = (retry && self.ballast.made)
            .then_some(move |reply| StoreMsg::DeleteWithBallast { tree, key, reply });
        self.ack_when_durable_or(myself, reply, existed, on_full);
    }

    fn db(&self) -> Result<&sled::Db, StoreError> {
        self.db.as_ref().ok_or_else(|| StoreError::Closed {
            path: self.path.clone(),
            full: self.full,
        })
    }

    fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db()?.open_tree(name)?)
    }

    /// Notes an I/O error in `result` (see [`StoreState::failed`]).
    fn check<T>(&mut self, result: Result<T, StoreError>) -> Result<T, StoreError> {
        if result.as_ref().is_err_and(StoreError::is_io) {
            self.failed = true;
        }
        result
    }

    /// Closes the failed database and opens it again (sled recovers its
    /// log as after a crash). Flushes still running hold the old one's
    /// file lock for a moment; `open` waits for them.
    async fn reopen(&mut self) {
        warn!(path = %self.path.display(), "the store failed with an I/O error: opening it again");
        self.db = None;
        let path = self.path.clone();
        match tokio::task::spawn_blocking(move || open(&path)).await {
            Ok(Ok(db)) => {
                info!(path = %self.path.display(), "store opened again");
                self.db = Some(db);
                self.failed = false;
                self.full = false;
            }
            Ok(Err(e)) => {
                self.full = matches!(&e, StoreError::Open { source, .. } if disk_full(source));
                let e = ErrorData::from_error(ErrorKind::Internal, &e);
                warn!(error = %e, "opening the store again failed; retrying with the next request");
            }
            Err(e) => {
                warn!(error = %e, "opening the store again failed; retrying with the next request");
            }
        }
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
        let db = self.db()?;
        for name in db.tree_names() {
            if name.as_ref() == b"__sled__default" {
                continue;
            }
            trees += 1;
            records += db.open_tree(name)?.len() as u64;
        }
        Ok(StoreStats {
            path: self.path.display().to_string(),
            trees,
            records,
            size_on_disk: db.size_on_disk()?,
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
        let mut ballast = Ballast::beside(&args.path);
        if let Err(e) = ballast.ensure() {
            warn!(path = %ballast.path.display(), error = %e, "cannot make the store's ballast yet");
        }
        Ok(StoreState {
            db: Some(db),
            full: false,
            path: args.path,
            failed: false,
            ballast,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<StoreMsg>,
        state: &mut StoreState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(db) = state.db.clone() else {
            return Ok(());
        };
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
        myself: ActorRef<StoreMsg>,
        msg: StoreMsg,
        state: &mut StoreState,
    ) -> Result<(), ActorProcessingErr> {
        // Domain errors go back through the reply port; only a failure to
        // even reach the database would be worth dying for, and sled
        // reports those as errors too, so the actor never returns Err.
        // After an I/O error the database is opened again first.
        if state.failed && !matches!(msg, StoreMsg::Failed | StoreMsg::DeleteWithBallast { .. }) {
            state.reopen().await;
        }
        // Writes that add data need room for the ballast first.
        let refused = match &msg {
            StoreMsg::Put { .. } | StoreMsg::Batch { .. } | StoreMsg::PutAll { .. } => {
                state.room().err()
            }
            _ => None,
        };
        if let Some(err) = refused {
            match msg {
                StoreMsg::Put { reply, .. }
                | StoreMsg::Batch { reply, .. }
                | StoreMsg::PutAll { reply, .. } => {
                    let _ = reply.send(Err(err.into()));
                }
                _ => unreachable!("only writes are refused"),
            }
            return Ok(());
        }
        match msg {
            StoreMsg::Failed => state.failed = true,
            StoreMsg::Put {
                tree,
                key,
                value,
                reply,
            } => {
                let inserted = state.tree(&tree).and_then(|t| Ok(t.insert(key, value)?));
                match state.check(inserted) {
                    Ok(_) => state.ack_when_durable(&myself, reply, ()),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
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
                let applied = state.tree(&tree).and_then(|t| Ok(t.apply_batch(batch)?));
                match state.check(applied) {
                    Ok(()) => state.ack_when_durable(&myself, reply, ()),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            StoreMsg::PutAll { puts, reply } => {
                let applied = state.put_all(&puts);
                match state.check(applied) {
                    Ok(()) => state.ack_when_durable(&myself, reply, ()),
                    Err(e) => {
                        let _ = reply.send(Err(e.into()));
                    }
                }
            }
            StoreMsg::Get { tree, key, reply } => {
                let res =
                    (|| Ok::<_, StoreError>(state.tree(&tree)?.get(key)?.map(|v| v.to_vec())))();
                let _ = reply.send(state.check(res).map_err(ErrorData::from));
            }
            StoreMsg::Delete { tree, key, reply } => {
                state.delete(&myself, tree, key, reply, true).await;
            }
            StoreMsg::DeleteWithBallast { tree, key, reply } => {
                state.ballast.release();
                state.reopen().await;
                state.delete(&myself, tree, key, reply, false).await;
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
                let _ = reply.send(state.check(res).map_err(ErrorData::from));
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
                let _ = reply.send(state.check(res).map_err(ErrorData::from));
            }
            StoreMsg::Stats { reply } => {
                let stats = state.stats();
                let _ = reply.send(state.check(stats).map_err(ErrorData::from));
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

    #[test]
    fn the_ballast_is_allocated_beside_the_database_and_can_be_freed() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut ballast = Ballast::beside(&dir.path().join("db"));
        assert_eq!(ballast.path, dir.path().join("db.ballast"));
        ballast.ensure().expect("make the ballast");
        let meta = std::fs::metadata(&ballast.path).expect("the ballast exists");
        assert_eq!(meta.len(), BALLAST_BYTES);
        assert!(
            meta.blocks() * 512 >= BALLAST_BYTES,
            "its blocks are allocated, not a sparse file: {} blocks",
            meta.blocks()
        );
        ballast.ensure().expect("already there");
        assert!(ballast.release(), "freed");
        assert!(!ballast.path.exists());
        assert!(!ballast.release(), "nothing left to free");
        ballast.ensure().expect("made again");
        assert!(ballast.path.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, ["db.ballast"], "no temporary file left");
    }

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

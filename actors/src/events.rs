//! The Events actor: numbers lifecycle events, keeps a backlog of the last
//! [`BACKLOG`] in the store and fans them out to subscribers.
//!
//! Publishers `cast` [`EventsMsg::Publish`]; subscribers (connection tasks
//! serving `SubscribeEvents`) hand in a channel. When this actor is
//! restarted, every subscriber's channel closes; a subscriber resubscribes
//! with the last sequence number it saw and the backlog, rebuilt from the
//! store, fills the gap.

use std::collections::VecDeque;
use std::time::Duration;

use banger_protocol::{Event, EventKind};
use ractor::{concurrency, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::store::{decode_record, encode_record, StoreClient, StoreMsg};
use crate::{ask, names, unix_ms};

/// How many events are kept (in memory and in the store).
pub const BACKLOG: usize = 1000;
/// Store tree of the backlog; keys are big-endian sequence numbers.
pub const TREE: &str = "events";

#[derive(Debug)]
pub enum EventsMsg {
    Publish(EventKind),
    /// Replays backlog events after `since` into `tx`, then streams new
    /// ones; answers the sequence number of the last event published so far.
    Subscribe {
        since: Option<u64>,
        tx: mpsc::Sender<Event>,
        reply: RpcReplyPort<u64>,
    },
    Stats {
        reply: RpcReplyPort<EventsStats>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EventsStats {
    /// Sequence number of the last event (= events published since the store was created).
    pub last_seq: u64,
    pub subscribers: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct Events;

#[derive(Debug, Clone, Copy)]
pub struct EventsArgs {
    pub store_timeout: Duration,
}

#[derive(Debug)]
pub struct EventsState {
    last_seq: u64,
    backlog: VecDeque<Event>,
    subscribers: Vec<mpsc::Sender<Event>>,
}

/// Publishes an event if the Events actor is up; returns false if it is not.
pub fn publish(kind: EventKind) -> bool {
    match ask::lookup::<EventsMsg>(names::EVENTS) {
        Ok(events) => events.cast(EventsMsg::Publish(kind)).is_ok(),
        Err(_) => false,
    }
}

impl Actor for Events {
    type Msg = EventsMsg;
    type State = EventsState;
    type Arguments = EventsArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<EventsMsg>,
        args: EventsArgs,
    ) -> Result<EventsState, ActorProcessingErr> {
        // Rebuild from the store, never from memory.
        let entries = StoreClient::new(args.store_timeout)
            .tail_raw(TREE, BACKLOG)
            .await?;
        let mut backlog = VecDeque::with_capacity(BACKLOG);
        for (_, value) in entries {
            backlog.push_back(decode_record::<Event>(TREE, &value)?);
        }
        let last_seq = backlog.back().map_or(0, |e| e.seq);
        debug!(last_seq, backlog = backlog.len(), "events backlog restored");
        Ok(EventsState {
            last_seq,
            backlog,
            subscribers: Vec::new(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<EventsMsg>,
        msg: EventsMsg,
        state: &mut EventsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            EventsMsg::Publish(kind) => {
                state.last_seq += 1;
                let event = Event {
                    seq: state.last_seq,
                    at_unix_ms: unix_ms(),
                    kind,
                };
                persist(
                    &event,
                    state.backlog.front().map(|e| e.seq),
                    state.backlog.len(),
                );
                if state.backlog.len() == BACKLOG {
                    state.backlog.pop_front();
                }
                state.backlog.push_back(event.clone());
                state
                    .subscribers
                    .retain(|tx| match tx.try_send(event.clone()) {
                        Ok(()) => true,
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            // It resubscribes from its last seq and catches up from the backlog.
                            warn!("dropping a slow event subscriber");
                            false
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => false,
                    });
            }
            EventsMsg::Subscribe { since, tx, reply } => {
                if let Some(since) = since {
                    for event in state.backlog.iter().filter(|e| e.seq > since) {
                        if tx.try_send(event.clone()).is_err() {
                            break;
                        }
                    }
                }
                state.subscribers.push(tx);
                let _ = reply.send(state.last_seq);
            }
            EventsMsg::Stats { reply } => {
                state.subscribers.retain(|tx| !tx.is_closed());
                let _ = reply.send(EventsStats {
                    last_seq: state.last_seq,
                    subscribers: state.subscribers.len(),
                });
            }
        }
        Ok(())
    }
}

/// Enqueues the write of `event` (and the trim of the oldest one when the
/// backlog is full) in the Store's mailbox without waiting: the mailbox is
/// FIFO, so a restarted Events actor reading the store afterwards sees it.
fn persist(event: &Event, oldest: Option<u64>, len: usize) {
    let Ok(value) = encode_record(event) else {
        return;
    };
    let removes = match oldest {
        Some(seq) if len >= BACKLOG => vec![seq.to_be_bytes().to_vec()],
        _ => Vec::new(),
    };
    let Ok(store) = ask::lookup::<StoreMsg>(names::STORE) else {
        warn!(seq = event.seq, "store is down; event not persisted");
        return;
    };
    let (tx, _rx) = concurrency::oneshot();
    let _ = store.cast(StoreMsg::Batch {
        tree: TREE.to_string(),
        puts: vec![(event.seq.to_be_bytes().to_vec(), value)],
        removes,
        reply: tx.into(),
    });
}

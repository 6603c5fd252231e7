//! The KernelRegistry actor: owns the kernel records (store tree
//! `kernels`) and the publication window for new kernels.
//!
//! Importing and pulling happen in request tasks ([`import`], [`catalog`])
//! that stage everything in `<kernels>/<id>.staging`; the actor only
//! re-checks the name, renames the staging dir into place and stores the
//! record ([`KernelsMsg::Publish`]), so imports of different names overlap
//! and a same-name race has exactly one winner.

pub mod catalog;
pub mod download;
pub mod import;

/// The `source` of a kernel taken from an image build's own `/boot`
/// (`banger image build`): that image carries its modules.
pub fn built_with_image(image: &str) -> String {
    format!("built with image {image}")
}

use std::path::PathBuf;
use std::time::Duration;

use banger_protocol::{ErrorData, ErrorKind, KernelInfo};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::info;

use crate::layout::Layout;
use crate::records::Records;
use crate::store::StoreClient;
use crate::unix_ms;

/// A kernel fully staged, waiting for publication.
#[derive(Debug, Clone)]
pub struct StagedKernel {
    pub id: String,
    pub name: String,
    pub staging: PathBuf,
    pub version: Option<String>,
    pub format: String,
    /// File name of the kernel as imported (`vmlinuz` or `vmlinux`).
    pub kernel_file: String,
    pub has_vmlinux: bool,
    pub has_initrd: bool,
    pub has_modules: bool,
    pub backends: Vec<String>,
    pub source: String,
    pub bytes: u64,
}

#[derive(Debug)]
pub enum KernelsMsg {
    List(RpcReplyPort<Vec<KernelInfo>>),
    Get {
        name: String,
        reply: RpcReplyPort<Option<KernelInfo>>,
    },
    Publish {
        staged: StagedKernel,
        reply: RpcReplyPort<Result<KernelInfo, ErrorData>>,
    },
    Delete {
        name: String,
        reply: RpcReplyPort<Result<KernelInfo, ErrorData>>,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct KernelRegistry;

#[derive(Debug, Clone)]
pub struct KernelsArgs {
    pub layout: Layout,
    pub store_timeout: Duration,
}

#[derive(Debug)]
pub struct KernelsState {
    records: Records<KernelInfo>,
    store: StoreClient,
    layout: Layout,
}

impl Actor for KernelRegistry {
    type Msg = KernelsMsg;
    type State = KernelsState;
    type Arguments = KernelsArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<KernelsMsg>,
        args: KernelsArgs,
    ) -> Result<KernelsState, ActorProcessingErr> {
        let store = StoreClient::new(args.store_timeout);
        let records = Records::load(&store).await?;
        let dir = args.layout.kernels_dir();
        // Staging dirs are not cleaned here: after a restart of this actor,
        // pulls that were in flight still own theirs. The daemon removes
        // leftovers of a previous run at start-up (`Layout::reconcile`).
        std::fs::create_dir_all(&dir)?;
        Ok(KernelsState {
            records,
            store,
            layout: args.layout,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<KernelsMsg>,
        msg: KernelsMsg,
        state: &mut KernelsState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            KernelsMsg::List(reply) => {
                let _ = reply.send(state.records.list());
            }
            KernelsMsg::Get { name, reply } => {
                let _ = reply.send(state.records.get(&name).cloned());
            }
            KernelsMsg::Publish { staged, reply } => {
                let _ = reply.send(publish(state, staged).await);
            }
            KernelsMsg::Delete { name, reply } => {
                let result = state.records.remove(&state.store, &name).await;
                if let Ok(kernel) = &result {
                    // The record is gone: the files can go outside any window.
                    let dir = PathBuf::from(&kernel.kernel_path)
                        .parent()
                        .map(PathBuf::from);
                    if let Some(dir) = dir.filter(|d| d.starts_with(state.layout.kernels_dir())) {
                        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir));
                    }
                    info!(kernel = %name, "kernel deleted");
                }
                let _ = reply.send(result);
            }
        }
        Ok(())
    }
}

/// The publication window: name check, atomic rename, durable record.
async fn publish(state: &mut KernelsState, staged: StagedKernel) -> Result<KernelInfo, ErrorData> {
    state.records.ensure_free(&staged.name)?;
    let dir = state.layout.kernels_dir().join(&staged.id);
    std::fs::rename(&staged.staging, &dir).map_err(|e| {
        ErrorData::from_error(ErrorKind::Internal, &e)
            .with_cause(format!("publishing {}", dir.display()))
    })?;
    let path = |file: &str| dir.join(file).display().to_string();
    let info = KernelInfo {
        name: staged.name.clone(),
        version: staged.version,
        format: staged.format,
        kernel_path: path(&staged.kernel_file),
        vmlinux_path: staged.has_vmlinux.then(|| path(import::VMLINUX)),
        initrd_path: staged.has_initrd.then(|| path(import::INITRD)),
        modules_path: staged.has_modules.then(|| path(import::MODULES)),
        backends: staged.backends,
        source: staged.source,
        created_unix_ms: unix_ms(),
        bytes: staged.bytes,
    };
    if let Err(err) = state.records.insert(&state.store, info.clone()).await {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(err);
    }
    info!(kernel = %info.name, version = ?info.version, "kernel published");
    Ok(info)
}

//! The ImageRegistry actor: owns the image records (store tree `images`)
//! and the publication window for new images.
//!
//! Pulls, builds, registrations and promotions run in request tasks
//! ([`pull`], [`register`]) that do the slow work in
//! `<images>/<id>.staging`; the actor only re-checks the name, renames
//! the staging dir into place and stores the record
//! ([`ImagesMsg::Publish`]). Pulls of different names overlap; a same-name
//! race has exactly one winner.

pub mod build;
pub mod catalog;
pub mod inject;
pub mod pull;
pub mod register;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use banger_protocol::{ErrorData, ErrorKind, ImageInfo};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tracing::info;

use crate::layout::Layout;
use crate::records::Records;
use crate::store::StoreClient;

/// File names inside an image dir.
pub const ROOTFS: &str = "rootfs.ext4";
pub const WORK_SEED: &str = "work-seed.ext4";

/// How long the last step of a pull or build waits for a registry actor
/// that is being restarted.
pub const PUBLISH_PATIENCE: Duration = Duration::from_secs(10);

/// Image-related settings from the daemon's config.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    pub max_image_bytes: u64,
    pub default_kernel: Option<String>,
    pub kernel_catalog: Option<PathBuf>,
    /// The config dir, where the managed SSH key lives.
    pub config_dir: PathBuf,
    /// The guest agent binary injected into images (none: images get no
    /// agent and VMs are reached by SSH only).
    pub agent_path: Option<PathBuf>,
}

/// Tells whether VMs use an image (the VM manager answers; until it
/// exists no VM uses anything).
pub trait ImageUsers: Send + Sync + std::fmt::Debug {
    fn users(&self, image: &str) -> Vec<String>;
}

#[derive(Debug)]
pub struct NoVms;

impl ImageUsers for NoVms {
    fn users(&self, _image: &str) -> Vec<String> {
        Vec::new()
    }
}

/// An image fully staged in `staging`, waiting for publication. Paths in
/// `info` are relative to the image dir and made absolute on publication
/// (managed images), or already absolute (unmanaged ones).
#[derive(Debug, Clone)]
pub struct StagedImage {
    pub staging: Option<PathBuf>,
    pub info: ImageInfo,
}

#[derive(Debug)]
pub enum ImagesMsg {
    List(RpcReplyPort<Vec<ImageInfo>>),
    Get {
        name: String,
        reply: RpcReplyPort<Option<ImageInfo>>,
    },
    Publish {
        staged: StagedImage,
        reply: RpcReplyPort<Result<ImageInfo, ErrorData>>,
    },
    /// Replaces an unmanaged image by its managed copy (promotion).
    Replace {
        staged: StagedImage,
        reply: RpcReplyPort<Result<ImageInfo, ErrorData>>,
    },
    Delete {
        name: String,
        reply: RpcReplyPort<Result<ImageInfo, ErrorData>>,
    },
    /// Layer digests referenced by any image or pinned by a pull in
    /// progress (for the cache's prune).
    ReferencedLayers(RpcReplyPort<HashSet<String>>),
    /// A pull in progress uses these layers: prune must keep them.
    Pin {
        pull: String,
        layers: Vec<String>,
    },
    Unpin {
        pull: String,
    },
}

#[derive(Debug, Clone, Copy)]
pub struct ImageRegistry;

#[derive(Debug, Clone)]
pub struct ImagesArgs {
    pub layout: Layout,
    pub store_timeout: Duration,
    pub users: Arc<dyn ImageUsers>,
}

#[derive(Debug)]
pub struct ImagesState {
    records: Records<ImageInfo>,
    store: StoreClient,
    layout: Layout,
    users: Arc<dyn ImageUsers>,
    /// Layers of pulls in progress, by pull id. Lost on a restart: a pull
    /// running across a restart is only protected again when it re-pins.
    pinned: std::collections::HashMap<String, Vec<String>>,
}

impl Actor for ImageRegistry {
    type Msg = ImagesMsg;
    type State = ImagesState;
    type Arguments = ImagesArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<ImagesMsg>,
        args: ImagesArgs,
    ) -> Result<ImagesState, ActorProcessingErr> {
        let store = StoreClient::new(args.store_timeout);
        let records = Records::load(&store).await?;
        let dir = args.layout.images_dir();
        // Staging dirs are not cleaned here: after a restart of this actor,
        // pulls that were in flight still own theirs. The daemon removes
        // leftovers of a previous run at start-up (`Layout::reconcile`).
        std::fs::create_dir_all(&dir)?;
        Ok(ImagesState {
            records,
            store,
            layout: args.layout,
            users: args.users,
            pinned: Default::default(),
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ImagesMsg>,
        msg: ImagesMsg,
        state: &mut ImagesState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            ImagesMsg::List(reply) => {
                let _ = reply.send(state.records.list());
            }
            ImagesMsg::Get { name, reply } => {
                let _ = reply.send(state.records.get(&name).cloned());
            }
            ImagesMsg::Publish { staged, reply } => {
                let _ = reply.send(publish(state, staged, false).await);
            }
            ImagesMsg::Replace { staged, reply } => {
                let _ = reply.send(publish(state, staged, true).await);
            }
            ImagesMsg::Delete { name, reply } => {
                let _ = reply.send(delete(state, &name).await);
            }
            ImagesMsg::ReferencedLayers(reply) => {
                let layers = state
                    .records
                    .iter()
                    .flat_map(|i| i.layers.iter().cloned())
                    .chain(state.pinned.values().flatten().cloned())
                    .collect();
                let _ = reply.send(layers);
            }
            ImagesMsg::Pin { pull, layers } => {
                state.pinned.insert(pull, layers);
            }
            ImagesMsg::Unpin { pull } => {
                state.pinned.remove(&pull);
            }
        }
        Ok(())
    }
}

fn absolutise(dir: &Path, rel: &str) -> String {
    dir.join(rel).display().to_string()
}

/// The last step of a pull, build, registration or promotion: hands the
/// staged image to the registry's publication window (waiting out a
/// restart of the registry) and, once published, disarms the staging
/// guard. `replace` swaps an existing record (promotion).
pub async fn publish_staged(
    staging: crate::layout::StagingDir,
    info: ImageInfo,
    replace: bool,
    timeout: Duration,
) -> Result<ImageInfo, ErrorData> {
    let staged = StagedImage {
        staging: Some(staging.path().to_path_buf()),
        info,
    };
    let info = crate::ask::ask_patiently(
        crate::names::IMAGES,
        |reply| {
            let staged = staged.clone();
            if replace {
                ImagesMsg::Replace { staged, reply }
            } else {
                ImagesMsg::Publish { staged, reply }
            }
        },
        timeout,
        PUBLISH_PATIENCE,
    )
    .await??;
    staging.keep();
    Ok(info)
}

/// Builds the work seed `<staging>/work-seed.ext4` from `<tree>/root`.
pub async fn build_work_seed(tree: &Path, staging: &Path) -> Result<PathBuf, ErrorData> {
    let root_dir = tree.join("root");
    let seed = staging.join(WORK_SEED);
    let bytes = crate::fsutil::tree_bytes(&root_dir);
    banger_image::ext4::build_from_dir(
        &root_dir,
        &seed,
        inject::work_seed_size(bytes),
        inject::WORK_LABEL,
    )
    .await
    .map_err(|e| pull::ext4_error(&e))?;
    Ok(seed)
}

/// The publication window: name check, atomic rename, durable record.
/// Announces the `inject` stage (the same words for pulls and builds).
pub(crate) async fn announce_inject(rctx: &crate::router::dispatch::RequestCtx) {
    rctx.progress(
        "inject",
        "SSH key, hostname, network bootstrap".into(),
        None,
    )
    .await;
}

async fn publish(
    state: &mut ImagesState,
    staged: StagedImage,
    replace: bool,
) -> Result<ImageInfo, ErrorData> {
    let mut info = staged.info;
    if replace {
        state.records.require(&info.name)?;
    } else {
        state.records.ensure_free(&info.name)?;
    }
    let mut published_dir = None;
    if let Some(staging) = staged.staging {
        let dir = state.layout.images_dir().join(&info.id);
        std::fs::rename(&staging, &dir).map_err(|e| {
            ErrorData::from_error(ErrorKind::Internal, &e)
                .with_cause(format!("publishing {}", dir.display()))
        })?;
        info.rootfs_path = absolutise(&dir, &info.rootfs_path);
        info.work_seed_path = info.work_seed_path.map(|p| absolutise(&dir, &p));
        published_dir = Some(dir);
    }
    if let Err(err) = state.records.insert(&state.store, info.clone()).await {
        if let Some(dir) = published_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
        return Err(err);
    }
    info!(image = %info.name, id = %info.id, managed = info.managed, "image published");
    Ok(info)
}

async fn delete(state: &mut ImagesState, name: &str) -> Result<ImageInfo, ErrorData> {
    let users = state.users.users(name);
    if !users.is_empty() {
        return Err(ErrorData::new(
            ErrorKind::InvalidState,
            format!("image `{name}` is used by VM(s): {}", users.join(", ")),
        )
        .with_hint("delete those VMs first"));
    }
    let info = state.records.remove(&state.store, name).await?;
    if info.managed {
        let dir = state.layout.images_dir().join(&info.id);
        tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir));
    }
    info!(image = %name, "image deleted");
    Ok(info)
}

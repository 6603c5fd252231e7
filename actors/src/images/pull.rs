//! `banger image pull`: resolve → download (layers in parallel, cached by
//! digest) → extract (the layers unpacked in order, hostile-input safe,
//! into a new tree cache entry, and a hardlink farm of it made in the
//! staging dir; nothing when the tree cache has the entry already) →
//! inject → build (ext4 rootfs and work seed) → publish.
//!
//! **Warm** (the tree cache has a sound entry for these layers), nothing
//! is copied or linked: `mkfs.ext4 -d` reads the cached tree itself, which
//! is never changed; injection is planned against it ([`inject::plan`])
//! and made inside the built image with `debugfs`, after the tree's
//! fixups; the tree's measurement comes from the entry's `meta.json`; and
//! the tree's fingerprint is checked while mkfs runs. An entry that fails
//! the check is discarded with the images built from it, and the pull
//! unpacks the layers again.
//!
//! Everything before publication happens in `<images>/<id>.staging` (and
//! an entry's `.tmp` dir in the tree cache) in the request task; a failure
//! or a cancellation (the future is dropped) removes it.

use std::path::Path;
use std::time::Instant;

use banger_image::cache::{LayerCache, Verify};
use banger_image::ext4::{self, Ext4Error};
use banger_image::registry::{self, Platform, PullEvent, PullOptions};
use banger_image::treecache::{CachedTree, FarmError, Lookup, TreeCache, TreeKey, TreeLock};
use banger_image::unpack::{Limits, UnpackedTree, Unpacker};
use banger_protocol::{ErrorData, ErrorKind, ImageInfo, ImagePullRequest, ImageRuntimeConfig};
use tokio::sync::mpsc;

use super::{inject, ImageSettings, ImagesMsg, ROOTFS, WORK_SEED};
use crate::ask::{ask, lookup, offload};
use crate::layout::{new_id, Layout, StagingDir};
use crate::names;
use crate::records::validate_name;
use crate::router::dispatch::{ProgressSink, RequestCtx};
use crate::unix_ms;

pub(crate) fn err_of(kind: ErrorKind, err: &(dyn std::error::Error + 'static)) -> ErrorData {
    ErrorData::from_error(kind, err)
}

pub(crate) fn ext4_error(err: &Ext4Error) -> ErrorData {
    match err {
        Ext4Error::TooSmall { needed, .. } => err_of(ErrorKind::InvalidRequest, err)
            .with_hint(format!("pass --size {}M or more", needed.div_ceil(1 << 20))),
        _ => err_of(ErrorKind::Internal, err),
    }
}

/// Keeps a pull's layers out of `image prune` while it runs.
struct Pin {
    pull: String,
}

impl Pin {
    fn new(pull: &str, layers: Vec<String>) -> Self {
        if let Ok(images) = lookup::<ImagesMsg>(names::IMAGES) {
            let _ = images.cast(ImagesMsg::Pin {
                pull: pull.to_string(),
                layers,
            });
        }
        Pin {
            pull: pull.to_string(),
        }
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        if let Ok(images) = lookup::<ImagesMsg>(names::IMAGES) {
            let _ = images.cast(ImagesMsg::Unpin {
                pull: self.pull.clone(),
            });
        }
    }
}

/// Fails early when `name` is taken (the publication window re-checks).
pub(crate) async fn ensure_name_free(name: &str, rctx: &RequestCtx) -> Result<(), ErrorData> {
    let timeout = rctx.ctx.request_timeout;
    let existing = ask(
        names::IMAGES,
        |reply| ImagesMsg::Get {
            name: name.to_string(),
            reply,
        },
        timeout,
    )
    .await?;
    if existing.is_some() {
        return Err(ErrorData::new(
            ErrorKind::AlreadyExists,
            format!("image name `{name}` is taken"),
        )
        .with_hint(format!(
            "pick another with --name, or delete it first: banger image delete {name}"
        )));
    }
    Ok(())
}

pub async fn pull(
    req: ImagePullRequest,
    rctx: &RequestCtx,
    settings: &ImageSettings,
    layout: &Layout,
) -> Result<ImageInfo, ErrorData> {
    let reference = registry::parse_reference(&req.reference)
        .map_err(|e| err_of(ErrorKind::InvalidRequest, &e))?;
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| registry::default_image_name(&reference));
    validate_name("image", &name)?;
    ensure_name_free(&name, rctx).await?;
    let kernel = match req
        .kernel
        .clone()
        .or_else(|| settings.default_kernel.clone())
    {
        Some(k) => Some(
            crate::kernels::catalog::ensure_kernel(&k, rctx, settings, layout)
                .await?
                .name,
        ),
        None => None,
    };
    let platform: Platform = match &req.platform {
        Some(p) => p
            .parse()
            .map_err(|e: registry::ParsePlatformError| err_of(ErrorKind::InvalidRequest, &e))?,
        None => Platform::default(),
    };
    let opts = PullOptions {
        platform,
        insecure: req.insecure,
        ..PullOptions::default()
    };

    let stage_started = Instant::now();
    rctx.progress("resolve", format!("resolving {reference}"), None)
        .await;
    let resolved = registry::resolve(&reference, &opts)
        .await
        .map_err(|e| err_of(pull_kind(&e), &e))?;
    let total: u64 = resolved.layers.iter().map(|l| l.size).sum();
    rctx.progress(
        "resolve",
        format!(
            "{} ({}), {} layers, {} compressed, in {:.1}s",
            resolved.manifest_digest,
            resolved.platform.as_deref().unwrap_or("unknown platform"),
            resolved.layers.len(),
            human_bytes(total),
            stage_started.elapsed().as_secs_f64()
        ),
        None,
    )
    .await;

    let id = new_id();
    let staging = StagingDir::create(Layout::staging(&layout.images_dir(), &id))
        .map_err(|e| err_of(ErrorKind::Internal, &e))?;
    let layer_digests: Vec<String> = resolved.layer_digests().map(str::to_string).collect();
    let _pin = Pin::new(&id, layer_digests.clone());

    // Download.
    let stage_started = Instant::now();
    let cache =
        LayerCache::open(layout.layers_dir()).map_err(|e| err_of(ErrorKind::Internal, &e))?;
    let (tx, mut rx) = mpsc::channel::<PullEvent>(64);
    let fetch = registry::fetch_layers(&resolved, &cache, &opts, tx, rctx.cancel.clone());
    tokio::pin!(fetch);
    let report = |event: PullEvent| {
        let PullEvent::Layer {
            digest,
            bytes_done,
            bytes_total,
            cached,
        } = event;
        let detail = if cached {
            format!("layer {} (cached)", short(&digest))
        } else {
            format!("layer {}", short(&digest))
        };
        (detail, (bytes_done, bytes_total))
    };
    let layers = loop {
        tokio::select! {
            res = &mut fetch => break res.map_err(|e| err_of(pull_kind(&e), &e))?,
            Some(event) = rx.recv() => {
                let (detail, bytes) = report(event);
                rctx.progress("download", detail, Some(bytes)).await;
            }
        }
    };
    // Events sent just before the fetch finished (cached layers among them).
    while let Ok(event) = rx.try_recv() {
        let (detail, bytes) = report(event);
        rctx.progress("download", detail, Some(bytes)).await;
    }
    let fetched = layers.iter().filter(|l| !l.cached).count();
    rctx.progress(
        "download",
        format!(
            "{fetched} downloaded, {} cached, in {:.1}s",
            layers.len() - fetched,
            stage_started.elapsed().as_secs_f64()
        ),
        None,
    )
    .await;

    // Extract: nothing when the tree cache has these layers' tree (the
    // build reads it), else the layers unpacked into a new tree cache
    // entry and farmed from it.
    let stage_started = Instant::now();
    let tree_dir = staging.path().join("tree");
    let limits = Limits {
        max_image_bytes: settings.max_image_bytes,
        ..Limits::default()
    };
    let tree_key = TreeKey::new(
        layers
            .iter()
            .map(|l| (l.descriptor.digest.clone(), l.descriptor.compression())),
    );
    let trees = cache
        .trees()
        .ok()
        .filter(|t| t.can_farm_into(staging.path()));
    let key = inject::ensure_ssh_key(&settings.config_dir)?;
    let metadata = serde_json::json!({
        "name": name,
        "source": "oci",
        "reference": reference.to_string(),
        "manifest_digest": resolved.manifest_digest,
        "platform": resolved.platform,
    });
    let ctx = BuildCtx {
        name: &name,
        key: &key,
        metadata: &metadata,
        agent: settings.agent_path.as_deref(),
        staging: staging.path(),
        size: req.size,
        rctx,
    };
    let mut warm_allowed = true;
    let (stats, injected) = loop {
        let extracted = match &trees {
            Some(trees) => {
                extract_via_cache(
                    trees,
                    &tree_key,
                    layers.clone(),
                    &cache,
                    limits,
                    &tree_dir,
                    warm_allowed,
                    rctx,
                )
                .await?
            }
            None => Extracted::Tree {
                tree: unpack_into(&tree_dir, layers.clone(), &cache, limits, rctx).await?,
                how: "the tree cache is not usable here".into(),
            },
        };
        let (how, entries, bytes) = match &extracted {
            Extracted::Tree { tree, how } => (how.clone(), tree.entries, tree.bytes_written),
            Extracted::Cached { entry, how, .. } => {
                (how.clone(), entry.entries(), entry.bytes_written())
            }
        };
        rctx.progress(
            "extract",
            format!(
                "{} in {entries} entries, {how}, in {:.1}s",
                human_bytes(bytes),
                stage_started.elapsed().as_secs_f64()
            ),
            None,
        )
        .await;
        match extracted {
            Extracted::Tree { tree, .. } => {
                break build_from_tree(&ctx, tree, trees.as_ref(), &tree_key).await?;
            }
            Extracted::Cached { entry, lock, .. } => {
                let Some(trees) = &trees else {
                    unreachable!("a cached tree without a tree cache")
                };
                match build_from_cache(&ctx, trees, &entry).await? {
                    Ok(built) => break built,
                    Err(why) => {
                        tracing::warn!(key = tree_key.hex(), %why, "cached tree damaged; unpacking again");
                        rctx.progress(
                            "extract",
                            format!(
                                "the cached tree {} is damaged ({why}); unpacking again",
                                tree_key.short()
                            ),
                            None,
                        )
                        .await;
                        trees.discard(&tree_key);
                        drop(lock);
                        warm_allowed = false;
                    }
                }
            }
        }
    };

    // Publish.
    let config = &resolved.config;
    let info = ImageInfo {
        id: id.clone(),
        name: name.clone(),
        managed: true,
        source: format!("oci {reference}@{}", resolved.manifest_digest),
        rootfs_path: ROOTFS.to_string(),
        rootfs_bytes: stats.size,
        work_seed_path: Some(WORK_SEED.to_string()),
        kernel,
        created_unix_ms: unix_ms(),
        layers: layer_digests,
        platform: resolved.platform.clone(),
        has_init: injected.facts.has_init,
        has_sshd: injected.facts.has_sshd,
        has_systemd: injected.facts.has_systemd,
        has_agent: injected.agent,
        runtime: ImageRuntimeConfig {
            entrypoint: config.entrypoint.clone().unwrap_or_default(),
            cmd: config.cmd.clone().unwrap_or_default(),
            env: config.env.clone(),
            working_dir: config.working_dir.clone().unwrap_or_default(),
            user: config.user.clone().unwrap_or_default(),
        },
    };
    let info = super::publish_staged(staging, info, false, rctx.ctx.request_timeout).await?;
    rctx.progress("publish", format!("image {name} ready"), None)
        .await;
    Ok(info)
}

/// What the inject and build stages need besides the tree.
struct BuildCtx<'a> {
    name: &'a str,
    key: &'a inject::ManagedKey,
    metadata: &'a serde_json::Value,
    agent: Option<&'a Path>,
    staging: &'a Path,
    size: Option<u64>,
    rctx: &'a RequestCtx,
}

/// Inject into the pull's own tree (a farm or an unpacked tree), then
/// build the rootfs and the work seed from it, then get rid of it.
async fn build_from_tree(
    ctx: &BuildCtx<'_>,
    tree: UnpackedTree,
    trees: Option<&TreeCache>,
    tree_key: &TreeKey,
) -> Result<(ext4::Ext4Stats, inject::Injected), ErrorData> {
    let rctx = ctx.rctx;
    let stage_started = Instant::now();
    super::announce_inject(rctx).await;
    let (tree_path, inject_name) = (tree.root.clone(), ctx.name.to_string());
    let (key, metadata) = (ctx.key.clone(), ctx.metadata.clone());
    let agent = ctx.agent.map(Path::to_path_buf);
    let injected = tokio::task::spawn_blocking(move || {
        inject::inject(&tree_path, &inject_name, &key, &metadata, agent.as_deref())
    })
    .await
    .map_err(|e| ErrorData::new(ErrorKind::Internal, format!("injection task failed: {e}")))??;
    rctx.progress(
        "inject",
        format!(
            "SSH key, hostname, network bootstrap, in {:.1}s",
            stage_started.elapsed().as_secs_f64()
        ),
        None,
    )
    .await;

    let stage_started = Instant::now();
    rctx.progress("build", "ext4 rootfs and work seed".into(), None)
        .await;
    let rootfs = ctx.staging.join(ROOTFS);
    // Both read the finished tree; mkfs.ext4 is single-threaded.
    let seed_started = Instant::now();
    let (stats, seed) = tokio::join!(ext4::build_rootfs(&tree, &rootfs, ctx.size), async {
        let seed = super::build_work_seed(&tree.root, ctx.staging).await;
        (seed, seed_started.elapsed())
    });
    // The tree must leave the staging dir before it is published; it is
    // removed in the background.
    let tree_root = tree.root.clone();
    let disposal = trees.cloned();
    let dispose_key = tree_key.clone();
    let _ = tokio::task::spawn_blocking(move || match disposal {
        Some(trees) => trees.dispose(&dispose_key, &tree_root),
        None => {
            let _ = std::fs::remove_dir_all(&tree_root);
        }
    })
    .await;
    let stats = stats.map_err(|e| ext4_error(&e))?;
    let (seed, seed_took) = seed;
    seed?;
    let t = &stats.timings;
    rctx.progress(
        "build",
        format!(
            "rootfs {} (tree {}), work seed, in {:.1}s (measure {}, mkfs.ext4 {}, fixups {}; work seed {})",
            human_bytes(stats.size),
            human_bytes(stats.tree_bytes),
            stage_started.elapsed().as_secs_f64(),
            ms(t.measure),
            ms(t.mkfs),
            ms(t.fixups),
            ms(seed_took),
        ),
        None,
    )
    .await;
    Ok((stats, injected))
}

/// The warm path: builds the rootfs and the work seed straight from the
/// cached tree (never changed), with banger's injection planned against
/// it and made inside the images with debugfs, while the tree is checked
/// against its fingerprint. `Ok(Err(why))`: the entry is damaged and the
/// images built from it were removed.
async fn build_from_cache(
    ctx: &BuildCtx<'_>,
    trees: &TreeCache,
    entry: &CachedTree,
) -> Result<Result<(ext4::Ext4Stats, inject::Injected), String>, ErrorData> {
    let rctx = ctx.rctx;
    let tree_dir = entry.tree_dir();
    let stage_started = Instant::now();
    super::announce_inject(rctx).await;
    let planned = {
        let (tree_dir, name) = (tree_dir.clone(), ctx.name.to_string());
        let (key, metadata) = (ctx.key.clone(), ctx.metadata.clone());
        let agent = ctx.agent.map(Path::to_path_buf);
        blocking(move || inject::plan(&tree_dir, &name, &key, &metadata, agent.as_deref())).await
    };
    let (injected, edits) = planned?;
    let edits = without_overridden(edits, entry.fixups());
    rctx.progress(
        "inject",
        format!(
            "SSH key, hostname, network bootstrap ({} changes to make in the image), in {:.1}s",
            edits.len(),
            stage_started.elapsed().as_secs_f64()
        ),
        None,
    )
    .await;

    let stage_started = Instant::now();
    rctx.progress("build", "ext4 rootfs and work seed".into(), None)
        .await;
    // The measurement: from meta.json, or (older entries) by walking.
    let mut usage = match entry.usage() {
        Some(usage) => usage,
        None => {
            let dir = tree_dir.clone();
            blocking(move || ext4::measure_tree(&dir).map_err(|e| err_of(ErrorKind::Internal, &e)))
                .await?
        }
    };
    let measured = stage_started.elapsed();
    for edit in &edits {
        add_usage(&mut usage, &edit.usage());
    }
    // The work seed: the cached /root (or nothing) plus what injection
    // puts under /root.
    let cached_root = tree_dir.join("root");
    let seed_edits: Vec<ext4::Edit> = edits
        .iter()
        .filter_map(|e| e.rebased(Path::new("/root")))
        .collect();
    let empty_root = ctx.staging.join("seed-root");
    let seed_src = if std::fs::symlink_metadata(&cached_root).is_ok_and(|m| m.is_dir()) {
        cached_root
    } else {
        std::fs::create_dir(&empty_root).map_err(|e| err_of(ErrorKind::Internal, &e))?;
        empty_root.clone()
    };
    let seed_bytes = {
        let src = seed_src.clone();
        blocking(move || Ok(crate::fsutil::tree_bytes(&src))).await?
    } + seed_edits
        .iter()
        .map(|e| e.usage().apparent_bytes)
        .sum::<u64>();
    let rootfs = ctx.staging.join(ROOTFS);
    let seed_path = ctx.staging.join(WORK_SEED);
    let started = Instant::now();
    let checking = {
        let (trees, entry) = (trees.clone(), entry.clone());
        tokio::task::spawn_blocking(move || {
            let result = trees.verify(&entry);
            (result, started.elapsed())
        })
    };
    let (stats, seed, checked) = tokio::join!(
        ext4::build_rootfs_from(&tree_dir, usage, entry.fixups(), &edits, &rootfs, ctx.size),
        async {
            let seed = ext4::build_from_dir_with(
                &seed_src,
                &seed_path,
                inject::work_seed_size(seed_bytes),
                inject::WORK_LABEL,
                &seed_edits,
            )
            .await;
            (seed, started.elapsed())
        },
        checking
    );
    if seed_src == empty_root {
        let _ = std::fs::remove_dir(&empty_root);
    }
    let (checked, check_took) = checked
        .map_err(|e| ErrorData::new(ErrorKind::Internal, format!("worker thread failed: {e}")))?;
    if let Err(e) = checked {
        let _ = std::fs::remove_file(&rootfs);
        let _ = std::fs::remove_file(&seed_path);
        let why = match e {
            FarmError::Damaged(why) | FarmError::Unusable(why) => why,
        };
        return Ok(Err(why));
    }
    let stats = stats.map_err(|e| ext4_error(&e))?;
    let (seed, seed_took) = seed;
    seed.map_err(|e| ext4_error(&e))?;
    let t = &stats.timings;
    rctx.progress(
        "build",
        format!(
            "rootfs {} (tree {}), work seed, in {:.1}s (measure {}, mkfs.ext4 {}, fixups and injection {}; work seed {}; cached tree checked in {})",
            human_bytes(stats.size),
            human_bytes(stats.tree_bytes),
            stage_started.elapsed().as_secs_f64(),
            ms(measured),
            ms(t.mkfs),
            ms(t.fixups),
            ms(seed_took),
            ms(check_took),
        ),
        None,
    )
    .await;
    Ok(Ok((stats, injected)))
}

/// Drops the mode and owner changes that the tree's own fixups override:
/// on the host tree injection's `chmod`/`chown` came before mkfs and the
/// fixups after it, so a fixup's mode or owner of the same path won.
fn without_overridden(
    edits: Vec<ext4::Edit>,
    fixups: &[banger_image::unpack::Fixup],
) -> Vec<ext4::Edit> {
    edits
        .into_iter()
        .filter(|edit| match edit {
            ext4::Edit::SetMode { path, .. } => {
                !fixups.iter().any(|f| &f.path == path && f.mode.is_some())
            }
            ext4::Edit::SetOwner { path, .. } => {
                !fixups.iter().any(|f| &f.path == path && f.owner.is_some())
            }
            _ => true,
        })
        .collect()
}

fn add_usage(total: &mut ext4::TreeUsage, more: &ext4::TreeUsage) {
    total.files += more.files;
    total.dirs += more.dirs;
    total.symlinks += more.symlinks;
    total.others += more.others;
    total.apparent_bytes += more.apparent_bytes;
    total.data_blocks += more.data_blocks;
}

/// The pull's tree and how it was made (for the `extract` stage's detail).
enum Extracted {
    /// A tree of the pull's own (a farm, or unpacked into staging).
    Tree { tree: UnpackedTree, how: String },
    /// A sound cache entry to build from directly; its lock is held until
    /// the build is over, so that no other pull of this process discards
    /// it meanwhile.
    Cached {
        entry: Box<CachedTree>,
        lock: TreeLock,
        how: String,
    },
}

/// Makes the pull's tree at `dest` through the tree cache, or finds the
/// cached tree of `key` to build from directly (when `warm` and there is a
/// sound one). Otherwise the layers are unpacked into a new entry and
/// farmed from it. Builders of one key take turns (the others then find
/// the entry); a damaged entry is discarded and rebuilt; a farm that cannot
/// be made here falls back to unpacking into `dest` directly.
#[allow(clippy::too_many_arguments)]
async fn extract_via_cache(
    trees: &TreeCache,
    key: &TreeKey,
    layers: Vec<registry::CachedLayer>,
    cache: &LayerCache,
    limits: Limits,
    dest: &Path,
    warm: bool,
    rctx: &RequestCtx,
) -> Result<Extracted, ErrorData> {
    let lock = trees.lock(key).await;
    let lookup = if warm {
        let (trees, key) = (trees.clone(), key.clone());
        blocking(move || Ok(trees.lookup(&key, &limits))).await?
    } else {
        Lookup::Miss
    };
    match lookup {
        Lookup::Hit(entry) => {
            rctx.progress(
                "extract",
                format!(
                    "building from the cached tree {} of {} layers ({} entries)",
                    key.short(),
                    layers.len(),
                    entry.entries()
                ),
                None,
            )
            .await;
            return Ok(Extracted::Cached {
                entry,
                lock,
                how: "from the tree cache (read in place, checked during the build)".into(),
            });
        }
        Lookup::Damaged(why) => {
            tracing::warn!(key = key.hex(), %why, "cached tree unusable; unpacking again");
            rctx.progress(
                "extract",
                format!(
                    "the cached tree {} is not trusted ({why}); unpacking again",
                    key.short()
                ),
                None,
            )
            .await;
            trees.discard(key);
        }
        Lookup::OverLimits(why) => {
            tracing::info!(key = key.hex(), %why, "cached tree over the limits; unpacking");
        }
        Lookup::Miss => {}
    }
    let build = trees
        .begin(key)
        .map_err(|e| err_of(ErrorKind::Internal, &e))?;
    let unpacker =
        Unpacker::new(&build.tree_dir(), limits).map_err(|e| err_of(ErrorKind::Internal, &e))?;
    let started = Instant::now();
    let tree = unpack_layers(
        unpacker,
        layers,
        cache.clone(),
        rctx.sink(),
        rctx.cancel.clone(),
    )
    .await?;
    let unpacked = started.elapsed();
    let started = Instant::now();
    let committed = {
        let dest = dest.to_path_buf();
        blocking(move || {
            build
                .commit(tree, &dest)
                .map_err(|e| err_of(ErrorKind::Internal, &e))
        })
        .await?
    };
    let times = format!(
        "unpacked in {}, linked in {}",
        ms(unpacked),
        ms(started.elapsed())
    );
    let how = match committed.note {
        None => format!("tree cached for later pulls ({times})"),
        Some(note) => format!("tree not cached: {note} ({times})"),
    };
    drop(lock);
    Ok(Extracted::Tree {
        tree: committed.tree,
        how,
    })
}

/// Unpacks the layers straight into `dest` (no tree cache).
async fn unpack_into(
    dest: &Path,
    layers: Vec<registry::CachedLayer>,
    cache: &LayerCache,
    limits: Limits,
    rctx: &RequestCtx,
) -> Result<UnpackedTree, ErrorData> {
    std::fs::create_dir_all(dest).map_err(|e| err_of(ErrorKind::Internal, &e))?;
    let unpacker = Unpacker::new(dest, limits).map_err(|e| err_of(ErrorKind::Internal, &e))?;
    unpack_layers(
        unpacker,
        layers,
        cache.clone(),
        rctx.sink(),
        rctx.cancel.clone(),
    )
    .await
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ErrorData> + Send + 'static,
) -> Result<T, ErrorData> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ErrorData::new(ErrorKind::Internal, format!("worker thread failed: {e}")))?
}

/// Applies the layers in order. Decompression and tar parsing are CPU
/// work: they run on a blocking-pool thread with a runtime of their own,
/// so the daemon's async workers keep serving other requests meanwhile.
async fn unpack_layers(
    mut unpacker: Unpacker,
    layers: Vec<registry::CachedLayer>,
    cache: LayerCache,
    sink: ProgressSink,
    cancel: tokio_util::sync::CancellationToken,
) -> Result<UnpackedTree, ErrorData> {
    let work = async move {
        let n = layers.len();
        for (i, layer) in layers.iter().enumerate() {
            let d = &layer.descriptor;
            sink.progress(
                "extract",
                format!("layer {}/{n} {}", i + 1, short(&d.digest)),
                Some((i as u64, n as u64)),
            )
            .await;
            let blob = cache
                .open_blob(&d.digest, d.size, Verify::Size)
                .await
                .map_err(|e| err_of(ErrorKind::Internal, &e))?;
            unpacker
                .apply_layer(&d.digest, d.compression(), blob)
                .await
                .map_err(|e| {
                    err_of(ErrorKind::InvalidRequest, &e).with_hint(
                        "the image's layers are malformed or hostile; banger refused them",
                    )
                })?;
        }
        Ok(unpacker.finish())
    };
    offload(cancel, move || work).await
}

fn pull_kind(err: &registry::PullError) -> ErrorKind {
    use registry::PullError as E;
    match err {
        E::InvalidReference { .. } | E::PlatformUnavailable { .. } | E::PlatformMismatch { .. } => {
            ErrorKind::InvalidRequest
        }
        E::NotFound { .. } => ErrorKind::NotFound,
        E::Unauthorized { .. } => ErrorKind::PermissionDenied,
        E::Unreachable { .. } | E::Download { .. } => ErrorKind::Unavailable,
        E::Cancelled => ErrorKind::Cancelled,
        _ => ErrorKind::InvalidRequest,
    }
}

fn ms(d: std::time::Duration) -> String {
    format!("{}ms", d.as_millis())
}

pub(crate) fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

//! `banger image pull`: resolve → download (layers in parallel, cached by
//! digest) → extract (a hardlink farm of the tree cache's entry for these
//! layers, or the layers unpacked in order, hostile-input safe, into a new
//! entry) → inject → build (ext4 rootfs and work seed) → publish.
//! Everything before publication happens in `<images>/<id>.staging` (and
//! an entry's `.tmp` dir in the tree cache) in the request task; a failure
//! or a cancellation (the future is dropped) removes it.

use std::path::Path;
use std::time::Instant;

use banger_image::cache::{LayerCache, Verify};
use banger_image::ext4::{self, Ext4Error};
use banger_image::registry::{self, Platform, PullEvent, PullOptions};
use banger_image::treecache::{FarmError, Lookup, TreeCache, TreeKey};
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

    // Extract: a hardlink farm of the cached tree of these layers, or the
    // layers unpacked into a new tree cache entry (and farmed from it).
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
    let extracted = match &trees {
        Some(trees) => {
            extract_via_cache(trees, &tree_key, layers, &cache, limits, &tree_dir, rctx).await?
        }
        None => Extracted {
            tree: unpack_into(&tree_dir, layers, &cache, limits, rctx).await?,
            how: "the tree cache is not usable here".into(),
        },
    };
    let tree = extracted.tree;
    rctx.progress(
        "extract",
        format!(
            "{} in {} entries, {}, in {:.1}s",
            human_bytes(tree.bytes_written),
            tree.entries,
            extracted.how,
            stage_started.elapsed().as_secs_f64()
        ),
        None,
    )
    .await;

    // Inject.
    let stage_started = Instant::now();
    rctx.progress(
        "inject",
        "SSH key, hostname, network bootstrap".into(),
        None,
    )
    .await;
    let key = inject::ensure_ssh_key(&settings.config_dir)?;
    let metadata = serde_json::json!({
        "name": name,
        "source": "oci",
        "reference": reference.to_string(),
        "manifest_digest": resolved.manifest_digest,
        "platform": resolved.platform,
    });
    let (tree_path, inject_name) = (tree.root.clone(), name.clone());
    let agent = settings.agent_path.clone();
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

    // Build.
    let stage_started = Instant::now();
    rctx.progress("build", "ext4 rootfs and work seed".into(), None)
        .await;
    let rootfs = staging.path().join(ROOTFS);
    // Both read the finished tree; mkfs.ext4 is single-threaded.
    let seed_started = Instant::now();
    let (stats, seed) = tokio::join!(ext4::build_rootfs(&tree, &rootfs, req.size), async {
        let seed = super::build_work_seed(&tree.root, staging.path()).await;
        (seed, seed_started.elapsed())
    });
    let stats = stats.map_err(|e| ext4_error(&e))?;
    let (seed, seed_took) = seed;
    seed?;
    // The tree must leave the staging dir before it is published; it is
    // removed in the background.
    let tree_root = tree.root.clone();
    let disposal = trees.clone();
    let dispose_key = tree_key.clone();
    let _ = tokio::task::spawn_blocking(move || match disposal {
        Some(trees) => trees.dispose(&dispose_key, &tree_root),
        None => {
            let _ = std::fs::remove_dir_all(&tree_root);
        }
    })
    .await;
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

/// The pull's tree and how it was made (for the `extract` stage's detail).
struct Extracted {
    tree: UnpackedTree,
    how: String,
}

/// Makes the pull's tree at `dest` through the tree cache: a farm of the
/// cached tree of `key` when there is a sound one, else the layers
/// unpacked into a new entry, farmed from it. Builders of one key take
/// turns (the others then find the entry); a damaged entry is discarded
/// and rebuilt; a farm that cannot be made here falls back to unpacking
/// into `dest` directly.
async fn extract_via_cache(
    trees: &TreeCache,
    key: &TreeKey,
    layers: Vec<registry::CachedLayer>,
    cache: &LayerCache,
    limits: Limits,
    dest: &Path,
    rctx: &RequestCtx,
) -> Result<Extracted, ErrorData> {
    let _lock = trees.lock(key).await;
    let lookup = {
        let (trees, key) = (trees.clone(), key.clone());
        blocking(move || Ok(trees.lookup(&key, &limits))).await?
    };
    match lookup {
        Lookup::Hit(entry) => {
            rctx.progress(
                "extract",
                format!(
                    "linking the cached tree {} of {} layers ({} entries)",
                    key.short(),
                    layers.len(),
                    entry.entries()
                ),
                None,
            )
            .await;
            let started = Instant::now();
            let farmed = {
                let (trees, dest) = (trees.clone(), dest.to_path_buf());
                blocking(move || Ok(trees.farm(&entry, &dest))).await?
            };
            match farmed {
                Ok(tree) => {
                    return Ok(Extracted {
                        tree,
                        how: format!("from the tree cache (linked in {})", ms(started.elapsed())),
                    })
                }
                Err(FarmError::Damaged(why)) => {
                    tracing::warn!(key = key.hex(), %why, "cached tree damaged; unpacking again");
                    rctx.progress(
                        "extract",
                        format!(
                            "the cached tree {} is damaged ({why}); unpacking again",
                            key.short()
                        ),
                        None,
                    )
                    .await;
                    trees.discard(key);
                }
                Err(FarmError::Unusable(why)) => {
                    tracing::info!(key = key.hex(), %why, "cannot link the cached tree; unpacking");
                    return Ok(Extracted {
                        tree: unpack_into(dest, layers, cache, limits, rctx).await?,
                        how: format!("tree cache not used: {why}"),
                    });
                }
            }
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
    Ok(Extracted {
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

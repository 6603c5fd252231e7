//! Request handling for images and kernels: short queries go straight to
//! the owning actor; pulls, builds and imports run here, in the request
//! task, and end in the actor's publication window.

use std::collections::HashSet;

use banger_image::cache::LayerCache;
use banger_protocol::{
    ErrorData, ErrorKind, ImageInfo, KernelInfo, PruneReport, Request, Response,
};

use super::dispatch::RequestCtx;
use crate::ask::ask;
use crate::images::{self, catalog::ImageCatalog, ImagesMsg};
use crate::kernels::{self, catalog::KernelCatalog, KernelsMsg};
use crate::layout::Layout;
use crate::names;
use crate::records::not_found;

pub async fn handle(request: Request, rctx: &RequestCtx) -> Result<Response, ErrorData> {
    let ctx = &rctx.ctx;
    let timeout = ctx.request_timeout;
    let settings = &ctx.images;
    let layout = Layout::new(&ctx.info.state_dir);
    match request {
        Request::ImageList => ask(names::IMAGES, ImagesMsg::List, timeout)
            .await
            .map(Response::Images),
        Request::ImageShow { name } => {
            let image = ask(
                names::IMAGES,
                |reply| ImagesMsg::Get {
                    name: name.clone(),
                    reply,
                },
                timeout,
            )
            .await?;
            image
                .map(Response::Image)
                .ok_or_else(|| not_found::<ImageInfo>(&name))
        }
        Request::ImagePull(req) => images::pull::pull(req, rctx, settings, &layout)
            .await
            .map(Response::Image),
        Request::ImageRegister(req) => images::register::register(req, rctx, settings, &layout)
            .await
            .map(Response::Image),
        Request::ImagePromote { name } => images::register::promote(&name, rctx, &layout)
            .await
            .map(Response::Image),
        Request::ImageBuild(req) => images::build::build(req, rctx, settings, &layout)
            .await
            .map(Response::Image),
        Request::ImageDelete { name } => {
            let image = ask(
                names::IMAGES,
                |reply| ImagesMsg::Delete { name, reply },
                timeout,
            )
            .await??;
            Ok(Response::Deleted { name: image.name })
        }
        Request::ImagePrune => prune(rctx, &layout).await.map(Response::Pruned),
        Request::ImageCatalog => {
            let present: HashSet<String> = ask(names::IMAGES, ImagesMsg::List, timeout)
                .await?
                .into_iter()
                .map(|i| i.name)
                .collect();
            Ok(Response::ImageCatalog(
                ImageCatalog::embedded().entries(|n| present.contains(n)),
            ))
        }
        Request::KernelList => ask(names::KERNELS, KernelsMsg::List, timeout)
            .await
            .map(Response::Kernels),
        Request::KernelShow { name } => {
            let kernel = ask(
                names::KERNELS,
                |reply| KernelsMsg::Get {
                    name: name.clone(),
                    reply,
                },
                timeout,
            )
            .await?;
            kernel
                .map(Response::Kernel)
                .ok_or_else(|| not_found::<KernelInfo>(&name))
        }
        Request::KernelImport(req) => {
            let src = kernels::import::KernelSource::from_request(&req)?;
            kernels::import::import_kernel(&req.name, src, "imported".into(), &layout, rctx)
                .await
                .map(Response::Kernel)
        }
        Request::KernelPull { name } => {
            kernels::catalog::pull_kernel(&name, rctx, settings, &layout)
                .await
                .map(Response::Kernel)
        }
        Request::KernelDelete { name } => {
            let users: Vec<String> = ask(names::IMAGES, ImagesMsg::List, timeout)
                .await?
                .into_iter()
                .filter(|i| i.kernel.as_deref() == Some(name.as_str()))
                .map(|i| i.name)
                .collect();
            if !users.is_empty() {
                return Err(ErrorData::new(
                    ErrorKind::InvalidState,
                    format!("kernel `{name}` is used by image(s): {}", users.join(", ")),
                )
                .with_hint("delete those images first"));
            }
            let kernel = ask(
                names::KERNELS,
                |reply| KernelsMsg::Delete { name, reply },
                timeout,
            )
            .await??;
            Ok(Response::Deleted { name: kernel.name })
        }
        Request::KernelCatalog => {
            let present: HashSet<String> = ask(names::KERNELS, KernelsMsg::List, timeout)
                .await?
                .into_iter()
                .map(|k| k.name)
                .collect();
            let catalog = KernelCatalog::load(settings.kernel_catalog.as_deref())?;
            Ok(Response::KernelCatalog(
                catalog.entries(|n| present.contains(n)),
            ))
        }
        other => Err(ErrorData::new(
            ErrorKind::Internal,
            format!("{} is not an image or kernel request", other.name()),
        )),
    }
}

/// Removes cached layers that no image references (nor a pull in
/// progress pins) and finished kernel downloads.
async fn prune(rctx: &RequestCtx, layout: &Layout) -> Result<PruneReport, ErrorData> {
    let referenced = ask(
        names::IMAGES,
        ImagesMsg::ReferencedLayers,
        rctx.ctx.request_timeout,
    )
    .await?;
    let cache = LayerCache::open(layout.layers_dir())
        .map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    let downloads = layout.downloads_dir();
    let (stats, downloads_removed) = tokio::task::spawn_blocking(move || {
        let stats = cache.prune(&referenced);
        let mut removed = 0;
        for entry in std::fs::read_dir(&downloads)
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().to_string();
            let finished = name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit());
            if finished && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        (stats, removed)
    })
    .await
    .map_err(|e| ErrorData::new(ErrorKind::Internal, e.to_string()))?;
    let stats = stats.map_err(|e| ErrorData::from_error(ErrorKind::Internal, &e))?;
    rctx.progress(
        "prune",
        format!(
            "{} layers and {} cached trees removed",
            stats.removed, stats.trees_removed
        ),
        None,
    )
    .await;
    Ok(PruneReport {
        layers_removed: stats.removed as u64,
        bytes_freed: stats.bytes_freed,
        downloads_removed,
    })
}

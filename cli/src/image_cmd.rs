//! `banger image list|show|pull|register|promote|delete|prune|build|catalog`:
//! the root filesystem images bangerd keeps. Queries are plain requests;
//! pulls, builds, registrations, promotions and prunes stream progress
//! through [`progress::run`].

use banger_protocol::{
    ImageBuildRequest, ImageCatalogEntry, ImageInfo, ImagePullRequest, ImageRegisterRequest,
    KernelSelector, PruneReport, Request, Response,
};
use serde::Serialize;

use crate::args::{
    ImageBuildArgs, ImageCommand, ImagePullArgs, ImageRegisterArgs, JsonFlag, NameArgs,
    NameJsonArgs,
};
use crate::connect;
use crate::error::{CliError, Exit};
use crate::outln;
use crate::output::{human_bytes, print_json, Table};
use crate::progress::{self, print_result_line};
use crate::values::absolute_arg;

pub async fn run(command: ImageCommand) -> Result<Exit, CliError> {
    match command {
        ImageCommand::List(flags) => list(flags).await,
        ImageCommand::Show(args) => show(args).await,
        ImageCommand::Pull(args) => pull(args).await,
        ImageCommand::Register(args) => register(args).await,
        ImageCommand::Promote(args) => promote(args).await,
        ImageCommand::Delete(args) => delete(args).await,
        ImageCommand::Prune(flags) => prune(flags).await,
        ImageCommand::Build(args) => build(args).await,
        ImageCommand::Catalog(flags) => catalog(flags).await,
    }
}

/// Sends a short request (with the usual timeout) and returns its reply.
pub(crate) async fn query(request: Request) -> Result<Response, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    connect::request(&mut client, request).await
}

/// Milliseconds since the Unix epoch, now.
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `3m12s ago`, or `just now`.
pub(crate) fn ago(now_ms: u64, then_ms: u64) -> String {
    let ms = now_ms.saturating_sub(then_ms);
    if ms < 1000 {
        "just now".into()
    } else {
        format!("{} ago", crate::output::human_duration_ms(ms))
    }
}

pub(crate) fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// Shortens every `sha256:<64 hex>` in `text` to its first 12 hex digits.
fn short_digests(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("sha256:") {
        let (before, from) = rest.split_at(at);
        out.push_str(before);
        let hex = &from["sha256:".len()..];
        let len = hex.bytes().take_while(u8::is_ascii_hexdigit).count();
        if len == 64 {
            out.push_str("sha256:");
            out.push_str(&hex[..12]);
            rest = &hex[64..];
        } else {
            out.push_str("sha256:");
            rest = hex;
        }
    }
    out.push_str(rest);
    out
}

/// The JSON shape of an image (banger's own, stable).
#[derive(Serialize, Debug, PartialEq)]
struct ImageJson<'a> {
    name: &'a str,
    id: &'a str,
    managed: bool,
    source: &'a str,
    kernel: Option<&'a str>,
    rootfs_path: &'a str,
    rootfs_bytes: u64,
    work_seed_path: Option<&'a str>,
    platform: Option<&'a str>,
    created_unix_ms: u64,
    has_init: bool,
    has_sshd: bool,
    runtime: RuntimeJson<'a>,
    layers: &'a [String],
}

#[derive(Serialize, Debug, PartialEq)]
struct RuntimeJson<'a> {
    entrypoint: &'a [String],
    cmd: &'a [String],
    env: &'a [String],
    working_dir: &'a str,
    user: &'a str,
}

impl<'a> From<&'a ImageInfo> for ImageJson<'a> {
    fn from(i: &'a ImageInfo) -> Self {
        Self {
            name: &i.name,
            id: &i.id,
            managed: i.managed,
            source: &i.source,
            kernel: i.kernel.as_deref(),
            rootfs_path: &i.rootfs_path,
            rootfs_bytes: i.rootfs_bytes,
            work_seed_path: i.work_seed_path.as_deref(),
            platform: i.platform.as_deref(),
            created_unix_ms: i.created_unix_ms,
            has_init: i.has_init,
            has_sshd: i.has_sshd,
            runtime: RuntimeJson {
                entrypoint: &i.runtime.entrypoint,
                cmd: &i.runtime.cmd,
                env: &i.runtime.env,
                working_dir: &i.runtime.working_dir,
                user: &i.runtime.user,
            },
            layers: &i.layers,
        }
    }
}

#[derive(Serialize, Debug, PartialEq)]
struct CatalogJson<'a> {
    name: &'a str,
    kind: &'a str,
    source: &'a str,
    description: &'a str,
    kernel: Option<&'a str>,
    default: bool,
    present: bool,
}

impl<'a> From<&'a ImageCatalogEntry> for CatalogJson<'a> {
    fn from(e: &'a ImageCatalogEntry) -> Self {
        Self {
            name: &e.name,
            kind: &e.kind,
            source: &e.source,
            description: &e.description,
            kernel: e.kernel.as_deref(),
            default: e.default,
            present: e.present,
        }
    }
}

#[derive(Serialize, Debug, PartialEq)]
struct PruneJson {
    layers_removed: u64,
    bytes_freed: u64,
    downloads_removed: u64,
}

impl From<&PruneReport> for PruneJson {
    fn from(r: &PruneReport) -> Self {
        Self {
            layers_removed: r.layers_removed,
            bytes_freed: r.bytes_freed,
            downloads_removed: r.downloads_removed,
        }
    }
}

async fn list(flags: JsonFlag) -> Result<Exit, CliError> {
    let mut images = match query(Request::ImageList).await? {
        Response::Images(images) => images,
        other => return Err(connect::unexpected("image_list", &other)),
    };
    images.sort_by(|a, b| a.name.cmp(&b.name));
    if flags.json {
        print_json(&images.iter().map(ImageJson::from).collect::<Vec<_>>())?;
    } else {
        list_table(&images, now_unix_ms()).print()?;
    }
    Ok(Exit::Ok)
}

fn list_table(images: &[ImageInfo], now_ms: u64) -> Table {
    let mut table = Table::new(&["NAME", "KERNEL", "SIZE", "MANAGED", "SOURCE", "CREATED"]);
    for i in images {
        table.row(vec![
            i.name.clone(),
            i.kernel.clone().unwrap_or_else(|| "-".into()),
            human_bytes(i.rootfs_bytes),
            yes_no(i.managed),
            short_digests(&i.source),
            ago(now_ms, i.created_unix_ms),
        ]);
    }
    table
}

async fn show(args: NameJsonArgs) -> Result<Exit, CliError> {
    let image = match query(Request::ImageShow { name: args.name }).await? {
        Response::Image(image) => image,
        other => return Err(connect::unexpected("image_show", &other)),
    };
    if args.json {
        print_json(&ImageJson::from(&image))?;
    } else {
        outln!("{}", show_text(&image, now_unix_ms()).trim_end())?;
    }
    Ok(Exit::Ok)
}

/// A list for a `key: value` line: `-` when empty, else JSON (so that
/// arguments with spaces stay readable).
fn json_list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        serde_json::to_string(items).unwrap_or_default()
    }
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn show_text(i: &ImageInfo, now_ms: u64) -> String {
    let mut lines = vec![format!("image {}", i.name)];
    let mut field =
        |key: &str, value: String| lines.push(format!("  {:<12} {value}", format!("{key}:")));
    field("id", i.id.clone());
    field(
        "managed",
        if i.managed {
            "yes (its files are banger's and go with the image)".into()
        } else {
            "no (registered: banger uses the rootfs in place; `banger image promote` copies it in)"
                .into()
        },
    );
    field("source", i.source.clone());
    field("kernel", i.kernel.clone().unwrap_or_else(|| "-".into()));
    field(
        "rootfs",
        format!("{} ({})", i.rootfs_path, human_bytes(i.rootfs_bytes)),
    );
    field(
        "work seed",
        i.work_seed_path.clone().unwrap_or_else(|| "-".into()),
    );
    field("platform", i.platform.clone().unwrap_or_else(|| "-".into()));
    field(
        "created",
        format!(
            "{} ({})",
            crate::output::rfc3339_utc_ms(i.created_unix_ms),
            ago(now_ms, i.created_unix_ms)
        ),
    );
    field(
        "init",
        if i.has_init {
            "yes (the image's own init runs as PID 1)".into()
        } else {
            "no (banger's agent runs as PID 1)".into()
        },
    );
    field("sshd", yes_no(i.has_sshd));
    field("entrypoint", json_list(&i.runtime.entrypoint));
    field("cmd", json_list(&i.runtime.cmd));
    field("working dir", or_dash(&i.runtime.working_dir).into());
    field("user", or_dash(&i.runtime.user).into());
    field(
        "env",
        if i.runtime.env.is_empty() {
            "-".into()
        } else {
            String::new()
        },
    );
    for var in &i.runtime.env {
        lines.push(format!("    {var}"));
    }
    lines.push(format!(
        "  {:<12} {}",
        "layers:",
        if i.layers.is_empty() {
            "-".to_string()
        } else {
            i.layers.len().to_string()
        }
    ));
    for layer in &i.layers {
        lines.push(format!("    {layer}"));
    }
    lines
        .iter()
        .map(|l| format!("{}\n", l.trim_end()))
        .collect()
}

/// Prints a finished image: the result line with `--json`, else `message`.
fn print_image(image: &ImageInfo, json: bool, message: String) -> Result<Exit, CliError> {
    if json {
        print_result_line("image", ImageJson::from(image))?;
    } else {
        outln!("{message}")?;
    }
    Ok(Exit::Ok)
}

fn ready_message(image: &ImageInfo) -> String {
    let kernel = image
        .kernel
        .as_deref()
        .map(|k| format!(", kernel {k}"))
        .unwrap_or_default();
    format!(
        "image {} ready: {} rootfs{kernel}",
        image.name,
        human_bytes(image.rootfs_bytes)
    )
}

/// Runs a long image operation that ends with an image.
async fn image_operation(
    request: Request,
    json: bool,
    message: impl FnOnce(&ImageInfo) -> String,
) -> Result<Exit, CliError> {
    let op = request.name();
    match progress::run(request, json).await? {
        Some(Response::Image(image)) => print_image(&image, json, message(&image)),
        Some(other) => Err(connect::unexpected(op, &other)),
        None => connect::cancelled(),
    }
}

async fn pull(args: ImagePullArgs) -> Result<Exit, CliError> {
    let request = Request::ImagePull(ImagePullRequest {
        reference: args.reference,
        name: args.name,
        size: args.size,
        platform: args.platform,
        insecure: args.insecure,
        kernel: args.kernel,
    });
    image_operation(request, args.json, ready_message).await
}

/// The register request, with every local path made absolute.
fn register_request(args: &ImageRegisterArgs) -> Result<ImageRegisterRequest, CliError> {
    let kernel = match (&args.kernel_ref, &args.kernel) {
        (Some(name), _) => KernelSelector::Ref(name.clone()),
        (None, Some(kernel)) => KernelSelector::Paths {
            kernel: absolute_arg(kernel, "--kernel")?,
            initrd: args
                .initrd
                .as_deref()
                .map(|p| absolute_arg(p, "--initrd"))
                .transpose()?,
            modules: args
                .modules
                .as_deref()
                .map(|p| absolute_arg(p, "--modules"))
                .transpose()?,
        },
        // clap requires one of them (the `kernel_source` group).
        (None, None) => {
            return Err(CliError::failed("give --kernel-ref NAME or --kernel PATH"));
        }
    };
    Ok(ImageRegisterRequest {
        name: args.name.clone(),
        rootfs: absolute_arg(&args.rootfs, "--rootfs")?,
        kernel,
    })
}

async fn register(args: ImageRegisterArgs) -> Result<Exit, CliError> {
    let request = Request::ImageRegister(register_request(&args)?);
    image_operation(request, args.json, |image| {
        format!(
            "registered image {}: {} ({}) stays where it is and is not managed by banger; kernel {}",
            image.name,
            image.rootfs_path,
            human_bytes(image.rootfs_bytes),
            image.kernel.as_deref().unwrap_or("-")
        )
    })
    .await
}

async fn promote(args: NameJsonArgs) -> Result<Exit, CliError> {
    let request = Request::ImagePromote { name: args.name };
    image_operation(request, args.json, |image| {
        format!(
            "image {} is now managed: its rootfs is {}",
            image.name, image.rootfs_path
        )
    })
    .await
}

async fn build(args: ImageBuildArgs) -> Result<Exit, CliError> {
    let request = Request::ImageBuild(ImageBuildRequest {
        name: args.name,
        suite: args.suite,
        packages: args.packages,
        size: args.size,
        mirror: args.mirror,
    });
    image_operation(request, args.json, ready_message).await
}

async fn delete(args: NameArgs) -> Result<Exit, CliError> {
    match query(Request::ImageDelete { name: args.name }).await? {
        Response::Deleted { name } => {
            outln!("deleted image {name}")?;
            Ok(Exit::Ok)
        }
        other => Err(connect::unexpected("image_delete", &other)),
    }
}

async fn prune(flags: JsonFlag) -> Result<Exit, CliError> {
    match progress::run(Request::ImagePrune, flags.json).await? {
        Some(Response::Pruned(report)) => {
            if flags.json {
                print_result_line("pruned", PruneJson::from(&report))?;
            } else {
                outln!("{}", prune_message(&report))?;
            }
            Ok(Exit::Ok)
        }
        Some(other) => Err(connect::unexpected("image_prune", &other)),
        None => connect::cancelled(),
    }
}

fn prune_message(r: &PruneReport) -> String {
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    format!(
        "removed {} ({} freed) and {}",
        plural(r.layers_removed, "unused layer", "unused layers"),
        human_bytes(r.bytes_freed),
        plural(
            r.downloads_removed,
            "finished kernel download",
            "finished kernel downloads"
        )
    )
}

async fn catalog(flags: JsonFlag) -> Result<Exit, CliError> {
    let entries = match query(Request::ImageCatalog).await? {
        Response::ImageCatalog(entries) => entries,
        other => return Err(connect::unexpected("image_catalog", &other)),
    };
    if flags.json {
        print_json(&entries.iter().map(CatalogJson::from).collect::<Vec<_>>())?;
    } else {
        catalog_table(&entries).print()?;
    }
    Ok(Exit::Ok)
}

fn catalog_table(entries: &[ImageCatalogEntry]) -> Table {
    let mut table = Table::new(&[
        "NAME",
        "KIND",
        "SOURCE",
        "KERNEL",
        "DEFAULT",
        "PRESENT",
        "DESCRIPTION",
    ]);
    for e in entries {
        table.row(vec![
            e.name.clone(),
            e.kind.clone(),
            e.source.clone(),
            e.kernel.clone().unwrap_or_else(|| "-".into()),
            yes_no(e.default),
            yes_no(e.present),
            e.description.clone(),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_protocol::ImageRuntimeConfig;
    use serde_json::json;
    use std::path::PathBuf;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn image(name: &str, managed: bool) -> ImageInfo {
        ImageInfo {
            id: "01abc".into(),
            name: name.into(),
            managed,
            source: if managed {
                format!("oci docker.io/library/debian:bookworm@{DIGEST}")
            } else {
                "registered /srv/img.ext4".into()
            },
            rootfs_path: "/s/images/01abc/rootfs.ext4".into(),
            rootfs_bytes: 3 << 29,
            work_seed_path: Some("/s/images/01abc/work-seed.ext4".into()),
            kernel: managed.then(|| "debian-cloud-6.1".to_string()),
            created_unix_ms: 1_714_565_045_007,
            layers: if managed { vec![DIGEST.into()] } else { vec![] },
            platform: Some("linux/amd64".into()),
            has_init: !managed,
            has_sshd: !managed,
            runtime: ImageRuntimeConfig {
                entrypoint: vec![],
                cmd: if managed { vec!["bash".into()] } else { vec![] },
                env: if managed {
                    vec!["PATH=/usr/bin:/bin".into()]
                } else {
                    vec![]
                },
                working_dir: String::new(),
                user: String::new(),
            },
            has_systemd: !managed,
            has_agent: managed,
        }
    }

    #[test]
    fn list_table_renders() {
        let now = 1_714_565_045_007 + 192_000;
        let table = list_table(&[image("debian", true), image("mine", false)], now);
        assert_eq!(
            table.render(),
            "NAME    KERNEL            SIZE     MANAGED  SOURCE                                                     CREATED\n\
             debian  debian-cloud-6.1  1.5 GiB  yes      oci docker.io/library/debian:bookworm@sha256:0123456789ab  3m12s ago\n\
             mine    -                 1.5 GiB  no       registered /srv/img.ext4                                   3m12s ago\n"
        );
    }

    #[test]
    fn digests_are_shortened_only_when_whole() {
        assert_eq!(
            short_digests(&format!("x@{DIGEST} y")),
            "x@sha256:0123456789ab y"
        );
        assert_eq!(short_digests("sha256:abc"), "sha256:abc");
        assert_eq!(short_digests("no digest"), "no digest");
        assert_eq!(
            short_digests(&format!("{DIGEST},{DIGEST}")),
            "sha256:0123456789ab,sha256:0123456789ab"
        );
    }

    #[test]
    fn show_lists_every_field() {
        let text = show_text(&image("debian", true), 1_714_565_045_007 + 500);
        assert_eq!(
            text,
            format!(
                "image debian\n\
                 \x20 id:          01abc\n\
                 \x20 managed:     yes (its files are banger's and go with the image)\n\
                 \x20 source:      oci docker.io/library/debian:bookworm@{DIGEST}\n\
                 \x20 kernel:      debian-cloud-6.1\n\
                 \x20 rootfs:      /s/images/01abc/rootfs.ext4 (1.5 GiB)\n\
                 \x20 work seed:   /s/images/01abc/work-seed.ext4\n\
                 \x20 platform:    linux/amd64\n\
                 \x20 created:     2024-05-01T12:04:05.007Z (just now)\n\
                 \x20 init:        no (banger's agent runs as PID 1)\n\
                 \x20 sshd:        no\n\
                 \x20 entrypoint:  -\n\
                 \x20 cmd:         [\"bash\"]\n\
                 \x20 working dir: -\n\
                 \x20 user:        -\n\
                 \x20 env:\n\
                 \x20   PATH=/usr/bin:/bin\n\
                 \x20 layers:      1\n\
                 \x20   {DIGEST}\n"
            )
        );
    }

    #[test]
    fn image_json_shape() {
        let v = serde_json::to_value(ImageJson::from(&image("mine", false))).expect("json");
        assert_eq!(
            v,
            json!({
                "name": "mine", "id": "01abc", "managed": false, "source": "registered /srv/img.ext4",
                "kernel": null, "rootfs_path": "/s/images/01abc/rootfs.ext4", "rootfs_bytes": 3_u64 << 29,
                "work_seed_path": "/s/images/01abc/work-seed.ext4", "platform": "linux/amd64",
                "created_unix_ms": 1_714_565_045_007_u64, "has_init": true, "has_sshd": true,
                "runtime": {"entrypoint": [], "cmd": [], "env": [], "working_dir": "", "user": ""},
                "layers": []
            })
        );
    }

    #[test]
    fn catalog_table_has_default_and_present() {
        let entries = vec![
            ImageCatalogEntry {
                name: "debian-bookworm".into(),
                kind: "build".into(),
                source: "bookworm".into(),
                description: "Debian 12".into(),
                kernel: None,
                default: true,
                present: false,
            },
            ImageCatalogEntry {
                name: "debian-bookworm-oci".into(),
                kind: "oci".into(),
                source: "docker.io/library/debian:bookworm".into(),
                description: "from Docker Hub".into(),
                kernel: Some("debian-cloud-6.1".into()),
                default: false,
                present: true,
            },
        ];
        assert_eq!(
            catalog_table(&entries).render(),
            "NAME                 KIND   SOURCE                             KERNEL            DEFAULT  PRESENT  DESCRIPTION\n\
             debian-bookworm      build  bookworm                           -                 yes      no       Debian 12\n\
             debian-bookworm-oci  oci    docker.io/library/debian:bookworm  debian-cloud-6.1  no       yes      from Docker Hub\n"
        );
    }

    #[test]
    fn prune_messages() {
        let r = PruneReport {
            layers_removed: 1,
            bytes_freed: 1536,
            downloads_removed: 0,
        };
        assert_eq!(
            prune_message(&r),
            "removed 1 unused layer (1.5 KiB freed) and 0 finished kernel downloads"
        );
    }

    fn parse(argv: &[&str]) -> ImageRegisterArgs {
        use clap::Parser as _;
        match crate::args::Cli::try_parse_from(argv)
            .expect("parses")
            .command
        {
            crate::args::Command::Image(ImageCommand::Register(args)) => args,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn register_paths_are_made_absolute() {
        let cwd = std::env::current_dir().expect("cwd");
        let args = parse(&[
            "banger",
            "image",
            "register",
            "img",
            "--rootfs",
            "out/img.ext4",
            "--kernel",
            "./vmlinuz",
            "--initrd",
            "/boot/initrd.img",
            "--modules",
            "mods",
        ]);
        let req = register_request(&args).expect("request");
        assert_eq!(PathBuf::from(&req.rootfs), cwd.join("out/img.ext4"));
        match req.kernel {
            KernelSelector::Paths {
                kernel,
                initrd,
                modules,
            } => {
                assert_eq!(PathBuf::from(kernel), cwd.join("vmlinuz"));
                assert_eq!(initrd.as_deref(), Some("/boot/initrd.img"));
                assert_eq!(modules.map(PathBuf::from), Some(cwd.join("mods")));
            }
            other => panic!("unexpected {other:?}"),
        }
        let args = parse(&[
            "banger",
            "image",
            "register",
            "img",
            "--rootfs",
            "/a.ext4",
            "--kernel-ref",
            "k1",
        ]);
        let req = register_request(&args).expect("request");
        assert_eq!(req.kernel, KernelSelector::Ref("k1".into()));
        assert_eq!(req.rootfs, "/a.ext4");
    }
}

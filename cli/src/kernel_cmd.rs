//! `banger kernel list|show|import|pull|delete|catalog`: the guest kernels
//! bangerd keeps. Imports and pulls stream progress through
//! [`progress::run`]; the rest are plain requests.

use banger_protocol::{KernelCatalogEntry, KernelImportRequest, KernelInfo, Request, Response};
use serde::Serialize;

use crate::args::{JsonFlag, KernelCommand, KernelImportArgs, NameArgs, NameJsonArgs};
use crate::connect;
use crate::error::{CliError, Exit};
use crate::image_cmd::{ago, now_unix_ms, query, yes_no};
use crate::outln;
use crate::output::{human_bytes, print_json, rfc3339_utc_ms, Table};
use crate::progress::{self, print_result_line};
use crate::values::absolute_arg;

pub async fn run(command: KernelCommand) -> Result<Exit, CliError> {
    match command {
        KernelCommand::List(flags) => list(flags).await,
        KernelCommand::Show(args) => show(args).await,
        KernelCommand::Import(args) => import(args).await,
        KernelCommand::Pull(args) => pull(args).await,
        KernelCommand::Delete(args) => delete(args).await,
        KernelCommand::Catalog(flags) => catalog(flags).await,
    }
}

/// The JSON shape of a kernel (banger's own, stable).
#[derive(Serialize, Debug, PartialEq)]
struct KernelJson<'a> {
    name: &'a str,
    version: Option<&'a str>,
    format: &'a str,
    kernel_path: &'a str,
    vmlinux_path: Option<&'a str>,
    initrd_path: Option<&'a str>,
    modules_path: Option<&'a str>,
    backends: &'a [String],
    source: &'a str,
    bytes: u64,
    created_unix_ms: u64,
}

impl<'a> From<&'a KernelInfo> for KernelJson<'a> {
    fn from(k: &'a KernelInfo) -> Self {
        Self {
            name: &k.name,
            version: k.version.as_deref(),
            format: &k.format,
            kernel_path: &k.kernel_path,
            vmlinux_path: k.vmlinux_path.as_deref(),
            initrd_path: k.initrd_path.as_deref(),
            modules_path: k.modules_path.as_deref(),
            backends: &k.backends,
            source: &k.source,
            bytes: k.bytes,
            created_unix_ms: k.created_unix_ms,
        }
    }
}

#[derive(Serialize, Debug, PartialEq)]
struct CatalogJson<'a> {
    name: &'a str,
    version: &'a str,
    url: &'a str,
    sha256: &'a str,
    size: u64,
    description: &'a str,
    present: bool,
}

impl<'a> From<&'a KernelCatalogEntry> for CatalogJson<'a> {
    fn from(e: &'a KernelCatalogEntry) -> Self {
        Self {
            name: &e.name,
            version: &e.version,
            url: &e.url,
            sha256: &e.sha256,
            size: e.size,
            description: &e.description,
            present: e.present,
        }
    }
}

async fn list(flags: JsonFlag) -> Result<Exit, CliError> {
    let mut kernels = match query(Request::KernelList).await? {
        Response::Kernels(kernels) => kernels,
        other => return Err(connect::unexpected("kernel_list", &other)),
    };
    kernels.sort_by(|a, b| a.name.cmp(&b.name));
    if flags.json {
        print_json(&kernels.iter().map(KernelJson::from).collect::<Vec<_>>())?;
    } else {
        list_table(&kernels, now_unix_ms()).print()?;
    }
    Ok(Exit::Ok)
}

fn list_table(kernels: &[KernelInfo], now_ms: u64) -> Table {
    let mut table = Table::new(&[
        "NAME", "VERSION", "FORMAT", "BACKENDS", "SIZE", "SOURCE", "CREATED",
    ]);
    for k in kernels {
        table.row(vec![
            k.name.clone(),
            k.version.clone().unwrap_or_else(|| "-".into()),
            k.format.clone(),
            if k.backends.is_empty() {
                "-".into()
            } else {
                k.backends.join(",")
            },
            human_bytes(k.bytes),
            k.source.clone(),
            ago(now_ms, k.created_unix_ms),
        ]);
    }
    table
}

async fn show(args: NameJsonArgs) -> Result<Exit, CliError> {
    let kernel = match query(Request::KernelShow { name: args.name }).await? {
        Response::Kernel(kernel) => kernel,
        other => return Err(connect::unexpected("kernel_show", &other)),
    };
    if args.json {
        print_json(&KernelJson::from(&kernel))?;
    } else {
        outln!("{}", show_text(&kernel, now_unix_ms()).trim_end())?;
    }
    Ok(Exit::Ok)
}

fn show_text(k: &KernelInfo, now_ms: u64) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    let fields = [
        ("version", dash(&k.version)),
        ("format", k.format.clone()),
        (
            "backends",
            if k.backends.is_empty() {
                "-".into()
            } else {
                k.backends.join(", ")
            },
        ),
        ("kernel", k.kernel_path.clone()),
        ("vmlinux", dash(&k.vmlinux_path)),
        ("initrd", dash(&k.initrd_path)),
        ("modules", dash(&k.modules_path)),
        ("size", human_bytes(k.bytes)),
        ("source", k.source.clone()),
        (
            "created",
            format!(
                "{} ({})",
                rfc3339_utc_ms(k.created_unix_ms),
                ago(now_ms, k.created_unix_ms)
            ),
        ),
    ];
    let mut text = format!("kernel {}\n", k.name);
    for (key, value) in fields {
        text.push_str(&format!("  {:<9} {value}\n", format!("{key}:")));
    }
    text
}

/// How a finished kernel is announced.
fn ready_message(k: &KernelInfo) -> String {
    format!(
        "kernel {} ready: {} {}, boots with {}",
        k.name,
        k.format,
        k.version.as_deref().unwrap_or("(unknown version)"),
        if k.backends.is_empty() {
            "no known backend".to_string()
        } else {
            k.backends.join(", ")
        }
    )
}

/// Runs a long kernel operation that ends with a kernel.
async fn kernel_operation(request: Request, json: bool) -> Result<Exit, CliError> {
    let op = request.name();
    match progress::run(request, json).await? {
        Some(Response::Kernel(kernel)) => {
            if json {
                print_result_line("kernel", KernelJson::from(&kernel))?;
            } else {
                outln!("{}", ready_message(&kernel))?;
            }
            Ok(Exit::Ok)
        }
        Some(other) => Err(connect::unexpected(op, &other)),
        None => connect::cancelled(),
    }
}

/// The import request, with every local path made absolute.
fn import_request(args: &KernelImportArgs) -> Result<KernelImportRequest, CliError> {
    Ok(KernelImportRequest {
        name: args.name.clone(),
        kernel: absolute_arg(&args.kernel, "--kernel")?,
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
    })
}

async fn import(args: KernelImportArgs) -> Result<Exit, CliError> {
    let request = Request::KernelImport(import_request(&args)?);
    kernel_operation(request, args.json).await
}

async fn pull(args: NameJsonArgs) -> Result<Exit, CliError> {
    kernel_operation(Request::KernelPull { name: args.name }, args.json).await
}

async fn delete(args: NameArgs) -> Result<Exit, CliError> {
    match query(Request::KernelDelete { name: args.name }).await? {
        Response::Deleted { name } => {
            outln!("deleted kernel {name}")?;
            Ok(Exit::Ok)
        }
        other => Err(connect::unexpected("kernel_delete", &other)),
    }
}

async fn catalog(flags: JsonFlag) -> Result<Exit, CliError> {
    let entries = match query(Request::KernelCatalog).await? {
        Response::KernelCatalog(entries) => entries,
        other => return Err(connect::unexpected("kernel_catalog", &other)),
    };
    if flags.json {
        print_json(&entries.iter().map(CatalogJson::from).collect::<Vec<_>>())?;
    } else {
        catalog_table(&entries).print()?;
    }
    Ok(Exit::Ok)
}

fn catalog_table(entries: &[KernelCatalogEntry]) -> Table {
    let mut table = Table::new(&["NAME", "VERSION", "SIZE", "PRESENT", "DESCRIPTION"]);
    for e in entries {
        table.row(vec![
            e.name.clone(),
            e.version.clone(),
            human_bytes(e.size),
            yes_no(e.present),
            e.description.clone(),
        ]);
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::path::PathBuf;

    fn kernel() -> KernelInfo {
        KernelInfo {
            name: "k1".into(),
            version: Some("6.1.0-56-cloud-amd64".into()),
            format: "bzimage".into(),
            kernel_path: "/s/kernels/01/vmlinuz".into(),
            vmlinux_path: Some("/s/kernels/01/vmlinux".into()),
            initrd_path: None,
            modules_path: None,
            backends: vec!["qemu".into()],
            source: "imported".into(),
            created_unix_ms: 1_714_565_045_007,
            bytes: 8 << 20,
        }
    }

    #[test]
    fn list_and_show() {
        let now = 1_714_565_045_007 + 42_000;
        assert_eq!(
            list_table(&[kernel()], now).render(),
            "NAME  VERSION               FORMAT   BACKENDS  SIZE     SOURCE    CREATED\n\
             k1    6.1.0-56-cloud-amd64  bzimage  qemu      8.0 MiB  imported  42s ago\n"
        );
        assert_eq!(
            show_text(&kernel(), now),
            "kernel k1\n\
             \x20 version:  6.1.0-56-cloud-amd64\n\
             \x20 format:   bzimage\n\
             \x20 backends: qemu\n\
             \x20 kernel:   /s/kernels/01/vmlinuz\n\
             \x20 vmlinux:  /s/kernels/01/vmlinux\n\
             \x20 initrd:   -\n\
             \x20 modules:  -\n\
             \x20 size:     8.0 MiB\n\
             \x20 source:   imported\n\
             \x20 created:  2024-05-01T12:04:05.007Z (42s ago)\n"
        );
        assert_eq!(
            ready_message(&kernel()),
            "kernel k1 ready: bzimage 6.1.0-56-cloud-amd64, boots with qemu"
        );
    }

    #[test]
    fn kernel_json_shape() {
        assert_eq!(
            serde_json::to_value(KernelJson::from(&kernel())).expect("json"),
            json!({"name":"k1","version":"6.1.0-56-cloud-amd64","format":"bzimage",
                   "kernel_path":"/s/kernels/01/vmlinuz","vmlinux_path":"/s/kernels/01/vmlinux",
                   "initrd_path":null,"modules_path":null,"backends":["qemu"],"source":"imported",
                   "bytes":8_u64 << 20,"created_unix_ms":1_714_565_045_007_u64})
        );
    }

    #[test]
    fn catalog_table_renders() {
        let e = KernelCatalogEntry {
            name: "debian-cloud-6.1".into(),
            version: "6.1.0-56-cloud-amd64".into(),
            url: "http://h/k.deb".into(),
            sha256: "00".repeat(32),
            size: 26_713_492,
            description: "Debian 12 cloud kernel".into(),
            present: false,
        };
        assert_eq!(
            catalog_table(&[e]).render(),
            "NAME              VERSION               SIZE      PRESENT  DESCRIPTION\n\
             debian-cloud-6.1  6.1.0-56-cloud-amd64  25.5 MiB  no       Debian 12 cloud kernel\n"
        );
    }

    #[test]
    fn import_paths_are_made_absolute() {
        use clap::Parser as _;
        let cwd = std::env::current_dir().expect("cwd");
        let argv = [
            "banger",
            "kernel",
            "import",
            "k1",
            "--kernel",
            "vmlinuz",
            "--initrd",
            "/boot/initrd.img",
        ];
        let args = match crate::args::Cli::try_parse_from(argv)
            .expect("parses")
            .command
        {
            crate::args::Command::Kernel(KernelCommand::Import(args)) => args,
            other => panic!("unexpected {other:?}"),
        };
        let req = import_request(&args).expect("request");
        assert_eq!(PathBuf::from(req.kernel), cwd.join("vmlinuz"));
        assert_eq!(req.initrd.as_deref(), Some("/boot/initrd.img"));
        assert_eq!(req.modules, None);
    }
}

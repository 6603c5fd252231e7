//! Shared helpers of the registry and cache integration tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

use banger_image::cache::LayerCache;
use banger_image::registry::PullEvent;
use tokio::sync::mpsc;

/// A tar archive holding `files`.
pub fn tar_with(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, path, *data)
            .expect("append to tar");
    }
    builder.into_inner().expect("finish tar")
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).expect("gzip");
    encoder.finish().expect("gzip")
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).expect("zstd")
}

/// An OCI image config for `arch` with a full `config` section.
pub fn config_json(arch: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "architecture": arch,
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/bin:/usr/bin", "GREETING=hello world"],
            "Entrypoint": ["/bin/entry"],
            "Cmd": ["--serve", "8080"],
            "WorkingDir": "/srv",
            "User": "1000:1000"
        },
        "rootfs": {"type": "layers", "diff_ids": []}
    }))
    .expect("config json")
}

/// File names in the cache's blob directory.
pub fn blob_dir_names(cache: &LayerCache) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(cache.blob_dir())
        .expect("read blob dir")
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .into_string()
                .expect("utf-8 name")
        })
        .collect();
    names.sort();
    names
}

/// Names of `.partial` files anywhere under `dir`.
pub fn partial_files(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read dir") {
            let entry = entry.expect("entry");
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.to_string_lossy().ends_with(".partial") {
                out.push(path.display().to_string());
            }
        }
    }
    out
}

/// Everything currently queued on a progress channel.
pub fn drain(rx: &mut mpsc::Receiver<PullEvent>) -> Vec<PullEvent> {
    let mut events = Vec::new();
    while let Ok(event) = rx.try_recv() {
        events.push(event);
    }
    events
}

/// The error and its whole `source()` chain, as a user would see it.
pub fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

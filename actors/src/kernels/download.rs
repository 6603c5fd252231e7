//! Resumable, verified downloads of catalog artifacts.
//!
//! A download goes to `<downloads>/<sha256>.partial`; an interrupted one
//! is resumed with an HTTP `Range` request (or restarted when the server
//! ignores it). The file gets its final name `<downloads>/<sha256>` only
//! when its size and sha256 match the catalog; a mismatch removes it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use banger_protocol::{ErrorData, ErrorKind};
use futures::StreamExt;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::router::dispatch::RequestCtx;

fn io(what: String) -> impl FnOnce(std::io::Error) -> ErrorData {
    move |e| ErrorData::from_error(ErrorKind::Internal, &e).with_cause(what)
}

fn http(url: &str) -> impl FnOnce(reqwest::Error) -> ErrorData + '_ {
    move |e| {
        ErrorData::from_error(ErrorKind::Unavailable, &e)
            .with_cause(format!("downloading {url}"))
            .with_hint("check the network and retry; the download resumes where it stopped")
    }
}

/// Downloads `url` (expected `size` bytes with `sha256`) into `dir`,
/// resuming a previous partial download; returns the verified file.
pub async fn download(
    url: &str,
    sha256: &str,
    size: u64,
    dir: &Path,
    rctx: &RequestCtx,
) -> Result<PathBuf, ErrorData> {
    let done = dir.join(sha256);
    if tokio::fs::metadata(&done)
        .await
        .is_ok_and(|m| m.len() == size)
    {
        rctx.progress(
            "download",
            format!("{url} (already downloaded)"),
            Some((size, size)),
        )
        .await;
        return Ok(done);
    }
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(io(format!("creating {}", dir.display())))?;
    let partial = dir.join(format!("{sha256}.partial"));
    let mut hasher = Sha256::new();
    let mut have = 0u64;
    // Re-hash what an earlier attempt left, to resume from it.
    if let Ok(mut f) = tokio::fs::File::open(&partial).await {
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = f
                .read(&mut buf)
                .await
                .map_err(io(format!("reading {}", partial.display())))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            have += n as u64;
        }
        if have > size {
            let _ = tokio::fs::remove_file(&partial).await;
            hasher = Sha256::new();
            have = 0;
        }
    }
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(60))
        .build()
        .map_err(http(url))?;
    let mut request = client.get(url);
    if have > 0 {
        request = request.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let response = request.send().await.map_err(http(url))?;
    let status = response.status();
    let resumed = status == reqwest::StatusCode::PARTIAL_CONTENT;
    if !status.is_success() {
        return Err(ErrorData::new(
            ErrorKind::Unavailable,
            format!("{url} answered HTTP {status}"),
        )
        .with_hint("the catalog entry may be out of date; see `banger kernel catalog`"));
    }
    if have > 0 && !resumed {
        // The server ignored the range: start over.
        hasher = Sha256::new();
        have = 0;
    }
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(&partial)
        .await
        .map_err(io(format!("opening {}", partial.display())))?;
    if have > 0 {
        rctx.progress(
            "download",
            format!("resuming {url} at {have} bytes"),
            Some((have, size)),
        )
        .await;
    }
    let mut stream = response.bytes_stream();
    let mut last = Instant::now();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(http(url))?;
        have += chunk.len() as u64;
        if have > size {
            drop(file);
            let _ = tokio::fs::remove_file(&partial).await;
            return Err(ErrorData::new(
                ErrorKind::InvalidRequest,
                format!("{url} is larger than the {size} bytes the catalog says"),
            ));
        }
        hasher.update(&chunk);
        file.write_all(&chunk)
            .await
            .map_err(io(format!("writing {}", partial.display())))?;
        if last.elapsed() >= Duration::from_millis(100) {
            last = Instant::now();
            rctx.progress("download", url.to_string(), Some((have, size)))
                .await;
        }
    }
    file.flush()
        .await
        .map_err(io(format!("writing {}", partial.display())))?;
    file.sync_all()
        .await
        .map_err(io(format!("syncing {}", partial.display())))?;
    drop(file);
    if have < size {
        return Err(ErrorData::new(
            ErrorKind::Unavailable,
            format!("{url} ended after {have} of {size} bytes"),
        )
        .with_hint("retry: the download resumes where it stopped"));
    }
    let actual = hex::encode(hasher.finalize());
    if actual != sha256 {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(ErrorData::new(
            ErrorKind::InvalidRequest,
            format!("{url} does not match the catalog's sha256 (expected {sha256}, got {actual}); nothing was registered"),
        ));
    }
    tokio::fs::rename(&partial, &done)
        .await
        .map_err(io(format!("renaming {}", partial.display())))?;
    rctx.progress("download", format!("{url} verified"), Some((size, size)))
        .await;
    Ok(done)
}

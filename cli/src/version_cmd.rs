//! `banger version`: the client's version, then the daemon's. This is the
//! benchmarks' hot path, so it does the least possible: connect, handshake,
//! one `Version` request; no config is read.

use banger_protocol::{Request, Response, VersionInfo, BANGER_VERSION, FEATURES, PROTOCOL_VERSION};
use serde::Serialize;

use crate::args::JsonFlag;
use crate::connect;
use crate::error::{CliError, Exit};
use crate::outln;
use crate::output::print_json;

#[derive(Serialize, Debug)]
struct VersionJson<'a> {
    client: ClientJson,
    daemon: DaemonJson<'a>,
}

#[derive(Serialize, Debug)]
struct ClientJson {
    version: &'static str,
    protocol_version: u32,
    features: &'static [&'static str],
}

#[derive(Serialize, Debug)]
struct DaemonJson<'a> {
    version: &'a str,
    protocol_version: u32,
    features: &'a [String],
    pid: u32,
}

pub async fn run(flags: JsonFlag) -> Result<Exit, CliError> {
    if !flags.json {
        outln!("banger {BANGER_VERSION} (protocol {PROTOCOL_VERSION})")?;
    }
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    let pid = client.server().pid;
    let info = match connect::request(&mut client, Request::Version).await? {
        Response::Version(info) => info,
        other => return Err(connect::unexpected(Request::Version.name(), &other)),
    };
    if flags.json {
        print_json(&VersionJson {
            client: ClientJson {
                version: BANGER_VERSION,
                protocol_version: PROTOCOL_VERSION,
                features: FEATURES,
            },
            daemon: DaemonJson {
                version: &info.daemon_version,
                protocol_version: info.protocol_version,
                features: &info.features,
                pid,
            },
        })?;
    } else {
        outln!("{}", render_daemon(&info, pid))?;
    }
    Ok(Exit::Ok)
}

fn render_daemon(info: &VersionInfo, pid: u32) -> String {
    format!(
        "bangerd {} (protocol {}, pid {pid})\n  features: {}",
        info.daemon_version,
        info.protocol_version,
        if info.features.is_empty() {
            "none".to_string()
        } else {
            info.features.join(", ")
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daemon_line() {
        let info = VersionInfo {
            daemon_version: "0.1.0".into(),
            protocol_version: 1,
            features: vec!["events".into(), "cancel".into()],
        };
        assert_eq!(
            render_daemon(&info, 7),
            "bangerd 0.1.0 (protocol 1, pid 7)\n  features: events, cancel"
        );
    }
}

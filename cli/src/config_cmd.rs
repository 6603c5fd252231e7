//! `banger config show`: the daemon's effective configuration.

use banger_protocol::{ConfigDump, Request, Response};
use serde::Serialize;

use crate::args::{ConfigCommand, JsonFlag};
use crate::connect;
use crate::error::{CliError, Exit};
use crate::outln;
use crate::output::print_json;

pub async fn run(command: ConfigCommand) -> Result<Exit, CliError> {
    match command {
        ConfigCommand::Show(flags) => show(flags).await,
    }
}

#[derive(Serialize, Debug)]
struct ConfigJson<'a> {
    path: &'a str,
    file_exists: bool,
    toml: &'a str,
}

async fn show(flags: JsonFlag) -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    let dump = match connect::request(&mut client, Request::ConfigShow).await? {
        Response::Config(dump) => dump,
        other => return Err(connect::unexpected(Request::ConfigShow.name(), &other)),
    };
    if flags.json {
        print_json(&ConfigJson {
            path: &dump.path,
            file_exists: dump.file_exists,
            toml: &dump.toml,
        })?;
    } else {
        outln!("{}", render(&dump))?;
    }
    Ok(Exit::Ok)
}

fn render(dump: &ConfigDump) -> String {
    let presence = if dump.file_exists {
        "exists"
    } else {
        "not present — defaults"
    };
    format!(
        "# effective configuration (file: {}, {presence})\n{}",
        dump.path,
        dump.toml.trim_end_matches('\n')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_says_where_the_file_is() {
        let dump = ConfigDump {
            path: "/c/banger/config.toml".into(),
            file_exists: false,
            toml: "[daemon]\nlog_level = \"info\"\n".into(),
        };
        assert_eq!(
            render(&dump),
            "# effective configuration (file: /c/banger/config.toml, not present — defaults)\n[daemon]\nlog_level = \"info\""
        );
        let dump = ConfigDump {
            file_exists: true,
            ..dump
        };
        assert!(render(&dump)
            .starts_with("# effective configuration (file: /c/banger/config.toml, exists)\n"));
    }
}

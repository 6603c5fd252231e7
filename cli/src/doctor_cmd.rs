//! `banger doctor`: the daemon's host checks, one line each, with a fix for
//! every warning and failure. Exits 1 when any check fails.

use banger_protocol::{CheckStatus, DoctorReport, Request, Response};
use serde::Serialize;

use crate::args::JsonFlag;
use crate::connect;
use crate::error::{CliError, Exit};
use crate::outln;
use crate::output::print_json;

#[derive(Serialize, Debug)]
struct DoctorJson<'a> {
    ok: bool,
    checks: Vec<CheckJson<'a>>,
}

#[derive(Serialize, Debug)]
struct CheckJson<'a> {
    name: &'a str,
    /// `pass`, `warn` or `fail`.
    status: String,
    detail: &'a str,
    fix: Option<&'a str>,
}

pub async fn run(flags: JsonFlag) -> Result<Exit, CliError> {
    let paths = connect::paths()?;
    let mut client = connect::connect_or_start(&paths).await?;
    let report = match connect::request(&mut client, Request::Doctor).await? {
        Response::Doctor(report) => report,
        other => return Err(connect::unexpected(Request::Doctor.name(), &other)),
    };
    let ok = !report.checks.iter().any(|c| c.status == CheckStatus::Fail);
    if flags.json {
        print_json(&DoctorJson {
            ok,
            checks: report
                .checks
                .iter()
                .map(|c| CheckJson {
                    name: &c.name,
                    status: c.status.as_str().to_ascii_lowercase(),
                    detail: &c.detail,
                    fix: c.fix.as_deref(),
                })
                .collect(),
        })?;
    } else {
        outln!("{}", render(&report))?;
    }
    Ok(if ok { Exit::Ok } else { Exit::Failed })
}

fn render(report: &DoctorReport) -> String {
    let width = report
        .checks
        .iter()
        .map(|c| c.name.chars().count())
        .max()
        .unwrap_or(0);
    let mut lines = Vec::new();
    for check in &report.checks {
        let line = format!(
            "{}  {:<width$}  {}",
            check.status.as_str(),
            check.name,
            check.detail
        );
        lines.push(line.trim_end().to_string());
        if check.status != CheckStatus::Pass {
            if let Some(fix) = &check.fix {
                lines.push(format!("      fix: {fix}"));
            }
        }
    }
    let count = |s| report.checks.iter().filter(|c| c.status == s).count();
    lines.push(format!(
        "{} passed, {} warnings, {} failed",
        count(CheckStatus::Pass),
        count(CheckStatus::Warn),
        count(CheckStatus::Fail)
    ));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_protocol::DoctorCheck;

    fn check(name: &str, status: CheckStatus, detail: &str, fix: Option<&str>) -> DoctorCheck {
        DoctorCheck {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: fix.map(Into::into),
        }
    }

    #[test]
    fn lines_align_and_fixes_follow_problems() {
        let report = DoctorReport {
            checks: vec![
                check(
                    "kvm",
                    CheckStatus::Fail,
                    "/dev/kvm is missing",
                    Some("load kvm_intel"),
                ),
                check(
                    "state dir",
                    CheckStatus::Pass,
                    "writable",
                    Some("ignored for PASS"),
                ),
                check(
                    "vhost",
                    CheckStatus::Warn,
                    "no vhost-net",
                    Some("modprobe vhost_net"),
                ),
            ],
        };
        assert_eq!(
            render(&report),
            "FAIL  kvm        /dev/kvm is missing\n      fix: load kvm_intel\n\
             PASS  state dir  writable\n\
             WARN  vhost      no vhost-net\n      fix: modprobe vhost_net\n\
             1 passed, 1 warnings, 1 failed"
        );
    }
}

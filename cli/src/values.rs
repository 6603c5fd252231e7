//! Values commands take from the command line and turn into what the
//! daemon expects: sizes in bytes (`--size 1.5G`), IPv4 addresses
//! (`--ip 172.30.0.10`), and local paths made absolute against the
//! client's working directory (the daemon has its own and refuses relative
//! paths).

use std::net::Ipv4Addr;
use std::path::{Component, Path, PathBuf};

use crate::error::CliError;

/// What `--size` accepts, for error messages and `--help`.
const SIZE_FORMS: &str = "a number of bytes, or a number with a K, M, G or T suffix \
                          (powers of 1024, optionally followed by iB or B), e.g. 512M, 2G, 1.5G";

/// Parses a size: `1073741824`, `512M`, `2G`, `1.5G`, `64KiB`, `1TB`.
/// Suffixes are binary (`K` = 1024) and case-insensitive; a fraction is
/// rounded down to whole bytes; zero is refused. The clap value parser of
/// every `--size`, so a bad size is a usage error.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let invalid = |why: &str| format!("{why}; expected {SIZE_FORMS}");
    let s = text.trim();
    let digits_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(digits_end);
    if number.is_empty() {
        return Err(invalid("no number"));
    }
    let shift = match suffix.trim_start().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => return Err(invalid(&format!("unknown unit `{}`", suffix.trim()))),
    };
    let (whole, fraction) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    if fraction.contains('.') || (whole.is_empty() && fraction.is_empty()) {
        return Err(invalid("malformed number"));
    }
    if !fraction.is_empty() && shift == 0 {
        return Err(invalid("a byte count must be a whole number"));
    }
    // Exact arithmetic: whole × 2^shift + fraction × 2^shift / 10^digits.
    let too_large = || invalid("too large");
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| too_large())?
    };
    let mut bytes = whole.checked_mul(1u128 << shift).ok_or_else(too_large)?;
    if !fraction.is_empty() {
        // More than 19 digits adds nothing at these magnitudes.
        let digits = &fraction[..fraction.len().min(19)];
        let numerator: u128 = digits.parse().map_err(|_| invalid("malformed number"))?;
        let denominator = 10u128.pow(digits.len() as u32);
        bytes += (numerator << shift) / denominator;
    }
    let bytes = u64::try_from(bytes).map_err(|_| too_large())?;
    if bytes == 0 {
        return Err(invalid("a size must be more than zero"));
    }
    Ok(bytes)
}

/// Parses a dotted-quad IPv4 address (`172.30.0.10`: four decimal numbers
/// 0-255, no leading zeros). The clap value parser of every IP argument,
/// so a malformed address is a usage error; whether the address fits (the
/// guest subnet, a free one) is for the daemon to say.
pub fn parse_ipv4(text: &str) -> Result<Ipv4Addr, String> {
    text.trim()
        .parse()
        .map_err(|_| "expected an IPv4 address A.B.C.D, e.g. 172.30.0.10".to_string())
}

/// `path` made absolute against `cwd`, with `.` components dropped. `..`
/// is kept (it may cross a symlink); nothing is resolved on disk.
pub fn absolutize(path: &Path, cwd: &Path) -> PathBuf {
    let joined = if path.is_absolute() {
        path.to_path_buf()
    } else {
        cwd.join(path)
    };
    joined
        .components()
        .filter(|c| !matches!(c, Component::CurDir))
        .collect()
}

/// A local path from the command line as the absolute path string the
/// daemon takes. `what` names it in errors (`--rootfs`).
pub fn absolute_arg(path: &Path, what: &str) -> Result<String, CliError> {
    let absolute = if path.is_absolute() {
        absolutize(path, Path::new("/"))
    } else {
        let cwd = std::env::current_dir().map_err(|e| {
            CliError::with_source(
                format!("cannot make {what} {} absolute", path.display()),
                &e,
            )
            .with_cause("the current directory is not accessible")
            .with_hint("pass an absolute path")
        })?;
        absolutize(path, &cwd)
    };
    absolute.to_str().map(str::to_string).ok_or_else(|| {
        CliError::failed(format!("{what} {} is not valid UTF-8", path.display()))
            .with_hint("rename the file, or pass it through a symlink with a UTF-8 name")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1 << 10;
    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;
    const T: u64 = 1 << 40;

    #[test]
    fn sizes_with_and_without_units() {
        for (text, bytes) in [
            ("1073741824", G),
            ("512M", 512 * M),
            ("2G", 2 * G),
            ("1.5G", 3 * G / 2),
            ("64k", 64 * K),
            ("64K", 64 * K),
            ("64KiB", 64 * K),
            ("64KB", 64 * K),
            ("64kib", 64 * K),
            ("1T", T),
            ("1TiB", T),
            ("512B", 512),
            ("512 M", 512 * M),
            (" 2G ", 2 * G),
            (".5G", G / 2),
            ("1.", 1),
            ("0.5K", 512),
            ("1.0001K", 1024),
            ("1.999999999999999999999999T", 2 * T - 1),
        ] {
            assert_eq!(parse_size(text), Ok(bytes), "{text}");
        }
    }

    #[test]
    fn bad_sizes_say_what_is_expected() {
        for text in [
            "", "G", "-1G", "1X", "1GG", "1.2.3G", "1.5", ".", "0", "0M", "0.0001K", "1 G B",
            "abc", "1e9", "+1G",
        ] {
            let err = parse_size(text).expect_err(text);
            assert!(err.contains("e.g. 512M, 2G, 1.5G"), "{text}: {err}");
        }
        assert!(parse_size("1X")
            .expect_err("unit")
            .starts_with("unknown unit `X`"));
        assert!(parse_size("0")
            .expect_err("zero")
            .starts_with("a size must be more"));
    }

    #[test]
    fn overflow_is_refused() {
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(parse_size("18446744073709551616").is_err());
        assert!(parse_size("16777216T").is_err());
        assert_eq!(parse_size("16777215T"), Ok(16_777_215 * T));
        assert!(parse_size("99999999999999999999999999999999999999999G").is_err());
    }

    #[test]
    fn ipv4_addresses() {
        assert_eq!(parse_ipv4("172.30.0.10"), Ok(Ipv4Addr::new(172, 30, 0, 10)));
        assert_eq!(parse_ipv4(" 10.0.0.1 "), Ok(Ipv4Addr::new(10, 0, 0, 1)));
        for bad in [
            "",
            "172.30.0",
            "172.30.0.256",
            "172.30.0.1/24",
            "172.030.0.1",
            "::1",
            "web",
            "1.2.3.4.5",
            "-1.2.3.4",
        ] {
            let err = parse_ipv4(bad).expect_err(bad);
            assert!(err.contains("A.B.C.D"), "{bad}: {err}");
        }
    }

    #[test]
    fn relative_paths_become_absolute() {
        let cwd = Path::new("/home/u/work");
        assert_eq!(
            absolutize(Path::new("img.ext4"), cwd),
            PathBuf::from("/home/u/work/img.ext4")
        );
        assert_eq!(
            absolutize(Path::new("./out/./img.ext4"), cwd),
            PathBuf::from("/home/u/work/out/img.ext4")
        );
        assert_eq!(
            absolutize(Path::new("../boot/vmlinuz"), cwd),
            PathBuf::from("/home/u/work/../boot/vmlinuz")
        );
        assert_eq!(
            absolutize(Path::new("/boot/./vmlinuz"), cwd),
            PathBuf::from("/boot/vmlinuz")
        );
    }

    #[test]
    fn absolute_arg_uses_the_current_directory() {
        let cwd = std::env::current_dir().expect("cwd");
        let got = absolute_arg(Path::new("x/rootfs.ext4"), "--rootfs").expect("absolute");
        assert_eq!(PathBuf::from(got), cwd.join("x/rootfs.ext4"));
        assert_eq!(
            absolute_arg(Path::new("/a/b"), "--kernel").expect("absolute"),
            "/a/b"
        );
    }
}

//! Interface-name validation. Every name that reaches netlink, `/dev/net/tun`
//! or an nftables rule goes through [`validate_ifname`] first, whether it came
//! from the configuration, a client or the kernel's own listing.

use thiserror::Error;

/// Longest interface name Linux accepts, in bytes (`IFNAMSIZ` - 1).
pub const IFNAME_MAX: usize = 15;

/// Why a string is not a usable interface name.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IfNameError {
    #[error("interface name is empty")]
    Empty,
    #[error("interface name {name:?} is {len} bytes long; the limit is {IFNAME_MAX}")]
    TooLong { name: String, len: usize },
    #[error("interface name {name:?} is reserved")]
    Reserved { name: String },
    #[error(
        "interface name {name:?} contains {found:?}; only letters, digits, '_', '.' and '-' are allowed"
    )]
    BadChar { name: String, found: char },
}

/// Checks that `name` is a safe Linux interface name: 1 to 15 bytes of
/// `[A-Za-z0-9_.-]`, and not `.` or `..`. That excludes `/`, `:`, whitespace
/// and anything non-ASCII, which the kernel would either refuse or accept
/// with surprising results (a `/` or `..` name breaks `/sys/class/net`).
pub fn validate_ifname(name: &str) -> Result<(), IfNameError> {
    if name.is_empty() {
        return Err(IfNameError::Empty);
    }
    if let Some(found) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(IfNameError::BadChar {
            name: name.to_owned(),
            found,
        });
    }
    if name.len() > IFNAME_MAX {
        return Err(IfNameError::TooLong {
            name: name.to_owned(),
            len: name.len(),
        });
    }
    if name == "." || name == ".." {
        return Err(IfNameError::Reserved {
            name: name.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for name in [
            "banger0",
            "bgtap0",
            "bgtap12345",
            "eth0",
            "br-lan",
            "veth.1",
            "a_b",
            "a",
            "...",
        ] {
            assert_eq!(validate_ifname(name), Ok(()), "{name}");
        }
        // Exactly 15 bytes is the limit.
        assert_eq!(validate_ifname("abcdefghijklmno"), Ok(()));
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(validate_ifname(""), Err(IfNameError::Empty));
    }

    #[test]
    fn rejects_sixteen_bytes() {
        let err = validate_ifname("abcdefghijklmnop").expect_err("must be refused");
        assert!(
            matches!(err, IfNameError::TooLong { len: 16, .. }),
            "{err:?}"
        );
        assert!(err.to_string().contains("16 bytes"), "{err}");
    }

    #[test]
    fn rejects_dots_and_slashes() {
        assert!(matches!(
            validate_ifname("."),
            Err(IfNameError::Reserved { .. })
        ));
        assert!(matches!(
            validate_ifname(".."),
            Err(IfNameError::Reserved { .. })
        ));
        assert!(matches!(
            validate_ifname("../x"),
            Err(IfNameError::BadChar { found: '/', .. })
        ));
        assert!(matches!(
            validate_ifname("a/b"),
            Err(IfNameError::BadChar { found: '/', .. })
        ));
    }

    #[test]
    fn rejects_whitespace_and_other_characters() {
        for (name, bad) in [
            ("a b", ' '),
            ("a\tb", '\t'),
            ("eth0\n", '\n'),
            ("eth0:1", ':'),
            ("tap@x", '@'),
            ("tap\0", '\0'),
            ("tapé", 'é'),
        ] {
            assert_eq!(
                validate_ifname(name),
                Err(IfNameError::BadChar {
                    name: name.to_owned(),
                    found: bad
                }),
                "{name:?}"
            );
        }
    }

    #[test]
    fn multibyte_names_are_counted_in_bytes_but_rejected_for_charset_first() {
        // 8 characters, 16 bytes: the charset error is the more useful one.
        let err = validate_ifname("éééééééé").expect_err("must be refused");
        assert!(matches!(err, IfNameError::BadChar { .. }));
    }
}

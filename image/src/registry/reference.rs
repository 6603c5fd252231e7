//! Image references: parsing (through oci-client, so `debian` means
//! `docker.io/library/debian:latest`), the local name an image gets by
//! default, and whether a registry is on the loopback interface (which
//! decides plain HTTP).

use std::net::IpAddr;

pub use oci_client::Reference;

use super::PullError;

/// Longest default image name (a DNS label).
pub const MAX_NAME_LEN: usize = 63;

/// Parses an image reference the way `docker pull` does: no registry means
/// `docker.io`, a single name gains `library/`, no tag means `latest`, and
/// `@sha256:…` pins a digest.
/// Like Docker, repositories must be lowercase; pinned digests must be
/// sha256 (the only algorithm the layer cache stores).
pub fn parse_reference(input: &str) -> Result<Reference, PullError> {
    let invalid = |source| PullError::InvalidReference {
        input: input.to_string(),
        source,
    };
    let reference = input.trim().parse::<Reference>().map_err(invalid)?;
    if reference
        .repository()
        .bytes()
        .any(|b| b.is_ascii_uppercase())
    {
        return Err(invalid(oci_client::ParseError::NameContainsUppercase));
    }
    if reference
        .digest()
        .is_some_and(|d| crate::cache::validate_digest(d).is_err())
    {
        return Err(invalid(oci_client::ParseError::DigestUnsupported));
    }
    Ok(reference)
}

/// The name an image gets locally when the user does not give one: the
/// last path component of the repository, then the tag, or the first 12 hex
/// digits of the digest when the reference pins one. Lowercase
/// `[a-z0-9-]`, at most 63 characters, never starting or ending with `-`:
/// `debian:bookworm` → `debian-bookworm`, `ghcr.io/org/tool:1.2` →
/// `tool-1-2`, `alpine@sha256:0123456789abcdef…` → `alpine-0123456789ab`.
pub fn default_image_name(reference: &Reference) -> String {
    let repo = reference.repository();
    let base = sanitize(repo.rsplit('/').next().unwrap_or(repo));
    let suffix = match (reference.digest(), reference.tag()) {
        (Some(digest), _) => {
            let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
            sanitize(&hex.chars().take(12).collect::<String>())
        }
        (None, Some(tag)) => sanitize(tag),
        (None, None) => String::new(),
    };
    let base = if base.is_empty() {
        "image".to_string()
    } else {
        base
    };
    if suffix.is_empty() {
        return truncate(&base, MAX_NAME_LEN);
    }
    // Keep the whole suffix when possible: it is what tells versions apart.
    let suffix = truncate(&suffix, MAX_NAME_LEN / 2);
    let room = MAX_NAME_LEN - suffix.len() - 1;
    format!("{}-{}", truncate(&base, room), suffix)
}

/// Lowercases and maps every run of characters outside `[a-z0-9]` to one
/// `-`, without leading or trailing `-`.
fn sanitize(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            out.push(c);
        } else if !out.is_empty() && !out.ends_with('-') {
            out.push('-');
        }
    }
    while out.ends_with('-') {
        out.pop();
    }
    out
}

fn truncate(s: &str, max: usize) -> String {
    let mut out: String = s.chars().take(max).collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

/// Whether `registry` (`host`, `host:port`, `[v6]:port`) names the loopback
/// interface: `localhost`, 127.0.0.0/8 or `::1`.
pub fn is_loopback_registry(registry: &str) -> bool {
    let host = registry_host(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The host part of `host[:port]` / `[v6][:port]`, brackets removed.
fn registry_host(registry: &str) -> &str {
    if let Some(rest) = registry.strip_prefix('[') {
        return rest.split_once(']').map_or(rest, |(host, _)| host);
    }
    match registry.rsplit_once(':') {
        // A bare IPv6 address has more than one colon; do not cut it.
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host
        }
        _ => registry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> String {
        default_image_name(&parse_reference(s).expect("valid reference"))
    }

    #[test]
    fn docker_hub_defaults() {
        let r = parse_reference("debian").expect("parse");
        assert_eq!(r.registry(), "docker.io");
        assert_eq!(r.resolve_registry(), "index.docker.io");
        assert_eq!(r.repository(), "library/debian");
        assert_eq!(r.tag(), Some("latest"));
        let r = parse_reference("someone/tool:2").expect("parse");
        assert_eq!(r.repository(), "someone/tool");
        assert_eq!(r.tag(), Some("2"));
        let r = parse_reference("127.0.0.1:5000/a/b@sha256:".to_string().as_str());
        assert!(r.is_err());
        let digest = format!("sha256:{}", "ab".repeat(32));
        let r = parse_reference(&format!("127.0.0.1:5000/a/b@{digest}")).expect("parse");
        assert_eq!(r.registry(), "127.0.0.1:5000");
        assert_eq!(r.repository(), "a/b");
        assert_eq!(r.digest(), Some(digest.as_str()));
    }

    #[test]
    fn invalid_reference_is_an_error() {
        let err = parse_reference("UPPER/case").expect_err("uppercase repo");
        assert!(err.to_string().contains("UPPER/case"), "{err}");
        assert!(parse_reference("").is_err());
        let sha512 = format!("alpine@sha512:{}", "a".repeat(128));
        assert!(parse_reference(&sha512).is_err());
        let upper_hex = format!("alpine@sha256:{}", "A".repeat(64));
        assert!(parse_reference(&upper_hex).is_err());
    }

    #[test]
    fn default_names() {
        assert_eq!(name("debian:bookworm"), "debian-bookworm");
        assert_eq!(name("debian"), "debian-latest");
        assert_eq!(name("ghcr.io/org/tool:1.2"), "tool-1-2");
        assert_eq!(name("localhost:5000/tool_x:V1__2-"), "tool-x-v1-2");
        assert_eq!(name("x:___"), "x");
        let digest = format!("sha256:0123456789ab{}", "f".repeat(52));
        assert_eq!(name(&format!("alpine@{digest}")), "alpine-0123456789ab");
        assert_eq!(
            name(&format!("alpine:3.20@{digest}")),
            "alpine-0123456789ab"
        );
    }

    #[test]
    fn default_names_are_dns_labels() {
        let long = format!("registry.example/{}:{}", "a".repeat(120), "1".repeat(100));
        for input in [
            long.as_str(),
            "example.com/a/b/c.d-e:TAG.With.Dots",
            "a:__x__",
        ] {
            let n = name(input);
            assert!(!n.is_empty() && n.len() <= MAX_NAME_LEN, "{input} -> {n}");
            assert!(
                n.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
                "{input} -> {n}"
            );
            assert!(!n.starts_with('-') && !n.ends_with('-'), "{input} -> {n}");
        }
        let n = name(&long);
        assert!(n.ends_with(&format!("-{}", "1".repeat(31))), "{n}");
    }

    #[test]
    fn loopback_detection() {
        for yes in [
            "localhost",
            "localhost:5000",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.1.2.3:80",
            "[::1]:5000",
            "[::1]",
            "::1",
        ] {
            assert!(is_loopback_registry(yes), "{yes}");
        }
        for no in [
            "docker.io",
            "index.docker.io",
            "10.0.0.1:5000",
            "128.0.0.1",
            "localhost.example.com",
            "[::2]:5000",
            "ghcr.io",
        ] {
            assert!(!is_loopback_registry(no), "{no}");
        }
    }
}

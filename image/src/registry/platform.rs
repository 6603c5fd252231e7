//! Target platforms (`linux/amd64`, `linux/arm64/v8`…) and picking the
//! matching manifest out of a multi-platform image index.

use std::fmt;
use std::str::FromStr;

use oci_client::manifest::ImageIndexEntry;

/// A target platform. Defaults to `linux/amd64`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Platform {
    /// `GOOS` spelling: `linux`.
    pub os: String,
    /// `GOARCH` spelling: `amd64`, `arm64`, `arm`…
    pub architecture: String,
    /// CPU variant: `v8`, `v7`…; `None` matches any.
    pub variant: Option<String>,
}

impl Default for Platform {
    fn default() -> Self {
        Platform::linux_amd64()
    }
}

/// A `--platform` value that is not `os/arch[/variant]`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid platform {input:?}: expected os/architecture[/variant], e.g. linux/amd64 or linux/arm64/v8")]
pub struct ParsePlatformError {
    /// The rejected value.
    pub input: String,
}

impl Platform {
    /// `linux/amd64`.
    pub fn linux_amd64() -> Self {
        Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
        }
    }

    /// Whether an index entry's platform fits this one. Architectures are
    /// normalized (`aarch64` = `arm64`, `x86_64` = `amd64`) and `arm64`
    /// without a variant means `v8`. A wanted variant of `None` matches any.
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        let (arch, variant) = normalize_arch(architecture, variant);
        if !self.os.eq_ignore_ascii_case(os) || self.architecture != arch {
            return false;
        }
        match (&self.variant, variant) {
            (None, _) => true,
            (Some(want), Some(have)) => *want == have,
            (Some(_), None) => false,
        }
    }

    fn matches_entry(&self, entry: &ImageIndexEntry) -> bool {
        entry.platform.as_ref().is_some_and(|p| {
            self.matches(
                &p.os.to_string(),
                &p.architecture.to_string(),
                p.variant.as_deref(),
            )
        })
    }
}

/// `(arch, variant)` with aliases folded and arm64's implicit `v8` filled in.
fn normalize_arch(arch: &str, variant: Option<&str>) -> (String, Option<String>) {
    let arch = arch.to_ascii_lowercase();
    let variant = variant
        .filter(|v| !v.is_empty())
        .map(|v| v.to_ascii_lowercase());
    match arch.as_str() {
        "x86_64" | "x86-64" | "amd64" => ("amd64".into(), variant),
        "aarch64" | "arm64" => ("arm64".into(), Some(variant.unwrap_or_else(|| "v8".into()))),
        "armhf" => ("arm".into(), Some("v7".into())),
        "armel" => ("arm".into(), Some("v6".into())),
        "i386" | "i686" | "386" => ("386".into(), variant),
        _ => (arch, variant),
    }
}

impl FromStr for Platform {
    type Err = ParsePlatformError;

    /// `os/arch[/variant]`, or a bare architecture meaning `linux/<arch>`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || ParsePlatformError {
            input: s.to_string(),
        };
        let parts: Vec<&str> = s.trim().split('/').collect();
        if parts.iter().any(|p| {
            p.is_empty()
                || !p
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.')
        }) {
            return Err(err());
        }
        let (os, arch, variant) = match parts.as_slice() {
            [arch] => ("linux", *arch, None),
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => return Err(err()),
        };
        let (architecture, variant) = normalize_arch(arch, variant);
        // A bare `arm64` asks for any arm64, not specifically v8.
        let variant = if parts.len() == 3
            || arch.eq_ignore_ascii_case("armhf")
            || arch.eq_ignore_ascii_case("armel")
        {
            variant
        } else {
            None
        };
        Ok(Platform {
            os: os.to_ascii_lowercase(),
            architecture,
            variant,
        })
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// Renders an index entry's platform as `os/arch[/variant]`.
pub(crate) fn entry_platform(entry: &ImageIndexEntry) -> Option<String> {
    let p = entry.platform.as_ref()?;
    let mut s = format!("{}/{}", p.os, p.architecture);
    if let Some(variant) = p.variant.as_deref().filter(|v| !v.is_empty()) {
        s.push('/');
        s.push_str(variant);
    }
    Some(s)
}

/// Whether an index entry is an image for some platform, not an
/// attestation or another artifact (`unknown/unknown` in buildx indexes).
fn is_image_entry(entry: &ImageIndexEntry) -> bool {
    let Some(p) = entry.platform.as_ref() else {
        return false;
    };
    let reference_type = entry
        .annotations
        .as_ref()
        .and_then(|a| a.get("vnd.docker.reference.type"));
    p.os.to_string() != "unknown" && reference_type.is_none()
}

/// The entry of `entries` for `wanted`: among matches, one whose variant
/// is exactly the wanted one (or absent when none is wanted) comes first,
/// then index order. `Err` carries the sorted, deduplicated platforms the
/// index does offer.
pub(crate) fn select_manifest<'a>(
    entries: &'a [ImageIndexEntry],
    wanted: &Platform,
) -> Result<&'a ImageIndexEntry, Vec<String>> {
    let mut candidates = entries
        .iter()
        .filter(|e| is_image_entry(e) && wanted.matches_entry(e));
    let first = candidates.next();
    let exact = first.into_iter().chain(candidates).find(|e| {
        let variant = e.platform.as_ref().and_then(|p| p.variant.as_deref());
        variant.filter(|v| !v.is_empty()) == wanted.variant.as_deref()
    });
    if let Some(entry) = exact.or(first) {
        return Ok(entry);
    }
    let mut available: Vec<String> = entries
        .iter()
        .filter(|e| is_image_entry(e))
        .filter_map(entry_platform)
        .collect();
    available.sort();
    available.dedup();
    Err(available)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        s.parse().expect("valid platform")
    }

    fn entry(platform: Option<(&str, &str, Option<&str>)>, digest: &str) -> ImageIndexEntry {
        let mut v = serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest,
            "size": 1,
        });
        if let Some((os, arch, variant)) = platform {
            v["platform"] = serde_json::json!({"os": os, "architecture": arch});
            if let Some(variant) = variant {
                v["platform"]["variant"] = variant.into();
            }
        }
        serde_json::from_value(v).expect("entry")
    }

    #[test]
    fn parse_and_display() {
        assert_eq!(Platform::default().to_string(), "linux/amd64");
        assert_eq!(
            p("linux/arm64/v8"),
            Platform {
                os: "linux".into(),
                architecture: "arm64".into(),
                variant: Some("v8".into())
            }
        );
        assert_eq!(p("linux/arm64").variant, None);
        assert_eq!(p("arm64").to_string(), "linux/arm64");
        assert_eq!(p("linux/x86_64").to_string(), "linux/amd64");
        assert_eq!(p("linux/aarch64").to_string(), "linux/arm64");
        assert_eq!(p("Linux/ARM/v7").to_string(), "linux/arm/v7");
        assert_eq!(p("armhf").to_string(), "linux/arm/v7");
        for bad in ["", "/", "linux/", "a/b/c/d", "linux//v8", "li nux/amd64"] {
            let err = bad.parse::<Platform>().expect_err(bad);
            assert!(err.to_string().contains("linux/arm64/v8"), "{err}");
        }
    }

    #[test]
    fn matching_rules() {
        assert!(p("linux/arm64").matches("linux", "arm64", None));
        assert!(p("linux/arm64").matches("linux", "arm64", Some("v8")));
        assert!(p("linux/arm64/v8").matches("linux", "arm64", None));
        assert!(!p("linux/arm64/v9").matches("linux", "arm64", None));
        assert!(p("linux/arm/v7").matches("linux", "arm", Some("v7")));
        assert!(!p("linux/arm/v7").matches("linux", "arm", Some("v6")));
        assert!(!p("linux/arm/v7").matches("linux", "arm", None));
        assert!(!p("linux/amd64").matches("windows", "amd64", None));
        assert!(!p("linux/amd64").matches("linux", "arm64", None));
    }

    #[test]
    fn selects_from_an_index() {
        let entries = vec![
            entry(Some(("linux", "arm", Some("v6"))), "sha256:a"),
            entry(Some(("linux", "arm", Some("v7"))), "sha256:b"),
            entry(Some(("linux", "amd64", Some("v3"))), "sha256:c"),
            entry(Some(("linux", "amd64", None)), "sha256:d"),
            entry(Some(("linux", "arm64", Some("v8"))), "sha256:e"),
            entry(Some(("unknown", "unknown", None)), "sha256:f"),
            entry(None, "sha256:g"),
        ];
        let pick = |s: &str| select_manifest(&entries, &p(s)).map(|e| e.digest.clone());
        assert_eq!(pick("linux/amd64"), Ok("sha256:d".into()));
        assert_eq!(pick("linux/amd64/v3"), Ok("sha256:c".into()));
        assert_eq!(pick("linux/arm/v7"), Ok("sha256:b".into()));
        assert_eq!(pick("linux/arm64"), Ok("sha256:e".into()));
        assert_eq!(
            pick("linux/s390x"),
            Err(vec![
                "linux/amd64".to_string(),
                "linux/amd64/v3".into(),
                "linux/arm/v6".into(),
                "linux/arm/v7".into(),
                "linux/arm64/v8".into(),
            ])
        );
    }
}

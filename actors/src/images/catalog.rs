//! The embedded image catalog (`catalog.toml`): friendly names mapped to
//! a way to get the image (build it with mmdebstrap, or pull it).

use banger_protocol::{ErrorData, ErrorKind, ImageCatalogEntry};
use serde::Deserialize;

const EMBEDDED: &str = include_str!("catalog.toml");

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogImage {
    pub name: String,
    pub kind: String,
    pub source: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub kernel: Option<String>,
    #[serde(default)]
    pub default: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    image: Vec<CatalogImage>,
}

#[derive(Debug, Clone)]
pub struct ImageCatalog {
    pub images: Vec<CatalogImage>,
}

impl ImageCatalog {
    /// The catalog built into banger (parsed once: every create resolves
    /// its image against it).
    pub fn embedded() -> Self {
        static PARSED: std::sync::OnceLock<ImageCatalog> = std::sync::OnceLock::new();
        PARSED
            .get_or_init(|| Self::parse(EMBEDDED).unwrap_or(Self { images: Vec::new() }))
            .clone()
    }

    pub fn parse(text: &str) -> Result<Self, ErrorData> {
        let file: CatalogFile = toml::from_str(text).map_err(|e| {
            ErrorData::new(ErrorKind::Internal, "invalid image catalog").with_cause(e.to_string())
        })?;
        if let Some(bad) = file
            .image
            .iter()
            .find(|i| !["build", "oci"].contains(&i.kind.as_str()))
        {
            return Err(ErrorData::new(
                ErrorKind::Internal,
                format!(
                    "image catalog entry `{}` has unknown kind `{}`",
                    bad.name, bad.kind
                ),
            ));
        }
        Ok(Self { images: file.image })
    }

    pub fn find(&self, name: &str) -> Option<&CatalogImage> {
        self.images.iter().find(|i| i.name == name)
    }

    /// The image `vm create` uses when none is named.
    pub fn default_image(&self) -> Option<&CatalogImage> {
        self.images.iter().find(|i| i.default)
    }

    pub fn entries(&self, present: impl Fn(&str) -> bool) -> Vec<ImageCatalogEntry> {
        self.images
            .iter()
            .map(|i| ImageCatalogEntry {
                name: i.name.clone(),
                kind: i.kind.clone(),
                source: i.source.clone(),
                description: i.description.clone(),
                kernel: i.kernel.clone(),
                default: i.default,
                present: present(&i.name),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_catalog_has_one_default_build_entry() {
        let c = ImageCatalog::parse(EMBEDDED).expect("valid");
        let d = c.default_image().expect("a default");
        assert_eq!(d.name, "debian-bookworm");
        assert_eq!(d.kind, "build");
        assert_eq!(c.images.iter().filter(|i| i.default).count(), 1);
        assert_eq!(
            c.find("debian-bookworm-oci").map(|i| i.kind.as_str()),
            Some("oci")
        );
    }

    #[test]
    fn unknown_kind_is_refused() {
        let err = ImageCatalog::parse("[[image]]\nname='x'\nkind='zip'\nsource='y'\n")
            .expect_err("bad kind");
        assert!(err.message.contains("zip"));
    }
}

//! The image the pull benchmark pulls: generated, deterministic for a seed
//! and size, and shaped like a real one.
//!
//! Five gzip layers (base OS, language runtime, dependencies, application,
//! configuration) holding 40/25/15/12/8 % of the file data. Inside them:
//!
//! - a root skeleton (merged-`/usr` symlinks, `/etc`, `/root`, `/tmp`, a
//!   few setuid binaries);
//! - directory trees of pseudo-word names under each layer's roots;
//! - files of varied sizes (mostly small, a few of 1-16 MiB), 2 % empty,
//!   and of three kinds of content: text (compresses about 3.5x with
//!   gzip), machine code-like binary (about 2.4x) and random bytes (not at
//!   all); the image as a whole compresses about 2.2x, like a Debian base;
//! - relative and absolute symlinks, a few hardlinks, a few files owned by
//!   uid 1000 or 33;
//! - in the fourth layer: files of the base layer overwritten, about 2 %
//!   of the files below deleted by `.wh.` whiteouts, and one directory of
//!   the second layer deleted whole; in the fifth: an opaque whiteout
//!   (`.wh..wh..opq`) over a directory of the third, then new files in it.
//!
//! The plan (paths, sizes, seeds) is made first in one pass; the layers'
//! tars are then written and gzipped in parallel, one thread per core.

use std::collections::HashSet;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context as _};
use banger_image::cache::sha256_digest;

/// OCI media type of a gzip layer.
pub const LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

/// Layers in the image.
pub const LAYERS: usize = 5;

/// Share of the file data in each layer, base first.
const LAYER_SHARES: [f64; LAYERS] = [0.40, 0.25, 0.15, 0.12, 0.08];

/// Directories each layer puts its trees under.
const LAYER_ROOTS: [&[&str]; LAYERS] = [
    &[
        "usr/bin",
        "usr/sbin",
        "usr/lib/x86_64-linux-gnu",
        "usr/share/doc",
        "usr/share/locale",
        "usr/share/zoneinfo",
        "etc/default",
        "var/lib/dpkg/info",
        "var/lib/apt/lists",
    ],
    &[
        "usr/lib/python3/dist-packages",
        "usr/share/perl5",
        "usr/lib/x86_64-linux-gnu/gconv",
        "usr/share/man",
    ],
    &[
        "usr/local/lib/node_modules",
        "usr/local/share/ca",
        "opt/toolchain",
    ],
    &["srv/app/lib", "srv/app/assets", "srv/app/bin"],
    &["srv/app/config", "srv/app/static", "var/cache/app"],
];

/// Fixed timestamp of every member, as reproducible builds do.
const MTIME: u64 = 1_700_000_000;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Spec {
    /// Bytes of file data over all layers (the tars are a little larger).
    pub file_bytes: u64,
    pub seed: u64,
}

/// A generated image, ready for `TestRegistry::push_image`.
#[derive(Debug)]
pub struct Image {
    pub layers: Vec<Layer>,
    /// The OCI image config (with the layers' diff ids).
    pub config: Vec<u8>,
    pub stats: Stats,
}

#[derive(Debug)]
pub struct Layer {
    /// The gzipped tar, as pushed.
    pub gzip: Vec<u8>,
    pub tar_bytes: u64,
    /// `sha256:` of the uncompressed tar.
    pub diff_id: String,
}

/// What the image holds, over all layers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub files: u64,
    pub file_bytes: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hardlinks: u64,
    /// `.wh.` members (opaque ones included).
    pub whiteouts: u64,
    /// Files that replace a file of a lower layer.
    pub overwrites: u64,
    pub tar_bytes: u64,
    pub gzip_bytes: u64,
}

impl Image {
    /// Plans and builds the image; `cancel` stops the build early (with an
    /// error) when set, so an interrupted benchmark exits promptly.
    pub fn generate(spec: Spec, cancel: &AtomicBool) -> anyhow::Result<Image> {
        let (plan, mut stats) = plan(spec);
        let layers = build_layers(&plan, cancel)?;
        stats.tar_bytes = layers.iter().map(|l| l.tar_bytes).sum();
        stats.gzip_bytes = layers.iter().map(|l| l.gzip.len() as u64).sum();
        let config = config_json(&layers)?;
        Ok(Image {
            layers,
            config,
            stats,
        })
    }
}

/// How a file's bytes are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Content {
    /// Lines of pseudo-words: compresses like source code or docs.
    Text,
    /// Random, low-entropy and repeated 64-byte blocks: like an ELF.
    Code,
    /// Incompressible, like JPEGs or already-compressed archives.
    Random,
}

/// One tar member.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    File {
        path: String,
        size: u64,
        content: Content,
        seed: u64,
        mode: u32,
        owner: u64,
    },
    Symlink {
        path: String,
        target: String,
    },
    Hardlink {
        path: String,
        target: String,
    },
    /// A `.wh.` member; `path` is its full name.
    Whiteout {
        path: String,
    },
}

/// A file of the plan that later layers may overwrite or delete.
#[derive(Debug, Clone)]
struct Placed {
    path: String,
    size: u64,
    content: Content,
    /// It has a hardlink, or is one: left alone by later layers.
    linked: bool,
}

/// SplitMix64: small, fast and the same on every platform and version.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[0, n)`; `n` > 0.
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }

    /// Log-uniform in `[lo, hi)`.
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (lo_f, hi_f) = ((lo as f64).ln(), (hi as f64).ln());
        ((lo_f + self.unit() * (hi_f - lo_f)).exp() as u64).clamp(lo, hi - 1)
    }
}

/// Syllables of pseudo-words, for names and text.
const SYLLABLES: [&str; 32] = [
    "ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ba", "de", "fi", "go", "hu", "ja", "ke", "li",
    "ma", "no", "pe", "qui", "ra", "se", "to", "u", "ve", "wa", "xi", "yo", "ze", "tr", "st", "on",
];

/// Words of generated text.
const VOCABULARY_SIZE: usize = 1024;

/// The same [`VOCABULARY_SIZE`] words for every file and seed.
fn vocabulary() -> &'static [String] {
    static WORDS: OnceLock<Vec<String>> = OnceLock::new();
    WORDS.get_or_init(|| {
        let mut rng = Rng(0x0076_6f63_6162);
        (0..VOCABULARY_SIZE).map(|_| word(&mut rng)).collect()
    })
}

fn word(rng: &mut Rng) -> String {
    let syllables = 1 + rng.below(4);
    (0..syllables)
        .map(|_| SYLLABLES[rng.below(SYLLABLES.len())])
        .collect()
}

/// Builds the plan: every layer's members in order, and the totals.
struct Planner {
    rng: Rng,
    /// Makes names unique.
    counter: u64,
    stats: Stats,
}

fn plan(spec: Spec) -> (Vec<Vec<Entry>>, Stats) {
    let mut p = Planner {
        rng: Rng(spec.seed ^ 0x6261_6e67_6572),
        counter: 0,
        stats: Stats::default(),
    };
    let mut layers: Vec<Vec<Entry>> = Vec::new();
    // Files of each layer, and directories each layer created.
    let mut placed: Vec<Vec<Placed>> = Vec::new();
    let mut made_dirs: Vec<Vec<String>> = Vec::new();
    for (i, share) in LAYER_SHARES.iter().enumerate() {
        let budget = (spec.file_bytes as f64 * share) as u64;
        let mut entries = Vec::new();
        let mut used = 0;
        let mut files = Vec::new();
        if i == 0 {
            used += p.skeleton(&mut entries, &mut files);
        }
        if i == 3 {
            used += p.overwrite(&mut entries, &placed[0]);
            p.delete(&mut entries, &placed[..3], &made_dirs[1]);
        }
        if i == 4 {
            used += p.replace_dir(&mut entries, &made_dirs[2], &mut files);
        }
        let dirs = p.trees(&mut entries, LAYER_ROOTS[i], budget.saturating_sub(used));
        p.fill(
            &mut entries,
            &mut files,
            &dirs,
            budget.saturating_sub(used),
            i == 4,
        );
        layers.push(entries);
        placed.push(files);
        made_dirs.push(dirs);
    }
    (layers, p.stats)
}

impl Planner {
    fn unique(&mut self) -> u64 {
        self.counter += 1;
        self.counter
    }

    fn dir(&mut self, entries: &mut Vec<Entry>, path: &str, mode: u32) {
        entries.push(Entry::Dir {
            path: path.to_string(),
            mode,
        });
        self.stats.dirs += 1;
    }

    fn file(&mut self, entries: &mut Vec<Entry>, path: &str, size: u64, content: Content) -> u64 {
        let mode = if path.contains("bin/") || (content == Content::Code && self.rng.chance(0.3)) {
            0o755
        } else {
            0o644
        };
        self.file_with(entries, path, size, content, mode, 0)
    }

    fn file_with(
        &mut self,
        entries: &mut Vec<Entry>,
        path: &str,
        size: u64,
        content: Content,
        mode: u32,
        owner: u64,
    ) -> u64 {
        entries.push(Entry::File {
            path: path.to_string(),
            size,
            content,
            seed: self.rng.next_u64(),
            mode,
            owner,
        });
        self.stats.files += 1;
        self.stats.file_bytes += size;
        size
    }

    fn symlink(&mut self, entries: &mut Vec<Entry>, path: &str, target: &str) {
        entries.push(Entry::Symlink {
            path: path.to_string(),
            target: target.to_string(),
        });
        self.stats.symlinks += 1;
    }

    fn whiteout(&mut self, entries: &mut Vec<Entry>, path: String) {
        entries.push(Entry::Whiteout { path });
        self.stats.whiteouts += 1;
    }

    /// The root of a Debian-like system; returns the file bytes it holds.
    fn skeleton(&mut self, entries: &mut Vec<Entry>, files: &mut Vec<Placed>) -> u64 {
        for dir in [
            "usr",
            "usr/bin",
            "usr/sbin",
            "usr/lib",
            "usr/lib64",
            "usr/share",
            "etc",
            "var",
            "var/lib",
            "var/log",
            "home",
            "dev",
            "proc",
            "sys",
            "run",
            "mnt",
            "opt",
            "srv",
        ] {
            self.dir(entries, dir, 0o755);
        }
        self.dir(entries, "root", 0o700);
        self.dir(entries, "tmp", 0o1777);
        self.dir(entries, "var/tmp", 0o1777);
        for (link, target) in [
            ("bin", "usr/bin"),
            ("sbin", "usr/sbin"),
            ("lib", "usr/lib"),
            ("lib64", "usr/lib64"),
        ] {
            self.symlink(entries, link, target);
        }
        let mut bytes = 0;
        let text_files: [(&str, u64); 6] = [
            ("etc/passwd", 1_200),
            ("etc/group", 600),
            ("etc/os-release", 300),
            ("etc/hostname", 12),
            ("root/.bashrc", 570),
            ("root/.profile", 160),
        ];
        for (path, size) in text_files {
            bytes += self.file(entries, path, size, Content::Text);
        }
        for name in ["su", "passwd", "mount", "umount", "newgrp"] {
            let size = self.rng.log_uniform(30 << 10, 90 << 10);
            let path = format!("usr/bin/{name}");
            bytes += self.file_with(entries, &path, size, Content::Code, 0o4755, 0);
            files.push(Placed {
                path,
                size,
                content: Content::Code,
                linked: true,
            });
        }
        self.dir(entries, "usr/lib/x86_64-linux-gnu", 0o755);
        let loader = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2";
        bytes += self.file_with(entries, loader, 210 << 10, Content::Code, 0o755, 0);
        self.symlink(
            entries,
            "usr/lib64/ld-linux-x86-64.so.2",
            "../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        );
        bytes
    }

    /// The layer's roots (every component, as image builders list them)
    /// and about one subdirectory per 16 files under them. Returns the
    /// directories files may go in.
    fn trees(&mut self, entries: &mut Vec<Entry>, roots: &[&str], budget: u64) -> Vec<String> {
        // Parents listed earlier in this layer are not listed again.
        let mut listed: HashSet<String> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Dir { path, .. } => Some(path.clone()),
                _ => None,
            })
            .collect();
        let mut dirs: Vec<String> = Vec::new();
        for root in roots {
            let mut prefix = String::new();
            for part in root.split('/') {
                if !prefix.is_empty() {
                    prefix.push('/');
                }
                prefix.push_str(part);
                if listed.insert(prefix.clone()) {
                    self.dir(entries, &prefix, 0o755);
                }
            }
            dirs.push(root.to_string());
        }
        // About 24 KiB of data per file on average (see `file_size`).
        let subdirs = (budget / (24 << 10) / 16).max(4);
        for _ in 0..subdirs {
            let parent = dirs[self.rng.below(dirs.len())].clone();
            let path = format!("{parent}/{}-{}", word(&mut self.rng), self.unique());
            self.dir(entries, &path, 0o755);
            dirs.push(path);
        }
        dirs
    }

    /// Files (and links to them) in `dirs` until `budget` bytes of data.
    fn fill(
        &mut self,
        entries: &mut Vec<Entry>,
        files: &mut Vec<Placed>,
        dirs: &[String],
        budget: u64,
        app_owned: bool,
    ) -> u64 {
        let mut used = 0;
        while used < budget {
            let dir = &dirs[self.rng.below(dirs.len())];
            let size = self.file_size().min(budget - used);
            let content = self.content(size);
            let ext = match content {
                Content::Text => ["txt", "py", "conf", "h", "js", "md"][self.rng.below(6)],
                Content::Code => ["so", "o", "bin", "a"][self.rng.below(4)],
                Content::Random => ["gz", "png", "jpg", "woff2"][self.rng.below(4)],
            };
            let name = format!("{}{}.{ext}", word(&mut self.rng), self.unique());
            let path = format!("{dir}/{name}");
            used += if app_owned && self.rng.chance(0.05) {
                let owner = if self.rng.chance(0.5) { 1000 } else { 33 };
                self.file_with(entries, &path, size, content, 0o640, owner)
            } else {
                self.file(entries, &path, size, content)
            };
            let mut linked = false;
            if self.rng.chance(0.04) {
                // `libfoo.so -> libfoo.so.1`-style, next to the file.
                let link = format!("{dir}/{}-{}.link", word(&mut self.rng), self.unique());
                self.symlink(entries, &link, &name);
            } else if self.rng.chance(0.01) {
                let link = format!("{dir}/{}-{}.abs", word(&mut self.rng), self.unique());
                self.symlink(entries, &link, &format!("/{path}"));
            } else if self.rng.chance(0.003) {
                let link = format!("{dir}/{}-{}.hard", word(&mut self.rng), self.unique());
                entries.push(Entry::Hardlink {
                    path: link,
                    target: path.clone(),
                });
                self.stats.hardlinks += 1;
                linked = true;
            }
            files.push(Placed {
                path,
                size,
                content,
                linked,
            });
        }
        used
    }

    /// Mostly small files, some medium, a few large; 2 % empty. About
    /// 24 KiB on average, half the bytes in the few large files.
    fn file_size(&mut self) -> u64 {
        let r = self.rng.unit();
        if r < 0.02 {
            0
        } else if r < 0.95 {
            self.rng.log_uniform(64, 32 << 10)
        } else if r < 0.998 {
            self.rng.log_uniform(32 << 10, 1 << 20)
        } else {
            self.rng.log_uniform(1 << 20, 16 << 20)
        }
    }

    fn content(&mut self, size: u64) -> Content {
        let r = self.rng.unit();
        let (text, code) = if size >= 1 << 20 {
            (0.3, 0.85)
        } else {
            (0.55, 0.85)
        };
        if r < text {
            Content::Text
        } else if r < code {
            Content::Code
        } else {
            Content::Random
        }
    }

    /// Replaces about 1 % of the base layer's files with new contents of
    /// about the same size, as a package upgrade does.
    fn overwrite(&mut self, entries: &mut Vec<Entry>, base: &[Placed]) -> u64 {
        let mut bytes = 0;
        let mut replaced = 0;
        for f in base.iter().filter(|f| !f.linked) {
            if self.rng.chance(0.01) {
                bytes += self.file(entries, &f.path, f.size, f.content);
                replaced += 1;
            }
        }
        // A small image may draw none: replace at least one file, so every
        // image exercises an overwrite.
        if replaced == 0 {
            if let Some(f) = base.iter().find(|f| !f.linked) {
                bytes += self.file(entries, &f.path, f.size, f.content);
                replaced = 1;
            }
        }
        self.stats.overwrites += replaced;
        bytes
    }

    /// Whiteouts for about 2 % of the files of `below` (other than those
    /// overwritten just before) and for one whole directory of the second
    /// layer, the subdirectory holding the most files (what `rm -rf` of a
    /// cache looks like).
    fn delete(&mut self, entries: &mut Vec<Entry>, below: &[Vec<Placed>], second_dirs: &[String]) {
        let overwritten: HashSet<&str> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::File { path, .. } => Some(path.as_str()),
                _ => None,
            })
            .collect();
        let files_directly_in = |dir: &str| {
            below[1]
                .iter()
                .filter(|f| {
                    f.path
                        .rsplit_once('/')
                        .is_some_and(|(parent, _)| parent == dir)
                })
                .count()
        };
        // Subdirectories only: the roots are shared with other layers.
        let roots = LAYER_ROOTS[1].len();
        let doomed = second_dirs[roots.min(second_dirs.len() - 1)..]
            .iter()
            .max_by_key(|d| files_directly_in(d))
            .cloned();
        let mut outs = Vec::new();
        for f in below.iter().flatten() {
            let inside = doomed
                .as_deref()
                .is_some_and(|d| f.path.starts_with(&format!("{d}/")));
            if !f.linked
                && !inside
                && !overwritten.contains(f.path.as_str())
                && self.rng.chance(0.02)
            {
                outs.push(f.path.clone());
            }
        }
        outs.extend(doomed);
        for path in outs {
            let (dir, base) = path.rsplit_once('/').unwrap_or(("", &path));
            let name = if dir.is_empty() {
                format!(".wh.{base}")
            } else {
                format!("{dir}/.wh.{base}")
            };
            self.whiteout(entries, name);
        }
    }

    /// An opaque whiteout over the third layer's fullest subdirectory, then
    /// a few new files in it.
    fn replace_dir(
        &mut self,
        entries: &mut Vec<Entry>,
        third_dirs: &[String],
        files: &mut Vec<Placed>,
    ) -> u64 {
        let roots = LAYER_ROOTS[2].len();
        let Some(dir) = third_dirs.get(
            roots
                + self
                    .rng
                    .below(third_dirs.len().saturating_sub(roots).max(1)),
        ) else {
            return 0;
        };
        let dir = dir.clone();
        self.dir(entries, &dir, 0o755);
        self.whiteout(entries, format!("{dir}/.wh..wh..opq"));
        let mut bytes = 0;
        for _ in 0..8 {
            let size = self.rng.log_uniform(200, 20 << 10);
            let path = format!("{dir}/{}{}.json", word(&mut self.rng), self.unique());
            bytes += self.file(entries, &path, size, Content::Text);
            files.push(Placed {
                path,
                size,
                content: Content::Text,
                linked: false,
            });
        }
        bytes
    }
}

/// Writes and gzips every layer, on as many threads as there are cores.
fn build_layers(plan: &[Vec<Entry>], cancel: &AtomicBool) -> anyhow::Result<Vec<Layer>> {
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(plan.len());
    let next = AtomicUsize::new(0);
    let done: Mutex<Vec<Option<anyhow::Result<Layer>>>> =
        Mutex::new(plan.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                // The base layer is the largest: start with it.
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(entries) = plan.get(i) else { break };
                let layer = build_layer(entries, cancel);
                if layer.is_err() {
                    cancel.store(true, Ordering::Relaxed);
                }
                if let Ok(mut done) = done.lock() {
                    done[i] = Some(layer);
                }
            });
        }
    });
    let done = done
        .into_inner()
        .map_err(|_| anyhow!("a layer-building thread panicked"))?;
    done.into_iter()
        .enumerate()
        .map(|(i, layer)| {
            layer
                .ok_or_else(|| anyhow!("layer {} was not built", i + 1))?
                .with_context(|| format!("building layer {}", i + 1))
        })
        .collect()
}

fn build_layer(entries: &[Entry], cancel: &AtomicBool) -> anyhow::Result<Layer> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut data = Vec::new();
    for entry in entries {
        if cancel.load(Ordering::Relaxed) {
            bail!("cancelled");
        }
        let mut h = tar::Header::new_gnu();
        h.set_mtime(MTIME);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        match entry {
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                builder.append_data(&mut h, format!("{path}/"), std::io::empty())?;
            }
            Entry::File {
                path,
                size,
                content,
                seed,
                mode,
                owner,
            } => {
                fill(&mut data, *content, *seed, *size as usize);
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_uid(*owner);
                h.set_gid(*owner);
                h.set_size(*size);
                builder.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                builder.append_link(&mut h, path, target)?;
            }
            Entry::Hardlink { path, target } => {
                h.set_entry_type(tar::EntryType::Link);
                h.set_mode(0o644);
                builder.append_link(&mut h, path, target)?;
            }
            Entry::Whiteout { path } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                builder.append_data(&mut h, path, std::io::empty())?;
            }
        }
    }
    let tar = builder.into_inner()?;
    let diff_id = sha256_digest(&tar);
    let mut gz = flate2::write::GzEncoder::new(
        Vec::with_capacity(tar.len() / 2),
        flate2::Compression::default(),
    );
    for chunk in tar.chunks(4 << 20) {
        if cancel.load(Ordering::Relaxed) {
            bail!("cancelled");
        }
        gz.write_all(chunk)?;
    }
    Ok(Layer {
        gzip: gz.finish()?,
        tar_bytes: tar.len() as u64,
        diff_id,
    })
}

/// Replaces `out` with `size` bytes of `content` made from `seed`.
fn fill(out: &mut Vec<u8>, content: Content, seed: u64, size: usize) {
    out.clear();
    out.reserve(size);
    let mut rng = Rng(seed);
    match content {
        Content::Text => {
            let vocabulary = vocabulary();
            while out.len() < size {
                for _ in 0..rng.below(4) {
                    out.extend_from_slice(b"    ");
                }
                let words = 3 + rng.below(10);
                for w in 0..words {
                    if w > 0 {
                        out.push(if rng.chance(0.1) { b'_' } else { b' ' });
                    }
                    // Zipf-like: a few words make up most of the text.
                    let rank = (VOCABULARY_SIZE as f64 * rng.unit().powi(4)) as usize;
                    out.extend_from_slice(vocabulary[rank].as_bytes());
                }
                let end: &[u8] =
                    [b"\n".as_slice(), b";\n", b"(\n", b",\n", b" = 0\n"][rng.below(5)];
                out.extend_from_slice(end);
            }
        }
        Content::Code => {
            while out.len() < size {
                let r = rng.below(100);
                if r < 40 && out.len() >= 64 {
                    // A block seen recently.
                    let back = 64 * (1 + rng.below((out.len() / 64).min(64)));
                    let start = out.len() - back;
                    out.extend_from_within(start..start + 64);
                } else if r < 80 {
                    // Mostly zeros with small values: tables, padding, immediates.
                    for _ in 0..8 {
                        let x = rng.next_u64();
                        out.extend(x.to_le_bytes().map(|b| if b < 160 { 0 } else { b & 0x1f }));
                    }
                } else {
                    for _ in 0..8 {
                        out.extend_from_slice(&rng.next_u64().to_le_bytes());
                    }
                }
            }
        }
        Content::Random => {
            while out.len() < size {
                out.extend_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
    }
    out.truncate(size);
}

fn config_json(layers: &[Layer]) -> anyhow::Result<Vec<u8>> {
    let diff_ids: Vec<&str> = layers.iter().map(|l| l.diff_id.as_str()).collect();
    let history: Vec<serde_json::Value> = [
        "base",
        "runtime",
        "dependencies",
        "application",
        "configuration",
    ]
    .iter()
    .take(layers.len())
    .map(|step| serde_json::json!({"created_by": format!("banger-bench: {step} layer")}))
    .collect();
    Ok(serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/srv/app/bin/start"],
            "WorkingDir": "/srv/app"
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history
    }))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Spec = Spec {
        file_bytes: 4 << 20,
        seed: 7,
    };

    #[test]
    fn the_plan_is_deterministic_and_fills_the_budget() {
        let (a, stats) = plan(SMALL);
        let (b, _) = plan(SMALL);
        assert_eq!(a, b);
        assert_ne!(a, plan(Spec { seed: 8, ..SMALL }).0);
        assert_eq!(a.len(), LAYER_SHARES.len());
        // Within a few bytes per layer (shares are rounded down).
        assert!(stats.file_bytes <= SMALL.file_bytes, "{stats:?}");
        assert!(stats.file_bytes >= SMALL.file_bytes - 16, "{stats:?}");
        assert!(
            stats.files > 50 && stats.dirs > 20 && stats.symlinks > 4,
            "{stats:?}"
        );
        assert!(stats.whiteouts >= 2 && stats.overwrites >= 1, "{stats:?}");
    }

    #[test]
    fn later_layers_delete_and_replace() {
        let (layers, _) = plan(SMALL);
        let names = |i: usize| -> Vec<String> {
            layers[i]
                .iter()
                .filter_map(|e| match e {
                    Entry::Whiteout { path } => Some(path.clone()),
                    _ => None,
                })
                .collect()
        };
        assert!(names(0).is_empty() && names(1).is_empty() && names(2).is_empty());
        assert!(names(3)
            .iter()
            .all(|n| n.contains("/.wh.") && !n.ends_with(".wh..wh..opq")));
        let opaque = names(4);
        assert_eq!(opaque.len(), 1);
        assert!(opaque[0].ends_with("/.wh..wh..opq"));
    }

    #[test]
    fn contents_have_the_intended_sizes_and_compressibility() {
        let ratio = |content| {
            let mut data = Vec::new();
            fill(&mut data, content, 3, 1 << 20);
            assert_eq!(data.len(), 1 << 20);
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            gz.write_all(&data).expect("gzip");
            data.len() as f64 / gz.finish().expect("gzip").len() as f64
        };
        let (text, code, random) = (
            ratio(Content::Text),
            ratio(Content::Code),
            ratio(Content::Random),
        );
        assert!(text > 3.0, "text compresses {text:.2}x");
        assert!((1.8..3.0).contains(&code), "code compresses {code:.2}x");
        assert!(random < 1.01, "random compresses {random:.2}x");
        let mut data = vec![1, 2, 3];
        fill(&mut data, Content::Code, 1, 100);
        assert_eq!(data.len(), 100);
        fill(&mut data, Content::Text, 1, 0);
        assert!(data.is_empty());
    }

    #[test]
    fn layers_are_valid_tars_with_matching_diff_ids() {
        let image = Image::generate(SMALL, &AtomicBool::new(false)).expect("image");
        assert_eq!(image.layers.len(), 5);
        let mut members = 0;
        for layer in &image.layers {
            let tar = {
                let mut d = flate2::read::GzDecoder::new(layer.gzip.as_slice());
                let mut out = Vec::new();
                std::io::Read::read_to_end(&mut d, &mut out).expect("gunzip");
                out
            };
            assert_eq!(tar.len() as u64, layer.tar_bytes);
            assert_eq!(sha256_digest(&tar), layer.diff_id);
            let mut archive = tar::Archive::new(tar.as_slice());
            members += archive.entries().expect("entries").count();
        }
        let s = image.stats;
        assert_eq!(
            members as u64,
            s.files + s.dirs + s.symlinks + s.hardlinks + s.whiteouts
        );
        assert!(
            s.tar_bytes > s.file_bytes && s.gzip_bytes < s.tar_bytes,
            "{s:?}"
        );
        let config: serde_json::Value = serde_json::from_slice(&image.config).expect("config");
        assert_eq!(
            config["rootfs"]["diff_ids"][0],
            image.layers[0].diff_id.as_str()
        );
    }

    #[test]
    fn cancel_stops_the_build() {
        let err = Image::generate(SMALL, &AtomicBool::new(true)).expect_err("cancelled");
        assert!(format!("{err:#}").contains("cancelled"), "{err:#}");
    }
}

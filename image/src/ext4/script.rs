//! Renders [`Fixup`]s as a `debugfs -w -f` command script.
//!
//! The script is the one place where names from a hostile layer meet a
//! command language, so quoting is strict: debugfs splits lines on
//! whitespace and understands only `"..."` with `""` for a literal quote
//! (lib/ss/parse.c), reads the file line by line into an 8 KiB buffer, and
//! has commands that touch the host (`dump`, `rdump`, `write`, `lcd`). A
//! name containing a newline or carriage return cannot be quoted and is
//! refused, as is any line long enough to be split by that buffer. Xattr
//! values never appear in the script: `ea_set -f` reads each from its own
//! file.
//!
//! `mknod` in debugfs 1.47.0 treats its argument as a name in the current
//! directory (a `/` in it ends up inside the entry name), so nodes are made
//! with `cd <dir>` + `mknod <name>`.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::Edit;
use crate::unpack::{Fixup, NodeKind};

/// Longest script line written; debugfs reads lines into `BUFSIZ` (8192).
const MAX_LINE: usize = 8000;

/// A rendered script plus the xattr value files it refers to.
#[derive(Debug, Default)]
pub(crate) struct Script {
    pub text: Vec<u8>,
    /// `(file name inside the value directory, contents)`.
    pub values: Vec<(String, Vec<u8>)>,
}

/// Why a fixup cannot be scripted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unscriptable {
    pub path: PathBuf,
}

/// Quotes one argument for debugfs; `None` when it cannot be expressed.
pub(crate) fn quote(arg: &[u8]) -> Option<Vec<u8>> {
    if arg.iter().any(|b| matches!(b, b'\n' | b'\r' | 0)) {
        return None;
    }
    let mut out = Vec::with_capacity(arg.len() + 2);
    out.push(b'"');
    for b in arg {
        if *b == b'"' {
            out.push(b'"');
        }
        out.push(*b);
    }
    out.push(b'"');
    Some(out)
}

/// Renders `fixups`; value files are named `v<N>` inside `value_dir`.
pub(crate) fn render(fixups: &[Fixup], value_dir: &Path) -> Result<Script, Unscriptable> {
    let mut script = Script::default();
    for f in fixups {
        let bad = || Unscriptable {
            path: f.path.clone(),
        };
        let path = f.path.as_os_str().as_bytes();
        let p = quote(path).ok_or_else(bad)?;
        let mut line = |parts: &[&[u8]]| -> Result<(), Unscriptable> {
            let start = script.text.len();
            for (i, part) in parts.iter().enumerate() {
                if i > 0 {
                    script.text.push(b' ');
                }
                script.text.extend_from_slice(part);
            }
            if script.text.len() - start > MAX_LINE {
                return Err(bad());
            }
            script.text.push(b'\n');
            Ok(())
        };
        if let Some(node) = f.node {
            let parent = f.path.parent().unwrap_or(Path::new("/"));
            let name = f.path.file_name().ok_or_else(bad)?;
            let dir = quote(parent.as_os_str().as_bytes()).ok_or_else(bad)?;
            let name = quote(name.as_bytes()).ok_or_else(bad)?;
            line(&[b"rm", &p])?;
            line(&[b"cd", &dir])?;
            match node.kind {
                NodeKind::Fifo => line(&[b"mknod", &name, b"p"])?,
                kind => {
                    let t: &[u8] = if kind == NodeKind::Char { b"c" } else { b"b" };
                    let major = node.major.to_string();
                    let minor = node.minor.to_string();
                    line(&[b"mknod", &name, t, major.as_bytes(), minor.as_bytes()])?
                }
            }
            line(&[b"cd", b"/"])?;
        }
        if let Some(mode) = f.mode {
            line(&[b"sif", &p, b"mode", format!("0{mode:o}").as_bytes()])?;
        }
        if let Some((uid, gid)) = f.owner {
            line(&[b"sif", &p, b"uid", uid.to_string().as_bytes()])?;
            line(&[b"sif", &p, b"gid", gid.to_string().as_bytes()])?;
        }
        if let Some(mtime) = f.mtime {
            let mtime = mtime.max(0);
            line(&[b"sif", &p, b"mtime", format!("@{mtime}").as_bytes()])?;
        }
        for (name, value) in &f.xattrs {
            let file = format!("v{}", script.values.len());
            let value_path = value_dir.join(&file);
            let vp = quote(value_path.as_os_str().as_bytes()).ok_or_else(bad)?;
            let n = quote(name.as_bytes()).ok_or_else(bad)?;
            line(&[b"ea_set", b"-f", &vp, &p, &n])?;
            script.values.push((file, value.clone()));
        }
    }
    Ok(script)
}

/// Renders `edits` after whatever `script` holds already; file contents
/// become value files (`v<N>` inside `value_dir`) that `write` reads.
/// Paths must be absolute; `write` links its name into the current
/// directory (a `/` in it would end up inside the name), so files are
/// written with `cd <parent>` + `write <value> <name>`.
pub(crate) fn render_edits(
    script: &mut Script,
    edits: &[Edit],
    value_dir: &Path,
) -> Result<(), Unscriptable> {
    for edit in edits {
        let path = edit.path();
        let bad = || Unscriptable {
            path: path.to_path_buf(),
        };
        if !path.is_absolute() {
            return Err(bad());
        }
        let p = quote(path.as_os_str().as_bytes()).ok_or_else(bad)?;
        let mut lines: Vec<Vec<Vec<u8>>> = Vec::new();
        let owner_lines = |lines: &mut Vec<Vec<Vec<u8>>>, (uid, gid): (u32, u32)| {
            lines.push(vec![
                b"sif".to_vec(),
                p.clone(),
                b"uid".to_vec(),
                uid.to_string().into_bytes(),
            ]);
            lines.push(vec![
                b"sif".to_vec(),
                p.clone(),
                b"gid".to_vec(),
                gid.to_string().into_bytes(),
            ]);
        };
        let mode_line = |mode: u32| {
            vec![
                b"sif".to_vec(),
                p.clone(),
                b"mode".to_vec(),
                format!("0{mode:o}").into_bytes(),
            ]
        };
        match edit {
            Edit::Mkdir { mode, owner, .. } => {
                lines.push(vec![b"mkdir".to_vec(), p.clone()]);
                lines.push(mode_line(0o040000 | (mode & 0o7777)));
                owner_lines(&mut lines, *owner);
            }
            Edit::Write { mode, owner, .. } | Edit::WriteFrom { mode, owner, .. } => {
                let parent = path.parent().ok_or_else(bad)?;
                let name = path.file_name().ok_or_else(bad)?;
                let dir = quote(parent.as_os_str().as_bytes()).ok_or_else(bad)?;
                let name = quote(name.as_bytes()).ok_or_else(bad)?;
                let vp = match edit {
                    Edit::WriteFrom { source, .. } => {
                        quote(source.as_os_str().as_bytes()).ok_or_else(bad)?
                    }
                    Edit::Write { contents, .. } => {
                        let file = format!("v{}", script.values.len());
                        let value_path = value_dir.join(&file);
                        script.values.push((file, contents.clone()));
                        quote(value_path.as_os_str().as_bytes()).ok_or_else(bad)?
                    }
                    _ => unreachable!("matched above"),
                };
                lines.push(vec![b"cd".to_vec(), dir]);
                lines.push(vec![b"write".to_vec(), vp, name]);
                lines.push(vec![b"cd".to_vec(), b"/".to_vec()]);
                lines.push(mode_line(0o100000 | (mode & 0o7777)));
                owner_lines(&mut lines, *owner);
            }
            Edit::Symlink { target, owner, .. } => {
                let t = quote(target.as_os_str().as_bytes()).ok_or_else(bad)?;
                lines.push(vec![b"symlink".to_vec(), p.clone(), t]);
                owner_lines(&mut lines, *owner);
            }
            Edit::Remove { .. } => lines.push(vec![b"rm".to_vec(), p.clone()]),
            Edit::SetMode { mode, .. } => lines.push(mode_line(*mode)),
            Edit::SetOwner { owner, .. } => owner_lines(&mut lines, *owner),
        }
        for parts in lines {
            let line = parts.join(&b' ');
            if line.len() > MAX_LINE {
                return Err(bad());
            }
            script.text.extend_from_slice(&line);
            script.text.push(b'\n');
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::unpack::DeviceNode;

    fn fixup(path: &str) -> Fixup {
        Fixup {
            path: PathBuf::from(path),
            node: None,
            mode: None,
            owner: None,
            mtime: None,
            xattrs: Vec::new(),
        }
    }

    #[test]
    fn quoting_doubles_quotes_and_refuses_line_breaks() {
        assert_eq!(quote(b"/a b").as_deref(), Some(&b"\"/a b\""[..]));
        assert_eq!(quote(b"/x\"y").as_deref(), Some(&b"\"/x\"\"y\""[..]));
        assert_eq!(quote(b"/x\ndump / /etc"), None);
        assert_eq!(quote(b"/x\rrm /"), None);
    }

    #[test]
    fn node_mode_owner_and_xattr_lines() {
        let mut f = fixup("/dev/my null");
        f.node = Some(DeviceNode {
            kind: NodeKind::Char,
            major: 1,
            minor: 3,
        });
        f.mode = Some(0o020666);
        f.owner = Some((0, 5));
        f.mtime = Some(1_700_000_000);
        f.xattrs = vec![("user.k".to_owned(), b"v".to_vec())];
        let s = render(&[f], Path::new("/tmp/vals")).expect("renders");
        let text = String::from_utf8(s.text).expect("utf8");
        assert_eq!(
            text,
            "rm \"/dev/my null\"\n\
             cd \"/dev\"\n\
             mknod \"my null\" c 1 3\n\
             cd /\n\
             sif \"/dev/my null\" mode 020666\n\
             sif \"/dev/my null\" uid 0\n\
             sif \"/dev/my null\" gid 5\n\
             sif \"/dev/my null\" mtime @1700000000\n\
             ea_set -f \"/tmp/vals/v0\" \"/dev/my null\" \"user.k\"\n"
        );
        assert_eq!(s.values, vec![("v0".to_owned(), b"v".to_vec())]);
    }

    #[test]
    fn fifo_and_setuid() {
        let mut fifo = fixup("/run/p");
        fifo.node = Some(DeviceNode {
            kind: NodeKind::Fifo,
            major: 0,
            minor: 0,
        });
        let mut su = fixup("/bin/su");
        su.mode = Some(0o104755);
        let s = render(&[fifo, su], Path::new("/v")).expect("renders");
        let text = String::from_utf8(s.text).expect("utf8");
        assert!(text.contains("mknod \"p\" p\n"), "{text}");
        assert!(text.contains("sif \"/bin/su\" mode 0104755\n"), "{text}");
    }

    #[test]
    fn hostile_names_are_refused_not_injected() {
        let mut f = fixup("/etc/x\ndump /etc/shadow /tmp/loot");
        f.mode = Some(0o100644);
        assert!(render(&[f], Path::new("/v")).is_err());
        let mut long = fixup(&format!("/{}", "\"".repeat(4500)));
        long.mode = Some(0o100644);
        assert!(render(&[long], Path::new("/v")).is_err());
    }

    #[test]
    fn edits_are_scripted_with_contents_in_value_files() {
        let edits = vec![
            Edit::Remove {
                path: PathBuf::from("/etc/hostname"),
            },
            Edit::Write {
                path: PathBuf::from("/etc/hostname"),
                contents: b"img\n".to_vec(),
                mode: 0o644,
                owner: (0, 0),
            },
            Edit::Mkdir {
                path: PathBuf::from("/root/.ssh"),
                mode: 0o700,
                owner: (0, 0),
            },
            Edit::Symlink {
                path: PathBuf::from("/etc/x.wants/a b"),
                target: PathBuf::from("../a b"),
                owner: (0, 0),
            },
            Edit::SetMode {
                path: PathBuf::from("/tmp"),
                mode: 0o041777,
            },
        ];
        let mut s = Script::default();
        render_edits(&mut s, &edits, Path::new("/w")).expect("renders");
        let text = String::from_utf8(s.text).expect("utf8");
        assert_eq!(
            text,
            "rm \"/etc/hostname\"\n\
             cd \"/etc\"\n\
             write \"/w/v0\" \"hostname\"\n\
             cd /\n\
             sif \"/etc/hostname\" mode 0100644\n\
             sif \"/etc/hostname\" uid 0\n\
             sif \"/etc/hostname\" gid 0\n\
             mkdir \"/root/.ssh\"\n\
             sif \"/root/.ssh\" mode 040700\n\
             sif \"/root/.ssh\" uid 0\n\
             sif \"/root/.ssh\" gid 0\n\
             symlink \"/etc/x.wants/a b\" \"../a b\"\n\
             sif \"/etc/x.wants/a b\" uid 0\n\
             sif \"/etc/x.wants/a b\" gid 0\n\
             sif \"/tmp\" mode 041777\n"
        );
        assert_eq!(s.values, vec![("v0".to_owned(), b"img\n".to_vec())]);
        // A file debugfs reads itself: no value file.
        let copy = [Edit::WriteFrom {
            path: PathBuf::from("/usr/local/bin/agent"),
            source: PathBuf::from("/opt/banger/agent"),
            mode: 0o755,
            owner: (0, 0),
        }];
        let mut s = Script::default();
        render_edits(&mut s, &copy, Path::new("/w")).expect("renders");
        let text = String::from_utf8(s.text).expect("utf8");
        assert!(
            text.starts_with(
                "cd \"/usr/local/bin\"\nwrite \"/opt/banger/agent\" \"agent\"\ncd /\n\
                 sif \"/usr/local/bin/agent\" mode 0100755\n"
            ),
            "{text}"
        );
        assert!(s.values.is_empty());
        let relative = [Edit::Remove {
            path: PathBuf::from("etc/x"),
        }];
        assert!(render_edits(&mut Script::default(), &relative, Path::new("/w")).is_err());
        let hostile = [Edit::Remove {
            path: PathBuf::from("/etc/x\ndump / /loot"),
        }];
        assert!(render_edits(&mut Script::default(), &hostile, Path::new("/w")).is_err());
    }
}

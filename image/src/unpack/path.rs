//! Member-name normalisation: the only place that interprets the bytes of a
//! tar member name or hardlink target. Pure functions, no filesystem access.

/// Why a member name was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NameViolation {
    /// The name is empty.
    Empty,
    /// The name starts with `/`.
    Absolute,
    /// The name has a `..` component.
    DotDot,
}

/// Splits a member name into its components relative to the staging root.
///
/// `.` components, empty components (`a//b`) and a trailing `/` are dropped;
/// an absolute name or any `..` component is refused rather than rewritten,
/// so the error can name what the layer actually said. An empty result
/// means the root directory itself (`./`).
pub(crate) fn components(raw: &[u8]) -> Result<Vec<&[u8]>, NameViolation> {
    if raw.is_empty() {
        return Err(NameViolation::Empty);
    }
    if raw[0] == b'/' {
        return Err(NameViolation::Absolute);
    }
    let mut out = Vec::new();
    for comp in raw.split(|b| *b == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => return Err(NameViolation::DotDot),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Lossy text of a raw name, for error messages.
pub(crate) fn display(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_dotted_names() {
        assert_eq!(
            components(b"usr/bin/env"),
            Ok(vec![&b"usr"[..], b"bin", b"env"])
        );
        assert_eq!(
            components(b"./etc//passwd/"),
            Ok(vec![&b"etc"[..], b"passwd"])
        );
        assert_eq!(components(b"./"), Ok(vec![]));
        assert_eq!(components(b"."), Ok(vec![]));
    }

    #[test]
    fn refused_names() {
        assert_eq!(components(b""), Err(NameViolation::Empty));
        assert_eq!(components(b"/etc/passwd"), Err(NameViolation::Absolute));
        assert_eq!(components(b"/"), Err(NameViolation::Absolute));
        assert_eq!(components(b"../x"), Err(NameViolation::DotDot));
        assert_eq!(components(b"a/../../x"), Err(NameViolation::DotDot));
        assert_eq!(components(b"a/.."), Err(NameViolation::DotDot));
    }

    #[test]
    fn dots_inside_names_are_ordinary() {
        assert_eq!(
            components(b"a/..b/c.."),
            Ok(vec![&b"a"[..], b"..b", b"c.."])
        );
        assert_eq!(components(b".wh..wh..opq"), Ok(vec![&b".wh..wh..opq"[..]]));
    }
}

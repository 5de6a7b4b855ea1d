//! What a tar entry name means inside a layer: a cleaned path relative to the layer root,
//! and whether it is a whiteout. Purely lexical; never looks at the filesystem.
//!
//! Cleaning follows Go's `filepath.Clean` as moby applies it: empty and `.` components
//! go, `..` removes the previous component, and a leading `/` means the layer root (so
//! `/etc/x` and `etc/x` are the same entry). A `..` that would climb above the root is
//! refused rather than clamped.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// Prefix of a whiteout: `.wh.NAME` deletes `NAME` from the lower layers.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// Prefix of whiteout metadata entries (AUFS), skipped except for the opaque marker.
pub const WHITEOUT_META_PREFIX: &str = ".wh..wh.";
/// The opaque marker: `D/.wh..wh..opq` hides everything the lower layers have under `D`.
pub const WHITEOUT_OPAQUE: &str = ".wh..wh..opq";

/// A cleaned entry path relative to the layer root: normal components only. Empty means
/// the root itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RelPath(PathBuf);

/// The name climbs above the layer root.
#[derive(Debug)]
pub struct Breakout;

impl RelPath {
    /// The layer root.
    pub fn root() -> Self {
        Self(PathBuf::new())
    }

    /// Cleans a raw tar name (or hard link target).
    pub fn clean(raw: &[u8]) -> Result<Self, Breakout> {
        let mut parts: Vec<&[u8]> = Vec::new();
        for part in raw.split(|&b| b == b'/') {
            match part {
                b"" | b"." => {}
                b".." => {
                    if parts.pop().is_none() {
                        return Err(Breakout);
                    }
                }
                _ => parts.push(part),
            }
        }
        Ok(Self(OsString::from_vec(parts.join(&b'/')).into()))
    }

    /// Whether this is the layer root.
    pub fn is_root(&self) -> bool {
        self.0.as_os_str().is_empty()
    }

    /// The path relative to the root; empty for the root.
    pub fn as_path(&self) -> &Path {
        &self.0
    }

    /// The path relative to the root as a `path::Arg` for `*at` calls: `.` for the root.
    pub fn as_at_arg(&self) -> &Path {
        if self.is_root() {
            Path::new(".")
        } else {
            &self.0
        }
    }

    /// The parent directory and the last component; `None` for the root.
    pub fn split(&self) -> Option<(RelPath, &OsStr)> {
        let name = self.0.file_name()?;
        let parent = self.0.parent().unwrap_or(Path::new(""));
        Some((RelPath(parent.to_path_buf()), name))
    }

    /// `self/name`.
    pub fn join(&self, name: &OsStr) -> RelPath {
        RelPath(self.0.join(name))
    }

    /// Every proper ancestor, the root excluded.
    pub fn ancestors(&self) -> impl Iterator<Item = RelPath> + '_ {
        self.0
            .ancestors()
            .skip(1)
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| RelPath(p.to_path_buf()))
    }

    /// For messages.
    pub fn display(&self) -> String {
        if self.is_root() {
            "/".to_string()
        } else {
            self.0.display().to_string()
        }
    }
}

/// What an entry's last component says it is.
#[derive(Debug, PartialEq, Eq)]
pub enum Whiteout<'a> {
    /// A plain entry.
    None,
    /// `.wh.NAME`: delete `NAME` in the same directory.
    Delete(&'a OsStr),
    /// `.wh..wh..opq`: the directory is opaque.
    Opaque,
    /// Another `.wh..wh.*` metadata entry: skipped.
    Meta,
}

/// Classifies a last component. `None` means a malformed whiteout (of `.`, `..` or of
/// nothing), which the layer must be refused for.
pub fn classify(name: &OsStr) -> Option<Whiteout<'_>> {
    let bytes = name.as_bytes();
    if bytes == WHITEOUT_OPAQUE.as_bytes() {
        return Some(Whiteout::Opaque);
    }
    if bytes.starts_with(WHITEOUT_META_PREFIX.as_bytes()) {
        return Some(Whiteout::Meta);
    }
    match bytes.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
        None => Some(Whiteout::None),
        Some(b"" | b"." | b"..") => None,
        Some(target) => Some(Whiteout::Delete(OsStr::from_bytes(target))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clean(s: &str) -> Option<String> {
        RelPath::clean(s.as_bytes())
            .ok()
            .map(|p| p.as_path().display().to_string())
    }

    #[test]
    fn cleaning_matches_go_clean_under_the_root() {
        assert_eq!(clean("a/b").as_deref(), Some("a/b"));
        assert_eq!(clean("./a//b/").as_deref(), Some("a/b"));
        assert_eq!(clean("/etc/x").as_deref(), Some("etc/x"));
        assert_eq!(clean("a/../b").as_deref(), Some("b"));
        assert_eq!(clean("./").as_deref(), Some(""));
        assert_eq!(clean("/").as_deref(), Some(""));
        assert_eq!(clean("a/..").as_deref(), Some(""));
        assert_eq!(clean("../x"), None);
        assert_eq!(clean("a/../../x"), None);
        assert_eq!(clean("/../x"), None);
        assert_eq!(clean(".."), None);
    }

    #[test]
    fn split_and_ancestors() {
        let p = RelPath::clean(b"a/b/c").unwrap();
        let (parent, name) = p.split().unwrap();
        assert_eq!(parent.as_path(), Path::new("a/b"));
        assert_eq!(name, "c");
        let top = RelPath::clean(b"x").unwrap();
        let (parent, _) = top.split().unwrap();
        assert!(parent.is_root());
        assert_eq!(parent.as_at_arg(), Path::new("."));
        assert!(RelPath::root().split().is_none());
        let anc: Vec<_> = p.ancestors().map(|a| a.display()).collect();
        assert_eq!(anc, ["a/b", "a"]);
    }

    #[test]
    fn whiteout_names() {
        let c = |s: &'static str| classify(OsStr::new(s));
        assert_eq!(c("file"), Some(Whiteout::None));
        assert_eq!(c(".wh.file"), Some(Whiteout::Delete(OsStr::new("file"))));
        assert_eq!(c(".wh..wh..opq"), Some(Whiteout::Opaque));
        assert_eq!(c(".wh..wh.plnk"), Some(Whiteout::Meta));
        assert_eq!(c(".wh..wh.aufs"), Some(Whiteout::Meta));
        assert_eq!(c(".wh."), None);
        assert_eq!(c(".wh.."), None);
        assert_eq!(c(".wh..."), None);
        assert_eq!(c(".whx"), Some(Whiteout::None));
    }
}

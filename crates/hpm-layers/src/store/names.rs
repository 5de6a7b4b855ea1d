//! Layer ids and the pool device names they map to.
//!
//! Owns the naming scheme that lets the store rebuild everything from the pool after a
//! restart: layer `ID` is device `<namespace>ID`, the base volume of size `S` is
//! `<namespace>.base-S` (`.base-S.partial` while it is being made), and a layer's parent is
//! the origin of its device. Layer ids never start with `.`, so no id can name a base
//! volume, and an id is one path component, so `home/mnt/<id>` stays inside `home/mnt`.
//! Must never look at the pool or the filesystem.

use crate::error::{Error, ErrorKind, Result};

/// What the base volumes' names start with, after the namespace.
pub(super) const BASE_PREFIX: &str = ".base-";
/// What a base volume's name ends with until it is complete.
pub(super) const PARTIAL_SUFFIX: &str = ".partial";
/// The longest layer id: a file name (`NAME_MAX`), since it names the mountpoint.
const MAX_ID: usize = 255;

/// Checks a layer id: 1 to 255 bytes, not starting with `.`, without `/` or NUL.
pub(super) fn check_id(id: &str) -> Result<()> {
    let why = if id.is_empty() {
        "is empty"
    } else if id.len() > MAX_ID {
        "is longer than 255 bytes"
    } else if id.starts_with('.') {
        "starts with '.'"
    } else if id.contains('/') || id.contains('\0') {
        "contains '/' or NUL"
    } else {
        return Ok(());
    };
    Err(Error::new(
        ErrorKind::Invalid,
        format!("layer id {id:?} {why}; ids are 1 to 255 bytes without '/' or NUL, not starting with '.'"),
    ))
}

/// Pool device names of one namespace.
#[derive(Debug, Clone)]
pub(super) struct Names {
    namespace: String,
}

impl Names {
    pub(super) fn new(namespace: &str) -> Self {
        Self {
            namespace: namespace.to_string(),
        }
    }

    /// The prefix of every device name.
    pub(super) fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The device of layer `id` (checked with [`check_id`] by the caller).
    pub(super) fn device(&self, id: &str) -> String {
        format!("{}{id}", self.namespace)
    }

    /// The finished base volume of `size` bytes.
    pub(super) fn base(&self, size: u64) -> String {
        format!("{}{BASE_PREFIX}{size}", self.namespace)
    }

    /// The base volume of `size` bytes while it is being made.
    pub(super) fn partial_base(&self, size: u64) -> String {
        format!("{}{BASE_PREFIX}{size}{PARTIAL_SUFFIX}", self.namespace)
    }

    /// The layer id of device `name`, if it is a layer of this namespace.
    pub(super) fn layer_of(&self, name: &str) -> Option<String> {
        let id = name.strip_prefix(&self.namespace)?;
        check_id(id).ok()?;
        Some(id.to_string())
    }

    /// Whether device `name` is a base volume of this namespace, finished or not.
    pub(super) fn is_base(&self, name: &str) -> bool {
        name.strip_prefix(&self.namespace)
            .is_some_and(|rest| rest.starts_with(BASE_PREFIX))
    }

    /// Whether device `name` is an unfinished base volume of this namespace (left by a
    /// crash while it was being made).
    pub(super) fn is_partial_base(&self, name: &str) -> bool {
        self.is_base(name) && name.ends_with(PARTIAL_SUFFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_single_components_that_cannot_name_a_base() {
        let hex = "a".repeat(64);
        for ok in [hex.as_str(), "abc-init", "x y", "sha256:ab"] {
            check_id(ok).unwrap();
        }
        for bad in ["", ".", "..", ".base-10", "a/b", "a\0b", &"x".repeat(256)] {
            let e = check_id(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::Invalid, "{bad:?}");
        }
    }

    #[test]
    fn devices_map_back_to_layers_and_bases_are_told_apart() {
        let n = Names::new("docker/");
        assert_eq!(n.device("abc"), "docker/abc");
        assert_eq!(n.layer_of("docker/abc").as_deref(), Some("abc"));
        assert_eq!(n.layer_of("other/abc"), None);
        assert_eq!(n.layer_of(&n.base(4096)), None);
        assert!(n.is_base(&n.base(4096)) && !n.is_partial_base(&n.base(4096)));
        assert!(n.is_partial_base(&n.partial_base(4096)));
        assert!(!n.is_base("docker/abc") && !n.is_base("other/.base-4096"));
        let root = Names::new("");
        assert_eq!(root.layer_of("abc").as_deref(), Some("abc"));
        assert_eq!(root.layer_of(".base-4096"), None);
    }
}

//! Which extended attributes a layer carries, and reading them from a tree.
//!
//! Layers carry the `user.`, `trusted.` and `security.` namespaces (PAX records
//! `SCHILY.xattr.NAME`), `security.capability` being the one that matters most. `system.*`
//! (POSIX ACLs) is not carried, like moby; `security.selinux` is applied when a layer has it
//! but never exported or compared, because labels belong to the host that mounts the layer.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::Path;

use rustix::io::Errno;

/// PAX record prefix of an extended attribute.
pub const PAX_PREFIX: &str = "SCHILY.xattr.";

/// Namespaces a layer may set.
const APPLIED: [&[u8]; 3] = [b"user.", b"trusted.", b"security."];

/// Whether applying a layer sets attribute `name`.
pub fn applied(name: &[u8]) -> bool {
    APPLIED.iter().any(|ns| name.starts_with(ns))
}

/// Whether diffs compare and export attribute `name`.
pub fn carried(name: &[u8]) -> bool {
    applied(name) && name != b"security.selinux"
}

/// The carried attributes of `path` (not following a symlink), sorted by name. A
/// filesystem without extended attributes has none.
pub fn read_carried(path: &Path) -> rustix::io::Result<Vec<(OsString, Vec<u8>)>> {
    let names = loop {
        let len = match rustix::fs::llistxattr_query(path) {
            Ok(len) => len,
            Err(Errno::OPNOTSUPP) => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; len];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                break buf;
            }
            // Grew between the two calls.
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    };
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if !carried(name) {
            continue;
        }
        let value = loop {
            let len = match rustix::fs::lgetxattr_query(path, name) {
                Ok(len) => len,
                // Removed between the list and the get.
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e),
            };
            let mut buf = vec![0u8; len];
            match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
                Ok(n) => {
                    buf.truncate(n);
                    break Some(buf);
                }
                Err(Errno::RANGE) => continue,
                Err(Errno::NODATA) => break None,
                Err(e) => return Err(e),
            }
        };
        if let Some(value) = value {
            out.push((OsString::from_vec(name.to_vec()), value));
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces() {
        assert!(applied(b"user.x") && carried(b"user.x"));
        assert!(applied(b"trusted.overlay.opaque") && carried(b"trusted.overlay.opaque"));
        assert!(applied(b"security.capability") && carried(b"security.capability"));
        assert!(applied(b"security.selinux") && !carried(b"security.selinux"));
        assert!(!applied(b"system.posix_acl_access") && !carried(b"system.posix_acl_access"));
        assert!(!applied(b"usr.x"));
    }
}

//! Root-only unix sockets for the daemon's servers (NBD, the Docker plugin, the containerd
//! snapshotter): bound so that they are never reachable with looser permissions and never
//! visible before they listen.

use std::io;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;

/// Binds a unix socket at `path`, mode 0600 (owner only). Creates the parent directory (0755)
/// if missing. A stale socket (nothing accepting on it) is replaced; a live one is refused
/// with `AddrInUse`, and a file that is not a socket with `AlreadyExists`.
///
/// The socket is bound inside a fresh private (0700) directory next to `path`, restricted,
/// then renamed into place, so it is never reachable with looser permissions, and a client
/// never finds a socket that is not yet listening. The listener is non-blocking, ready for
/// an async runtime's `from_std`.
pub fn bind_private(path: &Path) -> io::Result<UnixListener> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let file_name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} has no file name", path.display()),
        )
    })?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(parent)?;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!(
                        "{} is in use by a running server; stop it first",
                        path.display()
                    ),
                ));
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; refusing to replace it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut private_name = std::ffi::OsString::from(".");
    private_name.push(file_name);
    private_name.push(format!(".{}.bind", std::process::id()));
    let private = parent.join(private_name);
    if private.exists() {
        std::fs::remove_dir_all(&private)?;
    }
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join(file_name);
    let placed = UnixListener::bind(&tmp).and_then(|listener| {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    });
    let _ = std::fs::remove_dir_all(&private);
    placed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn binds_owner_only_replaces_stale_refuses_live_and_non_sockets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/s.sock");
        let l = bind_private(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(
            bind_private(&path).unwrap_err().kind(),
            io::ErrorKind::AddrInUse
        );
        drop(l);
        bind_private(&path).expect("a stale socket is replaced");
        let file = dir.path().join("plain");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            bind_private(&file).unwrap_err().kind(),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(std::fs::read(&file).unwrap(), b"x");
    }
}

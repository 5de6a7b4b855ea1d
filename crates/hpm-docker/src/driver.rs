//! The [`GraphDriver`] trait: what a layer store must do for dockerd, independent of the
//! wire. The server calls every method on tokio's blocking pool, never on an async thread,
//! so implementations may mount, untar and fsync freely; they must be safe to call
//! concurrently for different ids (dockerd keeps several connections busy at once).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use crate::DriverError;

/// [`GraphDriver::changes`] kind: the path exists in both and differs.
pub const CHANGE_MODIFY: u8 = 0;
/// [`GraphDriver::changes`] kind: the path exists only in the layer.
pub const CHANGE_ADD: u8 = 1;
/// [`GraphDriver::changes`] kind: the path exists only in the parent.
pub const CHANGE_DELETE: u8 = 2;

/// A layer store as dockerd drives it through the graphdriver plugin protocol.
///
/// Ids are dockerd's cache ids (64 hex digits, or a container id with `-init`); a parent of
/// `None` means "no parent" (an empty filesystem). Image layers are created read-only and
/// filled by one [`apply_diff`](Self::apply_diff); container layers (`rw`) and their
/// `-init` layers are read-write, and an `-init` layer is the parent of its container's
/// layer, so parents can be read-write layers too.
pub trait GraphDriver: Send + Sync + 'static {
    /// Called once when dockerd starts, before anything else. `home` is
    /// `<daemon root>/<plugin name>` (e.g. `/var/lib/docker/hpmapper`); `opts` are the
    /// daemon's `--storage-opt` strings (`"hpmapper.basesize=10G"`), which the
    /// implementation validates: unknown `hpmapper.*` keys are an error
    /// ([`parse_key_values`] splits them). User namespace remapping is refused by the
    /// server before this is called.
    fn init(&self, home: &Path, opts: &[String]) -> Result<(), DriverError>;

    /// Creates layer `id` on top of `parent`. `rw` is false for image layers
    /// (`GraphDriver.Create`) and true for container and `-init` layers
    /// (`GraphDriver.CreateReadWrite`). `storage_opt` is `docker run --storage-opt`
    /// (`size` = a byte size like `20G`); unknown keys are an error.
    fn create(
        &self,
        id: &str,
        parent: Option<&str>,
        rw: bool,
        storage_opt: &BTreeMap<String, String>,
    ) -> Result<(), DriverError>;

    /// Removes layer `id`. An unknown id is not an error (dockerd retries removals).
    fn remove(&self, id: &str) -> Result<(), DriverError>;

    /// Mounts layer `id` (if this is the first `get` without a matching `put`) and returns the
    /// absolute path of its complete root filesystem. Reference counted: dockerd calls
    /// `get`/`put` several times for one id. Must work for read-only image layers too:
    /// dockerd reads their files to rebuild layer tars on push and save. `mount_label` is the
    /// SELinux context (empty without SELinux).
    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, DriverError>;

    /// Releases one [`get`](Self::get); unmounts on the last one.
    fn put(&self, id: &str) -> Result<(), DriverError>;

    /// Whether layer `id` exists.
    fn exists(&self, id: &str) -> bool;

    /// Key/value pairs shown by `docker info` (pool size, free space, layer count, ...).
    fn status(&self) -> Vec<(String, String)>;

    /// Key/value pairs about layer `id` shown by `docker inspect` under `GraphDriver.Data`.
    fn metadata(&self, id: &str) -> Result<BTreeMap<String, String>, DriverError>;

    /// dockerd is shutting down: unmount everything, keep all data.
    fn cleanup(&self) -> Result<(), DriverError>;

    /// Writes an uncompressed tar of the changes of `id` against `parent` (the whole tree
    /// when `None`) to `out`, with whiteouts for deletions. `out` is the HTTP response: a
    /// write error means the client went away, and the diff should stop. Returning an error
    /// before the first byte reaches dockerd as an error; after it, the stream is cut short
    /// so dockerd sees a broken tar rather than a truncated-but-valid one.
    fn diff(&self, id: &str, parent: Option<&str>, out: &mut dyn Write) -> Result<(), DriverError>;

    /// The paths that differ between `id` and `parent`, each with a kind:
    /// [`CHANGE_MODIFY`], [`CHANGE_ADD`] or [`CHANGE_DELETE`] (`docker diff`).
    fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<(String, u8)>, DriverError>;

    /// Applies the uncompressed layer tar read from `tar` to layer `id` (created just before
    /// with `parent`), with OCI whiteout semantics, and returns the sum of the entries' sizes.
    /// `tar` is the HTTP request body: a read error means the client went away or the stream
    /// broke, and the layer must then not be left looking complete. `tar` returns end of
    /// file only after the whole body arrived.
    fn apply_diff(
        &self,
        id: &str,
        parent: Option<&str>,
        tar: &mut dyn Read,
    ) -> Result<u64, DriverError>;

    /// The size in bytes of the changes of `id` against `parent`.
    fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64, DriverError>;
}

/// Splits `key=value` option strings the way dockerd's drivers do (moby
/// `parsers.ParseKeyValueOpt`): at the first `=`, both sides trimmed, keys lowercased.
/// A string without `=` or with an empty key is an error naming it.
pub fn parse_key_values(opts: &[String]) -> Result<Vec<(String, String)>, DriverError> {
    opts.iter()
        .map(|opt| match opt.split_once('=') {
            Some((key, value)) if !key.trim().is_empty() => {
                Ok((key.trim().to_ascii_lowercase(), value.trim().to_owned()))
            }
            _ => Err(DriverError::invalid(format!(
                "storage option {opt:?} is not of the form key=value"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_split_at_the_first_equals_sign() {
        let opts = vec![
            "hpmapper.basesize=10G".to_owned(),
            " HPMapper.Pool = /dev/sdb=1 ".to_owned(),
            "empty=".to_owned(),
        ];
        assert_eq!(
            parse_key_values(&opts).unwrap(),
            vec![
                ("hpmapper.basesize".to_owned(), "10G".to_owned()),
                ("hpmapper.pool".to_owned(), "/dev/sdb=1".to_owned()),
                ("empty".to_owned(), String::new()),
            ]
        );
        for bad in ["novalue", "=x", " =x"] {
            let e = parse_key_values(&[bad.to_owned()]).unwrap_err();
            assert_eq!(e.kind, crate::DriverErrorKind::Invalid);
            assert!(e.message.contains(bad), "{e}");
        }
    }
}

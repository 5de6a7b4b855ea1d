//! `hpmapper daemon --docker`: the Docker graphdriver plugin (`hpm-docker` speaks the wire)
//! on the layer store (`hpm-layers`) over this daemon's pool and attachments.
//!
//! Docker's layers live as pool devices named `docker/<id>`, a namespace the containerd
//! snapshotter will never share. dockerd's Init creates the store once; a later Init (dockerd
//! restarted while this daemon kept running) reuses it, as the store requires.

use super::devices::DaemonDevices;
use super::Daemon;
use hpm_docker::{DriverError, DriverErrorKind, GraphDriver};
use hpm_layers::{BlockDevices, LayerStore, StoreOptions};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};

/// The device-name prefix of Docker's layers in the pool.
pub const NAMESPACE: &str = "docker/";
/// Base filesystem size when dockerd passes no `hpmapper.basesize`.
pub const DEFAULT_BASE_SIZE: u64 = 10 << 30;

/// The graphdriver over the layer store.
pub struct DockerDriver {
    daemon: Weak<Daemon>,
    /// After Init: dockerd's home, the storage options it gave and the store.
    store: Mutex<Option<(PathBuf, InitOptions, Arc<LayerStore>)>>,
}

/// The storage options of Init: base size, minimum free space (percent).
type InitOptions = (u64, u8);

impl DockerDriver {
    /// A driver for the daemon; the store is made at dockerd's Init.
    pub fn new(daemon: &Arc<Daemon>) -> Self {
        Self {
            daemon: Arc::downgrade(daemon),
            store: Mutex::new(None),
        }
    }

    fn store(&self) -> Result<Arc<LayerStore>, DriverError> {
        self.store
            .lock()
            .as_ref()
            .map(|(_, _, s)| s.clone())
            .ok_or_else(|| DriverError {
                kind: DriverErrorKind::Invalid,
                message:
                    "the hpmapper graphdriver was not initialized (GraphDriver.Init not called)"
                        .into(),
            })
    }

    /// Unmounts everything (daemon shutdown), keeping data.
    pub fn shutdown(&self) {
        if let Some((_, _, s)) = self.store.lock().take() {
            if let Err(e) = s.cleanup() {
                tracing::warn!("unmounting Docker layers at shutdown: {e}");
            }
        }
    }
}

fn err(e: hpm_layers::Error) -> DriverError {
    use hpm_layers::ErrorKind as K;
    let kind = match e.kind() {
        K::Io => DriverErrorKind::Io,
        K::NotFound => DriverErrorKind::NotFound,
        K::NoSpace => DriverErrorKind::NoSpace,
        K::ReadOnly => DriverErrorKind::ReadOnly,
        K::Invalid | K::Escape => DriverErrorKind::Invalid,
        K::Unsupported => DriverErrorKind::Unsupported,
        K::Busy => DriverErrorKind::Busy,
        K::Exists => DriverErrorKind::Exists,
        _ => DriverErrorKind::Io,
    };
    DriverError {
        kind,
        message: e.to_string(),
    }
}

fn invalid(message: String) -> DriverError {
    DriverError {
        kind: DriverErrorKind::Invalid,
        message,
    }
}

impl GraphDriver for DockerDriver {
    fn init(&self, home: &Path, opts: &[String]) -> Result<(), DriverError> {
        let mut base = DEFAULT_BASE_SIZE;
        let mut min_free = hpm_layers::store::DEFAULT_MIN_FREE_SPACE;
        for (k, v) in hpm_docker::parse_key_values(opts)? {
            match k.as_str() {
                "hpmapper.basesize" => {
                    base = crate::size::parse_docker(&v)
                        .map_err(|e| invalid(format!("hpmapper.basesize: {e}")))?;
                }
                "hpmapper.min_free_space" => {
                    min_free = crate::size::parse_percent(&v)
                        .map_err(|e| invalid(format!("hpmapper.min_free_space: {e}")))?;
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown storage option {k:?}; hpmapper knows hpmapper.basesize and hpmapper.min_free_space"
                    )))
                }
            }
        }
        let mut slot = self.store.lock();
        if let Some((h, (old_base, old_min_free), _)) = slot.as_ref() {
            if h == home && (*old_base, *old_min_free) == (base, min_free) {
                return Ok(()); // dockerd restarted: keep the store and its mount counts
            }
            if h == home {
                // Taken silently, they would not hold: the store keeps the first ones.
                return Err(invalid(format!(
                    "the store was initialized by an earlier dockerd with hpmapper.basesize={old_base} and hpmapper.min_free_space={old_min_free}%, not {base} and {min_free}%; restart the hpmapper daemon to change them"
                )));
            }
            return Err(invalid(format!(
                "already initialized with home {}, not {}",
                h.display(),
                home.display()
            )));
        }
        let d = self
            .daemon
            .upgrade()
            .ok_or_else(|| invalid("the hpmapper daemon is shutting down".into()))?;
        let devices: Arc<dyn BlockDevices> = Arc::new(DaemonDevices::new(&d));
        let mut o = StoreOptions::new(NAMESPACE, home);
        o.base_size = base;
        o.min_free_space = min_free;
        let store = LayerStore::open(d.pool().clone(), devices, o).map_err(err)?;
        *slot = Some((home.to_path_buf(), (base, min_free), Arc::new(store)));
        tracing::info!(
            home = %home.display(),
            base_size = base,
            min_free_space = min_free,
            "Docker graphdriver initialized"
        );
        Ok(())
    }

    fn create(
        &self,
        id: &str,
        parent: Option<&str>,
        _rw: bool,
        storage_opt: &BTreeMap<String, String>,
    ) -> Result<(), DriverError> {
        let mut size = None;
        for (k, v) in storage_opt {
            match k.to_ascii_lowercase().as_str() {
                "size" => {
                    size = Some(
                        crate::size::parse_docker(v)
                            .map_err(|e| invalid(format!("storage option size: {e}")))?,
                    )
                }
                _ => {
                    return Err(invalid(format!(
                        "unknown storage option {k:?}; hpmapper supports size"
                    )))
                }
            }
        }
        self.store()?.create(id, parent, size).map_err(err)
    }

    fn remove(&self, id: &str) -> Result<(), DriverError> {
        self.store()?.remove(id).map_err(err)
    }

    fn get(&self, id: &str, mount_label: &str) -> Result<PathBuf, DriverError> {
        self.store()?.get(id, mount_label).map_err(err)
    }

    fn put(&self, id: &str) -> Result<(), DriverError> {
        self.store()?.put(id).map_err(err)
    }

    fn exists(&self, id: &str) -> bool {
        self.store().map(|s| s.exists(id)).unwrap_or(false)
    }

    fn status(&self) -> Vec<(String, String)> {
        self.store().map(|s| s.status()).unwrap_or_default()
    }

    fn metadata(&self, id: &str) -> Result<BTreeMap<String, String>, DriverError> {
        self.store()?.metadata(id).map_err(err)
    }

    fn cleanup(&self) -> Result<(), DriverError> {
        self.store()?.cleanup().map_err(err)
    }

    fn diff(&self, id: &str, parent: Option<&str>, out: &mut dyn Write) -> Result<(), DriverError> {
        self.store()?.diff(id, parent, out).map_err(err)
    }

    fn changes(&self, id: &str, parent: Option<&str>) -> Result<Vec<(String, u8)>, DriverError> {
        Ok(self
            .store()?
            .changes(id, parent)
            .map_err(err)?
            .into_iter()
            .map(|c| (c.path.to_string_lossy().into_owned(), c.kind as u8))
            .collect())
    }

    fn apply_diff(
        &self,
        id: &str,
        parent: Option<&str>,
        tar: &mut dyn Read,
    ) -> Result<u64, DriverError> {
        self.store()?.apply_diff(id, parent, tar).map_err(err)
    }

    fn diff_size(&self, id: &str, parent: Option<&str>) -> Result<u64, DriverError> {
        self.store()?.diff_size(id, parent).map_err(err)
    }
}

//! What the store reports about itself and its layers: Docker's `Status` (shown by
//! `docker info`) and `GetMetadata` (shown by `docker inspect` as `GraphDriver.Data`).
//!
//! Owns the names and formats of those figures; reads the pool and the mount table, never
//! changes anything.

use std::collections::BTreeMap;

use super::names::check_id;
use super::{engine_error, LayerStore};
use crate::error::{Error, ErrorKind, Result};

impl LayerStore {
    /// Pool and store figures as (name, value) pairs, in the order `docker info` shows
    /// them. Sizes read like devicemapper's (`units.HumanSize`: decimal units, 4 digits).
    pub fn status(&self) -> Vec<(String, String)> {
        let mut out = vec![
            ("Backing Filesystem".to_string(), "ext4".to_string()),
            ("Namespace".to_string(), self.names.namespace().to_string()),
            ("Base Device Size".to_string(), human_size(self.base_size)),
            ("Chunk Size".to_string(), human_size(self.pool.chunk_size())),
            (
                "Minimum Free Space".to_string(),
                format!("{}%", self.min_free_space),
            ),
        ];
        if let Some(dir) = self.pool.dir() {
            out.insert(0, ("Pool".to_string(), dir.display().to_string()));
        }
        match self.pool.info() {
            Ok(info) => {
                let free = info.capacity_bytes.saturating_sub(info.used_bytes);
                out.extend([
                    ("Data Space Used".to_string(), human_size(info.used_bytes)),
                    (
                        "Data Space Total".to_string(),
                        human_size(info.capacity_bytes),
                    ),
                    ("Data Space Available".to_string(), human_size(free)),
                    (
                        "Metadata Space Used".to_string(),
                        human_size(info.metadata_bytes),
                    ),
                ]);
            }
            Err(e) => out.push(("Pool Error".to_string(), e.to_string())),
        }
        let mounted = self.table.lock().mounted.len();
        out.extend([
            ("Layers".to_string(), self.layers().len().to_string()),
            ("Mounted Layers".to_string(), mounted.to_string()),
        ]);
        out
    }

    /// Layer `id`'s device and usage: `DeviceName`, `DeviceId`, `DeviceSize`,
    /// `MappedBytes` (blocks it maps), `ExclusiveBytes` (blocks no other device shares),
    /// `Parent` (when its origin is a layer that still exists), and while mounted
    /// `BlockDevice`, `MountPoint` and `MountCount`.
    pub fn metadata(&self, id: &str) -> Result<BTreeMap<String, String>> {
        check_id(id)?;
        let device = self.names.device(id);
        let info = self.pool.device_info(&device).map_err(|e| {
            if e.kind() == hpm_engine::ErrorKind::NotFound {
                Error::new(ErrorKind::NotFound, format!("layer {id:?} does not exist"))
            } else {
                engine_error(format!("reading the device of layer {id:?}"), e)
            }
        })?;
        let mut out = BTreeMap::from([
            ("DeviceName".to_string(), info.name.clone()),
            ("DeviceId".to_string(), info.id.to_string()),
            ("DeviceSize".to_string(), info.size.to_string()),
            ("MappedBytes".to_string(), info.mapped_bytes.to_string()),
            (
                "ExclusiveBytes".to_string(),
                info.exclusive_bytes.to_string(),
            ),
        ]);
        if let Some(parent) = self.parent_of(&info) {
            out.insert("Parent".to_string(), parent);
        }
        if let Some(m) = self.table.lock().mounted.get(id) {
            out.insert("BlockDevice".to_string(), m.block.display().to_string());
            out.insert(
                "MountPoint".to_string(),
                self.mountpoint(id).display().to_string(),
            );
            out.insert("MountCount".to_string(), m.count.to_string());
        }
        Ok(out)
    }
}

/// Bytes in decimal units with 4 significant digits, like Go's `units.HumanSize`
/// (`10.74GB`, `268.4MB`, `512B`).
pub(super) fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    let int_digits = if value >= 100.0 {
        3
    } else if value >= 10.0 {
        2
    } else {
        1
    };
    let text = format!("{value:.prec$}", prec = 4 - int_digits);
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.')
    } else {
        &text
    };
    format!("{text}{}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes_read_like_docker_info() {
        assert_eq!(human_size(0), "0B");
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(10 << 30), "10.74GB");
        assert_eq!(human_size(256 << 20), "268.4MB");
        assert_eq!(human_size(512 << 10), "524.3kB");
        assert_eq!(human_size(2_000_000_000), "2GB");
    }
}

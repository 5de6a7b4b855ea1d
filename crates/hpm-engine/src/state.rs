//! The metadata state: devices, their maps and the physical space, and the one function that
//! changes them, [`State::apply`], used alike by live operations and by journal replay.
//!
//! This module owns the rules every record must satisfy (ids, names, ranges) and the
//! reference counting that follows each mapping change. It must never do I/O.

use crate::fast_hash::FastMap;
use crate::map::{DeviceMap, Entry};
use crate::space::Space;
use hpm_format::{
    CheckpointState, DeviceRecord, EntryRecord, Record, BLOCK_SIZE, MAX_DEVICE_SIZE, NO_BLOCK,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Fixed properties of a pool.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub chunk_blocks: u32,
    pub capacity_blocks: u64,
}

pub(crate) struct DeviceState {
    pub id: u32,
    pub name: String,
    pub size: u64,
    /// `size` again, for the device's handles to check a write's range without `live`.
    /// Updated with `size` (grow only), so a handle never sees a size the state does not have.
    pub size_seen: Arc<AtomicU64>,
    pub read_only: bool,
    pub origin: String,
    pub map: DeviceMap,
}

pub(crate) struct State {
    pub geo: Geometry,
    /// By id. A hash table, not a B-tree: every read looks its device up, and a B-tree's
    /// search for a key near the end of a large node cost about 50 ns a read (the last device
    /// of 65, docs/bench/engine.md section 2). Ordered walks use [`State::devices_by_id`].
    pub devices: FastMap<u32, DeviceState>,
    pub names: HashMap<String, u32>,
    pub next_id: u32,
    pub space: Space,
}

/// Longest device name, in bytes.
pub const MAX_NAME: usize = 1024;

/// Checks a device name: 1 to 1024 bytes, no NUL; otherwise opaque (slashes and spaces are
/// fine, as containerd keys need).
pub(crate) fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME || name.contains('\0') {
        return Err(format!(
            "device name must be 1 to {MAX_NAME} bytes without NUL, got {:?}",
            name
        ));
    }
    Ok(())
}

/// Checks a device size: a multiple of 4096, at most [`MAX_DEVICE_SIZE`].
pub(crate) fn check_size(size: u64) -> Result<(), String> {
    if !size.is_multiple_of(BLOCK_SIZE) || size > MAX_DEVICE_SIZE {
        return Err(format!(
            "size {size} is not a multiple of 4096 of at most {MAX_DEVICE_SIZE} bytes (64 TiB)"
        ));
    }
    Ok(())
}

impl State {
    pub(crate) fn new(geo: Geometry) -> Self {
        Self {
            geo,
            devices: FastMap::default(),
            names: HashMap::new(),
            next_id: 1,
            space: Space::new(geo.chunk_blocks, geo.capacity_blocks),
        }
    }

    pub(crate) fn c(&self) -> u64 {
        u64::from(self.geo.chunk_blocks)
    }

    pub(crate) fn by_name(&self, name: &str) -> Option<&DeviceState> {
        self.names.get(name).and_then(|id| self.devices.get(id))
    }

    fn dev(&self, id: u32) -> Result<&DeviceState, String> {
        self.devices
            .get(&id)
            .ok_or_else(|| format!("device id {id} does not exist"))
    }

    /// Applies one record. On error nothing changed and the message says what is wrong.
    pub(crate) fn apply(&mut self, r: &Record) -> Result<(), String> {
        let cb = self.geo.chunk_blocks;
        match r {
            Record::CreateDevice {
                id,
                name,
                size,
                read_only,
            } => {
                self.check_new(*id, name)?;
                check_size(*size).map_err(|e| format!("device {name:?}: {e}"))?;
                self.insert(DeviceState {
                    id: *id,
                    name: name.clone(),
                    size: *size,
                    size_seen: Arc::new(AtomicU64::new(*size)),
                    read_only: *read_only,
                    origin: String::new(),
                    map: DeviceMap::default(),
                });
            }
            Record::Snapshot {
                id,
                origin,
                name,
                read_only,
            } => {
                self.check_new(*id, name)?;
                let o = self.dev(*origin)?;
                let map = o.map.clone();
                let dev = DeviceState {
                    id: *id,
                    name: name.clone(),
                    size: o.size,
                    size_seen: Arc::new(AtomicU64::new(o.size)),
                    read_only: *read_only,
                    origin: o.name.clone(),
                    map,
                };
                for (_, e) in dev.map.entries() {
                    e.for_each(cb, |_, p| self.space.inc(p));
                }
                self.insert(dev);
            }
            Record::Remove { id } => {
                self.dev(*id)?;
                let d = self.devices.remove(id).expect("checked");
                self.names.remove(&d.name);
                for (_, e) in d.map.entries() {
                    e.for_each(cb, |_, p| self.space.dec(p));
                }
                self.space.forget_device(*id);
            }
            Record::Resize { id, size } => {
                let d = self.dev(*id)?;
                if *size < d.size || check_size(*size).is_err() {
                    return Err(format!(
                        "device {:?} cannot change size from {} to {size}",
                        d.name, d.size
                    ));
                }
                let d = self.devices.get_mut(id).expect("checked");
                d.size = *size;
                d.size_seen.store(*size, Ordering::Release);
            }
            Record::Map {
                dev,
                vblock,
                pblock,
                count,
            } => {
                self.check_range(*dev, *vblock, *count)?;
                let end = pblock.checked_add(u64::from(*count));
                if end.is_none_or(|e| e > self.space.capacity_blocks()) {
                    return Err(format!(
                        "physical blocks {pblock}+{count} are outside the pool's {} blocks",
                        self.space.capacity_blocks()
                    ));
                }
                if let Some(k) = (0..u64::from(*count)).find(|k| self.space.is_pending(pblock + k))
                {
                    return Err(format!(
                        "physical block {} is mapped in the transaction that frees it",
                        pblock + k
                    ));
                }
                for k in 0..u64::from(*count) {
                    // Count the new reference before dropping the old: they may be equal.
                    self.space.inc(pblock + k);
                    let d = self.devices.get_mut(dev).expect("checked");
                    if let Some(old) = d.map.set_block(vblock + k, Some(pblock + k), cb) {
                        self.space.dec(old);
                    }
                }
            }
            Record::Unmap { dev, vblock, count } => {
                self.check_range(*dev, *vblock, *count)?;
                // Only mapped blocks are ever unmapped (`Device::discard` logs no others), so
                // an unmapped one is corruption; refusing it also bounds the work to blocks
                // that exist, whatever the count says.
                let d = self.dev(*dev)?;
                if let Some(k) =
                    (0..u64::from(*count)).find(|k| d.map.lookup(vblock + k, cb).is_none())
                {
                    return Err(format!(
                        "unmaps block {} of device {:?}, which is not mapped (only mapped blocks are unmapped)",
                        vblock + k,
                        d.name
                    ));
                }
                for k in 0..u64::from(*count) {
                    let d = self.devices.get_mut(dev).expect("checked");
                    if let Some(old) = d.map.set_block(vblock + k, None, cb) {
                        self.space.dec(old);
                    }
                }
            }
        }
        Ok(())
    }

    fn check_new(&self, id: u32, name: &str) -> Result<(), String> {
        check_name(name)?;
        if self.names.contains_key(name) {
            return Err(format!("device {name:?} already exists"));
        }
        if self.devices.contains_key(&id) || id == 0 {
            return Err(format!("device id {id} is already used"));
        }
        if id == u32::MAX {
            return Err(format!("device id {id} is out of range"));
        }
        Ok(())
    }

    fn check_range(&self, dev: u32, vblock: u64, count: u32) -> Result<(), String> {
        let d = self.dev(dev)?;
        let blocks = d.size / BLOCK_SIZE;
        if vblock
            .checked_add(u64::from(count))
            .is_none_or(|e| e > blocks)
        {
            return Err(format!(
                "blocks {vblock}+{count} are past the end of device {:?} ({blocks} blocks)",
                d.name
            ));
        }
        Ok(())
    }

    fn insert(&mut self, d: DeviceState) {
        self.next_id = self.next_id.max(d.id + 1);
        self.names.insert(d.name.clone(), d.id);
        self.devices.insert(d.id, d);
    }

    /// Every device, in id order (the order of checkpoints and of the work done at load).
    pub(crate) fn devices_by_id(&self) -> Vec<&DeviceState> {
        let mut v: Vec<&DeviceState> = self.devices.values().collect();
        v.sort_unstable_by_key(|d| d.id);
        v
    }

    /// The checkpoint form of the whole state.
    pub(crate) fn to_checkpoint(&self) -> CheckpointState {
        let cb = self.geo.chunk_blocks;
        CheckpointState {
            next_device_id: self.next_id,
            devices: self
                .devices_by_id()
                .into_iter()
                .map(|d| DeviceRecord {
                    id: d.id,
                    name: d.name.clone(),
                    size: d.size,
                    read_only: d.read_only,
                    origin: d.origin.clone(),
                    entries: d.map.entries().map(|(v, e)| (v, e.to_record(cb))).collect(),
                })
                .collect(),
        }
    }

    /// Builds the state from a checkpoint. Every problem found is pushed to `problems` (with
    /// device and chunk) and the offending item skipped, so `check` can list them all; open
    /// refuses the pool if there is any.
    pub(crate) fn from_checkpoint(
        geo: Geometry,
        ck: &CheckpointState,
        problems: &mut Vec<String>,
    ) -> Self {
        let mut st = State::new(geo);
        let cb = geo.chunk_blocks;
        let cap = st.space.capacity_blocks();
        let nchunks = cap / st.c();
        for d in &ck.devices {
            let w = format!("device {:?} (id {})", d.name, d.id);
            if let Err(e) = st.check_new(d.id, &d.name) {
                problems.push(format!("checkpoint: {w}: {e}"));
                continue;
            }
            if let Err(e) = check_size(d.size) {
                problems.push(format!("checkpoint: {w}: {e}"));
                continue;
            }
            let vchunks = (d.size / BLOCK_SIZE).div_ceil(st.c());
            let mut map = DeviceMap::default();
            let mut last = None;
            for (v, rec) in &d.entries {
                let at = format!("checkpoint: {w}, virtual chunk {v}");
                if last.is_some_and(|l| l >= *v) {
                    problems.push(format!("{at}: entries out of order or duplicated"));
                    continue;
                }
                last = Some(*v);
                if *v >= vchunks {
                    problems.push(format!(
                        "{at}: past the end of the device ({vchunks} chunks)"
                    ));
                    continue;
                }
                match rec {
                    EntryRecord::Compact { pchunk, .. } if u64::from(*pchunk) >= nchunks => {
                        problems.push(format!(
                            "{at}: physical chunk {pchunk} is outside the pool ({nchunks} chunks)"
                        ));
                        continue;
                    }
                    EntryRecord::Split { blocks } => {
                        if let Some((i, b)) = blocks
                            .iter()
                            .enumerate()
                            .find(|(_, &b)| b != NO_BLOCK && b >= cap)
                        {
                            problems.push(format!("{at}, block {i}: physical block {b} is outside the pool ({cap} blocks)"));
                            continue;
                        }
                    }
                    _ => {}
                }
                let Some(e) = Entry::from_record(rec, cb) else {
                    problems.push(format!("{at}: entry maps no block"));
                    continue;
                };
                let vblocks = d.size / BLOCK_SIZE;
                let mut past = false;
                e.for_each(cb, |i, _| past |= v * st.c() + u64::from(i) >= vblocks);
                if past {
                    problems.push(format!("{at}: maps blocks past the end of the device"));
                    continue;
                }
                e.for_each(cb, |_, p| st.space.inc(p));
                map.put(*v, Some(e));
            }
            st.insert(DeviceState {
                id: d.id,
                name: d.name.clone(),
                size: d.size,
                size_seen: Arc::new(AtomicU64::new(d.size)),
                read_only: d.read_only,
                origin: d.origin.clone(),
                map,
            });
        }
        if ck.next_device_id < st.next_id {
            problems.push(format!(
                "checkpoint: next device id {} is not above the largest id in use {}",
                ck.next_device_id,
                st.next_id - 1
            ));
        }
        st.next_id = st.next_id.max(ck.next_device_id);
        st
    }

    /// After load and replay: reservations derived from the maps (a compact entry whose
    /// physical chunk nobody else uses keeps taking that chunk's new blocks), and nothing
    /// pending from replayed frees.
    pub(crate) fn finish_load(&mut self) {
        let (_, txn) = self.space.take_pending();
        self.space.settle(txn);
        let cb = self.geo.chunk_blocks;
        let mut owners: Vec<(u32, u64, u32)> = Vec::new();
        for d in self.devices_by_id() {
            for (v, e) in d.map.entries() {
                if let Entry::Compact { pchunk, .. } = e {
                    let mut exclusive = true;
                    e.for_each(cb, |_, p| exclusive &= self.space.refs(p) == 1);
                    if exclusive {
                        owners.push((d.id, v, *pchunk));
                    }
                }
            }
        }
        for (dev, v, pc) in owners {
            self.space.adopt(dev, v, pc);
        }
    }

    /// Blocks mapped by device `d`, and how many of them no other device shares.
    pub(crate) fn usage(&self, d: &DeviceState) -> (u64, u64) {
        let (mut mapped, mut exclusive) = (0, 0);
        for (_, e) in d.map.entries() {
            e.for_each(self.geo.chunk_blocks, |_, p| {
                mapped += 1;
                exclusive += u64::from(self.space.refs(p) == 1);
            });
        }
        (mapped, exclusive)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The device table is a hash table; a checkpoint still lists devices by ascending id
    /// (docs/design.md section 4.1), whatever the order of creation and removal.
    #[test]
    fn checkpoints_list_devices_by_ascending_id() {
        let mut st = State::new(Geometry {
            chunk_blocks: 16,
            capacity_blocks: 1 << 16,
        });
        for id in (1..=300u32).rev() {
            let r = Record::CreateDevice {
                id,
                name: format!("d{id}"),
                size: 1 << 20,
                read_only: false,
            };
            st.apply(&r).unwrap();
        }
        for id in (1..=300u32).filter(|id| id % 7 == 0) {
            st.apply(&Record::Remove { id }).unwrap();
        }
        let ids: Vec<u32> = st.to_checkpoint().devices.iter().map(|d| d.id).collect();
        let want: Vec<u32> = (1..=300u32).filter(|id| id % 7 != 0).collect();
        assert_eq!(ids, want);
        assert_eq!(st.to_checkpoint().next_device_id, 301);
    }
}

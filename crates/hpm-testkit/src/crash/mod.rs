//! Simulated power loss: backends that remember what is durable and what is not.
//!
//! This module owns [`CrashSim`], one simulated machine, and [`CrashFile`], the [`Backend`] of
//! one of its files. Each file keeps a live image (what reads see), a durable image (what a
//! power cut would leave) and the ordered list of writes, punches and resizes made since its
//! last successful sync. A crash rebuilds every file from its durable image plus a random
//! subset of those pending operations, tearing writes into `tear`-byte pieces aligned to
//! absolute file offsets, the way a disk may persist some sectors of a write and not others.
//!
//! A file's sync makes only that file durable, as `fsync` does.

mod image;

use hpm_io::Backend;
use image::Image;
use parking_lot::Mutex;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::io;
use std::sync::Arc;

/// What a crash keeps of the operations that were not synced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TornPolicy {
    /// Keep none: every file reverts to its last synced contents.
    DropAll,
    /// Keep all: every file keeps its live contents.
    KeepAll,
    /// Keep each punch and resize, and each aligned piece of each write, independently with a
    /// probability drawn once per crash.
    Random,
}

/// An operation made since the file's last successful sync, in the order it was made.
#[derive(Debug)]
enum Pending {
    Write { offset: u64, data: Vec<u8> },
    Punch { offset: u64, len: u64 },
    SetLen(u64),
}

/// One simulated file.
#[derive(Debug)]
struct SimFile {
    name: String,
    /// Size in bytes of the pieces a crash tears writes into, aligned to file offsets.
    tear: u64,
    live: Image,
    durable: Image,
    pending: Vec<Pending>,
}

#[derive(Debug)]
struct State {
    rng: SmallRng,
    /// Indexed by `CrashFile::index`; files are never removed, so indices stay valid.
    files: Vec<SimFile>,
    /// Successful syncs since the sim was made or `crash_after_syncs` was last called.
    syncs: u64,
    /// How many syncs succeed before the power fails, counted like `syncs`.
    crash_after: Option<u64>,
    /// Power is off: every mutation fails until `crash`.
    dead: bool,
}

/// One simulated machine: the files that lose power together.
///
/// All state sits behind one lock, so each operation is atomic with respect to a crash.
#[derive(Debug)]
pub struct CrashSim {
    state: Mutex<State>,
}

/// A handle to one file of a [`CrashSim`]; cheap to clone, and valid across crashes.
#[derive(Clone, Debug)]
pub struct CrashFile {
    sim: Arc<CrashSim>,
    index: usize,
}

fn power_loss(op: &str, name: &str) -> io::Error {
    io::Error::other(format!("simulated power loss: {op} on '{name}' refused"))
}

fn end_of(offset: u64, len: u64) -> io::Result<u64> {
    offset
        .checked_add(len)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset out of range"))
}

impl CrashSim {
    /// A machine with no files whose crashes are drawn from `seed`.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                rng: SmallRng::seed_from_u64(seed),
                files: Vec::new(),
                syncs: 0,
                crash_after: None,
                dead: false,
            }),
        })
    }

    /// The file `name`, created empty if it does not exist. `tear` is the size of the pieces a
    /// crash tears its writes into; an existing file keeps the `tear` it was created with.
    ///
    /// # Panics
    /// If `tear` is zero.
    pub fn file(self: &Arc<Self>, name: &str, tear: usize) -> CrashFile {
        assert!(tear > 0, "tear size must be positive");
        let mut st = self.state.lock();
        let index = match st.files.iter().position(|f| f.name == name) {
            Some(i) => i,
            None => {
                st.files.push(SimFile {
                    name: name.to_owned(),
                    tear: tear as u64,
                    live: Image::default(),
                    durable: Image::default(),
                    pending: Vec::new(),
                });
                st.files.len() - 1
            }
        };
        CrashFile {
            sim: Arc::clone(self),
            index,
        }
    }

    /// Names of all files, in creation order.
    pub fn file_names(&self) -> Vec<String> {
        self.state
            .lock()
            .files
            .iter()
            .map(|f| f.name.clone())
            .collect()
    }

    /// Successful syncs, across all files, since the sim was made or [`Self::crash_after_syncs`]
    /// was last called.
    pub fn syncs(&self) -> u64 {
        self.state.lock().syncs
    }

    /// Arms (or with `None` disarms) a power cut: the next `n` syncs succeed, the one after
    /// fails, and from then on every mutation of any file fails with "simulated power loss"
    /// and changes nothing, until [`Self::crash`]. Writes between the `n`-th sync and the
    /// failing one still succeed, so they are pending when the power goes. Resets the sync
    /// counter.
    pub fn crash_after_syncs(&self, n: Option<u64>) {
        let mut st = self.state.lock();
        st.syncs = 0;
        st.crash_after = n;
    }

    /// Whether the power has failed and mutations are refused.
    pub fn is_dead(&self) -> bool {
        self.state.lock().dead
    }

    /// Power loss and reboot with a policy drawn from the seed (a quarter of crashes drop all
    /// pending operations, a quarter keep all, half keep a random subset). Returns the policy
    /// used, for failure messages.
    pub fn crash(&self) -> TornPolicy {
        let policy = match self.state.lock().rng.random_range(0..4) {
            0 => TornPolicy::DropAll,
            1 => TornPolicy::KeepAll,
            _ => TornPolicy::Random,
        };
        self.crash_with(policy);
        policy
    }

    /// Power loss and reboot: each file becomes its durable image plus what `policy` keeps of
    /// its pending operations, applied in order; that becomes durable, the power is back on
    /// and any armed power cut is disarmed.
    pub fn crash_with(&self, policy: TornPolicy) {
        let mut st = self.state.lock();
        let st = &mut *st;
        let keep_p: f64 = st.rng.random();
        for f in &mut st.files {
            let mut img = f.durable.clone();
            for op in f.pending.drain(..) {
                let mut keep = || match policy {
                    TornPolicy::DropAll => false,
                    TornPolicy::KeepAll => true,
                    TornPolicy::Random => st.rng.random_bool(keep_p),
                };
                match op {
                    Pending::Write { offset, data } => {
                        // Pieces end at multiples of `tear` in file offsets, so a write at an
                        // unaligned offset tears at the same places a disk sector would.
                        let end = offset + data.len() as u64;
                        let mut start = offset;
                        while start < end {
                            let stop = end.min((start / f.tear + 1) * f.tear);
                            if keep() {
                                let piece =
                                    &data[(start - offset) as usize..(stop - offset) as usize];
                                img.write(piece, start);
                            }
                            start = stop;
                        }
                    }
                    Pending::Punch { offset, len } => {
                        if keep() {
                            img.punch(offset, len);
                        }
                    }
                    Pending::SetLen(len) => {
                        if keep() {
                            img.set_len(len);
                        }
                    }
                }
            }
            f.live = img.clone();
            f.durable = img;
        }
        st.dead = false;
        st.crash_after = None;
    }
}

impl CrashFile {
    /// The file's name.
    pub fn name(&self) -> String {
        self.sim.state.lock().files[self.index].name.clone()
    }

    /// The machine this file belongs to.
    pub fn sim(&self) -> &Arc<CrashSim> {
        &self.sim
    }

    /// The contents a crash that keeps nothing pending would leave.
    pub fn durable_bytes(&self) -> Vec<u8> {
        self.sim.state.lock().files[self.index].durable.to_vec()
    }

    /// The contents reads see now.
    pub fn live_bytes(&self) -> Vec<u8> {
        self.sim.state.lock().files[self.index].live.to_vec()
    }

    /// How many operations are waiting for a sync.
    pub fn pending_ops(&self) -> usize {
        self.sim.state.lock().files[self.index].pending.len()
    }

    /// Runs a mutation unless the power is off; `f` records it in the live image and the
    /// pending list.
    fn mutate(&self, op: &str, f: impl FnOnce(&mut SimFile)) -> io::Result<()> {
        let mut st = self.sim.state.lock();
        let st = &mut *st;
        let file = &mut st.files[self.index];
        if st.dead {
            return Err(power_loss(op, &file.name));
        }
        f(file);
        Ok(())
    }
}

impl Backend for CrashFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        end_of(offset, buf.len() as u64)?;
        self.sim.state.lock().files[self.index]
            .live
            .read(buf, offset);
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        end_of(offset, buf.len() as u64)?;
        self.mutate("write", |f| {
            f.live.write(buf, offset);
            f.pending.push(Pending::Write {
                offset,
                data: buf.to_vec(),
            });
        })
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.sim.state.lock();
        let st = &mut *st;
        let file = &mut st.files[self.index];
        if st.dead {
            return Err(power_loss("sync", &file.name));
        }
        if st.crash_after.is_some_and(|n| st.syncs >= n) {
            // The power fails during this sync: nothing it would have made durable is.
            st.dead = true;
            return Err(power_loss("sync", &file.name));
        }
        file.durable = file.live.clone();
        file.pending.clear();
        st.syncs += 1;
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64) -> io::Result<()> {
        end_of(offset, len)?;
        self.mutate("punch", |f| {
            f.live.punch(offset, len);
            f.pending.push(Pending::Punch { offset, len });
        })
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.sim.state.lock().files[self.index].live.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.mutate("set_len", |f| {
            f.live.set_len(len);
            f.pending.push(Pending::SetLen(len));
        })
    }

    fn allocated_bytes(&self) -> io::Result<Option<u64>> {
        Ok(Some(
            self.sim.state.lock().files[self.index].live.allocated(),
        ))
    }
}

#[cfg(test)]
mod tests;

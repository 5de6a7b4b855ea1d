//! The crash check: does what the engine holds after a crash match what the model allows?
//!
//! This module owns [`Model::verify_after_crash`], which reads every block of every device
//! through a caller-supplied function and compares it with the values that block may hold,
//! [`Model::settle`], which adopts the engine's post-crash contents as the new truth, and
//! [`Model::allowed_after_crash`] for tests that want to look at the allowed values.

use super::device::Block;
use super::{Model, ModelError, BLOCK_SIZE};
use std::fmt::Write;

/// Whether `got` (the block's in-device bytes) equals `value` (`None` = zeros).
fn same(value: Option<&Block>, got: &[u8]) -> bool {
    match value {
        Some(b) => b[..got.len()] == *got,
        None => got.iter().all(|&b| b == 0),
    }
}

/// FNV-1a: a fingerprint that tells apart values sharing their first bytes.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01B3)
    })
}

/// A short description of a block value for failure messages.
fn describe(bytes: &[u8]) -> String {
    if bytes.iter().all(|&b| b == 0) {
        return "zeros".to_owned();
    }
    let mut s = String::new();
    for b in &bytes[..bytes.len().min(8)] {
        let _ = write!(s, "{b:02x}");
    }
    let _ = write!(s, "..(fnv {:016x})", fnv(bytes));
    s
}

fn describe_value(value: Option<&Block>, n: usize) -> String {
    value.map_or_else(|| "zeros".to_owned(), |b| describe(&b[..n]))
}

impl Model {
    /// The values block `block` of `name` may hold after a crash, as full blocks: the flushed
    /// value first, then the values it took since the last flush, in order.
    pub fn allowed_after_crash(&self, name: &str, block: u64) -> Result<Vec<Vec<u8>>, ModelError> {
        let dev = self.dev(name)?;
        if block >= dev.blocks() {
            let offset = block.saturating_mul(BLOCK_SIZE);
            return Err(ModelError::OutOfRange {
                name: name.to_owned(),
                offset,
                len: BLOCK_SIZE,
                size: dev.size,
            });
        }
        let zeros = vec![0; BLOCK_SIZE as usize];
        Ok(dev
            .allowed(block)
            .into_iter()
            .map(|v| v.map_or_else(|| zeros.clone(), |b| b.to_vec()))
            .collect())
    }

    /// Checks every block of every device after a crash. `read_block(name, index)` returns the
    /// engine's contents of that block: at least the bytes that lie inside the device (a full
    /// 4096 bytes is fine for a partial last block; the excess is ignored).
    ///
    /// Each block must equal its value at the last flush or a value it took after it. The error
    /// names the first wrong block, what it read and what was allowed, and counts the others.
    pub fn verify_after_crash<F, R>(&self, mut read_block: F) -> Result<(), String>
    where
        F: FnMut(&str, u64) -> R,
        R: AsRef<[u8]>,
    {
        let mut first = None;
        let mut wrong = 0u64;
        for (name, dev) in &self.devices {
            for idx in 0..dev.blocks() {
                let got = read_block(name, idx);
                let got = got.as_ref();
                let n = dev.block_len(idx);
                let start = idx * BLOCK_SIZE;
                let problem = if got.len() < n {
                    format!(
                        "device '{name}' block {idx}: read returned {} bytes, expected {n}",
                        got.len()
                    )
                } else {
                    let got = &got[..n];
                    let allowed = dev.allowed(idx);
                    if allowed.iter().any(|&v| same(v, got)) {
                        continue;
                    }
                    let later: Vec<String> =
                        allowed[1..].iter().map(|&v| describe_value(v, n)).collect();
                    format!(
                        "device '{name}' block {idx} (bytes {start}..{}) reads {} after the crash; \
                         allowed: flushed {}, later written [{}]",
                        start + n as u64,
                        describe(got),
                        describe_value(allowed[0], n),
                        later.join(", "),
                    )
                };
                wrong += 1;
                first.get_or_insert(problem);
            }
        }
        match first {
            None => Ok(()),
            Some(msg) if wrong == 1 => Err(msg),
            Some(msg) => Err(format!("{msg} (and {} more wrong blocks)", wrong - 1)),
        }
    }

    /// Adopts the engine's post-crash contents, read through `read_block` as in
    /// [`Self::verify_after_crash`], as every device's current and flushed contents. Call it
    /// after that check passed, before continuing the workload.
    ///
    /// # Panics
    /// If `read_block` returns fewer bytes than the block has inside the device.
    pub fn settle<F, R>(&mut self, mut read_block: F)
    where
        F: FnMut(&str, u64) -> R,
        R: AsRef<[u8]>,
    {
        for (name, dev) in &mut self.devices {
            for idx in 0..dev.blocks() {
                let got = read_block(name, idx);
                let got = got.as_ref();
                let n = dev.block_len(idx);
                assert!(
                    got.len() >= n,
                    "device '{name}' block {idx}: read returned {} bytes, expected {n}",
                    got.len()
                );
                dev.settle(idx, got);
            }
        }
    }
}

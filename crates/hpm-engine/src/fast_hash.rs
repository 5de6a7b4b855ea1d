//! A cheap hasher for the engine's own integer keys (physical block numbers, device ids):
//! multiply-rotate, as FxHash. The keys are chosen by the engine, not by clients, so a
//! DoS-resistant hash (std's SipHash, some 20 ns a lookup) buys nothing here.
//!
//! This module must never be used for keys a client controls (names, paths).

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

#[derive(Default, Clone, Copy)]
pub(crate) struct FastHasher(u64);

impl std::hash::Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }
    fn write_u64(&mut self, i: u64) {
        self.0 = (self.0.rotate_left(5) ^ i).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }
}

pub(crate) type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
pub(crate) type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

//! Test-only support for hpmapper: never a dependency of a shipped crate.
//!
//! This crate owns the tools the engine's tests use to show that a pool survives what a disk
//! and a power cut can do to it, and that it stores what it was told to store:
//!
//! - [`crash`]: a family of backends sharing one simulated machine that can lose power, keeping
//!   only what was synced plus a random, torn subset of what was not;
//! - [`fault`]: a wrapper that makes any backend fail chosen operations with EIO or ENOSPC;
//! - [`model`]: the reference model of devices, snapshots and their crash guarantees, the
//!   oracle that property tests compare the engine against;
//! - [`workload`]: deterministic, recognisable data to write;
//! - [`host`]: what a test needs of the machine, failing under CI and skipping elsewhere.

pub mod crash;
pub mod fault;
pub mod host;
pub mod model;
pub mod workload;

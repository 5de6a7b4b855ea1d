//! `hpmapper daemon --containerd-socket PATH`: the containerd snapshotter (`hpm-containerd`
//! speaks the gRPC wire and keeps the snapshot metadata) over this daemon's pool and
//! attachments.
//!
//! containerd's snapshots live as pool devices named `containerd/<n>`, a namespace the
//! Docker graphdriver never uses; their metadata is `<pool>/containerd/snapshots.json`, so it
//! travels with the pool. The snapshotter opens at daemon start (unlike the graphdriver,
//! which waits for dockerd's Init): containerd may call it at any time.

use super::devices::DaemonDevices;
use super::Daemon;
use anyhow::{Context, Result};
use hpm_containerd::block::{BlockOptions, BlockSnapshotter};
use std::path::PathBuf;
use std::sync::Arc;

/// The state directory of the snapshotter inside the pool directory.
pub const STATE_DIR: &str = "containerd";

/// Opens the snapshotter of daemon `d` with parent-less snapshots of `base_size` bytes,
/// refusing new snapshots while less than `min_free_space` percent of the pool is free.
pub fn open(d: &Arc<Daemon>, base_size: u64, min_free_space: u8) -> Result<Arc<BlockSnapshotter>> {
    let state_dir: PathBuf = d.pool_dir().join(STATE_DIR);
    let s = BlockSnapshotter::open(
        d.pool().clone(),
        Arc::new(DaemonDevices::new(d)),
        BlockOptions {
            state_dir: state_dir.clone(),
            base_size,
            min_free_space,
        },
    )
    .with_context(|| {
        format!(
            "opening the containerd snapshotter (state in {})",
            state_dir.display()
        )
    })?;
    let (views, active, committed) = s.counts();
    tracing::info!(
        state = %state_dir.display(),
        base_size,
        min_free_space,
        views,
        active,
        committed,
        "containerd snapshotter ready"
    );
    Ok(Arc::new(s))
}

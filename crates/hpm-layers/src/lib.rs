//! The layer store ([`store`]): layers as thin pool devices holding ext4 filesystems,
//! mounted on demand; and its filesystem side: applying Docker/OCI layer tars to a
//! directory and diffing two directory trees into a layer tar.
//!
//! Owns the layer tar format (whiteouts, opaque directories, PAX extended attributes) and
//! the rule that an untrusted layer never writes outside its root. The tar and diff code
//! knows nothing of devices or mounts: [`store`] passes it mounted directories. Knows
//! nothing of the Docker plugin protocol or containerd's API: those sit on top of
//! [`LayerStore`].

#![forbid(unsafe_code)]

pub mod apply;
mod beneath;
pub mod diff;
mod entry_name;
mod error;
pub mod store;
mod xattr;

pub use apply::apply_layer;
pub use diff::{changes, diff_size, export_changes, Change, ChangeKind};
pub use error::{Error, ErrorKind, Result};
pub use store::{BlockDevices, LayerStore, Layout, StoreOptions};

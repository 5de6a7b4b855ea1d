//! Filesystem side of the layer store: applying Docker/OCI layer tars to a directory and
//! diffing two directory trees into a layer tar.
//!
//! Owns the layer tar format (whiteouts, opaque directories, PAX extended attributes) and
//! the rule that an untrusted layer never writes outside its root. Knows nothing of devices,
//! mounts or the Docker plugin protocol: the layer store and the plugin sit on top and pass
//! in mounted directories.

#![forbid(unsafe_code)]

pub mod apply;
mod beneath;
pub mod diff;
mod entry_name;
mod error;
mod xattr;

pub use apply::apply_layer;
pub use diff::{changes, diff_size, export_changes, Change, ChangeKind};
pub use error::{Error, ErrorKind, Result};

//! The containerd API as generated from our copies of its protos (`proto/`, see `build.rs`):
//! prost messages, the tonic server of the `Snapshots` service, and its client (the tests act
//! as containerd with it). Module paths follow the protobuf packages, as the generated code
//! refers to other packages by relative paths. Owns no logic: conversions and checks are in
//! `wire`, the service in `service`.

/// Protobuf package `containerd`.
pub mod containerd {
    /// Protobuf package `containerd.types`: [`Mount`](types::Mount).
    #[allow(missing_docs, clippy::all, clippy::pedantic)]
    pub mod types {
        include!(concat!(env!("OUT_DIR"), "/containerd.types.rs"));
    }

    /// Protobuf package `containerd.services`.
    pub mod services {
        /// Protobuf package `containerd.services.snapshots`.
        pub mod snapshots {
            /// Protobuf package `containerd.services.snapshots.v1`: the `Snapshots` service.
            #[allow(missing_docs, clippy::all, clippy::pedantic)]
            pub mod v1 {
                include!(concat!(
                    env!("OUT_DIR"),
                    "/containerd.services.snapshots.v1.rs"
                ));
            }
        }
    }
}

pub use containerd::services::snapshots::v1 as snapshots;
pub use containerd::types::Mount;

//! The generated gRPC code of cluster mode.
//!
//! - [`cluster`]: the internal node API (`Deliver`, `Takeover`) that gateways and nodes call.
//! - [`push`]: the push API for backends (`Push`), served by gateways.

/// Generated code, nested as the protobuf packages are.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
mod generated {
    pub mod pigeon {
        pub mod cluster {
            pub mod v1 {
                tonic::include_proto!("pigeon.cluster.v1");
            }
        }
        pub mod push {
            pub mod v1 {
                tonic::include_proto!("pigeon.push.v1");
            }
        }
    }
}

/// The internal node API (`pigeon.cluster.v1`).
pub use generated::pigeon::cluster::v1 as cluster;
/// The push API over gRPC (`pigeon.push.v1`).
pub use generated::pigeon::push::v1 as push;

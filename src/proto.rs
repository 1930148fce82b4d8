//! Code generated from `proto/` by build.rs, and the descriptor set served by
//! reflection.

#![allow(clippy::all, missing_docs)]

pub mod google {
    pub mod r#type {
        include!(concat!(env!("OUT_DIR"), "/google.r#type.rs"));
    }
    pub mod api {
        tonic::include_proto!("google.api");
    }
}

pub mod users {
    pub mod v1 {
        tonic::include_proto!("users.v1");
    }
}

/// Every file of the contract and its imports, encoded.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/users_descriptor.bin"));

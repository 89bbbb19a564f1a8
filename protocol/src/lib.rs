//! vmrt agent API shared by the shim (ttrpc client) and the guest agent
//! (ttrpc server).
//!
//! * [`agent`] — protobuf messages of `protos/agent.proto` (package
//!   `vmrt.agent.v1`), generated with rust-protobuf 3.
//! * [`agent_ttrpc`] — async ttrpc client [`agent_ttrpc::AgentClient`], the
//!   server trait [`agent_ttrpc::Agent`] and
//!   [`agent_ttrpc::create_agent`] to register an implementation with a
//!   `ttrpc::asynchronous::Server`.
//! * Constants of the transport (vsock ports, API version) and
//!   [`StreamHeader`], the first line of every stdio stream connection.

pub mod client;
pub mod stream;

pub use stream::{
    is_valid_id, StdioStream, StreamHeader, StreamHeaderError, MAX_HEADER_LINE, MAX_ID_LEN,
};

/// Protobuf messages of `protos/agent.proto` (generated).
#[allow(
    missing_docs,
    clippy::all,
    unused_attributes,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    trivial_casts,
    unused_results,
    unused_mut
)]
pub mod agent {
    include!(concat!(env!("OUT_DIR"), "/agent.rs"));
}

/// Async ttrpc client and server bindings of service `vmrt.agent.v1.Agent`
/// (generated).
#[allow(
    missing_docs,
    clippy::all,
    dead_code,
    non_camel_case_types,
    non_snake_case,
    non_upper_case_globals,
    trivial_casts,
    unused_imports,
    unused_results,
    unsafe_code
)]
pub mod agent_ttrpc {
    include!(concat!(env!("OUT_DIR"), "/agent_ttrpc.rs"));
}

/// Default guest vsock port of the ttrpc agent API (kernel command line
/// `vmrt.port=`).
pub const DEFAULT_API_PORT: u32 = 1024;

/// Default guest vsock port of the stdio stream listener (kernel command
/// line `vmrt.io_port=`).
pub const DEFAULT_IO_PORT: u32 = 1025;

/// Host vsock port (CID 2) the shim asks the agent to send its log lines to
/// (kernel command line `vmrt.log_port=`); the VMM's hybrid vsock forwards the
/// guest's connection to `<uds>_1026` on the host.
pub const DEFAULT_LOG_PORT: u32 = 1026;

/// Version of the agent API in `protos/agent.proto`, reported by the
/// `Version` RPC (`VersionResponse.api_version`). Bumped on incompatible
/// changes only; additive changes keep it.
pub const API_VERSION: u32 = 1;

/// Fully qualified ttrpc service name of the agent API.
pub const SERVICE_NAME: &str = "vmrt.agent.v1.Agent";

//! Task service errors and their mapping to ttrpc status codes, which containerd turns
//! into its errdefs (NotFound, AlreadyExists, InvalidArgument, FailedPrecondition,
//! NotImplemented, Unknown/Internal).

use crate::{
    agent::AgentError, config::ConfigError, io::StdioError, mount::MountError,
    sandbox::SandboxError,
};

/// An error answered to containerd.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No such container or exec.
    #[error("{0}")]
    NotFound(String),
    /// A container or exec with this id already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// The request is malformed (bad spec, bad mount, bad option).
    #[error("{0}")]
    InvalidArgument(String),
    /// The request does not fit the current state (not running, VMM gone, ...).
    #[error("{0}")]
    FailedPrecondition(String),
    /// The operation is not supported by vmrt.
    #[error("{0}")]
    Unimplemented(String),
    /// Anything else.
    #[error("{0}")]
    Internal(String),
    /// Configuration problem.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Sandbox (VMM) problem.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// Agent RPC problem.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// Rootfs mount problem.
    #[error(transparent)]
    Mount(#[from] MountError),
    /// Stdio setup problem.
    #[error(transparent)]
    Stdio(#[from] StdioError),
}

impl Error {
    /// The ttrpc status code for this error.
    pub fn code(&self) -> ttrpc::Code {
        use ttrpc::Code;
        match self {
            Error::NotFound(_) => Code::NOT_FOUND,
            Error::AlreadyExists(_) => Code::ALREADY_EXISTS,
            Error::InvalidArgument(_) => Code::INVALID_ARGUMENT,
            Error::FailedPrecondition(_) => Code::FAILED_PRECONDITION,
            Error::Unimplemented(_) => Code::UNIMPLEMENTED,
            Error::Internal(_) => Code::INTERNAL,
            Error::Config(
                ConfigError::MissingFile { .. }
                | ConfigError::VmmNotFound
                | ConfigError::PvmHost
                | ConfigError::Read { .. },
            ) => Code::FAILED_PRECONDITION,
            Error::Config(_) => Code::INVALID_ARGUMENT,
            Error::Sandbox(SandboxError::VmmGone(_)) => Code::FAILED_PRECONDITION,
            Error::Sandbox(SandboxError::Exists(_)) => Code::ALREADY_EXISTS,
            Error::Sandbox(SandboxError::Mount(MountError::Invalid { .. })) => {
                Code::INVALID_ARGUMENT
            }
            Error::Sandbox(_) => Code::INTERNAL,
            Error::Mount(MountError::Invalid { .. }) => Code::INVALID_ARGUMENT,
            Error::Mount(_) => Code::INTERNAL,
            Error::Stdio(StdioError::Path { .. }) => Code::INVALID_ARGUMENT,
            Error::Stdio(_) => Code::INTERNAL,
            // Keep the agent's own status code (e.g. NOT_FOUND for an unknown process).
            Error::Agent(AgentError::Rpc {
                source: ttrpc::Error::RpcStatus(s),
                ..
            }) => s.code(),
            Error::Agent(_) => Code::INTERNAL,
        }
    }
}

impl From<Error> for ttrpc::Error {
    fn from(e: Error) -> Self {
        ttrpc::Error::RpcStatus(ttrpc::get_status(e.code(), e.to_string()))
    }
}

/// Result of task service operations.
pub type Result<T> = std::result::Result<T, Error>;

/// Wraps an agent RPC result, naming the method.
pub fn rpc<T>(method: &'static str, r: ttrpc::Result<T>) -> Result<T> {
    r.map_err(|source| Error::Agent(AgentError::Rpc { method, source }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: Error) -> (ttrpc::Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_string()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn codes_and_messages() {
        assert_eq!(
            status(Error::NotFound("container c1 not found".into())),
            (ttrpc::Code::NOT_FOUND, "container c1 not found".into())
        );
        assert_eq!(
            status(Error::Unimplemented("checkpoint".into())).0,
            ttrpc::Code::UNIMPLEMENTED
        );
        let (code, msg) = status(Error::Config(ConfigError::MissingFile {
            key: "hypervisor.kernel",
            path: "/no/vmlinux".into(),
        }));
        assert_eq!(code, ttrpc::Code::FAILED_PRECONDITION);
        assert!(
            msg.contains("/no/vmlinux") && msg.contains("hypervisor.kernel"),
            "{msg}"
        );
        let agent_status =
            ttrpc::Error::RpcStatus(ttrpc::get_status(ttrpc::Code::NOT_FOUND, "no process e1"));
        let (code, msg) = status(Error::Agent(AgentError::Rpc {
            method: "SignalProcess",
            source: agent_status,
        }));
        assert_eq!(code, ttrpc::Code::NOT_FOUND);
        assert!(
            msg.contains("SignalProcess") && msg.contains("no process e1"),
            "{msg}"
        );
        assert_eq!(
            status(Error::Sandbox(SandboxError::VmmGone("s".into()))).0,
            ttrpc::Code::FAILED_PRECONDITION
        );
    }
}

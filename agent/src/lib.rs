//! vmrt guest agent library: the pieces of `vmrt-agent` (PID 1 of the microVM)
//! that the binary wires together.
//!
//! - [`container`]: OCI runtime spec 1.1 container lifecycle (create, start,
//!   exec, signal, wait, delete, pause/resume, update, stats) on top of youki's
//!   libcontainer, plus the zombie reaper PID 1 needs.

pub mod container;

//! Tegmen's host side.
//!
//! A request travels in a straight line through these modules: a face (the
//! `supervisor` CLI, the `tegmen` OCI runtime in [`runtime`], the containerd
//! shim in [`shim`]) asks for a [`sandbox::Sandbox`], which lays out its
//! directory, starts a VM through a [`hypervisor::Hypervisor`] backend
//! chosen from what the [`host`] offers, and talks to the in-guest agent
//! through an [`agent_client::AgentClient`] over hybrid vsock. Containers
//! are added to and removed from a running sandbox ([`container`]):
//! `tegmen` adds one per sandbox, the shim every container of a pod. No
//! face knows how a VM is booted.

pub mod agent_client;
pub mod cgroup;
pub mod config;
pub mod confinement;
pub mod container;
pub mod error;
pub mod guest_image;
pub mod host;
pub mod hypervisor;
pub mod inspect;
pub mod logs;
pub mod netns;
pub mod portforward;
pub mod process;
pub mod runtime;
pub mod sandbox;
pub mod shim;

pub use error::{Error, Result};

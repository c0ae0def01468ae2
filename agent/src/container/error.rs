//! The container layer's errors: one typed variant per kind of failure a
//! caller reacts to differently (unknown id, wrong state, bad spec, missing
//! executable), each with a message that reads like runc's, and the way
//! libcontainer's nested errors are flattened into one line.

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// The whole message: "container X does not exist", or
    /// "exec E does not exist in container X".
    #[error("{0}")]
    NotFound(String),
    /// The whole message: "container X already exists", or
    /// "exec E already exists in container X".
    #[error("{0}")]
    AlreadyExists(String),
    /// What is wrong, naming the field: "process.args: must not be empty".
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    /// The operation does not fit the state the container or process is in
    /// (`message`: "container X is not running").
    #[error("{message}")]
    WrongState { id: String, message: String },
    /// The executable named in process.args[0] is not in the container's
    /// $PATH (or not at the path given); the message is runc's.
    #[error("unable to start container process: exec: \"{0}\": executable file not found in $PATH")]
    ExecutableNotFound(String),
    /// A bad argument that is not part of a spec (an id, a signal number, a
    /// stdio stream the process does not have).
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// Anything else libcontainer reported, its error chain on one line.
    #[error("{0}")]
    Libcontainer(String),
}

impl ContainerError {
    pub(super) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ContainerError::Io {
            context: context.into(),
            source,
        }
    }

    pub(super) fn not_found(id: &str) -> Self {
        ContainerError::NotFound(format!("container {id} does not exist"))
    }

    pub(super) fn wrong_state(id: &str, message: impl Into<String>) -> Self {
        ContainerError::WrongState {
            id: id.to_string(),
            message: message.into(),
        }
    }
}

/// A failure inside the forked helper that runs libcontainer, carried back
/// to the agent over a pipe.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(super) enum FailureKind {
    AlreadyExists,
    InvalidSpec,
    WrongState,
    ExecutableNotFound,
    Other,
}

impl Failure {
    pub fn other(message: impl Into<String>) -> Self {
        Failure {
            kind: FailureKind::Other,
            message: message.into(),
        }
    }

    /// Classifies one of libcontainer's errors.
    pub fn from_libcontainer(err: &libcontainer::error::LibcontainerError) -> Self {
        use libcontainer::error::LibcontainerError as E;
        let message = chain(err);
        if let Some(exe) = missing_executable(&message) {
            return Failure {
                kind: FailureKind::ExecutableNotFound,
                message: exe,
            };
        }
        let kind = match err {
            E::Exist => FailureKind::AlreadyExists,
            E::InvalidID(_) | E::MissingSpec(_) | E::InvalidSpec(_) | E::Spec(_) => FailureKind::InvalidSpec,
            E::IncorrectStatus(_) => FailureKind::WrongState,
            _ => FailureKind::Other,
        };
        Failure { kind, message }
    }

    pub fn into_error(self, id: &str) -> ContainerError {
        match self.kind {
            FailureKind::AlreadyExists => ContainerError::AlreadyExists(format!("container {id} already exists")),
            FailureKind::InvalidSpec => ContainerError::InvalidSpec(self.message),
            FailureKind::WrongState => ContainerError::wrong_state(id, format!("container {id}: {}", self.message)),
            FailureKind::ExecutableNotFound => ContainerError::ExecutableNotFound(self.message),
            FailureKind::Other => ContainerError::Libcontainer(self.message),
        }
    }
}

/// An error and its sources on one line, each source's text added only when
/// the line does not already hold it (transparent wrappers repeat it).
pub(super) fn chain(err: &dyn std::error::Error) -> String {
    let mut line = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !text.is_empty() && !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

/// libcontainer's executor says "executable 'NAME' not found in $PATH" when
/// process.args[0] cannot be found in the container.
fn missing_executable(message: &str) -> Option<String> {
    const HEAD: &str = "executable '";
    const TAIL: &str = "' not found in $PATH";
    let start = message.find(HEAD)? + HEAD.len();
    let len = message[start..].find(TAIL)?;
    Some(message[start..start + len].to_string())
}

#[cfg(test)]
mod tests {
    #[test]
    fn finds_the_missing_executable() {
        let m = "failed to create container: exec process failed with error executable 'foo bar' not found in $PATH";
        assert_eq!(super::missing_executable(m).as_deref(), Some("foo bar"));
        assert_eq!(
            super::missing_executable("executable 'x' at path has wrong permissions"),
            None
        );
        assert_eq!(
            super::ContainerError::ExecutableNotFound("foo".into()).to_string(),
            "unable to start container process: exec: \"foo\": executable file not found in $PATH"
        );
    }
}

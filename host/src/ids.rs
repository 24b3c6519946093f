//! Typed identifiers for runs and tenants. Each id is a ULID: unique, sortable by creation time, and printed
//! as 26 characters of Crockford base32.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use ulid::Ulid;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Ulid);

        impl $name {
            /// A new, unique id.
            pub fn new() -> Self {
                Self(Ulid::new())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = ulid::DecodeError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Ulid::from_str(s).map(Self)
            }
        }
    };
}

typed_id!(
    /// Identifies one run of a flow.
    FlowRunId
);
typed_id!(
    /// Identifies one run of a task within a flow run.
    TaskRunId
);
typed_id!(
    /// Identifies one tenant of a server.
    TenantId
);

impl TaskRunId {
    /// The id under which a code flow's body's logs are stored: its flow run's own (no task
    /// run has it, since each id is new).
    pub fn of_body(run: FlowRunId) -> Self {
        Self(run.0)
    }
}

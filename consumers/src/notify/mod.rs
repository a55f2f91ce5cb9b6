//! Notifications (`hearth-notify`): being built; see the project's issue 4.

use serde::Deserialize;

/// `[homes.<home>.notify]`: recipients, channels and policies of a home.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HomeConfig {}

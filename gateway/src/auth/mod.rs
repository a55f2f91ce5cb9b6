//! Who may connect, and what they may do once connected.
//!
//! - [`passwords`]: a password file of Argon2id hashes, reloaded when it
//!   changes; `hearth-gateway passwd` maintains it.
//! - [`acl`]: publish and subscribe rules per user, with `%u` and `%c`.
//!
//! Anonymous clients (no username) are let in only with
//! `auth.allow_anonymous = true`. Without a password file nobody's username
//! can be checked, so every client counts as anonymous for the rules.

pub mod acl;
pub mod passwords;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use rumqttc::mqttbytes::v4;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

pub use acl::AclRule;
pub(crate) use acl::{Acl, Who};
pub use passwords::{hash_password, set_password, PasswordFileError};
use passwords::{Checked, PasswordFile};

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// `username:argon2-hash` lines, written by `hearth-gateway passwd`.
    pub password_file: Option<PathBuf>,
    /// Let clients in without a username (and, with no password file, with
    /// any username).
    pub allow_anonymous: bool,
    /// Publish/subscribe rules; none means everything is allowed.
    pub acl: Vec<AclRule>,
}

/// Why a client was not let in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No username, and anonymous clients are not allowed.
    Anonymous,
    UnknownUser,
    WrongPassword,
}

impl Refusal {
    /// As stored in the `login_failed` event.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Anonymous => "anonymous_not_allowed",
            Self::UnknownUser => "unknown_user",
            Self::WrongPassword => "wrong_password",
        }
    }

    /// The CONNACK return code: the client is not told which part was wrong.
    pub(crate) fn code(self) -> v4::ConnectReturnCode {
        match self {
            Self::Anonymous => v4::ConnectReturnCode::NotAuthorized,
            Self::UnknownUser | Self::WrongPassword => v4::ConnectReturnCode::BadUserNamePassword,
        }
    }
}

/// Refusals and denials since start, for `/healthz`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) refused_connections: AtomicU64,
    pub(crate) denied_publishes: AtomicU64,
    pub(crate) denied_subscriptions: AtomicU64,
    pub(crate) throttled: AtomicU64,
}

impl Counters {
    pub(crate) fn count(counter: &AtomicU64) -> u64 {
        counter.fetch_add(1, Ordering::Relaxed) + 1
    }
}

#[derive(Debug)]
pub(crate) struct Auth {
    passwords: Option<Arc<PasswordFile>>,
    allow_anonymous: bool,
    acl: Acl,
    /// Argon2 checks at once: each takes tens of milliseconds of a core, and
    /// a flood of logins must not take every core from the devices.
    checks: Semaphore,
    /// (second, refusals stored as events in it).
    recorded: std::sync::Mutex<(u64, u32)>,
    pub(crate) counters: Counters,
}

/// Failed logins stored as events per second at most.
const REFUSALS_RECORDED_PER_SECOND: u32 = 10;

impl Auth {
    pub(crate) fn new(config: &AuthConfig) -> Result<Self, PasswordFileError> {
        let passwords = config
            .password_file
            .as_deref()
            .map(PasswordFile::load)
            .transpose()?
            .map(Arc::new);
        Ok(Self {
            passwords,
            allow_anonymous: config.allow_anonymous,
            acl: Acl::new(config.acl.clone()),
            checks: Semaphore::new(2),
            recorded: std::sync::Mutex::new((0, 0)),
            counters: Counters::default(),
        })
    }

    /// Users in the password file.
    pub(crate) fn users(&self) -> usize {
        self.passwords.as_ref().map_or(0, |p| p.len())
    }

    /// Keeps the password file current until `shutdown`.
    pub(crate) fn watch(
        &self,
        shutdown: CancellationToken,
    ) -> Option<impl std::future::Future<Output = ()>> {
        self.passwords
            .as_ref()
            .map(|passwords| Arc::clone(passwords).watch(shutdown))
    }

    /// Whether a refused login may be stored as an event now: at most
    /// [`REFUSALS_RECORDED_PER_SECOND`], so that a flood of bad logins fills
    /// counters, not the event stream.
    pub(crate) fn may_record_refusal(&self) -> bool {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut window = self
            .recorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if window.0 != second {
            *window = (second, 0);
        }
        window.1 += 1;
        window.1 <= REFUSALS_RECORDED_PER_SECOND
    }

    pub(crate) fn acl(&self) -> &Acl {
        &self.acl
    }

    /// Lets a client in or not; its username for the rules when it has a
    /// checked one. `certified` is the username a verified client
    /// certificate gave (mutual TLS): no password is asked then.
    pub(crate) async fn login(
        &self,
        login: Option<&v4::Login>,
        certified: Option<String>,
    ) -> Result<Option<String>, Refusal> {
        if certified.is_some() {
            return Ok(certified);
        }
        let Some(passwords) = &self.passwords else {
            return if self.allow_anonymous {
                Ok(None)
            } else {
                Err(Refusal::Anonymous)
            };
        };
        let Some(login) = login.filter(|login| !login.username.is_empty()) else {
            return if self.allow_anonymous {
                Ok(None)
            } else {
                Err(Refusal::Anonymous)
            };
        };
        let _permit = self
            .checks
            .acquire()
            .await
            .map_err(|_| Refusal::WrongPassword)?;
        let passwords = Arc::clone(passwords);
        let (username, password) = (login.username.clone(), login.password.clone());
        let checked =
            tokio::task::spawn_blocking(move || passwords.check(&username, password.as_bytes()))
                .await
                .unwrap_or(Checked::WrongPassword);
        match checked {
            Checked::Valid => Ok(Some(login.username.clone())),
            Checked::UnknownUser => Err(Refusal::UnknownUser),
            Checked::WrongPassword => Err(Refusal::WrongPassword),
        }
    }
}

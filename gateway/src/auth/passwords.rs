//! The password file: one `username:hash` line per client, the hash an
//! Argon2id PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`), never the
//! password. `#` starts a comment. `hearth-gateway passwd` writes it; the
//! gateway reads it again whenever it changes, without a restart.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::{Duration, SystemTime};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How often the file is looked at for changes.
const RELOAD_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("cannot read the password file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write the password file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("password file {path}, line {line}: {problem}")]
    Invalid {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("a username cannot be empty or contain `:` or a line break")]
    BadUsername,
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// The users of a password file, kept current.
#[derive(Debug)]
pub(crate) struct PasswordFile {
    path: PathBuf,
    users: RwLock<HashMap<String, String>>,
    modified: RwLock<Option<SystemTime>>,
}

/// What checking a password came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checked {
    Valid,
    UnknownUser,
    WrongPassword,
}

impl PasswordFile {
    pub(crate) fn load(path: &Path) -> Result<Self, PasswordFileError> {
        let (users, modified) = read(path)?;
        Ok(Self {
            path: path.to_owned(),
            users: RwLock::new(users),
            modified: RwLock::new(modified),
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.users.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Checks `password` for `username`. Argon2 is slow on purpose (tens of
    /// milliseconds): call it off the async threads.
    pub(crate) fn check(&self, username: &str, password: &[u8]) -> Checked {
        let hash = self
            .users
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(username)
            .cloned();
        let Some(hash) = hash else {
            return Checked::UnknownUser;
        };
        match PasswordHash::new(&hash) {
            Ok(parsed) if Argon2::default().verify_password(password, &parsed).is_ok() => {
                Checked::Valid
            }
            _ => Checked::WrongPassword,
        }
    }

    /// Reads the file again when it changed, until `shutdown`. A file that
    /// turned invalid keeps the users read before, with a warning.
    pub(crate) async fn watch(self: std::sync::Arc<Self>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(RELOAD_EVERY) => {}
            }
            let modified = std::fs::metadata(&self.path)
                .and_then(|m| m.modified())
                .ok();
            if modified == *self.modified.read().unwrap_or_else(|p| p.into_inner()) {
                continue;
            }
            match read(&self.path) {
                Ok((users, modified)) => {
                    info!(path = %self.path.display(), users = users.len(), "password file reloaded");
                    *self.users.write().unwrap_or_else(|p| p.into_inner()) = users;
                    *self.modified.write().unwrap_or_else(|p| p.into_inner()) = modified;
                }
                Err(error) => {
                    warn!(%error, "password file not reloaded; the users read before still apply");
                    *self.modified.write().unwrap_or_else(|p| p.into_inner()) = modified;
                }
            }
        }
    }
}

fn read(path: &Path) -> Result<(HashMap<String, String>, Option<SystemTime>), PasswordFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| PasswordFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    Ok((parse(path, &text)?, modified))
}

fn parse(path: &Path, text: &str) -> Result<HashMap<String, String>, PasswordFileError> {
    let mut users = HashMap::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let invalid = |problem: &str| PasswordFileError::Invalid {
            path: path.to_owned(),
            line: number + 1,
            problem: problem.to_owned(),
        };
        let (user, hash) = line
            .split_once(':')
            .ok_or_else(|| invalid("expected `username:hash`"))?;
        if user.is_empty() {
            return Err(invalid("empty username"));
        }
        PasswordHash::new(hash).map_err(|_| {
            invalid("the hash is not a PHC string (write entries with `hearth-gateway passwd`)")
        })?;
        users.insert(user.to_owned(), hash.to_owned());
    }
    Ok(users)
}

/// The Argon2id hash of `password`, with a random salt.
pub fn hash_password(password: &[u8]) -> Result<String, PasswordFileError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|hash| hash.to_string())
        .map_err(|e| PasswordFileError::Hash(e.to_string()))
}

/// Sets (or with `None`, removes) `username`'s entry in the file at `path`,
/// creating it if needed; other lines, comments included, stay as they are.
/// Written to a temporary file and renamed, so a gateway reading it never
/// sees half a file. Returns whether the user existed.
pub fn set_password(
    path: &Path,
    username: &str,
    password: Option<&[u8]>,
) -> Result<bool, PasswordFileError> {
    if username.is_empty() || username.contains([':', '\n', '\r']) {
        return Err(PasswordFileError::BadUsername);
    }
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(PasswordFileError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    parse(path, &text)?;
    let entry = password.map(hash_password).transpose()?;
    let mut existed = false;
    let mut lines: Vec<String> = Vec::new();
    for line in text.lines() {
        if line.trim().split_once(':').map(|(user, _)| user) == Some(username) {
            existed = true;
            if let Some(hash) = &entry {
                lines.push(format!("{username}:{hash}"));
            }
        } else {
            lines.push(line.to_owned());
        }
    }
    if let (false, Some(hash)) = (existed, &entry) {
        lines.push(format!("{username}:{hash}"));
    }
    let write = |source| PasswordFileError::Write {
        path: path.to_owned(),
        source,
    };
    let temporary = path.with_extension("tmp");
    let mut contents = lines.join("\n");
    contents.push('\n');
    std::fs::write(&temporary, contents).map_err(write)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))
            .map_err(write)?;
    }
    std::fs::rename(&temporary, path).map_err(write)?;
    Ok(existed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_checked_against_their_hashes_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        assert!(!set_password(&path, "lamp", Some(b"s3cret")).unwrap());
        assert!(!set_password(&path, "pir", Some(b"other")).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("s3cret"), "only hashes are written: {text}");
        assert!(text.contains("lamp:$argon2id$"), "{text}");

        let file = PasswordFile::load(&path).unwrap();
        assert_eq!(file.len(), 2);
        assert_eq!(file.check("lamp", b"s3cret"), Checked::Valid);
        assert_eq!(file.check("lamp", b"other"), Checked::WrongPassword);
        assert_eq!(file.check("ghost", b"s3cret"), Checked::UnknownUser);

        assert!(
            set_password(&path, "lamp", Some(b"new")).unwrap(),
            "replaced"
        );
        assert!(set_password(&path, "pir", None).unwrap(), "removed");
        let file = PasswordFile::load(&path).unwrap();
        assert_eq!(file.len(), 1);
        assert_eq!(file.check("lamp", b"new"), Checked::Valid);
    }

    #[test]
    fn comments_stay_and_bad_lines_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        std::fs::write(&path, "# hearth devices\n\n").unwrap();
        set_password(&path, "a", Some(b"x")).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .starts_with("# hearth devices\n"));

        std::fs::write(&path, "# ok\nlamp:plaintext\n").unwrap();
        let error = PasswordFile::load(&path).unwrap_err().to_string();
        assert!(error.contains("line 2") && error.contains("PHC"), "{error}");
        std::fs::write(&path, "no-colon\n").unwrap();
        assert!(PasswordFile::load(&path)
            .unwrap_err()
            .to_string()
            .contains("username:hash"));
        assert!(matches!(
            set_password(&path, "a:b", Some(b"x")),
            Err(PasswordFileError::BadUsername)
        ));
    }
}

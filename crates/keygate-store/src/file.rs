//! Keys and projects in a TOML file, reloadable while serving.
//!
//! The file holds digests only, never secrets:
//!
//! ```toml
//! version = 1
//!
//! [[projects]]
//! id = "default"
//!
//! [[keys]]
//! id = "key_0123456789abcdef"
//! project = "default"
//! digest = "…64 hex digits…"
//! permissions = "read_only"
//! created_at = "2026-01-01T00:00:00Z"
//! ```
//!
//! [`FileStore`] serves the file through a [`MemoryStore`] (lock-free lookups) and swaps in a
//! new snapshot when the file changes. A file that fails to read, parse or validate never
//! replaces what is serving: the previous keys keep working and the error is returned and
//! kept for [`FileStore::last_error`].

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use keygate_core::{
    KeyDigest, KeyRecord, KeyStore, Lookup, ProjectRecord, Snapshot, SnapshotError, StoreError,
};

use crate::memory::MemoryStore;

/// The key file format version this crate reads and writes.
pub const KEY_FILE_VERSION: u32 = 1;

fn default_version() -> u32 {
    KEY_FILE_VERSION
}

/// The contents of a key file: projects and keys (digests only, never secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyFile {
    /// Format version; [`KEY_FILE_VERSION`] when absent.
    #[serde(default = "default_version")]
    pub version: u32,
    /// The projects (`[[projects]]`).
    #[serde(default)]
    pub projects: Vec<ProjectRecord>,
    /// The keys (`[[keys]]`).
    #[serde(default)]
    pub keys: Vec<KeyRecord>,
}

impl Default for KeyFile {
    fn default() -> Self {
        KeyFile {
            version: KEY_FILE_VERSION,
            projects: Vec::new(),
            keys: Vec::new(),
        }
    }
}

impl KeyFile {
    /// Reads and parses the file at `path` (without validating the records against each
    /// other: see [`KeyFile::to_snapshot`]).
    ///
    /// # Errors
    ///
    /// [`FileStoreError::Io`] when the file cannot be read, [`FileStoreError::Parse`] when it
    /// is not a key file, [`FileStoreError::Version`] for a version this crate cannot read.
    pub fn load(path: impl AsRef<Path>) -> Result<Self, FileStoreError> {
        let path = path.as_ref();
        let bytes = fs::read(path).map_err(|e| FileStoreError::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses key file text; `path` only names the file in errors.
    ///
    /// # Errors
    ///
    /// As [`KeyFile::load`], minus I/O.
    pub fn parse(path: impl AsRef<Path>, text: &str) -> Result<Self, FileStoreError> {
        let path = path.as_ref();
        let file: KeyFile = toml::from_str(text).map_err(|e| {
            // The message and position only: toml's full rendering quotes the offending line.
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            FileStoreError::Parse {
                path: path.to_path_buf(),
                line,
                message: redact_long_literals(e.message().trim_end()),
            }
        })?;
        if file.version != KEY_FILE_VERSION {
            return Err(FileStoreError::Version {
                path: path.to_path_buf(),
                found: file.version,
            });
        }
        Ok(file)
    }

    fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, FileStoreError> {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Err(FileStoreError::Empty {
                path: path.to_path_buf(),
            });
        }
        let text = std::str::from_utf8(bytes).map_err(|e| FileStoreError::Parse {
            path: path.to_path_buf(),
            line: Some(
                bytes[..e.valid_up_to()]
                    .iter()
                    .filter(|&&b| b == b'\n')
                    .count()
                    + 1,
            ),
            message: "the file is not UTF-8".to_owned(),
        })?;
        Self::parse(path, text)
    }

    /// The file as TOML text.
    ///
    /// # Errors
    ///
    /// [`FileStoreError::Serialize`] if a record cannot be written as TOML.
    pub fn to_toml(&self) -> Result<String, FileStoreError> {
        toml::to_string(self).map_err(|e| FileStoreError::Serialize {
            message: e.to_string(),
        })
    }

    /// Validates the records and indexes them for lookup.
    ///
    /// # Errors
    ///
    /// [`FileStoreError::Invalid`] with the [`SnapshotError`] (invalid record, duplicate id or
    /// digest, unknown project); `path` only names the file in it.
    pub fn to_snapshot(&self, path: impl AsRef<Path>) -> Result<Snapshot, FileStoreError> {
        Snapshot::new(self.projects.iter().cloned(), self.keys.iter().cloned()).map_err(|e| {
            FileStoreError::Invalid {
                path: path.as_ref().to_path_buf(),
                source: e,
            }
        })
    }

    /// Writes the file so that readers see either the old or the new contents, never a mix:
    /// the text goes to a temporary file in the same directory, is flushed to disk, and is
    /// renamed over `path`. On unix the file is made readable by its owner only (0600).
    ///
    /// # Errors
    ///
    /// [`FileStoreError::Serialize`] or [`FileStoreError::Io`]; on error the temporary file
    /// is removed and `path` is untouched.
    pub fn save_atomic(&self, path: impl AsRef<Path>) -> Result<(), FileStoreError> {
        let path = path.as_ref();
        let text = self.to_toml()?;
        write_atomic(path, text.as_bytes()).map_err(|e| FileStoreError::io(path, e))
    }
}

/// Elides quoted or backticked literals longer than any field or variant name: serde messages
/// echo the offending value (`invalid type: string "…"`), and a secret pasted into the file by
/// mistake must not reach logs through them.
fn redact_long_literals(message: &str) -> String {
    const MAX: usize = 24;
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['"', '`']) {
        let quote = rest[open..].chars().next().unwrap_or('"');
        out.push_str(&rest[..=open]);
        let after = &rest[open + 1..];
        match after.find(quote) {
            Some(close) if after[..close].chars().count() > MAX => {
                out.push('…');
                out.push(quote);
                rest = &after[close + 1..];
            }
            Some(close) => {
                out.push_str(&after[..=close]);
                rest = &after[close + 1..];
            }
            None => {
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn write_atomic(path: &Path, contents: &[u8]) -> io::Result<()> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not a file path"))?;
    let tmp = dir.join(format!(
        ".{}.tmp.{}.{}",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let result = (|| {
        let mut file = options.open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
        return result;
    }
    // Make the rename itself durable; best effort (not every platform can open a directory).
    #[cfg(unix)]
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Why a key file could not be loaded or saved. Never carries a secret (the file holds none)
/// nor quotes the file's lines.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum FileStoreError {
    /// The file could not be read or written.
    #[error("key file {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: Arc<io::Error>,
    },
    /// The file is not valid TOML or not shaped like a key file.
    #[error("key file {}{}: {message}", path.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line at fault, when known.
        line: Option<usize>,
        /// What is wrong.
        message: String,
    },
    /// The file's `version` is not one this crate reads.
    #[error("key file {}: unsupported version {found} (expected {KEY_FILE_VERSION})", path.display())]
    Version {
        /// The file.
        path: PathBuf,
        /// The version found.
        found: u32,
    },
    /// The records parse but do not form a valid set.
    #[error("key file {}: {source}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: SnapshotError,
    },
    /// The file is empty (or only white space): a file cut short or never written, not a
    /// deliberate "no keys" (a key file written by keygate always holds at least its
    /// `version`). Refused, so an accident never locks every key out.
    #[error("key file {}: the file is empty", path.display())]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// The records could not be written as TOML.
    #[error("cannot write key file: {message}")]
    Serialize {
        /// What went wrong.
        message: String,
    },
}

impl FileStoreError {
    fn io(path: &Path, e: io::Error) -> Self {
        FileStoreError::Io {
            path: path.to_path_buf(),
            source: Arc::new(e),
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReloadOutcome {
    /// A new snapshot is serving.
    Reloaded {
        /// Keys in it.
        keys: usize,
        /// Projects in it.
        projects: usize,
    },
    /// The file's contents are those already serving; nothing was swapped.
    Unchanged,
}

/// What identifies a version of the file cheaply: checked on every poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fingerprint {
    Missing,
    Present {
        len: u64,
        modified: Option<SystemTime>,
        inode: u64,
    },
}

impl Fingerprint {
    fn of(path: &Path) -> Self {
        match fs::metadata(path) {
            Ok(m) => {
                #[cfg(unix)]
                let inode = std::os::unix::fs::MetadataExt::ino(&m);
                #[cfg(not(unix))]
                let inode = 0;
                Fingerprint::Present {
                    len: m.len(),
                    modified: m.modified().ok(),
                    inode,
                }
            }
            Err(_) => Fingerprint::Missing,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// The fingerprint seen at the last load attempt.
    seen: Option<Fingerprint>,
    /// SHA-256 of the contents serving now.
    serving: Option<[u8; 32]>,
    last_error: Option<FileStoreError>,
}

struct Inner {
    path: PathBuf,
    store: MemoryStore,
    state: Mutex<State>,
}

/// Keys and projects from a [`KeyFile`], served from memory and reloadable while serving.
///
/// Lookups go to a [`MemoryStore`] (lock-free); [`FileStore::reload`] reads the file again and
/// swaps in the new snapshot for the next lookup. A file that fails to read, parse or validate
/// keeps the previous snapshot serving: the error is returned and kept for
/// [`FileStore::last_error`] until a load succeeds.
///
/// Two ways to pick up changes:
///
/// - [`FileStore::watch`] polls the file's size, modification time and inode (and its content
///   hash when those change) and reloads on change;
/// - or call [`FileStore::reload`] yourself, for instance from a SIGHUP handler
///   (`tokio::signal::unix::signal(SignalKind::hangup())`), or after an admin edit.
///
/// Clones share the same keys.
///
/// ```
/// use keygate_core::{KeyDigest, KeyId, KeyRecord, Permissions, ProjectRecord, Timestamp};
/// use keygate_store::{FileStore, KeyFile};
///
/// let dir = std::env::temp_dir().join(format!("keygate-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let path = dir.join("keys.toml");
///
/// let mut file = KeyFile::default();
/// file.projects.push(ProjectRecord::new("default"));
/// let mut key = KeyRecord::new(KeyId::new("key_a"), "default", KeyDigest::of("secret"), Timestamp::UNIX_EPOCH);
/// key.permissions = Permissions::All;
/// file.keys.push(key);
/// file.save_atomic(&path)?;
///
/// let store = FileStore::open(&path)?;
/// assert!(store.store().get(&KeyDigest::of("secret")).is_some());
/// # std::fs::remove_dir_all(&dir)?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone)]
pub struct FileStore {
    inner: Arc<Inner>,
}

impl fmt::Debug for FileStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileStore")
            .field("path", &self.inner.path)
            .field("keys", &self.inner.store.snapshot().len())
            .finish_non_exhaustive()
    }
}

impl FileStore {
    /// Loads the file at `path` and serves it.
    ///
    /// # Errors
    ///
    /// Any [`FileStoreError`]: with no previous snapshot to keep, a bad file is an error.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, FileStoreError> {
        let path = path.as_ref().to_path_buf();
        let seen = Fingerprint::of(&path);
        let bytes = fs::read(&path).map_err(|e| FileStoreError::io(&path, e))?;
        let snapshot = KeyFile::from_bytes(&path, &bytes)?.to_snapshot(&path)?;
        let state = State {
            seen: Some(seen),
            serving: Some(Sha256::digest(&bytes).into()),
            last_error: None,
        };
        Ok(FileStore {
            inner: Arc::new(Inner {
                path,
                store: MemoryStore::new(snapshot),
                state: Mutex::new(state),
            }),
        })
    }

    /// The file this store serves.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The in-memory store serving the keys (shares them: it sees every reload).
    pub fn store(&self) -> MemoryStore {
        self.inner.store.clone()
    }

    /// The error of the last load attempt, if it failed; `None` once a load succeeds.
    pub fn last_error(&self) -> Option<FileStoreError> {
        self.state().last_error.clone()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state is only a cache of what the file was; a panic elsewhere cannot corrupt it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Reads the file again and serves it from the next lookup on.
    ///
    /// Blocking file I/O and parsing: from async code with a large file, call it through
    /// `tokio::task::spawn_blocking`.
    ///
    /// # Errors
    ///
    /// When the file fails to read, parse or validate: the previous snapshot keeps serving,
    /// and the error is also kept for [`FileStore::last_error`].
    pub fn reload(&self) -> Result<ReloadOutcome, FileStoreError> {
        let mut state = self.state();
        self.reload_locked(&mut state)
    }

    fn reload_locked(&self, state: &mut State) -> Result<ReloadOutcome, FileStoreError> {
        let path = &self.inner.path;
        state.seen = Some(Fingerprint::of(path));
        let result = fs::read(path)
            .map_err(|e| FileStoreError::io(path, e))
            .and_then(|bytes| {
                let hash: [u8; 32] = Sha256::digest(&bytes).into();
                if state.serving == Some(hash) {
                    return Ok(ReloadOutcome::Unchanged);
                }
                let snapshot = KeyFile::from_bytes(path, &bytes)?.to_snapshot(path)?;
                let outcome = ReloadOutcome::Reloaded {
                    keys: snapshot.len(),
                    projects: snapshot.projects().count(),
                };
                self.inner.store.replace(snapshot);
                state.serving = Some(hash);
                Ok(outcome)
            });
        state.last_error = result.as_ref().err().cloned();
        result
    }

    /// Reloads if the file's size, modification time or inode changed since the last load
    /// attempt; what [`FileStore::watch`] does on each tick.
    ///
    /// # Errors
    ///
    /// As [`FileStore::reload`]. A broken file is reported once, not on every poll, until it
    /// changes again.
    pub fn poll_once(&self) -> Result<ReloadOutcome, FileStoreError> {
        let mut state = self.state();
        if state.seen == Some(Fingerprint::of(&self.inner.path)) {
            return Ok(ReloadOutcome::Unchanged);
        }
        self.reload_locked(&mut state)
    }

    /// Polls the file every `interval` on the current tokio runtime and reloads it when it
    /// changes (see [`FileStore::poll_once`]). Successful reloads are logged at `info`, failed
    /// ones at `error` with the reason (the previous keys keep serving). Abort the returned
    /// handle to stop watching.
    ///
    /// # Panics
    ///
    /// Outside a tokio runtime, or if `interval` is zero.
    pub fn watch(&self, interval: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            ticks.tick().await; // the first tick is immediate; the file was just loaded
            loop {
                ticks.tick().await;
                let poller = this.clone();
                let result = tokio::task::spawn_blocking(move || poller.poll_once()).await;
                match result {
                    Ok(Ok(ReloadOutcome::Reloaded { keys, projects })) => tracing::info!(
                        path = %this.inner.path.display(),
                        keys,
                        projects,
                        "key file reloaded"
                    ),
                    Ok(Ok(ReloadOutcome::Unchanged)) => {}
                    Ok(Err(error)) => tracing::error!(
                        %error,
                        "key file reload failed; the previous keys stay in use"
                    ),
                    Err(join) => {
                        tracing::error!(error = %join, "key file reload task failed");
                    }
                }
            }
        })
    }
}

impl KeyStore for FileStore {
    fn lookup(
        &self,
        digest: &KeyDigest,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        self.inner.store.lookup(digest)
    }

    fn lookup_id(
        &self,
        id: &str,
    ) -> impl Future<Output = Result<Option<Lookup>, StoreError>> + Send {
        self.inner.store.lookup_id(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keygate_core::{KeyId, Permissions, Timestamp};

    fn key(id: &str, project: &str, secret: &str) -> KeyRecord {
        let mut k = KeyRecord::new(
            KeyId::new(id),
            project,
            KeyDigest::of(secret),
            Timestamp::from_unix_secs(1_000),
        );
        k.permissions = Permissions::All;
        k
    }

    fn file(keys: Vec<KeyRecord>) -> KeyFile {
        KeyFile {
            version: KEY_FILE_VERSION,
            projects: vec![ProjectRecord::new("p")],
            keys,
        }
    }

    fn setup(keys: Vec<KeyRecord>) -> (tempfile::TempDir, PathBuf, FileStore) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        file(keys).save_atomic(&path).unwrap();
        let store = FileStore::open(&path).unwrap();
        (dir, path, store)
    }

    async fn found(store: &FileStore, secret: &str) -> bool {
        store
            .lookup(&KeyDigest::of(secret))
            .await
            .unwrap()
            .is_some()
    }

    #[test]
    fn key_file_round_trips_through_toml() {
        let mut k = key("key_a", "p", "a");
        k.permissions =
            Permissions::Restricted([("models".to_owned(), keygate_core::Access::Read)].into());
        k.limits.budgets.push(keygate_core::Budget {
            amount: keygate_core::Money::from_dollars(5),
            period: keygate_core::Period::Month,
            model: None,
        });
        k.previous = Some(keygate_core::PreviousSecret {
            digest: KeyDigest::of("old"),
            valid_until: Timestamp::from_unix_secs(5_000),
        });
        let f = file(vec![k, key("key_b", "p", "b")]);
        let text = f.to_toml().unwrap();
        assert!(text.contains("[[keys]]") && text.contains("[[projects]]"));
        assert_eq!(KeyFile::parse("x", &text).unwrap(), f);
    }

    #[test]
    fn missing_version_means_version_one_and_other_versions_are_refused() {
        let f = KeyFile::parse("x", "[[projects]]\nid = \"p\"\n").unwrap();
        assert_eq!(f.version, 1);
        assert!(matches!(
            KeyFile::parse("x", "version = 2\n"),
            Err(FileStoreError::Version { found: 2, .. })
        ));
    }

    #[test]
    fn parse_errors_name_the_line_but_do_not_quote_it() {
        let text = "version = 1\n[[keys]]\nid = \"key_a\"\nsecretish = \"sk-kg-quoted\"\n";
        let err = KeyFile::parse("keys.toml", text).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, FileStoreError::Parse { .. }), "{msg}");
        assert!(!msg.contains("sk-kg-quoted"), "{msg}");
    }

    #[test]
    fn parse_errors_do_not_echo_a_pasted_secret() {
        let secret = keygate_core::KeyFormat::default().generate().unwrap();
        for text in [
            format!("version = \"{}\"\n", secret.expose()),
            format!(
                "[[keys]]\nid = \"k\"\nproject = \"p\"\ndigest = \"{}\"\ncreated_at = \"2026-01-01T00:00:00Z\"\n",
                secret.expose()
            ),
            format!(
                "[[keys]]\nid = \"k\"\npermissions = \"{}\"\n",
                secret.expose()
            ),
            format!(
                "[[projects]]\nid = \"p\"\nname = 1\ndisabled = \"{}\"\n",
                secret.expose()
            ),
        ] {
            let msg = KeyFile::parse("keys.toml", &text).unwrap_err().to_string();
            assert!(!msg.contains(&secret.expose()[6..20]), "{msg}");
        }
        assert_eq!(
            redact_long_literals("unknown field `abc`, expected \"0123456789012345678901234567\""),
            "unknown field `abc`, expected \"…\""
        );
    }

    #[tokio::test]
    async fn reloaded_file_takes_effect_for_the_next_lookup() {
        let (_dir, path, store) = setup(vec![key("key_a", "p", "a")]);
        assert!(found(&store, "a").await);
        file(vec![key("key_b", "p", "b")])
            .save_atomic(&path)
            .unwrap();
        assert_eq!(
            store.reload().unwrap(),
            ReloadOutcome::Reloaded {
                keys: 1,
                projects: 1
            }
        );
        assert!(!found(&store, "a").await);
        assert!(found(&store, "b").await);
        assert!(store.last_error().is_none());
    }

    #[test]
    fn reloading_identical_contents_is_unchanged() {
        let (_dir, _path, store) = setup(vec![key("key_a", "p", "a")]);
        assert_eq!(store.reload().unwrap(), ReloadOutcome::Unchanged);
    }

    async fn broken_file_keeps_old_keys(text: &str, check: fn(&FileStoreError) -> bool) {
        let (_dir, path, store) = setup(vec![key("key_a", "p", "a")]);
        fs::write(&path, text).unwrap();
        let err = store.reload().unwrap_err();
        assert!(check(&err), "{err}");
        assert!(found(&store, "a").await, "the old key stops working");
        assert!(store.last_error().is_some_and(|e| check(&e)));
        // Fixing the file clears the error.
        file(vec![key("key_a", "p", "a"), key("key_c", "p", "c")])
            .save_atomic(&path)
            .unwrap();
        store.reload().unwrap();
        assert!(store.last_error().is_none());
        assert!(found(&store, "c").await);
    }

    #[tokio::test]
    async fn bad_toml_leaves_the_old_keys_working() {
        broken_file_keeps_old_keys("[[keys]\nid = ", |e| {
            matches!(e, FileStoreError::Parse { .. })
        })
        .await;
    }

    #[tokio::test]
    async fn unknown_project_leaves_the_old_keys_working() {
        let text = file(vec![key("key_a", "nope", "a")]).to_toml().unwrap();
        broken_file_keeps_old_keys(&text, |e| {
            matches!(
                e,
                FileStoreError::Invalid {
                    source: SnapshotError::UnknownProject { .. },
                    ..
                }
            )
        })
        .await;
    }

    #[tokio::test]
    async fn duplicate_digest_leaves_the_old_keys_working() {
        let text = file(vec![key("key_x", "p", "x"), key("key_y", "p", "x")])
            .to_toml()
            .unwrap();
        broken_file_keeps_old_keys(&text, |e| {
            matches!(
                e,
                FileStoreError::Invalid {
                    source: SnapshotError::DuplicateDigest(_),
                    ..
                }
            )
        })
        .await;
    }

    #[tokio::test]
    async fn an_emptied_file_leaves_the_old_keys_working() {
        for text in ["", "\n  \n"] {
            broken_file_keeps_old_keys(text, |e| matches!(e, FileStoreError::Empty { .. })).await;
        }
    }

    #[tokio::test]
    async fn a_truncated_file_leaves_the_old_keys_working() {
        let full = file(vec![key("key_a", "p", "a"), key("key_b", "p", "b")])
            .to_toml()
            .unwrap();
        // Cut in the middle of a value, as an interrupted copy would.
        let cut = &full[..full.len() - 20];
        broken_file_keeps_old_keys(cut, |e| matches!(e, FileStoreError::Parse { .. })).await;
    }

    #[test]
    fn open_refuses_an_empty_file_but_takes_a_file_with_no_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        fs::write(&path, "").unwrap();
        let e = FileStore::open(&path).unwrap_err();
        assert!(matches!(e, FileStoreError::Empty { .. }));
        assert!(e.to_string().contains("empty"), "{e}");
        KeyFile::default().save_atomic(&path).unwrap();
        assert_eq!(FileStore::open(&path).unwrap().store().snapshot().len(), 0);
    }

    #[tokio::test]
    async fn missing_file_leaves_the_old_keys_working() {
        let (_dir, path, store) = setup(vec![key("key_a", "p", "a")]);
        fs::remove_file(&path).unwrap();
        assert!(matches!(store.poll_once(), Err(FileStoreError::Io { .. })));
        assert!(found(&store, "a").await);
    }

    #[test]
    fn open_refuses_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        fs::write(&path, "version = \"one\"").unwrap();
        assert!(matches!(
            FileStore::open(&path),
            Err(FileStoreError::Parse { .. })
        ));
        assert!(matches!(
            FileStore::open(dir.path().join("absent.toml")),
            Err(FileStoreError::Io { .. })
        ));
    }

    #[test]
    fn atomic_save_leaves_no_temp_file_and_replaces_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.toml");
        fs::write(&path, "old").unwrap();
        file(vec![key("key_a", "p", "a")])
            .save_atomic(&path)
            .unwrap();
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("keys.toml")]);
        assert_eq!(KeyFile::load(&path).unwrap().keys.len(), 1);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn failed_atomic_save_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: the rename fails.
        let path = dir.path().join("keys.toml");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), "x").unwrap();
        assert!(file(vec![]).save_atomic(&path).is_err());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn poll_once_reloads_only_when_the_file_changes() {
        let (_dir, path, store) = setup(vec![key("key_a", "p", "a")]);
        assert_eq!(store.poll_once().unwrap(), ReloadOutcome::Unchanged);
        file(vec![key("key_a", "p", "a"), key("key_b", "p", "b")])
            .save_atomic(&path)
            .unwrap();
        assert!(matches!(
            store.poll_once().unwrap(),
            ReloadOutcome::Reloaded { keys: 2, .. }
        ));
        assert_eq!(store.poll_once().unwrap(), ReloadOutcome::Unchanged);
    }

    #[test]
    fn poll_once_reports_a_broken_file_once() {
        let (_dir, path, store) = setup(vec![key("key_a", "p", "a")]);
        fs::write(&path, "not toml [").unwrap();
        assert!(store.poll_once().is_err());
        assert_eq!(store.poll_once().unwrap(), ReloadOutcome::Unchanged);
        assert!(store.last_error().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn watch_reloads_a_changed_file() {
        let (_dir, path, store) = setup(vec![key("key_a", "p", "a")]);
        let interval = Duration::from_secs(5);
        let handle = store.watch(interval);
        file(vec![key("key_b", "p", "b")])
            .save_atomic(&path)
            .unwrap();
        // Paused time: each sleep advances the clock by one interval without waiting.
        let mut seen = false;
        for _ in 0..100 {
            tokio::time::sleep(interval).await;
            if found(&store, "b").await {
                seen = true;
                break;
            }
        }
        handle.abort();
        assert!(seen, "the watcher never reloaded the file");
        assert!(!found(&store, "a").await);
    }
}

//! Capability grants: the authority a task has beyond computing on its input. A [`Grants`] is
//! what a manifest (or [`TaskDef::grants`](crate::flow::TaskDef)) asks for: outbound HTTP
//! ([`HttpGrant`] patterns, `http.rs`), directories to preopen (read-only or read-write), plain
//! environment variables, and secrets by name. Nothing
//! is granted by default. This module owns the plain type, its canonical text (what `sluice
//! show` lists and the cache key hashes), the "may only narrow" rule between a flow's grants and
//! a task's, where secret values come from ([`SecretSource`]), and resolving a task's grants
//! into the sandbox's [`RunGrants`] for its runs.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

use crate::sandbox::{RunGrants, Sandbox};

mod http;
mod tcp;

pub use self::http::{HostPattern, HttpGrant};
pub use self::tcp::{TcpGrant, TcpHost};

/// How a granted directory may be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileMode {
    /// Read only: opening for writing, creating, renaming or removing fails in the guest.
    Ro,
    /// Read and write.
    Rw,
}

impl FileMode {
    /// `ro` or `rw`, as written in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            FileMode::Ro => "ro",
            FileMode::Rw => "rw",
        }
    }
}

/// A host directory the guest sees at `guest`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct FileGrant {
    /// The host directory: absolute and lexically normalized (manifests resolve it against
    /// their own directory).
    pub host: PathBuf,
    /// Where the guest finds it: an absolute guest path such as `/in`.
    pub guest: String,
    /// Read only or read-write.
    pub mode: FileMode,
}

impl fmt::Display for FileGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} at {} ({})",
            self.host.display(),
            self.guest,
            self.mode.as_str()
        )
    }
}

/// What a task may reach besides its input. The default grants nothing: no files, no
/// environment variables, no secrets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Grants {
    /// Outbound HTTP: a request must be allowed by one of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpGrant>,
    /// Outbound TCP: a connection must be allowed by one of these.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpGrant>,
    /// Preopened directories.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileGrant>,
    /// Plain environment variables.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Secrets by name: their values come from the host's [`SecretSource`] and reach the guest
    /// as environment variables of the same name. Never a value here.
    #[serde(skip_serializing_if = "BTreeSet::is_empty")]
    pub secrets: BTreeSet<String>,
}

impl Grants {
    /// Whether nothing is granted.
    pub fn is_empty(&self) -> bool {
        self.http.is_empty()
            && self.tcp.is_empty()
            && self.files.is_empty()
            && self.env.is_empty()
            && self.secrets.is_empty()
    }

    /// One line per grant, in a fixed order (HTTP patterns sorted, files by guest path, env and
    /// secrets by name): what `sluice show` lists and the cache key hashes. Secrets appear by
    /// name only.
    pub fn lines(&self) -> Vec<String> {
        let mut http: Vec<String> = self.http.iter().map(|h| format!("http: {h}")).collect();
        http.sort();
        http.dedup();
        let mut files: Vec<&FileGrant> = self.files.iter().collect();
        files.sort_by(|a, b| (&a.guest, &a.host, a.mode).cmp(&(&b.guest, &b.host, b.mode)));
        let mut tcp: Vec<String> = self.tcp.iter().map(|t| format!("tcp: {t}")).collect();
        tcp.sort();
        tcp.dedup();
        let mut lines = http;
        lines.extend(tcp);
        lines.extend(files.iter().map(|f| format!("files: {f}")));
        lines.extend(self.env.iter().map(|(k, v)| format!("env: {k}={v}")));
        lines.extend(self.secrets.iter().map(|s| format!("secret: {s}")));
        lines
    }

    /// The hash of [`lines`](Self::lines) that cache keys include: empty when nothing is
    /// granted (so the keys of tasks without grants are what they were before grants existed).
    pub fn digest(&self) -> String {
        if self.is_empty() {
            return String::new();
        }
        let mut h = blake3::Hasher::new();
        h.update(b"sluice-grants-v1\0");
        for line in self.lines() {
            h.update(&(line.len() as u64).to_le_bytes());
            h.update(line.as_bytes());
        }
        h.finalize().to_hex().to_string()
    }

    /// Whether `self` (a flow's grants, a policy) covers every grant of `narrower`, or the first
    /// one it does not cover. A file grant is covered by one whose host directory contains it
    /// (lexically) with a mode at least as wide; an environment variable by the same name with
    /// the same value; a secret by its name.
    pub fn uncovered<'a>(&self, narrower: &'a Grants) -> Option<Uncovered<'a>> {
        for (i, h) in narrower.http.iter().enumerate() {
            if !self.http.iter().any(|c| c.covers(h)) {
                return Some(Uncovered::Http(i, h));
            }
        }
        for (i, t) in narrower.tcp.iter().enumerate() {
            if !self.tcp.iter().any(|c| c.covers(t)) {
                return Some(Uncovered::Tcp(i, t));
            }
        }
        for (i, f) in narrower.files.iter().enumerate() {
            if !self.files.iter().any(|c| c.covers(f)) {
                return Some(Uncovered::File(i, f));
            }
        }
        for (k, v) in &narrower.env {
            if self.env.get(k) != Some(v) {
                return Some(Uncovered::Env(k, v));
            }
        }
        narrower
            .secrets
            .iter()
            .find(|s| !self.secrets.contains(*s))
            .map(|s| Uncovered::Secret(s))
    }
}

impl FileGrant {
    /// Whether this grant allows everything `other` asks: its directory inside this one, its
    /// mode no wider.
    pub fn covers(&self, other: &FileGrant) -> bool {
        other.host.starts_with(&self.host) && other.mode <= self.mode
    }
}

/// A grant that a wider set of grants does not cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncovered<'a> {
    /// The `http` entry at this index.
    Http(usize, &'a HttpGrant),
    /// The `tcp` entry at this index.
    Tcp(usize, &'a TcpGrant),
    /// The `files` entry at this index.
    File(usize, &'a FileGrant),
    /// The environment variable with this value.
    Env(&'a str, &'a str),
    /// The secret.
    Secret(&'a str),
}

impl fmt::Display for Uncovered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uncovered::Http(i, g) => write!(f, "http[{i}] ({g})"),
            Uncovered::Tcp(i, g) => write!(f, "tcp[{i}] ({g})"),
            Uncovered::File(i, g) => write!(f, "files[{i}] ({g})"),
            Uncovered::Env(k, v) => write!(f, "env {k} = \"{v}\""),
            Uncovered::Secret(s) => write!(f, "secret {s}"),
        }
    }
}

/// Whether `name` may name an environment variable or a secret: letters, digits and `_`, not
/// starting with a digit, at most 128 bytes.
pub fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= 128
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Whether `name` (lower case) is a DNS host name: ASCII labels of letters, digits and `-` (not
/// at either end), 1 to 63 bytes each, 253 in all; not digits and dots only (`127.1` would be an
/// address in another form).
pub(crate) fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name
            .split('.')
            .all(|l| l.bytes().all(|b| b.is_ascii_digit()))
        && name.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The shortest secret value accepted: redacting a shorter string from logs and outputs would
/// mangle ordinary text.
pub const MIN_SECRET_BYTES: usize = 8;

/// Where secret values come from. The default has none (every granted secret is missing).
#[derive(Clone, Default)]
pub struct SecretSource {
    file: Option<(PathBuf, BTreeMap<String, Arc<str>>)>,
    env: bool,
    store: Option<Arc<dyn SecretStore>>,
}

/// Secrets kept by someone else (a server's tenant secrets), read when a run is prepared.
pub trait SecretStore: Send + Sync {
    /// The value of secret `name`, if set.
    fn get(&self, name: &str) -> Option<Arc<str>>;
    /// How a missing secret `name` is set, for error messages.
    fn where_to_set(&self, name: &str) -> String;
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretSource")
            .field("file", &self.file.as_ref().map(|(p, v)| (p, v.len())))
            .field("env", &self.env)
            .field("store", &self.store.is_some())
            .finish()
    }
}

/// A secrets file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("secrets file {}: {detail}", path.display())]
pub struct SecretsFileError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong.
    pub detail: String,
}

impl SecretSource {
    /// No secrets.
    pub fn none() -> Self {
        Self::default()
    }

    /// Look secrets up in `store` first.
    pub fn with_store(mut self, store: Arc<dyn SecretStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Also look secrets up in this process's environment: secret `NAME` is the variable
    /// `SLUICE_SECRET_NAME`.
    pub fn with_env(mut self) -> Self {
        self.env = true;
        self
    }

    /// Read secrets from `path`, in dotenv form (`NAME=value` lines, `#` comments, quoting as
    /// dotenv). They take precedence over the environment. The file must be a regular file that
    /// neither its group nor others may read or write.
    pub fn with_file(mut self, path: &Path) -> Result<Self, SecretsFileError> {
        let err = |detail: String| SecretsFileError {
            path: path.to_owned(),
            detail,
        };
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if !meta.is_file() {
            return Err(err("it is not a regular file".into()));
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(err(format!(
                    "its mode {mode:o} lets others read it; make it private with `chmod 600 {}`",
                    path.display()
                )));
            }
        }
        let mut values = BTreeMap::new();
        let iter = dotenvy::from_path_iter(path).map_err(|e| err(e.to_string()))?;
        for (line, item) in iter.enumerate() {
            let (name, value) = item.map_err(|e| err(format!("entry {}: {e}", line + 1)))?;
            if !is_variable_name(&name) {
                return Err(err(format!(
                    "`{name}` is not a secret name (letters, digits and `_`)"
                )));
            }
            values.insert(name, Arc::from(value));
        }
        self.file = Some((path.to_owned(), values));
        Ok(self)
    }

    /// The value of secret `name`, if the source has it.
    fn get(&self, name: &str) -> Option<Arc<str>> {
        if let Some(v) = self.store.as_ref().and_then(|s| s.get(name)) {
            return Some(v);
        }
        if let Some((_, values)) = &self.file
            && let Some(v) = values.get(name)
        {
            return Some(v.clone());
        }
        if self.env {
            return std::env::var(format!("SLUICE_SECRET_{name}"))
                .ok()
                .map(Arc::from);
        }
        None
    }

    /// Where a missing secret `name` could be set, for error messages.
    fn where_to_set(&self, name: &str) -> String {
        let mut places = Vec::new();
        if let Some(store) = &self.store {
            places.push(store.where_to_set(name));
        }
        if let Some((path, _)) = &self.file {
            places.push(format!("add `{name}=…` to {}", path.display()));
        }
        if self.env {
            places.push(format!("set SLUICE_SECRET_{name}"));
        }
        if places.is_empty() {
            "this runner was given no secret source".into()
        } else {
            places.join(" or ")
        }
    }
}

/// A task's grants that cannot be given to its runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    /// A granted secret has no value.
    #[error("task `{task}`: secret `{name}` is granted but has no value: {hint}")]
    MissingSecret {
        /// The task.
        task: String,
        /// The secret.
        name: String,
        /// Where to set it.
        hint: String,
    },
    /// A granted secret's value is too short to redact.
    #[error(
        "task `{task}`: secret `{name}` is shorter than {MIN_SECRET_BYTES} bytes, too short to \
         redact from logs and outputs"
    )]
    ShortSecret {
        /// The task.
        task: String,
        /// The secret.
        name: String,
    },
    /// A granted directory cannot be used.
    #[error("task `{task}`: granted directory {}: {detail}", path.display())]
    Directory {
        /// The task.
        task: String,
        /// The directory.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// A task's grants made ready for its runs, with what its cache key needs to know of them.
#[derive(Debug, Clone)]
pub struct ResolvedGrants {
    /// What the sandbox gives each run.
    pub run: Arc<RunGrants>,
    /// [`Grants::digest`].
    pub digest: String,
    /// A keyed hash of the granted secrets' values (empty without secrets): rotating a secret
    /// changes it, and it cannot be reversed without the sandbox's per-user key.
    pub secrets_digest: String,
}

impl ResolvedGrants {
    /// Nothing granted.
    pub fn none() -> Self {
        Self {
            run: Arc::new(RunGrants::default()),
            digest: String::new(),
            secrets_digest: String::new(),
        }
    }
}

impl Grants {
    /// Make `task`'s grants ready for its runs: every secret looked up in `secrets`, every read-
    /// only directory present, read-write ones created when missing.
    pub fn resolve(
        &self,
        task: &str,
        secrets: &SecretSource,
        sandbox: &Sandbox,
    ) -> Result<ResolvedGrants, GrantError> {
        if self.is_empty() {
            return Ok(ResolvedGrants::none());
        }
        let mut run = RunGrants::default();
        run.http(self.http.clone());
        run.tcp(self.tcp.clone());
        for f in &self.files {
            let dir_err = |detail: String| GrantError::Directory {
                task: task.to_owned(),
                path: f.host.clone(),
                detail,
            };
            if f.mode == FileMode::Rw && !f.host.exists() {
                std::fs::create_dir_all(&f.host)
                    .map_err(|e| dir_err(format!("cannot create it: {e}")))?;
            }
            match std::fs::metadata(&f.host) {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(dir_err("it is not a directory".into())),
                Err(e) => return Err(dir_err(e.to_string())),
            }
            run.preopen(&f.host, &f.guest, f.mode == FileMode::Rw);
        }
        for (k, v) in &self.env {
            run.env(k, v);
        }
        let mut digest = sandbox.secret_hasher();
        for name in &self.secrets {
            let value = secrets.get(name).ok_or_else(|| GrantError::MissingSecret {
                task: task.to_owned(),
                name: name.clone(),
                hint: secrets.where_to_set(name),
            })?;
            if value.len() < MIN_SECRET_BYTES {
                return Err(GrantError::ShortSecret {
                    task: task.to_owned(),
                    name: name.clone(),
                });
            }
            digest.update(&(name.len() as u64).to_le_bytes());
            digest.update(name.as_bytes());
            digest.update(&(value.len() as u64).to_le_bytes());
            digest.update(value.as_bytes());
            run.secret(name, value);
        }
        Ok(ResolvedGrants {
            run: Arc::new(run),
            digest: self.digest(),
            secrets_digest: if self.secrets.is_empty() {
                String::new()
            } else {
                digest.finalize().to_hex().to_string()
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(host: &str, mode: FileMode) -> FileGrant {
        FileGrant {
            host: host.into(),
            guest: "/d".into(),
            mode,
        }
    }

    #[test]
    fn a_directory_covers_its_subdirectories_at_its_mode_or_narrower() {
        let rw = file("/srv/data", FileMode::Rw);
        let ro = file("/srv/data", FileMode::Ro);
        assert!(rw.covers(&file("/srv/data/in", FileMode::Ro)));
        assert!(rw.covers(&file("/srv/data", FileMode::Rw)));
        assert!(ro.covers(&file("/srv/data/in", FileMode::Ro)));
        assert!(!ro.covers(&file("/srv/data/in", FileMode::Rw)));
        // Whole components only: /srv/database is not inside /srv/data.
        assert!(!rw.covers(&file("/srv/database", FileMode::Ro)));
        assert!(!rw.covers(&file("/srv", FileMode::Ro)));
    }

    #[test]
    fn uncovered_names_the_first_grant_beyond_the_wider_set() {
        let wide = Grants {
            http: vec![HttpGrant::parse("http://127.0.0.1:*", None).expect("valid")],
            tcp: vec![TcpGrant::parse("db:5432").expect("valid")],
            files: vec![file("/srv", FileMode::Ro)],
            env: [("REGION".to_owned(), "eu".to_owned())].into(),
            secrets: ["TOKEN".to_owned()].into(),
        };
        let mut http = Grants::default();
        http.http
            .push(HttpGrant::parse("http://127.0.0.2:80", None).expect("valid"));
        assert_eq!(
            wide.uncovered(&http).map(|u| u.to_string()),
            Some("http[0] (http://127.0.0.2:80)".to_owned())
        );
        assert_eq!(wide.uncovered(&wide), None);
        assert_eq!(wide.uncovered(&Grants::default()), None);
        let mut env = Grants::default();
        env.env.insert("REGION".into(), "us".into());
        assert_eq!(wide.uncovered(&env), Some(Uncovered::Env("REGION", "us")));
        let mut secret = Grants::default();
        secret.secrets.insert("OTHER".into());
        assert_eq!(wide.uncovered(&secret), Some(Uncovered::Secret("OTHER")));
        let rw = Grants {
            files: vec![file("/srv/x", FileMode::Ro), file("/srv/y", FileMode::Rw)],
            ..Grants::default()
        };
        assert_eq!(
            wide.uncovered(&rw).map(|u| u.to_string()),
            Some("files[1] (/srv/y at /d (rw))".to_owned())
        );
    }

    #[test]
    fn the_digest_is_empty_without_grants_and_changes_with_each_grant() {
        assert_eq!(Grants::default().digest(), "");
        let a = Grants {
            files: vec![file("/srv", FileMode::Ro)],
            ..Grants::default()
        };
        let mut digests = BTreeSet::new();
        for g in [
            a.clone(),
            Grants {
                files: vec![file("/srv", FileMode::Rw)],
                ..Grants::default()
            },
            Grants {
                files: vec![file("/srv2", FileMode::Ro)],
                ..Grants::default()
            },
            Grants {
                env: [("A".to_owned(), "1".to_owned())].into(),
                ..Grants::default()
            },
            Grants {
                env: [("A".to_owned(), "2".to_owned())].into(),
                ..Grants::default()
            },
            Grants {
                secrets: ["A".to_owned()].into(),
                ..Grants::default()
            },
        ] {
            assert!(digests.insert(g.digest()), "{g:?}");
        }
        // The order files are listed in does not matter.
        let two = |x, y| Grants {
            files: vec![file(x, FileMode::Ro), file(y, FileMode::Ro)],
            ..Grants::default()
        };
        let (mut p, mut q) = (two("/a", "/b"), two("/b", "/a"));
        p.files[0].guest = "/1".into();
        p.files[1].guest = "/2".into();
        q.files[0].guest = "/2".into();
        q.files[1].guest = "/1".into();
        assert_eq!(p.digest(), q.digest());
    }

    #[test]
    fn variable_names() {
        for ok in ["A", "_x", "API_TOKEN", "a1"] {
            assert!(is_variable_name(ok), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A=B", "Ä", &"A".repeat(129)] {
            assert!(!is_variable_name(bad), "{bad}");
        }
    }
}

//! `[grants]` and `[tasks.X.grants]` converted into each task's [`Grants`]: every entry checked
//! at its position, a task's kinds inheriting the flow's and only narrowing them, and the
//! operator's ceiling ([`Policy`]) applied with both positions, the manifest's and the policy
//! file's.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use super::ManifestError;
use super::raw::{RawFile, RawGrants};
use super::source::Source;
use super::values::normalize;
use crate::grants::{
    FileGrant, FileMode, Grants, HttpGrant, TcpGrant, Uncovered, is_variable_name,
};

/// Grants with the position of each entry, for errors about them.
#[derive(Debug, Clone, Default)]
pub(super) struct Placed {
    pub(super) grants: Grants,
    /// The `[grants]` table itself, when one was written.
    table: Option<Range<usize>>,
    http: Vec<Range<usize>>,
    tcp: Vec<Range<usize>>,
    files: Vec<Range<usize>>,
    env: BTreeMap<String, Range<usize>>,
    secrets: BTreeMap<String, Range<usize>>,
}

/// `[grants]` of the flow: what every task inherits, and the most any task may ask.
pub(super) fn flow_grants(
    src: &Source<'_>,
    dir: &Path,
    raw: Option<Spanned<RawGrants>>,
) -> Result<Placed, ManifestError> {
    let Some(raw) = raw else {
        return Ok(Placed::default());
    };
    let table = raw.span();
    let mut placed = convert(src, dir, "`grants`", raw.into_inner(), &Placed::default())?;
    placed.table = Some(table);
    Ok(placed)
}

/// `[tasks.X.grants]`: each kind given replaces the flow's and must be covered by it (when the
/// flow has a `[grants]` table); each kind left out is inherited.
pub(super) fn task_grants(
    src: &Source<'_>,
    dir: &Path,
    task: &str,
    raw: Option<Spanned<RawGrants>>,
    flow: &Placed,
) -> Result<Placed, ManifestError> {
    let Some(raw) = raw else {
        return Ok(flow.clone());
    };
    let what = format!("task `{task}`: `grants`");
    let placed = convert(src, dir, &what, raw.into_inner(), flow)?;
    if let Some(flow_table) = &flow.table
        && let Some(u) = flow.grants.uncovered(&placed.grants)
    {
        let at = placed.span_of(u);
        let flow_at = src.error(flow_table.clone(), "");
        return Err(src.error(
            at,
            format!(
                "{what}: {u} is not covered by the flow's [grants] (line {}): a task may only \
                 narrow the flow's grants",
                flow_at.line
            ),
        ));
    }
    Ok(placed)
}

impl Placed {
    fn span_of(&self, u: Uncovered<'_>) -> Range<usize> {
        let span = match u {
            Uncovered::Http(i, _) => self.http.get(i),
            Uncovered::Tcp(i, _) => self.tcp.get(i),
            Uncovered::File(i, _) => self.files.get(i),
            Uncovered::Env(k, _) => self.env.get(k),
            Uncovered::Secret(s) => self.secrets.get(s),
        };
        span.or(self.table.as_ref()).cloned().unwrap_or(0..0)
    }
}

/// One grants table, the kinds it leaves out taken from `inherit`.
fn convert(
    src: &Source<'_>,
    dir: &Path,
    what: &str,
    raw: RawGrants,
    inherit: &Placed,
) -> Result<Placed, ManifestError> {
    let mut out = Placed {
        table: inherit.table.clone(),
        ..Placed::default()
    };
    match raw.http {
        None => {
            out.grants.http = inherit.grants.http.clone();
            out.http = inherit.http.clone();
        }
        Some(list) => {
            for (i, h) in list.into_iter().enumerate() {
                let grant = http_grant(&h)
                    .map_err(|e| src.error(h.span(), format!("{what}.http[{i}]: {e}")))?;
                out.grants.http.push(grant);
                out.http.push(h.span());
            }
        }
    }
    match raw.tcp {
        None => {
            out.grants.tcp = inherit.grants.tcp.clone();
            out.tcp = inherit.tcp.clone();
        }
        Some(list) => {
            for (i, t) in list.into_iter().enumerate() {
                let grant = TcpGrant::parse(t.get_ref())
                    .map_err(|e| src.error(t.span(), format!("{what}.tcp[{i}]: {e}")))?;
                out.grants.tcp.push(grant);
                out.tcp.push(t.span());
            }
        }
    }
    match raw.files {
        None => {
            out.grants.files = inherit.grants.files.clone();
            out.files = inherit.files.clone();
        }
        Some(files) => {
            let mut guests = BTreeSet::new();
            for (i, f) in files.into_iter().enumerate() {
                let span = f.span();
                let g = file(src, dir, &format!("{what}.files[{i}]"), f.into_inner())?;
                if !guests.insert(g.guest.clone()) {
                    return Err(src.error(
                        span,
                        format!(
                            "{what}.files[{i}]: guest path `{}` is granted twice",
                            g.guest
                        ),
                    ));
                }
                out.grants.files.push(g);
                out.files.push(span);
            }
        }
    }
    match raw.env {
        None => {
            out.grants.env = inherit.grants.env.clone();
            out.env = inherit.env.clone();
        }
        Some(env) => {
            for (k, v) in env {
                let name = k.get_ref();
                if !is_variable_name(name) {
                    return Err(src.error(
                        k.span(),
                        format!(
                            "{what}.env: `{name}` is not a variable name (letters, digits and \
                             `_`, not starting with a digit)"
                        ),
                    ));
                }
                if v.get_ref().contains('\0') {
                    return Err(src.error(
                        v.span(),
                        format!("{what}.env.{name}: a value cannot contain a NUL character"),
                    ));
                }
                out.env.insert(name.clone(), k.span());
                out.grants.env.insert(name.clone(), v.into_inner());
            }
        }
    }
    match raw.secrets {
        None => {
            out.grants.secrets = inherit.grants.secrets.clone();
            out.secrets = inherit.secrets.clone();
        }
        Some(secrets) => {
            for (i, s) in secrets.into_iter().enumerate() {
                let name = s.get_ref();
                if !is_variable_name(name) {
                    return Err(src.error(
                        s.span(),
                        format!(
                            "{what}.secrets[{i}]: `{name}` is not a secret name (letters, digits \
                             and `_`, not starting with a digit)"
                        ),
                    ));
                }
                if !out.grants.secrets.insert(name.clone()) {
                    return Err(src.error(
                        s.span(),
                        format!("{what}.secrets[{i}]: `{name}` is granted twice"),
                    ));
                }
                out.secrets.insert(name.clone(), s.span());
            }
        }
    }
    // The guest sees env and secrets as one environment: a name may be only one of them.
    if let Some(both) = out
        .grants
        .secrets
        .iter()
        .find(|s| out.grants.env.contains_key(*s))
    {
        return Err(src.error(
            out.secrets.get(both).cloned().unwrap_or(0..0),
            format!("{what}: `{both}` is both an env variable and a secret; it can be only one"),
        ));
    }
    Ok(out)
}

/// An `http` entry: a pattern, or `{ url = "pattern", methods = ["GET"] }`.
fn http_grant(v: &Spanned<toml::Value>) -> Result<HttpGrant, String> {
    const FORM: &str = "a pattern like \"https://api.example.com\" or a table like \
                        { url = \"https://api.example.com\", methods = [\"GET\"] }";
    match v.get_ref() {
        toml::Value::String(p) => HttpGrant::parse(p, None),
        toml::Value::Table(t) => {
            if let Some(k) = t.keys().find(|k| *k != "url" && *k != "methods") {
                return Err(format!("unknown key `{k}`: expected {FORM}"));
            }
            let url = t
                .get("url")
                .and_then(toml::Value::as_str)
                .ok_or_else(|| format!("`url` (a string) is missing: expected {FORM}"))?;
            let methods = match t.get("methods") {
                None => None,
                Some(toml::Value::Array(items)) => Some(
                    items
                        .iter()
                        .map(|m| {
                            m.as_str()
                                .map(str::to_owned)
                                .ok_or_else(|| "`methods` takes names like \"GET\"".to_owned())
                        })
                        .collect::<Result<Vec<_>, _>>()?,
                ),
                Some(_) => return Err("`methods` takes a list like [\"GET\"]".into()),
            };
            HttpGrant::parse(url, methods.as_deref())
        }
        other => Err(format!("{other} must be {FORM}")),
    }
}

fn file(
    src: &Source<'_>,
    dir: &Path,
    what: &str,
    raw: RawFile,
) -> Result<FileGrant, ManifestError> {
    let host = raw.host.get_ref();
    if host.is_empty() {
        return Err(src.error(
            raw.host.span(),
            format!("{what}.host is empty: give a directory, like \"data/in\""),
        ));
    }
    let host = absolute(&dir.join(host));
    let guest = raw.guest.get_ref();
    let bad_guest = !guest.starts_with('/')
        || guest
            .split('/')
            .skip(1)
            .any(|c| c == "." || c == ".." || (c.is_empty() && guest != "/"))
        || guest.contains('\0');
    if bad_guest {
        return Err(src.error(
            raw.guest.span(),
            format!(
                "{what}.guest = \"{guest}\" must be an absolute guest path like \"/in\" (no \
                 `.`, `..` or empty components)"
            ),
        ));
    }
    let mode = match &raw.mode {
        None => FileMode::Ro,
        Some(m) => match m.get_ref().as_str() {
            "ro" => FileMode::Ro,
            "rw" => FileMode::Rw,
            other => {
                return Err(src.error(
                    m.span(),
                    format!(
                        "{what}.mode = \"{other}\" must be \"ro\" (read only, the default) or \
                         \"rw\" (read and write)"
                    ),
                ));
            }
        },
    };
    Ok(FileGrant {
        host,
        guest: guest.clone(),
        mode,
    })
}

/// `path` made absolute (against the current directory) and normalized lexically.
fn absolute(path: &Path) -> PathBuf {
    normalize(&std::path::absolute(path).unwrap_or_else(|_| path.to_owned()))
}

/// The operator's ceiling: the most any flow may be granted, from a policy file
/// (`<home>/policy.toml` or `--policy FILE`):
///
/// ```toml
/// [grants]
/// http = ["https://*.internal.example", "http://127.0.0.1:*"]
/// tcp = ["db.internal:5432"]
/// files = ["/srv/data", { path = "/srv/out", mode = "rw" }]   # a path alone: read only
/// env = ["REGION"]                                            # names, or ["*"] for any
/// secrets = ["API_TOKEN"]
/// ```
///
/// A kind the policy leaves out may not be granted at all.
#[derive(Debug, Clone)]
pub struct Policy {
    file: PathBuf,
    /// No policy file: nothing may be granted (a server's default).
    absent: bool,
    grants_line: usize,
    http: Option<(Vec<HttpGrant>, usize)>,
    tcp: Option<(Vec<TcpGrant>, usize)>,
    files: Vec<(FileGrant, usize)>,
    files_line: Option<usize>,
    env: Option<(BTreeSet<String>, usize)>,
    secrets: Option<(BTreeSet<String>, usize)>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    grants: Spanned<RawPolicyGrants>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicyGrants {
    http: Option<Spanned<Vec<Spanned<toml::Value>>>>,
    tcp: Option<Spanned<Vec<Spanned<String>>>>,
    files: Option<Spanned<Vec<Spanned<RawPolicyFile>>>>,
    env: Option<Spanned<Vec<Spanned<String>>>>,
    secrets: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawPolicyFile {
    Path(String),
    Table {
        path: String,
        #[serde(default)]
        mode: Option<String>,
    },
}

impl Policy {
    /// Read the policy file at `path`; every problem is reported with its position.
    pub fn load(path: &Path) -> Result<Policy, ManifestError> {
        let text = super::read(path)?;
        Self::parse(path, &text)
    }

    /// Parse policy `text`, read from `file` (relative paths are resolved against its directory).
    pub fn parse(file: &Path, text: &str) -> Result<Policy, ManifestError> {
        let src = Source { file, text };
        let dir = file.parent().unwrap_or(Path::new("."));
        let raw: RawPolicy = toml::from_str(text).map_err(|e| src.toml_error(&e))?;
        let line = |span: Range<usize>| src.error(span, "").line;
        let grants_line = line(raw.grants.span());
        let raw = raw.grants.into_inner();
        let http = match raw.http {
            None => None,
            Some(list) => {
                let at = line(list.span());
                let mut grants = Vec::new();
                for (i, h) in list.into_inner().iter().enumerate() {
                    grants.push(
                        http_grant(h)
                            .map_err(|e| src.error(h.span(), format!("grants.http[{i}]: {e}")))?,
                    );
                }
                Some((grants, at))
            }
        };
        let tcp = match raw.tcp {
            None => None,
            Some(list) => {
                let at = line(list.span());
                let mut grants = Vec::new();
                for (i, t) in list.into_inner().iter().enumerate() {
                    grants.push(
                        TcpGrant::parse(t.get_ref())
                            .map_err(|e| src.error(t.span(), format!("grants.tcp[{i}]: {e}")))?,
                    );
                }
                Some((grants, at))
            }
        };
        let mut files = Vec::new();
        let files_line = raw.files.as_ref().map(|f| line(f.span()));
        for (i, entry) in raw
            .files
            .map(Spanned::into_inner)
            .unwrap_or_default()
            .into_iter()
            .enumerate()
        {
            let span = entry.span();
            let (path, mode) = match entry.into_inner() {
                RawPolicyFile::Path(p) => (p, None),
                RawPolicyFile::Table { path, mode } => (path, mode),
            };
            let mode = match mode.as_deref() {
                None | Some("ro") => FileMode::Ro,
                Some("rw") => FileMode::Rw,
                Some(other) => {
                    return Err(src.error(
                        span,
                        format!("grants.files[{i}].mode = \"{other}\" must be \"ro\" or \"rw\""),
                    ));
                }
            };
            if path.is_empty() {
                return Err(src.error(span, format!("grants.files[{i}]: the path is empty")));
            }
            let host = absolute(&dir.join(path));
            files.push((
                FileGrant {
                    host,
                    guest: String::new(),
                    mode,
                },
                line(span),
            ));
        }
        let names = |list: Option<Spanned<Vec<Spanned<String>>>>,
                     kind: &str,
                     star: bool|
         -> Result<Option<(BTreeSet<String>, usize)>, ManifestError> {
            let Some(list) = list else { return Ok(None) };
            let at = line(list.span());
            let mut set = BTreeSet::new();
            for (i, n) in list.into_inner().into_iter().enumerate() {
                if !(is_variable_name(n.get_ref()) || (star && n.get_ref() == "*")) {
                    return Err(src.error(
                        n.span(),
                        format!("grants.{kind}[{i}]: `{}` is not a name", n.get_ref()),
                    ));
                }
                set.insert(n.into_inner());
            }
            Ok(Some((set, at)))
        };
        Ok(Policy {
            file: file.to_owned(),
            absent: false,
            grants_line,
            http,
            tcp,
            files,
            files_line,
            env: names(raw.env, "env", true)?,
            secrets: names(raw.secrets, "secrets", false)?,
        })
    }

    /// The policy where `file` does not exist: nothing may be granted (a server's default, so
    /// that no tenant reaches the server's network, files or environment unless its operator
    /// says so).
    pub fn deny_all(file: &Path) -> Policy {
        Policy {
            file: file.to_owned(),
            absent: true,
            grants_line: 0,
            http: None,
            tcp: None,
            files: Vec::new(),
            files_line: None,
            env: None,
            secrets: None,
        }
    }

    /// Why a kind of grant the policy has no key for is refused.
    fn grants_no(&self, key: &str) -> String {
        match self.absent {
            true => format!(
                "there is no policy file ({}), and without one nothing may be granted",
                self.file.display()
            ),
            false => format!(
                "{}:{} grants no {key} (no `{key}` key in [grants])",
                self.file.display(),
                self.grants_line
            ),
        }
    }

    /// The policy file.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Check `task`'s grants against the ceiling: the first grant beyond it is an error at the
    /// grant's position in the manifest that names the policy line it exceeds.
    pub(super) fn check(
        &self,
        src: &Source<'_>,
        task: &str,
        placed: &Placed,
    ) -> Result<(), ManifestError> {
        let policy = self.file.display();
        let err = |span: Range<usize>, grant: String, why: String| {
            src.error(
                span,
                format!("task `{task}`: grant {grant} exceeds the policy: {why}"),
            )
        };
        // Patterns (http, tcp): each grant must fit one entry of the policy's list.
        let first_uncovered = |kind: &str,
                               line: Option<usize>,
                               uncovered: Option<(usize, String)>,
                               spans: &[Range<usize>]|
         -> Result<(), ManifestError> {
            let Some((i, grant)) = uncovered else {
                return Ok(());
            };
            let why = match line {
                Some(line) => format!("{policy}:{line}: no entry of `{kind}` covers it"),
                None => self.grants_no(kind),
            };
            let span = spans.get(i).cloned().unwrap_or(0..0);
            Err(err(span, format!("{kind}[{i}] ({grant})"), why))
        };
        let (http, http_line) = self
            .http
            .as_ref()
            .map_or((&[][..], None), |(g, l)| (&g[..], Some(*l)));
        first_uncovered(
            "http",
            http_line,
            placed
                .grants
                .http
                .iter()
                .enumerate()
                .find_map(|(i, h)| (!http.iter().any(|c| c.covers(h))).then(|| (i, h.to_string()))),
            &placed.http,
        )?;
        let (tcp, tcp_line) = self
            .tcp
            .as_ref()
            .map_or((&[][..], None), |(g, l)| (&g[..], Some(*l)));
        first_uncovered(
            "tcp",
            tcp_line,
            placed
                .grants
                .tcp
                .iter()
                .enumerate()
                .find_map(|(i, t)| (!tcp.iter().any(|c| c.covers(t))).then(|| (i, t.to_string()))),
            &placed.tcp,
        )?;
        for (i, f) in placed.grants.files.iter().enumerate() {
            if self.files.iter().any(|(c, _)| c.covers(f)) {
                continue;
            }
            let span = placed.files.get(i).cloned().unwrap_or(0..0);
            let why = match (self.files_line, f.mode) {
                (None, _) => self.grants_no("files"),
                (Some(line), FileMode::Rw)
                    if self.files.iter().any(|(c, _)| f.host.starts_with(&c.host)) =>
                {
                    format!("{policy}:{line} allows {} only read only", f.host.display())
                }
                (Some(line), _) => format!(
                    "{policy}:{line}: no entry of `files` contains {}",
                    f.host.display()
                ),
            };
            return Err(err(span, format!("files[{i}] ({f})"), why));
        }
        // Names: env variables (the policy may list "*") and secrets.
        let kinds = [
            ("env", "env", &self.env, &placed.env),
            ("secrets", "secret", &self.secrets, &placed.secrets),
        ];
        for (key, grant, ceiling, names) in kinds {
            for (name, span) in names {
                let why = match ceiling {
                    Some((allowed, _)) if allowed.contains("*") || allowed.contains(name) => {
                        continue;
                    }
                    Some((_, line)) => format!("{policy}:{line}: `{key}` does not list {name}"),
                    None => self.grants_no(key),
                };
                return Err(err(span.clone(), format!("{grant} {name}"), why));
            }
        }
        Ok(())
    }
}

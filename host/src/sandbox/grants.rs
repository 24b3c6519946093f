//! The authority one run is given beyond its input, as the sandbox applies it: outbound HTTP
//! (checked per request by the run's hooks, `http.rs`), preopened directories (read-only or
//! read-write), environment variables, and secrets (environment
//! variables whose values are redacted from everything the run leaves behind). A plain type built
//! by the host above the sandbox; the default grants nothing, and a run with nothing granted
//! builds its WASI context exactly as before grants existed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

use super::outcome::{Ending, LogRecord, Signal};
use crate::grants::{HttpGrant, TcpGrant};
use crate::json::Json;

/// What one run may reach. [`RunGrants::default`] grants nothing.
#[derive(Clone)]
pub struct RunGrants {
    http: Arc<[HttpGrant]>,
    tcp: Arc<[TcpGrant]>,
    preopens: Vec<(PathBuf, String, bool)>,
    env: Vec<(String, String)>,
    secrets: Vec<(String, Arc<str>)>,
}

impl Default for RunGrants {
    fn default() -> Self {
        Self {
            http: Arc::new([]),
            tcp: Arc::new([]),
            preopens: Vec::new(),
            env: Vec::new(),
            secrets: Vec::new(),
        }
    }
}

impl fmt::Debug for RunGrants {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RunGrants")
            .field("http", &self.http)
            .field("tcp", &self.tcp)
            .field("preopens", &self.preopens)
            .field("env", &self.env)
            .field(
                "secrets",
                &self.secrets.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The text that replaces a secret's value in logs and outputs.
pub const REDACTED: &str = "***";

impl RunGrants {
    /// Allow outbound HTTP requests that one of `grants` allows.
    pub fn http(&mut self, grants: Vec<HttpGrant>) -> &mut Self {
        self.http = grants.into();
        self
    }

    /// The HTTP grants, shared with the run's hooks.
    pub(super) fn http_grants(&self) -> Arc<[HttpGrant]> {
        self.http.clone()
    }

    /// Allow outbound TCP connections that one of `grants` allows (and name lookups of the
    /// names they grant).
    pub fn tcp(&mut self, grants: Vec<TcpGrant>) -> &mut Self {
        self.tcp = grants.into();
        self
    }

    /// The TCP grants.
    pub(super) fn tcp_grants(&self) -> Arc<[TcpGrant]> {
        self.tcp.clone()
    }

    /// Preopen host directory `host` as `guest`, writable or read-only. Paths that lead outside
    /// it (`..`, absolute, symbolic links) are refused inside the guest.
    pub fn preopen(&mut self, host: &Path, guest: &str, writable: bool) -> &mut Self {
        self.preopens
            .push((host.to_owned(), guest.to_owned(), writable));
        self
    }

    /// Set environment variable `name`.
    pub fn env(&mut self, name: &str, value: &str) -> &mut Self {
        self.env.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Give secret `name` as an environment variable; its value is replaced by `***` wherever
    /// the run's logs, output or messages contain it.
    pub fn secret(&mut self, name: &str, value: Arc<str>) -> &mut Self {
        self.secrets.push((name.to_owned(), value));
        self
    }

    /// Whether a run may open connections (HTTP or TCP): its I/O then lives on the runtime
    /// that first polls it.
    pub fn reaches_network(&self) -> bool {
        !self.http.is_empty() || !self.tcp.is_empty()
    }

    /// Whether nothing is granted.
    pub fn is_empty(&self) -> bool {
        self.http.is_empty()
            && self.tcp.is_empty()
            && self.preopens.is_empty()
            && self.env.is_empty()
            && self.secrets.is_empty()
    }

    /// Add the grants to a run's WASI context. Fails when a directory cannot be opened.
    pub(super) fn apply(&self, wasi: &mut WasiCtxBuilder) -> Result<(), String> {
        for (host, guest, writable) in &self.preopens {
            let perms = if *writable {
                FsPerms::ReadWrite
            } else {
                FsPerms::ReadOnly
            };
            wasi.preopened_dir(host, guest, perms).map_err(|e| {
                format!(
                    "the granted directory {} cannot be opened: {e:#}",
                    host.display()
                )
            })?;
        }
        for (k, v) in &self.env {
            wasi.env(k, v);
        }
        for (k, v) in &self.secrets {
            wasi.env(k, &**v);
        }
        Ok(())
    }

    /// Replace every granted secret's value in `ending` and `logs` by [`REDACTED`]. An output
    /// whose JSON would no longer parse (the value stood outside a string) becomes a failure
    /// that says so, without the output.
    pub(super) fn redact(&self, ending: &mut Ending, logs: &mut [LogRecord]) {
        if self.secrets.is_empty() {
            return;
        }
        for r in logs {
            self.redact_text(&mut r.message);
        }
        match ending {
            Ending::Output(json) => {
                if let Some(redacted) = self.redact_json(json) {
                    *ending = redacted;
                }
            }
            Ending::Signal(signal) => {
                let (Signal::Fail { message }
                | Signal::Retry { message, .. }
                | Signal::Skip { message }
                | Signal::Pause { message }
                | Signal::Success { message, .. }) = signal;
                self.redact_text(message);
                if let Signal::Success { output, .. } = signal
                    && let Some(redacted) = self.redact_json(output)
                {
                    *ending = redacted;
                }
            }
            Ending::GuestFault { message }
            | Ending::HostFault { message }
            | Ending::Lost { message } => {
                self.redact_text(message);
            }
            Ending::LimitExceeded(_) | Ending::TimedOut(_) | Ending::Cancelled => {}
        }
    }

    fn redact_text(&self, text: &mut String) {
        for (_, value) in &self.secrets {
            if text.contains(&**value) {
                *text = text.replace(&**value, REDACTED);
            }
        }
    }

    /// Redact `json` in place; `Some(ending)` when the result is no longer JSON.
    fn redact_json(&self, json: &mut Json) -> Option<Ending> {
        let mut text: Option<String> = None;
        for (name, value) in &self.secrets {
            // Inside a JSON string the value appears escaped.
            let escaped = serde_json::to_string(&**value).unwrap_or_default();
            let escaped = escaped
                .strip_prefix('"')
                .and_then(|e| e.strip_suffix('"'))
                .unwrap_or(&escaped);
            let current = text.as_deref().unwrap_or(json.as_str());
            if current.contains(escaped) {
                text = Some(current.replace(escaped, REDACTED));
            } else if current.contains(&**value) {
                return Some(Ending::GuestFault {
                    message: format!(
                        "the output contains the value of secret `{name}` in a form that cannot \
                         be redacted; it was not recorded"
                    ),
                });
            }
        }
        let text = text?;
        match Json::parse(&text) {
            Ok(redacted) => {
                *json = redacted;
                None
            }
            Err(_) => Some(Ending::GuestFault {
                message: "the output contains a granted secret's value outside a JSON string; \
                          it cannot be redacted, so it was not recorded"
                    .into(),
            }),
        }
    }
}

/// [`RunGrants`] as a worker receives them with its job: plain data, every grant spelled out.
/// Directories are opened on the worker, at the paths the server granted.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireGrants {
    /// HTTP grants.
    #[serde(default)]
    pub http: Vec<WireHttpGrant>,
    /// TCP grants, as `host:port` entries.
    #[serde(default)]
    pub tcp: Vec<String>,
    /// Directories: host path, guest path, writable.
    #[serde(default)]
    pub preopens: Vec<(PathBuf, String, bool)>,
    /// Environment variables.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Secrets, with their values.
    #[serde(default)]
    pub secrets: Vec<(String, String)>,
}

/// An [`HttpGrant`] as plain data.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WireHttpGrant {
    /// `http` or `https`.
    pub scheme: String,
    /// `name`, `*.name` (subdomains) or an address.
    pub host: String,
    /// Whether `host` is an address.
    pub ip: bool,
    /// The port; `None` for any.
    pub port: Option<u16>,
    /// A path prefix.
    pub path: Option<String>,
    /// The methods allowed; `None` for any.
    pub methods: Option<Vec<String>>,
}

impl RunGrants {
    /// These grants as plain data, to send to a worker.
    pub fn to_wire(&self) -> WireGrants {
        use crate::grants::HostPattern;
        WireGrants {
            http: self
                .http
                .iter()
                .map(|g| {
                    let (host, ip) = match &g.host {
                        HostPattern::Name(n) => (n.clone(), false),
                        HostPattern::Subdomains(n) => (format!("*.{n}"), false),
                        HostPattern::Ip(a) => (a.to_string(), true),
                    };
                    WireHttpGrant {
                        scheme: g.scheme.clone(),
                        host,
                        ip,
                        port: g.port,
                        path: g.path.clone(),
                        methods: g.methods.as_ref().map(|m| m.iter().cloned().collect()),
                    }
                })
                .collect(),
            tcp: self.tcp.iter().map(ToString::to_string).collect(),
            preopens: self.preopens.clone(),
            env: self.env.clone(),
            secrets: self
                .secrets
                .iter()
                .map(|(n, v)| (n.clone(), v.to_string()))
                .collect(),
        }
    }

    /// Grants received as plain data ([`RunGrants::to_wire`]); `Err` names the grant that is
    /// not valid.
    pub fn from_wire(wire: WireGrants) -> Result<RunGrants, String> {
        use crate::grants::{HostPattern, TcpGrant};
        let http = wire
            .http
            .into_iter()
            .map(|g| {
                let host = if g.ip {
                    HostPattern::Ip(
                        g.host
                            .parse()
                            .map_err(|e| format!("HTTP grant host {:?}: {e}", g.host))?,
                    )
                } else if let Some(n) = g.host.strip_prefix("*.") {
                    HostPattern::Subdomains(n.to_owned())
                } else {
                    HostPattern::Name(g.host)
                };
                Ok(HttpGrant {
                    scheme: g.scheme,
                    host,
                    port: g.port,
                    path: g.path,
                    methods: g.methods.map(|m| m.into_iter().collect()),
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let tcp = wire
            .tcp
            .iter()
            .map(|t| TcpGrant::parse(t).map_err(|e| format!("TCP grant {t:?}: {e}")))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(RunGrants {
            http: http.into(),
            tcp: tcp.into(),
            preopens: wire.preopens,
            env: wire.env,
            secrets: wire
                .secrets
                .into_iter()
                .map(|(n, v)| (n, Arc::from(v)))
                .collect(),
        })
    }
}

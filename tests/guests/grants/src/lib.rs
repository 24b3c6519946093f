//! A guest that tries, on request, what grants allow or deny, and reports what happened instead
//! of failing, so a test can assert both the success and the refusal. The input is a list of
//! steps; the output is one result per step: `{"ok": …}` or `{"err": "…"}`.

use std::io::Write as _;

use serde::Deserialize;
use serde_json::{Value, json};
use sluice_guest::{Signal, export_task, http, info};

#[derive(Deserialize)]
#[serde(tag = "do", rename_all = "snake_case")]
enum Step {
    /// Read a file as text.
    Read { path: String },
    /// Create or replace a file with `text`.
    Write { path: String, text: String },
    /// List a directory's entry names, sorted.
    List { path: String },
    /// Create a symbolic link `link` (relative to the preopened directory `dir`) pointing to
    /// `target`.
    Symlink {
        dir: String,
        target: String,
        link: String,
    },
    /// Remove a file.
    Remove { path: String },
    /// One environment variable.
    Env { name: String },
    /// Every environment variable's name.
    EnvNames,
    /// Print `text` to stdout, log it, and return it.
    Echo { text: String },
    /// Print the value of variable `name` to stdout and stderr, log it, and return it.
    Leak { name: String },
    /// Fail with a message holding the value of variable `name`.
    FailWith { name: String },
    /// Connect to `addr` over TCP, send `ping\n`, and return the line that comes back.
    Connect { addr: String },
    /// Look `name` up; return its addresses.
    Resolve { name: String },
    /// Look `name` up through `wasi:sockets/ip-name-lookup` itself (as libc's `getaddrinfo`
    /// does, even for an address); return its addresses.
    Lookup { name: String },
    /// Send an HTTP request, following up to `follow` redirects, and read the whole response
    /// body (keeping at most its first 64 KiB).
    Http {
        #[serde(default = "get")]
        method: String,
        url: String,
        #[serde(default)]
        headers: Vec<(String, String)>,
        #[serde(default)]
        body: Option<String>,
        #[serde(default)]
        follow: u32,
    },
}

fn get() -> String {
    "GET".into()
}

fn run(steps: Vec<Step>) -> Result<Vec<Value>, Signal> {
    let mut out = Vec::new();
    for step in steps {
        let r: Result<Value, String> = match step {
            Step::Read { path } => std::fs::read_to_string(&path)
                .map(Value::from)
                .map_err(|e| e.to_string()),
            Step::Write { path, text } => std::fs::write(&path, text)
                .map(|()| Value::Null)
                .map_err(|e| e.to_string()),
            Step::List { path } => std::fs::read_dir(&path)
                .and_then(|d| {
                    let mut names = d
                        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                        .collect::<Result<Vec<_>, _>>()?;
                    names.sort();
                    Ok(json!(names))
                })
                .map_err(|e| e.to_string()),
            Step::Symlink { dir, target, link } => symlink(&dir, &target, &link),
            Step::Remove { path } => std::fs::remove_file(&path)
                .map(|()| Value::Null)
                .map_err(|e| e.to_string()),
            Step::Env { name } => std::env::var(&name)
                .map(Value::from)
                .map_err(|e| e.to_string()),
            Step::EnvNames => {
                let mut names: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                names.sort();
                Ok(json!(names))
            }
            Step::Echo { text } => Ok(echo(&text)),
            Step::Leak { name } => sluice_guest::secret(&name)
                .map(|v| echo(&v))
                .ok_or_else(|| format!("no secret {name}")),
            Step::Http {
                method,
                url,
                headers,
                body,
                follow,
            } => http::block_on(fetch(method, url, headers, body, follow)),
            Step::Connect { addr } => ping(&addr).map(Value::from),
            Step::Resolve { name } => {
                use std::net::ToSocketAddrs as _;
                (name.as_str(), 0)
                    .to_socket_addrs()
                    .map(|a| json!(a.map(|a| a.ip().to_string()).collect::<Vec<_>>()))
                    .map_err(|e| e.to_string())
            }
            Step::Lookup { name } => lookup(&name).map(|a| json!(a)),
            Step::FailWith { name } => {
                let v = std::env::var(&name).unwrap_or_default();
                return Err(Signal::Fail(format!("failing with {v}")));
            }
        };
        out.push(match r {
            Ok(v) => json!({ "ok": v }),
            Err(e) => json!({ "err": e }),
        });
    }
    Ok(out)
}

fn lookup(name: &str) -> Result<Vec<String>, String> {
    use wasip2::sockets::{instance_network, ip_name_lookup, network::IpAddress};
    let network = instance_network::instance_network();
    let stream = ip_name_lookup::resolve_addresses(&network, name).map_err(|e| format!("{e:?}"))?;
    let mut out = Vec::new();
    loop {
        match stream.resolve_next_address() {
            Ok(Some(IpAddress::Ipv4((a, b, c, d)))) => out.push(format!("{a}.{b}.{c}.{d}")),
            Ok(Some(IpAddress::Ipv6(parts))) => out.push(format!("{parts:?}")),
            Ok(None) => return Ok(out),
            Err(wasip2::sockets::network::ErrorCode::WouldBlock) => stream.subscribe().block(),
            Err(e) => return Err(format!("{e:?}")),
        }
    }
}

fn ping(addr: &str) -> Result<String, String> {
    use std::io::{BufRead as _, Write as _};
    let mut conn = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    conn.write_all(b"ping\n").map_err(|e| e.to_string())?;
    let mut line = String::new();
    std::io::BufReader::new(conn)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    Ok(line.trim_end().to_owned())
}

/// What a failed HTTP call reports: the `wasi:http` error code when there is one.
fn describe(e: &http::Error) -> String {
    match e.downcast_ref::<http::ErrorCode>() {
        Some(code) => format!("{code:?}"),
        None => format!("{e:#}"),
    }
}

async fn fetch(
    method: String,
    mut url: String,
    headers: Vec<(String, String)>,
    body: Option<String>,
    follow: u32,
) -> Result<Value, String> {
    use http::{Body, BodyExt as _, Client, Request};
    let client = Client::new();
    let mut hops = 0;
    loop {
        let mut req = Request::builder().method(method.as_str()).uri(url.as_str());
        for (k, v) in &headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req
            .body(Body::from(body.clone().unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        let resp = client.send(req).await.map_err(|e| describe(&e))?;
        let status = resp.status().as_u16();
        if resp.status().is_redirection() && hops < follow {
            hops += 1;
            url = resp
                .headers()
                .get("location")
                .and_then(|v| v.to_str().ok())
                .ok_or("a redirect without a location")?
                .to_owned();
            continue;
        }
        let mut body = resp.into_body().into_boxed_body();
        let (mut bytes, mut kept) = (0u64, Vec::new());
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("after {bytes} bytes: {}", describe(&e)))?;
            if let Some(data) = frame.data_ref() {
                bytes += data.len() as u64;
                let room = (64usize << 10).saturating_sub(kept.len());
                kept.extend_from_slice(&data[..data.len().min(room)]);
            }
        }
        return Ok(json!({
            "status": status,
            "bytes": bytes,
            "body": String::from_utf8_lossy(&kept),
            "hops": hops,
        }));
    }
}

/// `symlink_at` in the preopened directory `dir` (std has no stable symlink on WASI).
fn symlink(dir: &str, target: &str, link: &str) -> Result<Value, String> {
    let preopens = wasip2::filesystem::preopens::get_directories();
    let (d, _) = preopens
        .iter()
        .find(|(_, name)| name == dir)
        .ok_or_else(|| format!("no preopened directory {dir}"))?;
    d.symlink_at(target, link)
        .map(|()| Value::Null)
        .map_err(|e| format!("{e:?}"))
}

/// Print, log and return `text`.
fn echo(text: &str) -> Value {
    println!("stdout: {text}");
    let _ = writeln!(std::io::stderr(), "stderr: {text}");
    info!("log: {text}");
    Value::from(text)
}

export_task!(run);

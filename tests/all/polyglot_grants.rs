//! Grants in the Python, JavaScript and C guests, through the CLI: with nothing granted each
//! language's idioms reach nothing (files, env, secrets, HTTP, TCP) and a control task runs after;
//! with grants, each reads and writes its directories, sees its variables and secret (redacted in
//! what is recorded), and sends GET and POST requests to a loopback server, while a host outside
//! the grant stays refused. The probe steps are the `probe` mode of `tests/polyglot/<lang>`.

use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use crate::grants::{echo_listener, err, ok, run_json, secrets_file, sluice_lines, steps};
use crate::polyglot::builds::polyglot_guest;
use crate::store::{stderr, write_flow};
use crate::support::{Loopback, guest, task};

const SECRET: &str = "py-js-c-s3cr3t-0451";

/// Whether `e` is how `lang`'s SDK reports a request the grants refused. JavaScript's `fetch`
/// gets no error code, only StarlingMonkey's generic network error; the run's log names the URL.
fn is_denied(lang: &str, e: &str) -> bool {
    match lang {
        "js" => e.contains("NetworkError"),
        _ => e == "HttpRequestDenied",
    }
}

/// A flow of the probe task `t` (`steps`, TOML) with `grants` (TOML lines of `[tasks.t.grants]`)
/// and a Rust control task after it.
fn probe_flow(dir: &Path, lang: &str, steps: &str, grants: &str) -> PathBuf {
    let g = polyglot_guest(lang, "guest");
    let control = guest("add_one");
    write_flow(
        dir,
        &format!(
            "name = \"probe-{lang}\"\n[tasks.t]\ncomponent = {g:?}\ninput = {{ do = \"probe\", steps = [{steps}] }}\n[tasks.t.grants]\n{grants}\n\n[tasks.control]\ncomponent = {control:?}\ninput = 41\nupstream_tasks = [\"t\"]\n"
        ),
    )
}

fn nothing_is_reachable(lang: &str) {
    let server = Loopback::start("127.0.0.1".parse().expect("ip"));
    let (port, accepted) = echo_listener();
    let dir = tempfile::tempdir().expect("tempdir");
    let url = server.url("/json");
    let flow = probe_flow(
        dir.path(),
        lang,
        &format!(
            r#"
  {{ do = "read", path = "/etc/passwd" }},
  {{ do = "write", path = "/tmp/x", text = "x" }},
  {{ do = "env_names" }},
  {{ do = "env", name = "HOME" }},
  {{ do = "secret", name = "API_TOKEN" }},
  {{ do = "http", url = "{url}" }},
  {{ do = "connect", addr = "127.0.0.1:{port}" }},
"#
        ),
        "",
    );
    let home = dir.path().join("home");
    let (out, run) = run_json(&home, &flow, &[]);
    assert!(out.status.success(), "{lang}: {}", stderr(&out));
    let s = steps(&run, "t");
    err(&s[0]);
    err(&s[1]);
    assert_eq!(ok(&s[2]), &json!([]), "{lang}: the environment is empty");
    assert_eq!(ok(&s[3]), &Value::Null, "{lang}");
    assert_eq!(ok(&s[4]), &Value::Null, "{lang}");
    let e = err(&s[5]);
    assert!(is_denied(lang, &e), "{lang}: {e}");
    err(&s[6]);
    assert_eq!(server.requests(), 0, "{lang}: nothing reached the server");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "{lang}: nothing connected"
    );
    let logs = sluice_lines(&home, &run);
    assert!(
        logs.contains(&format!(
            "HTTP request denied: GET {url}: the task is granted no HTTP"
        )),
        "{lang}: {logs}"
    );
    assert_eq!(task(&run, "control")["output"], json!(42), "{lang}");
}

fn grants_are_reachable(lang: &str) {
    let server = Loopback::start("127.0.0.1".parse().expect("ip"));
    let (port, _) = echo_listener();
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("data/in")).expect("data/in");
    std::fs::create_dir_all(dir.path().join("out")).expect("out");
    std::fs::write(dir.path().join("data/in/hello.txt"), "hello from the host").expect("hello");
    let echo = server.url("/echo?q=1");
    let flow = probe_flow(
        dir.path(),
        lang,
        &format!(
            r#"
  {{ do = "read", path = "/in/hello.txt" }},
  {{ do = "write", path = "/in/new.txt", text = "no" }},
  {{ do = "write", path = "/out/result.txt", text = "written by {lang}" }},
  {{ do = "env", name = "REGION" }},
  {{ do = "secret", name = "API_TOKEN" }},
  {{ do = "env_names" }},
  {{ do = "http", url = "{json}" }},
  {{ do = "http", method = "POST", url = "{echo}", headers = [["x-test", "yes"], ["content-type", "text/plain"]], body = "hello, server" }},
  {{ do = "get_json", url = "{json}" }},
  {{ do = "http", url = "http://localhost:{server_port}/json" }},
  {{ do = "connect", addr = "127.0.0.1:{port}" }},
"#,
            json = server.url("/json"),
            server_port = server.port(),
        ),
        &format!(
            r#"http = ["http://127.0.0.1:*"]
tcp = ["127.0.0.1:{port}"]
files = [{{ host = "data/in", guest = "/in", mode = "ro" }}, {{ host = "out", guest = "/out", mode = "rw" }}]
env = {{ REGION = "eu" }}
secrets = ["API_TOKEN"]"#
        ),
    );
    let secrets = secrets_file(dir.path(), SECRET);
    let home = dir.path().join("home");
    let (out, run) = run_json(
        &home,
        &flow,
        &["--secrets", secrets.to_str().expect("utf-8 path")],
    );
    assert!(out.status.success(), "{lang}: {}", stderr(&out));
    let s = steps(&run, "t");
    assert_eq!(ok(&s[0]), "hello from the host", "{lang}");
    err(&s[1]);
    assert!(!dir.path().join("data/in/new.txt").exists(), "{lang}");
    assert_eq!(ok(&s[2]), &Value::Null, "{lang}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/result.txt")).expect("result.txt"),
        format!("written by {lang}")
    );
    assert_eq!(ok(&s[3]), "eu", "{lang}");
    // The guest saw the value; what is recorded has it redacted.
    assert_eq!(ok(&s[4]), "***", "{lang}");
    assert!(!run.to_string().contains(SECRET), "{lang}");
    assert_eq!(ok(&s[5]), &json!(["API_TOKEN", "REGION"]), "{lang}");
    let get = ok(&s[6]);
    assert_eq!(get["status"], 200, "{lang}");
    assert!(
        get["body"]
            .as_str()
            .is_some_and(|b| b.starts_with("{\"items\":")),
        "{lang}: {get}"
    );
    let post = ok(&s[7]);
    assert_eq!(post["status"], 200, "{lang}");
    let echoed: Value =
        serde_json::from_str(post["body"].as_str().expect("body")).expect("echo JSON");
    assert_eq!(echoed["method"], "POST", "{lang}");
    assert_eq!(echoed["path"], "/echo?q=1", "{lang}");
    assert_eq!(echoed["body"], "hello, server", "{lang}");
    let headers = echoed["headers"].as_array().expect("headers");
    assert!(
        headers.iter().any(|h| h[0] == "x-test" && h[1] == "yes"),
        "{lang}: {headers:?}"
    );
    assert!(ok(&s[8])["items"].is_array(), "{lang}: {}", s[8]);
    let e = err(&s[9]);
    assert!(is_denied(lang, &e), "{lang}: {e}");
    // TCP: Python's `socket` reaches the granted address; C opens a socket through the raw
    // bindings; the JavaScript SDK has no TCP.
    match lang {
        "python" => assert_eq!(ok(&s[10]), "pong: ping", "{lang}"),
        "c" => assert_eq!(ok(&s[10]), "connected", "{lang}"),
        _ => assert!(err(&s[10]).contains("no TCP"), "{lang}: {}", s[10]),
    }
    assert_eq!(
        server.requests(),
        3,
        "{lang}: GET, POST and get_json, not the denied one"
    );
    let logs = sluice_lines(&home, &run);
    assert!(
        logs.contains(&format!(
            "HTTP request denied: GET http://localhost:{}/json",
            server.port()
        )),
        "{lang}: {logs}"
    );
}

// One test per language, the two runs in turn, so the language's component is compiled once
// (into the user's artifact cache) before the second run loads it.

#[test]
fn python_reaches_only_what_it_is_granted() {
    nothing_is_reachable("python");
    grants_are_reachable("python");
}

#[test]
fn javascript_reaches_only_what_it_is_granted() {
    nothing_is_reachable("js");
    grants_are_reachable("js");
}

#[test]
fn c_reaches_only_what_it_is_granted() {
    nothing_is_reachable("c");
    grants_are_reachable("c");
}

/// A server on a loopback port that answers every request with `body` as JSON; returns the port.
fn serve_json(body: String) -> u16 {
    use std::io::{BufRead as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let mut reader = std::io::BufReader::new(&conn);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = (&conn).write_all(
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    port
}

#[test]
fn the_http_fetch_example_writes_its_csv_and_a_url_outside_the_grant_is_refused() {
    let build = crate::support::root().join("examples/build");
    std::fs::create_dir_all(&build).expect("examples/build");
    let tmp = build.join(".python_fetch_json.wasm.tmp");
    std::fs::copy(polyglot_guest("python", "fetch_json"), &tmp).expect("copy a guest");
    std::fs::rename(&tmp, build.join("python_fetch_json.wasm")).expect("place a guest");
    let flow = crate::support::example_flow("http-fetch");
    let csv = flow.with_file_name("out").join("orders.csv");
    let _ = std::fs::remove_file(&csv);
    let fixture = std::fs::read_to_string(flow.with_file_name("fixture").join("orders.json"))
        .expect("the fixture");
    let port = serve_json(fixture);
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");

    let url = format!("url=http://127.0.0.1:{port}/orders.json");
    let (out, run) = run_json(&home, &flow, &["--param", &url]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        task(&run, "store")["output"],
        json!({ "path": "/out/orders.csv", "rows": 4, "bytes": 108 })
    );
    assert_eq!(
        std::fs::read_to_string(&csv).expect("orders.csv"),
        "id,customer,items,total\n\
         3,\"Carol, Ltd.\",4,51.60\n\
         1,Alice,3,12.25\n\
         2,Bob,3,11.40\n\
         4,\"Dave \"\"the Baker\"\"\",0,0.00\n"
    );

    // `localhost` is not `127.0.0.1`: refused before anything is sent, on every attempt.
    let denied = format!("http://localhost:{port}/orders.json");
    let (out, run) = run_json(&home, &flow, &["--param", &format!("url={denied}")]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let fetch = task(&run, "fetch");
    assert_eq!(fetch["state"], "Failed", "{fetch}");
    assert_eq!(
        fetch["message"],
        format!("GET {denied}: HttpRequestDenied"),
        "{fetch}"
    );
    let logs = sluice_lines(&home, &run);
    assert!(
        logs.contains(&format!(
            "HTTP request denied: GET {denied}: not granted (grants: http://127.0.0.1:*)"
        )),
        "{logs}"
    );
}

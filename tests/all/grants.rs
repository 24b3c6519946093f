//! Capability grants through the CLI: nothing reachable by default, preopened directories
//! (read-only, read-write, escapes refused), env and secrets only where granted, secret values
//! nowhere in what a run leaves behind, the operator's policy, and grants in the cache key.

use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::{Value, json};

use crate::store::{stderr, write_flow};
use crate::support::{Loopback, guest, json_of, sluice, task};

/// A secret value long enough to redact and unlike anything else a run prints.
const SECRET: &str = "s3cr3t-VALUE-4242-xyzzy";

fn grants_guest() -> String {
    guest("grants").display().to_string()
}

fn add_one() -> String {
    guest("add_one").display().to_string()
}

/// The results of a grants task's steps, from `sluice run --json` output.
pub(crate) fn steps(run: &Value, name: &str) -> Vec<Value> {
    task(run, name)["output"]
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("task {name} has no list output: {run:#}"))
}

pub(crate) fn ok(v: &Value) -> &Value {
    assert!(v.get("err").is_none(), "expected success, got {v}");
    &v["ok"]
}

pub(crate) fn err(v: &Value) -> String {
    v["err"]
        .as_str()
        .unwrap_or_else(|| panic!("expected a refusal, got {v}"))
        .to_owned()
}

pub(crate) fn run_json(home: &Path, flow: &Path, extra: &[&str]) -> (Output, Value) {
    let flow = flow.to_str().expect("utf-8 path");
    let mut args = vec!["run", flow, "--json"];
    args.extend_from_slice(extra);
    let out = sluice(home, &args);
    let v = json_of(&out);
    (out, v)
}

#[test]
fn nothing_is_reachable_without_grants_and_a_control_task_runs_after() {
    let dir = tempfile::tempdir().expect("tempdir");
    let g = grants_guest();
    let flow = write_flow(
        dir.path(),
        &format!(
            r#"name = "deny"
[tasks.probe]
component = {g:?}
input = [
  {{ do = "read", path = "/etc/passwd" }},
  {{ do = "list", path = "/" }},
  {{ do = "list", path = "." }},
  {{ do = "env_names" }},
  {{ do = "env", name = "HOME" }},
  {{ do = "env", name = "API_TOKEN" }},
  {{ do = "write", path = "/tmp/x", text = "x" }},
]
[tasks.control]
component = {a:?}
input = 41
upstream_tasks = ["probe"]
"#,
            a = add_one()
        ),
    );
    let home = dir.path().join("home");
    let (out, run) = run_json(&home, &flow, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = steps(&run, "probe");
    for i in [0, 1, 2, 4, 5, 6] {
        err(&s[i]);
    }
    assert_eq!(ok(&s[3]), &json!([]), "the environment is empty");
    assert_eq!(task(&run, "control")["output"], json!(42));
}

/// `data/in` (read only, with a file and a symbolic link pointing out of it) and `out` (read
/// and write) beside the manifest; returns the manifest.
fn files_flow(dir: &Path) -> PathBuf {
    let input = dir.join("data/in");
    std::fs::create_dir_all(&input).expect("data/in");
    std::fs::write(input.join("hello.txt"), "hello from the host").expect("hello.txt");
    std::fs::write(dir.join("outside.txt"), "outside").expect("outside.txt");
    std::os::unix::fs::symlink(dir.join("outside.txt"), input.join("escape")).expect("symlink");
    let g = grants_guest();
    write_flow(
        dir,
        &format!(
            r#"name = "files"
[tasks.files]
component = {g:?}
input = [
  {{ do = "read", path = "/in/hello.txt" }},
  {{ do = "list", path = "/in" }},
  {{ do = "write", path = "/in/new.txt", text = "no" }},
  {{ do = "remove", path = "/in/hello.txt" }},
  {{ do = "write", path = "/out/result.txt", text = "written by the guest" }},
  {{ do = "read", path = "/out/result.txt" }},
  {{ do = "read", path = "/in/../outside.txt" }},
  {{ do = "read", path = "/in/../../outside.txt" }},
  {{ do = "read", path = "/out/../data/in/hello.txt" }},
  {{ do = "read", path = "{outside}" }},
  {{ do = "read", path = "/in/escape" }},
  {{ do = "symlink", dir = "/out", target = "{outside}", link = "leak" }},
  {{ do = "read", path = "/out/leak" }},
  {{ do = "symlink", dir = "/out", target = "../outside.txt", link = "up" }},
  {{ do = "read", path = "/out/up" }},
]
[tasks.files.grants]
files = [
  {{ host = "data/in", guest = "/in", mode = "ro" }},
  {{ host = "out", guest = "/out", mode = "rw" }},
]
"#,
            outside = dir.join("outside.txt").display()
        ),
    )
}

#[test]
fn granted_directories_are_read_only_or_writable_and_nothing_escapes_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = files_flow(dir.path());
    let home = dir.path().join("home");
    let (out, run) = run_json(&home, &flow, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = steps(&run, "files");
    assert_eq!(ok(&s[0]), "hello from the host");
    assert_eq!(ok(&s[1]), &json!(["escape", "hello.txt"]));
    // Read only: no new file, no removal.
    err(&s[2]);
    err(&s[3]);
    assert!(!dir.path().join("data/in/new.txt").exists());
    assert!(dir.path().join("data/in/hello.txt").exists());
    // Read-write: written on the host, where `out/` was created for the run.
    ok(&s[4]);
    assert_eq!(ok(&s[5]), "written by the guest");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out/result.txt")).expect("result on the host"),
        "written by the guest"
    );
    // `..` out of a granted directory, an absolute host path, a host symlink pointing out, and
    // symlinks the guest made in its writable directory: all refused.
    for (i, what) in [
        (6, "`..` above /in"),
        (7, "`..` twice above /in"),
        (8, "`..` from /out into another directory"),
        (9, "an absolute host path"),
        (10, "a host symlink pointing out"),
        (12, "a guest symlink to an absolute path"),
        (14, "a guest symlink with `..`"),
    ] {
        let e = err(&s[i]);
        assert!(!e.contains("outside"), "{what}: {e}");
    }
}

/// A private secrets file holding `API_TOKEN`.
pub(crate) fn secrets_file(dir: &Path, value: &str) -> PathBuf {
    let path = dir.join("secrets.env");
    std::fs::write(&path, format!("# test secrets\nAPI_TOKEN={value}\n")).expect("secrets");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    path
}

fn secrets_flow(dir: &Path) -> PathBuf {
    let g = grants_guest();
    write_flow(
        dir,
        &format!(
            r#"name = "secrets"
[grants]
env = {{ REGION = "eu" }}
secrets = ["API_TOKEN"]

[tasks.granted]
component = {g:?}
input = [
  {{ do = "env", name = "REGION" }},
  {{ do = "leak", name = "API_TOKEN" }},
  {{ do = "env_names" }},
]
cache_for = "1h"

[tasks.narrowed]
component = {g:?}
input = [{{ do = "env", name = "API_TOKEN" }}, {{ do = "env", name = "REGION" }}]
[tasks.narrowed.grants]
secrets = []

[tasks.fails]
component = {g:?}
input = [{{ do = "fail_with", name = "API_TOKEN" }}]
"#
        ),
    )
}

/// Every file under `dir`, as bytes.
fn files_under(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if let Ok(bytes) = std::fs::read(&p) {
                out.push((p, bytes));
            }
        }
    }
    out
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

#[test]
fn secrets_reach_only_granted_tasks_and_their_values_are_recorded_nowhere() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = secrets_flow(dir.path());
    let home = dir.path().join("home");
    let secrets = secrets_file(dir.path(), SECRET);
    let secrets = secrets.to_str().expect("utf-8");
    let (out, run) = run_json(&home, &flow, &["--secrets", secrets]);
    assert!(!out.status.success(), "`fails` fails the run");
    let s = steps(&run, "granted");
    assert_eq!(ok(&s[0]), "eu");
    // The guest had the value; what was recorded of its output has `***` instead.
    assert_eq!(ok(&s[1]), "***");
    assert_eq!(ok(&s[2]), &json!(["API_TOKEN", "REGION"]));
    // A task may narrow what the flow grants: no secret, the env still inherited.
    let n = steps(&run, "narrowed");
    err(&n[0]);
    assert_eq!(ok(&n[1]), "eu");
    let failed = task(&run, "fails");
    assert_eq!(failed["state"], "Failed");
    assert_eq!(failed["message"], "failing with ***");

    let id = run["id"].as_str().expect("run id").to_owned();
    let show = sluice(&home, &["show", &id, "--json"]);
    let logs = sluice(&home, &["logs", &id]);
    let human = sluice(&home, &["show", &id]);
    for o in [&out, &show, &logs, &human] {
        assert!(o.status.success() || std::ptr::eq(o, &out), "{}", stderr(o));
        for bytes in [&o.stdout, &o.stderr] {
            assert!(
                !contains(bytes, SECRET),
                "the secret is in: {}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
    let logs = String::from_utf8_lossy(&logs.stdout);
    for line in ["stdout: ***", "stderr: ***", "log: ***"] {
        assert!(logs.contains(line), "no `{line}` in the logs:\n{logs}");
    }
    // Not in the database, its WAL, or any other file of the home.
    for (path, bytes) in files_under(&home) {
        assert!(
            !contains(&bytes, SECRET),
            "the secret is in {}",
            path.display()
        );
    }
    // `show` lists each task's grants, secrets by name.
    let show = json_of(&show);
    assert_eq!(
        task(&show, "granted")["grants"],
        json!({"env": {"REGION": "eu"}, "secrets": ["API_TOKEN"]})
    );
    assert_eq!(
        task(&show, "narrowed")["grants"],
        json!({"env": {"REGION": "eu"}})
    );
    let human = String::from_utf8_lossy(&human.stdout);
    for line in [
        "granted: env: REGION=eu",
        "granted: secret: API_TOKEN",
        "narrowed: env: REGION=eu",
    ] {
        assert!(human.contains(line), "no `{line}` in show:\n{human}");
    }

    // The same value from the environment instead of the file: a cache hit.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", flow.to_str().expect("utf-8"), "--json"])
        .env("SLUICE_HOME", &home)
        .env("SLUICE_SECRET_API_TOKEN", SECRET)
        .output()
        .expect("run sluice");
    let again = json_of(&again);
    assert_eq!(
        task(&again, "granted")["cache"]["status"],
        "hit",
        "{again:#}"
    );
    // A rotated value misses, saying why.
    let rotated = secrets_file(dir.path(), "another-secret-value-0001");
    let (_, third) = run_json(
        &home,
        &flow,
        &["--secrets", rotated.to_str().expect("utf-8")],
    );
    let cache = &task(&third, "granted")["cache"];
    assert_eq!(cache["status"], "miss", "{cache}");
    assert_eq!(cache["reason"], "the value of a granted secret changed");
}

#[test]
fn a_missing_secret_or_a_readable_secrets_file_stops_the_run_before_it_starts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let flow = secrets_flow(dir.path());
    let home = dir.path().join("home");
    let (out, _) = (sluice(&home, &["run", flow.to_str().expect("utf-8")]), ());
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(
        e.contains("task `granted`: secret `API_TOKEN` is granted but has no value")
            && e.contains("SLUICE_SECRET_API_TOKEN"),
        "{e}"
    );
    let with_secrets = |file: &Path| {
        let file = file.to_str().expect("utf-8");
        sluice(
            &home,
            &["run", flow.to_str().expect("utf-8"), "--secrets", file],
        )
    };
    let secrets = secrets_file(dir.path(), SECRET);
    std::fs::set_permissions(&secrets, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let out = with_secrets(&secrets);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let e = stderr(&out);
    assert!(e.contains("secrets.env") && e.contains("mode 644"), "{e}");
    let out = with_secrets(&secrets_file(dir.path(), "short"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("shorter than 8 bytes"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn changing_a_grant_misses_the_cache_and_says_so() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let g = grants_guest();
    let flow = |region: &str| {
        write_flow(
            dir.path(),
            &format!(
                r#"name = "cached"
[tasks.t]
component = {g:?}
input = [{{ do = "env", name = "REGION" }}]
cache_for = "1h"
[tasks.t.grants]
env = {{ REGION = "{region}" }}
"#
            ),
        )
    };
    let (_, first) = run_json(&home, &flow("eu"), &[]);
    assert_eq!(task(&first, "t")["cache"]["status"], "miss");
    let (_, hit) = run_json(&home, &flow("eu"), &[]);
    assert_eq!(task(&hit, "t")["cache"]["status"], "hit");
    let (_, changed) = run_json(&home, &flow("us"), &[]);
    let t = task(&changed, "t");
    assert_eq!(
        t["cache"]["reason"],
        "the grants changed (files, env or secrets granted to the task)"
    );
    assert_eq!(ok(&steps(&changed, "t")[0]), "us");
}

#[test]
fn the_policy_refuses_grants_beyond_it_naming_the_manifest_and_policy_lines() {
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    std::fs::create_dir_all(dir.path().join("data/out")).expect("dirs");
    let policy = dir.path().join("policy.toml");
    std::fs::write(
        &policy,
        format!(
            "# the operator's ceiling\n[grants]\nfiles = [{:?}, {{ path = {:?}, mode = \"rw\" }}]\nenv = [\"REGION\"]\nsecrets = []\nhttp = [\"http://127.0.0.1:8080/v1\"]\n",
            dir.path().join("data").display().to_string(),
            dir.path().join("data/out").display().to_string(),
        ),
    )
    .expect("policy");
    let g = grants_guest();
    let flow = |grants: &str| {
        write_flow(
            dir.path(),
            &format!(
                "name = \"policed\"\n[tasks.t]\ncomponent = {g:?}\ninput = [{{ do = \"list\", path = \"/d\" }}]\n[tasks.t.grants]\n{grants}\n"
            ),
        )
    };
    let run = |flow: &Path| {
        sluice(
            &home,
            &[
                "run",
                flow.to_str().expect("utf-8"),
                "--json",
                "--policy",
                policy.to_str().expect("utf-8"),
            ],
        )
    };
    // At the ceiling: read the data directory, write its `out`, env REGION.
    let at = run(&flow(
        "files = [{ host = \"data\", guest = \"/d\" }, { host = \"data/out\", guest = \"/o\", mode = \"rw\" }]\nenv = { REGION = \"eu\" }\nhttp = [{ url = \"http://127.0.0.1:8080/v1/x\", methods = [\"GET\"] }]",
    ));
    assert!(at.status.success(), "{}", stderr(&at));
    let policy_name = policy.display().to_string();
    // One over, each kind: writing where only reading is allowed, a directory outside, an env
    // variable and a secret the policy does not list.
    for (grants, column, grant, why) in [
        (
            "files = [{ host = \"data\", guest = \"/d\", mode = \"rw\" }]",
            10,
            "files[0]",
            format!("{policy_name}:3 allows"),
        ),
        (
            "files = [{ host = \".\", guest = \"/d\" }]",
            10,
            "files[0]",
            format!("{policy_name}:3: no entry of `files` contains"),
        ),
        (
            "env = { HOME = \"/root\" }",
            9,
            "env HOME",
            format!("{policy_name}:4: `env` does not list HOME"),
        ),
        (
            "secrets = [\"API_TOKEN\"]",
            12,
            "secret API_TOKEN",
            format!("{policy_name}:5: `secrets` does not list API_TOKEN"),
        ),
        (
            "http = [\"http://127.0.0.1:*\"]",
            9,
            "http[0] (http://127.0.0.1:*)",
            format!("{policy_name}:6: no entry of `http` covers it"),
        ),
    ] {
        let path = flow(grants);
        let out = run(&path);
        assert_eq!(out.status.code(), Some(2), "{grants}: {}", stderr(&out));
        let e = stderr(&out);
        let at = format!("{}:6:{column}: task `t`: grant {grant}", path.display());
        assert!(e.contains(&at), "{grants}: expected `{at}` in {e}");
        assert!(e.contains(&why), "{grants}: expected `{why}` in {e}");
    }
    // The policy in the home applies without --policy.
    std::fs::create_dir_all(&home).expect("home");
    std::fs::copy(&policy, home.join("policy.toml")).expect("copy policy");
    let out = sluice(
        &home,
        &[
            "run",
            flow("secrets = [\"API_TOKEN\"]").to_str().expect("utf-8"),
        ],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("home/policy.toml:5"),
        "{}",
        stderr(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// HTTP, against a loopback server started by the test

fn loopback(ip: &str) -> Loopback {
    Loopback::start(ip.parse().expect("ip"))
}

/// A flow of one grants task `t` doing `steps` (TOML), with `task_keys` and `grants` (TOML
/// lines of `[tasks.t]` and `[tasks.t.grants]`).
fn http_flow(dir: &Path, steps: &str, task_keys: &str, grants: &str) -> PathBuf {
    let g = grants_guest();
    write_flow(
        dir,
        &format!(
            "name = \"http\"\n[tasks.t]\ncomponent = {g:?}\ninput = [{steps}]\n{task_keys}\n[tasks.t.grants]\n{grants}\n"
        ),
    )
}

fn get(url: &str) -> String {
    format!("{{ do = \"http\", url = \"{url}\" }}")
}

/// The records of the run's logs that Sluice wrote.
pub(crate) fn sluice_lines(home: &Path, run: &Value) -> String {
    let id = run["id"].as_str().expect("id");
    let logs = sluice(home, &["logs", id]);
    String::from_utf8_lossy(&logs.stdout).into_owned()
}

#[test]
fn without_an_http_grant_a_request_is_refused_before_it_is_sent() {
    let server = loopback("127.0.0.1");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let flow = http_flow(dir.path(), &get(&server.url("/json")), "", "files = []");
    let (out, run) = run_json(&home, &flow, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(err(&steps(&run, "t")[0]), "ErrorCode::HttpRequestDenied");
    assert_eq!(server.requests(), 0, "nothing reached the server");
    let logs = sluice_lines(&home, &run);
    assert!(
        logs.contains(&format!(
            "HTTP request denied: GET {}: the task is granted no HTTP",
            server.url("/json")
        )),
        "{logs}"
    );
}

#[test]
fn granted_http_gets_and_posts_with_headers_and_bodies() {
    let server = loopback("127.0.0.1");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let post = format!(
        "{{ do = \"http\", method = \"POST\", url = \"{}\", headers = [[\"x-test\", \"yes\"], [\"content-type\", \"text/plain\"]], body = \"hello, server\" }}",
        server.url("/echo?q=1")
    );
    let flow = http_flow(
        dir.path(),
        &format!("{}, {post}", get(&server.url("/json"))),
        "",
        "http = [\"http://127.0.0.1:*\"]",
    );
    let (out, run) = run_json(&home, &flow, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = steps(&run, "t");
    let json = ok(&s[0]);
    assert_eq!(json["status"], 200);
    assert_eq!(json["bytes"], 1024);
    assert!(
        json["body"]
            .as_str()
            .expect("body")
            .starts_with("{\"items\":")
    );
    let echo: Value =
        serde_json::from_str(ok(&s[1])["body"].as_str().expect("body")).expect("echo JSON");
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/echo?q=1");
    assert_eq!(echo["body"], "hello, server");
    let headers = echo["headers"].as_array().expect("headers");
    let has = |k: &str, v: &str| headers.iter().any(|h| h[0] == k && h[1] == v);
    assert!(has("x-test", "yes"), "{headers:?}");
    // wasmtime 48.0.0 sent no Host header (wasmtime#14190); 48.0.8 does.
    assert!(
        has("host", &format!("127.0.0.1:{}", server.port())),
        "{headers:?}"
    );
    assert_eq!(server.requests(), 2);
}

#[test]
fn the_request_limit_and_the_response_bytes_limit_hold_exactly() {
    let server = loopback("127.0.0.1");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let grant = "http = [\"http://127.0.0.1:*\"]";
    let run = |steps: &str, keys: &str| {
        let (out, run) = run_json(&home, &http_flow(dir.path(), steps, keys, grant), &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        (steps_of(&run), run)
    };
    fn steps_of(run: &Value) -> Vec<Value> {
        steps(run, "t")
    }
    let json = get(&server.url("/json"));
    // At the request limit, then one over.
    let (at, _) = run(&[json.as_str(); 2].join(", "), "http_requests = 2");
    at.iter().for_each(|s| assert_eq!(ok(s)["status"], 200));
    let before = server.requests();
    let (over, over_run) = run(&[json.as_str(); 3].join(", "), "http_requests = 2");
    assert_eq!(ok(&over[1])["status"], 200);
    assert_eq!(err(&over[2]), "ErrorCode::HttpRequestDenied");
    assert_eq!(server.requests() - before, 2, "the third was never sent");
    let logs = sluice_lines(&home, &over_run);
    assert!(
        logs.contains("the run's limit of 2 HTTP requests is reached (`http_requests`)"),
        "{logs}"
    );
    // Response bytes, summed over the run's responses: at the limit, then one over, declared
    // (Content-Length) or streamed (chunked).
    let limit = "http_response_bytes = 1000";
    let bytes = |path: &str| get(&server.url(path));
    let (at, _) = run(
        &format!("{}, {}", bytes("/bytes/600"), bytes("/bytes/400")),
        limit,
    );
    assert_eq!(ok(&at[1])["bytes"], 400);
    let (at, _) = run(&bytes("/chunked/1000"), limit);
    assert_eq!(ok(&at[0])["bytes"], 1000);
    let (over, over_run) = run(
        &format!("{}, {}", bytes("/bytes/600"), bytes("/bytes/401")),
        limit,
    );
    assert_eq!(ok(&over[0])["bytes"], 600);
    assert_eq!(err(&over[1]), "ErrorCode::HttpResponseBodySize(Some(1000))");
    assert!(
        sluice_lines(&home, &over_run)
            .contains("the run's limit of 1000 response body bytes is reached"),
    );
    let (over, _) = run(&bytes("/chunked/1001"), limit);
    let e = err(&over[0]);
    assert!(e.starts_with("after "), "the stream fails part way: {e}");
}

#[test]
fn a_stalled_server_ends_the_run_at_its_deadline_and_the_connection_is_closed() {
    let server = loopback("127.0.0.1");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let grant = "http = [\"http://127.0.0.1:*\"]";
    let flow = http_flow(
        dir.path(),
        &get(&server.url("/stall")),
        "timeout = \"1s\"",
        grant,
    );
    let (_, run) = run_json(&home, &flow, &[]);
    let t = task(&run, "t");
    assert_eq!(t["state"], "TimedOut", "{t:#}");
    // The request died with the run's store: the server sees its connection closed.
    let waited = std::time::Instant::now();
    while server.stalls_closed() == 0 && waited.elapsed() < std::time::Duration::from_secs(30) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(
        server.stalls_closed(),
        1,
        "the stalled connection was not closed"
    );
    // Under a longer deadline, the read timeout gives the guest an error it can handle.
    let flow = http_flow(
        dir.path(),
        &get(&server.url("/stall")),
        "timeout = \"30s\"\nhttp_read_timeout = \"300ms\"",
        grant,
    );
    let (out, run) = run_json(&home, &flow, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        err(&steps(&run, "t")[0]),
        "ErrorCode::ConnectionReadTimeout"
    );
}

#[test]
fn hosts_ports_and_redirects_outside_the_grant_are_refused() {
    let a = loopback("127.0.0.1");
    let b = loopback("127.0.0.2");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let redirect = format!(
        "{{ do = \"http\", url = \"{}\", follow = 1 }}",
        a.url(&format!("/redirect?to={}", b.url("/json")))
    );
    let inside = format!(
        "{{ do = \"http\", url = \"{}\", follow = 1 }}",
        a.url(&format!("/redirect?to={}", a.url("/json")))
    );
    let steps_toml = [
        get(&a.url("/json")),
        get(&b.url("/json")),
        get(&format!("http://localhost:{}/json", a.port())),
        get(&format!("https://127.0.0.1:{}/json", a.port())),
        redirect,
        inside,
    ]
    .join(", ");
    let flow = http_flow(
        dir.path(),
        &steps_toml,
        "",
        &format!("http = [\"http://127.0.0.1:{}\"]", a.port()),
    );
    let (out, run) = run_json(&home, &flow, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = steps(&run, "t");
    assert_eq!(ok(&s[0])["status"], 200);
    for (i, what) in [
        (1, "127.0.0.2"),
        (2, "localhost for 127.0.0.1"),
        (3, "https"),
    ] {
        assert_eq!(err(&s[i]), "ErrorCode::HttpRequestDenied", "{what}");
    }
    assert_eq!(
        err(&s[4]),
        "ErrorCode::HttpRequestDenied",
        "the redirect to 127.0.0.2"
    );
    assert_eq!(
        ok(&s[5])["hops"],
        1,
        "a redirect inside the grant is followed"
    );
    assert_eq!(b.requests(), 0, "nothing reached 127.0.0.2");
    // Another port of the granted address.
    let other = loopback("127.0.0.1");
    let flow = http_flow(
        dir.path(),
        &get(&other.url("/json")),
        "",
        &format!("http = [\"http://127.0.0.1:{}\"]", a.port()),
    );
    let (_, run) = run_json(&home, &flow, &[]);
    assert_eq!(err(&steps(&run, "t")[0]), "ErrorCode::HttpRequestDenied");
    assert_eq!(other.requests(), 0);
}

#[test]
fn a_gigabyte_response_is_refused_at_the_cap_with_the_host_memory_flat() {
    let server = loopback("127.0.0.1");
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let grant = "http = [\"http://127.0.0.1:*\"]";
    let measure = |path: &str| {
        let flow = http_flow(dir.path(), &get(&server.url(path)), "", grant);
        let (peak, code, _) =
            crate::memory::peak_rss(&home, &["run", flow.to_str().expect("utf-8"), "--json"]);
        assert_eq!(code, 0);
        peak
    };
    let small = measure("/chunked/1024");
    let big = measure(&format!("/chunked/{}", 1u64 << 30));
    eprintln!("peak RSS: 1 KiB response {small} B, 1 GiB response (cap 64 MiB) {big} B");
    assert!(
        big < small + (24 << 20),
        "the host held the response: {big} B against {small} B"
    );
}

// ---------------------------------------------------------------------------------------------
// TCP, against a loopback echo listener started by the test

/// A listener on 127.0.0.1 that answers each line with `pong: <line>`; counts connections.
pub(crate) fn echo_listener() -> (u16, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    use std::io::{BufRead as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = std::io::BufReader::new(&conn);
                if reader.read_line(&mut line).is_ok() {
                    let _ = (&conn).write_all(format!("pong: {line}").as_bytes());
                }
            });
        }
    });
    (port, accepted)
}

#[test]
fn tcp_reaches_granted_addresses_and_looks_up_granted_names_only() {
    let (port, accepted) = echo_listener();
    let (other, other_accepted) = echo_listener();
    let dir = tempfile::tempdir().expect("tempdir");
    let home = dir.path().join("home");
    let connect = |addr: &str| format!("{{ do = \"connect\", addr = \"{addr}\" }}");
    let resolve = |name: &str| format!("{{ do = \"resolve\", name = \"{name}\" }}");
    // No grant: refused.
    let flow = http_flow(
        dir.path(),
        &connect(&format!("127.0.0.1:{port}")),
        "",
        "files = []",
    );
    let (_, run) = run_json(&home, &flow, &[]);
    err(&steps(&run, "t")[0]);
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    // An address grant: that address and port only.
    let steps_toml = [
        connect(&format!("127.0.0.1:{port}")),
        connect(&format!("127.0.0.1:{other}")),
        connect(&format!("127.0.0.2:{port}")),
        resolve("localhost"),
        "{ do = \"lookup\", name = \"127.0.0.1\" }".to_owned(),
    ]
    .join(", ");
    let flow = http_flow(
        dir.path(),
        &steps_toml,
        "",
        &format!("tcp = [\"127.0.0.1:{port}\"]"),
    );
    let (out, run) = run_json(&home, &flow, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = steps(&run, "t");
    assert_eq!(ok(&s[0]), "pong: ping");
    err(&s[1]);
    err(&s[2]);
    err(&s[3]);
    // An address looked up (as libc does before connecting) is answered without a query.
    assert_eq!(ok(&s[4]), &json!(["127.0.0.1"]));
    assert_eq!(other_accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    let logs = sluice_lines(&home, &run);
    assert!(
        logs.contains(&format!("TCP denied: TcpConnect 127.0.0.1:{other}")),
        "{logs}"
    );
    assert!(logs.contains("name lookup denied: localhost"), "{logs}");
    // A name grant: that name may be looked up, and what it resolves to reached; no other name.
    let steps_toml = [
        connect(&format!("127.0.0.1:{port}")),
        resolve("localhost"),
        connect(&format!("localhost:{port}")),
        resolve("example.com"),
        connect(&format!("localhost:{other}")),
    ]
    .join(", ");
    let flow = http_flow(
        dir.path(),
        &steps_toml,
        "",
        &format!("tcp = [\"localhost:{port}\"]"),
    );
    let (out, run) = run_json(&home, &flow, &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = steps(&run, "t");
    err(&s[0]); // not looked up yet: the address is not the name's
    assert!(
        ok(&s[1])
            .as_array()
            .is_some_and(|a| a.iter().any(|ip| ip == "127.0.0.1")),
        "{}",
        s[1]
    );
    assert_eq!(ok(&s[2]), "pong: ping");
    err(&s[3]);
    err(&s[4]);
    assert!(
        sluice_lines(&home, &run).contains("name lookup denied: example.com"),
        "no log of the refused lookup"
    );
    assert_eq!(other_accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
}

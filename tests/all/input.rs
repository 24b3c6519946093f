//! Bad input and a hostile home, through the `sluice` binary as a user meets them: names too
//! long for a table, component paths that are not components (a device, a directory, a huge
//! file), manifest values that are wrong, `--param` JSON nested too deep, `runs --limit 0`,
//! `cache ls` on a read-only home, compile messages with `..` in paths, and precompiled
//! artifacts planted under another component's digest (artifacts are per user and
//! authenticated).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::Value;
use sluice::flow::manifest;

use crate::support::{example_flow, guest};

/// A home, a per-user cache (the key) and an artifact directory of its own.
struct Env {
    dir: tempfile::TempDir,
}

impl Env {
    fn new() -> Env {
        Env {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn home(&self) -> PathBuf {
        self.path("home")
    }

    fn artifacts(&self) -> PathBuf {
        self.path("artifacts")
    }

    fn command(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_sluice"));
        c.env("SLUICE_HOME", self.home())
            .env("XDG_CACHE_HOME", self.path("cache"))
            .env("SLUICE_ARTIFACTS", self.artifacts())
            .env_remove("SLUICE_MAX_COMPONENT_SIZE");
        c
    }

    fn sluice(&self, args: &[&str]) -> Output {
        let mut c = self.command();
        c.args(args);
        within(c, Duration::from_secs(120))
    }

    /// Write a manifest `text` as `<name>.toml` in the environment's directory.
    fn manifest(&self, name: &str, text: &str) -> String {
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, text).expect("write the manifest");
        path.display().to_string()
    }
}

/// Run `cmd`, killing it if it takes longer than `limit` (a test that hangs says so).
fn within(mut cmd: Command, limit: Duration) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sluice");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => out.expect("wait for sluice"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("sluice did not finish within {limit:?}");
        }
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn json_of(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            stdout(out),
            stderr(out)
        )
    })
}

fn path_of(name: &str) -> String {
    guest(name).display().to_string()
}

/// Flow and task names of 70,000 characters (past the 65,535 a format width can be) are
/// elided in every table: `run`, `runs` and `show` succeed, and the JSON keeps them whole.
#[test]
fn names_too_long_for_a_table_are_elided_not_a_panic() {
    let env = Env::new();
    let flow_name = "f".repeat(70_000);
    let task_name = "t".repeat(70_000);
    let flow = env.manifest(
        "long",
        &format!(
            "name = \"{flow_name}\"\n[tasks.{task_name}]\ncomponent = {:?}\ninput = 1\n",
            path_of("add_one")
        ),
    );
    let out = env.sluice(&["run", &flow]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains(&format!("{}…", "t".repeat(47))),
        "{table:.300}"
    );
    assert!(
        table.lines().all(|l| l.chars().count() < 400),
        "{table:.300}"
    );

    let out = env.sluice(&["runs"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let table = stdout(&out);
    assert!(
        table.contains(&format!("{}…", "f".repeat(47))),
        "{table:.300}"
    );
    assert!(table.contains("Completed"), "{table:.300}");

    let out = env.sluice(&["runs", "--json"]);
    let runs = json_of(&out);
    assert_eq!(runs[0]["flow"], flow_name.as_str());
    let id = runs[0]["id"].as_str().expect("id").to_owned();
    let out = env.sluice(&["show", &id]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("Completed"));
}

/// A component path is read only if it is a regular file no larger than the component size
/// limit: a device, a directory or a huge file is refused at once, naming what it is or the
/// limit; at the limit a component loads.
#[test]
fn only_regular_files_within_the_size_limit_are_read() {
    let env = Env::new();
    let started = std::time::Instant::now();
    let out = env.sluice(&["task", "run", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("`/dev/zero` is not a component file: it is a character device"),
        "{}",
        stderr(&out)
    );
    assert!(started.elapsed() < Duration::from_secs(10));

    let dir = env.path("a-directory.wasm");
    std::fs::create_dir_all(&dir).expect("dir");
    let out = env.sluice(&["task", "run", &dir.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not a component file: it is a directory"),
        "{}",
        stderr(&out)
    );

    // One byte over the default limit (a sparse file: nothing is written, nothing read).
    let huge = env.path("huge.wasm");
    std::fs::File::create(&huge)
        .and_then(|f| f.set_len((256 << 20) + 1))
        .expect("sparse file");
    let out = env.sluice(&["task", "run", &huge.display().to_string()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains(
            "huge.wasm` is larger than the component size limit of 268435456 bytes (256.0 MiB)"
        ),
        "{}",
        stderr(&out)
    );

    // The limit is configurable: a byte less than the component's size refuses it (first: a
    // component loaded once is found through the file index later, without reading it), at its
    // size it loads.
    let add_one = path_of("add_one");
    let size = std::fs::metadata(&add_one).expect("add_one").len();
    let mut cmd = env.command();
    cmd.args(["task", "run", &add_one, "--input", "1"])
        .env("SLUICE_MAX_COMPONENT_SIZE", (size - 1).to_string());
    let out = within(cmd, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!(
            "is larger than the component size limit of {} bytes",
            size - 1
        )),
        "{}",
        stderr(&out)
    );
    let out = env.sluice(&[
        "task",
        "run",
        &add_one,
        "--input",
        "1",
        "--max-component-size",
        &size.to_string(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));

    // A manifest naming a directory says so, not that it does not exist.
    let flow = env.manifest(
        "dir",
        &format!(
            "name = \"d\"\n[tasks.a]\ncomponent = {:?}\n",
            dir.display().to_string()
        ),
    );
    let out = env.sluice(&["run", &flow]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("is not a file (looked at"),
        "{}",
        stderr(&out)
    );
    control_task_completes(&env);
}

fn control_task_completes(env: &Env) {
    let out = env.sluice(&[
        "task",
        "run",
        &path_of("add_one"),
        "--input",
        "41",
        "--json",
    ]);
    assert_eq!(json_of(&out)["output"], 42, "{}", stderr(&out));
}

/// Each wrong value in a manifest is an error naming the file, line, column, task and key.
#[test]
fn wrong_manifest_values_are_located_errors() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("flow.toml");
    std::fs::write(dir.path().join("t.wasm"), b"").expect("write");
    let err = |text: &str| {
        manifest::parse(&file, text)
            .expect_err("invalid")
            .to_string()
            .replace(&dir.path().display().to_string(), "DIR")
    };
    let task = |line: &str| format!("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\n{line}\n");
    assert_eq!(
        err("name = \"f\"\n[tasks.a]\ncomponent = { path = \"t.wasm\", buld = \"make\" }\n"),
        "DIR/flow.toml:3:13: task `a`: unknown key `buld` in `component` (did you mean \
         `build`?); expected one of `path`, `build`, `sources`"
    );
    assert_eq!(
        err("name = \"f\"\n[tasks.a]\ncomponent = { build = \"make\" }\n"),
        "DIR/flow.toml:3:13: task `a`: `component` needs `path` (the component file, built by \
         `build` if given)"
    );
    assert_eq!(
        err("name = \"f\"\n[tasks.a]\ncomponent = 5\n"),
        "DIR/flow.toml:3:13: task `a`: `component` = 5 must be a path like \"tasks/a.wasm\" or \
         a table like { path = \"tasks/a.wasm\", build = \"make\", sources = [\"src/\"] }"
    );
    assert_eq!(
        err(&task("fuel = -5")),
        "DIR/flow.toml:4:8: task `a`: `fuel` = -5 must be a number of fuel units (0 or more) or \
         \"unlimited\""
    );
    assert_eq!(
        err(&task("memory = -1")),
        "DIR/flow.toml:4:10: task `a`: `memory` = -1 must be a size like \"64MiB\" or a number \
         of bytes"
    );
    assert_eq!(
        err(&task("map = \"yes\"")),
        "DIR/flow.toml:4:7: task `a`: `map` = \"yes\" must be true (one run per element of the \
         input list), false, or a list of field names like [\"x\"]"
    );
    assert_eq!(
        err(&task("timeout = \"0s\"")),
        "DIR/flow.toml:4:11: task `a`: `timeout` = \"0s\" would stop every run before it \
         starts: give a duration longer than zero, like \"30s\""
    );
    assert_eq!(
        err("name = \"f\"\nconcurrency = 0\n"),
        "DIR/flow.toml:2:15: `concurrency` = 0 would run nothing: it is how many task runs may \
         run at once, at least 1"
    );
    assert_eq!(
        err("name = \"f\"\n[tag_limits]\ndb = 0\n"),
        "DIR/flow.toml:3:6: `tag_limits.db` = 0 would block every task tagged `db`: it is how \
         many of them may run at once, at least 1"
    );
    // At the limits: one at a time, the shortest timeout, zero fuel, both forms of `map`.
    let def = manifest::parse(
        &file,
        "name = \"f\"\nconcurrency = 1\n[tag_limits]\ndb = 1\n[tasks.a]\ncomponent = { path = \
         \"t.wasm\", build = \"true\", sources = [\"src\"] }\ntimeout = \"1ns\"\nfuel = 0\n\
         input = { x = [1] }\nmap = [\"x\"]\nmemory = 0\n[tasks.b]\ncomponent = \"t.wasm\"\nmap = false\n",
    )
    .expect("valid");
    assert_eq!((def.concurrency, def.tag_limits["db"]), (1, 1));
    assert_eq!(def.tasks[0].budget.timeout, Duration::from_nanos(1));
    assert_eq!(def.tasks[0].budget.fuel, Some(0));
}

/// Through the CLI too: the error and its position, exit code 2.
#[test]
fn the_cli_reports_manifest_errors_with_their_position() {
    let env = Env::new();
    let flow = env.manifest(
        "fuel",
        &format!(
            "name = \"f\"\n[tasks.a]\ncomponent = {:?}\nfuel = -5\n",
            path_of("add_one")
        ),
    );
    let out = env.sluice(&["run", &flow]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("fuel.toml:4:8: task `a`: `fuel` = -5 must be a number"),
        "{}",
        stderr(&out)
    );
}

fn nested(depth: usize) -> String {
    format!("{}{}", "[".repeat(depth), "]".repeat(depth))
}

/// `--param` JSON nested past serde_json's limit (127 levels) is refused, naming the parameter
/// and the limit, instead of silently becoming a string; at 127 levels it is JSON.
#[test]
fn param_json_nested_too_deep_is_refused() {
    let env = Env::new();
    let flow = env.manifest(
        "deep",
        &format!(
            "name = \"deep\"\n[parameters]\ndeep = 0\n[tasks.a]\ncomponent = {:?}\n\
             input = \"$params.deep\"\n",
            path_of("identity")
        ),
    );
    let out = env.sluice(&["run", &flow, "--param", &format!("deep={}", nested(128))]);
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    assert!(
        stderr(&out).contains(
            "--param deep: the JSON value nests 128 levels deep; at most 127 are supported"
        ),
        "{}",
        stderr(&out)
    );
    let out = env.sluice(&["run", &flow, "--param", &format!("deep={}", nested(127))]);
    assert!(
        stdout(&out).contains("output of a: [[[["),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    // Not JSON at all: a string, as before.
    let out = env.sluice(&["run", &flow, "--param", "deep=[draft"]);
    assert!(
        stdout(&out).contains("output of a: \"[draft\""),
        "{}",
        stdout(&out)
    );
}

/// `runs --limit 0` is a usage error; `--limit 1` lists one run.
#[test]
fn runs_limit_zero_is_refused() {
    let env = Env::new();
    let flow = env.manifest(
        "two",
        &format!(
            "name = \"two\"\n[tasks.a]\ncomponent = {:?}\ninput = 1\n",
            path_of("add_one")
        ),
    );
    for _ in 0..2 {
        assert_eq!(env.sluice(&["run", &flow]).status.code(), Some(0));
    }
    let out = env.sluice(&["runs", "--limit", "0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--limit"), "{}", stderr(&out));
    let out = env.sluice(&["runs", "--limit", "1", "--json"]);
    assert_eq!(json_of(&out).as_array().map(Vec::len), Some(1));
    let out = env.sluice(&["runs", "--json"]);
    assert_eq!(json_of(&out).as_array().map(Vec::len), Some(2));
}

/// The mount command run by `unshare -rm`: `$1` mounted read-only on itself, then the rest.
const READ_ONLY: &str = "mount -o bind,ro \"$1\" \"$1\" && shift && exec \"$@\"";

/// Whether this machine lets an unprivileged process mount a directory read-only in a user
/// namespace (`unshare -rm`).
fn read_only_mounts_work() -> bool {
    let dir = tempfile::tempdir().expect("temp dir");
    Command::new("unshare")
        .args(["-rm", "sh", "-c", READ_ONLY, "sh"])
        .arg(dir.path())
        .arg("true")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Run sluice with the home mounted read-only (in a private mount namespace).
fn read_only(env: &Env, args: &[&str]) -> Output {
    let mut cmd = Command::new("unshare");
    cmd.args(["-rm", "sh", "-c", READ_ONLY, "sh"])
        .arg(env.home())
        .arg(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .env("SLUICE_HOME", env.home())
        .env("XDG_CACHE_HOME", env.path("cache"))
        .env("SLUICE_ARTIFACTS", env.artifacts());
    within(cmd, Duration::from_secs(60))
}

/// `cache ls` and `cache show` read a read-only home, as `runs` does; `cache clear` is refused.
#[test]
fn cache_ls_works_on_a_read_only_home() {
    if !read_only_mounts_work() {
        eprintln!("skipped: this machine cannot mount a directory read-only in a user namespace");
        return;
    }
    let env = Env::new();
    let flow = env.manifest(
        "cached",
        &format!(
            "name = \"cached\"\n[tasks.a]\ncomponent = {:?}\ninput = 1\ncache_for = \"1h\"\n",
            path_of("add_one")
        ),
    );
    assert_eq!(env.sluice(&["run", &flow]).status.code(), Some(0));
    let out = read_only(&env, &["runs"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = read_only(&env, &["cache", "ls", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let entries = json_of(&out);
    assert_eq!(entries[0]["task"], "a", "{entries}");
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
    let key = entries[0]["key"].as_str().expect("key").to_owned();
    let out = read_only(&env, &["cache", "show", &key]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("value      2"), "{}", stdout(&out));
    let out = read_only(&env, &["cache", "clear"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("read-only"), "{}", stderr(&out));
}

/// Compile messages name components by normalized paths: `examples/build/add_one.wasm`, not
/// `examples/map-add-one/../build/add_one.wasm`.
#[test]
fn compile_messages_show_normalized_paths() {
    let env = Env::new();
    let flow = example_flow("map-add-one");
    let out = env.sluice(&["run", &flow.display().to_string()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let err = stderr(&out);
    let expected = crate::support::root().join("examples/build/add_one.wasm");
    assert!(
        err.contains(&format!("compiling {} (", expected.display())),
        "{err}"
    );
    assert!(!err.contains("/../"), "{err}");
}

/// The artifact files of `digest` in `dir`: the artifact and its tag.
fn artifact_files(dir: &Path, digest: &str) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(digest))
                })
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn digest_of(env: &Env, component: &str, input: &str) -> (String, Value) {
    let out = env.sluice(&["task", "run", component, "--input", input, "--json"]);
    let v = json_of(&out);
    (
        v["component"]["digest"]
            .as_str()
            .expect("digest")
            .to_owned(),
        v["output"].clone(),
    )
}

/// Copy `from`'s artifact files over `to`'s names in `dir`.
fn plant(dir: &Path, from: &[PathBuf], from_digest: &str, to_digest: &str) {
    std::fs::create_dir_all(dir).expect("dir");
    for f in from {
        let name = f
            .file_name()
            .expect("name")
            .to_string_lossy()
            .replace(from_digest, to_digest);
        std::fs::copy(f, dir.join(name)).expect("plant");
    }
}

/// `add_one`'s precompiled code planted under `identity`'s digest, in the artifact directory
/// (with its genuine tag) and in a home's `artifacts/` (where a repository could ship it), is
/// never executed: `identity` still returns its input, and the planted file is replaced.
#[test]
fn a_planted_artifact_is_not_executed() {
    let env = Env::new();
    let (add_one, out) = digest_of(&env, &path_of("add_one"), "41");
    assert_eq!(out, 42);
    let (identity, out) = digest_of(&env, &path_of("identity"), "41");
    assert_eq!(out, 41);
    let real = artifact_files(&env.artifacts(), &add_one);
    assert_eq!(real.len(), 2, "an artifact and its tag: {real:?}");
    plant(&env.artifacts(), &real, &add_one, &identity);
    plant(&env.home().join("artifacts"), &real, &add_one, &identity);
    // And a file index entry (the previous, untagged format) pointing identity's file at
    // add_one's digest, in both places.
    let id_path = std::fs::canonicalize(guest("identity")).expect("canonical");
    let entry = {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(&id_path).expect("stat");
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        format!(
            "sluice-file-index-1 {} {} {} {} {} {add_one}\n{}",
            m.dev(),
            m.ino(),
            m.size(),
            ns(m.mtime(), m.mtime_nsec()),
            ns(m.ctime(), m.ctime_nsec()),
            id_path.display()
        )
    };
    let entry_name = blake3::hash(id_path.as_os_str().as_encoded_bytes()).to_hex();
    for dir in [env.artifacts(), env.home().join("artifacts")] {
        let index = dir.join("index");
        std::fs::create_dir_all(&index).expect("index");
        std::fs::write(index.join(entry_name.as_str()), &entry).expect("plant an entry");
    }

    for _ in 0..2 {
        let (_, out) = digest_of(&env, &path_of("identity"), "41");
        assert_eq!(out, 41, "identity ran planted code");
    }
    // Recompiled: the planted artifact was replaced by identity's own.
    let now = artifact_files(&env.artifacts(), &identity);
    assert_eq!(now.len(), 2, "{now:?}");
    assert_ne!(
        std::fs::read(&now[0]).expect("artifact"),
        std::fs::read(&real[0]).expect("artifact")
    );
    control_task_completes(&env);
}

/// An artifact directory that others can write (or that is not the user's) is refused with an
/// error naming it; the same directory made private is used.
#[test]
fn an_artifact_directory_others_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    let dir = env.artifacts();
    std::fs::create_dir_all(&dir).expect("dir");
    let add_one = path_of("add_one");
    for mode in [0o777, 0o775, 0o722] {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode)).expect("chmod");
        let out = env.sluice(&["task", "run", &add_one, "--input", "1"]);
        assert_eq!(out.status.code(), Some(2), "mode {mode:o}");
        let err = stderr(&out);
        assert!(
            err.contains(&format!(
                "the artifact cache `{}` cannot be used: it has mode {mode:o}",
                dir.display()
            )) && err.contains("can write it"),
            "{err}"
        );
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    control_task_completes(&env);
    if rustix::process::geteuid().is_root() {
        // Owned by someone else (nobody).
        let other = env.path("theirs");
        std::fs::create_dir_all(&other).expect("dir");
        std::os::unix::fs::chown(&other, Some(65534), None).expect("chown");
        let mut cmd = env.command();
        cmd.args(["task", "run", &add_one])
            .env("SLUICE_ARTIFACTS", &other);
        let out = within(cmd, Duration::from_secs(60));
        assert_eq!(out.status.code(), Some(2));
        assert!(
            stderr(&out).contains("it belongs to user id 65534, not to this user (0)"),
            "{}",
            stderr(&out)
        );
    }
}

/// A manifest is read only from a regular file of at most 16 MiB: `sluice run /dev/zero` is
/// refused at once; a manifest of exactly 16 MiB loads, one byte more is refused naming the
/// limit.
#[test]
fn manifests_are_read_only_from_regular_files_within_the_limit() {
    let env = Env::new();
    let out = env.sluice(&["run", "/dev/zero"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("cannot read the manifest: it is not a regular file"),
        "{}",
        stderr(&out)
    );
    let out = env.sluice(&["run", &env.dir.path().display().to_string()]);
    assert!(
        stderr(&out).contains("cannot read the manifest: it is a directory"),
        "{}",
        stderr(&out)
    );

    let file = env.path("big.toml");
    let head = "name = \"big\"\n#";
    let mut text = head.to_owned();
    text.push_str(
        &"x".repeat(usize::try_from(manifest::MAX_MANIFEST_BYTES).expect("fits") - head.len()),
    );
    std::fs::write(&file, &text).expect("write");
    assert_eq!(manifest::load(&file).expect("at the limit").name, "big");
    text.push('x');
    std::fs::write(&file, &text).expect("write");
    let e = manifest::load(&file)
        .expect_err("over the limit")
        .to_string();
    assert!(
        e.ends_with("cannot read the manifest: it is larger than the manifest size limit of 16777216 bytes (16 MiB)"),
        "{e}"
    );
}

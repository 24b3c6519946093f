//! The record never silently diverges from what happened: a write that fails holds every later
//! one (nothing is committed past it) and a run that ends first is recorded as not fully recorded
//! and resumable; a run is never recorded without its task runs; liveness survives a deleted
//! lock file; a damaged database stops all writing; a full disk is recorded and said once.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use sluice::flow::{FlowBuilder, FlowDef, Input, TaskDef};
use sluice::ids::FlowRunId;
use sluice::runner::{FlowRunner, PrepareError, RunOptions, Transition};
use sluice::state::{State, StateName, StateType};
use sluice::store::{RunHeader, SqliteStore, Store, StoreError, TaskWrite, Write};

use crate::store::{
    hostile_path, newest_run, slow_chain, spawn_run, start, stderr, wait_for, write_flow,
};
use crate::support::{example_flow, guest, history, json_of, sandbox, sluice, task};

/// `a` (sleeps 300 ms, so the run's first write is committed before anything else happens) →
/// `b` → `c`, each the length of its upstream's output: 300 → 3 → 1.
fn chain() -> FlowDef {
    let hostile = guest("hostile");
    let mut a = TaskDef::new("a", &hostile);
    a.input = Input::from_json(json!({"do": "sleep", "ms": 300}));
    let mut b = TaskDef::new("b", &hostile);
    b.input = Input::from_json(json!({"do": "len", "of": "$tasks.a"}));
    let mut c = TaskDef::new("c", &hostile);
    c.input = Input::from_json(json!({"do": "len", "of": "$tasks.b"}));
    FlowBuilder::new("chain")
        .task(a)
        .task(b)
        .task(c)
        .build()
        .expect("flow")
}

fn pending(at: chrono::DateTime<chrono::Utc>) -> (State, Transition) {
    (
        State::new(StateName::Pending, at),
        Transition {
            from: None,
            to: StateName::Pending,
            time: at,
            message: None,
        },
    )
}

fn header(
    id: FlowRunId,
    flow: &str,
    manifest: Option<(std::path::PathBuf, String)>,
    pid: u32,
    tasks: Vec<TaskWrite>,
) -> Write {
    let (state, transition) = pending(start());
    Write::RunCreated(Box::new(RunHeader {
        id,
        flow: flow.into(),
        state,
        history: vec![transition],
        parameters: BTreeMap::new(),
        context: BTreeMap::new(),
        manifest,
        files: None,
        pid,
        tasks,
    }))
}

fn pending_task(run: FlowRunId, index: u32, name: &str) -> TaskWrite {
    let (state, transition) = pending(start());
    TaskWrite {
        state,
        transitions: vec![transition],
        ..crate::store_suite::task(run, index, name)
    }
}

fn db(home: &Path) -> rusqlite::Connection {
    rusqlite::Connection::open(home.join("sluice.db")).expect("open the database")
}

// ---------------------------------------------------------------------------------------------
// A failed write holds every later one

/// A write the database refuses (a trigger stands for any failure: a lock held past the busy
/// timeout, a full disk) is not skipped: nothing of the run is committed past it, the run is
/// recorded Crashed "not fully recorded" with only what was committed before, and it resumes to
/// completion once the store can write again.
#[tokio::test]
async fn a_failed_write_is_never_committed_past_and_the_run_resumes() {
    let home = tempfile::tempdir().expect("home");
    let store = Arc::new(SqliteStore::open(home.path()).expect("store"));
    let conn = db(home.path());
    conn.execute_batch(
        "CREATE TRIGGER refuse_b BEFORE UPDATE ON task_runs
         WHEN NEW.name = 'b' AND NEW.state = 'Completed'
         BEGIN SELECT RAISE(ABORT, 'simulated write failure'); END;",
    )
    .expect("trigger");
    let runner = FlowRunner::new(sandbox().clone()).store(store.clone() as Arc<dyn Store>);
    let flow = runner
        .prepare(chain(), Path::new("."))
        .await
        .expect("prepare");
    let err = runner
        .run(&flow, RunOptions::default())
        .await
        .expect_err("the run cannot be fully recorded");
    let PrepareError::NotRecorded { run, source } = err else {
        panic!("expected NotRecorded, got {err}");
    };
    assert!(
        source.to_string().contains("simulated write failure"),
        "{source}"
    );
    // The run as returned says what the record says.
    assert_eq!(run.state.name, StateName::Crashed, "{run:#?}");
    let message = run.state.message.clone().unwrap_or_default();
    assert!(
        message.starts_with("not fully recorded: ") && message.contains("simulated write failure"),
        "{message}"
    );

    let stored = store.load_run(run.id).expect("load").run;
    assert_eq!(stored.state, run.state);
    // Nothing after the refused write: `b` never recorded Completed, so neither is `c` nor the
    // flow; every recorded completion has its output; nothing is left Running.
    let b = stored.task("b").expect("b");
    assert_ne!(b.state.state_type(), StateType::Completed, "{stored:#?}");
    let c = stored.task("c").expect("c");
    assert_ne!(c.state.state_type(), StateType::Completed, "{stored:#?}");
    for t in &stored.tasks {
        assert!(
            !matches!(t.state.name, StateName::Running | StateName::Retrying),
            "{t:#?}"
        );
        if t.state.state_type() == StateType::Completed {
            assert!(t.output.is_some(), "{t:#?}");
        }
    }

    // The store writes again once the cause is gone: the run resumes to completion.
    conn.execute_batch("DROP TRIGGER refuse_b")
        .expect("drop trigger");
    assert!(store.write_error().is_none(), "{:?}", store.write_error());
    let resumed = runner
        .resume(&flow, stored, &[], Default::default())
        .await
        .expect("resume");
    assert_eq!(resumed.state.name, StateName::Completed, "{resumed:#?}");
    let shown = store.load_run(run.id).expect("load").run;
    assert_eq!(shown.state.name, StateName::Completed);
    assert_eq!(shown.task("c").expect("c").output, Some(json!(1).into()));
}

/// Another process holds the database's write lock for longer than the busy timeout (10 s)
/// while a run records, then releases it: the refused batch is not skipped; it and everything
/// after it are committed in order once the lock is gone, so the record is complete (on main, the
/// flow was recorded Completed with `b` still Running and no output).
#[test]
fn a_database_locked_by_another_process_loses_no_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let flow = slow_chain(dir.path(), "locked");
    let mut child = spawn_run(&home, &flow);
    let id = newest_run(&home, &mut child);
    wait_for(&home, &id, |v| task(v, "b")["state"] == "Running");
    let lock = db(&home);
    lock.execute_batch("BEGIN EXCLUSIVE")
        .expect("take the write lock");
    // `b` completes within 1.5 s; its write waits for the lock (10 s busy timeout) and fails;
    // the writes are tried again when the run has ended (another 10 s). Released in between.
    std::thread::sleep(Duration::from_secs(14));
    lock.execute_batch("COMMIT").expect("release the lock");
    drop(lock);
    let out = child.wait_with_output().expect("wait");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        !err.contains("\u{1b}["),
        "no colour off a terminal: {err:?}"
    );

    let run = json_of(&sluice(&home, &["show", &id, "--json"]));
    assert_eq!(run["state"], "Completed", "{run:#}");
    // The refused write was kept, not skipped: `b`'s completion is recorded with its output.
    let b = task(&run, "b");
    assert_eq!(b["state"], "Completed", "{run:#}");
    assert_eq!(b["output"], json!(1500));
    assert_eq!(history(b).last().map(String::as_str), Some("Completed"));
    assert_eq!(task(&run, "c")["output"], json!("[10,1500]".len()));
}

// ---------------------------------------------------------------------------------------------
// A run is never recorded without its task runs

/// The run row and its task rows are one transaction: when the task rows cannot be written,
/// neither is the run; once they can, both are.
#[test]
fn a_run_is_committed_with_its_task_runs_or_not_at_all() {
    let home = tempfile::tempdir().expect("home");
    let store = SqliteStore::open(home.path()).expect("store");
    let conn = db(home.path());
    conn.execute_batch(
        "CREATE TRIGGER refuse_tasks BEFORE INSERT ON task_runs
         BEGIN SELECT RAISE(ABORT, 'no task rows'); END;",
    )
    .expect("trigger");
    let id = FlowRunId::new();
    let tasks = vec![pending_task(id, 0, "a"), pending_task(id, 1, "b")];
    store.submit(header(id, "pair", None, std::process::id(), tasks));
    let err = store.flush().expect_err("the task rows are refused");
    assert!(err.to_string().contains("no task rows"), "{err}");
    let runs: i64 = conn
        .query_row("SELECT count(*) FROM flow_runs", [], |r| r.get(0))
        .expect("count");
    assert_eq!(runs, 0, "the run was committed without its task runs");

    conn.execute_batch("DROP TRIGGER refuse_tasks")
        .expect("drop trigger");
    store.flush().expect("the held write commits");
    let stored = store.load_run(id).expect("load").run;
    let names: Vec<&str> = stored.tasks.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(names, ["a", "b"]);
}

/// A run recorded without its task runs (by a Sluice that wrote them separately, killed in
/// between) is resumed, its tasks started afresh, instead of being refused for ever.
#[test]
fn a_run_recorded_without_its_task_runs_resumes() {
    let home = tempfile::tempdir().expect("home");
    let flow = example_flow("map-add-one");
    let text = std::fs::read_to_string(&flow).expect("manifest");
    let id = FlowRunId::new();
    {
        let store = SqliteStore::open(home.path()).expect("store");
        let mut created = header(
            id,
            "map-add-one",
            Some((flow.clone(), text)),
            999_999,
            Vec::new(),
        );
        if let Write::RunCreated(h) = &mut created {
            h.parameters.insert("numbers".into(), json!([1, 2, 3]));
        }
        store.submit(created);
        store.flush().expect("flush");
    }
    let out = sluice(home.path(), &["resume", &id.to_string(), "--json"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}\n{}",
        stderr(&out),
        String::from_utf8_lossy(&out.stdout)
    );
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run:#}");
    assert_eq!(task(&run, "sum")["output"], json!(9));
    let shown = json_of(&sluice(home.path(), &["show", &id.to_string(), "--json"]));
    assert_eq!(task(&shown, "sum")["output"], json!(9));
}

// ---------------------------------------------------------------------------------------------
// Liveness survives a deleted lock file

/// Deleting a live run's lock file neither makes it look Crashed nor lets a second process
/// resume it: the recorded process (pid and start time) is alive.
#[test]
fn a_live_run_whose_lock_file_was_deleted_stays_live() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let h = hostile_path();
    let flow = write_flow(
        dir.path(),
        &format!(
            "name = \"nap\"\n[tasks.nap]\ncomponent = {h:?}\ninput = {{ do = \"sleep\", ms = 3000 }}\n"
        ),
    );
    let mut child = spawn_run(&home, &flow);
    let id = newest_run(&home, &mut child);
    wait_for(&home, &id, |v| task(v, "nap")["state"] == "Running");
    std::fs::remove_file(home.join("runs").join(format!("{id}.lock"))).expect("delete the lock");

    let runs = json_of(&sluice(&home, &["runs", "--json"]));
    assert_eq!(runs[0]["id"], id.as_str());
    assert_eq!(runs[0]["state"], "Running", "{runs:#}");
    assert_eq!(runs[0]["live"], true, "{runs:#}");
    let second = sluice(&home, &["resume", &id]);
    assert_eq!(second.status.code(), Some(2), "{second:?}");
    assert!(
        stderr(&second).contains("live in another process"),
        "{second:?}"
    );

    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&sluice(&home, &["show", &id, "--json"]));
    assert_eq!(run["state"], "Completed", "{run:#}");
    assert_eq!(task(&run, "nap")["attempts"], 1, "{run:#}");
    assert!(!history(&run).contains(&"Crashed".to_owned()), "{run:#}");
}

/// A lease refused because another holder has the lock names the holder's pid when it can be
/// told (from the lock file, else from the record), and never "pid 0".
#[test]
fn a_refused_lease_names_the_holder_or_no_pid() {
    let home = tempfile::tempdir().expect("home");
    let store = SqliteStore::open(home.path()).expect("store");
    let id = FlowRunId::new();
    // Another holder locked the lock file and has not written its pid yet.
    let path = home.path().join("runs").join(format!("{id}.lock"));
    let held = std::fs::File::create(&path).expect("lock file");
    held.lock().expect("lock");
    let err = store.lease(id).expect_err("held elsewhere");
    assert!(matches!(err, StoreError::Live { pid: None, .. }), "{err}");
    let text = err.to_string();
    assert!(text.ends_with("is live in another process"), "{text}");
    assert!(!text.contains("pid 0"), "{text}");
    // Recorded as run by a live process (this one): that pid is named.
    store.submit(header(
        id,
        "held",
        None,
        std::process::id(),
        vec![pending_task(id, 0, "a")],
    ));
    store.flush().expect("flush");
    let err = store.lease(id).expect_err("held elsewhere");
    assert!(
        err.to_string()
            .contains(&format!("(pid {})", std::process::id())),
        "{err}"
    );
    drop(held);
}

// ---------------------------------------------------------------------------------------------
// A damaged database stops all writing

/// 64 KiB of noise (deterministic) written over the middle of `db`, after its first page.
fn damage(db: &Path) {
    let mut bytes = std::fs::read(db).expect("read the database");
    assert!(
        bytes.len() > 72 << 10,
        "a database of {} bytes",
        bytes.len()
    );
    let from = (bytes.len() / 2).saturating_sub(32 << 10).max(4096);
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in &mut bytes[from..from + (64 << 10)] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(db, bytes).expect("write the noise");
}

fn assert_damaged(out: &std::process::Output, db: &Path) {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        err.contains(&format!("the store at {} is damaged", db.display())),
        "{err}"
    );
    assert!(err.contains(".recover"), "{err}");
}

/// Once SQLite reports the database damaged, nothing more is written to it, by any command: the
/// file is left byte for byte as it was, and every command names it and what to do.
#[test]
fn a_damaged_database_stops_all_writing() {
    let home = tempfile::tempdir().expect("home");
    let home = home.path();
    let flow = example_flow("map-add-one");
    let flow = flow.to_str().expect("utf-8");
    let mut id = String::new();
    for _ in 0..8 {
        let out = sluice(home, &["run", flow, "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        id = json_of(&out)["id"].as_str().expect("id").to_owned();
    }
    let db = home.join("sluice.db");
    damage(&db);
    let before = std::fs::read(&db).expect("read");

    // The first command to read the damage names it …
    let runs = sluice(home, &["runs"]);
    assert_damaged(&runs, &db);
    // … and from then on nothing writes to the file: not a run, not the cache, not a resume.
    for args in [
        &["run", flow][..],
        &["cache", "ls"][..],
        &["cache", "clear"][..],
        &["resume", &id][..],
        &["show", &id][..],
    ] {
        assert_damaged(&sluice(home, args), &db);
    }
    assert!(
        std::fs::read(&db).expect("read") == before,
        "the damaged file was written"
    );
}

// ---------------------------------------------------------------------------------------------
// A full disk

/// A tmpfs mounted on a directory until dropped (needs root, as the read-only home test needs
/// `chattr`).
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).expect("mount point");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mount -t tmpfs failed: the full-disk test needs root to mount a small file system"
        );
        Tmpfs(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the file system of `dir` but for about `leave` bytes.
fn fill(dir: &Path, leave: u64) -> std::path::PathBuf {
    use std::io::Write as _;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).expect("filler");
    let chunk = vec![0u8; 64 << 10];
    let mut len = 0u64;
    while f.write_all(&chunk).is_ok() {
        len += chunk.len() as u64;
    }
    let _ = f.flush();
    f.set_len(len.saturating_sub(leave))
        .expect("truncate the filler");
    path
}

/// The disk fills while a run records: the run stops, its record says why ("not fully recorded",
/// never "the process died"), stderr says it once and without colour, and the run resumes once
/// there is room again.
#[test]
fn a_full_disk_is_recorded_said_once_and_resumable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let _fs = Tmpfs::mount(&home, "64m");
    let h = hostile_path();
    let flow = write_flow(
        dir.path(),
        &format!(
            r#"name = "fill"
[parameters]
bytes = 10
[tasks.small]
component = {h:?}
input = {{ do = "output", bytes = 10 }}
[tasks.big]
component = {h:?}
input = {{ do = "output", bytes = "$params.bytes", after = "$tasks.small" }}
[tasks.after]
component = {h:?}
input = {{ do = "len", of = "$tasks.big" }}
"#
        ),
    );
    let flow = flow.to_str().expect("utf-8");
    // A first run compiles the component into the home and creates the store.
    let first = sluice(&home, &["run", flow, "--json"]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let filler = fill(&home, 256 << 10);

    let out = sluice(&home, &["run", flow, "--param", "bytes=2000000", "--json"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let run = json_of(&out);
    let id = run["id"].as_str().expect("id").to_owned();
    assert_eq!(run["state"], "Crashed", "{run:#}");
    let message = run["message"].as_str().unwrap_or_default();
    assert!(
        message.starts_with("not fully recorded: ") && message.contains("full"),
        "{message}"
    );
    assert!(
        !err.contains("\u{1b}["),
        "no colour off a terminal: {err:?}"
    );
    // The cause once (the watcher's warning, when it sees the failed write while the run is
    // live; else only the record's message), beside the line naming the run.
    assert!(
        err.matches("disk is full").count() <= 1,
        "said more than once: {err}"
    );
    assert!(err.lines().count() <= 3, "{err}");
    assert!(err.contains("not fully recorded"), "{err}");

    // The record says the same, and keeps saying it (recovery does not call it a death).
    let shown = json_of(&sluice(&home, &["show", &id, "--json"]));
    assert_eq!(shown["state"], "Crashed", "{shown:#}");
    assert_eq!(shown["message"], run["message"]);
    // `small` is recorded Completed when its write was committed before the disk filled; under
    // load the writer may batch it with `big`'s 2 MB output, and the batch is lost whole (one
    // transaction): then `small` is recorded as it last was (Pending, or Running and so Crashed
    // with the run), and the resume runs it again.
    let small = task(&shown, "small")["state"].clone();
    assert!(
        ["Completed", "Crashed", "Pending"].contains(&small.as_str().unwrap_or_default()),
        "{shown:#}"
    );
    assert_ne!(task(&shown, "big")["state"], "Completed", "{shown:#}");

    std::fs::remove_file(filler).expect("free the space");
    let resumed = sluice(&home, &["resume", &id, "--json"]);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let after = json_of(&resumed);
    assert_eq!(after["state"], "Completed", "{after:#}");
    assert_eq!(task(&after, "after")["output"], json!(2_000_000));
}

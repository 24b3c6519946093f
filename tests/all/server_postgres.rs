//! `sluice server --database`: a real server process whose tenants and their runs are kept in
//! PostgreSQL (the registry in the control schema, each tenant's store a schema of its own),
//! driven through the CLI as in embedded mode, its tenants and worker tokens edited by the admin
//! commands with `--database`; killed with `kill -9` and started again, it records the run it
//! died executing Crashed at once (its predecessor's leases given up, not waited out) and
//! resumes it.

use std::process::{Command, Output};

use crate::postgres::pg::PgCluster;
use crate::server::{ServerProcess, chain_flow, kill_when, stderr};
use crate::support::json_of;

/// Schemas of tenants' stores in the database at `url`.
fn tenant_schemas(url: &str) -> Vec<String> {
    crate::postgres::with_client(url, |client| async move {
        client
            .query(
                "SELECT schema_name::text FROM information_schema.schemata
                 WHERE schema_name LIKE 't\\_%' ORDER BY 1",
                &[],
            )
            .await
            .expect("schemas")
            .iter()
            .map(|r| r.get(0))
            .collect()
    })
}

/// `sluice <args> --database URL`, from a home of its own (nothing in it is used).
pub(crate) fn admin(url: &str, args: &[&str]) -> Output {
    let home = tempfile::tempdir().expect("home");
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .args(["--database", url])
        .env("SLUICE_HOME", home.path())
        .output()
        .expect("run sluice")
}

/// `sluice tenant add NAME --database URL`: its token (the last line).
fn add_tenant(url: &str, name: &str) -> String {
    let out = admin(url, &["tenant", "add", name]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout.lines().last().expect("a token line").to_owned()
}

fn count(url: &str, statement: &str) -> i64 {
    let statement = statement.to_owned();
    crate::postgres::with_client(url, |client| async move {
        client
            .query_one(&statement, &[])
            .await
            .expect("count")
            .get(0)
    })
}

#[test]
fn a_server_keeps_tenants_runs_in_postgresql() {
    let url = PgCluster::shared().database("server");
    let token = add_tenant(&url, "acme");
    let server = ServerProcess::start(&["--database", &url]);
    // Added while the server runs: read on its first request.
    let other = add_tenant(&url, "other");
    let dir = tempfile::tempdir().expect("dir");
    let flow = chain_flow(dir.path());
    let flow = flow.to_str().expect("utf-8");
    let out = server.cli(&token, &["run", flow, "--param", "x=41", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run}");
    assert_eq!(crate::support::task(&run, "second")["output"], 43);
    let id = run["id"].as_str().expect("id").to_owned();

    // Read back through the API from PostgreSQL: the list, the run by a prefix of its id.
    let runs = json_of(&server.cli(&token, &["runs", "--json"]));
    assert_eq!(runs[0]["id"], id.as_str());
    assert_eq!(runs[0]["live"], false);
    let out = server.cli(&token, &["show", &id[..10], "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(json_of(&out)["state"], "Completed");
    let again = json_of(&server.cli(&token, &["run", flow, "--param", "x=41", "--json"]));
    assert_eq!(crate::support::task(&again, "first")["state"], "Cached");
    // The other tenant sees none of it.
    let out = server.cli(&other, &["show", &id]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        json_of(&server.cli(&other, &["runs", "--json"])),
        serde_json::json!([])
    );

    // Where it is: a schema per tenant (both opened), two runs in acme's, no SQLite store in
    // any tenant's directory.
    let schemas = tenant_schemas(&url);
    assert_eq!(schemas.len(), 2, "{schemas:?}");
    let runs_in = |schema: &str| count(&url, &format!("SELECT count(*) FROM {schema}.flow_runs"));
    let mut counts: Vec<i64> = schemas.iter().map(|s| runs_in(s)).collect();
    counts.sort_unstable();
    assert_eq!(counts, [0, 2]);
    let stores: Vec<_> = walk(&server.home.join("tenants"))
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n == "sluice.db"))
        .collect();
    assert!(stores.is_empty(), "{stores:?}");
    assert!(
        !server.home.join("server.db").exists(),
        "the registry is the database's"
    );

    // The admin commands read and change the database's registry.
    let out = admin(&url, &["tenant", "ls", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let names: Vec<String> = json_of(&out)
        .as_array()
        .expect("tenants")
        .iter()
        .map(|t| t["name"].as_str().expect("name").to_owned())
        .collect();
    assert_eq!(names, ["acme", "other"]);
    let out = admin(&url, &["tenant", "rm", "other"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = server.cli(&other, &["runs"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a removed tenant's token stops working"
    );
}

/// Worker tokens: added (printed once, on the last line; kept as a hash), listed by name,
/// refused twice or with a bad name, removed; only with a database.
#[test]
fn worker_tokens_are_added_listed_and_removed_in_the_database() {
    let url = PgCluster::shared().database("workers");
    let out = admin(&url, &["worker-token", "add", "rack-1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let token = stdout.lines().last().expect("token").to_owned();
    assert!(
        token.starts_with("sluice_") && token.len() == 71,
        "{stdout}"
    );
    assert_eq!(
        count(
            &url,
            &format!(
                "SELECT count(*) FROM sluice.worker_tokens WHERE token_hash = '{}'",
                blake3::hash(token.as_bytes()).to_hex()
            )
        ),
        1
    );
    assert_eq!(
        count(
            &url,
            &format!("SELECT count(*) FROM sluice.worker_tokens WHERE token_hash = '{token}'")
        ),
        0,
        "never the token itself"
    );
    let again = admin(&url, &["worker-token", "add", "rack-1"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    let bad = admin(&url, &["worker-token", "add", "Rack 1"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("is not allowed"), "{}", stderr(&bad));
    let ls = admin(&url, &["worker-token", "ls"]);
    let listed = String::from_utf8_lossy(&ls.stdout);
    assert!(
        listed.contains("rack-1") && !listed.contains(&token),
        "{listed}"
    );
    let out = admin(&url, &["worker-token", "rm", "rack-1"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let out = admin(&url, &["worker-token", "rm", "rack-1"]);
    assert_eq!(out.status.code(), Some(2));
    // Without a database there is nowhere to keep them.
    let home = tempfile::tempdir().expect("home");
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["worker-token", "ls"])
        .env("SLUICE_HOME", home.path())
        .env_remove("SLUICE_DATABASE")
        .output()
        .expect("run sluice");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--database"), "{}", stderr(&out));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Killed with `kill -9` mid-run, the server leaves its run's lease behind; started again over
/// the same home and database, it gives up that lease at once, records the run Crashed (the
/// completed task run kept) and `sluice resume` continues it.
#[test]
fn a_server_killed_mid_run_recovers_its_run_from_postgresql_at_once() {
    let url = PgCluster::shared().database("killed");
    let token = add_tenant(&url, "t");
    let server = ServerProcess::start(&["--database", &url]);
    let dir = tempfile::tempdir().expect("dir");
    let flow = crate::store::slow_chain_with_retries(dir.path(), "slow", 0);
    let (id, home) = kill_when(server, &token, &flow, |tasks| {
        tasks["Running"] == 1 && tasks["Completed"] == 1
    });
    let schema = &tenant_schemas(&url)[0];
    assert_eq!(
        count(&url, &format!("SELECT count(*) FROM {schema}.leases")),
        1,
        "the killed server's lease is left behind"
    );
    let server = ServerProcess::start_in(home, &["--database", &url]);
    let run = json_of(&server.cli(&token, &["show", &id, "--json"]));
    assert_eq!(run["state"], "Crashed", "{run}");
    assert_eq!(run["live"], false);
    assert_eq!(crate::support::task(&run, "a")["state"], "Completed");
    assert_eq!(crate::support::task(&run, "b")["state"], "Crashed");
    let out = server.cli(&token, &["resume", &id[..10], "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let run = json_of(&out);
    assert_eq!(run["state"], "Completed", "{run}");
    assert_eq!(crate::support::task(&run, "a")["attempts"], 1);
    assert_eq!(crate::support::task(&run, "b")["attempts"], 2);
}

//! The manifest parser end to end: whole manifests parsed, every key reaching the flow
//! definition, and each error naming its file, line and column.

use std::time::Duration;

use super::*;
use crate::cache::{CachePolicy, CacheValidator};
use crate::flow::{Backoff, Hooks, Input, MapOver, Trigger};
use crate::sandbox::RunBudget;

fn parse_in(dir: &Path, text: &str) -> Result<FlowDef, ManifestError> {
    std::fs::write(dir.join("t.wasm"), b"").expect("write");
    parse(&dir.join("flow.toml"), text)
}

fn err(text: &str) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let e = parse_in(dir.path(), text).expect_err("invalid");
    e.to_string()
        .replace(&dir.path().display().to_string(), "DIR")
}

#[test]
fn a_worker_tag_that_is_not_one_is_refused_at_its_line() {
    for bad in ["\"\"", "\"a,b\"", "\"a\\nb\""] {
        let e = err(&format!(
            "name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nworker_tags = [\"gpu\", {bad}]\n"
        ));
        assert!(
            e.starts_with("DIR/flow.toml:4:") && e.contains("task `a`: `worker_tags` entry"),
            "{e}"
        );
    }
}

#[test]
fn a_full_manifest_parses() {
    let dir = tempfile::tempdir().expect("temp dir");
    let def = parse_in(
        dir.path(),
        r#"
name = "f"
reference_tasks = ["b"]
concurrency = 4
[parameters]
n = 3
[context]
key = "abc"
[tag_limits]
db = 1
[tasks.a]
component = "t.wasm"
input = { n = "$params.n" }
retries = 2
retry_delay = "1s"
backoff = { factor = 3.0, max = "10s" }
fuel = "unlimited"
timeout = "2s"
memory = "64MiB"
map = ["n"]
tags = ["db"]
[tasks.b]
component = { path = "missing.wasm", build = "true" }
input = "$tasks.a"
trigger = "all_failed"
skip_on_upstream_skip = false
"#,
    )
    .expect("valid");
    assert_eq!(def.tasks.len(), 2);
    let a = &def.tasks[0];
    assert_eq!(a.retries, 2);
    assert_eq!(a.budget.fuel, None);
    assert_eq!(a.budget.memory_bytes, 64 << 20);
    assert_eq!(a.map, MapOver::Fields(vec!["n".into()]));
    let b = &def.tasks[1];
    assert_eq!(b.trigger, Trigger::AllFailed);
    assert_eq!(b.upstream(), ["a"]);
    assert_eq!(b.build.as_deref(), Some("true"));
    assert!(!b.skip_on_upstream_skip);
    assert_eq!(def.concurrency, 4);
}

#[test]
fn cache_settings_parse_and_bad_ones_are_located() {
    let dir = tempfile::tempdir().expect("tempdir");
    let def = parse_in(
        dir.path(),
        r#"name = "f"
[parameters]
p = 1
[tasks.a]
component = "t.wasm"
cache_for = "1h"
[tasks.b]
component = "t.wasm"
cache_for = "10m"
cache_validator = { partial_parameters_only = ["p"] }
[tasks.c]
component = "t.wasm"
cache_for = "1s"
cache_validator = "all_inputs"
"#,
    )
    .expect("valid");
    let policy = |i: usize| def.tasks[i].cache.clone().expect("cached");
    assert_eq!(policy(0).validator, CacheValidator::DurationOnly);
    assert_eq!(policy(0).cache_for, Duration::from_secs(3600));
    assert_eq!(
        policy(1).validator,
        CacheValidator::PartialParametersOnly(vec!["p".into()])
    );
    assert_eq!(policy(2).validator, CacheValidator::AllInputs);

    let e = |text: &str| {
        parse_in(dir.path(), text)
            .expect_err("invalid")
            .to_string()
            .replace(&dir.path().display().to_string(), "DIR")
    };
    let head = "name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\n";
    assert_eq!(
        e(&format!(
            "{head}cache_for = \"1h\"\ncache_validator = \"all_input\"\n"
        )),
        "DIR/flow.toml:5:19: task `a`: unknown cache_validator `all_input` (did you mean \
             `all_inputs`?); expected one of duration_only, all_inputs, all_parameters, \
             never_use, partial_inputs_only, partial_parameters_only"
    );
    assert_eq!(
        e(&format!("{head}cache_validator = \"all_inputs\"\n")),
        "DIR/flow.toml:4:19: task `a`: `cache_validator` needs `cache_for` (how long \
             outputs stay cached)"
    );
    assert_eq!(
        e(&format!("{head}cache_for = \"soon\"\n")),
        "DIR/flow.toml:4:13: task `a`: `cache_for` = \"soon\" is not a duration like \
             \"30s\" or \"500ms\": expected number at 0"
    );
    assert_eq!(
        e(&format!(
            "{head}cache_for = \"1h\"\ncache_validator = {{ partial_parameters_only = [\"q\"] }}\n"
        )),
        "DIR/flow.toml:2:1: task `a` refers to unknown parameter `q`"
    );
}

#[test]
fn errors_name_file_line_and_column() {
    assert_eq!(
        err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nretires = 2\n"),
        "DIR/flow.toml:4:1: unknown field `retires`, expected one of `component`, \
             `input`, `upstream_tasks`, `trigger`, `retries`, `retry_delay`, `backoff`, `fuel`, \
             `timeout`, `memory`, `map`, `skip_on_upstream_skip`, `tags`, `worker_tags`, `on_completion`, \
             `on_failure`, `on_retry`, `on_state`, `cache_for`, `cache_validator`, \
             `max_retry_delay`, `http_requests`, `http_response_bytes`, `http_connect_timeout`, \
             `http_read_timeout`, `grants` (did you mean `retries`?)"
    );
    assert_eq!(
        err("name = \"f\"\nconcurency = 3\n"),
        "DIR/flow.toml:2:1: unknown field `concurency`, expected one of `name`, `parameters`, \
             `context`, `reference_tasks`, `concurrency`, `tag_limits`, `tasks`, \
             `cache_namespace`, `max_mapped_children`, `max_log_bytes`, `grants`, `schedule`, \
             `code`, `max_task_runs`, `subflows` (did you mean `concurrency`?)"
    );
    let e = err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nretries = \"two\"\n");
    assert_eq!(
        e,
        "DIR/flow.toml:4:11: invalid type: string \"two\", expected u32"
    );
    assert_eq!(
        err("name = \"f\"\n[tasks.a]\ncomponent = \"nope.wasm\"\n"),
        "DIR/flow.toml:3:13: task `a`: component file `nope.wasm` does not exist (looked at \
             DIR/nope.wasm)"
    );
    assert_eq!(
        err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nupstream_tasks = [\"b\"]\n"),
        "DIR/flow.toml:4:19: task `a` refers to unknown task `b`"
    );
    assert_eq!(
            err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\ntimeout = \"soon\"\n"),
            "DIR/flow.toml:4:11: task `a`: `timeout` = \"soon\" is not a duration like \"30s\" or \
             \"500ms\": unknown time unit \"soon\", supported units: ns, us/µs, ms, sec, min, \
             hours, days, weeks, months, years (and few variations)"
                .replace("unknown time unit \"soon\", supported units: ns, us/µs, ms, sec, min, hours, days, weeks, months, years (and few variations)", &humantime::parse_duration("soon").expect_err("bad").to_string())
        );
    assert_eq!(
        err(
            "name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\ninput = \"$tasks.b\"\n\
                 [tasks.b]\ncomponent = \"t.wasm\"\ninput = \"$tasks.a\"\n"
        ),
        "DIR/flow.toml:2:1: the tasks form a cycle: a → b → a"
    );
    assert_eq!(
        err("name = \"f\"\nreference_tasks = [\"x\"]\n"),
        "DIR/flow.toml:2:20: task `reference_tasks` refers to unknown task `x`"
    );
    assert_eq!(
        err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\ntrigger = \"sometimes\"\n"),
        "DIR/flow.toml:4:11: unknown variant `sometimes`, expected one of \
             `all_successful`, `all_failed`, `any_successful`, `any_failed`, `all_finished`, \
             `manual_only`"
    );
}

#[test]
fn max_log_bytes_is_a_size_or_a_number_of_bytes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let def = parse_in(dir.path(), "name = \"f\"\nmax_log_bytes = \"2MiB\"\n").expect("valid");
    assert_eq!(def.max_log_bytes, 2 << 20);
    let def = parse_in(dir.path(), "name = \"f\"\nmax_log_bytes = 1000\n").expect("valid");
    assert_eq!(def.max_log_bytes, 1000);
    let def = parse_in(dir.path(), "name = \"f\"\n").expect("valid");
    assert_eq!(def.max_log_bytes, crate::flow::DEFAULT_MAX_LOG_BYTES);
    assert_eq!(
        err("name = \"f\"\nmax_log_bytes = -1\n"),
        "DIR/flow.toml:2:17: `max_log_bytes` = -1 must be a size like \"256MiB\" or a number \
         of bytes"
    );
}

#[test]
fn cache_namespace_mapped_children_and_retry_delay_caps_parse() {
    let dir = tempfile::tempdir().expect("temp dir");
    let def = parse_in(
        dir.path(),
        "name = \"f\"\ncache_namespace = \"etl\"\nmax_mapped_children = 7\n[tasks.a]\n\
             component = \"t.wasm\"\nmax_retry_delay = \"10m\"\n[tasks.b]\n\
             component = \"t.wasm\"\n",
    )
    .expect("valid");
    assert_eq!(def.cache_namespace.as_deref(), Some("etl"));
    assert_eq!(def.max_mapped_children, 7);
    assert_eq!(def.tasks[0].max_retry_delay, Duration::from_secs(600));
    assert_eq!(
        def.tasks[1].max_retry_delay,
        super::super::DEFAULT_MAX_RETRY_DELAY
    );
    let def = parse_in(dir.path(), "name = \"f\"\n").expect("valid");
    assert_eq!(def.cache_namespace, None);
    assert_eq!(
        def.max_mapped_children,
        super::super::DEFAULT_MAX_MAPPED_CHILDREN
    );
    assert_eq!(
        err("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nmax_retry_delay = \"later\"\n"),
        format!(
            "DIR/flow.toml:4:19: task `a`: `max_retry_delay` = \"later\" is not a duration \
                 like \"30s\" or \"500ms\": {}",
            humantime::parse_duration("later").expect_err("bad")
        )
    );
}

/// Every key of a full manifest reaches the `FlowDef`, each with a value other than its
/// default, so ignoring any one of them fails here.
#[test]
fn every_manifest_key_reaches_the_flow_definition() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("h.wasm"), b"").expect("write");
    let def = parse_in(
        dir.path(),
        r#"
name = "f"
reference_tasks = ["a"]
concurrency = 4
[parameters]
n = 3
[context]
key = "abc"
other = "x y"
[tag_limits]
db = 2
[tasks.a]
component = "t.wasm"
input = { n = "$params.n" }
upstream_tasks = ["b"]
trigger = "any_failed"
retries = 2
retry_delay = "1s"
backoff = { factor = 3.0, max = "10s", jitter = 0.25 }
fuel = 1234
timeout = "2s"
memory = "64MiB"
map = ["n"]
skip_on_upstream_skip = false
tags = ["db", "slow"]
worker_tags = ["gpu", "eu"]
on_completion = ["h.wasm"]
on_failure = ["h.wasm", "h.wasm"]
on_retry = ["h.wasm"]
on_state = ["h.wasm"]
cache_for = "5m"
cache_validator = "all_parameters"
[tasks.b]
component = { path = "t.wasm", build = "make t.wasm", sources = ["src"] }
"#,
    )
    .expect("valid");
    assert_eq!(def.name, "f");
    assert_eq!(def.reference_tasks, ["a"]);
    assert_eq!(def.concurrency, 4);
    assert_eq!(def.parameters.get("n"), Some(&serde_json::json!(3)));
    assert_eq!(
        def.context,
        BTreeMap::from([
            ("key".to_owned(), "abc".to_owned()),
            ("other".to_owned(), "x y".to_owned())
        ])
    );
    assert_eq!(def.tag_limits.get("db"), Some(&2));
    let a = &def.tasks[0];
    assert_eq!(a.name, "a");
    assert_eq!(a.component, dir.path().join("t.wasm"));
    assert_eq!(
        a.input,
        Input::from_json(serde_json::json!({"n": "$params.n"}))
    );
    assert_eq!(a.upstream_tasks, ["b"]);
    assert_eq!(a.trigger, Trigger::AnyFailed);
    assert_eq!(a.retries, 2);
    assert_eq!(a.retry_delay, Duration::from_secs(1));
    assert_eq!(
        a.backoff,
        Some(Backoff {
            factor: 3.0,
            max: Duration::from_secs(10),
            jitter: 0.25,
        })
    );
    assert_eq!(
        a.budget,
        RunBudget {
            fuel: Some(1234),
            timeout: Duration::from_secs(2),
            memory_bytes: 64 << 20,
            ..RunBudget::default()
        }
    );
    assert_eq!(a.map, MapOver::Fields(vec!["n".into()]));
    assert!(!a.skip_on_upstream_skip);
    assert_eq!(a.tags, ["db", "slow"]);
    assert_eq!(a.worker_tags, ["gpu", "eu"]);
    let h = dir.path().join("h.wasm");
    assert_eq!(
        a.hooks,
        Hooks {
            on_completion: vec![h.clone()],
            on_failure: vec![h.clone(), h.clone()],
            on_retry: vec![h.clone()],
            on_state: vec![h],
        }
    );
    assert_eq!(
        a.cache,
        Some(CachePolicy {
            cache_for: Duration::from_secs(300),
            validator: CacheValidator::AllParameters,
        })
    );
    let b = &def.tasks[1];
    assert_eq!(b.build.as_deref(), Some("make t.wasm"));
    assert_eq!(b.sources, [dir.path().join("src")]);
    // The defaults of a task that sets nothing.
    assert_eq!(b.trigger, Trigger::AllSuccessful);
    assert_eq!(
        (b.retries, b.retry_delay, b.backoff),
        (0, Duration::ZERO, None)
    );
    assert_eq!(b.budget, RunBudget::default());
    assert!(b.skip_on_upstream_skip && b.tags.is_empty() && b.cache.is_none());
    // A backoff that names only some of its keys gets the documented defaults for the others.
    let def = parse_in(
        dir.path(),
        "name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\nbackoff = { jitter = 0.5 }\n",
    )
    .expect("valid");
    assert_eq!(
        def.tasks[0].backoff,
        Some(Backoff {
            factor: 2.0,
            max: Duration::from_secs(3600),
            jitter: 0.5,
        })
    );
}

#[test]
fn grants_are_inherited_narrowed_and_checked_at_their_position() {
    use crate::grants::{FileGrant, FileMode};
    let dir = tempfile::tempdir().expect("temp dir");
    let def = parse_in(
        dir.path(),
        r#"
name = "g"
[grants]
files = [{ host = "data", guest = "/data", mode = "rw" }]
env = { REGION = "eu", LEVEL = "3" }
secrets = ["TOKEN"]
[tasks.inherits]
component = "t.wasm"
[tasks.narrows]
component = "t.wasm"
[tasks.narrows.grants]
files = [{ host = "data/in", guest = "/in" }]
env = { REGION = "eu" }
secrets = []
[tasks.none]
component = "t.wasm"
grants = { files = [], env = {}, secrets = [] }
"#,
    )
    .expect("valid");
    let data = std::path::absolute(dir.path().join("data")).expect("absolute");
    let inherits = &def.tasks[0].grants;
    assert_eq!(
        inherits.files,
        [FileGrant {
            host: data.clone(),
            guest: "/data".into(),
            mode: FileMode::Rw
        }]
    );
    assert_eq!(inherits.env.len(), 2);
    assert_eq!(inherits.secrets.len(), 1);
    let narrows = &def.tasks[1].grants;
    assert_eq!(narrows.files[0].host, data.join("in"));
    assert_eq!(narrows.files[0].mode, FileMode::Ro, "read only by default");
    assert_eq!(narrows.env.keys().collect::<Vec<_>>(), ["REGION"]);
    assert!(narrows.secrets.is_empty());
    assert!(def.tasks[2].grants.is_empty());

    // Without a flow-level [grants], tasks ask for their own; with one, nothing beyond it.
    let own = parse_in(
        dir.path(),
        "name = \"g\"\n[tasks.a]\ncomponent = \"t.wasm\"\ngrants = { env = { A = \"1\" } }\n",
    )
    .expect("valid");
    assert_eq!(own.tasks[0].grants.env.len(), 1);
    let flow = "name = \"g\"\n[grants]\nenv = { A = \"1\" }\nfiles = [{ host = \"data\", guest = \"/d\" }]\n[tasks.a]\ncomponent = \"t.wasm\"\n";
    for (task_grants, expected) in [
        (
            "grants = { env = { A = \"2\" } }",
            "DIR/flow.toml:7:20: task `a`: `grants`: env A = \"2\" is not covered by the flow's [grants] (line 2)",
        ),
        (
            "grants = { secrets = [\"S\"] }",
            "DIR/flow.toml:7:23: task `a`: `grants`: secret S is not covered",
        ),
        (
            "grants = { files = [{ host = \"data\", guest = \"/d\", mode = \"rw\" }] }",
            "DIR/flow.toml:7:21: task `a`: `grants`: files[0] (DIR/data at /d (rw)) is not covered",
        ),
        (
            "grants = { files = [{ host = \"database\", guest = \"/d\" }] }",
            "DIR/flow.toml:7:21: task `a`: `grants`: files[0] (DIR/database at /d (ro)) is not covered",
        ),
    ] {
        let e = err(&format!("{flow}{task_grants}\n"));
        assert!(
            e.starts_with(expected),
            "{task_grants}:\n{e}\nexpected {expected}"
        );
    }

    // Each bad entry, at its position: the text it points at, and the message.
    for (grants, at, expected) in [
        (
            "files = [{ host = \"d\", guest = \"in\" }]",
            "\"in\"",
            "task `a`: `grants`.files[0].guest = \"in\" must be an absolute guest path",
        ),
        (
            "files = [{ host = \"d\", guest = \"/a/../b\" }]",
            "\"/a/../b\"",
            "task `a`: `grants`.files[0].guest = \"/a/../b\" must be",
        ),
        (
            "files = [{ host = \"\", guest = \"/a\" }]",
            "\"\"",
            "task `a`: `grants`.files[0].host is empty",
        ),
        (
            "files = [{ host = \"d\", guest = \"/a\", mode = \"wo\" }]",
            "\"wo\"",
            "task `a`: `grants`.files[0].mode = \"wo\" must be \"ro\"",
        ),
        (
            "files = [{ host = \"d\", guest = \"/a\" }, { host = \"e\", guest = \"/a\" }]",
            "{ host = \"e\"",
            "task `a`: `grants`.files[1]: guest path `/a` is granted twice",
        ),
        (
            "files = [{ host = \"d\", guest = \"/a\", extra = 1 }]",
            "extra",
            "unknown field `extra`",
        ),
        (
            "env = { \"A-B\" = \"1\" }",
            "\"A-B\"",
            "task `a`: `grants`.env: `A-B` is not a variable name",
        ),
        (
            "secrets = [\"S\", \"S\"]",
            ", \"S\"",
            "task `a`: `grants`.secrets[1]: `S` is granted twice",
        ),
        (
            "secrets = [\"1S\"]",
            "\"1S\"",
            "task `a`: `grants`.secrets[0]: `1S` is not a secret name",
        ),
        (
            "http = [\"https://example.com\", \"example.com\"]",
            "\"example.com\"",
            "task `a`: `grants`.http[1]: \"example.com\" has no scheme",
        ),
        (
            "http = [{ url = \"https://a.b\", methods = [\"get\"] }]",
            "{ url",
            "task `a`: `grants`.http[0]: \"https://a.b\": unknown method `get`",
        ),
        (
            "tcp = [\"127.0.0.1\"]",
            "\"127.0.0.1\"",
            "task `a`: `grants`.tcp[0]: \"127.0.0.1\" needs a port",
        ),
        ("udp = [\"127.0.0.1:53\"]", "udp", "unknown field `udp`"),
    ] {
        let e = err(&format!(
            "name = \"g\"\n[tasks.a]\ncomponent = \"t.wasm\"\n[tasks.a.grants]\n{grants}\n"
        ));
        // A marker starting ", " points at what follows it.
        let skip = if at.starts_with(", ") { 2 } else { 0 };
        let column = grants.find(at).expect("marker") + 1 + skip;
        let expected = format!("DIR/flow.toml:5:{column}: {expected}");
        assert!(
            e.starts_with(&expected),
            "{grants}:\n{e}\nexpected {expected}"
        );
    }
    let e = err(
        "name = \"g\"\n[tasks.a]\ncomponent = \"t.wasm\"\n[tasks.a.grants]\nenv = { S = \"1\" }\nsecrets = [\"S\"]\n",
    );
    assert!(
        e.starts_with(
            "DIR/flow.toml:6:12: task `a`: `grants`: `S` is both an env variable and a secret"
        ),
        "{e}"
    );
}

#[test]
fn a_policy_file_is_parsed_with_positions() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("policy.toml");
    let bad = |text: &str| {
        Policy::parse(&file, text)
            .expect_err("invalid")
            .to_string()
            .replace(&dir.path().display().to_string(), "DIR")
    };
    assert!(
        bad("[grants]\nfiles = [{ path = \"/x\", mode = \"rx\" }]\n")
            .starts_with("DIR/policy.toml:2:10: grants.files[0].mode = \"rx\""),
    );
    assert!(bad("[grants]\nenv = [\"A B\"]\n").starts_with("DIR/policy.toml:2:8: grants.env[0]"));
    assert!(bad("[grants]\nsecrets = [\"*\"]\n").starts_with("DIR/policy.toml:2:12"));
    assert!(bad("[grants]\nudp = []\n").starts_with("DIR/policy.toml:2:1: unknown field `udp`"));
    assert!(bad("[grants]\ntcp = [\"x\"]\n").starts_with("DIR/policy.toml:2:8: grants.tcp[0]"));
    assert!(
        bad("[grants]\nhttp = [\"ftp://x.y\"]\n")
            .starts_with("DIR/policy.toml:2:9: grants.http[0]")
    );
    assert!(bad("grants = 1\n").starts_with("DIR/policy.toml:1:10"));
    let p = Policy::parse(&file, "[grants]\nenv = [\"*\"]\n").expect("valid");
    assert_eq!(p.file(), file);
}

fn with_schedule(schedule: &str) -> String {
    format!(
        "name = \"f\"\n[parameters]\nn = 1\n[tasks.a]\ncomponent = \"t.wasm\"\n[schedule]\n{schedule}\n"
    )
}

#[test]
fn a_schedule_reaches_the_flow_definition() {
    use crate::schedule::{Catchup, Every};
    let dir = tempfile::tempdir().expect("temp dir");
    let def = parse_in(
        dir.path(),
        &with_schedule(
            "cron = \"0 6 * * 1-5\"\ntimezone = \"Europe/Berlin\"\nparameters = { n = 5 }\n\
             catchup = 3\nlate_after = \"1m\"",
        ),
    )
    .expect("valid");
    let s = def.schedule.expect("a schedule");
    assert_eq!(s.every.to_string(), "cron \"0 6 * * 1-5\" (Europe/Berlin)");
    assert_eq!(s.parameters["n"], 5);
    assert_eq!(s.catchup, Catchup::Last(3));
    assert_eq!(s.late_after, chrono::TimeDelta::minutes(1));
    let def = parse_in(
        dir.path(),
        &with_schedule("interval = \"90s\"\nanchor = 2026-01-01T00:00:00Z\ncatchup = \"none\""),
    )
    .expect("valid");
    let s = def.schedule.expect("a schedule");
    assert_eq!(
        s.every,
        Every::Interval {
            every: chrono::TimeDelta::seconds(90),
            anchor: Some("2026-01-01T00:00:00Z".parse().expect("time")),
        }
    );
    assert_eq!(
        (s.catchup, s.late_after),
        (Catchup::Last(0), crate::schedule::DEFAULT_LATE_AFTER)
    );
    let def = parse_in(dir.path(), &with_schedule("interval = \"1h\"")).expect("valid");
    assert_eq!(def.schedule.expect("a schedule").catchup, Catchup::Last(1));
}

#[test]
fn schedule_errors_name_their_line_and_field() {
    for (schedule, expected) in [
        (
            "timezone = \"UTC\"",
            "DIR/flow.toml:6:1: `[schedule]` needs `cron`",
        ),
        (
            "cron = \"0 6 * * *\"\ninterval = \"1h\"",
            "DIR/flow.toml:8:12: `[schedule]` takes `cron` or `interval`, not both",
        ),
        (
            "cron = \"0 25 * * *\"",
            "DIR/flow.toml:7:8: `schedule.cron` = \"0 25 * * *\" is not a cron pattern",
        ),
        (
            "cron = \"0 6 * * *\"\ntimezone = \"Europe/Berlln\"",
            "DIR/flow.toml:8:12: `schedule.timezone` = \"Europe/Berlln\" is not a time zone",
        ),
        (
            "interval = \"500ms\"",
            "DIR/flow.toml:7:12: `schedule.interval` = \"500ms\" is shorter than the shortest \
             interval, 1s",
        ),
        (
            "interval = \"often\"",
            "DIR/flow.toml:7:12: `schedule.interval` = \"often\" is not a duration",
        ),
        (
            "interval = \"1h\"\ntimezone = \"UTC\"",
            "DIR/flow.toml:8:12: `schedule.timezone` is for a `cron` pattern",
        ),
        (
            "cron = \"0 6 * * *\"\nanchor = 2026-01-01T00:00:00Z",
            "DIR/flow.toml:8:10: `schedule.anchor` is for an `interval`",
        ),
        (
            "interval = \"1h\"\nparameters = { m = 2 }",
            "DIR/flow.toml:8:20: `schedule.parameters.m`: the flow has no parameter `m` (it has n)",
        ),
        (
            "interval = \"1h\"\ncatchup = \"some\"",
            "DIR/flow.toml:8:11: `schedule.catchup` = \"some\" must be \"none\", \"all\" or how many",
        ),
        (
            "interval = \"1h\"\ncatchup = -1",
            "DIR/flow.toml:8:11: `schedule.catchup` = -1 must be",
        ),
        (
            "interval = \"1h\"\nlate_after = \"soon\"",
            "DIR/flow.toml:8:14: `schedule.late_after` = \"soon\" is not a duration",
        ),
        (
            "interval = \"1h\"\nevery = 3",
            "DIR/flow.toml:8:1: unknown field `every`",
        ),
    ] {
        let e = err(&with_schedule(schedule));
        assert!(
            e.starts_with(expected),
            "{schedule}:\n{e}\nexpected: {expected}"
        );
    }
}

#[test]
fn a_code_flow_parses_with_its_bodys_budget() {
    let dir = tempfile::tempdir().expect("temp dir");
    let def = parse_in(
        dir.path(),
        "name = \"f\"\ncode = { path = \"t.wasm\", build = \"make\", sources = [\"src\"], \
         timeout = \"10m\", fuel = 5, memory = \"8MiB\" }\nmax_task_runs = 7\n\
         [tasks.a]\ncomponent = \"t.wasm\"\ntrigger = \"all_finished\"\n",
    )
    .expect("parses");
    let body = def.body.expect("a body");
    assert_eq!(body.component, dir.path().join("t.wasm"));
    assert_eq!(body.build.as_deref(), Some("make"));
    assert_eq!(body.sources, [dir.path().join("src")]);
    assert_eq!(body.budget.timeout, Duration::from_secs(600));
    assert_eq!(body.budget.fuel, Some(5));
    assert_eq!(body.budget.memory_bytes, 8 << 20);
    assert_eq!(def.max_task_runs, 7);
    assert_eq!(def.tasks[0].trigger, Trigger::AllFinished);
    // The defaults: an hour, the task defaults otherwise, 100,000 task runs.
    let def = parse_in(
        dir.path(),
        "name = \"f\"\ncode = \"t.wasm\"\n[tasks.a]\ncomponent = \"t.wasm\"\n",
    )
    .expect("parses");
    let body = def.body.expect("a body");
    assert_eq!(body.budget.timeout, Duration::from_secs(3600));
    assert_eq!(body.budget.fuel, RunBudget::default().fuel);
    assert_eq!(def.max_task_runs, 100_000);
}

#[test]
fn code_flow_errors_name_their_place() {
    let head = "name = \"f\"\n";
    let task = "[tasks.a]\ncomponent = \"t.wasm\"\n";
    assert_eq!(
        err(&format!(
            "{head}code = {{ path = \"t.wasm\", timout = \"1s\" }}\n{task}"
        )),
        "DIR/flow.toml:2:8: flow: unknown key `timout` in `code` (did you mean `timeout`?); \
         expected one of `path`, `build`, `sources`, `timeout`, `fuel`, `memory`"
    );
    assert_eq!(
        err(&format!(
            "{head}code = {{ path = \"t.wasm\", timeout = \"0s\" }}\n{task}"
        )),
        "DIR/flow.toml:2:8: flow: `code.timeout` = \"0s\" must be a duration longer than zero, \
         like \"10m\""
    );
    assert_eq!(
        err(&format!("{head}code = \"nope.wasm\"\n{task}")),
        format!(
            "DIR/flow.toml:2:8: flow: `code` file `nope.wasm` does not exist (looked at \
             DIR/nope.wasm)"
        )
    );
    assert_eq!(
        err(&format!(
            "{head}code = \"t.wasm\"\nmax_task_runs = 0\n{task}"
        )),
        "DIR/flow.toml:3:17: `max_task_runs` = 0 would refuse every task run: it is how many \
         task runs the flow's body may submit in one flow run, at least 1"
    );
    assert_eq!(
        err(&format!(
            "{head}code = \"t.wasm\"\nreference_tasks = [\"a\"]\n{task}"
        )),
        "DIR/flow.toml:3:20: `reference_tasks` cannot be used with `code`: a flow written as \
         code ends as its body does (its return value, or what its task runs did when it \
         returns nothing)"
    );
}

#[test]
fn subflows_parse_as_templates_with_their_flows() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
    std::fs::write(dir.path().join("sub/t.wasm"), b"").expect("write");
    let child = "name = \"child\"\n[parameters]\nx = 1\n[tasks.b]\ncomponent = \"t.wasm\"\n";
    std::fs::write(dir.path().join("sub/child.toml"), child).expect("write");
    let def = parse_in(
        dir.path(),
        "name = \"f\"\ncode = \"t.wasm\"\n[subflows]\nchild = \"sub/child.toml\"\n\
         [tasks.a]\ncomponent = \"t.wasm\"\n",
    )
    .expect("parses");
    assert_eq!(def.tasks.len(), 2, "a template per task and per subflow");
    let t = &def.tasks[1];
    assert_eq!(t.name, "child");
    assert_eq!(t.component, dir.path().join("sub/child.toml"));
    let sub = t.subflow.as_ref().expect("a subflow");
    assert_eq!(sub.def.name, "child");
    assert_eq!(sub.text, child);
    assert_eq!(
        sub.def.tasks[0].component,
        dir.path().join("sub/t.wasm"),
        "the child's paths are relative to its own manifest"
    );
    assert!(def.tasks[0].subflow.is_none());
}

#[test]
fn subflow_errors_name_their_place() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path();
    std::fs::write(path.join("t.wasm"), b"").expect("write");
    let code = "name = \"f\"\ncode = \"t.wasm\"\n[tasks.a]\ncomponent = \"t.wasm\"\n[subflows]\n";
    let fails = |text: &str| {
        parse(&path.join("flow.toml"), text)
            .expect_err("invalid")
            .to_string()
            .replace(&path.display().to_string(), "DIR")
    };
    std::fs::write(path.join("dag.toml"), "name = \"dag\"\n").expect("write");
    assert_eq!(
        fails("name = \"f\"\n[tasks.a]\ncomponent = \"t.wasm\"\n[subflows]\nd = \"dag.toml\"\n"),
        "DIR/flow.toml:5:5: subflow `d`: only a flow written as code (`code = …`) has \
         subflows: its body runs them"
    );
    assert_eq!(
        fails(&format!("{code}x = \"nope.toml\"\n")),
        "DIR/flow.toml:6:5: subflow `x`: `DIR/nope.toml`: cannot read the manifest: No such \
         file or directory (os error 2)"
    );
    assert_eq!(
        fails(&format!("{code}z = \"/dev/zero\"\n")),
        "DIR/flow.toml:6:5: subflow `z`: `/dev/zero`: cannot read the manifest: it is not a \
         regular file"
    );
    assert_eq!(
        fails(&format!("{code}a = \"dag.toml\"\n")),
        "DIR/flow.toml:6:5: subflow `a`: a task has that name; the body names each by it"
    );
    // A cycle through two manifests, named in order.
    std::fs::write(
        path.join("b.toml"),
        "name = \"b\"\ncode = \"t.wasm\"\n[subflows]\nback = \"flow.toml\"\n",
    )
    .expect("write");
    std::fs::write(path.join("flow.toml"), format!("{code}b = \"b.toml\"\n")).expect("write");
    assert_eq!(
        fails(&format!("{code}b = \"b.toml\"\n")),
        "DIR/b.toml:4:8: subflow `back`: a flow cannot run itself: `DIR/flow.toml` → \
         `DIR/b.toml` → `DIR/flow.toml` is a cycle"
    );
    // A child's own error names the child's file.
    std::fs::write(path.join("bad.toml"), "name = \"bad\"\nconcurrency = 0\n").expect("write");
    assert!(
        fails(&format!("{code}bad = \"bad.toml\"\n")).starts_with("DIR/bad.toml:2:15: "),
        "{}",
        fails(&format!("{code}bad = \"bad.toml\"\n"))
    );
}

/// Subflows nest at most [`MAX_SUBFLOW_DEPTH`] deep, and a flow with its subflows names at
/// most [`MAX_SUBFLOWS`] in all (a manifest named twice counts twice, so a diamond cannot make
/// a small request cost exponentially many parses): at each limit a flow parses, one over is
/// refused naming the limit.
#[test]
fn subflows_nest_and_count_within_their_limits() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path();
    std::fs::write(path.join("t.wasm"), b"").expect("write");
    std::fs::write(
        path.join("dag.toml"),
        "name = \"dag\"\n[tasks.a]\ncomponent = \"t.wasm\"\n",
    )
    .expect("write");
    // c1 → c2 → … → c<depth> → dag: the dag at depth `depth + 1` below flow.toml.
    let chain = |depth: usize| {
        for i in 1..=depth {
            let next = if i == depth {
                "dag.toml".to_owned()
            } else {
                format!("c{}.toml", i + 1)
            };
            std::fs::write(
                path.join(format!("c{i}.toml")),
                format!("name = \"c{i}\"\ncode = \"t.wasm\"\n[subflows]\nnext = \"{next}\"\n"),
            )
            .expect("write");
        }
        parse(
            &path.join("flow.toml"),
            "name = \"f\"\ncode = \"t.wasm\"\n[subflows]\nc = \"c1.toml\"\n",
        )
    };
    chain(MAX_SUBFLOW_DEPTH - 1).expect("at the depth limit");
    let e = chain(MAX_SUBFLOW_DEPTH)
        .expect_err("one deeper")
        .to_string();
    assert!(
        e.contains(&format!(
            "subflow `next`: subflows nest at most {MAX_SUBFLOW_DEPTH} deep: "
        )) && e.contains("c8.toml` → ")
            && e.ends_with("dag.toml` is deeper"),
        "{e}"
    );
    let naming = |n: usize| {
        let mut text = String::from("name = \"f\"\ncode = \"t.wasm\"\n[subflows]\n");
        for i in 0..n {
            text.push_str(&format!("s{i} = \"dag.toml\"\n"));
        }
        parse(&path.join("flow.toml"), &text)
    };
    assert_eq!(
        naming(MAX_SUBFLOWS)
            .expect("at the count limit")
            .tasks
            .len(),
        MAX_SUBFLOWS
    );
    let e = naming(MAX_SUBFLOWS + 1).expect_err("one more").to_string();
    assert!(
        e.contains(&format!(
            "a flow and its subflows name at most {MAX_SUBFLOWS} subflows in all"
        )),
        "{e}"
    );
}

/// A name with a control character (NUL, a line break) is refused where it is written: names
/// are printed and stored as text (PostgreSQL's text holds no NUL).
#[test]
fn names_with_control_characters_are_refused_at_their_place() {
    assert_eq!(
        err("name = \"f\"\n[tasks.\"a\\u0000b\"]\ncomponent = \"t.wasm\"\n"),
        "DIR/flow.toml:2:1: task name \"a\\0b\" holds a control character; names are printed and stored as text"
    );
    let e = err("name = \"f\\nx\"\n[tasks.a]\ncomponent = \"t.wasm\"\n");
    assert!(
        e.starts_with("DIR/flow.toml:1:1: flow name \"f\\nx\" holds a control character"),
        "{e}"
    );
}

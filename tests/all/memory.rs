//! Peak memory of whole `sluice` commands, each measured in a process of its own (getrusage of
//! a child, so other tests running at the same time do not count): the helper that measures,
//! and the host's memory for large task outputs. The 1,000-child logging flow is measured in
//! [`logs`](crate::logs).

use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::{Value, json};

use crate::store::{hostile_path, stderr};
use crate::support::{json_of, sluice};

/// The environment variable that makes [`peak_rss_of_a_command`] measure a command.
const MEASURE: &str = "SLUICE_TEST_MEASURE";

/// Not a test of its own: run by [`peak_rss`] in a fresh process of this test binary, it runs
/// the `sluice` command in `SLUICE_TEST_MEASURE` (JSON: home and arguments; its stdout counted,
/// not kept) and prints the child's peak RSS (getrusage of its only child), its exit code and the
/// bytes it printed.
#[test]
#[ignore = "a helper of peak_rss, run in its own process"]
fn peak_rss_of_a_command() {
    let Ok(spec) = std::env::var(MEASURE) else {
        return;
    };
    let spec: Value = serde_json::from_str(&spec).expect("spec");
    let args: Vec<String> = serde_json::from_value(spec["args"].clone()).expect("args");
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(&args)
        .env("SLUICE_HOME", spec["home"].as_str().expect("home"))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn sluice");
    let mut stdout = child.stdout.take().expect("stdout");
    let printed = std::io::copy(&mut stdout, &mut std::io::sink()).expect("read stdout");
    let status = child.wait().expect("wait");
    let usage = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_CHILDREN)
        .expect("getrusage");
    // ru_maxrss is in KiB on Linux.
    println!(
        "measured: peak_kib={} code={} printed={printed}",
        usage.max_rss(),
        status.code().unwrap_or(-1)
    );
}

/// The peak RSS (bytes) of `sluice <args>` with `home`, measured in a process of its own, with
/// its exit code and how many bytes it printed.
pub(crate) fn peak_rss(home: &Path, args: &[&str]) -> (u64, i32, u64) {
    let spec = json!({ "home": home, "args": args });
    let out: Output = Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "memory::peak_rss_of_a_command",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(MEASURE, spec.to_string())
        .output()
        .expect("run the measuring helper");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find_map(|l| Some(&l[l.find("measured: ")? + "measured: ".len()..]))
        .unwrap_or_else(|| panic!("no measurement: {text}\n{}", stderr(&out)));
    let field = |name: &str| -> i64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    (
        u64::try_from(field("peak_kib")).unwrap_or(0) << 10,
        i32::try_from(field("code")).unwrap_or(-1),
        u64::try_from(field("printed")).unwrap_or(0),
    )
}

/// A flow of the hostile guest's `behaviour` producing `bytes`: one task, or `children` mapped
/// children (each the same).
fn output_flow(dir: &Path, name: &str, behaviour: &str, bytes: usize, children: usize) -> String {
    let h = hostile_path();
    let item = format!("{{ do = \"{behaviour}\", bytes = {bytes} }}");
    let task = match children {
        0 => format!("input = {item}\n"),
        n => format!("map = true\ninput = [{}]\n", vec![item; n].join(", ")),
    };
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!("name = \"{name}\"\n[tasks.big]\ncomponent = {h:?}\n{task}"),
    )
    .expect("write flow");
    path.to_str().expect("utf-8").to_owned()
}

/// The acceptance of bounded host memory per output: `sluice run` of a task returning an 8 MiB
/// string, and of 8 mapped children each returning one (at the default concurrency), with the
/// store on and the output printed. Each is compared with the same flow whose guests do exactly
/// the same work (build the string and serialize it as the SDK serializes an output) but return
/// only its length: the difference is what the host spends on the output, and must stay within
/// three times its size. The guests' own memory (their linear memories are part of the process)
/// is in both. Two runs of each; the higher peak of the output flow and the lower of the
/// baseline are compared.
#[test]
fn the_host_holds_a_large_output_in_about_its_size() {
    const MIB: u64 = 1 << 20;
    let bytes = 8 << 20;
    let dir = tempfile::tempdir().expect("temp dir");
    let home = dir.path().join("home");
    let mut report = Vec::new();
    for (what, children) in [("one task", 0), ("8 mapped children", 8)] {
        let outputs = bytes as u64 * children.max(1) as u64;
        let full = output_flow(dir.path(), "full", "output", bytes, children);
        let bare = output_flow(dir.path(), "bare", "output_len", bytes, children);
        let measure = |flow: &str| {
            let (peak, code, _) = peak_rss(&home, &["run", flow]);
            assert_eq!(code, 0, "{what}: the run of {flow} did not complete");
            peak
        };
        // Warm: both compiled and the store created before anything is measured.
        measure(&bare);
        let full_a = measure(&full);
        // The output passed through the host whole: the record holds it.
        let runs = sluice(&home, &["runs", "--json", "--limit", "1"]);
        let id = json_of(&runs)[0]["id"].as_str().expect("id").to_owned();
        let out = sluice(&home, &["show", "--json", &id]);
        let task = &json_of(&out)["tasks"][0];
        let lengths: Vec<usize> = match children {
            0 => vec![task["output"].as_str().map_or(0, str::len)],
            _ => task["output"]
                .as_array()
                .map(|a| a.iter().map(|v| v.as_str().map_or(0, str::len)).collect())
                .unwrap_or_default(),
        };
        assert_eq!(
            lengths,
            vec![bytes - 2; children.max(1)],
            "{what}: the outputs recorded"
        );
        let full_b = measure(&full);
        let (bare_a, bare_b) = (measure(&bare), measure(&bare));
        let (peak, baseline) = (full_a.max(full_b), bare_a.min(bare_b));
        let host = peak.saturating_sub(baseline);
        report.push(format!(
            "{what}: {} MiB of output, peak {} MiB, baseline {} MiB, host +{} MiB ({:.2}× the output)",
            outputs / MIB,
            peak / MIB,
            baseline / MIB,
            host / MIB,
            host as f64 / outputs as f64
        ));
        assert!(
            host <= 3 * outputs,
            "{what}: the host spent {} MiB on {} MiB of output (peak {} MiB, baseline {} MiB)",
            host / MIB,
            outputs / MIB,
            peak / MIB,
            baseline / MIB
        );
    }
    eprintln!("peak RSS of `sluice run`: {}", report.join("; "));
}

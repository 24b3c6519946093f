//! The guest build scripts (`guest-sdk/{python,js,c}/build`) rebuild a component when what it was
//! built with changes, not only when its sources are newer: each output carries a toolchain record
//! (`<out.wasm>.toolchain`, see `guest-sdk/common.sh`). Each test copies the build scripts, the
//! SDK and the WIT contract into a scratch checkout whose toolchain directories (`.tools`,
//! `.venv`, `guest-sdk/js/node_modules`) point at the real installs, then changes one tool there
//! the way an upgrade would, and then removes one: a cached output must not hide a missing
//! toolchain. The real toolchain is never modified. Needs `scripts/setup-polyglot`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use crate::support::root;

/// Copy the files under `from` to `to`, without `node_modules` and `__pycache__`.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap_or_else(|e| panic!("create {}: {e}", to.display()));
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.expect("a directory entry");
        let name = entry.file_name();
        if name == "node_modules" || name == "__pycache__" {
            continue;
        }
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().expect("a file type").is_dir() {
            copy_tree(&src, &dst);
        } else {
            std::fs::copy(&src, &dst)
                .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dst.display()));
        }
    }
}

fn symlink(target: &Path, link: &Path) {
    std::os::unix::fs::symlink(target, link)
        .unwrap_or_else(|e| panic!("link {} to {}: {e}", link.display(), target.display()));
}

/// The real install of `rel` (under the repository root), with links resolved.
fn installed(rel: &str) -> PathBuf {
    let path = root().join(rel);
    std::fs::canonicalize(&path).unwrap_or_else(|e| {
        panic!(
            "{} is not installed ({e}): run scripts/setup-polyglot first",
            path.display()
        )
    })
}

/// The only entry of `dir` whose name starts with `prefix` (and ends with `suffix`).
fn only_entry(dir: &Path, prefix: &str, suffix: &str) -> PathBuf {
    let found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| {
            let name = p.file_name().expect("a name").to_string_lossy();
            name.starts_with(prefix) && name.ends_with(suffix)
        })
        .collect();
    assert_eq!(found.len(), 1, "{prefix}*{suffix} in {}", dir.display());
    found.into_iter().next().expect("one entry")
}

fn write_executable(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    // Written beside and renamed, so no process still holds it open for writing when it runs.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write a script");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    std::fs::rename(&tmp, path).expect("place a script");
}

/// A stand-in for `real` that reports `version` to `--version` and runs `real` otherwise: an
/// upgraded tool, as the build script sees it.
fn upgraded_tool(path: &Path, real: &Path, version: &str) {
    let _ = std::fs::remove_file(path);
    write_executable(
        path,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = --version ]; then echo '{version}'; exit 0; fi\nexec '{}' \"$@\"\n",
            real.display()
        ),
    );
}

/// A scratch checkout for one language: `guest-sdk/common.sh`, `guest-sdk/<lang>/` and `wit/`
/// copied; the language's toolchain linked to the real one, with the files the toolchain record
/// reads copied so a test can change them.
struct Checkout {
    dir: tempfile::TempDir,
    lang: &'static str,
}

impl Checkout {
    fn new(lang: &'static str) -> Self {
        let dir = tempfile::tempdir().expect("a scratch checkout");
        let at = dir.path();
        std::fs::create_dir_all(at.join("guest-sdk")).expect("guest-sdk");
        std::fs::copy(
            root().join("guest-sdk/common.sh"),
            at.join("guest-sdk/common.sh"),
        )
        .expect("copy common.sh");
        copy_tree(
            &root().join("guest-sdk").join(lang),
            &at.join("guest-sdk").join(lang),
        );
        copy_tree(&root().join("wit"), &at.join("wit"));
        match lang {
            "c" => {
                std::fs::create_dir_all(at.join(".tools/bin")).expect(".tools/bin");
                for tool in ["wit-bindgen", "wasm-tools"] {
                    symlink(
                        &installed(&format!(".tools/bin/{tool}")),
                        &at.join(".tools/bin").join(tool),
                    );
                }
                copy_tree(&installed(".tools/share"), &at.join(".tools/share"));
            }
            "python" => {
                std::fs::create_dir_all(at.join(".venv/bin")).expect(".venv/bin");
                symlink(
                    &installed(".venv/bin/componentize-py"),
                    &at.join(".venv/bin/componentize-py"),
                );
                let python = only_entry(&installed(".venv/lib"), "python3", "");
                let site = python.join("site-packages");
                let dist_info = only_entry(&site, "componentize_py-", ".dist-info");
                let to = at
                    .join(".venv/lib")
                    .join(python.file_name().expect("a name"))
                    .join("site-packages")
                    .join(dist_info.file_name().expect("a name"));
                copy_tree(&dist_info, &to);
            }
            "js" => {
                let real = installed("guest-sdk/js/node_modules");
                let modules = at.join("guest-sdk/js/node_modules");
                std::fs::create_dir_all(&modules).expect("node_modules");
                for entry in std::fs::read_dir(&real).expect("node_modules") {
                    let name = entry.expect("an entry").file_name();
                    if name == ".package-lock.json" {
                        std::fs::copy(real.join(&name), modules.join(&name))
                            .expect("copy .package-lock.json");
                    } else {
                        symlink(&real.join(&name), &modules.join(&name));
                    }
                }
            }
            _ => unreachable!("no language {lang}"),
        }
        Self { dir, lang }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The component the builds write.
    fn out(&self) -> PathBuf {
        self.path(&format!("out/{}.wasm", self.lang))
    }

    /// Its toolchain record.
    fn record(&self) -> String {
        let path = self.path(&format!("out/{}.wasm.toolchain", self.lang));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Run the checkout's build script on the example task `add_one` (from the repository), with
    /// `env` added.
    fn build_with(&self, env: &[(&str, &str)]) -> Output {
        let script = self.path(&format!("guest-sdk/{}/build", self.lang));
        let mut cmd = Command::new(&script);
        cmd.arg(
            root()
                .join("examples/tasks")
                .join(self.lang)
                .join("add_one"),
        )
        .arg(self.out())
        .env_remove("SLUICE_CFLAGS");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("run {}: {e}", script.display()))
    }

    fn build(&self) -> Output {
        self.build_with(&[])
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `out` succeeded and built the component; returns its stderr.
fn assert_built(co: &Checkout, out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert!(out.status.success(), "{what}: the build failed:\n{err}");
    let line = format!("guest-sdk/{}/build: built {}", co.lang, co.out().display());
    assert!(
        err.contains(&line),
        "{what}: not built (no `{line}`):\n{err}"
    );
    err
}

/// `out` succeeded without building or saying anything, and the component is untouched.
fn assert_not_built(co: &Checkout, out: &Output, before: SystemTime, what: &str) {
    let err = stderr(out);
    assert!(out.status.success(), "{what}: the build failed:\n{err}");
    assert!(err.is_empty(), "{what}: built again:\n{err}");
    assert_eq!(
        modified(&co.out()),
        before,
        "{what}: the component was rewritten"
    );
}

/// A rebuild, for the toolchain record's `key` alone.
fn assert_rebuilt_for(co: &Checkout, out: &Output, key: &str, what: &str) {
    let err = assert_built(co, out, what);
    let reason = format!(
        "`{}` was built with another toolchain (changed: {key}); rebuilding",
        co.out().display()
    );
    assert!(err.contains(&reason), "{what}: no `{reason}` in:\n{err}");
}

/// The record line of `key`.
fn record_line(co: &Checkout, key: &str) -> String {
    let record = co.record();
    record
        .lines()
        .find(|l| l.starts_with(&format!("{key}: ")))
        .unwrap_or_else(|| panic!("no {key} in the toolchain record:\n{record}"))
        .to_owned()
}

/// Build, then again with nothing changed (not rebuilt); change the toolchain with `change`
/// (rebuilt, naming `key`; then not rebuilt); remove a tool with `remove`: the build fails with
/// `missing` and the component stays.
fn rebuilds_on_toolchain_change(
    lang: &'static str,
    change: impl FnOnce(&Checkout),
    key: &str,
    remove: impl FnOnce(&Checkout),
    missing: &str,
) -> Checkout {
    let co = Checkout::new(lang);
    assert_built(&co, &co.build(), "the first build");
    let first = record_line(&co, key);
    let built = modified(&co.out());
    assert_not_built(&co, &co.build(), built, "nothing changed");

    change(&co);
    assert_rebuilt_for(&co, &co.build(), key, "after the toolchain changed");
    assert_ne!(
        record_line(&co, key),
        first,
        "the record still has the old {key}"
    );
    let rebuilt = modified(&co.out());
    assert_not_built(&co, &co.build(), rebuilt, "the changed toolchain, again");

    remove(&co);
    let out = co.build();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "a missing tool: {err}");
    assert!(
        err.contains(missing) && err.contains("run scripts/setup-polyglot first"),
        "a missing tool: no `{missing}` and the pointer to setup in:\n{err}"
    );
    assert_eq!(
        modified(&co.out()),
        rebuilt,
        "a failed build touched the component"
    );
    co
}

#[test]
fn a_c_guest_is_rebuilt_when_its_toolchain_flags_or_contract_change() {
    let co = rebuilds_on_toolchain_change(
        "c",
        |co| {
            upgraded_tool(
                &co.path(".tools/bin/wasm-tools"),
                &installed(".tools/bin/wasm-tools"),
                "wasm-tools 1.999.0",
            )
        },
        "wasm-tools",
        |co| std::fs::remove_file(co.path(".tools/bin/wit-bindgen")).expect("remove wit-bindgen"),
        "wit-bindgen (wit-bindgen-cli) is not installed",
    );
    // Put wit-bindgen back; each change below rebuilds once, for its own key.
    symlink(
        &installed(".tools/bin/wit-bindgen"),
        &co.path(".tools/bin/wit-bindgen"),
    );
    assert_not_built(&co, &co.build(), modified(&co.out()), "wit-bindgen back");

    // Another clang first on PATH.
    let bin = co.path("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let clang = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v clang"])
            .output()
            .expect("find clang")
            .stdout,
    )
    .expect("a path");
    upgraded_tool(
        &bin.join("clang"),
        Path::new(clang.trim()),
        "clang version 99.0.0",
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").expect("PATH"));
    assert_rebuilt_for(
        &co,
        &co.build_with(&[("PATH", &path)]),
        "clang",
        "another clang",
    );
    assert!(
        record_line(&co, "clang").contains("clang version 99.0.0"),
        "{}",
        co.record()
    );

    // Back to the first clang, and extra compiler flags (the flags alone change).
    assert_rebuilt_for(&co, &co.build(), "clang", "the first clang");
    let flags = [("SLUICE_CFLAGS", "-DSLUICE_TEST_FLAG=1")];
    assert_rebuilt_for(&co, &co.build_with(&flags), "cflags", "SLUICE_CFLAGS");
    let rebuilt = modified(&co.out());
    assert_not_built(&co, &co.build_with(&flags), rebuilt, "the same flags");

    // The WIT contract's contents, with a time older than the component: only the record sees it.
    let wit = co.path("wit/task.wit");
    let mut text = std::fs::read_to_string(&wit).expect("task.wit");
    text.push_str("\n// a change\n");
    std::fs::write(&wit, text).expect("change task.wit");
    std::fs::File::options()
        .write(true)
        .open(&wit)
        .and_then(|f| f.set_modified(rebuilt - Duration::from_secs(3600)))
        .expect("set the time of task.wit");
    assert_rebuilt_for(
        &co,
        &co.build_with(&flags),
        "wit/task.wit",
        "the WIT contract",
    );
}

#[test]
fn a_python_guest_is_rebuilt_when_componentize_py_changes() {
    rebuilds_on_toolchain_change(
        "python",
        |co| {
            // Another componentize-py version installed: pip's record under another name.
            let site = only_entry(&co.path(".venv/lib"), "python3", "").join("site-packages");
            let dist_info = only_entry(&site, "componentize_py-", ".dist-info");
            std::fs::rename(&dist_info, site.join("componentize_py-99.0.0.dist-info"))
                .expect("rename the dist-info");
        },
        "componentize-py",
        |co| {
            std::fs::remove_file(co.path(".venv/bin/componentize-py"))
                .expect("remove componentize-py")
        },
        "componentize-py is not installed",
    );
}

#[test]
fn a_js_guest_is_rebuilt_when_its_npm_packages_change() {
    rebuilds_on_toolchain_change(
        "js",
        |co| {
            // npm's record of node_modules names another ComponentizeJS version.
            let path = co.path("guest-sdk/js/node_modules/.package-lock.json");
            let mut lock: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&path).expect("read the lock file"))
                    .expect("the lock file is JSON");
            let version =
                &mut lock["packages"]["node_modules/@bytecodealliance/componentize-js"]["version"];
            assert!(version.is_string(), "no componentize-js version in {lock}");
            *version = "99.0.0".into();
            std::fs::write(&path, serde_json::to_vec_pretty(&lock).expect("JSON"))
                .expect("write the lock file");
        },
        "node_modules",
        |co| {
            std::fs::remove_file(co.path("guest-sdk/js/node_modules/@bytecodealliance"))
                .expect("remove @bytecodealliance")
        },
        "ComponentizeJS is not installed",
    );
}

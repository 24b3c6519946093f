//! Builds the Rust guests (every package under `examples/tasks/rust/` and `tests/guests/`) for
//! `wasm32-wasip2`, once per test or bench binary. Shared by the integration tests and the
//! benchmarks through `#[path]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// The repository's root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the host crate is one level below the root")
}

/// The path of the built Rust guest `name`. The first call builds all of them.
pub fn guest(name: &str) -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    let dir = DIR.get_or_init(build_guests);
    let path = dir.join(format!("{name}.wasm"));
    assert!(path.is_file(), "no guest `{name}` at {}", path.display());
    path
}

fn build_guests() -> PathBuf {
    // A target directory of its own, so this never waits on the lock of the cargo that runs us.
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root())
        .args([
            "build",
            "--quiet",
            "--profile",
            "guest",
            "--target",
            "wasm32-wasip2",
        ])
        .env("CARGO_TARGET_DIR", &target);
    for dir in ["examples/tasks/rust", "tests/guests"] {
        for entry in std::fs::read_dir(root().join(dir)).expect("guest directory") {
            let entry = entry.expect("directory entry");
            if entry.path().join("Cargo.toml").is_file() {
                cmd.arg("-p").arg(entry.file_name());
            }
        }
    }
    let out = cmd.output().expect("run cargo to build the guests");
    assert!(
        out.status.success(),
        "building the guests failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("wasm32-wasip2/guest")
}

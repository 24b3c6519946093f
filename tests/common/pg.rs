//! A throwaway PostgreSQL cluster for tests and benchmarks: `initdb` into a temporary directory,
//! started listening on a Unix socket in that directory only (no TCP port to collide on), one
//! database per test. As root the cluster runs as the `postgres` user (PostgreSQL refuses to run
//! as root). A watchdog process removes the cluster when the process that started it exits,
//! however it exits (a test binary's statics are never dropped, and a test may be killed).
//! Needs Debian's `postgresql` package (`scripts/setup` installs it).

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// A running cluster.
#[allow(dead_code)]
pub struct PgCluster {
    dir: PathBuf,
    bin: PathBuf,
    /// Run PostgreSQL's programs as `postgres` (we are root).
    as_postgres: bool,
    /// Holds the watchdog's stdin: when this process exits, it stops the cluster and removes it.
    _watchdog: Mutex<Child>,
}

#[allow(dead_code)]
impl PgCluster {
    /// The cluster shared by this test binary (started on first use).
    pub fn shared() -> &'static PgCluster {
        static SHARED: OnceLock<PgCluster> = OnceLock::new();
        SHARED.get_or_init(PgCluster::start)
    }

    /// Start a new cluster.
    pub fn start() -> PgCluster {
        let bin = bindir();
        let as_postgres = is_root();
        let dir = tempfile::Builder::new()
            .prefix("sluice-pg-")
            .tempdir()
            .expect("a directory for the cluster")
            .keep();
        if as_postgres {
            run(Command::new("chown").arg("postgres:postgres").arg(&dir));
        }
        let cluster = PgCluster {
            // The watchdog: waits for its stdin to close (this process is gone), then stops the
            // cluster at once and removes it.
            _watchdog: Mutex::new(
                Command::new("sh")
                    .arg("-c")
                    .arg(if as_postgres {
                        r#"trap '' INT TERM HUP; read _; runuser -u postgres -- "$1" -D "$2/data" -m immediate stop >/dev/null 2>&1; rm -rf "$2""#
                    } else {
                        r#"trap '' INT TERM HUP; read _; "$1" -D "$2/data" -m immediate stop >/dev/null 2>&1; rm -rf "$2""#
                    })
                    .arg("watchdog")
                    .arg(bin.join("pg_ctl"))
                    .arg(&dir)
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    // Its own process group, signals ignored: a Ctrl-C of the tests does not
                    // kill it before it cleans up.
                    .process_group(0)
                    .spawn()
                    .expect("the cluster's watchdog"),
            ),
            dir,
            bin,
            as_postgres,
        };
        run(cluster
            .command("initdb")
            .arg("-D")
            .arg(cluster.dir.join("data"))
            .args([
                "-A",
                "trust",
                "-U",
                "sluice",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ]));
        cluster.pg_ctl("start");
        cluster
    }

    /// Where its socket is (the `host` of its addresses).
    pub fn socket_dir(&self) -> &Path {
        &self.dir
    }

    /// The address of database `name` in this cluster.
    pub fn url(&self, name: &str) -> String {
        format!("host={} user=sluice dbname={name}", self.dir.display())
    }

    /// A new, empty database (named after `hint` and a counter); its address.
    pub fn database(&self, hint: &str) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{}_{}",
            hint.replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
            N.fetch_add(1, Ordering::Relaxed)
        );
        run(self
            .command("createdb")
            .arg("-h")
            .arg(&self.dir)
            .args(["-U", "sluice", &name]));
        self.url(&name)
    }

    /// Stop it (fast shutdown: connections are closed) and start it again.
    pub fn restart(&self) {
        self.pg_ctl("restart");
    }

    /// Stop it (fast shutdown: connections are closed) until [`PgCluster::resume`].
    pub fn stop(&self) {
        self.pg_ctl("stop");
    }

    /// Start it again after [`PgCluster::stop`].
    pub fn resume(&self) {
        self.pg_ctl("start");
    }

    fn pg_ctl(&self, action: &str) {
        let options = format!(
            "-k {} -c listen_addresses= -c fsync=off",
            self.dir.display()
        );
        run(self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-l")
            .arg(self.dir.join("log"))
            .args(["-w", "-m", "fast", "-o", &options, action]));
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }
}

/// The newest installed PostgreSQL's programs (`/usr/lib/postgresql/<version>/bin`).
fn bindir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => bin,
        None => panic!(
            "PostgreSQL's server programs are not installed (no /usr/lib/postgresql/*/bin/initdb): run scripts/setup"
        ),
    }
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn run(command: &mut Command) {
    let out = command
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{command:?}: {e}"));
    if !out.status.success() {
        let mut text = String::new();
        for line in BufReader::new(&out.stderr[..])
            .lines()
            .map_while(Result::ok)
        {
            text.push_str(&line);
            text.push('\n');
        }
        panic!("{command:?} failed ({}):\n{text}", out.status);
    }
}

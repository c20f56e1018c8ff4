//! A private PostgreSQL cluster for a first run that needs nothing: when `database.url` is left
//! at its default and nothing answers there, `toolsight serve` runs the system's own PostgreSQL
//! binaries (`initdb`, `pg_ctl`) on a data directory of its own, reachable only over a Unix socket
//! in that directory, and stops it when the service stops. An explicit `database.url` is never
//! replaced.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::{DEFAULT_DATABASE_URL, Database, Embedded};

/// Why the private cluster could not be used. None of these is retryable by waiting.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(
        "no PostgreSQL server answers at {DEFAULT_DATABASE_URL} and no PostgreSQL binaries \
         (initdb, pg_ctl) were found on PATH or under /usr/lib/postgresql/*/bin to start a private \
         one. Install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`; macOS: `brew \
         install postgresql@17`), run the bundled stack (`docker compose up`), or point \
         database.url (or DATABASE_URL) at a server"
    )]
    NoBinaries,
    #[error(
        "PostgreSQL refuses to run as root and there is no `postgres` user to run the private \
         cluster as: create one (`useradd --system postgres`), run toolsight as another user, or \
         set database.url"
    )]
    NoUser,
    #[error("preparing the private PostgreSQL cluster in {dir}: {what}")]
    Setup { dir: PathBuf, what: String },
}

/// Whether `serve` uses the private cluster: only for the default URL, and for `auto` only when
/// nothing answers there. Pure.
pub fn wanted(mode: Embedded, url: &str, default_answers: impl FnOnce() -> bool) -> bool {
    if url != DEFAULT_DATABASE_URL {
        return false;
    }
    match mode {
        Embedded::Never => false,
        Embedded::Always => true,
        Embedded::Auto => !default_answers(),
    }
}

/// Whether something accepts TCP connections where the default URL points.
pub fn default_server_answers() -> bool {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 5432));
    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// The running private cluster. [`Cluster::stop`] stops it (also done on drop).
#[derive(Debug)]
pub struct Cluster {
    dir: PathBuf,
    bin: PathBuf,
    run_as: Option<(u32, u32)>,
    /// The URL of the `toolsight` database in it (Unix socket).
    pub url: String,
    stopped: bool,
}

/// The cluster's default place: `$XDG_DATA_HOME/toolsight/postgresql`
/// (`~/.local/share/...`); as root, `/var/lib/toolsight/postgresql`.
pub fn default_dir() -> PathBuf {
    if effective_uid() == Some(0) {
        return PathBuf::from("/var/lib/toolsight/postgresql");
    }
    let data = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(std::env::temp_dir);
    data.join("toolsight/postgresql")
}

/// Starts the private cluster when the settings call for it, and points `db.url` at it.
pub fn start_if_wanted(db: &mut Database) -> Result<Option<Cluster>, ClusterError> {
    if !wanted(db.embedded, &db.url, default_server_answers) {
        return Ok(None);
    }
    let dir = db.embedded_dir.clone().unwrap_or_else(default_dir);
    let cluster = Cluster::start(&dir)?;
    db.url = cluster.url.clone();
    Ok(Some(cluster))
}

/// For commands other than `serve`: when the settings would use the private cluster and one
/// is running (a `serve` elsewhere started it), points `db.url` at it.
pub fn use_running(db: &mut Database) {
    if db.url != DEFAULT_DATABASE_URL || db.embedded == Embedded::Never {
        return;
    }
    let dir = db.embedded_dir.clone().unwrap_or_else(default_dir);
    if dir.join(".s.PGSQL.5432").exists()
        && (db.embedded == Embedded::Always || !default_server_answers())
        && let Ok(d) = utf8_dir(&dir)
    {
        db.url = format!("postgres://postgres@localhost/toolsight?host={d}");
    }
}

impl Cluster {
    /// Initialises the data directory on first use, then starts the server (or takes over
    /// one already running there, left by a service that was killed).
    pub fn start(dir: &Path) -> Result<Cluster, ClusterError> {
        let bin = find_binaries().ok_or(ClusterError::NoBinaries)?;
        let run_as = if effective_uid() == Some(0) {
            Some(postgres_user().ok_or(ClusterError::NoUser)?)
        } else {
            None
        };
        let setup = |what: String| ClusterError::Setup {
            dir: dir.to_owned(),
            what,
        };
        std::fs::create_dir_all(dir).map_err(|e| setup(format!("creating it: {e}")))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))
                .map_err(|e| setup(format!("giving it to the postgres user: {e}")))?;
        }
        let cluster = Cluster {
            dir: dir.to_owned(),
            bin,
            run_as,
            url: format!(
                "postgres://postgres@localhost/toolsight?host={}",
                utf8_dir(dir).map_err(setup)?
            ),
            stopped: false,
        };
        let data = dir.join("data");
        if !data.join("PG_VERSION").exists() {
            tracing::info!(dir = %dir.display(), "creating a private PostgreSQL cluster");
            cluster
                .run(
                    "initdb",
                    &[
                        "-D",
                        &data.to_string_lossy(),
                        "-U",
                        "postgres",
                        "--auth=trust",
                        "-E",
                        "UTF8",
                    ],
                )
                .map_err(setup)?;
        }
        if cluster.pg_ctl(&["status"]).is_err() {
            let options = format!("-c listen_addresses='' -k {}", dir.display());
            cluster
                .pg_ctl(&[
                    "start",
                    "-w",
                    "-t",
                    "60",
                    "-l",
                    &dir.join("postgresql.log").to_string_lossy(),
                    "-o",
                    &options,
                ])
                .map_err(setup)?;
        }
        tracing::info!(dir = %dir.display(), "private PostgreSQL cluster running (unix socket only)");
        Ok(cluster)
    }

    /// Stops the server (fast shutdown: open sessions are ended, nothing is lost).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        match self.pg_ctl(&["stop", "-w", "-m", "fast"]) {
            Ok(()) => {
                tracing::info!(dir = %self.dir.display(), "private PostgreSQL cluster stopped")
            }
            Err(e) => {
                tracing::error!(dir = %self.dir.display(), error = %e, "stopping the private PostgreSQL cluster failed")
            }
        }
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<(), String> {
        let data = self.dir.join("data");
        let mut all = vec!["-D", data.to_str().unwrap_or_default()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }

    fn run(&self, program: &str, args: &[&str]) -> Result<(), String> {
        let mut cmd = Command::new(self.bin.join(program));
        cmd.args(args).current_dir(&self.dir);
        if let Some((uid, gid)) = self.run_as {
            use std::os::unix::process::CommandExt;
            cmd.uid(uid).gid(gid).env("HOME", &self.dir);
        }
        let out = cmd
            .output()
            .map_err(|e| format!("running {program}: {e}"))?;
        if out.status.success() {
            return Ok(());
        }
        let said = String::from_utf8_lossy(&out.stderr);
        let said = said.trim();
        let said = if said.is_empty() {
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        } else {
            said.to_owned()
        };
        Err(format!("{program} {} failed: {said}", args.join(" ")))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn utf8_dir(dir: &Path) -> Result<String, String> {
    let s = dir
        .to_str()
        .ok_or_else(|| "the directory name is not UTF-8".to_owned())?;
    // The socket path (dir + "/.s.PGSQL.5432") must fit in sun_path (108 bytes).
    if s.len() > 90 {
        return Err(format!(
            "the directory name is {} bytes; the socket path must stay under 108",
            s.len()
        ));
    }
    Ok(s.replace('%', "%25").replace(' ', "%20"))
}

/// The directory holding `initdb` and `pg_ctl`: on PATH, else the newest
/// `/usr/lib/postgresql/<version>/bin` (Debian and Ubuntu keep them off PATH).
fn find_binaries() -> Option<PathBuf> {
    let has_both = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(path) = std::env::var_os("PATH")
        && let Some(d) = std::env::split_paths(&path).find(|d| has_both(d))
    {
        return Some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| {
            let e = e.ok()?;
            let v: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            has_both(&bin).then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, d)| d)
}

/// The effective user id (Linux: the owner of `/proc/self`).
fn effective_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// The uid and gid of the `postgres` user.
fn postgres_user() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() > 3 && f[0] == "postgres")
            .then(|| Some((f[2].parse().ok()?, f[3].parse().ok()?)))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_default_url_is_ever_replaced() {
        let never_asked = || -> bool { panic!("no probe for an explicit url") };
        for mode in [Embedded::Auto, Embedded::Always, Embedded::Never] {
            assert!(!wanted(mode, "postgres://db:5432/toolsight", never_asked));
        }
        assert!(wanted(Embedded::Auto, DEFAULT_DATABASE_URL, || false));
        assert!(!wanted(Embedded::Auto, DEFAULT_DATABASE_URL, || true));
        assert!(wanted(Embedded::Always, DEFAULT_DATABASE_URL, || true));
        assert!(!wanted(Embedded::Never, DEFAULT_DATABASE_URL, || false));
    }

    #[test]
    fn the_socket_directory_is_checked() {
        assert_eq!(utf8_dir(Path::new("/tmp/a b")).unwrap(), "/tmp/a%20b");
        assert!(utf8_dir(Path::new(&"/x".repeat(60))).is_err());
    }
}

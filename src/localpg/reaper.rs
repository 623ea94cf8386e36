//! The reaper: a tiny `sh` child that cleans up after us if we die.
//!
//! Statics are never dropped, and a test binary or `pgsluice demo` can be
//! killed at any moment, so `Drop` alone would leak running postmasters and
//! data directories. The reaper blocks reading a pipe whose only write end is
//! held by the [`LocalCluster`](super::LocalCluster) (std opens it
//! close-on-exec, so no postmaster or other child inherits it). When our
//! process ends for any reason the kernel closes that end, `read` sees EOF,
//! and the reaper:
//!
//! 1. reads each node's postmaster pid from the first line of
//!    `DATA/postmaster.pid` *at that moment* (so restarted nodes are covered),
//!    and only trusts it if `/proc/PID/cwd` is that data directory (a stale
//!    file of a killed node may name a recycled pid);
//! 2. sends those postmasters SIGINT (fast shutdown) and waits up to ~10 s,
//!    then SIGKILLs the survivors;
//! 3. removes the cluster's temporary directory.
//!
//! Its stdin is the pipe, stdout and stderr are /dev/null, descriptors we
//! inherited without close-on-exec are closed before the script runs, its
//! working directory is `/`, and it runs in its own process group, so it
//! holds no other descriptor of ours (a test runner's output pipe would otherwise stay
//! open) and a Ctrl-C aimed at the caller's terminal does not reach it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use super::error::LocalPgError;
use super::tools;

/// `$1` = directory to remove, `$2..` = data directories.
const SCRIPT: &str = r#"
trap '' HUP INT
while read -r _; do :; done
root=$1
shift
alive() { grep -qs '^State:[[:space:]]*[^Z[:space:]]' "/proc/$1/status"; }
pids=
for d in "$@"; do
  pid=$(head -n 1 "$d/postmaster.pid" 2>/dev/null)
  case $pid in ''|*[!0-9]*) continue ;; esac
  [ "$(readlink "/proc/$pid/cwd" 2>/dev/null)" = "$d" ] || continue
  kill -INT "$pid" 2>/dev/null && pids="$pids $pid"
done
n=0
while [ -n "$pids" ] && [ "$n" -lt 100 ]; do
  left=
  for p in $pids; do alive "$p" && left="$left $p"; done
  pids=$left
  [ -n "$pids" ] && sleep 0.1
  n=$((n + 1))
done
for p in $pids; do kill -KILL "$p" 2>/dev/null; done
rm -rf -- "$root"
"#;

/// The running reaper; [`Reaper::release`] ends it after a normal teardown.
#[derive(Debug)]
pub(crate) struct Reaper {
    child: Child,
}

impl Reaper {
    /// Starts the reaper for a cluster rooted at `root` with these data dirs.
    pub fn spawn(root: &Path, data_dirs: &[PathBuf]) -> Result<Self, LocalPgError> {
        let (shell, close_inherited) = tools::fd_closing_shell();
        let child = Command::new(shell)
            .env_remove("BASH_ENV")
            .env_remove("ENV")
            .arg("-c")
            .arg(format!("{close_inherited}{SCRIPT}"))
            .arg("pgsluice-localpg-reaper")
            .arg(root)
            .args(data_dirs)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir("/")
            .process_group(0)
            .spawn()
            .map_err(|e| LocalPgError::io("starting the cleanup process (a shell)", e))?;
        Ok(Self { child })
    }

    /// Closes the pipe and waits for the reaper to finish. Call it after the
    /// nodes were stopped and the directory removed: it then finds nothing to
    /// do and exits at once.
    pub fn release(mut self) {
        drop(self.child.stdin.take());
        if let Err(e) = self.child.wait() {
            tracing::warn!(error = %e, "waiting for the localpg cleanup process");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn removes_the_directory_when_the_pipe_closes() {
        let base = tempfile::tempdir().expect("tempdir");
        let root = base.path().join("cluster");
        let data = root.join("node0");
        std::fs::create_dir_all(&data).expect("mkdir");
        // A stale pid file naming a process that is not a postmaster of this
        // directory (our own pid): it must be left alone.
        std::fs::write(
            data.join("postmaster.pid"),
            format!("{}\n", std::process::id()),
        )
        .expect("write");
        let reaper = Reaper::spawn(&root, &[data]).expect("spawn");
        std::thread::sleep(Duration::from_millis(50));
        assert!(root.exists(), "reaper acted before the pipe closed");
        let started = Instant::now();
        reaper.release();
        assert!(!root.exists(), "reaper did not remove the directory");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
}

//! One postmaster: choosing its port, starting it, waiting until it accepts
//! logins, and stopping or crashing it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{self, Signal};
use nix::unistd::Pid;
use rand::Rng;

use super::error::LocalPgError;
use super::tools::{self, RunAs, Tools};

/// Name of the per-node config file included at the end of postgresql.conf.
pub(crate) const NODE_CONF: &str = "pgsluice.node.conf";

/// How long a postmaster may take to accept logins (includes crash recovery).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a fast shutdown may take before we SIGKILL.
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long killed processes may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// Fresh ports tried when a new node loses a port race.
const PORT_ATTEMPTS: u32 = 8;
/// How long a restart on a fixed port keeps retrying while the port is taken.
const FIXED_PORT_RETRY: Duration = Duration::from_secs(10);
/// Poll interval while waiting for a postmaster.
const POLL: Duration = Duration::from_millis(10);
/// Lines of a node's log quoted in errors.
const LOG_TAIL_LINES: usize = 30;

/// What every node operation needs: binaries, OS identity, superuser password.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub tools: Tools,
    pub run_as: RunAs,
    pub superuser: String,
    pub password: String,
}

impl Ctx {
    /// Runs SQL as the superuser on 127.0.0.1:`port`.
    pub fn psql(&self, port: u16, database: &str, sql: &[&str]) -> Result<String, LocalPgError> {
        tools::psql(
            &self.tools,
            port,
            &self.superuser,
            &self.password,
            database,
            sql,
        )
    }
}

/// Where a node lives on disk, and how errors name it.
#[derive(Debug, Clone)]
pub(crate) struct NodeFiles {
    pub label: String,
    pub data_dir: PathBuf,
    pub log_file: PathBuf,
}

/// Whether `launch` may move the node to another port.
#[derive(Debug, Clone, Copy)]
pub(crate) enum PortChoice {
    /// A new node: pick a free port, and another one if we lose a race for it.
    Pick,
    /// A restart: this port or nothing (callers already know it).
    Fixed(u16),
}

/// A running postmaster that is our child process. Dropping it without
/// stopping it kills it and its children.
#[derive(Debug)]
pub(crate) struct Postmaster {
    child: Child,
    label: String,
}

/// Why one start attempt failed.
enum StartFailure {
    /// Lost the port to another process: try again.
    PortBusy,
    /// Anything else: give up.
    Fatal(LocalPgError),
}

impl From<LocalPgError> for StartFailure {
    fn from(e: LocalPgError) -> Self {
        Self::Fatal(e)
    }
}

/// Starts the node and waits until it accepts logins; returns it with the
/// port it listens on.
pub(crate) fn launch(
    ctx: &Ctx,
    files: &NodeFiles,
    choice: PortChoice,
) -> Result<(Postmaster, u16), LocalPgError> {
    let started = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let port = match choice {
            PortChoice::Pick => pick_port()?,
            PortChoice::Fixed(port) => port,
        };
        write_node_conf(ctx, &files.data_dir, port)?;
        let log_offset = std::fs::metadata(&files.log_file).map_or(0, |m| m.len());
        let mut pm = Postmaster::spawn(ctx, files)?;
        match wait_ready(ctx, &mut pm, files, port, log_offset) {
            Ok(()) => {
                tracing::debug!(node = %files.label, port, elapsed = ?started.elapsed(), "node accepts logins");
                return Ok((pm, port));
            }
            Err(StartFailure::Fatal(e)) => return Err(e),
            Err(StartFailure::PortBusy) => {
                tracing::debug!(node = %files.label, port, "port taken by another process");
                let give_up = match choice {
                    PortChoice::Pick => attempts >= PORT_ATTEMPTS,
                    PortChoice::Fixed(_) => started.elapsed() >= FIXED_PORT_RETRY,
                };
                if give_up {
                    return Err(LocalPgError::PortInUse {
                        node: files.label.clone(),
                        port,
                        attempts,
                        log: files.log_file.clone(),
                        log_tail: log_tail(&files.log_file),
                    });
                }
                if let PortChoice::Fixed(_) = choice {
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
        }
    }
}

/// A free loopback port. Prefers ports below the kernel's ephemeral range, so
/// that outgoing connections (a benchmark opening thousands) cannot occupy a
/// stopped node's port before it is restarted; falls back to binding port 0.
pub(crate) fn pick_port() -> Result<u16, LocalPgError> {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const LOWEST: u16 = 20000;
    if ephemeral_low > LOWEST + 1000 {
        let mut rng = rand::rng();
        for _ in 0..64 {
            let port = rng.random_range(LOWEST..ephemeral_low);
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return Ok(port);
            }
        }
    }
    let listener = TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| LocalPgError::io("binding 127.0.0.1:0 to find a free port", e))?;
    let addr = listener
        .local_addr()
        .map_err(|e| LocalPgError::io("reading the address of a bound socket", e))?;
    Ok(addr.port())
}

/// Writes the node's own settings (its port), included last by postgresql.conf.
fn write_node_conf(ctx: &Ctx, data_dir: &Path, port: u16) -> Result<(), LocalPgError> {
    let path = data_dir.join(NODE_CONF);
    let text =
        format!("# written by pgsluice localpg: settings of this node only\nport = {port}\n");
    std::fs::write(&path, text)
        .map_err(|e| LocalPgError::io(format!("writing {}", path.display()), e))?;
    ctx.run_as.chown(&path)
}

impl Postmaster {
    /// `postgres -D data_dir` in its own process group, stdin /dev/null,
    /// stdout and stderr appended to the log file.
    fn spawn(ctx: &Ctx, files: &NodeFiles) -> Result<Self, LocalPgError> {
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.log_file)
            .map_err(|e| LocalPgError::io(format!("opening {}", files.log_file.display()), e))?;
        let log_err = log
            .try_clone()
            .map_err(|e| LocalPgError::io("duplicating a log file handle", e))?;
        ctx.run_as.chown(&files.log_file)?;
        let mut cmd = tools::sealed_command(&ctx.tools.postgres);
        cmd.arg("-D")
            .arg(&files.data_dir)
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0);
        ctx.run_as.apply(&mut cmd);
        let child = cmd
            .spawn()
            .map_err(|e| LocalPgError::io(format!("starting postgres for {}", files.label), e))?;
        Ok(Self {
            child,
            label: files.label.clone(),
        })
    }

    pub fn pid(&self) -> Pid {
        // Pids fit in i32 on every Unix; u32 is std's portable type.
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    /// `Some(status)` once the postmaster has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>, LocalPgError> {
        self.child
            .try_wait()
            .map_err(|e| LocalPgError::io(format!("checking whether {} is running", self.label), e))
    }

    fn signal(&self, sig: Signal) -> Result<(), LocalPgError> {
        match signal::kill(self.pid(), sig) {
            // Already gone (and maybe not yet reaped): nothing to signal.
            Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
            Err(source) => Err(LocalPgError::Signal {
                node: self.label.clone(),
                signal: sig.as_str(),
                pid: self.pid().as_raw(),
                source,
            }),
        }
    }

    /// Asks for a fast shutdown (SIGINT) without waiting.
    pub fn request_fast_shutdown(&self) -> Result<(), LocalPgError> {
        self.signal(Signal::SIGINT)
    }

    /// Waits for a requested shutdown; kills the node if it takes longer
    /// than `timeout`.
    pub fn wait_stopped(mut self, timeout: Duration) -> Result<(), LocalPgError> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.exited()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
        let label = self.label.clone();
        self.kill()?;
        Err(LocalPgError::StopTimeout {
            node: label,
            timeout,
        })
    }

    /// Fast shutdown: SIGINT, then wait until the postmaster is gone.
    pub fn stop(self) -> Result<(), LocalPgError> {
        self.request_fast_shutdown()?;
        self.wait_stopped(STOP_TIMEOUT)
    }

    /// A real crash: SIGKILL to the postmaster and all of its children, then
    /// wait until none of them exists (so a restart finds no live backend
    /// attached to the old shared memory).
    pub fn kill(mut self) -> Result<(), LocalPgError> {
        self.kill_inner()
    }

    fn kill_inner(&mut self) -> Result<(), LocalPgError> {
        if self.exited()?.is_some() {
            return Ok(());
        }
        let pid = self.pid();
        // Freeze it first so that it cannot fork a child we would miss.
        self.signal(Signal::SIGSTOP)?;
        let children = children_of(pid);
        for &child in &children {
            let _ = signal::kill(child, Signal::SIGKILL);
        }
        self.signal(Signal::SIGKILL)?;
        self.child
            .wait()
            .map_err(|e| LocalPgError::io(format!("waiting for {} to die", self.label), e))?;
        let deadline = Instant::now() + KILL_WAIT;
        while children.iter().any(|&c| process_alive(c)) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        Ok(())
    }
}

impl Drop for Postmaster {
    fn drop(&mut self) {
        // Only reached on error paths or when a caller forgot the node:
        // never leave a postmaster running behind our back.
        if let Err(e) = self.kill_inner() {
            tracing::warn!(node = %self.label, error = %e, "could not kill postmaster");
        }
    }
}

/// Polls until the postmaster says it is ready (in postmaster.pid) and a real
/// login succeeds.
fn wait_ready(
    ctx: &Ctx,
    pm: &mut Postmaster,
    files: &NodeFiles,
    port: u16,
    log_offset: u64,
) -> Result<(), StartFailure> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut last_error = String::from("none attempted");
    loop {
        if let Some(status) = pm.exited()? {
            let new_log = read_from(&files.log_file, log_offset);
            let bind_failed = new_log.contains("could not create any TCP/IP sockets")
                || new_log.contains("Address already in use");
            if bind_failed || TcpListener::bind(("127.0.0.1", port)).is_err() {
                return Err(StartFailure::PortBusy);
            }
            return Err(StartFailure::Fatal(LocalPgError::NodeExited {
                node: files.label.clone(),
                status: status.to_string(),
                log: files.log_file.clone(),
                log_tail: log_tail(&files.log_file),
            }));
        }
        if let Some("ready" | "standby") = pid_file_status(&files.data_dir, pm.pid()).as_deref() {
            match ctx.psql(port, "postgres", &["SELECT 1"]) {
                Ok(_) => return Ok(()),
                Err(e) => last_error = e.to_string(),
            }
        }
        if Instant::now() >= deadline {
            return Err(StartFailure::Fatal(LocalPgError::StartTimeout {
                node: files.label.clone(),
                port,
                timeout: START_TIMEOUT,
                last_error,
                log: files.log_file.clone(),
                log_tail: log_tail(&files.log_file),
            }));
        }
        std::thread::sleep(POLL);
    }
}

/// The status line (8th) of postmaster.pid — "starting", "ready", "standby",
/// "stopping" — if the file belongs to `pid`.
fn pid_file_status(data_dir: &Path, pid: Pid) -> Option<String> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let mut lines = text.lines();
    let file_pid: i32 = lines.next()?.trim().parse().ok()?;
    if file_pid != pid.as_raw() {
        return None;
    }
    Some(lines.nth(6)?.trim().to_string())
}

/// Pids whose parent is `parent`, from /proc (empty where there is no /proc).
fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| {
            proc_stat(Pid::from_raw(pid)).is_some_and(|(_, ppid)| ppid == parent.as_raw())
        })
        .map(Pid::from_raw)
        .collect()
}

/// (state, ppid) from /proc/PID/stat.
fn proc_stat(pid: Pid) -> Option<(char, i32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything.
    let mut fields = text[text.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Exists and is not a zombie (a zombie holds no memory or sockets).
fn process_alive(pid: Pid) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| !matches!(state, 'Z' | 'X'))
}

/// What was appended to a log file after `offset` (at most 64 KiB).
fn read_from(path: &Path, offset: u64) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        if f.seek(SeekFrom::Start(offset)).is_ok() {
            let _ = f.take(64 * 1024).read_to_end(&mut buf);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last lines of a node's log, for error messages.
pub(crate) fn log_tail(path: &Path) -> String {
    let len = std::fs::metadata(path).map_or(0, |m| m.len());
    let text = read_from(path, len.saturating_sub(16 * 1024));
    if text.is_empty() {
        return "    (empty)".into();
    }
    tools::last_lines(&text, LOG_TAIL_LINES)
}

/// Waits until the replica on `port` streams WAL from the primary and has
/// replayed it up to `target_lsn` (a primary position such as "0/3000148").
pub(crate) fn wait_streaming(
    ctx: &Ctx,
    files: &NodeFiles,
    port: u16,
    target_lsn: &str,
    timeout: Duration,
) -> Result<(), LocalPgError> {
    let query = format!(
        "SELECT coalesce((SELECT status FROM pg_stat_wal_receiver), 'no wal receiver'), \
         coalesce(pg_last_wal_replay_lsn() >= {}::pg_lsn, false)",
        tools::quote_literal(target_lsn)
    );
    let deadline = Instant::now() + timeout;
    loop {
        let answer = ctx.psql(port, "postgres", &[&query])?;
        let (status, replayed) = answer.split_once('|').unwrap_or((answer.as_str(), "f"));
        if status == "streaming" && replayed == "t" {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(LocalPgError::NotStreaming {
                node: files.label.clone(),
                timeout,
                status: format!("{status}, replayed up to {target_lsn}: {replayed}"),
                log: files.log_file.clone(),
                log_tail: log_tail(&files.log_file),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_pid_file_status() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pid_file = "4242\n/tmp/x\n1700000000\n5432\n\n127.0.0.1\n  1234  5678\nready   \n";
        std::fs::write(dir.path().join("postmaster.pid"), pid_file).expect("write");
        assert_eq!(
            pid_file_status(dir.path(), Pid::from_raw(4242)).as_deref(),
            Some("ready")
        );
        assert_eq!(pid_file_status(dir.path(), Pid::from_raw(4243)), None);
    }

    #[test]
    fn reads_own_proc_stat() {
        let me = Pid::this();
        let (state, ppid) = proc_stat(me).expect("/proc/self/stat");
        assert!(process_alive(me));
        assert_ne!(state, 'Z');
        assert_eq!(ppid, nix::unistd::getppid().as_raw());
    }

    #[test]
    fn picks_a_bindable_port() {
        let port = pick_port().expect("port");
        assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
    }
}

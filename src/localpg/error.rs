//! The one error type of `localpg`: every variant names what failed and,
//! where PostgreSQL itself said why, carries the tail of the node's log.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// Why a local cluster could not be started, controlled or removed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalPgError {
    /// No directory holding `initdb`, `postgres` and `pg_basebackup` was found.
    #[error(
        "PostgreSQL server binaries (initdb, postgres, pg_basebackup) not found; install them with `apt-get install -y postgresql` (or set PGSLUICE_PG_BINDIR)"
    )]
    BinariesNotFound,

    /// `PGSLUICE_PG_BINDIR` is set but lacks one of the server binaries.
    #[error("PGSLUICE_PG_BINDIR={} does not contain initdb, postgres and pg_basebackup", .dir.display())]
    BadBindirOverride {
        /// The directory named by the variable.
        dir: PathBuf,
    },

    /// `psql` is in neither the server bindir nor on `PATH`.
    #[error(
        "psql not found in {} or on PATH; install it with `apt-get install -y postgresql-client`",
        .bindir.display()
    )]
    PsqlNotFound {
        /// The server bindir that was searched first.
        bindir: PathBuf,
    },

    /// The server binaries are older than this module supports.
    #[error("PostgreSQL {version} in {} is too old: localpg needs PostgreSQL 12 or newer", .bindir.display())]
    UnsupportedVersion {
        /// What `postgres -V` printed.
        version: String,
        /// Where the binaries are.
        bindir: PathBuf,
    },

    /// The [`ClusterOptions`](super::ClusterOptions) cannot describe a working cluster.
    #[error("invalid cluster options: {0}")]
    InvalidOptions(String),

    /// A file system or process-spawning operation failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, e.g. "creating /tmp/pgsluice-x/node0.log".
        what: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },

    /// Running as root, but the unprivileged `postgres` OS user is missing and
    /// could not be created or looked up.
    #[error("cannot use the OS user `postgres` (PostgreSQL refuses to run as root): {reason}")]
    OsUser {
        /// What went wrong.
        reason: String,
    },

    /// A helper program (initdb, pg_basebackup, psql, useradd) exited unsuccessfully.
    #[error("{command} failed ({status}):\n{output}")]
    CommandFailed {
        /// A description of the command (without secrets).
        command: String,
        /// Its exit status.
        status: String,
        /// The last lines of what it printed.
        output: String,
    },

    /// A postmaster exited before it accepted logins.
    #[error("{node} exited during startup ({status}); last lines of {}:\n{log_tail}", .log.display())]
    NodeExited {
        /// "primary" or "replicaN".
        node: String,
        /// The postmaster's exit status.
        status: String,
        /// The node's log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },

    /// A postmaster kept running but did not accept logins in time.
    #[error(
        "{node} (127.0.0.1:{port}) did not accept logins within {timeout:?} (last login error: {last_error}); last lines of {}:\n{log_tail}",
        .log.display()
    )]
    StartTimeout {
        /// "primary" or "replicaN".
        node: String,
        /// Its TCP port.
        port: u16,
        /// How long we waited.
        timeout: Duration,
        /// The last `psql` failure, or "none attempted" if the server never
        /// reported itself ready in `postmaster.pid`.
        last_error: String,
        /// The node's log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },

    /// The node's port stayed taken by another process.
    #[error(
        "{node} could not listen on 127.0.0.1:{port}: the port is in use by another process ({attempts} attempts); last lines of {}:\n{log_tail}",
        .log.display()
    )]
    PortInUse {
        /// "primary" or "replicaN".
        node: String,
        /// The last port tried.
        port: u16,
        /// How many times the postmaster was started.
        attempts: u32,
        /// The node's log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },

    /// A replica accepted logins but did not stream and replay the primary's
    /// WAL in time.
    #[error(
        "{node} did not stream and replay the primary's WAL within {timeout:?} (wal receiver: {status}); last lines of {}:\n{log_tail}",
        .log.display()
    )]
    NotStreaming {
        /// "replicaN".
        node: String,
        /// How long we waited.
        timeout: Duration,
        /// The last `pg_stat_wal_receiver.status` seen and whether replay
        /// had reached the target position.
        status: String,
        /// The replica's log file.
        log: PathBuf,
        /// Its last lines.
        log_tail: String,
    },

    /// A fast shutdown did not finish in time; the node was then killed.
    #[error(
        "{node} did not finish a fast shutdown within {timeout:?}; it was killed with SIGKILL instead"
    )]
    StopTimeout {
        /// "primary" or "replicaN".
        node: String,
        /// How long we waited.
        timeout: Duration,
    },

    /// Sending a signal to a postmaster failed.
    #[error("sending {signal} to {node} (pid {pid}): {source}")]
    Signal {
        /// "primary" or "replicaN".
        node: String,
        /// The signal's name.
        signal: &'static str,
        /// The postmaster's pid.
        pid: i32,
        /// The error from kill(2).
        #[source]
        source: nix::errno::Errno,
    },

    /// There is no node with that index.
    #[error(
        "no node with index {index}: the cluster has {count} nodes (0 = primary, 1.. = replicas)"
    )]
    NoSuchNode {
        /// The index asked for.
        index: usize,
        /// How many nodes there are.
        count: usize,
    },

    /// A setup thread panicked (a bug in this module).
    #[error("the setup thread for {node} panicked")]
    SetupPanicked {
        /// "replicaN".
        node: String,
    },
}

impl LocalPgError {
    /// Wraps an I/O error with a description of what was being done.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Self {
        Self::Io {
            what: what.into(),
            source,
        }
    }
}

//! The `pgsluice` command: CLI, logging, signals and the runtime. No pooler
//! logic lives here.

use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use pgsluice::config::{Config, LogFormat};
use pgsluice::localpg::{ClusterOptions, LocalCluster};
use pgsluice::proxy::{Proxy, ShutdownHandle};
use tokio::signal::unix::{SignalKind, signal};

mod health_check;

/// jemalloc, not glibc's malloc: it keeps each size of allocation in runs
/// of its own and gives back the pages of runs that empty. With glibc, the
/// memory of the sessions of clients that worked and were then parked stayed
/// in the heap among the parked clients' records (1.7–2.4 kB of RSS per idle
/// client against pgbouncer's 0.81; `malloc_trim` gave back almost nothing).
/// docs/performance.md has the measurements.
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings, read once at start-up (`_RJEM_MALLOC_CONF` in the
/// environment overrides them): a background thread gives freed pages back
/// to the kernel after ~1 s unused (`dirty_decay_ms`) at once
/// (`muzzy_decay_ms:0`), so the runtime thread makes no `madvise` calls.
/// `unsafe` only because the symbol is exported by name for jemalloc to
/// read; a thin pointer to a NUL-terminated string, as it expects.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
static malloc_conf: &[u8; 60] = b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

#[derive(Parser)]
#[command(
    name = "pgsluice",
    version,
    about = "PostgreSQL connection pooler and read/write router"
)]
struct Cli {
    /// Configuration file (TOML). PGSLUICE_SECTION__KEY variables override it.
    #[arg(
        long,
        short,
        global = true,
        env = "PGSLUICE_CONFIG",
        default_value = "pgsluice.toml"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pooler (the default).
    Run,
    /// Validate the configuration and print the effective settings.
    Check,
    /// Start a throwaway PostgreSQL primary + 2 replicas and pgsluice in front.
    Demo {
        /// Port pgsluice listens on (127.0.0.1).
        #[arg(long, default_value_t = 6432)]
        port: u16,
        /// max_connections of the demo PostgreSQL servers.
        #[arg(long, default_value_t = 200)]
        max_connections: u32,
    },
    /// Read a password from stdin and print its SCRAM-SHA-256 secret, for
    /// `users.NAME.password` (or PostgreSQL's `ALTER ROLE … PASSWORD`).
    HashPassword,
    /// Print the shard that owns a key: the REMAINDER of the `PARTITION BY HASH` partition
    /// PostgreSQL would put it in with MODULUS = --shards.
    ShardOf {
        /// The key, as SQL text (`42`, `alice`, `a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11`).
        #[arg(long, allow_hyphen_values = true)]
        key: String,
        /// Number of shards (the partitions' MODULUS).
        #[arg(long)]
        shards: usize,
        /// Key type: bigint, integer, text or uuid.
        #[arg(long = "type", default_value = "bigint")]
        key_type: String,
    },
    /// Probe pgsluice's HTTP endpoint, for container HEALTHCHECKs in images
    /// without curl: exit 0 on HTTP 200, 1 otherwise with the reason on stderr.
    Health {
        /// URL to GET (`[admin] http_listen_addr` of the instance).
        #[arg(
            long,
            env = "PGSLUICE_HEALTH_URL",
            default_value = "http://127.0.0.1:9930/ready"
        )]
        url: String,
        /// Deadline for connecting, sending and reading the answer.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = cli.command.unwrap_or(Command::Run);
    // `run` sets up logging from its config file (format, level).
    if !matches!(command, Command::Run) {
        let _ = pgsluice::logging::init(LogFormat::Text, "info");
    }
    let result = match command {
        Command::Check => check(&cli.config),
        Command::Run => run(&cli.config),
        Command::Demo {
            port,
            max_connections,
        } => demo(port, max_connections),
        Command::HashPassword => hash_password(),
        Command::ShardOf {
            key,
            shards,
            key_type,
        } => shard_of(&key, shards, &key_type),
        Command::Health { url, timeout } => return health(&url, timeout),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgsluice: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn runtime(config: &Config) -> Result<tokio::runtime::Runtime> {
    // One thread: a current-thread runtime, with no cross-thread wakeups.
    let mut builder = match config.general.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    builder
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn check(path: &std::path::Path) -> Result<()> {
    let config = Config::load(path).context("invalid configuration")?;
    print!("{}", config.render());
    Ok(())
}

/// The password is read from stdin, never from the command line (where
/// `ps` and shell history would show it). One trailing newline is dropped.
fn hash_password() -> Result<()> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(64 * 1024)
        .read_to_end(&mut input)
        .context("cannot read the password from stdin")?;
    let password = input
        .strip_suffix(b"\n")
        .map(|p| p.strip_suffix(b"\r").unwrap_or(p))
        .unwrap_or(&input);
    if password.is_empty() {
        anyhow::bail!("no password on stdin (e.g. `printf %s \"$PW\" | pgsluice hash-password`)");
    }
    if password.contains(&0) {
        anyhow::bail!("the password contains a NUL byte, which PostgreSQL cannot use");
    }
    println!("{}", pgsluice::auth::hash_password(password));
    Ok(())
}

fn shard_of(key: &str, shards: usize, key_type: &str) -> Result<()> {
    use pgsluice::router::shard::{KeyType, shard_of};
    let ty = KeyType::parse(key_type).with_context(|| {
        format!("--type {key_type:?} is not a shard key type (bigint, integer, text, uuid)")
    })?;
    if shards == 0 {
        anyhow::bail!("--shards must be at least 1");
    }
    let value = ty
        .parse_text(key)
        .map_err(|e| anyhow::anyhow!("--key: {e}"))?;
    println!("{}", shard_of(ty, &value, shards));
    Ok(())
}

/// Exit codes follow Docker's HEALTHCHECK: 0 healthy, 1 unhealthy (2 is
/// reserved there, so a failed probe never returns it).
fn health(url: &str, timeout: std::time::Duration) -> ExitCode {
    match health_check::probe(url, timeout) {
        Ok(body) => {
            print!("{body}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("pgsluice health: {reason}");
            ExitCode::from(1)
        }
    }
}

/// Every client and server connection is a descriptor: the soft open-files
/// limit (often 1,024) is raised to the hard one, as far as the process may
/// without privileges. Logged; a failure only warns.
fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(error = %e, soft, hard, "cannot raise the open-files limit"),
        },
        Ok((soft, _)) => tracing::info!(limit = soft, "open-files limit"),
        Err(e) => tracing::warn!(error = %e, "cannot read the open-files limit"),
    }
}

fn run(path: &std::path::Path) -> Result<()> {
    let config = Config::load(path).context("invalid configuration")?;
    let log = pgsluice::logging::init(config.general.log_format, &config.general.log_level)
        .map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))?;
    runtime(&config)?.block_on(async {
        let listen = config.general.listen_addr;
        let proxy = Proxy::bind(config)
            .await
            .with_context(|| format!("cannot listen on {listen} (general.listen_addr)"))?;
        let shared = proxy.shared();
        let _ = shared.log.set(log);
        // An absolute path: a reload must find the file whatever the
        // working directory is by then.
        let file = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
        shared.reloads.set_config_file(file);
        tracing::info!(addr = %proxy.local_addr()?, version = env!("CARGO_PKG_VERSION"), "pgsluice listening");
        raise_open_files_limit();
        if let Some(http) = proxy.http_addr() {
            tracing::info!(addr = %http, "HTTP endpoint: /health /ready /metrics");
        }
        serve_until_signalled(proxy, false).await
    })
}

/// Runs the proxy. SIGTERM drains as `general.shutdown_mode` says (a second
/// SIGTERM exits at once), SIGINT exits at once (`demo`: closes clients and
/// returns so the cluster is cleaned up), SIGHUP reloads the configuration
/// file with its hba_file and TLS files (an invalid one keeps the running
/// configuration; the error names the file and the setting).
async fn serve_until_signalled(proxy: Proxy, demo: bool) -> Result<()> {
    let handle = proxy.shutdown_handle();
    let shared = proxy.shared().clone();
    let mut task = tokio::spawn(proxy.run());
    let mut term = signal(SignalKind::terminate()).context("cannot install SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot install SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install SIGHUP handler")?;
    let mut draining = false;
    loop {
        tokio::select! {
            r = &mut task => {
                r.context("proxy task failed")?;
                return Ok(());
            }
            _ = term.recv() => {
                if draining && !demo {
                    tracing::warn!("second SIGTERM: exiting now");
                    std::process::exit(1);
                }
                let mode = shared.config().general.shutdown_mode;
                match mode {
                    pgsluice::config::ShutdownMode::Transactions => tracing::info!("SIGTERM: draining (no new clients; transactions may finish within shutdown_timeout)"),
                    pgsluice::config::ShutdownMode::Clients => tracing::info!("SIGTERM: draining (no new clients; clients may stay until they disconnect, within shutdown_timeout)"),
                }
                draining = true;
                handle.shutdown_with(mode);
                if demo {
                    stop_now(&handle, &mut task).await;
                    return Ok(());
                }
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: closing now");
                if demo {
                    stop_now(&handle, &mut task).await;
                    return Ok(());
                }
                std::process::exit(0);
            }
            _ = hup.recv() => {
                if shared.reloads.config_file().is_some() {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // Logged (and counted) by reload() itself.
                    let _ = shared.reload();
                } else {
                    match shared.reload_tls() {
                        Ok(()) => tracing::info!("SIGHUP: TLS certificates and keys re-read; new connections use them"),
                        Err(e) => tracing::error!(error = %e, "SIGHUP: TLS reload failed; keeping the previous certificates and keys"),
                    }
                }
            }
        }
    }
}

async fn stop_now(handle: &ShutdownHandle, task: &mut tokio::task::JoinHandle<()>) {
    handle.shutdown();
    handle.stop_now();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), task).await;
}

fn demo(port: u16, max_connections: u32) -> Result<()> {
    eprintln!("pgsluice demo: starting PostgreSQL primary + 2 streaming replicas…");
    let cluster = LocalCluster::start(ClusterOptions {
        max_connections,
        ..ClusterOptions::default()
    })
    .context("cannot start the demo PostgreSQL cluster")?;
    let opts = cluster.options().clone();
    let toml = cluster.pgsluice_config(&format!(
        "listen_addr = \"127.0.0.1:{port}\"\npool_mode = \"transaction\"\nshutdown_timeout = \"5s\""
    ));
    let result = (|| -> Result<()> {
        let config =
            Config::from_toml(&toml, "demo", std::env::vars()).context("demo configuration")?;
        let rt = runtime(&config)?;
        rt.block_on(async {
            let proxy = Proxy::bind(config).await.with_context(|| {
                format!("cannot listen on 127.0.0.1:{port}; pick another with --port")
            })?;
            let addr = proxy.local_addr()?;
            raise_open_files_limit();
            let mut out = std::io::stdout().lock();
            writeln!(
                out,
                "pgsluice: postgres://{}:{}@127.0.0.1:{}/{}",
                opts.app_user,
                opts.app_password,
                addr.port(),
                opts.database
            )?;
            writeln!(out, "primary: {}", cluster.primary().addr())?;
            for r in cluster.replicas() {
                writeln!(out, "replica: {}", r.addr())?;
            }
            out.flush()?;
            drop(out);
            eprintln!(
                "pgsluice demo: ready; Ctrl-C or SIGTERM stops everything and removes the data"
            );
            serve_until_signalled(proxy, true).await
        })
    })();
    eprintln!("pgsluice demo: stopping PostgreSQL and removing its data…");
    cluster.shutdown().context("cleaning up the demo cluster")?;
    result
}

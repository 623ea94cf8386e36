//! Finding the PostgreSQL binaries, choosing the OS user they run as, and
//! running the short-lived helper programs (initdb, pg_basebackup, psql).

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::unistd::{Group, Uid, User};

use super::error::LocalPgError;

/// The server binaries `find_bindir` insists on.
const SERVER_BINARIES: [&str; 3] = ["initdb", "postgres", "pg_basebackup"];

/// Environment variable that overrides the binary search.
pub const BINDIR_ENV: &str = "PGSLUICE_PG_BINDIR";

/// How many trailing lines of a failed command's output go into the error.
const OUTPUT_TAIL_LINES: usize = 30;

/// Finds the directory holding `initdb`, `postgres` and `pg_basebackup`.
///
/// Order: `$PGSLUICE_PG_BINDIR` (an error if it lacks a binary), then
/// `pg_config --bindir`, then the highest version under
/// `/usr/lib/postgresql/*/bin`, then the directory `initdb` on `PATH`
/// resolves to (following symlinks).
pub fn find_bindir() -> Result<PathBuf, LocalPgError> {
    if let Some(dir) = std::env::var_os(BINDIR_ENV).filter(|v| !v.is_empty()) {
        let dir = PathBuf::from(dir);
        return if has_server_binaries(&dir) {
            Ok(dir)
        } else {
            Err(LocalPgError::BadBindirOverride { dir })
        };
    }
    if let Some(dir) = pg_config_bindir().filter(|d| has_server_binaries(d)) {
        return Ok(dir);
    }
    if let Some(dir) = highest_versioned_bindir(Path::new("/usr/lib/postgresql")) {
        return Ok(dir);
    }
    if let Some(dir) = initdb_on_path() {
        return Ok(dir);
    }
    Err(LocalPgError::BinariesNotFound)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn has_server_binaries(dir: &Path) -> bool {
    SERVER_BINARIES.iter().all(|b| is_executable(&dir.join(b)))
}

fn pg_config_bindir() -> Option<PathBuf> {
    let out = Command::new("pg_config")
        .arg("--bindir")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| PathBuf::from(text))
}

/// `/usr/lib/postgresql/<version>/bin` with the highest version (compared
/// numerically, so 9.6 < 10 < 15) that holds all server binaries.
fn highest_versioned_bindir(base: &Path) -> Option<PathBuf> {
    let entries = std::fs::read_dir(base).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let version: Vec<u32> = name
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = e.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, bin)| bin)
}

fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| is_executable(p))
}

fn initdb_on_path() -> Option<PathBuf> {
    let initdb = find_on_path("initdb")?;
    // Debian-style setups symlink initdb into PATH; the other binaries live
    // next to its target.
    let resolved = std::fs::canonicalize(&initdb).ok()?;
    [resolved.parent(), initdb.parent()]
        .into_iter()
        .flatten()
        .find(|dir| has_server_binaries(dir))
        .map(Path::to_path_buf)
}

/// Absolute paths of every program the module runs, plus the server version.
#[derive(Debug, Clone)]
pub(crate) struct Tools {
    pub bindir: PathBuf,
    pub initdb: PathBuf,
    pub postgres: PathBuf,
    pub pg_basebackup: PathBuf,
    pub psql: PathBuf,
    /// Major version of the server, e.g. 15.
    pub major: u32,
}

impl Tools {
    pub fn locate() -> Result<Self, LocalPgError> {
        let bindir = find_bindir()?;
        let psql = Some(bindir.join("psql"))
            .filter(|p| is_executable(p))
            .or_else(|| find_on_path("psql"))
            .ok_or_else(|| LocalPgError::PsqlNotFound {
                bindir: bindir.clone(),
            })?;
        let postgres = bindir.join("postgres");
        let out = run(
            base_command(&postgres).arg("-V"),
            &format!("{} -V", postgres.display()),
        )?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let major =
            parse_major_version(&version).ok_or_else(|| LocalPgError::UnsupportedVersion {
                version: version.clone(),
                bindir: bindir.clone(),
            })?;
        if major < 12 {
            return Err(LocalPgError::UnsupportedVersion { version, bindir });
        }
        Ok(Self {
            initdb: bindir.join("initdb"),
            pg_basebackup: bindir.join("pg_basebackup"),
            postgres,
            psql,
            major,
            bindir,
        })
    }
}

/// "postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)" → 15.
fn parse_major_version(text: &str) -> Option<u32> {
    let rest = &text[text.find("(PostgreSQL) ")? + "(PostgreSQL) ".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The OS identity PostgreSQL processes run as.
#[derive(Debug, Clone, Copy)]
pub(crate) enum RunAs {
    /// Not root: run everything as ourselves.
    CurrentUser,
    /// Root: drop to the unprivileged `postgres` user in the child.
    Postgres { uid: u32, gid: u32 },
}

impl RunAs {
    /// Root → the `postgres` user (created if missing); anyone else → themselves.
    pub fn detect() -> Result<Self, LocalPgError> {
        if !Uid::effective().is_root() {
            return Ok(Self::CurrentUser);
        }
        let user = match lookup_postgres_user()? {
            Some(user) => user,
            None => {
                create_postgres_user()?;
                lookup_postgres_user()?.ok_or_else(|| LocalPgError::OsUser {
                    reason: "useradd succeeded but the user `postgres` still does not exist".into(),
                })?
            }
        };
        Ok(Self::Postgres {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        })
    }

    /// Makes `cmd` run as this identity.
    pub fn apply(&self, cmd: &mut Command) {
        if let Self::Postgres { uid, gid } = *self {
            // std drops supplementary groups (setgroups(0)) before setuid.
            cmd.uid(uid).gid(gid);
        }
    }

    /// Gives `path` to this identity (a no-op when not root).
    pub fn chown(&self, path: &Path) -> Result<(), LocalPgError> {
        if let Self::Postgres { uid, gid } = *self {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| LocalPgError::io(format!("chown postgres {}", path.display()), e))?;
        }
        Ok(())
    }
}

fn lookup_postgres_user() -> Result<Option<User>, LocalPgError> {
    User::from_name("postgres").map_err(|e| LocalPgError::OsUser {
        reason: format!("looking up the user: {e}"),
    })
}

fn create_postgres_user() -> Result<(), LocalPgError> {
    let mut cmd = Command::new("useradd");
    cmd.args(["--system", "--no-create-home"]);
    // useradd refuses to create a same-named user group if the group exists.
    if matches!(Group::from_name("postgres"), Ok(Some(_))) {
        cmd.args(["-g", "postgres"]);
    }
    cmd.arg("postgres").stdin(Stdio::null());
    let out = cmd.output().map_err(|e| LocalPgError::OsUser {
        reason: format!("running useradd: {e}"),
    })?;
    // Exit status 9: another process created the user meanwhile.
    if out.status.success() || out.status.code() == Some(9) {
        tracing::info!("created the OS user `postgres` to run PostgreSQL as");
        return Ok(());
    }
    Err(LocalPgError::CommandFailed {
        command: "useradd --system --no-create-home postgres".into(),
        status: out.status.to_string(),
        output: output_tail(&out),
    })
}

/// A `Command` with a predictable environment: no inherited `PG*` variables
/// (they would redirect libpq and the server), the C locale, stdin from
/// /dev/null and `/` as working directory (the unprivileged user may not be
/// able to enter the caller's).
pub(crate) fn base_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    for (key, _) in std::env::vars_os() {
        if key.as_encoded_bytes().starts_with(b"PG") {
            cmd.env_remove(&key);
        }
    }
    cmd.env("LC_ALL", "C")
        .env("PGCLIENTENCODING", "UTF8")
        .stdin(Stdio::null())
        .current_dir("/");
    cmd
}

/// Descriptors above 2 that a child would inherit: not close-on-exec, so
/// opened by whatever started us (a test runner's pipes, a jobserver, a
/// CI harness). Everything Rust's std opens is close-on-exec already.
fn inheritable_fds() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return Vec::new();
    };
    let mut fds: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&fd| fd > 2)
        .filter(|fd| {
            // "flags:\t02100002": octal open flags; O_CLOEXEC is 02000000.
            std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).is_ok_and(|info| {
                info.lines()
                    .find_map(|l| l.strip_prefix("flags:"))
                    .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
                    .is_some_and(|flags| flags & 0o2_000_000 == 0)
            })
        })
        .collect();
    fds.sort_unstable();
    fds
}

/// A shell and a command line prefix that closes every inherited descriptor
/// above 2 (see [`inheritable_fds`]). std has no "close all fds" option and
/// this crate forbids the `unsafe` a `pre_exec` hook needs, so long-lived
/// children (postmasters, the reaper) shed them with `exec N>&-` before
/// `exec`ing the real program. bash is used because dash cannot name
/// descriptors above 9.
pub(crate) fn fd_closing_shell() -> (PathBuf, String) {
    let bash = Path::new("/bin/bash");
    let (shell, fds) = if is_executable(bash) {
        (bash.to_path_buf(), inheritable_fds())
    } else {
        let fds = inheritable_fds()
            .into_iter()
            .filter(|&fd| fd <= 9)
            .collect();
        (PathBuf::from("/bin/sh"), fds)
    };
    let prefix = if fds.is_empty() {
        String::new()
    } else {
        let closes: String = fds.iter().map(|fd| format!(" {fd}>&-")).collect();
        format!("exec{closes}; ")
    };
    (shell, prefix)
}

/// Like [`base_command`], for a long-lived child: it inherits no descriptor
/// above 2 from us. If there is nothing to close, `program` is run directly;
/// otherwise through a shell that closes them and then `exec`s it (same
/// pid), so the caller's arguments still go to `program`.
pub(crate) fn sealed_command(program: &Path) -> Command {
    let (shell, prefix) = fd_closing_shell();
    if prefix.is_empty() {
        return base_command(program);
    }
    let mut cmd = base_command(&shell);
    cmd.env_remove("BASH_ENV")
        .env_remove("ENV")
        .arg("-c")
        .arg(format!("{prefix}exec \"$0\" \"$@\""))
        .arg(program);
    cmd
}

/// Runs `cmd` to completion, capturing its output; non-zero exit is an error
/// described as `what` (which must not contain secrets).
pub(crate) fn run(cmd: &mut Command, what: &str) -> Result<Output, LocalPgError> {
    let out = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| LocalPgError::io(format!("running {what}"), e))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LocalPgError::CommandFailed {
            command: what.to_string(),
            status: out.status.to_string(),
            output: output_tail(&out),
        })
    }
}

fn output_tail(out: &Output) -> String {
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !stdout.trim().is_empty() {
        text.push_str(&stdout);
    }
    last_lines(&text, OUTPUT_TAIL_LINES)
}

/// The last `n` lines of `text`, each indented for display inside an error.
pub(crate) fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Runs SQL through `psql` on 127.0.0.1:`port`; each statement in `sql` is
/// sent separately (so `CREATE DATABASE` works), and the output is tuples
/// only, unaligned, trimmed.
pub(crate) fn psql(
    tools: &Tools,
    port: u16,
    user: &str,
    password: &str,
    database: &str,
    sql: &[&str],
) -> Result<String, LocalPgError> {
    let mut cmd = base_command(&tools.psql);
    cmd.args([
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-h",
        "127.0.0.1",
    ])
    .arg("-p")
    .arg(port.to_string())
    .args([
        OsStr::new("-U"),
        user.as_ref(),
        "-d".as_ref(),
        database.as_ref(),
    ])
    .env("PGPASSWORD", password)
    .env("PGCONNECT_TIMEOUT", "5")
    .env("PGAPPNAME", "pgsluice-localpg");
    for statement in sql {
        cmd.arg("-c").arg(statement);
    }
    let out = run(&mut cmd, &format!("psql on 127.0.0.1:{port} as {user}"))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `"ident"` with embedded quotes doubled.
pub(crate) fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// `'literal'` with embedded quotes doubled (standard_conforming_strings is on).
pub(crate) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// A TOML table key: bare when it can be, quoted otherwise.
pub(super) fn quote_toml_key(k: &str) -> String {
    if !k.is_empty()
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        k.to_owned()
    } else {
        format!("\"{}\"", k.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_major_versions() {
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 15.13 (Debian 15.13-0+deb12u1)"),
            Some(15)
        );
        assert_eq!(
            parse_major_version("postgres (PostgreSQL) 17beta1"),
            Some(17)
        );
        assert_eq!(parse_major_version("postgres (PostgreSQL) 9.6.24"), Some(9));
        assert_eq!(parse_major_version("something else"), None);
    }

    #[test]
    fn quotes() {
        assert_eq!(quote_ident(r#"a"b"#), r#""a""b""#);
        assert_eq!(quote_literal("it's"), "'it''s'");
    }

    #[test]
    fn picks_highest_version_numerically() {
        let base = tempfile::tempdir().expect("tempdir");
        for version in ["9.6", "10", "15", "notaversion"] {
            let bin = base.path().join(version).join("bin");
            std::fs::create_dir_all(&bin).expect("mkdir");
            for b in SERVER_BINARIES {
                let p = bin.join(b);
                std::fs::write(&p, "#!/bin/sh\n").expect("write");
                std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
                    .expect("chmod");
            }
        }
        // 15 has all binaries; make "10" incomplete to check the filter too.
        std::fs::remove_file(base.path().join("10/bin/postgres")).expect("rm");
        assert_eq!(
            highest_versioned_bindir(base.path()),
            Some(base.path().join("15/bin"))
        );
    }

    #[test]
    fn last_lines_keeps_the_tail() {
        assert_eq!(last_lines("a\nb\nc\n", 2), "    b\n    c");
    }
}

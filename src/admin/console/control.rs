//! `PAUSE`, `RESUME`, `RECONNECT`, `KILL`, `KILL_CLIENT`, `WAIT_CLOSE`,
//! `SHUTDOWN`, `DISABLE`, `ENABLE`: with pgbouncer's semantics, through
//! the pools' gates, `Pool::reconnect`, the client registry's kill switch
//! and the proxy's shutdown handle.

use std::time::Duration;

use super::command::ShutdownMode;
use super::show_clients::client_ptr;
use super::{ConsoleError, Ctx, Outcome, Reply};
use crate::pool::Pool;
use crate::protocol::sqlstate;

/// How often a waiting command looks again.
const POLL: Duration = Duration::from_millis(20);

fn not_in_state(message: String) -> ConsoleError {
    ConsoleError::new(sqlstate::OBJECT_NOT_IN_PREREQUISITE_STATE, message)
}

/// Every pool (all users, all nodes) of `database`.
fn pools_of(ctx: &Ctx<'_>, database: &str) -> Vec<std::sync::Arc<Pool>> {
    ctx.shared
        .pools
        .entries()
        .into_iter()
        .filter(|e| e.database == database)
        .flat_map(|e| e.pools.iter().cloned().collect::<Vec<_>>())
        .collect()
}

/// `PAUSE [db]`: new transactions wait (no error) from now on; returns
/// once every server of the database(s) is back in its pool, then closes
/// them (the database can be restarted underneath).
pub async fn pause(ctx: &Ctx<'_>, db: Option<&str>) -> Outcome {
    let names = ctx.databases(db)?;
    let gates: Vec<_> = names.iter().map(|n| ctx.shared.pools.gate(n)).collect();
    if gates.iter().all(|g| g.is_paused()) {
        return Err(not_in_state(match db {
            Some(d) => format!("database {d} is already paused"),
            None => "pgsluice is already paused".to_owned(),
        }));
    }
    for g in &gates {
        g.pause();
    }
    tracing::info!(databases = ?names, "PAUSE: waiting for servers to be released");
    loop {
        let busy = names.iter().flat_map(|n| pools_of(ctx, n)).any(|p| {
            let s = p.status();
            s.open > s.idle || s.waiting > 0
        });
        if !busy {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    for pool in names.iter().flat_map(|n| pools_of(ctx, n)) {
        pool.reconnect();
    }
    tracing::info!(databases = ?names, "PAUSE: paused");
    Ok(Reply::Done("PAUSE"))
}

/// `RESUME [db]`: waiting transactions go on.
pub fn resume(ctx: &Ctx<'_>, db: Option<&str>) -> Outcome {
    let names = ctx.databases(db)?;
    let mut any = false;
    for name in &names {
        any |= ctx.shared.pools.gate(name).resume();
    }
    if !any {
        return Err(not_in_state(match db {
            Some(d) => format!("database {d} is not paused"),
            None => "pgsluice is not paused".to_owned(),
        }));
    }
    tracing::info!(databases = ?names, "RESUME");
    Ok(Reply::Done("RESUME"))
}

/// `RECONNECT [db]`: idle servers close now, the others when released.
pub fn reconnect(ctx: &Ctx<'_>, db: Option<&str>) -> Outcome {
    for name in ctx.databases(db)? {
        for pool in pools_of(ctx, &name) {
            pool.reconnect();
        }
    }
    Ok(Reply::Done("RECONNECT"))
}

/// `KILL db`: every client of the database is closed (57P01), its servers
/// with them; as in pgbouncer, the database is left paused: new clients
/// wait until `RESUME db`.
pub fn kill(ctx: &Ctx<'_>, db: &str) -> Outcome {
    let name = ctx.database(db)?.name.clone();
    ctx.shared.pools.gate(&name).pause();
    let why = format!("terminating connection due to administrator command (KILL {name})");
    let mut killed = 0;
    for c in ctx.shared.registry.all() {
        if !c.id.console && *c.id.database == *name {
            c.kill(&why);
            killed += 1;
        }
    }
    for pool in pools_of(ctx, &name) {
        pool.reconnect();
    }
    tracing::info!(database = %name, clients = killed, "KILL");
    Ok(Reply::Done("KILL"))
}

/// `KILL_CLIENT id`: that client is closed (57P01), its server cleaned or
/// closed as when a client leaves.
pub fn kill_client(ctx: &Ctx<'_>, pid: i32) -> Outcome {
    let Some(c) = ctx.shared.registry.get(pid) else {
        return Err(ConsoleError::new(
            sqlstate::UNDEFINED_OBJECT,
            format!(
                "no client {} (see the ptr column of SHOW CLIENTS)",
                client_ptr(pid)
            ),
        ));
    };
    c.kill(&format!(
        "terminating connection due to administrator command (KILL_CLIENT {})",
        client_ptr(pid)
    ));
    tracing::info!(pid, user = %c.id.user, database = %c.id.database, "KILL_CLIENT");
    Ok(Reply::Done("KILL_CLIENT"))
}

/// `WAIT_CLOSE [db]`: returns once every server a `RECONNECT` (or `KILL`,
/// `PAUSE`) marked is closed.
pub async fn wait_close(ctx: &Ctx<'_>, db: Option<&str>) -> Outcome {
    let names = ctx.databases(db)?;
    loop {
        let pending: usize = names
            .iter()
            .flat_map(|n| pools_of(ctx, n))
            .map(|p| p.status().close_needed)
            .sum();
        if pending == 0 {
            return Ok(Reply::Done("WAIT_CLOSE"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// `DISABLE db` / `ENABLE db`: new clients of the database are refused
/// (55000) / accepted again; connected ones are not touched.
pub fn disable(ctx: &Ctx<'_>, db: &str, disabled: bool) -> Outcome {
    let name = ctx.database(db)?.name.clone();
    ctx.shared.pools.gate(&name).set_disabled(disabled);
    tracing::info!(database = %name, disabled, "DISABLE/ENABLE");
    Ok(Reply::Done(if disabled { "DISABLE" } else { "ENABLE" }))
}

/// `SHUTDOWN`: every client closed now. `WAIT_FOR_SERVERS`: the SIGTERM
/// path (no new clients, each leaves at its next transaction boundary,
/// `shutdown_timeout`). `WAIT_FOR_CLIENTS`: no new clients; the process
/// drains once the connected ones (admin consoles aside) have left.
pub fn shutdown(ctx: &Ctx<'_>, mode: ShutdownMode) -> Outcome {
    let Some(handle) = ctx.shared.shutdown_handle() else {
        return Err(ConsoleError::new(
            sqlstate::ADMIN_SHUTDOWN,
            "pgsluice is already shutting down",
        ));
    };
    tracing::info!(?mode, "SHUTDOWN from the admin console");
    match mode {
        ShutdownMode::Immediate => handle.stop_now(),
        ShutdownMode::WaitForServers => handle.shutdown(),
        ShutdownMode::WaitForClients => {
            for name in ctx.shared.config().databases.keys() {
                ctx.shared.pools.gate(name).set_closing();
            }
            let weak = std::sync::Arc::downgrade(ctx.shared);
            tokio::spawn(async move {
                loop {
                    let Some(shared) = weak.upgrade() else { return };
                    let consoles = shared
                        .registry
                        .all()
                        .iter()
                        .filter(|c| c.id.console)
                        .count();
                    if shared.client_count() <= consoles {
                        handle.shutdown();
                        return;
                    }
                    drop(shared);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
    }
    Ok(Reply::Done("SHUTDOWN"))
}

//! `SHOW CLIENTS` and `SHOW SERVERS`: one row per connection, pgbouncer's
//! 18 columns. A client's `ptr` is its pgsluice process id in hex (what
//! `KILL_CLIENT` takes; `remote_pid` has it in decimal); a server's `ptr`
//! is `srv-<id>` and a client's `link` names its server's, and vice versa.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use super::result::{Column, ResultSet, v};
use super::{Ctx, Outcome, Reply, node_row_name, timestamp, wall};
use crate::frontend::{ClientInfo, ClientState};

const COLUMNS: [Column; 18] = [
    Column::Text("type"),
    Column::Text("user"),
    Column::Text("database"),
    Column::Text("state"),
    Column::Text("addr"),
    Column::Int4("port"),
    Column::Text("local_addr"),
    Column::Int4("local_port"),
    Column::Text("connect_time"),
    Column::Text("request_time"),
    Column::Int4("wait"),
    Column::Int4("wait_us"),
    Column::Int4("close_needed"),
    Column::Text("ptr"),
    Column::Text("link"),
    Column::Int4("remote_pid"),
    Column::Text("tls"),
    Column::Text("application_name"),
];

pub fn client_ptr(pid: i32) -> String {
    format!("{pid:#x}")
}

fn server_ptr(id: u64) -> String {
    format!("srv-{id}")
}

fn ip(a: Option<SocketAddr>) -> Option<String> {
    a.map(|a| a.ip().to_canonical().to_string())
}

fn port(a: Option<SocketAddr>) -> Option<String> {
    a.map(|a| a.port().to_string())
}

fn tls(on: bool) -> Option<String> {
    v(if on { "TLS" } else { "" })
}

pub fn clients(ctx: &Ctx<'_>) -> Outcome {
    let now = Instant::now();
    let mut rs = ResultSet::new(&COLUMNS);
    for c in ctx.shared.registry.all() {
        let state = c.state();
        let wait = if state == ClientState::Waiting {
            now.saturating_duration_since(c.since())
        } else {
            std::time::Duration::ZERO
        };
        let link = if state == ClientState::Active {
            c.link().map(|l| server_ptr(l.server_id))
        } else {
            None
        };
        rs.push(vec![
            v("C"),
            v(&c.id.user),
            v(&c.id.database),
            v(state.as_str()),
            ip(Some(c.id.peer)),
            port(Some(c.id.peer)),
            ip(c.id.local),
            port(c.id.local),
            v(timestamp(c.connected())),
            v(timestamp(wall(c.since()))),
            v(wait.as_secs()),
            v(wait.subsec_micros()),
            v(0),
            v(client_ptr(c.pid)),
            Some(link.unwrap_or_default()),
            v(c.pid),
            tls(c.id.tls),
            v(&c.id.application_name),
        ]);
    }
    Ok(Reply::Rows(rs))
}

pub fn servers(ctx: &Ctx<'_>) -> Outcome {
    // Servers held by clients, by (database, user, node).
    let mut held: HashMap<(String, String, usize), Vec<Arc<ClientInfo>>> = HashMap::new();
    for c in ctx.shared.registry.all() {
        if !c.id.console && c.state() == ClientState::Active && c.link().is_some() {
            held.entry((c.id.database.to_string(), c.id.user.to_string(), c.node()))
                .or_default()
                .push(c);
        }
    }
    let mut rs = ResultSet::new(&COLUMNS);
    for entry in ctx.shared.pools.entries() {
        for (node, pool) in entry.pools.iter().enumerate() {
            let database = node_row_name(&entry.database, node);
            let addr = pool.addr();
            let mark = pool.reconnect_mark();
            let needs_close = |created: Instant| u8::from(mark.is_some_and(|m| created <= m));
            let key = (entry.database.clone(), entry.user.clone(), node);
            for c in held.get(&key).into_iter().flatten() {
                let Some(l) = c.link() else { continue };
                rs.push(vec![
                    v("S"),
                    v(&entry.user),
                    v(&database),
                    v("active"),
                    v(&addr.host),
                    v(addr.port),
                    ip(l.local),
                    port(l.local),
                    v(timestamp(wall(l.created))),
                    v(timestamp(wall(c.since()))),
                    v(0),
                    v(0),
                    v(needs_close(l.created)),
                    v(server_ptr(l.server_id)),
                    v(client_ptr(c.pid)),
                    v(l.pid),
                    tls(l.tls),
                    v(&c.id.application_name),
                ]);
            }
            for s in pool.idle_servers() {
                rs.push(vec![
                    v("S"),
                    v(&entry.user),
                    v(&database),
                    v("idle"),
                    v(&addr.host),
                    v(addr.port),
                    ip(s.local_addr),
                    port(s.local_addr),
                    v(timestamp(wall(s.created))),
                    v(timestamp(wall(s.last_used))),
                    v(0),
                    v(0),
                    v(needs_close(s.created)),
                    v(server_ptr(s.id)),
                    v(""),
                    v(s.pid),
                    tls(s.tls),
                    v(""),
                ]);
            }
        }
    }
    Ok(Reply::Rows(rs))
}

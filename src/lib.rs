//! pgsluice: a PostgreSQL connection pooler and read/write query router.
//!
//! The module list is the architecture (see docs/architecture.md):
//! `protocol` (sans-IO wire codec) → `frontend` (one client session) → `pool`
//! (server connections per node/database/user) → `backend` (one server
//! connection). `router` classifies SQL as read or write (pure, no I/O).
//! `config` turns TOML + environment into typed settings; `stats` holds the
//! counters the data path writes and `admin` (console, HTTP) reads;
//! `localpg` starts throwaway PostgreSQL clusters for the demo, tests and
//! benchmarks.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod backend;
pub mod cluster;
pub mod config;
pub mod frontend;
pub mod listener;
pub mod localpg;
pub mod logging;
pub mod pool;
pub mod protocol;
pub mod proxy;
pub mod reload;
pub mod router;
pub mod stats;
pub mod tls;

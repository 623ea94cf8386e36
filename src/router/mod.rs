//! SQL classification for read/write routing: may this statement run on a hot-standby replica?
//!
//! [`classify`] is pure (no I/O, no async) and conservative: it answers [`Access::Read`] only
//! for statements it knows are safe on a replica, and [`Access::Write`] for everything else,
//! including text it cannot lex or parse. The pooler still retries a statement that a replica
//! rejects as a write (SQLSTATE 25006), so a misjudged read costs a round trip, never a wrong
//! answer; a misjudged write only costs replica capacity.
//!
//! How it decides (see `docs/routing.md`):
//! - [`lexer`] tokenizes once, skipping comments and keeping strings, quoted identifiers and
//!   dollar quotes opaque, and reads the routing hint from the leading comments.
//! - [`classify`](mod@classify) splits the tokens into statements and decides each from its
//!   first keyword plus a scan for write keywords, locking clauses, `INTO` and function calls.
//! - [`parse`] (sqlparser) is asked only when `INSERT`/`UPDATE`/`DELETE`/`MERGE` appears where
//!   it might be a column name; a parse failure is a write.
//! - [`functions`] knows which function calls write; [`cache`] remembers answers by text.

mod cache;
mod classify;
mod functions;
pub(crate) mod lexer;
mod parse;
pub mod shard;

pub use cache::ClassCache;
pub use functions::FunctionCatalog;

/// Where a statement may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    Read,
    Write,
}

/// Leading-comment routing hint: `/* pgsluice: primary */` or `/* pgsluice: replica */`
/// (case-insensitive, whitespace-tolerant; other comments may come before it, no token may).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Primary,
    Replica,
}

/// The value of `SET pgsluice.route`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteMode {
    Primary,
    Replica,
    Auto,
}

/// A statement the pooler answers itself. Recognised only when it is the whole string
/// (optionally with a trailing `;`): `SET [SESSION | LOCAL] pgsluice.route {= | TO} primary |
/// replica | auto | DEFAULT` (values may be quoted), `RESET pgsluice.route` (= `Auto`) and
/// `SHOW pgsluice.route`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    SetRoute(RouteMode),
    ShowRoute,
    /// An unknown `pgsluice.*` setting, a bad value, or `pgsluice.route` inside a
    /// multi-statement string; the message names the setting and the allowed values.
    Invalid(String),
}

/// Transaction-control effect of a string: for several statements, that of the last one
/// that has any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxControl {
    None,
    /// `BEGIN` / `START TRANSACTION`; `read_only` only with `READ ONLY`.
    Begin {
        read_only: bool,
    },
    /// `SET TRANSACTION READ ONLY | READ WRITE` (not one that sets only the isolation level).
    SetTransaction {
        read_only: bool,
    },
    /// `COMMIT`, `END`, `ROLLBACK`, `ABORT` (not `ROLLBACK TO SAVEPOINT`), and
    /// `PREPARE TRANSACTION`, which also ends the session's transaction.
    End,
}

/// Why a statement got its [`Access`]: a short label for metrics and `SHOW` output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    // Reads.
    /// `SELECT`, `WITH`, `VALUES`, `TABLE` with nothing that writes.
    Select,
    /// `SHOW`, `EXPLAIN` that executes nothing that writes, `FETCH`/`MOVE`/`CLOSE`,
    /// `COPY … TO STDOUT` of a read.
    ReadOnlyCommand,
    /// `BEGIN READ ONLY`, `SET TRANSACTION READ ONLY`, or a string containing one and no write.
    ReadOnlyTransaction,
    /// `SET`, `RESET`, `DISCARD`, `DEALLOCATE`, `PREPARE` of a read, pgsluice commands.
    SessionCommand,
    /// `COMMIT`, `ROLLBACK`, `SAVEPOINT`, `RELEASE`, and (as a write) `BEGIN` read-write.
    TransactionControl,
    /// Only comments, whitespace and semicolons.
    Empty,
    // Writes.
    /// `INSERT`, `UPDATE`, `DELETE`, `MERGE` (also after a `WITH` clause).
    DataModifying,
    /// `CREATE`, `ALTER`, `DROP`, `TRUNCATE`, `GRANT`, `VACUUM`, `REFRESH` and friends.
    Ddl,
    /// `FOR UPDATE`, `FOR NO KEY UPDATE`, `FOR SHARE`, `FOR KEY SHARE`.
    LockingRead,
    /// `SELECT … INTO new_table`.
    SelectInto,
    /// A data-modifying statement inside `WITH`.
    WritingCte,
    /// A function that always writes or needs the primary (`nextval`, advisory locks, …).
    WritingFunction,
    /// A volatile function not on the allow-list (or, before `pg_proc` is loaded, any
    /// function not known to be read-only).
    VolatileFunction,
    /// `LOCK`.
    Lock,
    /// `CALL`, `DO`.
    CallOrDo,
    /// `EXPLAIN ANALYZE` of a statement that writes.
    ExplainAnalyzeWrite,
    /// `LISTEN`, `UNLISTEN`, `NOTIFY` (refused on a standby).
    ListenNotify,
    /// `PREPARE TRANSACTION`, `COMMIT PREPARED`, `ROLLBACK PREPARED`.
    TwoPhase,
    /// `COPY … FROM`.
    CopyFrom,
    /// `COPY … TO` a server file or program.
    CopyFile,
    /// Serializable isolation, which a hot standby refuses.
    Serializable,
    /// `EXECUTE name`: the prepared statement's text is not known here.
    Execute,
    /// A command the classifier does not know to be read-only (`CHECKPOINT`, `LOAD`, …).
    Unknown,
    /// Could not be lexed or parsed (unterminated string, unbalanced parentheses, sqlparser
    /// failure on an ambiguous statement).
    Unparsable,
    /// Never produced by [`classify`]: for the router when a hint or `pgsluice.route` decided.
    Hint,
}

impl Reason {
    /// Short snake_case label for metrics and `SHOW` output.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Select => "select",
            Reason::ReadOnlyCommand => "read_only_command",
            Reason::ReadOnlyTransaction => "read_only_transaction",
            Reason::SessionCommand => "session_command",
            Reason::TransactionControl => "transaction_control",
            Reason::Empty => "empty",
            Reason::DataModifying => "data_modifying",
            Reason::Ddl => "ddl",
            Reason::LockingRead => "locking_read",
            Reason::SelectInto => "select_into",
            Reason::WritingCte => "writing_cte",
            Reason::WritingFunction => "writing_function",
            Reason::VolatileFunction => "volatile_function",
            Reason::Lock => "lock",
            Reason::CallOrDo => "call_or_do",
            Reason::ExplainAnalyzeWrite => "explain_analyze_write",
            Reason::ListenNotify => "listen_notify",
            Reason::TwoPhase => "two_phase",
            Reason::CopyFrom => "copy_from",
            Reason::CopyFile => "copy_file",
            Reason::Serializable => "serializable",
            Reason::Execute => "execute",
            Reason::Unknown => "unknown_command",
            Reason::Unparsable => "unparsable",
            Reason::Hint => "hint",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The classification of one simple-Query string or one Parse text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Class {
    /// Computed from the SQL alone; a hint does not change it (the router applies hints).
    pub access: Access,
    pub tx: TxControl,
    pub hint: Option<Hint>,
    pub command: Option<Command>,
    /// For a write, why (the first write statement's reason); for a read, the kind of read.
    pub reason: Reason,
}

/// Pure classification of one simple-Query string or one Parse text.
pub fn classify(sql: &str, functions: &FunctionCatalog) -> Class {
    classify::classify(sql, functions)
}

//! Access rules in the spirit of `pg_hba.conf`: which authentication method
//! a connection must use, decided from its type (TLS or not), database,
//! user and client address. The first matching rule wins; no match means
//! the connection is refused.
//!
//! The text format is a subset of pg_hba.conf, one rule per line:
//!
//! ```text
//! # TYPE     DATABASE    USER         ADDRESS         METHOD
//! host       all         admin        127.0.0.1/32    scram-sha-256
//! hostnossl  app,report  all          10.0.0.0/8      md5
//! host       all         all          all             reject
//! ```
//!
//! TYPE is `host` (any TCP connection), `hostssl` or `hostnossl`; DATABASE
//! and USER are `all` or comma-separated names (double-quote a name to
//! use `all` or a comma literally); ADDRESS is `all`, an IP address, or
//! CIDR (IPv4 or IPv6); METHOD is `scram-sha-256`, `md5`, `password`,
//! `trust`, `cert` (only on `hostssl`) or `reject`. What PostgreSQL has and
//! pgsluice does not (`local`, host names, `samehost`, `+group`, `@file`,
//! options after the method) is an error naming the line, never ignored.
//!
//! Parsing is pure and total: any input gives rules or an error, never a
//! panic (property test below, fuzz target `hba_parser`).

use std::fmt;
use std::net::IpAddr;

/// How a client proves who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    ScramSha256,
    Md5,
    /// Cleartext password.
    Password,
    Trust,
    /// TLS client certificate; refused until pgsluice has TLS.
    Cert,
    Reject,
}

impl Method {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "scram-sha-256" => Self::ScramSha256,
            "md5" => Self::Md5,
            "password" => Self::Password,
            "trust" => Self::Trust,
            "cert" => Self::Cert,
            "reject" => Self::Reject,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScramSha256 => "scram-sha-256",
            Self::Md5 => "md5",
            Self::Password => "password",
            Self::Trust => "trust",
            Self::Cert => "cert",
            Self::Reject => "reject",
        }
    }
}

/// Which transport a rule applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnType {
    Host,
    HostSsl,
    HostNoSsl,
}

impl ConnType {
    fn parse(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(Self::Host),
            "hostssl" => Ok(Self::HostSsl),
            "hostnossl" => Ok(Self::HostNoSsl),
            "local" => Err("`local` rules do not apply: pgsluice listens on TCP only".into()),
            "hostgssenc" | "hostnogssenc" => Err(format!("`{s}`: GSSAPI is not supported")),
            _ => Err(format!(
                "connection type `{s}` is not one of host, hostssl, hostnossl"
            )),
        }
    }

    fn matches(self, tls: bool) -> bool {
        match self {
            Self::Host => true,
            Self::HostSsl => tls,
            Self::HostNoSsl => !tls,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Host => "host",
            Self::HostSsl => "hostssl",
            Self::HostNoSsl => "hostnossl",
        }
    }
}

/// A DATABASE or USER column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Names {
    All,
    List(Vec<String>),
}

impl Names {
    fn matches(&self, name: &str) -> bool {
        match self {
            Self::All => true,
            Self::List(names) => names.iter().any(|n| n == name),
        }
    }
}

/// The ADDRESS column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addresses {
    All,
    Net { addr: IpAddr, prefix: u8 },
}

impl Addresses {
    fn parse(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Self::All);
        }
        if matches!(s, "samehost" | "samenet") {
            return Err(format!(
                "address `{s}` is not supported; write a CIDR range"
            ));
        }
        let (ip, prefix) = match s.split_once('/') {
            Some((ip, p)) => (ip, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = ip.parse().map_err(|_| {
            format!(
                "address `{s}` is not `all`, an IP address or CIDR (host names are not supported)"
            )
        })?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("address `{s}`: prefix length must be 0-{max}"))?,
        };
        Ok(Self::Net { addr, prefix })
    }

    fn matches(&self, client: IpAddr) -> bool {
        let Self::Net { addr, prefix } = *self else {
            return true;
        };
        match (addr, client.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(c)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(c) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(c)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(c) & mask
            }
            _ => false,
        }
    }
}

/// One access rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbaRule {
    pub conn: ConnType,
    pub databases: Names,
    pub users: Names,
    pub address: Addresses,
    pub method: Method,
}

/// What the rules are asked about.
#[derive(Debug, Clone, Copy)]
pub struct Connection<'a> {
    pub tls: bool,
    pub database: &'a str,
    pub user: &'a str,
    pub addr: IpAddr,
}

impl HbaRule {
    pub fn matches(&self, c: &Connection<'_>) -> bool {
        self.conn.matches(c.tls)
            && self.databases.matches(c.database)
            && self.users.matches(c.user)
            && self.address.matches(c.addr)
    }

    /// A rule from its five columns, each in the line syntax (used for the
    /// TOML `[[hba]]` form too).
    pub fn from_columns(
        conn: &str,
        databases: &str,
        users: &str,
        address: &str,
        method: &str,
    ) -> Result<Self, String> {
        let field = |s: &str| -> Result<Vec<Item>, String> {
            let fields = tokenize(s)?;
            match <[Vec<Item>; 1]>::try_from(fields) {
                Ok([f]) => Ok(f),
                Err(_) => Err(format!("`{s}` must be a single column")),
            }
        };
        Self::from_items(
            &field(conn)?,
            &field(databases)?,
            &field(users)?,
            &field(address)?,
            &field(method)?,
        )
    }

    fn from_items(
        conn: &[Item],
        databases: &[Item],
        users: &[Item],
        address: &[Item],
        method: &[Item],
    ) -> Result<Self, String> {
        let conn = ConnType::parse(single(conn, "TYPE")?)?;
        let address = Addresses::parse(single(address, "ADDRESS")?)?;
        let method_s = single(method, "METHOD")?;
        let method = Method::parse(method_s).ok_or_else(|| {
            format!(
                "method `{method_s}` is not one of scram-sha-256, md5, password, trust, cert, reject"
            )
        })?;
        if method == Method::Cert && conn != ConnType::HostSsl {
            return Err("cert authentication is only supported on hostssl rules".into());
        }
        Ok(Self {
            conn,
            databases: names(databases, "database")?,
            users: names(users, "user")?,
            address,
            method,
        })
    }
}

impl HbaRule {
    /// The five columns in the line syntax.
    pub fn columns(&self) -> (String, String, String, String, String) {
        let names = |n: &Names| match n {
            Names::All => "all".to_owned(),
            Names::List(v) => v.iter().map(|s| quote(s)).collect::<Vec<_>>().join(","),
        };
        let addr = match self.address {
            Addresses::All => "all".to_owned(),
            Addresses::Net { addr, prefix } => format!("{addr}/{prefix}"),
        };
        (
            self.conn.as_str().to_owned(),
            names(&self.databases),
            names(&self.users),
            addr,
            self.method.as_str().to_owned(),
        )
    }
}

impl fmt::Display for HbaRule {
    /// The rule as a line of the text format.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (conn, db, user, addr, method) = self.columns();
        write!(f, "{conn} {db} {user} {addr} {method}")
    }
}

fn quote(s: &str) -> String {
    let keyword = matches!(
        s,
        "all" | "sameuser" | "samerole" | "samegroup" | "replication"
    );
    let plain = !s.is_empty()
        && !keyword
        && !s.starts_with(['+', '@'])
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'));
    if plain {
        s.to_owned()
    } else {
        format!("\"{}\"", s.replace('"', "\"\""))
    }
}

/// The first rule matching `c`, if any.
pub fn first_match<'r>(rules: &'r [HbaRule], c: &Connection<'_>) -> Option<&'r HbaRule> {
    rules.iter().find(|r| r.matches(c))
}

/// A rule file error: 1-based line and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct HbaError {
    pub line: usize,
    pub message: String,
}

/// Parses a whole rule file.
pub fn parse(text: &str) -> Result<Vec<HbaRule>, HbaError> {
    let mut rules = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let err = |message| HbaError {
            line: i + 1,
            message,
        };
        let fields = tokenize(line).map_err(err)?;
        if let Some(first) = fields.first() {
            // The type first: a `local` line has 4 columns.
            ConnType::parse(single(first, "TYPE").map_err(err)?).map_err(err)?;
        }
        match fields.as_slice() {
            [] => {}
            [conn, db, user, addr, method] => {
                rules.push(HbaRule::from_items(conn, db, user, addr, method).map_err(err)?)
            }
            [_, _, _, _, _, ..] => {
                return Err(err(
                    "options after the method are not supported (and an address mask column is not either: write CIDR)".into(),
                ));
            }
            _ => {
                return Err(err(
                    "expected 5 columns: TYPE DATABASE USER ADDRESS METHOD".into()
                ));
            }
        }
    }
    Ok(rules)
}

/// One comma-list element of a column; `quoted` items are never keywords.
#[derive(Debug, Clone)]
struct Item {
    text: String,
    quoted: bool,
}

fn single<'a>(items: &'a [Item], column: &str) -> Result<&'a str, String> {
    match items {
        [one] if !one.quoted => Ok(&one.text),
        _ => Err(format!("{column} must be a single unquoted word")),
    }
}

fn names(items: &[Item], what: &str) -> Result<Names, String> {
    if items.iter().any(|i| !i.quoted && i.text == "all") {
        return if items.len() == 1 {
            Ok(Names::All)
        } else {
            Err(format!("`all` cannot be combined with other {what} names"))
        };
    }
    let mut list = Vec::with_capacity(items.len());
    for i in items {
        if !i.quoted {
            if matches!(
                i.text.as_str(),
                "sameuser" | "samerole" | "samegroup" | "replication"
            ) {
                return Err(format!("keyword `{}` is not supported", i.text));
            }
            if i.text.starts_with('+') || i.text.starts_with('@') {
                return Err(format!(
                    "`{}`: group membership (+) and file inclusion (@) are not supported",
                    i.text
                ));
            }
        }
        if i.text.is_empty() {
            return Err(format!("empty {what} name"));
        }
        list.push(i.text.clone());
    }
    Ok(Names::List(list))
}

/// Splits a line into whitespace-separated columns, each a comma list of
/// items. `"…"` quotes (with `""` for a quote) protect spaces, commas, `#`
/// and keywords; `#` outside quotes starts a comment.
fn tokenize(line: &str) -> Result<Vec<Vec<Item>>, String> {
    let mut fields: Vec<Vec<Item>> = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.peek() {
            None | Some('#') => return Ok(fields),
            Some(_) => {}
        }
        let mut items = Vec::new();
        let mut cur = Item {
            text: String::new(),
            quoted: false,
        };
        let mut in_quotes = false;
        loop {
            match chars.peek().copied() {
                None if in_quotes => return Err("unterminated quoted name".into()),
                None => break,
                Some('"') => {
                    chars.next();
                    if in_quotes && chars.next_if_eq(&'"').is_some() {
                        cur.text.push('"');
                    } else {
                        in_quotes = !in_quotes;
                        cur.quoted = true;
                    }
                }
                Some(c) if in_quotes => {
                    chars.next();
                    cur.text.push(c);
                }
                Some(c) if c.is_whitespace() || c == '#' => break,
                Some(',') => {
                    chars.next();
                    items.push(std::mem::replace(
                        &mut cur,
                        Item {
                            text: String::new(),
                            quoted: false,
                        },
                    ));
                }
                Some(c) => {
                    chars.next();
                    cur.text.push(c);
                }
            }
        }
        items.push(cur);
        if items.iter().any(|i| i.text.is_empty() && !i.quoted) {
            return Err("empty item in a comma-separated list".into());
        }
        fields.push(items);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn<'a>(db: &'a str, user: &'a str, addr: &str) -> Connection<'a> {
        Connection {
            tls: false,
            database: db,
            user,
            addr: addr.parse().unwrap(),
        }
    }

    fn method_for(rules: &[HbaRule], c: Connection<'_>) -> Option<Method> {
        first_match(rules, &c).map(|r| r.method)
    }

    #[test]
    fn parses_the_documented_example() {
        let rules = parse(
            "# TYPE DATABASE USER ADDRESS METHOD\n\
             host all admin 127.0.0.1/32 scram-sha-256   # trailing comment\n\
             \n\
             hostnossl app,report all 10.0.0.0/8 md5\n\
             host \"all\",\"a b\" \"x,y\" ::1 trust\n\
             host all all all reject\n",
        )
        .unwrap();
        assert_eq!(rules.len(), 4);
        assert_eq!(rules[0].users, Names::List(vec!["admin".into()]));
        assert_eq!(
            rules[1].databases,
            Names::List(vec!["app".into(), "report".into()])
        );
        assert_eq!(
            rules[2].databases,
            Names::List(vec!["all".into(), "a b".into()])
        );
        assert_eq!(rules[2].users, Names::List(vec!["x,y".into()]));
        assert_eq!(
            rules[2].address,
            Addresses::Net {
                addr: "::1".parse().unwrap(),
                prefix: 128
            }
        );
        // Display round-trips.
        let text: String = rules.iter().map(|r| format!("{r}\n")).collect();
        assert_eq!(parse(&text).unwrap(), rules);
    }

    #[test]
    fn first_match_wins_and_no_match_is_none() {
        let rules = parse(
            "host app admin 127.0.0.1/32 trust\n\
             host app,report all 127.0.0.0/8 md5\n\
             host all all 10.0.0.0/8 reject\n\
             host all all ::/0 scram-sha-256\n",
        )
        .unwrap();
        let m = |db, user, addr| method_for(&rules, conn(db, user, addr));
        assert_eq!(m("app", "admin", "127.0.0.1"), Some(Method::Trust));
        assert_eq!(m("app", "admin", "127.0.0.2"), Some(Method::Md5));
        assert_eq!(m("report", "bob", "127.1.2.3"), Some(Method::Md5));
        assert_eq!(m("other", "bob", "127.0.0.1"), None);
        assert_eq!(m("app", "bob", "10.1.1.1"), Some(Method::Reject));
        assert_eq!(m("app", "bob", "2001:db8::1"), Some(Method::ScramSha256));
        // An IPv4 client seen on an IPv6 socket matches IPv4 rules.
        assert_eq!(m("app", "admin", "::ffff:127.0.0.1"), Some(Method::Trust));
    }

    #[test]
    fn connection_type_follows_tls() {
        let rules = parse("hostssl all all all trust\nhostnossl all all all md5\n").unwrap();
        let mut c = conn("a", "b", "1.2.3.4");
        assert_eq!(method_for(&rules, c), Some(Method::Md5));
        c.tls = true;
        assert_eq!(method_for(&rules, c), Some(Method::Trust));
    }

    #[test]
    fn cidr_edges() {
        let all4 = Addresses::parse("0.0.0.0/0").unwrap();
        assert!(all4.matches("8.8.8.8".parse().unwrap()));
        assert!(!all4.matches("::1".parse().unwrap()));
        let host = Addresses::parse("10.0.0.1/32").unwrap();
        assert!(host.matches("10.0.0.1".parse().unwrap()));
        assert!(!host.matches("10.0.0.2".parse().unwrap()));
        let v6 = Addresses::parse("fe80::/10").unwrap();
        assert!(v6.matches("febf::1".parse().unwrap()));
        assert!(!v6.matches("fec0::1".parse().unwrap()));
    }

    #[test]
    fn errors_name_the_line_and_problem() {
        for (text, needle) in [
            ("local all all trust", "local"),
            ("host all all 127.0.0.1/32", "5 columns"),
            ("host all all 127.0.0.1/33 trust", "prefix"),
            ("host all all db.example.com trust", "host names"),
            ("host all all all ident", "ident"),
            ("host all all all md5 opt=1", "options"),
            ("host all all all cert", "hostssl"),
            ("host all,app all all trust", "combined"),
            ("host +admins all all trust", "group"),
            ("host all \"unterminated all all trust", "unterminated"),
            ("host a,,b all all trust", "empty"),
            ("host sameuser all all trust", "sameuser"),
            ("hosts all all all trust", "connection type"),
        ] {
            let e = parse(&format!("# ok\n{text}\n")).unwrap_err();
            assert_eq!(e.line, 2, "{text}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

    #[test]
    fn columns_form_matches_line_form() {
        let a = HbaRule::from_columns("host", "app,report", "all", "10.0.0.0/8", "md5").unwrap();
        let b = parse("host app,report all 10.0.0.0/8 md5").unwrap();
        assert_eq!(vec![a], b);
        assert!(HbaRule::from_columns("host", "a b", "all", "all", "md5").is_err());
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics(text in "\\PC{0,200}") {
            let _ = parse(&text);
        }

        #[test]
        fn parser_never_panics_on_rule_like_lines(
            t in "(host|hostssl|hostnossl|local|x)",
            d in "(all|\"all\"|[a-z,\"]{0,8})",
            u in "(all|[a-z+@,\" ]{0,8})",
            a in "(all|[0-9.:/a-f]{0,20})",
            m in "(scram-sha-256|md5|trust|cert|reject|[a-z]{0,5})",
            rest in "[ a-z=#\"]{0,10}",
        ) {
            let line = format!("{t} {d} {u} {a} {m}{rest}");
            if let Ok(rules) = parse(&line) {
                // Whatever parses prints back to the same rules.
                let again: String = rules.iter().map(|r| format!("{r}\n")).collect();
                proptest::prop_assert_eq!(parse(&again).unwrap(), rules);
            }
        }
    }
}

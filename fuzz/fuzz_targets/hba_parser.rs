//! The access-rule (pg_hba-style) parser over arbitrary text.
//!
//! Checks: no panic; whatever parses prints back (`Display`) to text that
//! parses to the same rules; matching a parsed rule set never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgsluice::auth::hba::{self, Connection};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let Ok(rules) = hba::parse(&text) else {
        return;
    };
    let printed: String = rules.iter().map(|r| format!("{r}\n")).collect();
    assert_eq!(hba::parse(&printed).as_ref(), Ok(&rules), "{printed}");
    for addr in ["127.0.0.1", "10.1.2.3", "::1", "::ffff:10.0.0.1"] {
        let c = Connection {
            tls: data.len() % 2 == 0,
            database: "app",
            user: "all",
            addr: addr.parse().unwrap(),
        };
        let _ = hba::first_match(&rules, &c);
    }
});

use super::*;

const MINIMAL: &str = r#"
[databases.app]
primary = "127.0.0.1:5432"
[users.app]
password = "secret"
"#;

fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
    Config::from_toml(
        text,
        "test.toml",
        env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
    )
}

#[test]
fn defaults_match_the_scaling_plan() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.general.max_client_conn, 10_000);
    assert_eq!(c.general.pool.pool_size, 20);
    assert_eq!(c.general.pool.max_pool_size, 100);
    assert_eq!(c.general.pool.checkout_timeout, Duration::from_secs(30));
    assert_eq!(c.general.pool_mode, PoolMode::Transaction);
    assert_eq!(c.general.query_timeout, None);
    let db = &c.databases["app"];
    assert_eq!(db.dbname, "app");
    assert_eq!(db.primary.port, 5432);
    assert_eq!(db.pool, c.general.pool);
}

#[test]
fn env_overlay_overrides_and_types() {
    let c = load(
        MINIMAL,
        &[
            ("PGSLUICE_GENERAL__POOL_SIZE", "7"),
            ("PGSLUICE_GENERAL__CHECKOUT_TIMEOUT", "2s"),
            ("PGSLUICE_DATABASES__APP__PRIMARY", "db.internal:6000"),
            ("PGSLUICE_USERS__BOB__PASSWORD", "12345"),
            ("PGSLUICE_CONFIG", "ignored.toml"),
            ("OTHER", "x"),
        ],
    )
    .unwrap();
    assert_eq!(c.general.pool.pool_size, 7);
    assert_eq!(c.general.pool.checkout_timeout, Duration::from_secs(2));
    assert_eq!(c.databases["app"].primary.host, "db.internal");
    assert_eq!(
        c.users["bob"].password,
        Some(crate::auth::Secret::Plain("12345".into()))
    );
}

#[test]
fn per_database_pool_overrides() {
    let c = load(
        &format!("{MINIMAL}\n[databases.other]\nprimary = \"h:1\"\npool_size = 3\npool_mode = \"session\"\nreplicas = [\"h:2\", \"[::1]:3\"]\n"),
        &[],
    )
    .unwrap();
    let other = &c.databases["other"];
    assert_eq!(other.pool.pool_size, 3);
    assert_eq!(other.pool_mode, PoolMode::Session);
    assert_eq!(other.replicas[1].host, "::1");
    assert_eq!(c.databases["app"].pool.pool_size, 20);
}

#[test]
fn errors_name_the_setting() {
    let cases: &[(&str, &str)] = &[
        ("[general]\npool_mode = \"txn\"\n", "general.pool_mode"),
        (
            "[general]\ncheckout_timeout = \"soon\"\n",
            "general.checkout_timeout",
        ),
        ("[general]\npool_size = 0\n", "general.pool_size"),
        (
            "[general]\npool_size = 50\nmax_pool_size = 10\n",
            "general.max_pool_size",
        ),
        (
            "[general]\nlisten_addr = \"nowhere\"\n",
            "general.listen_addr",
        ),
        ("[general]\npool_sise = 5\n", "pool_sise"),
        ("[general]\ncheckout_timeout = 30\n", "checkout_timeout"),
    ];
    for (extra, needle) in cases {
        let err = load(&format!("{extra}{MINIMAL}"), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains(needle), "{extra:?}: {err}");
    }
    let err = load("[users.app]\npassword = \"x\"\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("databases"), "{err}");
    let err = load(
        "[databases.app]\nprimary = \"h:0\"\n[users.a]\npassword=\"x\"\n",
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("databases.app.primary"), "{err}");
    let err = load("[databases.app]\nprimary = \"h:1\"\n[users.a]\n", &[])
        .unwrap_err()
        .to_string();
    assert!(err.contains("users.a.password"), "{err}");
}

#[test]
fn render_round_trips_and_redacts() {
    let c = load(MINIMAL, &[]).unwrap();
    let text = c.render();
    assert!(!text.contains("secret"));
    let again = load(&text.replace("<redacted>", "secret"), &[]).unwrap();
    assert_eq!(again, c);
}

#[test]
fn auth_type_values_and_default() {
    assert_eq!(
        load(MINIMAL, &[]).unwrap().general.auth_type,
        Method::ScramSha256
    );
    for (v, m) in [
        ("md5", Method::Md5),
        ("password", Method::Password),
        ("plain", Method::Password),
        ("trust", Method::Trust),
    ] {
        let c = load(&format!("[general]\nauth_type = \"{v}\"\n{MINIMAL}"), &[]).unwrap();
        assert_eq!(c.general.auth_type, m);
    }
    for (v, needle) in [("cert", "TLS"), ("reject", "refuse"), ("ldap", "one of")] {
        let e = load(&format!("[general]\nauth_type = \"{v}\"\n{MINIMAL}"), &[])
            .unwrap_err()
            .to_string();
        assert!(e.contains("general.auth_type") && e.contains(needle), "{e}");
    }
}

#[test]
fn secrets_are_parsed_and_never_echoed() {
    let secret = crate::auth::hash_password(b"pw");
    let c = load(
        &format!(
            "[databases.app]\nprimary = \"h:1\"\n[users.a]\npassword = \"{secret}\"\nserver_password = \"sp\"\n[users.b]\npassword = \"md5{}\"\n",
            "0123456789abcdef0123456789abcdef"
        ),
        &[],
    )
    .unwrap();
    assert!(matches!(c.users["a"].password, Some(Secret::Scram(_))));
    assert!(matches!(c.users["b"].password, Some(Secret::Md5(_))));
    let shown = format!("{c:?}{}", c.render());
    assert!(
        !shown.contains(&secret)
            && !shown.contains("\"sp\"")
            && !shown.contains("0123456789abcdef")
    );
    let broken = "SCRAM-SHA-256$4096:c2FsdA==$bm90LWEta2V5:bm90LWEta2V5";
    let e = load(
        &format!("[databases.app]\nprimary = \"h:1\"\n[users.a]\npassword = \"{broken}\"\n"),
        &[],
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("users.a.password") && !e.contains("bm90"), "{e}");
}

#[test]
fn hba_tables_file_and_conflicts() {
    let rules = "[[hba]]\nuser = \"a,b\"\naddress = \"10.0.0.0/8\"\nmethod = \"md5\"\n[[hba]]\nmethod = \"reject\"\n";
    let c = load(&format!("{MINIMAL}{rules}"), &[]).unwrap();
    assert_eq!(c.hba.len(), 2);
    // render → load keeps the rules.
    let again = load(&c.render().replace("<redacted>", "secret"), &[]).unwrap();
    assert_eq!(again, c);
    let e = load(&format!("{MINIMAL}[[hba]]\nmethod = \"ident\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("hba[0]") && e.contains("ident"), "{e}");
    let e = load(&format!("{MINIMAL}[[hba]]\nuser = \"x\"\n"), &[])
        .unwrap_err()
        .to_string();
    assert!(e.contains("hba[0].method"), "{e}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("hba.conf"),
        "host all all all trust\nhost x\n",
    )
    .unwrap();
    let text = format!("[general]\nhba_file = \"hba.conf\"\n{MINIMAL}");
    let e = Config::from_toml_at(&text, "t", Some(dir.path()), std::iter::empty())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("general.hba_file") && e.contains("line 2"),
        "{e}"
    );
    std::fs::write(dir.path().join("hba.conf"), "host all all all trust\n").unwrap();
    let c = Config::from_toml_at(&text, "t", Some(dir.path()), std::iter::empty()).unwrap();
    assert_eq!(c.hba.len(), 1);
    let e = Config::from_toml_at(
        &format!("{text}{rules}"),
        "t",
        Some(dir.path()),
        std::iter::empty(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not both"), "{e}");
}

#[test]
fn tls_settings_are_validated_with_their_key() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.tls.client_mode, ClientTlsMode::Disable);
    assert_eq!(c.tls.server_mode, ServerTlsMode::Prefer);
    let cases = [
        ("[tls]\nclient_mode = \"on\"", "tls.client_mode", "one of"),
        (
            "[tls]\nserver_mode = \"allow\"",
            "tls.server_mode",
            "one of",
        ),
        (
            "[tls]\nclient_mode = \"require\"",
            "tls.client_cert_file",
            "not set",
        ),
        (
            "[tls]\nclient_mode = \"require\"\nclient_cert_file = \"/nonexistent/c.pem\"\nclient_key_file = \"/nonexistent/k.pem\"",
            "tls.client_cert_file",
            "/nonexistent/c.pem",
        ),
        (
            "[tls]\nserver_mode = \"verify-full\"",
            "tls.server_ca_file",
            "not set",
        ),
        (
            "[tls]\nserver_cert_file = \"x.pem\"",
            "tls.server_key_file",
            "together",
        ),
        (
            "[general]\nauth_type = \"cert\"",
            "general.auth_type",
            "client_ca_file",
        ),
        (
            "[[hba]]\ntype = \"hostssl\"\nmethod = \"cert\"",
            "tls.client_ca_file",
            "cert",
        ),
    ];
    for (extra, key, needle) in cases {
        let text = format!("{MINIMAL}\n{extra}");
        let e = load(&text, &[]).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(needle), "{extra}: {e}");
    }
}

#[test]
fn session_features_default_to_pin_and_are_checked() {
    let c = load(MINIMAL, &[]).unwrap();
    assert_eq!(c.general.session_features, SessionFeatures::Pin);
    let c = load(MINIMAL, &[("PGSLUICE_GENERAL__SESSION_FEATURES", "refuse")]).unwrap();
    assert_eq!(c.general.session_features, SessionFeatures::Refuse);
    let e = load(MINIMAL, &[("PGSLUICE_GENERAL__SESSION_FEATURES", "allow")]).unwrap_err();
    assert!(e.to_string().contains("general.session_features"), "{e}");
}

const SHARDED: &str = r#"
[databases.app]
shards = [
  { primary = "10.0.0.1:5432", replicas = ["10.0.0.2:5432"], replica_weights = [2] },
  { primary = "10.0.1.1:5432" },
]
shard_key = "account_id"
shard_key_type = "text"
unsharded_tables = ["Countries", "ref.plans"]
unsharded_writes = "all"
multi_shard_insert = "split"
[users.app]
password = "secret"
"#;

#[test]
fn sharded_database_is_typed_and_shard_zero_stands_in_for_primary() {
    let c = load(SHARDED, &[]).unwrap();
    let db = &c.databases["app"];
    let s = db.sharding.as_ref().expect("sharded");
    assert_eq!(s.shards.len(), 2);
    assert_eq!(s.shards[0].replica_weights, vec![2]);
    assert_eq!(s.shards[1].primary.host, "10.0.1.1");
    assert_eq!(s.key_column, "account_id");
    assert_eq!(s.key_type, ShardKeyType::Text);
    assert_eq!(s.unsharded_tables, vec!["countries", "ref.plans"]);
    assert_eq!(s.unsharded_writes, UnshardedWrites::All);
    assert_eq!(s.multi_shard_insert, MultiShardInsert::Split);
    assert_eq!(s.max_fanout_rows, 100_000);
    assert_eq!(db.primary.host, "10.0.0.1");
    assert_eq!(db.replicas.len(), 1);
    // The rendering reads back as the same configuration.
    let again = load(&c.render(), &[]).unwrap();
    assert_eq!(again.databases["app"].sharding, db.sharding);
}

#[test]
fn sharding_defaults_are_user_id_bigint_and_refusals() {
    let c = load(
        "[databases.app]\nshards = [{ primary = \"h:1\" }]\n[users.app]\npassword = \"p\"\n",
        &[],
    )
    .unwrap();
    let s = c.databases["app"].sharding.clone().expect("sharded");
    assert_eq!(s.key_column, "user_id");
    assert_eq!(s.key_type, ShardKeyType::BigInt);
    assert_eq!(s.unsharded_writes, UnshardedWrites::Refuse);
    assert_eq!(s.multi_shard_insert, MultiShardInsert::Refuse);
}

#[test]
fn sharding_errors_name_the_setting() {
    let cases: &[(&str, &str)] = &[
        (
            "[databases.app]\nprimary = \"h:1\"\nshards = [{ primary = \"h:2\" }]\n",
            "databases.app.primary",
        ),
        (
            "[databases.app]\nreplicas = [\"h:1\"]\nshards = [{ primary = \"h:2\" }]\n",
            "databases.app.replicas",
        ),
        ("[databases.app]\nshards = []\n", "databases.app.shards"),
        (
            "[databases.app]\nshards = [{ replicas = [\"h:1\"] }]\n",
            "databases.app.shards[0].primary",
        ),
        (
            "[databases.app]\nshards = [{ primary = \"h:1\" }, { primary = \"nope\" }]\n",
            "databases.app.shards[1].primary",
        ),
        (
            "[databases.app]\nshards = [{ primary = \"h:1\", replicas = [\"h:2\"], replica_weights = [1, 2] }]\n",
            "databases.app.shards[0].replica_weights",
        ),
        (
            "[databases.app]\nshards = [{ primary = \"h:1\" }]\nshard_key_type = \"float\"\n",
            "databases.app.shard_key_type",
        ),
        (
            "[databases.app]\nshards = [{ primary = \"h:1\" }]\nshard_key = \"a b\"\n",
            "databases.app.shard_key",
        ),
        (
            "[databases.app]\nshards = [{ primary = \"h:1\" }]\nunsharded_writes = \"some\"\n",
            "databases.app.unsharded_writes",
        ),
        (
            "[databases.app]\nshards = [{ primary = \"h:1\" }]\nmulti_shard_insert = \"maybe\"\n",
            "databases.app.multi_shard_insert",
        ),
        (
            "[databases.app]\nshards = [{ primary = \"h:1\" }]\nunsharded_tables = [\"a..b\"]\n",
            "databases.app.unsharded_tables",
        ),
        (
            "[databases.app]\nshards = [{ primary = \"h:1\" }]\npool_mode = \"session\"\n",
            "databases.app.pool_mode",
        ),
        (
            "[databases.app]\nprimary = \"h:1\"\nshard_key = \"user_id\"\n",
            "databases.app.shard_key",
        ),
        (
            "[databases.app]\nshards = [{ primary = \"h:1\" }]\nmax_fanout_rows = 0\n",
            "databases.app.max_fanout_rows",
        ),
    ];
    for (db, key) in cases {
        let text = format!("{db}[users.app]\npassword = \"p\"\n");
        match load(&text, &[]) {
            Err(ConfigError::Invalid { key: k, reason }) => {
                assert_eq!(&k, key, "{text}: {reason}")
            }
            other => panic!("{text}: expected an error naming {key}, got {other:?}"),
        }
    }
}

#[test]
fn a_shard_with_replicas_needs_a_monitor_user() {
    let text = "[databases.app]\nshards = [{ primary = \"h:1\" }, { primary = \"h:2\", replicas = [\"h:3\"] }]\n\
                [users.a]\npassword = \"p\"\n[users.b]\npassword = \"p\"\n";
    match load(text, &[]) {
        Err(ConfigError::Invalid { key, .. }) => assert_eq!(key, "databases.app.monitor_user"),
        other => panic!("expected a monitor_user error, got {other:?}"),
    }
}

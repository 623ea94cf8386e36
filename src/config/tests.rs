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

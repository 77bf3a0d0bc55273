//! The store backends a test runs against: a SQLite file in a temporary directory, and a fresh
//! PostgreSQL schema when `TIDESYNC_TEST_POSTGRES_URL` is set (dropped afterwards). Shared by the
//! test binaries that run one suite on both backends (`conformance.rs`, `security_store.rs`).

use tidesync_cloud::store::Backend;

/// A backend for one test, removed afterwards.
pub(crate) struct Fixture {
    pub(crate) backend: Backend,
    _dir: Option<tempfile::TempDir>,
    postgres_url: Option<String>,
}

impl Fixture {
    pub(crate) fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let backend = Backend::Sqlite { path: dir.path().join("cloud.sqlite3") };
        Self { backend, _dir: Some(dir), postgres_url: None }
    }

    pub(crate) fn postgres(test: &str) -> Option<Self> {
        let Ok(url) = std::env::var("TIDESYNC_TEST_POSTGRES_URL") else {
            eprintln!(
                "\n*** SKIPPED: PostgreSQL store test {test}: TIDESYNC_TEST_POSTGRES_URL is not set \
                 (run `eval \"$(bash cloud/scripts/postgres.sh)\"` first) ***\n"
            );
            return None;
        };
        let schema = format!("t_{}_{}", std::process::id(), test);
        let mut client = ::postgres::Client::connect(&url, ::postgres::NoTls)
            .unwrap_or_else(|error| panic!("TIDESYNC_TEST_POSTGRES_URL={url} is set but unreachable: {error}"));
        client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).unwrap();
        Some(Self { backend: Backend::Postgres { url: url.clone(), schema }, _dir: None, postgres_url: Some(url) })
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let (Some(url), Backend::Postgres { schema, .. }) = (&self.postgres_url, &self.backend) {
            if let Ok(mut client) = ::postgres::Client::connect(url, ::postgres::NoTls) {
                let _ = client.batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"));
            }
        }
    }
}

/// Runs each named `fn(&Backend)` of the test crate as a test on SQLite and on PostgreSQL.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    let fixture = super::backends::Fixture::sqlite();
                    super::$name(&fixture.backend);
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    let Some(fixture) = super::backends::Fixture::postgres(stringify!($name)) else { return };
                    super::$name(&fixture.backend);
                }
            )*
        }
    };
}

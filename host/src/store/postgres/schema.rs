//! The PostgreSQL schema of a store. Each store is a PostgreSQL schema of its own (`sluice` for
//! a server's own records, one per tenant: a tenant's data is a schema of its own as it is a
//! directory of its own with SQLite, so no query can forget a tenant condition), holding the
//! tables below and `migrations`, the numbers of the migrations applied (and when); the
//! statements are written against `{s}`, the schema's name. A database shared with other
//! applications is never touched outside Sluice's schemas. Migrations run under a
//! transaction-scoped advisory lock on the schema's name, so servers starting together against
//! one database apply each exactly once.
//!
//! Times are microseconds since the Unix epoch (`bigint`), ids ULID text, JSON canonical text, as
//! in the SQLite store, so the two backends read and write the same values.

use tokio_postgres::Client;

/// Migrations; `{s}.migrations` holds the numbers of those applied. The PostgreSQL store is
/// not released yet (issue 14): until it is, migration 1 is still the schema being built; after,
/// never edit one: add the next.
pub(super) const STORE_MIGRATIONS: &[&str] = &[
    // 1: runs, task runs, logs, blobs, the output cache, code flows' journals, the change
    // counter, runs' leases. Ids are compared byte by byte (`COLLATE "C"`): a prefix is a range
    // of the primary key whatever the database's collation.
    r#"
CREATE TABLE {s}.flow_runs (
    id text COLLATE "C" NOT NULL,
    flow text NOT NULL,
    state text NOT NULL,
    state_json text NOT NULL,
    history text NOT NULL,
    created_at bigint NOT NULL,
    updated_at bigint NOT NULL,
    parameters text NOT NULL,
    context text NOT NULL,
    manifest_path text,
    manifest text,
    files text,
    result text,
    parent_task_run text,
    cancel_requested_at bigint,
    changed bigint NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX flow_runs_created ON {s}.flow_runs (created_at);
CREATE INDEX flow_runs_state ON {s}.flow_runs (state);
CREATE INDEX flow_runs_parent ON {s}.flow_runs (parent_task_run)
    WHERE parent_task_run IS NOT NULL;
CREATE TABLE {s}.task_runs (
    seq bigint GENERATED ALWAYS AS IDENTITY,
    id text NOT NULL,
    flow_run text NOT NULL,
    task_index integer NOT NULL,
    name text NOT NULL,
    parent text,
    map_index integer,
    state text NOT NULL,
    state_json text NOT NULL,
    history text NOT NULL,
    attempts integer NOT NULL,
    run_time_us bigint NOT NULL,
    fuel bigint NOT NULL,
    output text,
    cached_input text,
    cache text,
    changed bigint NOT NULL,
    PRIMARY KEY (id)
);
CREATE INDEX task_runs_run ON {s}.task_runs (flow_run, task_index, map_index);
CREATE INDEX task_runs_changed ON {s}.task_runs (flow_run, changed, seq);
CREATE TABLE {s}.logs (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    flow_run text NOT NULL,
    task_run text NOT NULL,
    task text NOT NULL,
    map_index integer,
    record text NOT NULL,
    cost bigint NOT NULL
);
CREATE INDEX logs_run ON {s}.logs (flow_run, seq);
CREATE TABLE {s}.blobs (
    hash text NOT NULL,
    size bigint NOT NULL,
    data bytea NOT NULL,
    PRIMARY KEY (hash)
);
CREATE TABLE {s}.cache (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key text NOT NULL,
    task text NOT NULL,
    validator text NOT NULL,
    component text NOT NULL,
    config text NOT NULL,
    grants text NOT NULL,
    secrets text NOT NULL,
    inputs text,
    parameters text,
    blob text NOT NULL,
    created_at bigint NOT NULL,
    expires_at bigint NOT NULL,
    flow_run text NOT NULL,
    task_run text NOT NULL
);
CREATE INDEX cache_key ON {s}.cache (key, expires_at);
CREATE INDEX cache_task_config ON {s}.cache (task, config, created_at, seq);
CREATE INDEX cache_task_newest ON {s}.cache (task, created_at, seq);
CREATE TABLE {s}.journal (
    flow_run text NOT NULL,
    seq bigint NOT NULL,
    entry text NOT NULL,
    PRIMARY KEY (flow_run, seq)
);
CREATE SEQUENCE {s}.changes;
-- The batches committed lately (their ids), so a batch whose commit's outcome was lost with
-- its connection is not applied twice when committed again; pruned after a day.
CREATE TABLE {s}.commits (
    id text NOT NULL PRIMARY KEY,
    at bigint NOT NULL
);
-- The process executing a run holds its lease: `holder` renews `until` (µs, the database's
-- clock) while it runs; a run whose lease lapsed is not live.
CREATE TABLE {s}.leases (
    flow_run text NOT NULL,
    holder text NOT NULL,
    until bigint NOT NULL,
    PRIMARY KEY (flow_run)
);
"#,
    // 2: a task run's peak memory (the most one attempt held), and the runs list's order as an
    // index: newest first by (created_at, id), so a page after a cursor is a range of it; a
    // deployment's runs (their context's `deployment`) in that order too.
    r#"
ALTER TABLE {s}.task_runs ADD COLUMN memory_peak bigint NOT NULL DEFAULT 0;
CREATE INDEX flow_runs_created_id ON {s}.flow_runs (created_at, id);
DROP INDEX {s}.flow_runs_created;
CREATE INDEX flow_runs_deployment ON {s}.flow_runs ((context::jsonb ->> 'deployment'), created_at, id)
    WHERE (context::jsonb ->> 'deployment') IS NOT NULL;
"#,
];

/// The control schema: what the server and its workers share (the queue of task runs given to
/// workers, with their leases). Not a store's.
pub(super) const CONTROL: &str = "sluice";

/// The control schema's migrations, as [`STORE_MIGRATIONS`] are a store's.
pub(super) const CONTROL_MIGRATIONS: &[&str] = &[
    // 1: the queue. A row is a task run's attempt given to workers: ready while `worker` is
    // null, else claimed until `lease_until` (µs), which its worker extends while it runs.
    // `fence` grows with every claim and when a lease lapses: a worker's later calls carry the
    // row and the fence it claimed, and count only while both still match, so a worker whose
    // lease lapsed changes nothing. A lapsed row (`lapsed`) stays until the server has recorded
    // its attempt Crashed (`settle`): a server that dies in between finds it again. `tags`: only a worker carrying every one of
    // them claims it.
    r"
CREATE TABLE {s}.queue (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant text NOT NULL,
    flow_run text NOT NULL,
    task_run text NOT NULL,
    attempt integer NOT NULL,
    tags text[] NOT NULL,
    payload bytea NOT NULL,
    enqueued_at bigint NOT NULL,
    worker text,
    lease_until bigint,
    fence bigint NOT NULL DEFAULT 0,
    lapsed boolean NOT NULL DEFAULT false,
    UNIQUE (task_run, attempt)
);
CREATE INDEX queue_ready ON {s}.queue (id) WHERE worker IS NULL;
CREATE INDEX queue_leases ON {s}.queue (lease_until) WHERE worker IS NOT NULL;
-- A claim: the oldest ready rows the worker's tags allow, locked past any other claimer's
-- (SKIP LOCKED). A function so that it may plan without sorting: the queue's statistics are
-- always behind (a table that fills and empties in seconds), and with them the planner takes
-- 20,000 ready rows for a few dozen and sorts them all (4 ms a claim) instead of walking the
-- ready index in order (0.1 ms).
CREATE FUNCTION {s}.claim(claimer text, until bigint, carried text[], most bigint)
RETURNS TABLE (id bigint, fence bigint, tenant text, flow_run text, task_run text,
               attempt integer, tags text[], payload bytea, enqueued_at bigint)
LANGUAGE sql SET enable_sort = off AS $$
    -- Picked once (materialized): a subquery in `IN` may be run again by the join, and under
    -- SKIP LOCKED pick other rows, more than `most` in all.
    WITH picked AS MATERIALIZED (
        SELECT r.id FROM {s}.queue r
        WHERE r.worker IS NULL AND (r.tags = '{}' OR r.tags <@ carried)
        ORDER BY r.id LIMIT most
        FOR UPDATE SKIP LOCKED)
    UPDATE {s}.queue q SET worker = claimer, lease_until = until, fence = q.fence + 1
    FROM picked WHERE q.id = picked.id
    RETURNING q.id, q.fence, q.tenant, q.flow_run, q.task_run, q.attempt, q.tags, q.payload,
              q.enqueued_at
$$;
-- Claimers are woken by the insert's own transaction: a notification is sent if and only if
-- the rows are committed.
CREATE FUNCTION {s}.queue_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('sluice_queue', '');
    RETURN NULL;
END $$;
CREATE TRIGGER queue_notify AFTER INSERT ON {s}.queue
    FOR EACH STATEMENT EXECUTE FUNCTION {s}.queue_notify();
",
    // 2: the tenant registry (as a server home's `server.db` holds it: tokens as their blake3
    // hash, times as RFC 3339 text) and the worker tokens, so a server and the admin commands
    // on any machine read the same ones.
    r"
CREATE TABLE {s}.tenants (
    id text NOT NULL PRIMARY KEY,
    name text NOT NULL UNIQUE,
    token_hash text NOT NULL UNIQUE,
    created_at text NOT NULL,
    weight integer NOT NULL DEFAULT 1,
    quotas text NOT NULL DEFAULT '{}',
    grants text
);
CREATE TABLE {s}.worker_tokens (
    name text NOT NULL PRIMARY KEY,
    token_hash text NOT NULL UNIQUE,
    created_at text NOT NULL
);
",
    // 3: the queue is a high-churn table (every attempt inserted, updated by its claim, deleted
    // when finished): vacuumed and analyzed after every 1,000 dead rows whatever its size, at
    // full speed, so claims do not walk past dead index entries and plans keep up with it.
    r"
ALTER TABLE {s}.queue SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_vacuum_insert_scale_factor = 0,
    autovacuum_vacuum_insert_threshold = 1000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 1000,
    autovacuum_vacuum_cost_delay = 0
);
",
    // 4: operator tokens: who signs in to the web UI to see every tenant (as worker tokens).
    r"
CREATE TABLE {s}.operator_tokens (
    name text NOT NULL PRIMARY KEY,
    token_hash text NOT NULL UNIQUE,
    created_at text NOT NULL
);
",
];

/// Whether `name` may name a store's schema: 1 to 63 lowercase ASCII letters, digits and `_`,
/// starting with a letter, and neither the control schema ([`CONTROL`]) nor a schema every
/// database has (`public`, `information_schema`, `pg_…`): a store's schema is its own. (It is written into statements, so nothing else
/// is.)
pub(super) fn valid_schema_name(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with("pg_")
        && name != CONTROL
        && name != "public"
        && name != "information_schema"
}

/// Bring schema `schema` (a [`valid_schema_name`], or [`CONTROL`]) up to date with `migrations`
/// (a store's, or the control schema's): create it and its migrations table when missing, then
/// apply, in one transaction under an advisory lock on its name, every migration not yet
/// applied. A schema migrated by a newer Sluice (a migration this
/// build does not know) is refused, untouched.
pub(super) async fn migrate(
    client: &mut Client,
    schema: &str,
    migrations: &[&str],
) -> Result<Migrated, tokio_postgres::Error> {
    // Quoted: a valid name may still be a reserved word (`user`, `order`).
    let quoted = format!("\"{schema}\"");
    let s = |sql: &str| sql.replace("{s}", &quoted);
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('sluice:' || $1))",
        &[&schema],
    )
    .await?;
    tx.batch_execute(&s("CREATE SCHEMA IF NOT EXISTS {s};
         CREATE TABLE IF NOT EXISTS {s}.migrations (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         );"))
        .await?;
    let found: i32 = tx
        .query_one(
            &s("SELECT coalesce(max(version), 0) FROM {s}.migrations"),
            &[],
        )
        .await?
        .get(0);
    let known = i32::try_from(migrations.len()).unwrap_or(i32::MAX);
    if found > known {
        return Ok(Migrated::TooNew { found, known });
    }
    let insert = s("INSERT INTO {s}.migrations (version) VALUES ($1)");
    for (version, sql) in (found + 1..).zip(&migrations[usize::try_from(found).unwrap_or(0)..]) {
        tx.batch_execute(&s(sql)).await?;
        tx.execute(&insert, &[&version]).await?;
    }
    tx.commit().await?;
    Ok(Migrated::Current(known))
}

/// What [`migrate`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Migrated {
    /// The schema is at this version.
    Current(i32),
    /// The database was migrated by a newer Sluice.
    TooNew {
        /// Its version.
        found: i32,
        /// The newest this build knows.
        known: i32,
    },
}

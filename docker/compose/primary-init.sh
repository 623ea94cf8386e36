#!/bin/bash
# Runs once, when the primary's data directory is first initialised (the
# postgres image runs /docker-entrypoint-initdb.d/*.sh as user postgres):
# the application role and database owner, a replication role, one physical
# replication slot per replica, and the pg_hba line replicas connect with.
set -euo pipefail

psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
    -v app_password="$APP_PASSWORD" \
    -v replication_password="$REPLICATION_PASSWORD" <<'SQL'
CREATE ROLE app LOGIN PASSWORD :'app_password';
ALTER DATABASE app OWNER TO app;
CREATE ROLE replicator REPLICATION LOGIN PASSWORD :'replication_password';
SELECT pg_create_physical_replication_slot('replica1');
SELECT pg_create_physical_replication_slot('replica2');
SQL

# "all" in pg_hba.conf does not match replication connections.
echo "host replication replicator all scram-sha-256" >> "$PGDATA/pg_hba.conf"

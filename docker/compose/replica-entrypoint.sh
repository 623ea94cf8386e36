#!/bin/bash
# Entrypoint of a streaming replica in docker/compose.yaml. On first start
# (empty data directory) it clones the primary with pg_basebackup into its
# replication slot; -R writes standby.signal and primary_conninfo, so the
# server then starts as a hot standby. Then it hands over to the postgres
# image's own entrypoint, which starts PostgreSQL as user postgres.
set -euo pipefail

: "${PRIMARY_HOST:?set PRIMARY_HOST}" "${REPLICATION_SLOT:?set REPLICATION_SLOT}"
: "${REPLICATION_PASSWORD:?set REPLICATION_PASSWORD}"
PGDATA="${PGDATA:-/var/lib/postgresql/data}"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    mkdir -p "$PGDATA"
    chown postgres:postgres "$PGDATA"
    chmod 0700 "$PGDATA"
    until pg_isready --quiet --host "$PRIMARY_HOST" --port 5432; do
        echo "replica: waiting for $PRIMARY_HOST:5432"
        sleep 1
    done
    echo "replica: cloning $PRIMARY_HOST into slot $REPLICATION_SLOT"
    PGPASSWORD="$REPLICATION_PASSWORD" gosu postgres pg_basebackup \
        --host "$PRIMARY_HOST" --port 5432 --username replicator \
        --pgdata "$PGDATA" --wal-method stream --slot "$REPLICATION_SLOT" \
        --write-recovery-conf --checkpoint fast
fi

exec docker-entrypoint.sh "$@"

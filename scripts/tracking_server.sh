#!/usr/bin/env bash
# A team's MLflow tracking server: runs and metrics in PostgreSQL, artifacts under one root
# that the server itself serves (clients need no access to it).
#
#   scripts/tracking_server.sh BACKEND_STORE_URI ARTIFACT_ROOT [HOST] [PORT] [WORKERS]
#   scripts/tracking_server.sh postgresql+psycopg://mlflow@db:5432/mlflow /srv/mlflow-artifacts 0.0.0.0 5000
#
# The database must exist (createdb mlflow); the server creates its tables on first start.
# Credentials stay out of the command line and of every file: PostgreSQL's password from
# PGPASSWORD or ~/.pgpass; an S3 artifact root (s3://bucket/path) from AWS_* variables.
# Clients then log with tracking.uri=http://HOST:PORT (or MLFLOW_TRACKING_URI); behind a
# proxy with a login they give MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD.
# Needs: pip install -e ".[postgres]" (psycopg for the postgresql+psycopg:// scheme).
set -euo pipefail

if [ $# -lt 2 ]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
backend=$1 artifacts=$2 host=${3:-127.0.0.1} port=${4:-5000} workers=${5:-4}
case $backend in
  *://*:*@*) echo "tracking_server.sh: put the password in PGPASSWORD or ~/.pgpass, not in the URI" >&2; exit 2 ;;
esac

exec python -m mlflow server \
  --backend-store-uri "$backend" \
  --artifacts-destination "$artifacts" \
  --serve-artifacts \
  --host "$host" --port "$port" --workers "$workers"

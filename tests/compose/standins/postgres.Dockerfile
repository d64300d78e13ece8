# Stand-in for postgres:16-alpine: Debian bookworm's PostgreSQL (15; the schema needs nothing newer),
# with the real image's contract: POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB make the cluster
# on first start in PGDATA, password authentication from other hosts, pg_isready on PATH, the
# server runs as user postgres and stops fast on SIGINT.
ARG BASE
FROM ${BASE}
RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/postgresql/data /run/postgresql \
 && chown postgres:postgres /var/lib/postgresql/data /run/postgresql
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
COPY postgres-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
STOPSIGNAL SIGINT
EXPOSE 5432
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["postgres"]

# The migration job image: `python -m runner` with its locked dependencies, the PostgreSQL client
# tools (pg_dump, pg_restore, psql) and zstd for backups, this repo's alembic.ini and migrations/,
# and the no-op facts recorded for them (docs/image.md).
#
#   docker build -t migration-runner .                          # the runtime image (last stage)
#   docker build --target verify -t migration-runner:verify .   # + squawk, for `runner verify`
#
# Build arguments:
#   PG_MAJOR        PostgreSQL client major (default: the newest; a newer pg_dump dumps every
#                   older server, an older one refuses a newer server)
#   PG_APT_SOURCE   pgdg (default): apt.postgresql.org; debian: Debian's own postgresql-client-N
#                   (bookworm has only 15, so also pass PG_MAJOR=15)
#   PYTHON_IMAGE    the base image (a Debian bookworm based Python 3.11+)
#   VERSION, REVISION  written into the OCI labels

ARG PYTHON_IMAGE=python:3.13-slim-bookworm

# ---- deps: the locked virtualenv (uv and pip stay in the build stages) -------------------------
FROM ${PYTHON_IMAGE} AS deps
ARG UV_VERSION=0.13.9
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PROJECT_ENVIRONMENT=/opt/venv
# binutils for strip (below). DL3008 (unpinned apt packages): a tool of this throwaway stage only
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends binutils && rm -rf /var/lib/apt/lists/*
# a throwaway venv for uv itself: works whether python3 comes with pip or only with ensurepip
RUN python3 -m venv /opt/uv && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}"
WORKDIR /src
COPY pyproject.toml uv.lock ./
# exactly the versions and hashes in uv.lock (--frozen: never re-resolve); no test extras
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-install-project --python python3
# Slimmer (docs/image.md has the breakdown): botocore ships the models of every AWS service
# (28 MB); the runner calls S3, and STS for web-identity credentials (IRSA), so keep those two and
# the shared data files next to them (endpoints, partitions, sdk-default-configuration, _retry)
# and boto3's s3 resource model. Compiled extensions lose their debug symbols (SQLAlchemy's carry
# 8 MB), packages their test suites. The bytecode uv compiled stays: it makes start-up fast.
RUN set -eux; \
    site="$(/opt/venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"; \
    find "$site/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts -exec rm -rf {} +; \
    find "$site/boto3/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 -exec rm -rf {} +; \
    find "$site" -type d -name tests -prune -exec rm -rf {} +; \
    find "$site" -type f -name '*.so' -exec strip --strip-unneeded {} +; \
    for kept in endpoints.json partitions.json sdk-default-configuration.json _retry.json s3 sts; do \
      test -e "$site/botocore/data/$kept"; \
    done

# ---- verify-deps: squawk, exactly as locked by the `verify` extra -------------------------------
FROM deps AS verify-deps
RUN /opt/uv/bin/uv sync --frozen --no-dev --no-install-project --extra verify --python python3

# ---- build: the runner's own code, compiled --------------------------------------------------------
FROM deps AS build
COPY runner/ /app/runner/
# checked-hash pycs stay valid whatever the files' mtimes become in the final stage
RUN /opt/venv/bin/python -m compileall -q --invalidation-mode checked-hash /app/runner

# ---- runtime: the image ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
ARG PG_MAJOR=18
ARG PG_APT_SOURCE=pgdg
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="migration-runner" \
      org.opencontainers.image.description="One-shot Alembic migration job for PostgreSQL: wait, lock, back up to S3, migrate, report." \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The client binaries come out of the postgresql-client-N package without installing it: its
# dependency postgresql-client-common (a perl wrapper the job never uses) pulls in 47 MB of perl.
# The package's own library dependencies are installed, and ldd proves nothing is missing.
# DL3008 (unpinned apt packages) on purpose: PG_MAJOR pins the client, and a rebuild should pick
# up Debian's security fixes. DL3003 (cd): apt-get download writes to the current directory, a
# scratch directory removed in the same RUN.
# hadolint ignore=DL3008,DL3003
RUN set -eux; \
    apt-get update; \
    case "${PG_APT_SOURCE}" in \
      pgdg) \
        . /etc/os-release; \
        install -d /usr/share/postgresql-common/pgdg; \
        python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
          https://www.postgresql.org/media/keys/ACCC4CF8.asc \
          /usr/share/postgresql-common/pgdg/apt.postgresql.org.asc; \
        echo "deb [signed-by=/usr/share/postgresql-common/pgdg/apt.postgresql.org.asc] https://apt.postgresql.org/pub/repos/apt ${VERSION_CODENAME}-pgdg main" \
          > /etc/apt/sources.list.d/pgdg.list; \
        apt-get update ;; \
      debian) ;; \
      *) echo "PG_APT_SOURCE must be pgdg or debian, not '${PG_APT_SOURCE}'" >&2; exit 2 ;; \
    esac; \
    install -d -o _apt /tmp/pgclient; \
    cd /tmp/pgclient; \
    apt-get download "postgresql-client-${PG_MAJOR}"; \
    mapfile -t deps < <(dpkg-deb -f postgresql-client-*.deb Depends | tr ',' '\n' \
      | sed -E 's/[(|].*//; s/[[:space:]]//g' | grep -vxE 'postgresql-client-common|sensible-utils|'); \
    apt-get install -y --no-install-recommends "${deps[@]}" zstd tini; \
    dpkg-deb --fsys-tarfile postgresql-client-*.deb \
      | tar -x -C / --wildcards "./usr/lib/postgresql/${PG_MAJOR}/bin/*"; \
    cd /; \
    rm -rf /tmp/pgclient; \
    for tool in pg_dump pg_restore psql; do \
      if ldd "/usr/lib/postgresql/${PG_MAJOR}/bin/${tool}" | grep 'not found'; then exit 1; fi; \
    done; \
    apt-get clean; \
    rm -rf /var/lib/apt/lists/* /var/cache/debconf/*-old /var/log/apt /var/log/dpkg.log; \
    groupadd --gid 10001 runner; \
    useradd --no-log-init --uid 10001 --gid 10001 --home-dir /tmp --no-create-home \
      --shell /usr/sbin/nologin runner

COPY --from=build /opt/venv /opt/venv
COPY --from=build /app/runner /app/runner
COPY entrypoint.sh /usr/local/bin/entrypoint.sh

# the PostgreSQL client directory first: pg_dump/pg_restore/psql of PG_MAJOR, not Debian's wrapper
ENV PATH="/opt/venv/bin:/usr/lib/postgresql/${PG_MAJOR}/bin:${PATH}" \
    RUNNER_IMAGE_VERSION="${VERSION}" \
    RUNNER_IMAGE_REVISION="${REVISION}" \
    PYTHONPATH=/app \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /app
COPY alembic.ini /app/alembic.ini
COPY migrations/ /app/migrations/
# The no-op fast path: env.py is run once here, without a database, and what a no-op needs (head,
# version table) is written next to alembic.ini with fingerprints of the files it came from; at
# run time the runner answers "already at head" with one query when they still match. The
# environment above is the one the runner sees, so the facts apply to it. Compiled migrations
# keep the full path's start-up fast too. --strict: these sample migrations must be recordable.
RUN python -m compileall -q --invalidation-mode checked-hash /app/migrations \
    && python -m runner.fastpath record --strict
# numeric, so Kubernetes can verify runAsNonRoot; writes nothing outside /tmp (read-only root works)
USER 10001:10001
# tini as PID 1 forwards SIGTERM to the runner (which cancels the running statement) and reaps
ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/entrypoint.sh"]
CMD ["upgrade"]

# ---- verify: the runtime image plus squawk (runner verify lints the SQL each revision runs) ------
FROM runtime AS verify
LABEL org.opencontainers.image.title="migration-runner-verify"
COPY --from=verify-deps /opt/venv/bin/squawk /opt/venv/bin/squawk

# ---- the default target: the runtime image, unchanged (`docker build .` builds the last stage) ----
FROM runtime

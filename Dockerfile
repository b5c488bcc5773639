# syntax=docker/dockerfile:1
#
# MetaStore images. Two ways to build the same runtime image:
#
#   docker build -t metastore .                      # full build from source (users)
#   docker build --target runtime-prebuilt \
#       --build-context bin=$CARGO_TARGET_DIR/release -t metastore .   # CI: reuse host binaries
#
# The base images are Debian bookworm (the project's toolchain and libraries); on a machine
# without a registry, build a local `debian:bookworm-slim` first (debootstrap + docker import).

ARG DEBIAN=debian:bookworm-slim

# ---- build: compile the workspace (RocksDB's C++ takes minutes) ---------------------------
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin metastore --bin metastore-operator \
 && mkdir -p /out \
 && cp target/release/metastore target/release/metastore-operator /out/

# ---- runtime base: small, non-root ------------------------------------------------------
FROM ${DEBIAN} AS runtime-base
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 65532 --home-dir /var/lib/metastore --shell /usr/sbin/nologin metastore \
 && mkdir -p /var/lib/metastore \
 && chown metastore /var/lib/metastore
ENV METASTORE_DATA_DIR=/var/lib/metastore \
    METASTORE_LISTEN_CLIENT_URLS=http://0.0.0.0:2379 \
    METASTORE_LISTEN_PEER_URLS=http://0.0.0.0:2380
VOLUME /var/lib/metastore
EXPOSE 2379 2380
USER 65532:65532
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD curl -fsS http://127.0.0.1:2379/health || exit 1
ENTRYPOINT ["/usr/local/bin/metastore"]

# ---- runtime from binaries built on the host (CI) ----------------------------------------
FROM runtime-base AS runtime-prebuilt
COPY --from=bin metastore metastore-operator /usr/local/bin/

# ---- runtime from the build stage (the default target) ----------------------------------
FROM runtime-base AS runtime
COPY --from=build /out/ /usr/local/bin/

# MetaStore images. One runtime image holds both binaries: `metastore` (the entrypoint) and
# `metastore-operator` (the Helm chart runs it with `command: [metastore-operator]`).
#
#   docker build -t metastore .                      # full build from source (BuildKit + a registry)
#   docker build --target runtime-prebuilt \
#       --build-context bin=$CARGO_TARGET_DIR/release -t metastore .   # reuse host binaries
#   e2e/images.sh                                    # the same, with no registry and no BuildKit
#
# The base images are Debian bookworm (the project's toolchain and libraries). Without a
# registry, e2e/images.sh makes `debian:bookworm-slim` locally (debootstrap + docker import)
# and builds `runtime-prebuilt` with the legacy builder too, so:
# - no `# syntax=` line (BuildKit would pull the dockerfile frontend image);
# - the runtime stages come first and never run apt-get, curl or anything that needs a network
#   (the legacy builder builds every stage before the target, so `build` and its `rust` base
#   come last);
# - no `RUN --mount` (the legacy builder refuses the whole file at parse time).
#
# Runtime contract: uid/gid 65532 (the operator's pods run as 65532 too), data in the volume
# /var/lib/metastore, read-only root filesystem works (`docker run --read-only`; nothing is
# written outside the data volume), ports 2379 (client, gRPC + HTTP) and 2380 (peer).
#
# Both runtime stages carry `metastore-ctl` too (the operator's migration Job runs
# `metastore-ctl migrate --to=N --wait`).

ARG DEBIAN=debian:bookworm-slim

# ---- runtime base: small, non-root, no network needed to build it --------------------------
FROM ${DEBIAN} AS runtime-base
RUN groupadd --system --gid 65532 metastore \
 && useradd --system --uid 65532 --gid 65532 --home-dir /var/lib/metastore --no-create-home \
      --shell /usr/sbin/nologin metastore \
 && mkdir -p /var/lib/metastore \
 && chown 65532:65532 /var/lib/metastore \
 && chmod 0700 /var/lib/metastore
ENV METASTORE_DATA_DIR=/var/lib/metastore \
    METASTORE_LISTEN_CLIENT_URLS=http://0.0.0.0:2379 \
    METASTORE_LISTEN_PEER_URLS=http://0.0.0.0:2380
VOLUME /var/lib/metastore
WORKDIR /var/lib/metastore
EXPOSE 2379 2380
USER 65532:65532
# GET /health on the client port with bash's /dev/tcp: no curl (and so no apt-get in the
# build). Healthy only on {"health":"true"}; a NOSPACE alarm or no leader is unhealthy.
# Assumes the image's default client URL (port 2379); with client TLS, use
# --listen-metrics-urls and a health check of your own (or the kubelet's probes).
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/2379 && printf 'GET /health HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nConnection: close\\r\\n\\r\\n' >&3 && grep -q '\"health\":\"true\"' <&3"]
ENTRYPOINT ["/usr/local/bin/metastore"]

# ---- runtime from binaries built on the host (CI, e2e/images.sh) -------------------------
FROM runtime-base AS runtime-prebuilt
COPY --from=bin metastore metastore-ctl metastore-operator /usr/local/bin/

# ---- build: compile the workspace (RocksDB's C++ takes minutes) ---------------------------
FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libclang-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin metastore --bin metastore-ctl --bin metastore-operator \
 && mkdir -p /out \
 && for b in metastore metastore-ctl metastore-operator; do strip --strip-debug -o /out/$b target/release/$b; done

# ---- runtime from the build stage (the default target: the last stage) -------------------
FROM runtime-base AS runtime
COPY --from=build /out/ /usr/local/bin/

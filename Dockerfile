# syntax=docker/dockerfile:1
# One image for both binaries, switchyard-edge and switchyard-router:
#   docker build -t registry.example.com/switchyard:0.1.0 .
# k8s/ picks the binary with `command:`; the default entrypoint is the edge.
# Build stage: the Rust toolchain the project uses (rust-version in Cargo.toml
# is the minimum; CI builds with this one). Runtime stage: distroless with
# glibc only (the binaries use rustls/ring, no OpenSSL), running as the
# image's non-root user, no shell.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
COPY . .
# Release profile without the line tables Cargo.toml keeps for profiling: a smaller image.
ENV CARGO_PROFILE_RELEASE_DEBUG=0
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p switchyard-edge -p switchyard-router \
    && install -D -m 0755 target/release/switchyard-edge /out/switchyard-edge \
    && install -D -m 0755 target/release/switchyard-router /out/switchyard-router

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/ /usr/local/bin/
USER 65532:65532
# WebSocket, edge admin, router admin (SWITCHYARD_LISTEN / SWITCHYARD_ADMIN_LISTEN defaults).
EXPOSE 8080 9090 9091
ENTRYPOINT ["/usr/local/bin/switchyard-edge"]

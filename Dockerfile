# token-proxy container image: multi-stage, small non-root runtime.
#   docker build -t token-proxy .
#   docker run --rm -p 127.0.0.1:8080:8080 -v $PWD/proxy.toml:/etc/token-proxy/proxy.toml:ro token-proxy
# (Not built in this project's CI: its machines have no Docker engine. See the README.)

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
RUN cargo build --release --locked --bin token-proxy \
 && install -D -m 0755 target/release/token-proxy /out/token-proxy \
 && mkdir -p /out/state

# distroless/cc: glibc + libgcc and CA certificates, no shell, runs as nonroot (65532).
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/token-proxy /usr/local/bin/token-proxy
COPY --from=build --chown=65532:65532 /out/state /var/lib/token-proxy
USER 65532:65532
# Listen addresses come from the config (or TOKEN_PROXY_LISTEN / TOKEN_PROXY_ADMIN_LISTEN).
# In a pod the app shares the sidecar's loopback; a standalone container needs
# listen = "0.0.0.0:8080" and should be published on the host's loopback only
# (docker run -p 127.0.0.1:8080:8080 ...).
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/token-proxy"]
CMD ["--config", "/etc/token-proxy/proxy.toml"]

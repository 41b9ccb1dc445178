# token-proxy container image: one static binary in an empty root filesystem.
#   bash scripts/image [TAG]     builds the static binary, then this image (podman or docker)
# The build context is target/image/ (the binary and an empty state directory), prepared
# by scripts/image; building this file on its own context does not work.
#
# Configuration: mount a proxy.toml at /etc/token-proxy/proxy.toml, or set TOKEN_PROXY_*
# variables alone (no file: environment-only configuration). CA roots are built in
# (Mozilla's, via webpki-roots); private CAs come from `ca_file`. DNS and /etc/hosts come
# from the engine (podman and Kubernetes provide resolv.conf and hosts).
FROM scratch
COPY token-proxy /token-proxy
# Writable state (rotated refresh tokens: state_file = "/var/lib/token-proxy/<name>.json").
COPY --chown=65532:65532 state /var/lib/token-proxy
VOLUME /var/lib/token-proxy
# ./proxy.toml is read when present (the config mount); otherwise TOKEN_PROXY_* alone.
WORKDIR /etc/token-proxy
USER 65532:65532
# Proxy and admin ports. The defaults listen on 127.0.0.1 (right in a pod, whose containers
# share loopback); a standalone container publishing ports needs TOKEN_PROXY_LISTEN=0.0.0.0:8080
# and should publish on the host's loopback only (-p 127.0.0.1:8080:8080).
EXPOSE 8080 9901
STOPSIGNAL SIGTERM
ENTRYPOINT ["/token-proxy"]

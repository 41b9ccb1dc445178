#!/usr/bin/env bash
# Throughput of one extra hop: token-proxy vs nginx, both in front of the same nginx upstream
# on loopback, measured with wrk in one run. Quote the ratios, not the absolute numbers.
#   bash benches/compare_nginx.sh [connections] [seconds]
# Installs nginx-light and wrk (Debian) if missing. Everything binds 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
conns=${1:-64}
secs=${2:-5}
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
cargo build --release --locked --bin token-proxy >/dev/null
work=$(mktemp -d)
cleanup() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
  [ -n "${tp:-}" ] && kill "$tp" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

cat > "$work/nginx.conf" <<CONF
worker_processes 1;
pid $work/nginx.pid;
error_log $work/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  upstream backend { server 127.0.0.1:18081; keepalive 64; }
  server { listen 127.0.0.1:18081; location / { default_type application/json; return 200 '{"ok":true}'; } }
  server {
    listen 127.0.0.1:18082;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer static-token";
    }
  }
}
CONF
cat > "$work/proxy.toml" <<CONF
[server]
listen = "127.0.0.1:18080"
[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:18081"
credential = "s"
[credentials.s]
grant = "static"
access_token = "static-token"
CONF
nginx -c "$work/nginx.conf"

rps() { wrk -t2 -c"$conns" -d"${secs}s" "http://127.0.0.1:$1/v1/x" | awk '/Requests\/sec/ {print $2}'; }
run_proxy() {
  TOKEN_PROXY_LOG=$1 ./target/release/token-proxy --config "$work/proxy.toml" 2>/dev/null &
  tp=$!
  sleep 1
}

direct=$(rps 18081)
nginx_hop=$(rps 18082)
run_proxy info; ours_info=$(rps 18080); kill "$tp"; wait "$tp" 2>/dev/null || true
run_proxy warn; ours_quiet=$(rps 18080)

echo "requests/s with $conns connections for ${secs}s (2 wrk threads, same machine):"
printf '  direct to upstream              %10s\n' "$direct"
printf '  via nginx (1 worker)            %10s\n' "$nginx_hop"
printf '  via token-proxy (info logs)     %10s\n' "$ours_info"
printf '  via token-proxy (warn logs)     %10s\n' "$ours_quiet"
awk -v n="$nginx_hop" -v a="$ours_info" -v b="$ours_quiet" -v d="$direct" 'BEGIN {
  printf "  token-proxy / nginx: %.2f (info logs), %.2f (warn logs); nginx / direct: %.2f\n", a/n, b/n, n/d }'

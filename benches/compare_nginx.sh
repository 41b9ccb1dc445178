#!/usr/bin/env bash
# One extra hop, side by side in one run: direct to the upstream, through nginx, through
# token-proxy. The upstream is nginx (workers = cores) answering 200 only when a bearer
# token is present. The nginx hop is its own instance (workers = cores, upstream keepalive
# 128) setting a static Authorization header; token-proxy holds a client_credentials token
# (from a token endpoint that nginx also serves). wrk -t1, rounds alternating between the
# contenders. Per contender: requests/s, p50, p99, non-2xx, and CPU time per request
# (utime+stime of the proxy's own processes, from /proc, over the run / requests served),
# also split into user and system (kernel) time.
#
#   bash benches/compare_nginx.sh [seconds-per-round] [rounds]
#
# Scenarios: 64 connections with request logs off (nginx access_log off, token-proxy
# TOKEN_PROXY_LOG=warn); the same with logs on (nginx access_log to a file, token-proxy's
# default info request log); 1 connection (added p50); 1000 connections (errors, p99).
# Quote the ratios, not the absolute numbers. Installs nginx-light and wrk if missing.
# TOKEN_PROXY_BIN=path measures that binary instead of building this checkout's (to set
# an older build against nginx on the same machine and day).
# Everything binds 127.0.0.1 only.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
rounds=${2:-3}
if ! command -v nginx >/dev/null || ! command -v wrk >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light wrk >/dev/null
fi
bin=${TOKEN_PROXY_BIN:-}
if [ -z "$bin" ]; then
  cargo build --release --locked --bin token-proxy >/dev/null
  bin=./target/release/token-proxy
fi
cores=$(nproc)
work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for f in "$work"/*.pid; do [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT
ulimit -n 65536 2>/dev/null || ulimit -n 8192 2>/dev/null || true

UP=18081 NGX=18082 NGX_LOG=18083 OURS=18080 OURS_LOG=18084 ADMIN=18090 ADMIN_LOG=18091

cat > "$work/upstream.conf" <<CONF
worker_processes $cores;
pid $work/upstream.pid;
error_log $work/upstream-error.log warn;
events { worker_connections 8192; }
http {
  access_log off;
  server {
    listen 127.0.0.1:$UP;
    location = /oauth/token {
      default_type application/json;
      return 200 '{"access_token":"bench-access-token","token_type":"Bearer","expires_in":3600}';
    }
    location / {
      if (\$http_authorization !~ "^Bearer .+") { return 401; }
      default_type application/json;
      return 200 '{"ok":true}';
    }
  }
}
CONF

# The nginx hop: its own instance; `log` selects access_log off or to a file.
nginx_hop() { # name port access_log
  cat > "$work/$1.conf" <<CONF
worker_processes $cores;
pid $work/$1.pid;
error_log $work/$1-error.log warn;
events { worker_connections 8192; }
http {
  access_log $3;
  upstream backend { server 127.0.0.1:$UP; keepalive 128; }
  server {
    listen 127.0.0.1:$2;
    location / {
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer static-token";
    }
  }
}
CONF
  nginx -c "$work/$1.conf"
}

proxy_toml() { # port admin
  cat <<CONF
[server]
listen = "127.0.0.1:$1"
admin_listen = "127.0.0.1:$2"
[[routes]]
prefix = "/"
upstream = "http://127.0.0.1:$UP"
credential = "cc"
[credentials.cc]
grant = "client_credentials"
token_url = "http://127.0.0.1:$UP/oauth/token"
client_id = "bench"
client_secret = "bench-secret"
CONF
}

nginx -c "$work/upstream.conf"
nginx_hop nginx "$NGX" off
nginx_hop nginx-log "$NGX_LOG" "$work/access.log"
proxy_toml "$OURS" "$ADMIN" > "$work/ours.toml"
proxy_toml "$OURS_LOG" "$ADMIN_LOG" > "$work/ours-log.toml"
TOKEN_PROXY_LOG=warn "$bin" --config "$work/ours.toml" 2>/dev/null &
pids+=($!); ours_pid=$!
TOKEN_PROXY_LOG=info "$bin" --config "$work/ours-log.toml" 2>"$work/ours.log" >/dev/null &
pids+=($!); ours_log_pid=$!
for port in $OURS $OURS_LOG; do
  for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/warm" >/dev/null && break; sleep 0.1; done
done

# The processes serving a port's traffic: nginx's master and workers, or token-proxy.
procs_of() {
  case $1 in
    $UP) echo "$(cat "$work/upstream.pid") $(pgrep -P "$(cat "$work/upstream.pid")" | tr '\n' ' ')" ;;
    $NGX) echo "$(cat "$work/nginx.pid") $(pgrep -P "$(cat "$work/nginx.pid")" | tr '\n' ' ')" ;;
    $NGX_LOG) echo "$(cat "$work/nginx-log.pid") $(pgrep -P "$(cat "$work/nginx-log.pid")" | tr '\n' ' ')" ;;
    $OURS) echo "$ours_pid" ;;
    $OURS_LOG) echo "$ours_log_pid" ;;
  esac
}
# "utime stime" in clock ticks, summed over processes (all threads: /proc/PID/stat).
cpu_ticks() {
  local user=0 sys=0 p
  for p in $1; do
    read -r u s < <(awk '{print $14, $15}' "/proc/$p/stat")
    user=$((user + u)) sys=$((sys + s))
  done
  echo "$user $sys"
}
hz=$(getconf CLK_TCK)

# One wrk run against a port: appends "rps p50_us p99_us non2xx errors cpu_us_per_req
# user_us_per_req sys_us_per_req".
measure() { # port conns
  local before after out
  read -r ub sb < <(cpu_ticks "$(procs_of "$1")")
  # Direct calls carry the bearer the upstream wants (the proxies add theirs).
  local auth=()
  [ "$1" = "$UP" ] && auth=(-H "Authorization: Bearer direct-token")
  out=$(wrk -t1 -c"$2" -d"${secs}s" --latency "${auth[@]}" "http://127.0.0.1:$1/v1/x")
  read -r ua sa < <(cpu_ticks "$(procs_of "$1")")
  echo "$out" | awk -v uticks=$((ua - ub)) -v sticks=$((sa - sb)) -v hz="$hz" '
    function us(v) { if (v ~ /us$/) return v + 0; if (v ~ /ms$/) return v * 1000; if (v ~ /s$/) return v * 1000000; return v }
    /Requests\/sec/ { rps = $2 }
    /^ +50%/ { p50 = us($2) }
    /^ +99%/ { p99 = us($2) }
    /requests in/ { n = $1 }
    /Non-2xx/ { non2xx = $5 }
    /Socket errors/ { gsub(",", ""); errors = $4 + $6 + $8 + $10 }
    END {
      per = (n > 0 ? 1000000 / hz / n : 0)
      printf "%s %.0f %.0f %d %d %.1f %.1f %.1f\n", rps, p50, p99, non2xx, errors, (uticks + sticks) * per, uticks * per, sticks * per
    }'
}

# Alternate rounds between contenders; print the median round per contender.
scenario() { # title conns label:port...
  local title=$1 conns=$2; shift 2
  local -A results=()
  for _ in $(seq "$rounds"); do
    for c in "$@"; do
      results[${c%%:*}]+="$(measure "${c##*:}" "$conns")"$'\n'
    done
  done
  echo "== $title: $conns connections, wrk -t1, ${secs}s x $rounds rounds (median round by requests/s)"
  printf '  %-28s %10s %9s %9s %7s %7s %12s %8s %8s\n' contender req/s p50_us p99_us non2xx errors cpu_us/req user_us sys_us
  for c in "$@"; do
    local label=${c%%:*}
    printf '%s' "${results[$label]}" | sort -n | awk -v l="$label" -v r="$rounds" \
      'NR == int((r + 1) / 2) { printf "  %-28s %10.0f %9d %9d %7d %7d %12.1f %8.1f %8.1f\n", l, $1, $2, $3, $4, $5, $6, $7, $8 }' \
      | tee -a "$work/summary"
  done
}

scenario "logs off" 64 direct:$UP nginx:$NGX token-proxy:$OURS
scenario "logs on" 64 nginx+access_log:$NGX_LOG token-proxy+info_log:$OURS_LOG
scenario "one connection" 1 direct:$UP nginx:$NGX token-proxy:$OURS
scenario "1000 connections" 1000 nginx:$NGX token-proxy:$OURS

echo "== ratios (token-proxy / nginx; for cpu and latency lower is better)"
awk '
  /^  direct/ && !d64 { d64 = $2 }
  { key = $1 } 
  $1 == "nginx" { n[++ni] = $0 } $1 == "token-proxy" { t[++ti] = $0 }
  $1 == "nginx+access_log" { nl = $0 } $1 == "token-proxy+info_log" { tl = $0 }
  $1 == "direct" { dd[++di] = $0 }
  END {
    split(n[1], a); split(t[1], b);
    printf "  64 conns, logs off: req/s %.2fx, p99 %.2fx, cpu/req %.2fx (user %.2fx, system %.2fx; system is %.0f%% of nginx'"'"'s cpu/req)\n", b[2] / a[2], b[4] / a[4], b[7] / a[7], b[8] / a[8], b[9] / a[9], 100 * a[9] / a[7]
    split(nl, a); split(tl, b);
    printf "  64 conns, logs on:  req/s %.2fx, cpu/req %.2fx\n", b[2] / a[2], b[7] / a[7]
    split(dd[2], d); split(n[2], a); split(t[2], b);
    printf "  1 conn: added p50 nginx %d us, token-proxy %d us\n", a[3] - d[3], b[3] - d[3]
    split(n[3], a); split(t[3], b);
    printf "  1000 conns: errors nginx %d, token-proxy %d; p99 %.2fx\n", a[5] + a[6], b[5] + b[6], b[4] / a[4]
  }' "$work/summary"

//! The `token-proxy` binary: CLI, logging, run until a signal.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use token_proxy::config::{fingerprint_files, Config, ConfigSource};
use token_proxy::{App, StartError};

/// mimalloc instead of glibc's malloc: see README "Performance". The `system-allocator`
/// feature leaves it out, for heap profilers that see only malloc.
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "token-proxy",
    version,
    about = "Sidecar proxy that attaches and refreshes OAuth 2.0 tokens"
)]
struct Cli {
    /// Config file (default: $TOKEN_PROXY_CONFIG, then ./proxy.toml)
    #[arg(long, global = true, value_name = "PATH")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default)
    Run,
    /// Validate the config, print a summary of routes and credentials, exit 0 or 2
    Check,
    /// Self-contained demo: embedded token server + upstream + proxy, short-lived tokens
    Demo,
    /// Print the [intercept] CA certificate (PEM) for the app's trust store (the CA is
    /// generated first if neither of its files exists yet)
    Ca,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Each proxied request holds two sockets; the common soft limit of 1024 descriptors
    // would cap a sidecar at ~500 concurrent requests. Raise it to the hard limit.
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    // The demo prints its own narrative; its log lines would only repeat it.
    let _log_guard = init_logging(if matches!(cli.command, Some(Command::Demo)) {
        "warn"
    } else {
        "info"
    });
    log_panics();
    // The main runtime runs what is not a proxied request (refreshers, the admin API,
    // reloads) on the main thread alone: that is plenty, and keeps a credential's
    // allocations and frees on one thread's heap. Each thread that allocates during the
    // start's burst of token fetches is left with partly used pages per size class
    // (`cargo bench --bench scale`, ten thousand credentials: a worker per core left
    // 0.3-0.5 KiB each more resident than one worker, and one worker beside the main thread
    // 0.3 KiB more than the main thread alone). Proxied requests have `server.workers`
    // threads of their own (src/workers.rs); config files are read and parsed on a blocking
    // thread at reload, so a large config does not stall the refreshers.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("token-proxy: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        #[cfg(feature = "demo")]
        Command::Demo => runtime.block_on(token_proxy::demo::run()),
        #[cfg(not(feature = "demo"))]
        Command::Demo => {
            eprintln!("token-proxy: this build has no demo (built without the `demo` feature)");
            ExitCode::from(2)
        }
        Command::Check => check(ConfigSource::resolve(cli.config)),
        Command::Ca => print_ca(ConfigSource::resolve(cli.config)),
        Command::Run => runtime.block_on(run(ConfigSource::resolve(cli.config))),
    }
}

/// mimalloc hands freed memory back to the OS a second after it is freed, but only when
/// something later asks it to purge. A sidecar that goes quiet after a burst (starting with
/// ten thousand credentials, a reload, a `/metrics` scrape of them) may never ask, and kept
/// the burst's pages resident for good: ~1 KiB per credential at rest, 15 MiB after one such
/// scrape (`cargo bench --bench scale`). A thread's exit always asks (freeing a large block
/// from a live thread did not, every time), so once a second a short-lived thread starts,
/// allocates a word and exits: without `unsafe`, what a periodic `mi_collect` would do, for
/// tens of microseconds a second. README "Performance", "Returning freed memory".
async fn return_freed_memory() {
    let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // A thread that cannot start (a pids limit) only means no purge this second.
        let _ = std::thread::Builder::new()
            .name("purge".into())
            .spawn(|| std::hint::black_box(Box::new(1u64)));
    }
}

fn load(source: &ConfigSource) -> Result<Config, ExitCode> {
    source.load().map_err(|e| {
        eprintln!("token-proxy: config error in {source}: {e}");
        ExitCode::from(2)
    })
}

fn check(source: ConfigSource) -> ExitCode {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(e) = token_proxy::check_deep(&config) {
        eprintln!("token-proxy: config error in {source}: {e}");
        return ExitCode::from(2);
    }
    print!("{}", summary(&source, &config));
    ExitCode::SUCCESS
}

/// `token-proxy ca`: the interception CA's certificate on stdout (never its key).
fn print_ca(source: ConfigSource) -> ExitCode {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let Some(settings) = &config.intercept else {
        eprintln!("token-proxy: config error in {source}: no [intercept] section (ca_cert_file, ca_key_file)");
        return ExitCode::from(2);
    };
    match token_proxy::intercept::open_ca(settings) {
        Ok(ca) => {
            print!("{}", ca.pem);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("token-proxy: {e}");
            ExitCode::from(1)
        }
    }
}

/// What `check` prints: the resolved routes and credentials, secrets masked.
fn summary(source: &ConfigSource, config: &Config) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = &config.server;
    let _ = writeln!(out, "config: {source}: ok");
    let _ = writeln!(
        out,
        "server: listen={} admin={} shutdown_grace={:?} shutdown_delay={:?} max_header_size={} workers={}",
        s.listen,
        s.admin_listen
            .map_or_else(|| "(none)".to_string(), |a| a.to_string()),
        s.shutdown_grace,
        s.shutdown_delay,
        s.max_header_size,
        s.workers
    );
    if let Some(shared) = &config.shared {
        let _ = writeln!(
            out,
            "shared: redis_url=*** key_prefix={} lock_ttl={:?} encryption={} tls_roots={}",
            shared.key_prefix,
            shared.lock_ttl,
            if shared.encryption_key.is_some() {
                "on"
            } else {
                "OFF"
            },
            if shared.ca_pem.is_some() {
                "ca_file"
            } else {
                "built-in"
            }
        );
        if shared.encryption_key.is_none() {
            let _ = writeln!(
                out,
                "warning: shared.encryption_key_file is not set: tokens are stored in Redis unencrypted"
            );
        }
    }
    let list = |v: &[String]| {
        if v.is_empty() {
            "(none)".to_string()
        } else {
            v.join(",")
        }
    };
    let _ = writeln!(
        out,
        "access: Host accepted = IP literals, localhost, allowed_hosts=[{}]; web pages refused unless allowed_origins=[{}]",
        list(&s.access.allowed_hosts),
        list(&s.access.allowed_origins)
    );
    for r in &config.routes {
        let upstream = format!(
            "{}://{}{}",
            r.upstream.scheme, r.upstream.authority, r.upstream.base_path
        );
        let _ = writeln!(
            out,
            "route {}: prefix={} hosts=[{}] -> {upstream} strip_prefix={} credential={} retry_on_401={} max_retry_body={} timeout={:?} connect_timeout={:?} idle_timeout={:?}{}{}{}",
            r.name,
            r.prefix.as_deref().unwrap_or("(none)"),
            r.hosts.join(","),
            r.strip_prefix,
            r.credential.as_deref().unwrap_or("(none)"),
            r.retry_on_401,
            r.max_retry_body,
            r.timeout,
            r.connect_timeout,
            r.idle_timeout,
            r.ca_file.as_ref().map(|p| format!(" ca_file={}", p.display())).unwrap_or_default(),
            if r.client_cert.is_some() { " client_cert=on" } else { "" },
            r.egress.as_ref().map(|e| format!(" egress_proxy={e:?}")).unwrap_or_default(),
        );
    }
    let mask = |set: bool| if set { "***" } else { "(none)" };
    if let Some(ic) = &config.intercept {
        let _ = match &ic.ca {
            Some(ca) => {
                let uncovered = token_proxy::intercept::uncovered_hosts(ca, &ic.hosts);
                let mut line = format!(
                    "intercept: ca={} (provided) can sign for {} leaf_lifetime={:?}",
                    ic.ca_cert_file.display(),
                    ca.describe_constraints(),
                    ic.leaf_lifetime
                );
                if !ca.constrained() {
                    line.push_str("\nwarning: the interception CA has no name constraints: whoever holds its key can impersonate any site to apps that trust it; prefer a generated CA (remove both files)");
                }
                if !uncovered.is_empty() {
                    line.push_str(&format!("\nwarning: the interception CA cannot sign for route hosts {uncovered:?} (made before those routes): CONNECT to them gets 403 until a new CA is made (remove both CA files and restart; apps must then trust the new CA)"));
                }
                writeln!(out, "{line}")
            }
            None => writeln!(
                out,
                "intercept: ca={} (generated at first start, name-constrained to [{}]) leaf_lifetime={:?}",
                ic.ca_cert_file.display(),
                ic.hosts.join(", "),
                ic.leaf_lifetime
            ),
        };
    }
    for c in config.credentials.values() {
        let endpoint = match c.endpoint() {
            Some(e) => format!(
                "token_url={} encoding={:?} client_id={} client_secret={} client_auth={:?} scope={} headers=[{}] ",
                e.token_url,
                e.encoding,
                e.client_id.as_deref().unwrap_or("(none)"),
                mask(e.client_secret.is_some()),
                e.client_auth,
                e.scope.as_deref().unwrap_or("(none)"),
                e.headers.iter().map(|(k, _)| format!("{k}=***")).collect::<Vec<_>>().join(","),
            ) + if c.client_cert.is_some() { "client_cert=on " } else { "" }
              + &c.egress.as_ref().map(|e| format!("egress_proxy={e:?} ")).unwrap_or_default()
              + &e.assertion.as_ref().map_or_else(String::new, |a| {
                format!(
                    "assertion=alg:{:?},kid:{},aud:{} ",
                    a.key.alg,
                    a.kid.as_deref().unwrap_or("(none)"),
                    a.audience.clone().unwrap_or_else(|| e.token_url.to_string())
                )
            }) + &c.dpop.as_ref().map_or_else(String::new, |d| {
                match &d.file {
                    Some(f) if f.exists() => format!("dpop=ES256,jkt:{},key:{} ", d.jkt, f.display()),
                    Some(f) => format!("dpop=ES256,key:generated at start into {} ", f.display()),
                    None => "dpop=ES256,key:generated at each start (saved tokens are fetched anew after a restart) ".into(),
                }
            }),
            None => String::new(),
        };
        let access_token = matches!(c.grant, token_proxy::config::GrantConfig::Static(_));
        let _ = writeln!(
            out,
            "credential {}: grant={} {endpoint}refresh_token={} initial_tokens={} access_token={} state_file={} shared={} refresh_before={:?} header={} verify={}",
            c.name,
            c.grant_name(),
            mask(c.refresh_token().is_some()),
            mask(c.initial_tokens().is_some()),
            mask(access_token),
            c.state_file.as_ref().map_or_else(|| "(none)".to_string(), |p| p.display().to_string()),
            c.shared,
            c.refresh_before,
            c.header,
            c.verify.as_ref().map_or_else(|| "off".to_string(), |v| format!("jwks={} issuer={:?} audience={:?}", v.jwks_url, v.issuer, v.audience)),
        );
    }
    out
}

async fn run(source: ConfigSource) -> ExitCode {
    let config = match load(&source) {
        Ok(c) => c,
        Err(code) => return code,
    };
    tokio::spawn(return_freed_memory());
    let mut watched = config.watched_files();
    // Before the listeners announce themselves: a signal sent as soon as the proxy says
    // "listening" must find its handler, not the default (which kills the process).
    let mut signals = match Signals::new() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("token-proxy: cannot install signal handlers: {e}");
            return ExitCode::from(1);
        }
    };
    let handle = match App::spawn(config).await {
        Ok(h) => h,
        Err(StartError::Config(e)) => {
            eprintln!("token-proxy: config error: {e}");
            return ExitCode::from(2);
        }
        Err(StartError::Runtime(e)) => {
            eprintln!("token-proxy: {e}");
            return ExitCode::from(1);
        }
    };
    // Reload on SIGHUP, and when the config or a file it names changes (polled: Kubernetes
    // swaps mounted ConfigMaps and Secrets through a `..data` symlink).
    let mut seen = fingerprint_files(&watched);
    let mut poll = tokio::time::interval(WATCH_EVERY);
    poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let cause = tokio::select! {
            reason = handle.failed() => {
                tracing::error!(%reason, "exiting after a fatal error");
                return ExitCode::from(1);
            }
            _ = signals.term.recv() => break,
            _ = signals.int.recv() => break,
            _ = signals.hangup.recv() => "SIGHUP",
            _ = poll.tick() => {
                let now = fingerprint_files(&watched);
                if now == seen {
                    continue;
                }
                "a watched file changed"
            }
        };
        let loading = source.clone();
        let loaded = match tokio::task::spawn_blocking(move || loading.load()).await {
            Ok(loaded) => loaded,
            Err(e) => Err(token_proxy::config::ConfigError(format!(
                "reading the config failed: {e}"
            ))),
        };
        match loaded {
            Err(e) => {
                tracing::error!(cause, error = %e, "reload rejected; the running config stays in force")
            }
            Ok(new) => {
                let files = new.watched_files();
                match handle.reload(new).await {
                    Ok(summary) => {
                        tracing::info!(cause, %summary, "config reloaded");
                        watched = files;
                    }
                    Err(e) => {
                        tracing::error!(cause, error = %e, "reload rejected; the running config stays in force")
                    }
                }
            }
        }
        seen = fingerprint_files(&watched);
    }
    tracing::info!("shutting down: finishing in-flight requests");
    handle.stop().await;
    tracing::info!("stopped");
    ExitCode::SUCCESS
}

/// Panics go to the log at `error` (with where they happened), not just to raw stderr, so
/// log pipelines and alerts see them.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        tracing::error!(panic = %message, %location, "panic");
    }));
}

/// How often the config and the files it names are checked for changes.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// The signals the proxy acts on.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

/// `TOKEN_PROXY_LOG` is the filter (default `info`, `warn` for the demo); `TOKEN_PROXY_LOG_FORMAT=json` for JSON.
/// Lines are written by a background thread, so a request never waits on stderr; the
/// returned guard flushes what is queued when dropped (at exit).
fn init_logging(default_filter: &str) -> tracing_appender::non_blocking::WorkerGuard {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("TOKEN_PROXY_LOG")
        .unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Not lossy: under a burst, requests slow down rather than log lines vanish. The
    // writer thread flushes whenever it has drained the queue, so buffering costs no delay
    // when idle and turns a burst of lines into a few writes instead of one per line.
    // The queue holds 16,384 lines (a third of a second of request lines at 50,000 req/s):
    // the library's default of 128,000 is a 4 MiB array, written in full at start, so
    // a third of an idle sidecar's memory.
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .buffered_lines_limit(16_384)
        .lossy(false)
        .finish(std::io::BufWriter::with_capacity(
            64 * 1024,
            std::io::stderr(),
        ));
    let ansi = std::io::stderr().is_terminal();
    let json =
        std::env::var("TOKEN_PROXY_LOG_FORMAT").is_ok_and(|f| f.eq_ignore_ascii_case("json"));
    if !ansi {
        // The request line, written by hand in the same format (see access_log).
        token_proxy::access_log::install(writer.clone(), json);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
    guard
}

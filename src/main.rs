//! The `payrail` command: `serve` runs the API with its actors; `migrate` applies migrations.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// mimalloc instead of glibc's allocator: a payment's path allocates small objects on many
/// threads (requests, actors, JSON), where glibc spent a quarter of the split-payment mix's CPU
/// (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use payrail::adapters::postgres::Db;
use payrail::app::Application;
use payrail::config::{Config, LogFormat};

#[derive(Parser)]
#[command(name = "payrail", version, about = "An actor-based payment orchestrator")]
struct Cli {
    /// The configuration file; PAYRAIL__SECTION__KEY variables override it.
    #[arg(long, global = true, default_value = "config.toml")]
    config: PathBuf,
    /// Log format (overrides [log] format).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API, the payment actors and the embedded sandbox PSP.
    Serve,
    /// Create the database if it is missing and apply migrations.
    Migrate,
    /// Load against a running payrail (and, with --compare-postgres, the PostgreSQL ceiling).
    Loadgen(payrail::loadgen::LoadgenArgs),
    /// Reconcile a PSP settlement report against a running payrail (streams the file to
    /// `POST /admin/v1/reconciliation/runs` and prints the run).
    Reconcile {
        /// The connector whose report it is (`mca_…`).
        #[arg(long)]
        connector: String,
        /// The report, a CSV file.
        #[arg(long)]
        file: PathBuf,
        /// `stripe` (balance transactions) or `adyen` (Settlement Details Report); default: the connector's PSP.
        #[arg(long)]
        format: Option<String>,
        /// The report's day (YYYY-MM-DD); default: the day of its latest line.
        #[arg(long)]
        date: Option<String>,
        /// payrail's base URL; default: the configured bind address.
        #[arg(long)]
        url: Option<String>,
    },
    /// Ledger tools.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
}

#[derive(Subcommand)]
enum LedgerCommand {
    /// Print Σ debit − Σ credit per currency and every account whose stored balance differs
    /// from the sum of its entries; exit non-zero on any violation.
    Verify,
}

async fn ledger_verify(config: &Config) -> ExitCode {
    let report = match Db::connect(&config.database).await {
        Ok(db) => db.verify_ledger().await.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("payrail ledger verify: {e}");
            return ExitCode::from(2);
        }
    };
    println!("journals: {}, entries: {}", report.journals, report.entries);
    for (currency, d) in &report.imbalance_by_currency {
        println!("{currency}: debit - credit = {d}");
    }
    for (account, currency, sd, sc, ed, ec) in &report.mismatched_accounts {
        println!("MISMATCH {account} {currency}: stored debit {sd} credit {sc}, entries debit {ed} credit {ec}");
    }
    for j in &report.unbalanced_journals {
        println!("UNBALANCED journal {j}");
    }
    for j in &report.orphan_entries {
        println!("ORPHAN entries of journal {j}, which does not exist");
    }
    if report.is_clean() {
        println!("ledger verify: clean");
        ExitCode::SUCCESS
    } else {
        println!("ledger verify: VIOLATIONS FOUND");
        ExitCode::FAILURE
    }
}

async fn reconcile(
    config: &Config,
    connector: String,
    file: PathBuf,
    format: Option<String>,
    date: Option<String>,
    url: Option<String>,
) -> ExitCode {
    let base = url.unwrap_or_else(|| {
        let bind: std::net::SocketAddr = config
            .server
            .bind
            .parse()
            .unwrap_or_else(|_| ([127, 0, 0, 1], 8080).into());
        config.server.public_url_for(bind)
    });
    let mut query = vec![("connector_id", connector)];
    query.extend(format.map(|f| ("format", f)));
    query.extend(date.map(|d| ("date", d)));
    let file = match std::fs::File::open(&file) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("payrail reconcile: {}: {e}", file.display());
            return ExitCode::from(2);
        }
    };
    // The file goes out in 256 KiB pieces: never whole in memory.
    let body = futures_util::stream::unfold(file, |mut f| async move {
        use std::io::Read;
        let mut buf = vec![0u8; 256 << 10];
        match f.read(&mut buf) {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok::<_, std::io::Error>(actix_web::web::Bytes::from(buf)), f))
            }
            Err(e) => Some((Err(e), f)),
        }
    });
    let client = awc::Client::builder()
        .timeout(std::time::Duration::from_secs(3600))
        .finish();
    let request = match client
        .post(format!("{}/admin/v1/reconciliation/runs", base.trim_end_matches('/')))
        .query(&query)
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("payrail reconcile: {e}");
            return ExitCode::from(2);
        }
    };
    let sent = request
        .bearer_auth(&config.admin.token)
        .content_type("text/csv")
        .send_stream(body)
        .await;
    let mut response = match sent {
        Ok(r) => r,
        Err(e) => {
            eprintln!("payrail reconcile: {base}: {e}");
            return ExitCode::FAILURE;
        }
    };
    let body = response.body().limit(1 << 20).await.unwrap_or_default();
    println!("{}", String::from_utf8_lossy(&body));
    if response.status().is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn init_tracing(config: &Config, format: Option<LogFormat>) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format.unwrap_or(config.log.format) {
        LogFormat::Json => builder.json().init(),
        LogFormat::Pretty => builder.init(),
    }
}

#[actix_web::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("payrail: {e}");
            return ExitCode::from(2);
        }
    };
    init_tracing(&config, cli.log_format);
    match cli.command {
        Command::Serve => {
            let bind = config.server.bind.clone();
            let app = match Application::build(config).await {
                Ok(app) => app,
                Err(e) => {
                    tracing::error!(error = %e, "payrail could not start");
                    return ExitCode::FAILURE;
                }
            };
            tracing::info!(address = %bind, port = app.port(), "payrail listening");
            match app.run_until_stopped().await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "server stopped");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Ledger {
            command: LedgerCommand::Verify,
        } => ledger_verify(&config).await,
        Command::Reconcile {
            connector,
            file,
            format,
            date,
            url,
        } => reconcile(&config, connector, file, format, date, url).await,
        Command::Loadgen(args) => match payrail::loadgen::run(args, &config.database.url).await {
            Ok(_) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("payrail loadgen: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Migrate => {
            let result = async {
                let db = Db::connect(&config.database).await?;
                db.migrate().await
            }
            .await;
            match result {
                Ok(applied) => {
                    tracing::info!(?applied, "migrations up to date");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %e, "migrate failed");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

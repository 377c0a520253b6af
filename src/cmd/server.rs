//! `tandem server`: run the management server; `tandem server bench-checkin` (hidden) is
//! the load generator of `bench/checkin/`.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::output::Global;

mod bench;

/// Arguments of `tandem server`.
#[derive(Debug, clap::Args)]
pub struct ServerArgs {
    /// Data directory: keys, SQLite database, chunk store.
    #[arg(
        long,
        env = "TANDEM_SERVER_DATA",
        default_value = "/var/lib/tandem-server"
    )]
    data: PathBuf,
    /// Address to listen on; port 0 picks a free port (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: String,
    /// Metadata database: `postgres://user@host:port/db` (default: SQLite in the data dir).
    #[arg(long, env = "TANDEM_DATABASE_URL", hide_env_values = true)]
    database: Option<String>,
    /// Also write the bound URL to this file once listening (for scripts).
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Key that seals escrowed user-disk keys; keep it off the data volume (default:
    /// `<data>.escrow.key`, beside the data directory, created on first start).
    #[arg(long, env = "TANDEM_ESCROW_KEY_FILE")]
    escrow_key_file: Option<PathBuf>,
    /// Write the first admin credential to this new file (mode 0600) instead of stdout,
    /// so it never lands in a service journal.
    #[arg(long)]
    admin_token_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<ServerCommand>,
}

#[derive(Debug, clap::Subcommand)]
enum ServerCommand {
    /// Create another admin credential (e.g. when the first one is lost); needs the data
    /// directory and database, not a running server.
    AdminToken {
        /// Name of the new credential (shown in the audit log as `admin:<name>`).
        #[arg(long)]
        name: String,
    },
    /// Load generator: N simulated devices checking in concurrently (bench/checkin).
    #[command(hide = true)]
    BenchCheckin(bench::BenchArgs),
}

/// Runs `tandem server`.
pub fn run(args: ServerArgs, global: &Global) -> anyhow::Result<u8> {
    match args.command {
        Some(ServerCommand::BenchCheckin(b)) => bench::run(b, global),
        Some(ServerCommand::AdminToken { ref name }) => {
            let name = name.clone();
            crate::output::block_on(admin_token(args, name))?
        }
        None => crate::output::block_on(serve(args))?,
    }
}

async fn open(args: &ServerArgs) -> anyhow::Result<tandem_server::Server> {
    let database = args
        .database
        .as_deref()
        .map(tandem_db::DatabaseUrl::parse)
        .transpose()?;
    tandem_server::Server::open(tandem_server::ServerConfig {
        data_dir: args.data.clone(),
        database,
        escrow_key_file: args.escrow_key_file.clone(),
    })
    .await
    .with_context(|| format!("opening the server with data in {}", args.data.display()))
}

async fn admin_token(args: ServerArgs, name: String) -> anyhow::Result<u8> {
    let server = open(&args).await?;
    if let Some(first) = &server.first_admin_token {
        // A brand-new data directory: the first credential is the answer.
        println!("{}", first.0);
        return Ok(crate::exit::SUCCESS);
    }
    let token = tandem_server::create_admin(&server.state, &name, "server-cli")
        .await
        .with_context(|| format!("creating admin credential {name:?}"))?;
    eprintln!("tandem: admin credential {name:?} created; it is shown only once");
    println!("{}", token.0);
    Ok(crate::exit::SUCCESS)
}

async fn serve(args: ServerArgs) -> anyhow::Result<u8> {
    let server = open(&args).await?;
    let listener = tokio::net::TcpListener::bind(&args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let addr = listener.local_addr()?;
    let url = format!("http://{addr}");
    if let Some(token) = &server.first_admin_token {
        match &args.admin_token_file {
            Some(path) => {
                write_secret_file(path, &token.0)?;
                eprintln!(
                    "tandem: first start: the admin credential was written to {} (mode 0600); \
                     move it somewhere safe",
                    path.display()
                );
            }
            None => {
                eprintln!(
                    "tandem: first start: created the admin credential below. It is shown only once; \
                     store it safely (pass it as --token or TANDEM_ADMIN_TOKEN to `tandem admin`). \
                     Use --admin-token-file to keep it out of logs."
                );
                println!("admin token: {}", token.0);
            }
        }
    }
    println!("listening on {url}");
    if let Some(f) = &args.ready_file {
        std::fs::write(f, format!("{url}\n"))
            .with_context(|| format!("writing {}", f.display()))?;
    }
    tracing::info!(%addr, "server listening");
    tandem_server::serve(server, listener, shutdown_signal()).await?;
    eprintln!("tandem: server stopped");
    Ok(crate::exit::SUCCESS)
}

/// Creates `path` (never overwriting) with mode 0600 holding `secret`.
fn write_secret_file(path: &std::path::Path, secret: &str) -> anyhow::Result<()> {
    tandem_tools::atomic::write_new(path, format!("{secret}\n").as_bytes(), 0o600).with_context(
        || {
            format!(
                "creating admin token file {} (it must not exist yet)",
                path.display()
            )
        },
    )
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

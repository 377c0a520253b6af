//! The `tandem` binary: parse the command line, set up logging, dispatch to one library
//! crate, print the result for people (or as JSON), map errors to exit codes.

mod cmd;
mod exit;
mod output;

use clap::{Parser, Subcommand};

/// Tandem: a corporate and a personal desktop on one laptop, managed from one server.
#[derive(Debug, Parser)]
#[command(name = "tandem", version, about, long_about = None, after_help = exit::HELP)]
struct Cli {
    /// More log output (-v info, -vv debug, -vvv trace); TANDEM_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors on stderr; no progress bars.
    #[arg(short, long, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole Tandem story on this machine, narrated.
    Demo(cmd::demo::DemoArgs),
    /// Build the test and demo guest (kernel, initramfs, ext4 roots).
    Guest(cmd::guest::GuestArgs),
    /// Run, start, stop and inspect QEMU virtual machines.
    Vm(cmd::vm::VmArgs),
    /// The laptop's corporate and personal desktops.
    Desktop(cmd::desktop::DesktopArgs),
    /// Publish, pull, list and serve gold image versions.
    Image(cmd::image::ImageArgs),
    /// Check and garbage-collect a chunk store.
    Store(cmd::store::StoreArgs),
    /// Run the management server.
    Server(cmd::server::ServerArgs),
    /// The laptop agent: enroll, run, status, backup.
    Agent(cmd::agent::AgentArgs),
    /// Fleet administration against a running server.
    Admin(cmd::admin::AdminArgs),
    /// Scan VM disks for malware without booting them.
    Scan(cmd::scan::ScanArgs),
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::ERROR
            } else {
                exit::SUCCESS
            };
            let _ = e.print();
            return std::process::ExitCode::from(code);
        }
    };
    output::init_logging(cli.verbose, cli.quiet);
    let global = output::Global { quiet: cli.quiet };
    let result = match cli.command {
        Command::Demo(a) => cmd::demo::run(a, &global),
        Command::Guest(a) => cmd::guest::run(a, &global),
        Command::Vm(a) => cmd::vm::run(a, &global),
        Command::Desktop(a) => cmd::desktop::run(a, &global),
        Command::Image(a) => cmd::image::run(a, &global),
        Command::Store(a) => cmd::store::run(a, &global),
        Command::Server(a) => cmd::server::run(a, &global),
        Command::Agent(a) => cmd::agent::run(a, &global),
        Command::Admin(a) => cmd::admin::run(a, &global),
        Command::Scan(a) => cmd::scan::run(a, &global),
    };
    match result {
        Ok(code) => std::process::ExitCode::from(code),
        Err(err) => {
            output::print_error(&err);
            std::process::ExitCode::from(exit::ERROR)
        }
    }
}

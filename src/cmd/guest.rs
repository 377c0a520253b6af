//! `tandem guest`: build the test and demo guest.

use std::path::PathBuf;

use anyhow::Context as _;

use crate::output::{print_json, Global};

/// Arguments of `tandem guest`.
#[derive(Debug, clap::Args)]
pub struct GuestArgs {
    #[command(subcommand)]
    command: GuestCommand,
}

#[derive(Debug, clap::Subcommand)]
enum GuestCommand {
    /// Build the kernel, initramfs and root disks (cached by content).
    Build {
        /// Output directory.
        #[arg(
            long,
            env = "TANDEM_GUEST_DIR",
            default_value = "/var/cache/tandem/guest"
        )]
        out: PathBuf,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Build one extra ext4 root disk with its own release marker and boot script.
    Rootfs {
        /// The image file to write.
        #[arg(long)]
        out: PathBuf,
        /// Text of /etc/tandem-release.
        #[arg(long)]
        release: String,
        /// A shell script run at every boot (/etc/tandem/boot.sh).
        #[arg(long)]
        boot_script: Option<PathBuf>,
        /// Size in MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: u64,
    },
}

/// Builds (or loads from the cache) the guest in `out`, narrating on stderr.
pub fn build_guest(
    out: &std::path::Path,
    quiet: bool,
) -> anyhow::Result<tandem_guest::GuestAssets> {
    tandem_guest::build(out, &mut |step| {
        if !quiet {
            eprintln!("guest: {step}");
        }
    })
    .with_context(|| format!("building the guest in {}", out.display()))
}

/// Runs `tandem guest`.
pub fn run(args: GuestArgs, global: &Global) -> anyhow::Result<u8> {
    match args.command {
        GuestCommand::Build { out, json } => {
            let assets = build_guest(&out, global.quiet || json)?;
            if json {
                print_json(&assets)?;
            } else {
                println!(
                    "kernel   {} ({})",
                    assets.kernel.display(),
                    assets.kernel_package
                );
                println!("initrd   {}", assets.initrd.display());
                for (name, path) in &assets.images {
                    println!("{name:<8} {}", path.display());
                }
            }
        }
        GuestCommand::Rootfs {
            out,
            release,
            boot_script,
            size_mib,
        } => {
            let boot_script = boot_script
                .map(|p| {
                    std::fs::read_to_string(&p)
                        .with_context(|| format!("reading boot script {}", p.display()))
                })
                .transpose()?;
            let spec = tandem_guest::RootImageSpec {
                release,
                boot_script,
                size_mib,
                payload: Vec::new(),
            };
            tandem_guest::build_root_image(&spec, &out)
                .with_context(|| format!("building root disk {}", out.display()))?;
            println!("{}", out.display());
        }
    }
    Ok(crate::exit::SUCCESS)
}

//! `tandem store`: verify and garbage-collect a chunk store (server data dir or laptop dir).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;

use crate::exit;
use crate::output::{print_json, Global};

/// Arguments of `tandem store`.
#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    #[command(subcommand)]
    command: StoreCommand,
}

#[derive(Debug, clap::Subcommand)]
enum StoreCommand {
    /// Read back and verify every chunk; name damaged ones (exit 1) and drop them so the
    /// next pull fetches them again.
    Check(Place),
    /// Delete chunks no version references and compact packs.
    Gc(GcArgs),
    /// Chunk and byte counts.
    Stats(Place),
}

#[derive(Debug, clap::Args)]
struct Place {
    /// Server data directory.
    #[arg(long, conflicts_with = "dir", required_unless_present = "dir")]
    data: Option<PathBuf>,
    /// Laptop directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON document.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct GcArgs {
    #[command(flatten)]
    place: Place,
    /// Keep unreferenced chunks younger than this many seconds (uploads in flight).
    #[arg(long, default_value_t = 3600)]
    grace_secs: u64,
}

struct Opened {
    store: std::sync::Arc<tandem_store::Store>,
    catalog: tandem_sync::Catalog,
    trusted: Vec<tandem_proto::PublicKey>,
}

fn open(p: &Place) -> anyhow::Result<Opened> {
    match (&p.data, &p.dir) {
        (Some(data), _) => {
            let keys = tandem_server::keys::ServerKeys::load_or_create(data)?;
            Ok(Opened {
                store: std::sync::Arc::new(
                    tandem_store::Store::open(&data.join("store"))
                        .with_context(|| format!("opening chunk store in {}", data.display()))?,
                ),
                catalog: tandem_sync::Catalog::new(&data.join("images")),
                trusted: vec![keys.image.public()],
            })
        }
        (None, Some(dir)) => {
            let local = tandem_agent::images::open_local(&tandem_agent::AgentDir::new(dir))
                .with_context(|| format!("opening laptop store in {}", dir.display()))?;
            Ok(Opened {
                store: local.store,
                catalog: local.catalog,
                trusted: local.trusted,
            })
        }
        (None, None) => anyhow::bail!("pass --data DIR (server) or --dir DIR (laptop)"),
    }
}

/// Runs `tandem store`.
pub fn run(args: StoreArgs, global: &Global) -> anyhow::Result<u8> {
    match args.command {
        StoreCommand::Check(p) => {
            let o = open(&p)?;
            let pb = global
                .progress(p.json)
                .then(|| indicatif::ProgressBar::new(0));
            let report = o.store.check(&|done, total| {
                if let Some(b) = &pb {
                    b.set_length(total);
                    b.set_position(done);
                }
            })?;
            if let Some(b) = pb {
                b.finish_and_clear();
            }
            // Versions that now lack chunks.
            let mut incomplete = Vec::new();
            for img in o.catalog.list()? {
                for v in img.versions {
                    let (m, _) = o.catalog.load(&img.name, v, &o.trusted)?;
                    let ids: Vec<_> = m.chunk_set().into_iter().collect();
                    let missing = o.store.contains_many(&ids)?.iter().filter(|h| !**h).count();
                    if missing > 0 {
                        incomplete.push(serde_json::json!({"name": img.name, "version": v, "missing_chunks": missing}));
                    }
                }
            }
            let bad = !report.damaged.is_empty() || !incomplete.is_empty();
            if p.json {
                print_json(&serde_json::json!({
                    "verified": report.verified,
                    "damaged": report.damaged,
                    "incomplete_versions": incomplete,
                }))?;
            } else {
                println!("{} chunks verified", report.verified);
                for d in &report.damaged {
                    println!(
                        "DAMAGED chunk {} in {} at offset {}: {}",
                        d.chunk, d.pack, d.offset, d.reason
                    );
                }
                for i in &incomplete {
                    println!(
                        "INCOMPLETE {} v{}: {} chunks missing; pull it again",
                        i["name"], i["version"], i["missing_chunks"]
                    );
                }
            }
            Ok(if bad { exit::FINDING } else { exit::SUCCESS })
        }
        StoreCommand::Gc(a) => {
            let o = open(&a.place)?;
            // Lock first, then mark: a manifest or backup committed while the live set is
            // computed would otherwise lose chunks it just referenced.
            let lock = o.store.gc_lock().context(
                "the store is being written (a publish, pull or backup is running); run gc again when it is done",
            )?;
            let mut live = o.catalog.live_chunks(&o.trusted)?;
            if let Some(data) = &a.place.data {
                // Backups from before per-user stores name chunks of the shared store.
                live.extend(tandem_server::backups::BackupService::live_chunks(data)?);
            }
            let r = o
                .store
                .gc_locked(&lock, &live, Duration::from_secs(a.grace_secs))?;
            if a.place.json {
                print_json(&r)?;
            } else {
                println!(
                    "removed {} chunks; {} packs rewritten, {} deleted; {} bytes freed",
                    r.removed_chunks, r.packs_rewritten, r.packs_deleted, r.bytes_freed
                );
            }
            Ok(exit::SUCCESS)
        }
        StoreCommand::Stats(p) => {
            let o = open(&p)?;
            let s = o.store.stats()?;
            if p.json {
                print_json(&s)?;
            } else {
                println!(
                    "{} chunks, {} bytes plain, {} bytes stored, {} packs ({} bytes)",
                    s.chunks, s.raw_bytes, s.stored_bytes, s.packs, s.pack_bytes
                );
            }
            Ok(exit::SUCCESS)
        }
    }
}

//! Writes every target's seed corpus into `DIR/<target>/` (`seeds DIR`), or lists the
//! targets (`seeds --list`, what `scripts/fuzz.sh` runs).
fn main() {
    let Some(arg) = std::env::args_os().nth(1) else {
        eprintln!("usage: seeds DIR | seeds --list");
        std::process::exit(2);
    };
    if arg == "--list" {
        for t in tandem_fuzz::TARGETS {
            println!("{}", t.name);
        }
        return;
    }
    if let Err(e) = tandem_fuzz::seeds::write_all(std::path::Path::new(&arg)) {
        eprintln!("seeds: {e}");
        std::process::exit(1);
    }
}

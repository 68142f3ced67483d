//! Benchmarks that print figures: `tmem-bench store` (the page store alone) and
//! `tmem-bench device` (a daemon driven over its vhost-user socket).

use clap::Parser;
use vhost_user_tmem::bench::BenchCommand;

fn main() {
    let cmd = BenchCommand::parse();
    if let Err(e) = cmd.run() {
        eprintln!("tmem-bench: {}", vhost_user_tmem::error_chain(&*e));
        std::process::exit(1);
    }
}

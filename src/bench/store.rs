//! `tmem-bench store`. PLACEHOLDER until issue 2 lands.

use std::path::PathBuf;

#[derive(Debug, clap::Args)]
pub struct StoreArgs {
    #[arg(long)]
    pub corpus: PathBuf,
}

pub fn run(_args: &StoreArgs) -> Result<(), Box<dyn std::error::Error>> {
    Err("tmem-bench store is not implemented yet".into())
}

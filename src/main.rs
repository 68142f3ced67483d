//! `vhost-user-tmem`: the daemon. Parse, validate, run; see `daemon`.

use clap::Parser;
use vhost_user_tmem::{config::Args, config::Config, daemon, error_chain};

fn main() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let result = Config::try_from(Args::parse()).map_err(|e| Box::new(e) as Box<dyn std::error::Error>);
    if let Err(e) = result.and_then(|config| daemon::run(config).map_err(Into::into)) {
        eprintln!("vhost-user-tmem: {}", error_chain(&*e));
        std::process::exit(1);
    }
}

//! `fspf run`: placeholder until the preload shield lands.
use clap::Args;

#[derive(Args, Debug)]
pub struct RunArgs {
    #[arg(trailing_var_arg = true, required = true)]
    pub argv: Vec<String>,
}

pub fn run(_a: RunArgs) -> anyhow::Result<i32> {
    anyhow::bail!("fspf run is not built yet")
}

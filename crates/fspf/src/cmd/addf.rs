//! `fspf addf FSPF EMBEDPOINT SOURCE_DIR [OUTPUT_DIR]`
use crate::KeyTagArgs;
use anyhow::Result;
use clap::Args;
use fspf_core::volume::ImportOptions;
use fspf_core::{EmbedPath, Volume};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct AddfArgs {
    pub fspf: PathBuf,
    pub embed_point: String,
    pub source_dir: PathBuf,
    /// where ciphertext (encrypted regions) or a plaintext copy (authenticated) is written
    pub output_dir: Option<PathBuf>,
    #[command(flatten)]
    pub kt: KeyTagArgs,
}

pub fn run(a: AddfArgs) -> Result<i32> {
    let embed_point = EmbedPath::parse(&a.embed_point)?;
    let _lock = Volume::lock(&a.fspf)?;
    let mut v = a.kt.open_for_update(&a.fspf)?;
    let bar = if std::io::stderr().is_terminal() {
        let (bytes, _) = Volume::import_size(&a.source_dir);
        let b = ProgressBar::with_draw_target(Some(bytes), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} ({bytes_per_sec})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let opts = ImportOptions {
        embed_point,
        source: a.source_dir.clone(),
        output: a.output_dir.clone(),
    };
    let report = v.import(&opts, &|n| bar.inc(n));
    bar.finish_and_clear();
    let report = report?;
    for (p, why) in &report.skipped {
        eprintln!("fspf: skipped {}: {why}", p.display());
    }
    println!(
        "Added files to file system protection file {} new AES-GCM tag: {}",
        a.fspf.display(),
        v.tag()
    );
    Ok(0)
}

//! `fspf`: the command line. Parses flags once into validated values and calls fspf-core; all the
//! work happens in the library. One module per sub-command under `cmd/`.
#![forbid(unsafe_code)]

mod anchor;
mod argv;
mod cmd;
mod image;
mod mount;
mod run;

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "fspf",
    version,
    about = "Transparent file protection: regions, keys and per-file metadata in an fspf"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Key and expected tag of an existing fspf. `Debug` redacts the key (P10).
#[derive(Args, Clone, Default)]
pub struct KeyTagArgs {
    /// file holding the key (hex, or the line printed by `fspf encrypt`); `-` reads it from stdin
    #[arg(long, value_name = "PATH", group = "key_source")]
    pub key_file: Option<PathBuf>,
    /// read the key (hex, or the `fspf encrypt` line) from the inherited file descriptor N
    #[arg(long, value_name = "N", group = "key_source")]
    pub key_fd: Option<u32>,
    /// fspf key as 64 hex digits; visible to other users in /proc/PID/cmdline, prefer
    /// --key-file or --key-fd (also SCONE_FSPF_KEY, which applies to the fspf SCONE_FSPF names,
    /// or to any fspf when SCONE_FSPF is unset)
    #[arg(long, value_name = "HEX", group = "key_source")]
    pub key: Option<String>,
    /// expected fspf tag (or SCONE_FSPF_TAG, like SCONE_FSPF_KEY): an older or replaced fspf is
    /// refused
    #[arg(long, value_name = "HEX")]
    pub tag: Option<String>,
}

impl std::fmt::Debug for KeyTagArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyTagArgs")
            .field("key", &self.key.as_ref().map(|_| "**redacted**"))
            .field("key_file", &self.key_file)
            .field("key_fd", &self.key_fd)
            .field("tag", &self.tag)
            .finish()
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create an empty file system protection file
    Create {
        fspf: PathBuf,
        /// format version (only 1 exists)
        version: Option<String>,
        /// replace an existing file
        #[arg(long)]
        force: bool,
    },
    /// Add a region
    Addr(cmd::addr::AddrArgs),
    /// Add the files of SOURCE_DIR under EMBEDPOINT
    Addf(cmd::addf::AddfArgs),
    /// Encrypt the fspf with a fresh random key (rotates the key if already encrypted)
    Encrypt {
        fspf: PathBuf,
        #[command(flatten)]
        kt: KeyTagArgs,
    },
    /// Show the tag, or the regions and files
    Show(cmd::show::ShowArgs),
    /// Check every listed file on disk; exit 1 on any problem
    Verify {
        fspf: PathBuf,
        #[command(flatten)]
        kt: KeyTagArgs,
        /// print findings as JSON
        #[arg(long)]
        json: bool,
        /// first remove leftovers of interrupted writers (uncommitted shadows, fspf temporaries,
        /// unreferenced trees) and roll committed shadows forward; needs the tag like an update
        #[arg(long)]
        clean: bool,
    },
    /// Write one file's verified plaintext to stdout
    Cat {
        fspf: PathBuf,
        embed_path: String,
        #[command(flatten)]
        kt: KeyTagArgs,
    },
    /// Restore the verified plaintext tree below EMBEDPOINT into OUTDIR
    Export {
        fspf: PathBuf,
        embed_point: String,
        outdir: PathBuf,
        #[command(flatten)]
        kt: KeyTagArgs,
    },
    /// Create a one-region encrypted or authenticated volume in a directory
    CreateVolume(cmd::volume::CreateVolumeArgs),
    /// Run a program under the in-process shield (LD_PRELOAD)
    Run(run::RunArgs),
    /// Mount the fspf's namespace (or one region) with FUSE: any program, static or not, sees
    /// plaintext there
    Mount(mount::MountArgs),
    /// Commit, unmount an `fspf mount` and print the final tag (when mutable)
    Umount(mount::UmountArgs),
    /// Protect a container image (OCI or docker archive) in one command; verify one; the
    /// protected image's entrypoint
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// (internal) exec a program through the shield: used by `fspf run`
    #[command(name = run::EXEC_SHIELDED, hide = true)]
    ExecShielded {
        #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
        argv: Vec<String>,
    },
}

/// The key as given on the command line (`--key HEX`, or `fspf show FSPF KEY`), if any.
fn key_in_argv(c: &Command) -> Option<&str> {
    let kt = match c {
        Command::Encrypt { kt, .. }
        | Command::Verify { kt, .. }
        | Command::Cat { kt, .. }
        | Command::Export { kt, .. } => kt,
        Command::Addr(a) => &a.kt,
        Command::Addf(a) => &a.kt,
        Command::Run(a) => &a.kt,
        Command::Mount(a) => &a.kt,
        Command::Show(a) => return a.key_pos.as_deref().or(a.key.as_deref()),
        Command::Image(image::ImageCommand::Verify(a)) => &a.kt,
        Command::Create { .. }
        | Command::Image(_)
        | Command::CreateVolume(_)
        | Command::ExecShielded { .. }
        | Command::Umount(_) => return None,
    };
    kt.key.as_deref()
}

fn main() {
    let cli = Cli::parse();
    if let Some(k) = key_in_argv(&cli.command).filter(|k| !k.trim().is_empty()) {
        eprintln!("fspf: warning: the key is visible to other users in /proc/PID/cmdline; use --key-file PATH, --key-file - (stdin) or --key-fd N");
        // Hidden from here on, for a long `fspf run` above all; it was visible until now.
        if let Err(e) = argv::scrub(k) {
            eprintln!("fspf: warning: could not hide the key in /proc/PID/cmdline: {e}");
        }
    }
    let res = match cli.command {
        Command::Create {
            fspf,
            version,
            force,
        } => cmd::create(&fspf, version.as_deref(), force),
        Command::Addr(a) => cmd::addr::run(a),
        Command::Addf(a) => cmd::addf::run(a),
        Command::Encrypt { fspf, kt } => cmd::encrypt(&fspf, &kt),
        Command::Show(a) => cmd::show::run(a),
        Command::Verify {
            fspf,
            kt,
            json,
            clean,
        } => cmd::verify(&fspf, &kt, json, clean),
        Command::Cat {
            fspf,
            embed_path,
            kt,
        } => cmd::cat(&fspf, &embed_path, &kt),
        Command::Export {
            fspf,
            embed_point,
            outdir,
            kt,
        } => cmd::export(&fspf, &embed_point, &outdir, &kt),
        Command::CreateVolume(a) => cmd::volume::run(a),
        Command::Run(a) => run::run(a),
        Command::Mount(a) => mount::mount(a),
        Command::Umount(a) => mount::umount(a),
        Command::Image(c) => image::run(c),
        Command::ExecShielded { argv } => run::exec_shielded(&argv),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("fspf: error: {}", error_message(&e));
            std::process::exit(1);
        }
    }
}

/// The error and its causes joined by ": ", skipping a cause whose text the message already
/// holds (fspf-core's `Io` errors print their source themselves, so `{:#}` would repeat it).
pub(crate) fn error_message(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: `Debug` of the parsed command line (derived) printed `--key` / `KEY` values.
    #[test]
    fn parsed_args_debug_showed_the_key() {
        let key = "ab".repeat(32);
        for argv in [
            vec!["fspf", "cat", "f.pb", "/x", "--key", &key],
            vec!["fspf", "verify", "f.pb", "--key", &key, "--tag", "00"],
            vec!["fspf", "addf", "f.pb", "/x", "src", "--key", &key],
            vec!["fspf", "show", "f.pb", &key],
            vec!["fspf", "show", "f.pb", "--key", &key],
        ] {
            let cli = Cli::try_parse_from(&argv).expect("parses");
            let dbg = format!("{cli:?}");
            assert!(!dbg.contains(&key[..16]), "{argv:?}: {dbg}");
        }
    }
}

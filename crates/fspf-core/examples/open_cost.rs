//! Cost of opening an fspf (DESIGN.md §5: <= 100 ms and <= 200 B/file beyond path names for
//! 100 000 files). Usage: `open_cost FSPF [KEY_HEX TAG_HEX]`. Prints the open time, the number of
//! entries, the path bytes, and resident memory after the open (steady) and at its peak.
use fspf_core::{Tag, Volume, VolumeKey};
use std::time::Instant;

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(path) = args.first() else {
        return Err("usage: open_cost FSPF [KEY_HEX TAG_HEX]".into());
    };
    let key = args.get(1).map(|k| VolumeKey::from_hex(k)).transpose()?;
    let tag = args.get(2).map(|t| Tag::from_hex(t)).transpose()?;
    let before = status_kib("VmRSS:");
    let t = Instant::now();
    let v = Volume::open(std::path::Path::new(path), key, tag)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let (steady, peak) = (status_kib("VmRSS:"), status_kib("VmHWM:"));
    let n = v.files().len().max(1) as u64;
    let path_bytes: u64 = v.files().keys().map(|p| p.as_bytes().len() as u64).sum();
    println!(
        "open {ms:.1} ms, {n} entries, {path_bytes} path bytes; RSS +{} KiB after open \
         ({} B/entry, {} B/entry beyond path bytes), peak +{} KiB ({} B/entry)",
        steady - before,
        (steady - before) * 1024 / n,
        ((steady - before) * 1024).saturating_sub(path_bytes) / n,
        peak - before,
        (peak - before) * 1024 / n
    );
    Ok(())
}

//! Measures opening an fspf that lists N files (DESIGN.md target: 100 000 files in ≤ 100 ms).
//! `cargo run --release -p fspf-core --example open_many -- [N]`
use fspf_core::format::metadata::{FileEntry, FileKind, Protection, RegionKind};
use fspf_core::volume::RegionSpec;
use fspf_core::{EmbedPath, FileId, Volume};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let dir = std::env::temp_dir().join(format!("fspf-open-many-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("fspf.pb");
    Volume::create(&path, true)?;
    let mut v = Volume::open(&path, None, None)?;
    v.add_region(RegionSpec {
        embed_point: EmbedPath::root(),
        kind: RegionKind::Kernel(dir.clone()),
        protection: Protection::Encrypted,
        key_len: None,
        chunk_len: None,
    })?;
    for i in 0..n {
        let p = EmbedPath::parse(&format!("/srv/app/data/d{:03}/file-{i:06}.bin", i % 1000))?;
        let kind = FileKind::File {
            id: FileId::random()?,
            size: 4096 + i as u64,
            root: None,
        };
        v.metadata_mut()?.files.insert(
            p,
            FileEntry {
                links: Vec::new(),
                kind,
                mode: 0o644,
                mtime_ns: 0,
                owner: None,
                ino: None,
                ctime_ns: 0,
            },
        );
    }
    let (_, key) = v.encrypt()?;
    let tag = v.tag();
    let size = std::fs::metadata(&path)?.len();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        let v = Volume::open(&path, Some(key.clone()), Some(tag))?;
        let dt = t.elapsed().as_secs_f64();
        assert_eq!(v.files().len(), n);
        best = best.min(dt);
    }
    println!(
        "open of an fspf with {n} files ({size} bytes on disk): {:.1} ms (best of 5)",
        best * 1e3
    );
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

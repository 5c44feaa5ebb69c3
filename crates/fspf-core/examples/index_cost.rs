//! Measures the frozen metadata index against the parsed map, for an fspf listing N files
//! (default 100 000, of which 10 000 in one directory): build, open, size, lookups, listings.
//! `cargo run --release -p fspf-core --example index_cost -- [N]`
use fspf_core::format::metadata::{FileEntry, FileKind, Metadata, Protection, Region, RegionKind};
use fspf_core::{build_index, EmbedPath, FileId, FrozenIndex, RegionKey, Tag};
use prost::Message;
use std::time::{Duration, Instant};

const WIDE: usize = 10_000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100_000);
    let meta = metadata(n)?;
    let tag = Tag([7; 16]);

    let (bytes, build) = best_of(5, || build_index(&meta, tag));
    let bytes = bytes?;
    const OPENS: u32 = 1000;
    let (_, opens) = best_of(5, || {
        for _ in 0..OPENS {
            let ix = FrozenIndex::open(std::hint::black_box(&bytes));
            std::hint::black_box(ix.map(|ix| ix.len())).ok();
        }
    });
    let open = opens / OPENS;
    let pb = meta.to_pb().encode_to_vec();
    let (_, parse) = best_of(3, || {
        Metadata::from_pb(fspf_core::format::metadata::MetadataPb::decode(&pb[..]).ok()?).ok()
    });
    let ix = FrozenIndex::open(&bytes)?;
    println!("{} files ({WIDE} in one directory):", ix.len());
    println!(
        "  build_index            {:>9.2} ms",
        build.as_secs_f64() * 1e3
    );
    println!(
        "  FrozenIndex::open      {:>9.2} us   (today: protobuf decode + Metadata::from_pb {:.2} ms)",
        open.as_secs_f64() * 1e6,
        parse.as_secs_f64() * 1e3
    );
    println!(
        "  index size             {:>9} bytes = {:.1} bytes/file (paths average {:.1} bytes)",
        bytes.len(),
        bytes.len() as f64 / n as f64,
        meta.files.keys().map(|k| k.as_bytes().len()).sum::<usize>() as f64 / n as f64
    );

    let keys: Vec<&EmbedPath> = meta.files.keys().collect();
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let probes: Vec<&EmbedPath> = (0..100_000)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            keys[(rng % keys.len() as u64) as usize]
        })
        .collect();
    let (found, t_ix) = best_of(3, || probes.iter().filter_map(|p| ix.get(p)).count());
    let (found_map, t_map) = best_of(3, || {
        probes.iter().filter_map(|p| meta.files.get(*p)).count()
    });
    assert_eq!((found, found_map), (probes.len(), probes.len()));
    println!(
        "  100 000 random lookups {:>9.2} M/s  (BTreeMap: {:.2} M/s)",
        probes.len() as f64 / t_ix.as_secs_f64() / 1e6,
        probes.len() as f64 / t_map.as_secs_f64() / 1e6
    );

    for (label, dir) in [
        ("children of the 10 000-entry directory", "/srv/app/wide"),
        ("children of / (1 child over all files) ", "/"),
        ("children of /srv/app/data (100 subdirs)", "/srv/app/data"),
    ] {
        let dir = EmbedPath::parse(dir)?;
        let (k, t_ix) = best_of(5, || ix.children(&dir).count());
        let (k_map, t_map) = best_of(5, || meta.children(&dir).count());
        assert_eq!(k, k_map);
        println!(
            "  {label} {:>9.1} us  ({k} children; Metadata::children: {:.1} us)",
            t_ix.as_secs_f64() * 1e6,
            t_map.as_secs_f64() * 1e6
        );
    }
    Ok(())
}

/// N files: N - 10 000 in 100 directories of `/srv/app/data`, 10 000 in `/srv/app/wide`.
fn metadata(n: usize) -> Result<Metadata, Box<dyn std::error::Error>> {
    let mut meta = Metadata {
        generation: 1,
        regions: vec![Region {
            embed_point: EmbedPath::root(),
            kind: RegionKind::Kernel("/".into()),
            protection: Protection::Encrypted,
            key: Some(RegionKey::random(32)?),
            chunk_len: 4096,
        }],
        ..Metadata::default()
    };
    for i in 0..n {
        let p = if i < WIDE.min(n) {
            format!("/srv/app/wide/entry-{i:05}.txt")
        } else {
            format!("/srv/app/data/d{:02}/file-{i:06}.bin", i % 100)
        };
        let kind = FileKind::File {
            id: FileId::random()?,
            size: 4096 + i as u64,
            root: None,
        };
        meta.files.insert(
            EmbedPath::parse(&p)?,
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
    Ok(meta)
}

/// The result of the last run and the shortest time of `runs` runs of `f`.
fn best_of<T>(runs: usize, mut f: impl FnMut() -> T) -> (T, Duration) {
    let mut best = Duration::MAX;
    let mut out = None;
    for _ in 0..runs {
        let t = Instant::now();
        let r = std::hint::black_box(f());
        best = best.min(t.elapsed());
        out = Some(r);
    }
    (out.expect("runs > 0"), best)
}

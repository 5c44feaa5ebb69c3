//! Writes the hand-made seeds of `corpus/fspf_metadata/` (metadata protobufs of realistic and of
//! edge-case volumes). `cargo run --manifest-path fuzz/Cargo.toml --example make_seeds`
//! The seeds of the other targets are `arbitrary`-encoded structs: any bytes are valid inputs.
use fspf_core::format::metadata::{FileEntryPb, MetadataPb, RegionPb};
use prost::Message;
use std::path::Path;

fn region(ep: &str, kind: u32, kernel: &str, protection: u32, key_len: usize, c: u32) -> RegionPb {
    RegionPb {
        embed_point: ep.into(),
        kind,
        kernel_path: kernel.into(),
        protection,
        key: vec![0x42; key_len],
        chunk_len: c,
    }
}

fn file(path: &[u8], size: u64, root: bool) -> FileEntryPb {
    FileEntryPb {
        path: path.to_vec(),
        kind: 1,
        file_id: vec![0x11; 16],
        size,
        root: if root { vec![0x22; 32] } else { Vec::new() },
        mode: 0o644,
        target: Vec::new(),
    }
}

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/fspf_metadata");
    std::fs::create_dir_all(&dir).expect("corpus dir");
    let three_regions = vec![
        region("/", 1, "/", 1, 0, 65536),
        region("/auth", 1, "/srv/auth", 2, 32, 65536),
        region("/enc", 1, "/srv/enc", 3, 32, 4096),
    ];
    let seeds: Vec<(&str, MetadataPb)> = vec![
        (
            "empty",
            MetadataPb {
                format_version: 1,
                ..Default::default()
            },
        ),
        (
            "three_regions",
            MetadataPb {
                format_version: 1,
                generation: 7,
                regions: three_regions.clone(),
                files: vec![
                    file(b"/auth/a", 70_000, true),
                    file(b"/enc/hello.txt", 12, false),
                    file(b"/enc/empty", 0, false),
                    FileEntryPb {
                        path: b"/enc/dir".to_vec(),
                        kind: 2,
                        mode: 0o755,
                        ..Default::default()
                    },
                    FileEntryPb {
                        path: b"/enc/link".to_vec(),
                        kind: 3,
                        mode: 0o777,
                        target: b"../auth/a".to_vec(),
                        ..Default::default()
                    },
                ],
            },
        ),
        (
            "ephemeral_and_key_lengths",
            MetadataPb {
                format_version: 1,
                generation: 1,
                regions: vec![
                    region("/", 1, "/data", 3, 16, 512),
                    region("/tmp", 2, "", 2, 24, 16 << 20),
                    region("/var", 2, "", 1, 0, 65536),
                ],
                files: vec![file(b"/x", 1, false), file(b"/tmp/y", 5, true)],
            },
        ),
        (
            "unnormalised_and_unsorted_paths",
            MetadataPb {
                format_version: 1,
                generation: 2,
                regions: vec![region("/data/../", 1, "/k/./x//", 2, 32, 1000)],
                files: vec![
                    file(b"/b//c/", 3, true),
                    file(b"/a/./d/../e", 4, true),
                    file(b"/\xff\xfe", 0, true),
                ],
            },
        ),
        (
            "extreme_sizes",
            MetadataPb {
                format_version: 1,
                generation: u64::MAX,
                regions: three_regions,
                files: vec![
                    file(b"/enc/huge", u64::MAX, false),
                    file(b"/enc/big", 1 << 62, false),
                    file(b"/auth/huge", u64::MAX - 1, true),
                ],
            },
        ),
    ];
    for (name, pb) in seeds {
        std::fs::write(dir.join(name), pb.encode_to_vec()).expect("write seed");
    }
}

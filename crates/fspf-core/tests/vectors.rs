//! Codec test vectors (`testdata/vectors/`, one file per case, named after the defect it holds).
//!
//! A vector is a text header of `key: value` lines, a blank line, then the raw bytes on disk
//! (for authenticated files: the file bytes followed by `outboard-length` bytes of outboard tree).
//! The keys are described in `testdata/vectors/README.md`.
//!
//! `every_vector_meets_its_expectation` reads each file and checks it with `ProtectedReader`.
//! `committed_vectors_match_the_generator` fails when the generator (fixed keys and ids) would
//! write different bytes: the on-disk format must not drift. Vectors are written only on request:
//! `FSPF_WRITE_VECTORS=1 cargo test -p fspf-core --test vectors -- --ignored write_vectors`.
use fspf_core::codec::{
    chunk_nonce, enc_header, seal_authenticated, seal_encrypted, FileCodec, ProtectedReader,
};
use fspf_core::crypto::{file_chunk_key, file_mac_key, FileId, RegionKey, TAG_LEN};
use fspf_core::Error;
use std::collections::BTreeMap;
use std::path::PathBuf;

fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vectors")
}

fn is_vector(name: &str) -> bool {
    !name.starts_with('.') && !name.ends_with(".md")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Ok,
    ChunkFailure(u64),
    SizeFailure,
    HeaderFailure,
    TreeFailure,
}

#[derive(Debug)]
struct Vector {
    name: String,
    expect: Expect,
    encrypted: bool,
    region_key: Vec<u8>,
    file_id: [u8; 16],
    size: u64,
    chunk_len: u32,
    root: Option<[u8; 32]>,
    plaintext_sha256: Option<String>,
    data: Vec<u8>,
    outboard: Option<Vec<u8>>,
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, b))
}

const KNOWN_KEYS: &[&str] = &[
    "expect",
    "codec",
    "region-key",
    "file-id",
    "size",
    "chunk-length",
    "root",
    "outboard-length",
    "failing-chunk",
    "plaintext-sha256",
    "comment",
];

fn parse(name: &str, bytes: &[u8]) -> Vector {
    let split = bytes
        .windows(2)
        .position(|w| w == b"\n\n")
        .unwrap_or_else(|| panic!("{name}: no blank line after the header"));
    let header = std::str::from_utf8(&bytes[..split]).expect("header is UTF-8");
    let body = &bytes[split + 2..];
    let mut h = BTreeMap::new();
    for line in header.lines() {
        let (k, v) = line
            .split_once(": ")
            .unwrap_or_else(|| panic!("{name}: bad header line {line:?}"));
        assert!(KNOWN_KEYS.contains(&k), "{name}: unknown key {k}");
        assert!(
            h.insert(k.to_string(), v.to_string()).is_none(),
            "{name}: {k} twice"
        );
    }
    let get = |k: &str| -> &str {
        h.get(k)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("{name}: missing {k}"))
    };
    let expect = match get("expect") {
        "ok" => Expect::Ok,
        "chunk failure" => Expect::ChunkFailure(get("failing-chunk").parse().expect("index")),
        "size failure" => Expect::SizeFailure,
        "header failure" => Expect::HeaderFailure,
        "tree failure" => Expect::TreeFailure,
        e => panic!("{name}: unknown expectation {e:?}"),
    };
    let encrypted = match get("codec") {
        "encrypted" => true,
        "authenticated" => false,
        c => panic!("{name}: unknown codec {c}"),
    };
    let mut file_id = [0u8; 16];
    hex::decode_to_slice(get("file-id"), &mut file_id).expect("file-id hex");
    let (data, outboard, root) = if encrypted {
        (body.to_vec(), None, None)
    } else {
        let ol: usize = get("outboard-length").parse().expect("outboard-length");
        let (d, o) = body.split_at(body.len() - ol);
        let mut root = [0u8; 32];
        hex::decode_to_slice(get("root"), &mut root).expect("root hex");
        (d.to_vec(), (ol > 0).then(|| o.to_vec()), Some(root))
    };
    Vector {
        name: name.to_string(),
        expect,
        encrypted,
        region_key: hex::decode(get("region-key")).expect("region-key hex"),
        file_id,
        size: get("size").parse().expect("size"),
        chunk_len: get("chunk-length").parse().expect("chunk-length"),
        root,
        plaintext_sha256: h.get("plaintext-sha256").cloned(),
        data,
        outboard,
    }
}

fn reader(v: &Vector) -> fspf_core::Result<ProtectedReader<Vec<u8>, Vec<u8>>> {
    let rk = RegionKey::from_bytes(v.region_key.clone()).unwrap();
    let id = FileId(v.file_id);
    let codec = if v.encrypted {
        FileCodec::Encrypted {
            key: file_chunk_key(&rk, &id).unwrap(),
            id,
            data: v.data.clone(),
        }
    } else {
        FileCodec::Authenticated {
            key: file_mac_key(&rk, &id).unwrap(),
            root: v.root.unwrap(),
            data: v.data.clone(),
            outboard: v.outboard.clone(),
        }
    };
    ProtectedReader::new(codec, v.size, v.chunk_len, v.name.clone())
}

fn classify(e: &Error) -> Expect {
    match e {
        Error::ChunkAuth { chunk, .. } => Expect::ChunkFailure(*chunk),
        Error::SizeMismatch { .. } => Expect::SizeFailure,
        Error::HeaderMismatch { .. } => Expect::HeaderFailure,
        Error::Invalid { reason, .. } if reason.contains("integrity tree") => Expect::TreeFailure,
        e => panic!("unexpected error kind: {e}"),
    }
}

fn check(v: &Vector) {
    let full = reader(v).and_then(|mut r| {
        r.verify_all()?;
        let mut out = Vec::new();
        r.copy_to(&mut out)?;
        Ok(out)
    });
    match (&v.expect, full) {
        (Expect::Ok, Ok(plain)) => {
            assert_eq!(plain.len() as u64, v.size, "{}", v.name);
            let want = v
                .plaintext_sha256
                .as_deref()
                .expect("ok vectors name their plaintext");
            assert_eq!(sha256_hex(&plain), want, "{}: wrong plaintext", v.name);
        }
        (Expect::Ok, Err(e)) => panic!("{}: expected ok, got {e}", v.name),
        (exp, Ok(_)) => panic!("{}: expected {exp:?}, but the file verified", v.name),
        (exp, Err(e)) => assert_eq!(&classify(&e), exp, "{}: {e}", v.name),
    }
    // Random access fails the same way: the failing chunk is never served.
    if let Expect::ChunkFailure(bad) = v.expect {
        let mut r = reader(v).expect("chunk failures pass the open checks");
        let mut buf = vec![0u8; v.chunk_len as usize];
        let e = r
            .read_at(&mut buf, bad * v.chunk_len as u64)
            .expect_err("failing chunk must not be served");
        assert_eq!(classify(&e), Expect::ChunkFailure(bad), "{}", v.name);
    }
}

#[test]
fn every_vector_meets_its_expectation() {
    let mut n = 0;
    let mut kinds = std::collections::BTreeSet::new();
    for e in std::fs::read_dir(vectors_dir()).expect("testdata/vectors") {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if !is_vector(&name) {
            continue;
        }
        let v = parse(&name, &std::fs::read(&p).unwrap());
        kinds.insert(format!("{:?}", std::mem::discriminant(&v.expect)));
        check(&v);
        n += 1;
    }
    assert!(n >= 30, "only {n} vectors found");
    assert_eq!(kinds.len(), 5, "every expectation kind is covered");
}

// ---------------------------------------------------------------------------------------------
// Generator: fixed keys and ids, so the output is deterministic.

const C: u32 = 512;
const ID_A: [u8; 16] = *b"fspf-vector-id-A";
const ID_B: [u8; 16] = *b"fspf-vector-id-B";

fn region_key(len: usize) -> Vec<u8> {
    (0..len as u8)
        .map(|i| i.wrapping_mul(7).wrapping_add(1))
        .collect()
}

fn plain(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(seed as u32 % 31) as u8
                ^ seed
        })
        .collect()
}

fn flip(b: &[u8], off: usize) -> Vec<u8> {
    let mut b = b.to_vec();
    b[off] ^= 0x01;
    b
}

struct Case<'a> {
    name: &'a str,
    comment: &'a str,
    expect: Expect,
    key: &'a [u8],
    size: usize,
    plaintext: Option<&'a [u8]>,
}

#[derive(Default)]
struct Gen {
    out: Vec<(String, Vec<u8>)>,
}

impl Gen {
    fn header(c: &Case, codec: &str) -> String {
        let (e, chunk) = match &c.expect {
            Expect::Ok => ("ok", None),
            Expect::ChunkFailure(i) => ("chunk failure", Some(*i)),
            Expect::SizeFailure => ("size failure", None),
            Expect::HeaderFailure => ("header failure", None),
            Expect::TreeFailure => ("tree failure", None),
        };
        let mut h = format!("expect: {e}\n");
        if let Some(i) = chunk {
            h += &format!("failing-chunk: {i}\n");
        }
        h += &format!("codec: {codec}\n");
        h += &format!("region-key: {}\n", hex::encode(c.key));
        h += &format!("file-id: {}\n", hex::encode(ID_A));
        h += &format!("size: {}\n", c.size);
        h += &format!("chunk-length: {C}\n");
        if let Some(p) = c.plaintext {
            h += &format!("plaintext-sha256: {}\n", sha256_hex(p));
        }
        h += &format!("comment: {}\n", c.comment);
        h
    }

    fn enc(&mut self, c: Case, body: &[u8]) {
        let mut v = Self::header(&c, "encrypted").into_bytes();
        v.push(b'\n');
        v.extend_from_slice(body);
        self.out.push((c.name.to_string(), v));
    }

    fn auth(&mut self, c: Case, root: [u8; 32], data: &[u8], outboard: &[u8]) {
        let mut h = Self::header(&c, "authenticated");
        h += &format!("root: {}\n", hex::encode(root));
        h += &format!("outboard-length: {}\n", outboard.len());
        let mut v = h.into_bytes();
        v.push(b'\n');
        v.extend_from_slice(data);
        v.extend_from_slice(outboard);
        self.out.push((c.name.to_string(), v));
    }
}

fn seal_enc(key: &[u8], id: [u8; 16], p: &[u8]) -> Vec<u8> {
    let rk = RegionKey::from_bytes(key.to_vec()).unwrap();
    let id = FileId(id);
    let k = file_chunk_key(&rk, &id).unwrap();
    let mut out = Vec::new();
    seal_encrypted(&k, &id, C, p.len() as u64, &mut &p[..], &mut out, "gen").unwrap();
    out
}

/// Seal chunks by hand with chosen last-chunk flags and AAD (for flag and AAD defects).
fn seal_manual(key: &[u8], p: &[u8], last_flags: &[bool], aad: &[u8]) -> Vec<u8> {
    let rk = RegionKey::from_bytes(key.to_vec()).unwrap();
    let k = file_chunk_key(&rk, &FileId(ID_A)).unwrap();
    let mut out = enc_header(&FileId(ID_A)).to_vec();
    let chunks: Vec<&[u8]> = p.chunks(C as usize).collect();
    assert_eq!(chunks.len(), last_flags.len());
    for (i, (ch, last)) in chunks.iter().zip(last_flags).enumerate() {
        let mut b = ch.to_vec();
        let t = k.seal(chunk_nonce(i as u64, *last), aad, &mut b).unwrap();
        out.extend_from_slice(&b);
        out.extend_from_slice(&t);
    }
    out
}

fn seal_auth(key: &[u8], id: [u8; 16], p: &[u8]) -> ([u8; 32], Vec<u8>) {
    let rk = RegionKey::from_bytes(key.to_vec()).unwrap();
    let k = file_mac_key(&rk, &FileId(id)).unwrap();
    seal_authenticated(&k, C, p.len() as u64, &mut &p[..], None, "gen").unwrap()
}

/// Byte range of encrypted chunk `i` (ciphertext + tag) for full chunks.
fn chunk_at(i: usize) -> std::ops::Range<usize> {
    let start = 24 + i * (C as usize + TAG_LEN);
    start..start + C as usize + TAG_LEN
}

fn generate_encrypted(g: &mut Gen) {
    let c = C as usize;
    let k32 = region_key(32);
    for (name, len, key, comment) in [
        (
            "enc_ok_empty",
            0,
            region_key(32),
            "empty file: header + one empty chunk (tag only)",
        ),
        ("enc_ok_one_byte", 1, region_key(32), "one byte"),
        (
            "enc_ok_exact_chunk",
            c,
            region_key(32),
            "exactly one full chunk: no empty chunk after it",
        ),
        ("enc_ok_two_chunks", c + 1, region_key(32), "chunk + 1 byte"),
        (
            "enc_ok_three_chunks",
            2 * c + 100,
            region_key(32),
            "two full chunks and a partial one",
        ),
        (
            "enc_ok_key16",
            c + 7,
            region_key(16),
            "AES-128-GCM region key",
        ),
        (
            "enc_ok_key24",
            c + 7,
            region_key(24),
            "AES-192-GCM region key",
        ),
    ] {
        let p = plain(len, 1);
        let body = seal_enc(&key, ID_A, &p);
        g.enc(
            Case {
                name,
                comment,
                expect: Expect::Ok,
                key: &key,
                size: len,
                plaintext: Some(&p),
            },
            &body,
        );
    }
    // Defects of a three-chunk file (512 + 512 + 100 bytes).
    let p3 = plain(2 * c + 100, 2);
    let e3 = seal_enc(&k32, ID_A, &p3);
    let n3 = p3.len();
    let other = seal_enc(&k32, ID_B, &p3);
    let mut swapped = e3.clone();
    swapped[chunk_at(0)].copy_from_slice(&e3[chunk_at(1)]);
    swapped[chunk_at(1)].copy_from_slice(&e3[chunk_at(0)]);
    let mut mixed = other.clone();
    mixed[..24].copy_from_slice(&e3[..24]);
    mixed[chunk_at(0)].copy_from_slice(&e3[chunk_at(0)]);
    let mut wrong_id = e3.clone();
    wrong_id[8..24].copy_from_slice(&ID_B);
    let mut plus_byte = e3.clone();
    plus_byte.push(0);
    let mut plus_chunk = e3.clone();
    plus_chunk.extend_from_slice(&e3[chunk_at(1)]);
    let p2 = plain(2 * c, 3);
    let other_key: Vec<u8> = k32.iter().map(|b| b ^ 0x55).collect();
    let defects: Vec<(&str, &str, Expect, usize, Vec<u8>)> = vec![
        ("enc_chunk_bad_tag_first", "last tag byte of chunk 0 flipped", Expect::ChunkFailure(0), n3, flip(&e3, chunk_at(0).end - 1)),
        ("enc_chunk_bad_tag_second", "first tag byte of chunk 1 flipped", Expect::ChunkFailure(1), n3, flip(&e3, chunk_at(1).start + c)),
        ("enc_chunk_bad_body_last", "a ciphertext byte of the last chunk flipped", Expect::ChunkFailure(2), n3, flip(&e3, chunk_at(2).start + 50)),
        ("enc_chunks_swapped", "chunks 0 and 1 swapped (the nonce binds the index)", Expect::ChunkFailure(0), n3, swapped),
        ("enc_chunk_from_other_file", "chunks 1 and 2 from another version with the same plaintext and region key", Expect::ChunkFailure(1), n3, mixed),
        ("enc_header_wrong_file_id", "header names another file id (whole-file swap or rollback)", Expect::HeaderFailure, n3, wrong_id),
        ("enc_header_bad_magic", "first magic byte changed", Expect::HeaderFailure, n3, flip(&e3, 0)),
        ("enc_header_bad_version_byte", "format byte of the magic changed", Expect::HeaderFailure, n3, flip(&e3, 5)),
        ("enc_whole_file_of_other_version", "a complete, valid file of another version put in place", Expect::HeaderFailure, n3, other.clone()),
        ("enc_truncated_last_chunk", "the whole last chunk dropped", Expect::SizeFailure, n3, e3[..chunk_at(2).start].to_vec()),
        ("enc_truncated_one_byte", "last byte (of the last tag) dropped", Expect::SizeFailure, n3, e3[..e3.len() - 1].to_vec()),
        ("enc_truncated_to_header", "only the header left", Expect::SizeFailure, n3, e3[..24].to_vec()),
        ("enc_truncated_inside_header", "cut inside the header", Expect::SizeFailure, n3, e3[..10].to_vec()),
        ("enc_extended_one_byte", "one byte appended", Expect::SizeFailure, n3, plus_byte),
        ("enc_extended_one_chunk", "a copy of chunk 1 appended", Expect::SizeFailure, n3, plus_chunk),
        ("enc_size_recorded_smaller", "valid file, the fspf records one byte less", Expect::SizeFailure, n3 - 1, e3.clone()),
        ("enc_empty_without_chunk", "empty file stored as the bare header (its empty chunk's tag missing)", Expect::SizeFailure, 0, e3[..24].to_vec()),
        ("enc_last_flag_missing", "two full chunks, the last sealed without the last-chunk flag (as if cut at a chunk boundary)", Expect::ChunkFailure(1), 2 * c, seal_manual(&k32, &p2, &[false, false], &ID_A)),
        ("enc_last_flag_on_first", "two full chunks, the first one also sealed as last", Expect::ChunkFailure(0), 2 * c, seal_manual(&k32, &p2, &[true, true], &ID_A)),
        ("enc_aad_missing", "chunks sealed without the file id as associated data", Expect::ChunkFailure(0), 2 * c, seal_manual(&k32, &p2, &[false, true], b"")),
        ("enc_wrong_region_key", "sealed under another region key", Expect::ChunkFailure(0), n3, seal_enc(&other_key, ID_A, &p3)),
    ];
    for (name, comment, expect, size, body) in defects {
        g.enc(
            Case {
                name,
                comment,
                expect,
                key: &k32,
                size,
                plaintext: None,
            },
            &body,
        );
    }
}

fn generate_authenticated(g: &mut Gen) {
    let c = C as usize;
    let k32 = region_key(32);
    for (name, len, comment) in [
        (
            "auth_ok_empty",
            0,
            "empty file: root = leaf of the empty chunk, no outboard",
        ),
        ("auth_ok_one_chunk", c, "single chunk: no outboard"),
        (
            "auth_ok_three_chunks",
            2 * c + 100,
            "three leaves: outboard levels of 3 and 2 nodes",
        ),
        (
            "auth_ok_four_chunks",
            4 * c,
            "four full leaves: outboard levels of 4 and 2 nodes",
        ),
    ] {
        let p = plain(len, 4);
        let (root, ob) = seal_auth(&k32, ID_A, &p);
        g.auth(
            Case {
                name,
                comment,
                expect: Expect::Ok,
                key: &k32,
                size: len,
                plaintext: Some(&p),
            },
            root,
            &p,
            &ob,
        );
    }
    let a3 = plain(2 * c + 100, 5);
    let n = a3.len();
    let (root3, ob3) = seal_auth(&k32, ID_A, &a3);
    let mut swapped = a3.clone();
    swapped[..c].copy_from_slice(&a3[c..2 * c]);
    swapped[c..2 * c].copy_from_slice(&a3[..c]);
    let mut plus = a3.clone();
    plus.push(b'x');
    let (root_b, ob_b) = seal_auth(&k32, ID_B, &a3);
    let one = plain(c, 7);
    let (root1, _) = seal_auth(&k32, ID_A, &one);
    let (root0, _) = seal_auth(&k32, ID_A, &[]);
    #[allow(clippy::type_complexity)]
    let defects: Vec<(&str, &str, Expect, usize, [u8; 32], Vec<u8>, Vec<u8>)> = vec![
        (
            "auth_leaf_flipped",
            "a byte of chunk 1 flipped",
            Expect::ChunkFailure(1),
            n,
            root3,
            flip(&a3, c + 3),
            ob3.clone(),
        ),
        (
            "auth_first_byte_flipped",
            "byte 0 flipped",
            Expect::ChunkFailure(0),
            n,
            root3,
            flip(&a3, 0),
            ob3.clone(),
        ),
        (
            "auth_last_byte_flipped",
            "last byte flipped",
            Expect::ChunkFailure(2),
            n,
            root3,
            flip(&a3, n - 1),
            ob3.clone(),
        ),
        (
            "auth_chunks_swapped",
            "chunks 0 and 1 swapped (leaves bind the index)",
            Expect::ChunkFailure(0),
            n,
            root3,
            swapped,
            ob3.clone(),
        ),
        (
            "auth_outboard_sibling_flipped",
            "leaf node 1 in the outboard flipped (the sibling of chunk 0)",
            Expect::ChunkFailure(0),
            n,
            root3,
            a3.clone(),
            flip(&ob3, 32 + 4),
        ),
        (
            "auth_outboard_upper_flipped",
            "level-1 node 1 flipped (sibling on the path of chunks 0 and 1)",
            Expect::ChunkFailure(0),
            n,
            root3,
            a3.clone(),
            flip(&ob3, 4 * 32 + 9),
        ),
        (
            "auth_outboard_unpaired_node_flipped",
            "leaf node 2 (unpaired, never read as a sibling) flipped",
            Expect::TreeFailure,
            n,
            root3,
            a3.clone(),
            flip(&ob3, 2 * 32 + 1),
        ),
        (
            "auth_outboard_truncated",
            "last outboard node dropped",
            Expect::TreeFailure,
            n,
            root3,
            a3.clone(),
            ob3[..ob3.len() - 32].to_vec(),
        ),
        (
            "auth_outboard_missing",
            "multi-chunk file without outboard",
            Expect::TreeFailure,
            n,
            root3,
            a3.clone(),
            Vec::new(),
        ),
        (
            "auth_truncated_at_chunk_boundary",
            "last chunk dropped",
            Expect::SizeFailure,
            n,
            root3,
            a3[..2 * c].to_vec(),
            ob3.clone(),
        ),
        (
            "auth_extended_one_byte",
            "one byte appended",
            Expect::SizeFailure,
            n,
            root3,
            plus,
            ob3.clone(),
        ),
        (
            "auth_root_of_other_version",
            "root and outboard of the same content under another file id",
            Expect::ChunkFailure(0),
            n,
            root_b,
            a3.clone(),
            ob_b,
        ),
        (
            "auth_older_content",
            "other content of the same size (an older version)",
            Expect::ChunkFailure(0),
            n,
            root3,
            plain(n, 6),
            ob3.clone(),
        ),
        (
            "auth_one_chunk_flipped",
            "single-chunk file with a flipped byte",
            Expect::ChunkFailure(0),
            c,
            root1,
            flip(&one, 100),
            Vec::new(),
        ),
        (
            "auth_empty_extended",
            "empty file that gained a byte",
            Expect::SizeFailure,
            0,
            root0,
            vec![0],
            Vec::new(),
        ),
    ];
    for (name, comment, expect, size, root, data, ob) in defects {
        g.auth(
            Case {
                name,
                comment,
                expect,
                key: &k32,
                size,
                plaintext: None,
            },
            root,
            &data,
            &ob,
        );
    }
}

fn generate() -> Vec<(String, Vec<u8>)> {
    let mut g = Gen::default();
    generate_encrypted(&mut g);
    generate_authenticated(&mut g);
    g.out
}

#[test]
fn committed_vectors_match_the_generator() {
    let generated = generate();
    let mut names: Vec<_> = generated.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), generated.len(), "duplicate vector names");
    for (name, bytes) in &generated {
        let on_disk = std::fs::read(vectors_dir().join(name)).unwrap_or_else(|_| {
            panic!("{name}: not committed; write it with FSPF_WRITE_VECTORS=1 (module docs)")
        });
        assert!(
            on_disk == *bytes,
            "{name}: the generator now writes different bytes: the on-disk format changed"
        );
    }
    let mut committed: Vec<String> = std::fs::read_dir(vectors_dir())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| is_vector(n))
        .collect();
    committed.sort();
    assert_eq!(committed, names, "vectors on disk and generator disagree");
}

/// Writes missing vectors; never overwrites one unless FSPF_WRITE_VECTORS=overwrite.
#[test]
#[ignore = "writes testdata/vectors; run on purpose only"]
fn write_vectors() {
    let mode = std::env::var("FSPF_WRITE_VECTORS").unwrap_or_default();
    assert!(
        mode == "1" || mode == "overwrite",
        "set FSPF_WRITE_VECTORS=1"
    );
    std::fs::create_dir_all(vectors_dir()).unwrap();
    for (name, bytes) in generate() {
        let p = vectors_dir().join(&name);
        if p.exists() && mode != "overwrite" {
            assert_eq!(
                std::fs::read(&p).unwrap(),
                bytes,
                "{name} differs; not overwriting"
            );
            continue;
        }
        std::fs::write(p, bytes).unwrap();
    }
}

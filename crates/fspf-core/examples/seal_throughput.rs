//! In-memory ceiling of the import codec: seal SIZE_MB (env, default 1024) bytes from a buffer
//! into `io::sink()` with `codec::seal_encrypted` and `codec::seal_authenticated`, so bench/addf.sh
//! can tell the codec's cost apart from the file system's. Prints `enc MB/s` and `auth MB/s`.
use fspf_core::codec::{seal_authenticated, seal_encrypted};
use fspf_core::crypto::{file_chunk_key, file_mac_key};
use fspf_core::format::layout::DEFAULT_CHUNK_LEN;
use fspf_core::{FileId, RegionKey};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mb: usize = std::env::var("SIZE_MB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024);
    let runs: usize = std::env::var("RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let size = mb << 20;
    let mut plain = vec![0u8; size];
    fspf_core::crypto::random_bytes(&mut plain[..1 << 20])?;
    for i in 1..mb {
        plain.copy_within(..1 << 20, i << 20);
    }
    let rk = RegionKey::random(32)?;
    let (mut enc, mut auth) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        let id = FileId::random()?;
        let k = file_chunk_key(&rk, &id)?;
        let t = Instant::now();
        seal_encrypted(
            &k,
            &id,
            DEFAULT_CHUNK_LEN,
            size as u64,
            &mut &plain[..],
            &mut std::io::sink(),
            "bench",
        )?;
        enc.push(size as f64 / t.elapsed().as_secs_f64() / 1e6);
        let m = file_mac_key(&rk, &id)?;
        let t = Instant::now();
        seal_authenticated(
            &m,
            DEFAULT_CHUNK_LEN,
            size as u64,
            &mut &plain[..],
            None,
            "bench",
        )?;
        auth.push(size as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    println!("enc {:.0}", median(&mut enc));
    println!("auth {:.0}", median(&mut auth));
    Ok(())
}

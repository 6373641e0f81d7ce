//! Fetch and verify a data set: `cargo run -p sbdnet-data --example fetch -- mnist [DATA_DIR]`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let kind: sbdnet_data::DatasetKind = args.next().unwrap_or_else(|| "mnist".into()).parse()?;
    let dir = args.next().map(std::path::PathBuf::from).unwrap_or_else(sbdnet_data::default_data_dir);
    let out = sbdnet_data::fetch(kind, &dir, &mut |l| println!("{l}"))?;
    sbdnet_data::verify(kind, &dir)?;
    let split = sbdnet_data::load(kind, &dir)?;
    println!("{kind} ready in {}: {} train, {} test", out.display(), split.train.len(), split.test.len());
    Ok(())
}

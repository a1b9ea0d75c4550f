//! Reading the files an operator names (configuration, rules, keys, secrets, TLS material):
//! bounded, whatever size the file system reports (a device such as /dev/zero reports 0 and
//! never ends; a FIFO blocks until written).

use std::io::Read;
use std::path::Path;

/// The file's bytes if it holds at most `max`; an error naming the bound otherwise. A path that
/// is not a regular file (a directory, a device, a FIFO) is refused before it is opened.
pub fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    let m = std::fs::metadata(path)?;
    if !m.is_file() {
        return Err(std::io::Error::other(
            "not a regular file (a directory, a device or a pipe)",
        ));
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(max + 1)
        .read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(std::io::Error::other(format!(
            "more than {max} bytes: this file may not exceed {max} bytes"
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_or_an_oversized_file_is_refused_without_reading_it_all() {
        let e = read_bounded(Path::new("/dev/zero"), 1024).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("big");
        std::fs::write(&p, vec![b'a'; 2000]).unwrap();
        assert!(read_bounded(&p, 1024)
            .unwrap_err()
            .to_string()
            .contains("may not exceed 1024 bytes"));
        assert_eq!(read_bounded(&p, 2000).unwrap().len(), 2000);
    }
}

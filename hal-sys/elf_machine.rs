// Shared by `build.rs` (refuses a libloragw.a of another architecture) and
// `tests/elf_machine.rs`.

/// The ELF `e_machine` of the first object in a `!<arch>` archive.
fn first_elf_machine(ar: &[u8]) -> Option<u16> {
    let mut at = ar.strip_prefix(b"!<arch>\n").map(|_| 8)?;
    while at + 60 <= ar.len() {
        let header = &ar[at..at + 60];
        let size: usize = std::str::from_utf8(&header[48..58])
            .ok()?
            .trim()
            .parse()
            .ok()?;
        let data = ar.get(at + 60..at + 60 + size)?;
        if data.starts_with(b"\x7fELF") && data.len() > 20 {
            // EI_DATA 1: little-endian (every target lora-edge builds for).
            return Some(u16::from_le_bytes([data[18], data[19]]));
        }
        at += 60 + size + (size % 2);
    }
    None
}

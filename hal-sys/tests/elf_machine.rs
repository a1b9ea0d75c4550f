//! The architecture check of `build.rs` on archives made here: `ar` members, ELF headers.
include!("../elf_machine.rs");

/// An `ar` archive of the given members (name, bytes), as `ar rcs` lays it out.
fn archive(members: &[(&str, Vec<u8>)]) -> Vec<u8> {
    let mut a = b"!<arch>\n".to_vec();
    for (name, data) in members {
        a.extend_from_slice(
            format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                name,
                0,
                0,
                0,
                644,
                data.len()
            )
            .as_bytes(),
        );
        a.extend_from_slice(data);
        if data.len() % 2 == 1 {
            a.push(b'\n');
        }
    }
    a
}

fn elf(machine: u16) -> Vec<u8> {
    let mut e = vec![0u8; 64];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // 64-bit
    e[5] = 1; // little-endian
    e[18..20].copy_from_slice(&machine.to_le_bytes());
    e
}

#[test]
fn the_first_object_of_an_archive_says_its_architecture() {
    // A symbol table first (not ELF), odd-sized, then the objects.
    let a = archive(&[
        ("/", vec![0u8; 7]),
        ("loragw_hal.o/", elf(183)),
        ("x.o/", elf(62)),
    ]);
    assert_eq!(first_elf_machine(&a), Some(183), "aarch64");
    assert_eq!(
        first_elf_machine(&archive(&[("a.o/", elf(40))])),
        Some(40),
        "arm"
    );
    assert_eq!(
        first_elf_machine(&archive(&[("a.o/", elf(62))])),
        Some(62),
        "x86_64"
    );
    assert_eq!(first_elf_machine(b"not an archive"), None);
    assert_eq!(
        first_elf_machine(&archive(&[("/", vec![1, 2, 3])])),
        None,
        "no object"
    );
}

//! Decides what the `lgw_*` symbols link against.
//!
//! - `LORAGW_DIR` set: the real sx1302_hal, built by the user (gateway or cross sysroot). It must
//!   point at the root of an sx1302_hal V2.1.x build tree holding `libloragw/libloragw.a`,
//!   `libtools/libtinymt32.a` and `libloragw/inc/loragw_hal.h`.
//! - unset: nothing is linked here; the symbols come from the simulated concentrator crate
//!   (`sx1302-sim`), which the agent links by default.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LORAGW_DIR");
    println!("cargo:rerun-if-changed=include/loragw_hal.h");
    println!("cargo:rustc-check-cfg=cfg(loragw_i2c_setters)");
    let Some(dir) = std::env::var_os("LORAGW_DIR") else {
        println!("cargo:rustc-env=LORAGW_LINKED=simulator");
        println!("cargo:rustc-env=LORAGW_SOURCE=simulated concentrator");
        println!("cargo:rustc-env=LORAGW_VARIANT=simulator");
        // The simulator exports the fork's I2C calls (it imitates either library).
        println!("cargo:rustc-cfg=loragw_i2c_setters");
        return;
    };
    let dir = PathBuf::from(dir);
    let expected = [
        dir.join("libloragw/libloragw.a"),
        dir.join("libtools/libtinymt32.a"),
        dir.join("libloragw/inc/loragw_hal.h"),
    ];
    let missing: Vec<String> = expected
        .iter()
        .filter(|p| !p.is_file())
        .map(|p| p.display().to_string())
        .collect();
    if !missing.is_empty() {
        panic!(
            "LORAGW_DIR={} does not look like a built sx1302_hal V2.1.x tree; missing: {}. \
             Build sx1302_hal first (`make` at its root, with the cross compiler for a Pi build) \
             or unset LORAGW_DIR to link the simulated concentrator.",
            dir.display(),
            missing.join(", ")
        );
    }
    // A library rebuilt in the same tree (upstream swapped for r9) must be relinked, and its
    // variant read again.
    for p in &expected {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    let archive = dir.join("libloragw/libloragw.a");
    check_architecture(&archive);
    // ChirpStack's fork (V2.1.0r9) has these; upstream V2.1.0 does not.
    let lib = std::fs::read(&archive).unwrap_or_default();
    if lib.windows(16).any(|w| w == b"lgw_i2c_set_path") {
        println!("cargo:rustc-cfg=loragw_i2c_setters");
        println!("cargo:rustc-env=LORAGW_VARIANT=v2.1.0r9");
    } else {
        println!("cargo:rustc-env=LORAGW_VARIANT=v2.1.0");
    }
    println!(
        "cargo:rustc-link-search=native={}",
        dir.join("libloragw").display()
    );
    println!(
        "cargo:rustc-link-search=native={}",
        dir.join("libtools").display()
    );
    println!("cargo:rustc-link-lib=static=loragw");
    println!("cargo:rustc-link-lib=static=tinymt32");
    println!("cargo:rustc-link-lib=dylib=m");
    println!("cargo:rustc-link-lib=dylib=rt");
    println!("cargo:rustc-link-lib=dylib=pthread");
    println!("cargo:rustc-env=LORAGW_LINKED=libloragw");
    println!("cargo:rustc-env=LORAGW_SOURCE={}", dir.display());
}

/// Fails the build, clearly, when the archive was built for another machine than the target
/// (otherwise the linker says only "file in wrong format").
fn check_architecture(archive: &std::path::Path) {
    let target = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let bytes = std::fs::read(archive).unwrap_or_default();
    let Some(machine) = first_elf_machine(&bytes) else {
        println!(
            "cargo:warning={} holds no ELF object that could be checked against {target}",
            archive.display()
        );
        return;
    };
    let name = match machine {
        62 => "x86_64",
        183 => "aarch64",
        40 => "arm",
        3 => "x86",
        _ => "another architecture",
    };
    if name != target {
        panic!(
            "{} was built for {name} (ELF machine {machine}) but this build targets {target}: \
             build sx1302_hal with the {target} cross compiler (e.g. `make ARCH=arm64 \
             CROSS_COMPILE=aarch64-linux-gnu-` for aarch64) or point LORAGW_DIR at that build",
            archive.display()
        );
    }
}

include!("elf_machine.rs");

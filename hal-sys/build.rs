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
    let Some(dir) = std::env::var_os("LORAGW_DIR") else {
        println!("cargo:rustc-env=LORAGW_LINKED=simulator");
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
}

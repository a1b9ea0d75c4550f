//! Regenerates `src/bindings.rs` from `include/loragw_hal.h` (needs libclang).
include!("../generate_bindings.rs");

fn main() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/bindings.rs");
    std::fs::write(path, generate_bindings()).expect("write src/bindings.rs");
    println!("wrote {path}");
}

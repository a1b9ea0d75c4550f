//! The committed bindings must be exactly what bindgen produces from the header today.
include!("../generate_bindings.rs");

#[test]
fn committed_bindings_equal_bindgen_output_for_the_header() {
    let committed = include_str!("../src/bindings.rs");
    let fresh = generate_bindings();
    assert!(
        committed == fresh,
        "src/bindings.rs is stale: run `cargo run -p sx1302-hal-sys --example generate_bindings`"
    );
}

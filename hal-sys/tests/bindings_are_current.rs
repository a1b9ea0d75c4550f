//! The committed bindings must be exactly what bindgen produces from the header today.
include!("../generate_bindings.rs");

// bindgen runs the build host's libclang: a test binary built for the Pi and run under
// qemu-user (`cross/test`) cannot load it. The check is about the committed file, not the CPU.
#[test]
#[cfg_attr(
    not(target_arch = "x86_64"),
    ignore = "needs the build host's libclang (run it on the host)"
)]
fn committed_bindings_equal_bindgen_output_for_the_header() {
    let committed = include_str!("../src/bindings.rs");
    let fresh = generate_bindings();
    assert!(
        committed == fresh,
        "src/bindings.rs is stale: run `cargo run -p sx1302-hal-sys --example generate_bindings`"
    );
}

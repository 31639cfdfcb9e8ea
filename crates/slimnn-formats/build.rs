//! Compiles the vendored `proto/onnx.proto` with `protox` (a pure-Rust protobuf compiler, so no
//! system `protoc` is needed) and generates the message types with `prost-build`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/onnx.proto");
    let fds = protox::compile(["proto/onnx.proto"], ["proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}

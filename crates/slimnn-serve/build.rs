//! Compiles the vendored KServe v2 `proto/grpc_predict_v2.proto` with `protox` (pure Rust, no
//! system `protoc`) and generates the messages and the tonic server with `tonic-prost-build`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/grpc_predict_v2.proto");
    let fds = protox::compile(["proto/grpc_predict_v2.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(false).build_server(true).compile_fds(fds)?;
    Ok(())
}

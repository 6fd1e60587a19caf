//! Compiles the project's .proto files with protox (a Rust protobuf compiler), so building Weft
//! needs no `protoc` on the machine.

fn main() -> anyhow::Result<()> {
    let protos = ["proto/istio/v1/auth/ca.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}

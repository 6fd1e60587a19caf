//! Compiles the project's .proto files with protox (a Rust protobuf compiler), so building Weft
//! needs no `protoc` on the machine.

fn main() -> anyhow::Result<()> {
    let protos = [
        "proto/istio/v1/auth/ca.proto",
        "proto/istio/workload/workload.proto",
        "proto/istio/security/authorization.proto",
        "proto/google/rpc/status.proto",
        "proto/envoy/config/core/v3/base.proto",
        "proto/envoy/service/discovery/v3/discovery.proto",
        "proto/weft/waypoint/v1/waypoint.proto",
    ];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Maps as BTreeMap: encoding then follows key order, so equal messages encode to equal
        // bytes and a version derived from the bytes changes only when the content does.
        .btree_map(".")
        .compile_fds(descriptors)?;
    Ok(())
}

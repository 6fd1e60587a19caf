//! Compiles the kernel programs (`src/bpf/capture.c`) with clang for the BPF target; the object
//! is embedded in the library. Needs clang (Debian/Ubuntu: `apt-get install clang`) and the
//! kernel UAPI + libbpf headers (`apt-get install libbpf-dev linux-libc-dev`).

use std::{
    env,
    path::{Path, PathBuf},
    process::{exit, Command},
};

const SOURCE: &str = "src/bpf/capture.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=WEFT_BPF_CLANG");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").unwrap_or_default());
    let object = out_dir.join("capture.o");
    let clang = env::var("WEFT_BPF_CLANG").unwrap_or_else(|_| "clang".to_owned());

    let mut cmd = Command::new(&clang);
    cmd.args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"]);
    // <linux/types.h> includes <asm/types.h>, which Debian keeps in the multiarch directory.
    if let Some(dir) = multiarch_include_dir(&clang) {
        cmd.arg(format!("-I{}", dir.display()));
    }
    cmd.arg("-c").arg(SOURCE).arg("-o").arg(&object);

    match cmd.status() {
        Ok(status) if status.success() => {}
        Ok(status) => fail(&format!(
            "`{clang}` failed ({status}) compiling {SOURCE}; the messages above say why. \
             Missing headers? Install them: `apt-get install libbpf-dev linux-libc-dev`"
        )),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => fail(&format!(
            "clang not found (`{clang}`): it compiles the eBPF programs. \
             Install it (Debian/Ubuntu: `apt-get install clang`) or set WEFT_BPF_CLANG to its path"
        )),
        Err(err) => fail(&format!("could not run `{clang}`: {err}")),
    }
}

/// The directory holding `asm/types.h` for the build machine's architecture, when the system
/// keeps it in a multiarch directory (Debian, Ubuntu).
fn multiarch_include_dir(clang: &str) -> Option<PathBuf> {
    // Ask the compiler first, then guess from the architecture cargo builds for.
    let from_clang = Command::new(clang)
        .arg("-print-multiarch")
        .output()
        .ok()
        .and_then(|out| String::from_utf8(out.stdout).ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty());
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let guessed = match arch.as_str() {
        "arm" => "arm-linux-gnueabihf".to_owned(),
        "x86" => "i386-linux-gnu".to_owned(),
        "powerpc64" => "powerpc64le-linux-gnu".to_owned(),
        other => format!("{other}-linux-gnu"),
    };
    from_clang
        .into_iter()
        .chain([guessed])
        .map(|triple| Path::new("/usr/include").join(triple))
        .find(|dir| dir.join("asm/types.h").exists())
}

fn fail(msg: &str) -> ! {
    eprintln!("error: {msg}");
    exit(1)
}

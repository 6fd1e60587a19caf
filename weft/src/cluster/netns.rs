//! Running things inside named network namespaces (`/run/netns/<name>`, as `ip netns` makes
//! them): the `ip` command, commands and processes in a namespace, and closures on a thread
//! that entered one. Knows nothing of the cluster's layout.

use std::ffi::OsStr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use nix::unistd::Pid;

use super::ClusterError;

pub use weft_core::netns::{path as netns_path, DIR as NETNS_DIR};

/// Runs `ip <args>` and returns its standard output; a failure names the command and its
/// standard error.
pub fn ip(args: &[&str]) -> Result<String, ClusterError> {
    run("ip", args)
}

/// Runs `ip -n <netns> <args>`.
pub fn ip_in(netns: &str, args: &[&str]) -> Result<String, ClusterError> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// Sets sysctls (`key=value`) inside `netns` only: `ip netns exec <netns> sysctl -w ...`.
pub fn sysctl_in(netns: &str, settings: &[&str]) -> Result<(), ClusterError> {
    let mut args = vec!["netns", "exec", netns, "sysctl", "-q", "-w"];
    args.extend_from_slice(settings);
    run("ip", &args).map(drop)
}

/// Runs `program args` to completion; its standard output on success.
pub fn run(program: &str, args: &[&str]) -> Result<String, ClusterError> {
    let command = format!("{program} {}", args.join(" "));
    tracing::debug!(%command, "running");
    let out = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ClusterError::Spawn { command: command.clone(), source })?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(ClusterError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

/// The named network namespaces that exist now (the entries of `/run/netns`).
pub fn list_netns() -> Result<Vec<String>, ClusterError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(ClusterError::Io { what: format!("listing {NETNS_DIR}"), source }),
    };
    let mut names: Vec<String> = entries.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
    names.sort();
    Ok(names)
}

/// Stops every process inside `netns`: SIGTERM, then SIGKILL for those still there after
/// `grace`. Without this a deleted namespace lives on (with its interfaces) as long as a process
/// is in it.
pub fn stop_processes_in(netns: &str, grace: Duration) -> Result<(), ClusterError> {
    let first = netns_pids(netns)?;
    if first.is_empty() {
        return Ok(());
    }
    tracing::info!(netns, pids = ?first, "stopping processes left in the namespace");
    for pid in &first {
        // Already gone is fine.
        let _ = nix::sys::signal::kill(*pid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    loop {
        let left = netns_pids(netns)?;
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            for pid in &left {
                let _ = nix::sys::signal::kill(*pid, Signal::SIGKILL);
            }
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The processes whose network namespace is `netns`, but never this one.
pub fn netns_pids(netns: &str) -> Result<Vec<Pid>, ClusterError> {
    let out = ip(&["netns", "pids", netns])?;
    let me = std::process::id();
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .filter(|p| *p != me)
        .filter_map(|p| i32::try_from(p).ok().map(Pid::from_raw))
        .collect())
}

/// Runs `f` on a new thread that entered `netns` (`setns(2)`), and returns its result. Sockets
/// `f` opens belong to `netns` and stay there when the thread ends, so a listener or connection
/// made here can be handed back and used from any thread or runtime. A panic in `f` is
/// re-raised here.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T, ClusterError> {
    Ok(weft_core::netns::run_in(netns, f)?)
}

/// `ip netns exec <netns> <program>`: a command that runs `program` inside `netns` (the
/// process becomes `program` itself: `ip` execs it). Add arguments, environment and stdio, then
/// spawn it; it is killed when its `Child` is dropped. Needs a tokio runtime to spawn.
pub fn command_in(netns: &str, program: impl AsRef<OsStr>) -> tokio::process::Command {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", netns]).arg(program).kill_on_drop(true);
    cmd
}

/// Spawns `cmd` inside `netns`: its program, arguments, environment and working directory are
/// kept; stdin is null, stdout piped (read it for readiness lines), stderr inherited. For other
/// stdio use [`command_in`]. The process is killed when the `Child` is dropped.
pub fn spawn_in(netns: &str, cmd: &std::process::Command) -> Result<tokio::process::Child, ClusterError> {
    let mut outer = command_in(netns, cmd.get_program());
    outer.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => outer.env(key, value),
            None => outer.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        outer.current_dir(dir);
    }
    outer.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    let command = format!(
        "ip netns exec {netns} {} {}",
        cmd.get_program().to_string_lossy(),
        cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
    );
    outer.spawn().map_err(|source| ClusterError::Spawn { command, source })
}

//! The routing half of the capture, in the current network namespace: packets the programs
//! marked are routed locally (`ip rule add fwmark <mark> lookup <table>` and
//! `ip route add local default dev lo table <table>`, for IPv4 and IPv6), so the kernel hands
//! them to the socket the program assigned. Marked packets are also exempt from connection
//! tracking (`iptables -t raw -I PREROUTING -m mark --mark <mark> -j CT --notrack`, ip6tables
//! likewise): kube-proxy's DNAT of Service addresses in PREROUTING would otherwise rewrite a
//! captured SYN to a Service's cluster IP after the program assigned it to ztunnel's listener,
//! and the kernel would answer the rewritten SYN with a reset (found on a real kubelet; ztunnel
//! resolves Service addresses itself, as Istio's does). Driven through iproute2's `ip` and
//! iptables; knows nothing of the programs.

use std::{path::Path, process::Command};

use crate::Error;

/// The address families we route; IPv6 is skipped when the namespace has it disabled.
const FAMILIES: [(&str, &str); 2] = [("-4", "0.0.0.0/0"), ("-6", "::/0")];

/// Adds the rule (unless present) and the local route (replaced) for both families.
pub(crate) fn ensure(mark: u32, table: u32) -> Result<(), Error> {
    for (family, default) in FAMILIES {
        if family == "-6" && !ipv6_enabled() {
            continue;
        }
        let (mark, table) = (format!("{mark:#x}"), table.to_string());
        let rule = ["fwmark", mark.as_str(), "lookup", table.as_str()];
        let shown = ip(&[&[family, "rule", "show"], &rule[..]].concat())?;
        if shown.trim().is_empty() {
            ip(&[&[family, "rule", "add"], &rule[..]].concat())?;
        }
        ip(&[family, "route", "replace", "local", default, "dev", "lo", "table", &table])?;
        if !notrack(family, &mark, "-C")? {
            notrack(family, &mark, "-I")?;
        }
    }
    Ok(())
}

/// Runs `iptables|ip6tables -w -t raw <action> PREROUTING -m mark --mark <mark> -j CT --notrack`;
/// whether it succeeded (`-C`: whether the rule is there). Without the binary: a warning and
/// `true` (no kube-proxy is likely either; Service addresses then need no exemption).
fn notrack(family: &str, mark: &str, action: &str) -> Result<bool, Error> {
    let program = if family == "-6" { "ip6tables" } else { "iptables" };
    let mut args = vec!["-w", "-t", "raw", action, "PREROUTING"];
    if action == "-I" {
        args.push("1");
    }
    args.extend(["-m", "mark", "--mark", mark, "-j", "CT", "--notrack"]);
    let out = match Command::new(program).args(&args).output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            tracing::warn!(
                program,
                "not found: captured connections to Service addresses stay subject to kube-proxy's DNAT"
            );
            return Ok(true);
        }
        Err(source) => return Err(Error::IpCommand { source }),
    };
    match (action, out.status.code()) {
        (_, Some(0)) => Ok(true),
        // `-C` and `-D`: no such rule.
        ("-C" | "-D", Some(1)) => Ok(false),
        _ => Err(Error::Routing {
            command: format!("{program} {}", args.join(" ")),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }),
    }
}

/// Deletes every copy of the rule and the local route; absent entries are fine.
pub(crate) fn remove(mark: u32, table: u32) -> Result<(), Error> {
    for (family, default) in FAMILIES {
        if family == "-6" && !ipv6_enabled() {
            continue;
        }
        let (mark, table) = (format!("{mark:#x}"), table.to_string());
        let rule = ["fwmark", mark.as_str(), "lookup", table.as_str()];
        // `ip rule add` twice makes two rules; delete until none is left (bounded).
        for _ in 0..16 {
            let shown = ip(&[&[family, "rule", "show"], &rule[..]].concat())?;
            if shown.trim().is_empty() {
                break;
            }
            ip(&[&[family, "rule", "del"], &rule[..]].concat())?;
        }
        for _ in 0..16 {
            if !notrack(family, &mark, "-D")? {
                break;
            }
        }
        match ip(&[family, "route", "del", "local", default, "dev", "lo", "table", &table]) {
            // Absent: IPv4 says ESRCH, IPv6 ENOENT.
            Err(Error::Routing { stderr, .. })
                if stderr.contains("No such process") || stderr.contains("No such file or directory") => {}
            other => {
                other?;
            }
        }
    }
    Ok(())
}

fn ipv6_enabled() -> bool {
    // thread-self: the loader may run on a thread that entered another network namespace.
    Path::new("/proc/thread-self/net/if_inet6").exists()
}

/// Runs `ip ARGS` (in the calling thread's network namespace: the child inherits it) and
/// returns its standard output.
fn ip(args: &[&str]) -> Result<String, Error> {
    let out = Command::new("ip").args(args).output().map_err(|source| Error::IpCommand { source })?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let command = format!("ip {}", args.join(" "));
    if stderr.contains("Operation not permitted") {
        return Err(Error::NotPermitted { what: command });
    }
    Err(Error::Routing { command, stderr })
}

/// Lets `ifname` (a pod's host veth) take IPv4 packets whose source is an address of this node:
/// the node's own connections to a pod, turned back into the veth's ingress by `weft_pod_out`,
/// carry the node's address, and without `accept_local` the kernel drops them as martians.
pub(crate) fn accept_local(ifname: &str) -> Result<(), Error> {
    let path = Path::new("/proc/sys/net/ipv4/conf").join(ifname).join("accept_local");
    std::fs::write(&path, "1").map_err(|source| Error::Io { what: "writing", path, source })
}

//! Protocol detection of a stream whose port declares none: the first bytes the client sends
//! decide between HTTP/2 (the connection preface), HTTP/1.x (a request line) and anything else
//! (TCP, forwarded as bytes). Pure: [`sniff`] looks at a prefix; the caller reads more while it
//! answers [`Sniffed::NeedMore`], up to [`MAX_SNIFF`] bytes and its deadline.

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The most read before deciding: a request line longer than this is not taken for HTTP.
pub const MAX_SNIFF: usize = 16 * 1024;
/// The longest method recognised (Envoy's inspector takes any token; WebDAV's are the longest
/// common ones).
const MAX_METHOD: usize = 24;

/// What the first bytes of a stream are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniffed {
    Http1,
    Http2,
    Tcp,
    /// Not decidable yet: read more (if the limit and the deadline allow).
    NeedMore,
}

/// Decides on `prefix`, the bytes received so far. HTTP/2: the preface. HTTP/1.x: a request
/// line `METHOD SP target SP HTTP/1.x` ending in CRLF (or LF), the method a token of capital
/// letters, `-` or `_`. Anything that cannot become either is TCP.
pub fn sniff(prefix: &[u8]) -> Sniffed {
    if prefix.is_empty() {
        return Sniffed::NeedMore;
    }
    let n = prefix.len().min(H2_PREFACE.len());
    if prefix[..n] == H2_PREFACE[..n] {
        // `PRI` is also a token an HTTP/1 request line could start with; only the whole
        // preface is HTTP/2, and a prefix of it is not yet anything.
        return if n == H2_PREFACE.len() { Sniffed::Http2 } else { Sniffed::NeedMore };
    }
    request_line(prefix)
}

fn request_line(prefix: &[u8]) -> Sniffed {
    let method_len =
        prefix.iter().take_while(|b| b.is_ascii_uppercase() || **b == b'-' || **b == b'_').count();
    if method_len > MAX_METHOD {
        return Sniffed::Tcp;
    }
    match prefix.get(method_len) {
        None => return if method_len == prefix.len() { Sniffed::NeedMore } else { Sniffed::Tcp },
        Some(b' ') if method_len > 0 => {}
        Some(_) => return Sniffed::Tcp,
    }
    let rest = &prefix[method_len + 1..];
    let Some(end) = rest.iter().position(|b| *b == b'\n') else {
        // The target and version may still come; but not control bytes.
        return if prefix.len() >= MAX_SNIFF || rest.iter().any(|b| b.is_ascii_control()) {
            Sniffed::Tcp
        } else {
            Sniffed::NeedMore
        };
    };
    let line = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
    let Some(space) = line.iter().rposition(|b| *b == b' ') else { return Sniffed::Tcp };
    let (target, version) = (&line[..space], &line[space + 1..]);
    let version_ok = version == b"HTTP/1.1" || version == b"HTTP/1.0";
    if version_ok && !target.is_empty() && !target.iter().any(|b| b.is_ascii_control() || *b == b' ') {
        Sniffed::Http1
    } else {
        Sniffed::Tcp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cases: &[(&[u8], Sniffed)] = &[
            (b"", Sniffed::NeedMore),
            (b"G", Sniffed::NeedMore),
            (b"GET", Sniffed::NeedMore),
            (b"GET ", Sniffed::NeedMore),
            (b"GET /index.html HTTP/1.1", Sniffed::NeedMore),
            (b"GET / HTTP/1.1\r\n", Sniffed::Http1),
            (b"GET / HTTP/1.0\n", Sniffed::Http1),
            (b"POST /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n", Sniffed::Http1),
            (b"OPTIONS * HTTP/1.1\r\n", Sniffed::Http1),
            (b"CONNECT a:443 HTTP/1.1\r\n", Sniffed::Http1),
            (b"VERSION-CONTROL / HTTP/1.1\r\n", Sniffed::Http1),
            (b"GET / HTTP/2.0\r\n", Sniffed::Tcp),
            (b"GET / SPDY/3\r\n", Sniffed::Tcp),
            (b"GET  HTTP/1.1\r\n", Sniffed::Tcp),
            (b"GET a b HTTP/1.1\r\n", Sniffed::Tcp),
            (b"get / HTTP/1.1\r\n", Sniffed::Tcp),
            (b" / HTTP/1.1\r\n", Sniffed::Tcp),
            (b"\x16\x03\x01\x02\x00", Sniffed::Tcp),
            (b"SSH-2.0-OpenSSH_9.2\r\n", Sniffed::Tcp),
            (b"GET /\x00 HTTP/1.1\r\n", Sniffed::Tcp),
            (b"PRI", Sniffed::NeedMore),
            (b"PRI * HTTP/2.0\r\n", Sniffed::NeedMore),
            (H2_PREFACE, Sniffed::Http2),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04", Sniffed::Http2),
            (b"PRI * HTTP/1.1\r\n", Sniffed::Http1),
            (b"ABCDEFGHIJKLMNOPQRSTUVWXYZ / HTTP/1.1\r\n", Sniffed::Tcp),
        ];
        for (input, want) in cases {
            assert_eq!(sniff(input), *want, "{:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn a_request_line_without_end_stops_at_the_limit() {
        let mut long = b"GET /".to_vec();
        long.resize(MAX_SNIFF, b'a');
        assert_eq!(sniff(&long), Sniffed::Tcp);
        long.truncate(MAX_SNIFF - 1);
        assert_eq!(sniff(&long), Sniffed::NeedMore);
    }
}

//! Path normalization before routing (and, later, authorization), as Istio configures Envoy by
//! default (`pathNormalization: BASE`, RFC 3986 normalization): `.` and `..` segments are
//! resolved, and a path that is not in origin form is refused. The query is kept as sent.
//! Percent-encoded bytes are left encoded (Envoy's BASE does not decode `%2F`), so `/a%2F..`
//! stays one segment.

/// Why a path was refused (400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("the request target is not in origin form (it must start with /)")]
    NotOriginForm,
    #[error("the path contains a control character, a space, a backslash or '#'")]
    BadCharacter,
}

/// `path_and_query` normalized (see the module docs).
pub fn normalize_path(path_and_query: &str) -> Result<String, PathError> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    if !path.starts_with('/') {
        return Err(PathError::NotOriginForm);
    }
    if path.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'\\' || b == b'#') {
        return Err(PathError::BadCharacter);
    }
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    let mut trailing_slash = false;
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => trailing_slash = i == last,
            ".." => {
                out.pop();
                trailing_slash = i == last;
            }
            s => {
                out.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut normalized = String::with_capacity(path_and_query.len());
    normalized.push('/');
    normalized.push_str(&out.join("/"));
    if trailing_slash && !normalized.ends_with('/') {
        normalized.push('/');
    }
    if let Some(query) = query {
        normalized.push('?');
        normalized.push_str(query);
    }
    Ok(normalized)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok = [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/a/./b", "/a/b"),
            ("/a/../b", "/b"),
            ("/../../etc/passwd", "/etc/passwd"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/a//b", "/a//b"),
            ("/a/%2e%2e/b", "/a/%2e%2e/b"),
            ("/admin/..?x=../y", "/?x=../y"),
            ("/a?", "/a?"),
        ];
        for (given, want) in ok {
            assert_eq!(normalize_path(given).as_deref(), Ok(want), "{given}");
        }
        for bad in ["", "a/b", "*", "http://x/", "/a b", "/a\\b", "/a#b", "/a\u{1}"] {
            assert!(normalize_path(bad).is_err(), "{bad:?} should be refused");
        }
    }
}

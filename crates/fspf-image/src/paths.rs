//! Layer member names: where a member lands in the image root, and which names are refused
//! because an extractor would write outside the root (`..`, absolute names, links climbing out).

/// The member's path in the image root, as `/a/b` bytes (`/` for the root itself), or why it is
/// refused. Leading `./` and empty or `.` components are dropped.
pub fn member_path(name: &[u8]) -> Result<Vec<u8>, &'static str> {
    if name.first() == Some(&b'/') {
        return Err("absolute member name");
    }
    if name.contains(&0) {
        return Err("NUL byte in member name");
    }
    let mut out = Vec::with_capacity(name.len() + 1);
    for c in name.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("'..' in member name"),
            c => {
                out.push(b'/');
                out.extend_from_slice(c);
            }
        }
    }
    if out.is_empty() {
        out.push(b'/');
    }
    Ok(out)
}

/// Does the symlink `target`, stored at `member` (a [`member_path`]), climb above the image
/// root? An absolute target resolves inside the container's root at run time, so it does not.
pub fn symlink_escapes(member: &[u8], target: &[u8]) -> bool {
    if target.first() == Some(&b'/') {
        return false;
    }
    // Depth of the directory holding the link.
    let mut depth: i64 = member
        .split(|&b| b == b'/')
        .filter(|c| !c.is_empty())
        .count() as i64
        - 1;
    for c in target.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => {
                depth -= 1;
                if depth < 0 {
                    return true;
                }
            }
            _ => depth += 1,
        }
    }
    false
}

/// The proper ancestors of `path` (a [`member_path`]), root first: `/a/b/c` gives `/`, `/a`, `/a/b`.
pub fn ancestors(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let root: &[u8] = b"/";
    let inner = path
        .iter()
        .enumerate()
        .skip(1)
        .filter(|(_, &b)| b == b'/')
        .map(move |(i, _)| &path[..i]);
    std::iter::once(root)
        .filter(move |_| path != b"/")
        .chain(inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_names_normalise_and_escapes_are_refused() {
        assert_eq!(member_path(b"./usr/bin/x").unwrap(), b"/usr/bin/x");
        assert_eq!(member_path(b"usr/lib/").unwrap(), b"/usr/lib");
        assert_eq!(member_path(b"./").unwrap(), b"/");
        assert_eq!(member_path(b"a//./b").unwrap(), b"/a/b");
        assert!(member_path(b"../etc/passwd").is_err());
        assert!(member_path(b"a/../../b").is_err());
        assert!(member_path(b"/etc/passwd").is_err());
    }

    #[test]
    fn symlinks_climbing_above_the_root_escape() {
        assert!(!symlink_escapes(b"/usr/bin/python3", b"python3.11"));
        assert!(!symlink_escapes(b"/bin", b"usr/bin"));
        assert!(!symlink_escapes(b"/usr/lib/x", b"../../etc/os-release"));
        assert!(symlink_escapes(b"/usr/lib/x", b"../../../etc/passwd"));
        assert!(symlink_escapes(b"/x", b"../y"));
        assert!(!symlink_escapes(b"/x", b"/etc/passwd"));
    }

    #[test]
    fn ancestors_are_listed_root_first() {
        let a: Vec<&[u8]> = ancestors(b"/a/b/c").collect();
        assert_eq!(a, vec![&b"/"[..], b"/a", b"/a/b"]);
        assert_eq!(ancestors(b"/").count(), 0);
        assert_eq!(ancestors(b"/a").collect::<Vec<_>>(), vec![&b"/"[..]]);
    }
}

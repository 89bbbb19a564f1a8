//! Header line of a stdio stream connection.
//!
//! Each stdio stream of a process is its own vsock connection to the agent's
//! I/O port (`vmrt.io_port=`, default [`crate::DEFAULT_IO_PORT`]). The shim
//! writes one line first:
//!
//! ```text
//! <container_id> <exec_id or -> <stdin|stdout|stderr>\n
//! ```
//!
//! then raw bytes follow. `-` names the container's init process. Ids are
//! 1..=[`MAX_ID_LEN`] characters of `[A-Za-z0-9_.-]`; the whole line,
//! newline included, is at most [`MAX_HEADER_LINE`] bytes.

use std::fmt;
use std::str::FromStr;

/// Longest container id or exec id accepted, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Longest header line accepted, in bytes, trailing `\n` included.
pub const MAX_HEADER_LINE: usize = 300;

/// Placeholder written in place of the exec id for the container's init
/// process (whose exec id is the empty string in the API).
const INIT_EXEC_PLACEHOLDER: &str = "-";

/// Which standard stream of a process a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StdioStream {
    /// Host → process standard input. Closing the write side is EOF.
    Stdin,
    /// Process standard output (or the terminal output) → host.
    Stdout,
    /// Process standard error → host.
    Stderr,
}

impl StdioStream {
    /// The word used in the header line: `stdin`, `stdout` or `stderr`.
    pub fn as_str(self) -> &'static str {
        match self {
            StdioStream::Stdin => "stdin",
            StdioStream::Stdout => "stdout",
            StdioStream::Stderr => "stderr",
        }
    }
}

impl fmt::Display for StdioStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for StdioStream {
    type Err = StreamHeaderError;

    /// Parses exactly `stdin`, `stdout` or `stderr`.
    ///
    /// # Errors
    /// [`StreamHeaderError::UnknownStream`] for anything else.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdin" => Ok(StdioStream::Stdin),
            "stdout" => Ok(StdioStream::Stdout),
            "stderr" => Ok(StdioStream::Stderr),
            other => Err(StreamHeaderError::UnknownStream(truncate(other))),
        }
    }
}

/// Parsed header line of a stdio stream connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamHeader {
    /// Container id.
    pub container_id: String,
    /// Exec id; the empty string for the container's init process (`-` on
    /// the wire).
    pub exec_id: String,
    /// Which stream this connection carries.
    pub stream: StdioStream,
}

/// Error of formatting or parsing a [`StreamHeader`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StreamHeaderError {
    /// The line is longer than [`MAX_HEADER_LINE`] bytes (or has no newline
    /// within that many bytes).
    #[error("stream header longer than {MAX_HEADER_LINE} bytes")]
    TooLong,
    /// The line does not end with exactly one `\n`.
    #[error("stream header does not end with a single newline")]
    MissingNewline,
    /// The line is not UTF-8.
    #[error("stream header is not UTF-8")]
    NotUtf8,
    /// The line does not have exactly three fields separated by one space.
    #[error("stream header has {0} space-separated fields, expected 3")]
    FieldCount(usize),
    /// A container or exec id is empty, too long or has a character outside
    /// `[A-Za-z0-9_.-]`.
    #[error("invalid {field} {value:?}: must be 1..={MAX_ID_LEN} characters of [A-Za-z0-9_.-]")]
    InvalidId {
        /// `container_id` or `exec_id`.
        field: &'static str,
        /// The offending value (cut to 64 bytes).
        value: String,
    },
    /// The stream word is not `stdin`, `stdout` or `stderr`.
    #[error("unknown stream {0:?}: expected stdin, stdout or stderr")]
    UnknownStream(String),
    /// An exec id of exactly `-` cannot be sent: on the wire it names the
    /// init process.
    #[error("exec id \"-\" is reserved for the init process")]
    ReservedExecId,
}

/// Keeps error messages bounded whatever the peer sent.
fn truncate(s: &str) -> String {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

/// Whether `id` is a valid container or exec id: 1..=[`MAX_ID_LEN`] bytes
/// of `[A-Za-z0-9_.-]`.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-')
}

fn check_id(field: &'static str, value: &str) -> Result<(), StreamHeaderError> {
    if is_valid_id(value) {
        Ok(())
    } else {
        Err(StreamHeaderError::InvalidId {
            field,
            value: truncate(value),
        })
    }
}

impl StreamHeader {
    /// Builds a header; `exec_id` is `""` for the init process.
    pub fn new(container_id: &str, exec_id: &str, stream: StdioStream) -> Self {
        StreamHeader {
            container_id: container_id.to_string(),
            exec_id: exec_id.to_string(),
            stream,
        }
    }

    /// Formats the header line, trailing `\n` included.
    ///
    /// # Errors
    /// [`StreamHeaderError::InvalidId`] when an id is not valid,
    /// [`StreamHeaderError::ReservedExecId`] for exec id `-`.
    pub fn encode(&self) -> Result<String, StreamHeaderError> {
        check_id("container_id", &self.container_id)?;
        let exec = if self.exec_id.is_empty() {
            INIT_EXEC_PLACEHOLDER
        } else if self.exec_id == INIT_EXEC_PLACEHOLDER {
            return Err(StreamHeaderError::ReservedExecId);
        } else {
            check_id("exec_id", &self.exec_id)?;
            &self.exec_id
        };
        let line = format!("{} {} {}\n", self.container_id, exec, self.stream);
        debug_assert!(line.len() <= MAX_HEADER_LINE);
        Ok(line)
    }

    /// Parses one header line, which must end with `\n` and contain no
    /// other newline.
    ///
    /// # Errors
    /// Any [`StreamHeaderError`] naming what is wrong with the line; never
    /// panics whatever the bytes.
    pub fn parse(line: &[u8]) -> Result<Self, StreamHeaderError> {
        if line.len() > MAX_HEADER_LINE {
            return Err(StreamHeaderError::TooLong);
        }
        let body = match line.split_last() {
            Some((b'\n', body)) if !body.contains(&b'\n') => body,
            _ => return Err(StreamHeaderError::MissingNewline),
        };
        let body = std::str::from_utf8(body).map_err(|_| StreamHeaderError::NotUtf8)?;
        let fields: Vec<&str> = body.split(' ').collect();
        if fields.len() != 3 {
            return Err(StreamHeaderError::FieldCount(fields.len()));
        }
        check_id("container_id", fields[0])?;
        let exec_id = if fields[1] == INIT_EXEC_PLACEHOLDER {
            String::new()
        } else {
            check_id("exec_id", fields[1])?;
            fields[1].to_string()
        };
        let stream = fields[2].parse()?;
        Ok(StreamHeader {
            container_id: fields[0].to_string(),
            exec_id,
            stream,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_init_and_exec() {
        let h = StreamHeader::new("c1", "", StdioStream::Stdin);
        assert_eq!(h.encode().unwrap(), "c1 - stdin\n");
        assert_eq!(StreamHeader::parse(b"c1 - stdin\n").unwrap(), h);

        let h = StreamHeader::new("abc.DEF_1-2", "exec-7", StdioStream::Stderr);
        let line = h.encode().unwrap();
        assert_eq!(line, "abc.DEF_1-2 exec-7 stderr\n");
        assert_eq!(StreamHeader::parse(line.as_bytes()).unwrap(), h);
    }

    #[test]
    fn longest_ids_fit() {
        let id = "a".repeat(MAX_ID_LEN);
        let h = StreamHeader::new(&id, &id, StdioStream::Stdout);
        let line = h.encode().unwrap();
        assert!(line.len() <= MAX_HEADER_LINE);
        assert_eq!(StreamHeader::parse(line.as_bytes()).unwrap(), h);
    }

    #[test]
    fn encode_rejects_bad_ids() {
        for (c, e) in [
            ("", "x"),
            ("a b", "x"),
            ("a/b", ""),
            ("c", "e\n"),
            ("c", "é"),
        ] {
            assert!(matches!(
                StreamHeader::new(c, e, StdioStream::Stdin).encode(),
                Err(StreamHeaderError::InvalidId { .. })
            ));
        }
        let long = "a".repeat(MAX_ID_LEN + 1);
        assert!(StreamHeader::new(&long, "", StdioStream::Stdin)
            .encode()
            .is_err());
        assert_eq!(
            StreamHeader::new("c", "-", StdioStream::Stdin).encode(),
            Err(StreamHeaderError::ReservedExecId)
        );
    }

    #[test]
    fn parse_rejects_garbage() {
        use StreamHeaderError::*;
        let cases: &[(&[u8], StreamHeaderError)] = &[
            (b"", MissingNewline),
            (b"\n", FieldCount(1)),
            (
                b"  stdin\n",
                InvalidId {
                    field: "container_id",
                    value: String::new(),
                },
            ),
            (b"c1 - stdin", MissingNewline),
            (b"c1 - stdin\n\n", MissingNewline),
            (b"c1 - stdin\nxyz", MissingNewline),
            (b"c1 - stdin\r\n", UnknownStream("stdin\r".into())),
            (b"c1 -  stdin\n", FieldCount(4)),
            (b"c1 stdin\n", FieldCount(2)),
            (b"c1 - stdin extra\n", FieldCount(4)),
            (b"c1 - STDIN\n", UnknownStream("STDIN".into())),
            (
                b"c/1 - stdin\n",
                InvalidId {
                    field: "container_id",
                    value: "c/1".into(),
                },
            ),
            (
                b"c1 e\x00 stdout\n",
                InvalidId {
                    field: "exec_id",
                    value: "e\0".into(),
                },
            ),
            (b"c1 \xff\xfe stdout\n", NotUtf8),
        ];
        for (input, want) in cases {
            assert_eq!(
                &StreamHeader::parse(input).unwrap_err(),
                want,
                "input {input:?}"
            );
        }
        // An HTTP request line has three fields but "/" is not a valid id.
        assert!(matches!(
            StreamHeader::parse(b"GET / HTTP/1.1\r\n"),
            Err(InvalidId {
                field: "exec_id",
                ..
            })
        ));
        let long = format!("{} - stdin\n", "a".repeat(MAX_HEADER_LINE));
        assert_eq!(StreamHeader::parse(long.as_bytes()), Err(TooLong));
        let long_id = format!("{} - stdin\n", "a".repeat(MAX_ID_LEN + 1));
        assert!(matches!(
            StreamHeader::parse(long_id.as_bytes()),
            Err(InvalidId {
                field: "container_id",
                ..
            })
        ));
    }

    #[test]
    fn error_values_are_bounded() {
        let junk = format!("{} - stdin\n", "/".repeat(200));
        match StreamHeader::parse(junk.as_bytes()) {
            Err(StreamHeaderError::InvalidId { value, .. }) => assert_eq!(value.len(), 64),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn id_strategy() -> impl Strategy<Value = String> {
        "[A-Za-z0-9_.-]{1,128}"
    }

    proptest! {
        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = StreamHeader::parse(&bytes);
        }

        #[test]
        fn parse_of_encode_round_trips(c in id_strategy(), e in id_strategy(), s in 0u8..3) {
            let stream = [StdioStream::Stdin, StdioStream::Stdout, StdioStream::Stderr][s as usize];
            let e = if e == "-" { String::new() } else { e };
            let h = StreamHeader::new(&c, &e, stream);
            let line = h.encode().unwrap();
            prop_assert!(line.len() <= MAX_HEADER_LINE);
            prop_assert_eq!(StreamHeader::parse(line.as_bytes()).unwrap(), h);
        }

        #[test]
        fn accepted_lines_reencode_identically(bytes in "[a-z0-9 .-]{0,40}\n") {
            if let Ok(h) = StreamHeader::parse(bytes.as_bytes()) {
                prop_assert_eq!(h.encode().unwrap(), bytes);
            }
        }
    }
}

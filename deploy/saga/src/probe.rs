//! `saga probe <url> [--timeout <secs>]`: one HTTP/1.0 GET over a plain TCP
//! connection, exit 0 when the status is 200 and 1 otherwise (the reason on
//! stderr). It is the container's health check (the image has no shell, no
//! curl), so it only needs `http://host[:port][/path]` on the local network:
//! no TLS, no redirects, no body.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(2);

/// Runs the probe with its arguments (after `probe`).
pub(crate) fn main(args: &[OsString]) -> ExitCode {
    match parse_args(args).and_then(|(url, timeout)| get_status(&url, timeout)) {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("probe: status {status}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("probe: {e}");
            ExitCode::FAILURE
        }
    }
}

fn parse_args(args: &[OsString]) -> Result<(String, Duration), String> {
    let mut url = None;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut it = args.iter().map(|a| a.to_str().ok_or("arguments must be UTF-8"));
    while let Some(arg) = it.next() {
        match arg? {
            "--timeout" => {
                let secs = it.next().ok_or("--timeout needs a number of seconds")??;
                let secs: f64 = secs
                    .parse()
                    .map_err(|_| format!("--timeout {secs:?}: not a number"))?;
                timeout = Duration::try_from_secs_f64(secs)
                    .ok()
                    .filter(|d| !d.is_zero())
                    .ok_or(format!("--timeout {secs}: must be a positive number of seconds"))?;
            }
            a if url.is_none() && !a.starts_with('-') => url = Some(a.to_owned()),
            a => {
                return Err(format!(
                    "unexpected argument {a:?} (usage: saga probe <http://host:port/path> [--timeout SECS])"
                ))
            }
        }
    }
    Ok((
        url.ok_or("usage: saga probe <http://host:port/path> [--timeout SECS]")?,
        timeout,
    ))
}

/// `host:port` and the path of an `http://` URL.
fn split_url(url: &str) -> Result<(String, &str), String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("{url:?}: only http:// URLs are probed"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("{url:?}: expected http://host[:port][/path]"));
    }
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let addr = if has_port {
        authority.to_owned()
    } else {
        format!("{authority}:80")
    };
    Ok((addr, path))
}

/// The status code of `GET url`, everything (connect, write, read) within `timeout`.
fn get_status(url: &str, timeout: Duration) -> Result<u16, String> {
    let (addr, path) = split_url(url)?;
    let host = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
    let target = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(|e| format!("{addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    stream
        .set_write_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    // One write: `write!` on an unbuffered stream sends each piece of the
    // format on its own, and a server that answers after the first piece and
    // closes would fail the rest with EPIPE.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{addr}: {e}"))?;
    // The status line is all we need: read until its end (or 1 KiB).
    let mut head = Vec::with_capacity(128);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        let n = stream.read(&mut buf).map_err(|e| format!("{addr}: {e}"))?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    parse_status(&head).ok_or_else(|| format!("{addr}: not an HTTP response"))
}

/// The code of a status line such as `HTTP/1.1 200 OK`.
fn parse_status(head: &[u8]) -> Option<u16> {
    let line = head.split(|&b| b == b'\n').next()?;
    let line = std::str::from_utf8(line).ok()?;
    let mut parts = line.split_whitespace();
    parts.next().filter(|v| v.starts_with("HTTP/"))?;
    parts.next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_address_and_path() {
        assert_eq!(
            split_url("http://127.0.0.1:9464/ready"),
            Ok(("127.0.0.1:9464".into(), "/ready"))
        );
        assert_eq!(split_url("http://localhost"), Ok(("localhost:80".into(), "/")));
        assert_eq!(
            split_url("http://[::1]:9465/ready"),
            Ok(("[::1]:9465".into(), "/ready"))
        );
        assert_eq!(split_url("http://[::1]/x"), Ok(("[::1]:80".into(), "/x")));
        assert!(split_url("https://x/ready").is_err());
        assert!(split_url("http:///ready").is_err());
    }

    #[test]
    fn status_lines_parse() {
        assert_eq!(
            parse_status(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"),
            Some(200)
        );
        assert_eq!(parse_status(b"HTTP/1.0 503 Service Unavailable\r\n"), Some(503));
        assert_eq!(parse_status(b"SSH-2.0-OpenSSH\r\n"), None);
        assert_eq!(parse_status(b""), None);
    }

    #[test]
    fn arguments_are_checked() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        assert_eq!(
            parse_args(&args(&["http://a:1/r", "--timeout", "0.5"])),
            Ok(("http://a:1/r".into(), Duration::from_millis(500)))
        );
        assert!(parse_args(&args(&[])).is_err());
        assert!(parse_args(&args(&["http://a:1/r", "--timeout", "-1"])).is_err());
        assert!(parse_args(&args(&["http://a:1/r", "extra"])).is_err());
    }

    #[test]
    fn a_live_server_answers_200_or_not() {
        use std::net::TcpListener;
        let serve = |reply: &'static str| {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
            let port = listener.local_addr().expect("addr").port();
            std::thread::spawn(move || {
                if let Ok((mut s, _)) = listener.accept() {
                    // The whole request head, as an HTTP server reads it.
                    let (mut req, mut buf) = (Vec::new(), [0u8; 512]);
                    while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => req.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = s.write_all(reply.as_bytes());
                }
            });
            format!("http://127.0.0.1:{port}/ready")
        };
        let ok = serve("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
        assert_eq!(get_status(&ok, DEFAULT_TIMEOUT), Ok(200));
        let down = serve("HTTP/1.1 503 Service Unavailable\r\n\r\n");
        assert_eq!(get_status(&down, DEFAULT_TIMEOUT), Ok(503));
    }
}

//! A small HTTP/1.1 server on a loopback port, for the grants tests and the HTTP benchmark: one
//! thread per connection, one request per connection. Routes:
//! - `/json`: a 1 KiB JSON document;
//! - `/echo`: the request's method, path, headers (names lower-cased) and body, as JSON;
//! - `/bytes/N`: N bytes of `x` with a `Content-Length`; `/chunked/N`: the same, chunked, in
//!   64 KiB chunks (the size is not known in advance);
//! - `/stall`: reads the request and never answers (until the client goes away);
//! - `/redirect?to=URL`: 302 to URL.
//!
//! It counts the requests it received, and whether a stalled connection was closed by the client.

use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A running server; it stops with the test process.
#[derive(Debug, Clone)]
pub struct Loopback {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    stalls_closed: Arc<AtomicU64>,
}

impl Loopback {
    /// A server on `ip` (a loopback address) and an ephemeral port.
    pub fn start(ip: IpAddr) -> Loopback {
        let listener = TcpListener::bind((ip, 0)).expect("bind a loopback port");
        let server = Loopback {
            addr: listener.local_addr().expect("local address"),
            requests: Arc::default(),
            stalls_closed: Arc::default(),
        };
        let s = server.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let s = s.clone();
                std::thread::spawn(move || s.serve(stream));
            }
        });
        server
    }

    /// `http://ip:port` followed by `path`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// How many requests arrived.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    /// How many `/stall` connections the client has closed.
    pub fn stalls_closed(&self) -> u64 {
        self.stalls_closed.load(Ordering::SeqCst)
    }

    fn serve(&self, stream: TcpStream) {
        let _ = stream.set_nodelay(true);
        let mut reader = BufReader::new(match stream.try_clone() {
            Ok(s) => s,
            Err(_) => return,
        });
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or("").to_owned();
        let target = parts.next().unwrap_or("").to_owned();
        let mut headers = Vec::new();
        let mut length = 0usize;
        let mut chunked = false;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                let (k, v) = (k.trim().to_ascii_lowercase(), v.trim().to_owned());
                if k == "content-length" {
                    length = v.parse().unwrap_or(0);
                }
                if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                    chunked = true;
                }
                headers.push((k, v));
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        while chunked {
            let mut size = String::new();
            if reader.read_line(&mut size).unwrap_or(0) == 0 {
                return;
            }
            let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; n + 2];
            if reader.read_exact(&mut chunk).is_err() {
                return;
            }
            body.extend_from_slice(&chunk[..n]);
            chunked = n > 0;
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut out = stream;
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let respond = |out: &mut TcpStream, status: &str, extra: &str, body: &[u8]| {
            let head = format!(
                "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{extra}\r\n",
                body.len()
            );
            let _ = out.write_all(head.as_bytes());
            let _ = out.write_all(body);
        };
        if path == "/json" {
            let items: Vec<String> = (0..31)
                .map(|i| format!("\"item-{i:02}-xxxxxxxxxxxxxxxxx\""))
                .collect();
            let doc = format!("{{\"items\":[{}]}}", items.join(","));
            let doc = format!("{doc:<1024}");
            respond(
                &mut out,
                "200 OK",
                "content-type: application/json\r\n",
                doc.as_bytes(),
            );
        } else if path == "/echo" {
            let v = serde_json::json!({
                "method": method,
                "path": target,
                "headers": headers.iter().map(|(k, v)| serde_json::json!([k, v])).collect::<Vec<_>>(),
                "body": String::from_utf8_lossy(&body),
            });
            respond(
                &mut out,
                "200 OK",
                "content-type: application/json\r\n",
                v.to_string().as_bytes(),
            );
        } else if let Some(n) = path.strip_prefix("/bytes/") {
            let n: usize = n.parse().unwrap_or(0);
            respond(&mut out, "200 OK", "", &vec![b'x'; n]);
        } else if let Some(n) = path.strip_prefix("/chunked/") {
            let mut left: u64 = n.parse().unwrap_or(0);
            let head = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";
            if out.write_all(head.as_bytes()).is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 << 10];
            while left > 0 {
                let n = left.min(chunk.len() as u64) as usize;
                let frame = [format!("{n:x}\r\n").as_bytes(), &chunk[..n], b"\r\n"].concat();
                if out.write_all(&frame).is_err() {
                    return;
                }
                left -= n as u64;
            }
            let _ = out.write_all(b"0\r\n\r\n");
        } else if path == "/stall" {
            // Never answer; notice when the client closes the connection.
            let _ = out.set_read_timeout(Some(Duration::from_secs(120)));
            let mut buf = [0u8; 1];
            if matches!(reader.read(&mut buf), Ok(0)) {
                self.stalls_closed.fetch_add(1, Ordering::SeqCst);
            }
        } else if path == "/redirect" {
            let to = query.strip_prefix("to=").unwrap_or("/");
            respond(&mut out, "302 Found", &format!("location: {to}\r\n"), b"");
        } else {
            respond(&mut out, "404 Not Found", "", b"not found");
        }
    }
}

//! HTTP cameras: JPEG snapshots polled at the camera's fps, or an MJPEG stream
//! (`multipart/x-mixed-replace`), told apart by the answer's Content-Type.
//!
//! HTTP/1.1 GET is spoken here over std's `TcpStream` with read timeouts of
//! [`StopToken::POLL`], rather than through an HTTP crate: a camera that stalls mid-stream must
//! never leave a thread blocked where the supervisor cannot stop it. Plain HTTP only (Basic auth
//! from the URL's user info); redirects to http:// URLs are followed (3 at most); chunked
//! transfer encoding is decoded.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use super::stream::{find, pump, FrameSplitter};
use super::{redact, FrameSource, SourceEnd, SourceError, SourceOptions};
use crate::serve::frame::{Frame, Mailbox, StopToken};

/// The longest a TCP connect may take (it cannot be interrupted; the supervisor waits 2 s for
/// a stopped source, then leaves its thread to finish alone).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Redirects followed at most.
const MAX_REDIRECTS: usize = 3;
/// The largest header block accepted.
const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The reader of one HTTP camera.
pub struct HttpSource {
    url: String,
    options: SourceOptions,
}

impl HttpSource {
    /// Reads the camera at `url`.
    pub fn new(url: &str, options: &SourceOptions) -> HttpSource {
        HttpSource { url: url.to_string(), options: options.clone() }
    }
}

impl FrameSource for HttpSource {
    fn run(&mut self, mailbox: &Mailbox, stop: &StopToken) -> Result<SourceEnd, SourceError> {
        let shown = redact(&self.url);
        loop {
            let poll_started = Instant::now();
            let mut response = get(&self.url, &self.options, stop)?;
            let Some(response) = response.as_mut() else { return Ok(SourceEnd::Stopped) };
            let content_type = response.header("content-type").unwrap_or_default().to_ascii_lowercase();
            if content_type.starts_with("multipart/") {
                let boundary = parameter(&content_type, "boundary").map(str::to_string);
                // The boundary's case matters: take it from the original header.
                let boundary = response.header("content-type").and_then(|value| parameter_cased(&value, "boundary")).or(boundary);
                let mut splitter = FrameSplitter::multipart(boundary.as_deref(), self.options.max_frame_bytes);
                return match pump(&mut response.body, &mut splitter, mailbox, stop, self.options.io_timeout, &shown)? {
                    SourceEnd::Stopped => Ok(SourceEnd::Stopped),
                    // A camera that ends its stream is restarted (it is not standard input).
                    SourceEnd::Finished => Err(SourceError::Protocol(format!("{shown}: the camera ended the stream"))),
                };
            }
            if !content_type.starts_with("image/") {
                return Err(SourceError::Protocol(format!(
                    "{shown}: answered {content_type:?}, not an image or an MJPEG stream; check the URL"
                )));
            }
            let snapshot = read_body(&mut response.body, self.options.max_frame_bytes, self.options.io_timeout, stop, &shown)?;
            let Some(snapshot) = snapshot else { return Ok(SourceEnd::Stopped) };
            mailbox.put(Frame::encoded(snapshot));
            // The next poll one frame period after this one started.
            let period = Duration::from_secs_f64(1.0 / self.options.fps.max(0.001));
            if !stop.sleep(period.saturating_sub(poll_started.elapsed())) {
                return Ok(SourceEnd::Stopped);
            }
        }
    }
}

/// A response's status line and headers, and its body as a reader.
struct Response {
    headers: Vec<(String, String)>,
    body: Body,
}

impl Response {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.clone())
    }
}

/// GETs `url`, following redirects; `Ok(None)` when stopped meanwhile.
fn get(url: &str, options: &SourceOptions, stop: &StopToken) -> Result<Option<Response>, SourceError> {
    let mut url = url.to_string();
    for _ in 0..=MAX_REDIRECTS {
        let target = Target::parse(&url)?;
        let shown = redact(&url);
        let Some((status, reason, headers, stream, leftover)) = request(&target, options, stop, &shown)? else { return Ok(None) };
        let header = |name: &str| headers.iter().find(|(key, _)| key.eq_ignore_ascii_case(name)).map(|(_, value)| value.clone());
        match status {
            200 => {
                let chunked = header("transfer-encoding").is_some_and(|value| value.to_ascii_lowercase().contains("chunked"));
                let length = header("content-length").and_then(|value| value.trim().parse::<u64>().ok());
                let framing = if chunked {
                    Framing::Chunked { left_in_chunk: 0, done: false }
                } else {
                    length.map_or(Framing::UntilClose, Framing::Length)
                };
                return Ok(Some(Response { headers, body: Body { stream, leftover, framing, partial_line: Vec::new() } }));
            }
            301 | 302 | 303 | 307 | 308 => {
                let location = header("location").ok_or_else(|| SourceError::Protocol(format!("{shown}: redirect ({status}) without a Location")))?;
                url = if location.starts_with('/') { format!("http://{}{location}", target.authority_with_credentials()) } else { location };
            }
            401 | 403 => {
                return Err(SourceError::Protocol(format!(
                    "{shown}: {status} {reason}: the camera refused the credentials; put user:password in the URL (from the environment: ${{NAME}})"
                )))
            }
            _ => return Err(SourceError::Protocol(format!("{shown}: {status} {reason}"))),
        }
    }
    Err(SourceError::Protocol(format!("{}: more than {MAX_REDIRECTS} redirects", redact(&url))))
}

type Head = (u16, String, Vec<(String, String)>, TcpStream, Vec<u8>);

/// Sends the GET and reads the status line and headers; `Ok(None)` when stopped meanwhile.
fn request(target: &Target, options: &SourceOptions, stop: &StopToken, shown: &str) -> Result<Option<Head>, SourceError> {
    let address = (target.host.as_str(), target.port)
        .to_socket_addrs()
        .map_err(|error| SourceError::io(format!("{shown}: cannot resolve {}", target.host), error))?
        .next()
        .ok_or_else(|| SourceError::Protocol(format!("{shown}: {} has no address", target.host)))?;
    let mut stream = TcpStream::connect_timeout(&address, CONNECT_TIMEOUT.min(options.io_timeout))
        .map_err(|error| SourceError::io(format!("{shown}: cannot connect to {address}"), error))?;
    let io = |error| SourceError::io(format!("{shown}: talking to {address}"), error);
    stream.set_read_timeout(Some(StopToken::POLL)).map_err(io)?;
    stream.set_write_timeout(Some(options.io_timeout)).map_err(io)?;
    let _ = stream.set_nodelay(true);
    let mut request = format!("GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: cac-edge/{}\r\nAccept: image/jpeg, multipart/x-mixed-replace\r\nConnection: close\r\n", target.path, target.host_header(), env!("CARGO_PKG_VERSION"));
    if let Some(credentials) = &target.basic_auth {
        request.push_str(&format!("Authorization: Basic {credentials}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).map_err(io)?;
    let mut head = Vec::new();
    let mut buffer = [0u8; 8192];
    let started = Instant::now();
    let header_end = loop {
        if let Some(end) = find(&head, b"\r\n\r\n") {
            break end;
        }
        if head.len() > MAX_HEADER_BYTES {
            return Err(SourceError::Protocol(format!("{shown}: headers over {MAX_HEADER_BYTES} bytes")));
        }
        if stop.is_stopped() {
            return Ok(None);
        }
        match stream.read(&mut buffer) {
            Ok(0) => return Err(SourceError::Protocol(format!("{shown}: the camera closed the connection before answering"))),
            Ok(read) => head.extend_from_slice(&buffer[..read]),
            Err(error) if is_timeout(&error) => {
                if started.elapsed() > options.io_timeout {
                    return Err(SourceError::Protocol(format!(
                        "{shown}: no answer for {:.0} s",
                        options.io_timeout.as_secs_f64()
                    )));
                }
            }
            Err(error) => return Err(io(error)),
        }
    };
    let leftover = head.split_off(header_end + 4);
    let text = String::from_utf8_lossy(&head[..header_end]).into_owned();
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code, reason) =
        (parts.next().unwrap_or(""), parts.next().unwrap_or(""), parts.next().unwrap_or("").to_string());
    let status = code.parse::<u16>().ok().filter(|_| version.starts_with("HTTP/"));
    let status = status.ok_or_else(|| SourceError::Protocol(format!("{shown}: not an HTTP answer: {status_line:?}")))?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(name, value)| (name.trim().to_string(), value.trim().to_string()))
        .collect();
    Ok(Some((status, reason, headers, stream, leftover)))
}

fn is_timeout(error: &io::Error) -> bool {
    matches!(error.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

/// Reads a whole snapshot body, bounded; `Ok(None)` when stopped meanwhile.
fn read_body(
    body: &mut Body,
    max_bytes: usize,
    io_timeout: Duration,
    stop: &StopToken,
    shown: &str,
) -> Result<Option<Vec<u8>>, SourceError> {
    let mut bytes = Vec::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut last_data = Instant::now();
    loop {
        if stop.is_stopped() {
            return Ok(None);
        }
        match body.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => {
                last_data = Instant::now();
                bytes.extend_from_slice(&buffer[..read]);
                if bytes.len() > max_bytes {
                    return Err(SourceError::Protocol(format!("{shown}: a snapshot over the {max_bytes}-byte limit")));
                }
            }
            Err(error) if is_timeout(&error) => {
                if last_data.elapsed() > io_timeout {
                    return Err(SourceError::Protocol(format!("{shown}: no data for {:.0} s", io_timeout.as_secs_f64())));
                }
            }
            Err(error) => return Err(SourceError::io(format!("{shown}: reading the snapshot"), error)),
        }
    }
    if let Framing::Length(expected) = body.framing {
        if expected != 0 {
            return Err(SourceError::Protocol(format!(
                "{shown}: the connection closed {expected} bytes before the snapshot's end"
            )));
        }
    }
    Ok(Some(bytes))
}

/// How a body ends.
#[derive(Debug, Clone, Copy)]
enum Framing {
    /// This many bytes are left.
    Length(u64),
    Chunked {
        left_in_chunk: u64,
        done: bool,
    },
    UntilClose,
}

/// A response body: what came with the headers, then the socket, undone from its framing.
struct Body {
    stream: TcpStream,
    leftover: Vec<u8>,
    framing: Framing,
    /// A chunk-size line read in part before a read timed out.
    partial_line: Vec<u8>,
}

impl Body {
    /// Raw bytes: the leftover first, then the socket.
    fn read_raw(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        if !self.leftover.is_empty() {
            let count = buffer.len().min(self.leftover.len());
            buffer[..count].copy_from_slice(&self.leftover[..count]);
            self.leftover.drain(..count);
            return Ok(count);
        }
        self.stream.read(buffer)
    }

    /// One line of a chunked body (a chunk size), read byte by byte; a timeout mid-line keeps
    /// what was read for the next call.
    fn read_line(&mut self) -> io::Result<String> {
        let mut byte = [0u8; 1];
        loop {
            if self.read_raw(&mut byte)? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            if byte[0] == b'\n' {
                let line = String::from_utf8_lossy(&self.partial_line).trim().to_string();
                self.partial_line.clear();
                return Ok(line);
            }
            if self.partial_line.len() > 1024 {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "a chunk-size line over 1 KiB"));
            }
            self.partial_line.push(byte[0]);
        }
    }
}

impl Read for Body {
    fn read(&mut self, buffer: &mut [u8]) -> io::Result<usize> {
        match self.framing {
            Framing::UntilClose => self.read_raw(buffer),
            Framing::Length(0) => Ok(0),
            Framing::Length(left) => {
                let cap = buffer.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let read = self.read_raw(&mut buffer[..cap])?;
                if read == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed before the body's end"));
                }
                self.framing = Framing::Length(left - read as u64);
                Ok(read)
            }
            Framing::Chunked { done: true, .. } => Ok(0),
            Framing::Chunked { left_in_chunk: 0, .. } => {
                let line = self.read_line()?;
                if line.is_empty() {
                    // The CRLF that ends the previous chunk.
                    return Err(io::ErrorKind::Interrupted.into());
                }
                let size_text = line.split(';').next().unwrap_or("").trim();
                let size = u64::from_str_radix(size_text, 16)
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("a bad chunk size {line:?}")))?;
                self.framing = Framing::Chunked { left_in_chunk: size, done: size == 0 };
                if size == 0 {
                    return Ok(0);
                }
                Err(io::ErrorKind::Interrupted.into())
            }
            Framing::Chunked { left_in_chunk, .. } => {
                let cap = buffer.len().min(usize::try_from(left_in_chunk).unwrap_or(usize::MAX));
                let read = self.read_raw(&mut buffer[..cap])?;
                if read == 0 {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed inside a chunk"));
                }
                self.framing = Framing::Chunked { left_in_chunk: left_in_chunk - read as u64, done: false };
                Ok(read)
            }
        }
    }
}

/// The parts of an http:// URL a request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    host: String,
    port: u16,
    path: String,
    /// `user:password`, percent-decoded, base64-encoded.
    basic_auth: Option<String>,
    user_info: Option<String>,
}

impl Target {
    fn parse(url: &str) -> Result<Target, SourceError> {
        let bad = |why: &str| SourceError::Unsupported(format!("{}: {why}", redact(url)));
        let rest = url
            .get(..7)
            .filter(|scheme| scheme.eq_ignore_ascii_case("http://"))
            .map(|_| &url[7..])
            .ok_or_else(|| bad("only http:// URLs are read"))?;
        let (authority, path) = match rest.find(['/', '?']) {
            Some(start) => (&rest[..start], &rest[start..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') { format!("/{path}") } else { path.to_string() };
        let path = path.split('#').next().unwrap_or("/").to_string();
        let (user_info, host_port) = match authority.rsplit_once('@') {
            Some((user_info, host_port)) => (Some(user_info.to_string()), host_port),
            None => (None, authority),
        };
        let (host, port) = if let Some(bracketed) = host_port.strip_prefix('[') {
            let (host, after) = bracketed.split_once(']').ok_or_else(|| bad("an IPv6 address without its closing ]"))?;
            let port = match after.strip_prefix(':') {
                Some(port) => port.parse().map_err(|_| bad("a bad port"))?,
                None => 80,
            };
            (host.to_string(), port)
        } else {
            match host_port.rsplit_once(':') {
                Some((host, port)) => (host.to_string(), port.parse().map_err(|_| bad("a bad port"))?),
                None => (host_port.to_string(), 80),
            }
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let basic_auth = user_info.as_deref().map(|user_info| base64(&percent_decode(user_info)));
        Ok(Target { host, port, path, basic_auth, user_info })
    }

    fn host_header(&self) -> String {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        if self.port == 80 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    fn authority_with_credentials(&self) -> String {
        match &self.user_info {
            Some(user_info) => format!("{user_info}@{}", self.host_header()),
            None => self.host_header(),
        }
    }
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let hex = |byte: u8| char::from(byte).to_digit(16);
        if bytes[index] == b'%' && index + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex(bytes[index + 1]), hex(bytes[index + 2])) {
                out.push((high * 16 + low) as u8);
                index += 3;
                continue;
            }
        }
        out.push(bytes[index]);
        index += 1;
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let value =
            (u32::from(chunk[0]) << 16) | (u32::from(*chunk.get(1).unwrap_or(&0)) << 8) | u32::from(*chunk.get(2).unwrap_or(&0));
        for (position, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if position <= chunk.len() {
                out.push(char::from(ALPHABET[((value >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A `key=value` parameter of a header value (lowercased text).
fn parameter<'a>(value: &'a str, key: &str) -> Option<&'a str> {
    value
        .split(';')
        .skip(1)
        .filter_map(|part| part.split_once('='))
        .find(|(name, _)| name.trim().eq_ignore_ascii_case(key))
        .map(|(_, value)| value.trim().trim_matches('"'))
}

fn parameter_cased(value: &str, key: &str) -> Option<String> {
    parameter(value, key).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_split_into_host_port_path_and_credentials() {
        let target = Target::parse("http://admin:p%40ss@10.0.0.5:8080/cgi-bin/snap.jpg?ch=1").expect("parses");
        assert_eq!((target.host.as_str(), target.port, target.path.as_str()), ("10.0.0.5", 8080, "/cgi-bin/snap.jpg?ch=1"));
        assert_eq!(target.basic_auth.as_deref(), Some(base64(b"admin:p@ss").as_str()));
        let target = Target::parse("HTTP://[::1]/video").expect("parses");
        assert_eq!(
            (target.host.as_str(), target.port, target.path.as_str(), target.host_header().as_str()),
            ("::1", 80, "/video", "[::1]")
        );
        assert_eq!(Target::parse("http://cam").expect("parses").path, "/");
        assert!(Target::parse("http://:80/x").is_err());
        assert!(Target::parse("http://cam:port/x").is_err());
    }

    #[test]
    fn base64_matches_rfc_4648() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
            ("Aladdin:open sesame", "QWxhZGRpbjpvcGVuIHNlc2FtZQ=="),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
        assert_eq!(percent_decode("a%20b%zz%4"), b"a b%zz%4");
    }

    use crate::serve::frame::{FramePayload, Wake};
    use std::net::TcpListener;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;

    fn jpeg(level: u8) -> Vec<u8> {
        let image = image::RgbImage::from_pixel(32, 24, image::Rgb([level, level, 0]));
        let mut bytes = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut bytes).encode_image(&image).expect("encode");
        bytes
    }

    /// A camera on 127.0.0.1 that answers each connection with `respond` (given the request),
    /// for at most `connections` connections; returns its URL and the requests it saw.
    fn camera(
        connections: usize,
        respond: impl Fn(&str, &mut TcpStream) + Send + 'static,
    ) -> (String, std::sync::mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://user:p%40ss@127.0.0.1:{}/video", listener.local_addr().expect("address").port());
        let (requests_tx, requests) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(connections) {
                let Ok(mut stream) = stream else { continue };
                let mut request = Vec::new();
                let mut buffer = [0u8; 1024];
                while find(&request, b"\r\n\r\n").is_none() {
                    match stream.read(&mut buffer) {
                        Ok(0) | Err(_) => break,
                        Ok(read) => request.extend_from_slice(&buffer[..read]),
                    }
                }
                let request = String::from_utf8_lossy(&request).into_owned();
                respond(&request, &mut stream);
                let _ = requests_tx.send(request);
            }
        });
        (url, requests)
    }

    fn options() -> SourceOptions {
        SourceOptions { io_timeout: Duration::from_secs(2), fps: 20.0, ..SourceOptions::default() }
    }

    fn newest(mailbox: &Mailbox) -> Vec<u8> {
        match mailbox.take().expect("a frame").payload {
            FramePayload::Encoded(bytes) => bytes.to_vec(),
            FramePayload::Rgb(_) => panic!("encoded expected"),
        }
    }

    #[test]
    fn mjpeg_streams_with_lengths_or_chunked_deliver_every_frame_and_send_the_credentials() {
        let frames: Vec<Vec<u8>> = (0..5).map(|level| jpeg(level * 40)).collect();
        for chunked in [false, true] {
            let sent = frames.clone();
            let (url, requests) = camera(1, move |_, stream| {
                let mut body = Vec::new();
                for frame in &sent {
                    body.extend_from_slice(
                        format!("--Frame\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", frame.len()).as_bytes(),
                    );
                    body.extend_from_slice(frame);
                    body.extend_from_slice(b"\r\n");
                }
                let header = if chunked { "Transfer-Encoding: chunked\r\n" } else { "" };
                let _ =
                    write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace; boundary=Frame\r\n{header}\r\n");
                if chunked {
                    for piece in body.chunks(700) {
                        let _ = write!(stream, "{:x}\r\n", piece.len());
                        let _ = stream.write_all(piece);
                        let _ = stream.write_all(b"\r\n");
                    }
                    let _ = stream.write_all(b"0\r\n\r\n");
                } else {
                    let _ = stream.write_all(&body);
                }
            });
            let mailbox = Mailbox::new(Arc::new(Wake::default()));
            let error = HttpSource::new(&url, &options())
                .run(&mailbox, &StopToken::new())
                .expect_err("the stream ends: an error to restart on");
            assert!(error.to_string().contains("ended the stream"), "{error}");
            assert!(!error.to_string().contains("p%40ss"), "{error}");
            assert_eq!(mailbox.counters.received.load(Ordering::Relaxed), 5, "chunked {chunked}");
            assert_eq!(newest(&mailbox), frames[4]);
            let request = requests.recv_timeout(Duration::from_secs(5)).expect("the request");
            assert!(request.starts_with("GET /video HTTP/1.1\r\n"), "{request}");
            assert!(request.contains(&format!("Authorization: Basic {}\r\n", base64(b"user:p@ss"))), "{request}");
        }
    }

    #[test]
    fn snapshots_are_polled_and_errors_name_the_status() {
        let snapshot = jpeg(7);
        let body = snapshot.clone();
        let (url, _) = camera(3, move |_, stream| {
            let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\n\r\n", body.len());
            let _ = stream.write_all(&body);
        });
        let mailbox = Arc::new(Mailbox::new(Arc::new(Wake::default())));
        let stop = StopToken::new();
        let runner = {
            let (mailbox, stop) = (Arc::clone(&mailbox), stop.clone());
            std::thread::spawn(move || HttpSource::new(&url, &options()).run(&mailbox, &stop))
        };
        let started = Instant::now();
        while mailbox.counters.received.load(Ordering::Relaxed) < 3 && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(mailbox.counters.received.load(Ordering::Relaxed) >= 3);
        assert_eq!(newest(&mailbox), snapshot);
        stop.stop();
        let _ = runner.join().expect("the source thread");

        for (status, needle) in [("404 Not Found", "404 Not Found"), ("401 Unauthorized", "refused the credentials")] {
            let (url, _) = camera(1, move |_, stream| {
                let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n");
            });
            let error = HttpSource::new(&url, &options())
                .run(&Mailbox::new(Arc::new(Wake::default())), &StopToken::new())
                .expect_err(status);
            assert!(error.to_string().contains(needle), "{error}");
        }
    }

    #[test]
    fn a_reset_mid_frame_delivers_nothing_half_and_a_silent_camera_times_out_or_stops() {
        let frame = jpeg(99);
        let half = frame[..frame.len() / 2].to_vec();
        let (url, _) = camera(1, move |_, stream| {
            let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary=b\r\n\r\n--b\r\nContent-Type: image/jpeg\r\n\r\n");
            let _ = stream.write_all(&half);
            let _ = stream.shutdown(std::net::Shutdown::Both);
        });
        let mailbox = Mailbox::new(Arc::new(Wake::default()));
        assert!(HttpSource::new(&url, &options()).run(&mailbox, &StopToken::new()).is_err());
        assert_eq!(mailbox.counters.received.load(Ordering::Relaxed), 0, "half a frame is never delivered");

        // Headers, then silence: an error after io_timeout (2 s here).
        let (url, _) = camera(2, |_, stream| {
            let _ = write!(stream, "HTTP/1.1 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary=b\r\n\r\n");
            std::thread::sleep(Duration::from_secs(6));
        });
        let started = Instant::now();
        let error = HttpSource::new(&url, &options()).run(&mailbox, &StopToken::new()).expect_err("silence");
        assert!(error.to_string().contains("no data for 2 s"), "{error}");
        assert!(started.elapsed() < Duration::from_secs(4), "{:?}", started.elapsed());
        // The same silence with a stop: back within a poll or two.
        let stop = StopToken::new();
        let stopper = stop.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            stopper.stop();
        });
        let started = Instant::now();
        let end = HttpSource::new(&url, &options()).run(&mailbox, &stop).expect("stops");
        assert_eq!(end, SourceEnd::Stopped);
        assert!(started.elapsed() < Duration::from_millis(300) + StopToken::POLL * 3, "{:?}", started.elapsed());
    }

    #[test]
    fn boundary_parameters_keep_their_case() {
        let value = "multipart/x-mixed-replace; boundary=\"MyBoundary\"";
        assert_eq!(parameter_cased(value, "boundary").as_deref(), Some("MyBoundary"));
        assert_eq!(parameter("image/jpeg", "boundary"), None);
    }
}

//! The running service for the end-to-end tests (tests/serve.rs, tests/mqtt.rs,
//! tests/status_page.rs): a `cac-edge serve` child with its JSON lines, stderr and HTTP API,
//! and the Debian programs the tests need. Every wait is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::{bundle_dir, command, fixture, text};

/// The longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(60);

/// A free loopback port (bound, read, released: a race with other tests is possible but rare).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("address").port()
}

/// A running `cac-edge serve`, killed on drop.
pub struct Served {
    pub child: Child,
    pub lines: mpsc::Receiver<serde_json::Value>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    pub port: u16,
}

impl Served {
    pub fn start(config: &Path, port: u16) -> Served {
        Self::start_with(config, port, |_| {})
    }

    pub fn start_with(config: &Path, port: u16, adjust: impl FnOnce(&mut Command)) -> Served {
        let mut command = command();
        command.arg("serve").arg("--config").arg(config).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        adjust(&mut command);
        let mut child = command.spawn().expect("start cac-edge serve");
        let (line_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let value = serde_json::from_str(&line).unwrap_or_else(|error| panic!("not JSON ({error}): {line}"));
                if line_tx.send(value).is_err() {
                    break;
                }
            }
        });
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().expect("stderr");
        let collected = std::sync::Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(read) = pipe.read(&mut buffer) {
                if read == 0 {
                    break;
                }
                collected.lock().unwrap().push_str(&String::from_utf8_lossy(&buffer[..read]));
            }
        });
        let mut served = Served { child, lines, stderr, port };
        let start = Instant::now();
        while get(port, "/healthz").is_none_or(|(status, _)| status != 200) {
            if let Some(status) = served.child.try_wait().expect("try_wait") {
                panic!("serve exited ({status}) before answering; stderr:\n{}", served.stderr());
            }
            assert!(start.elapsed() < WAIT, "the HTTP API did not answer; stderr:\n{}", served.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
        served
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub fn wait_for(&self, mut done: impl FnMut() -> bool, what: &str) {
        let start = Instant::now();
        while !done() {
            assert!(start.elapsed() < WAIT, "timed out waiting for {what}; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn next_line(&self) -> serde_json::Value {
        self.lines.recv_timeout(WAIT).unwrap_or_else(|_| panic!("no JSON line within {WAIT:?}; stderr:\n{}", self.stderr()))
    }

    pub fn camera(&self, name: &str) -> serde_json::Value {
        let (status, body) = get(self.port, &format!("/api/cameras/{name}")).expect("API answers");
        assert_eq!(status, 200, "{}", text(&body));
        serde_json::from_slice(&body).expect("JSON")
    }

    pub fn metric(&self, name_and_labels: &str) -> f64 {
        let (_, body) = get(self.port, "/metrics").expect("metrics");
        let page = text(&body);
        page.lines()
            .find_map(|line| line.strip_prefix(name_and_labels).and_then(|rest| rest.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("{name_and_labels} not in /metrics:\n{page}"))
            .parse()
            .expect("a number")
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill").arg(format!("-{signal}")).arg(self.child.id().to_string()).status().expect("kill");
        assert!(status.success());
    }

    /// Waits for the process to exit; its status and how long that took.
    pub fn wait_exit(&mut self) -> (std::process::ExitStatus, Duration) {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, start.elapsed());
            }
            assert!(start.elapsed() < WAIT, "serve did not exit; stderr:\n{}", self.stderr());
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.0 GET on loopback: status and body.
pub fn get(port: u16, path: &str) -> Option<(u16, Vec<u8>)> {
    get_with_headers(port, path).map(|(status, _, body)| (status, body))
}

/// A plain HTTP/1.0 GET on loopback: status, the header block, body.
pub fn get_with_headers(port: u16, path: &str) -> Option<(u16, String, Vec<u8>)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).ok()?;
    let split = response.windows(4).position(|window| window == b"\r\n\r\n")?;
    let headers = text(&response[..split]);
    let status = headers.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, headers, response[split + 4..].to_vec()))
}

/// A config for the test bundle with `cameras` (TOML `[[camera]]` tables) and `extra` tables.
pub fn write_config(dir: &Path, cache: &str, port: u16, model_extra: &str, service_extra: &str, cameras: &str) -> PathBuf {
    write_config_for(&bundle_dir(), dir, cache, port, model_extra, service_extra, cameras)
}

/// [`write_config`] for another bundle.
pub fn write_config_for(
    bundle: &Path,
    dir: &Path,
    cache: &str,
    port: u16,
    model_extra: &str,
    service_extra: &str,
    cameras: &str,
) -> PathBuf {
    let config = dir.join("serve.toml");
    let text = format!(
        "[model]\nbundle = \"{}\"\ncache = \"{cache}\"\ndevice = \"cpu\"\nthreads = 1\n{model_extra}\n\n[service]\nhttp = \"127.0.0.1:{port}\"\n{service_extra}\n\n{cameras}\n",
        bundle.display()
    );
    std::fs::write(&config, text).expect("write config");
    config
}

pub fn test_images() -> Vec<PathBuf> {
    let mut images: Vec<PathBuf> =
        std::fs::read_dir(fixture("images/photos")).expect("photos").map(|entry| entry.expect("entry").path()).collect();
    images.sort();
    images.retain(|path| path.extension().is_some_and(|extension| extension == "jpg"));
    assert!(images.len() >= 3, "the test photos");
    images
}

/// Whether the Debian programs a test needs are here; when not, the test fails naming the
/// packages (scripts/setup-test-services installs them), unless CAC_EDGE_SKIP_SERVICES=1.
pub fn services_available(programs: &[&str], packages: &str) -> bool {
    let missing: Vec<&str> =
        programs.iter().copied().filter(|program| !Path::new(program).exists() && which(program).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("CAC_EDGE_SKIP_SERVICES").as_deref() == Ok("1") {
        eprintln!("skipped: {missing:?} not installed (CAC_EDGE_SKIP_SERVICES=1)");
        return false;
    }
    panic!("{missing:?} not installed: run scripts/setup-test-services (Debian packages {packages})");
}

pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).map(|dir| dir.join(program)).find(|candidate| candidate.is_file()))
}

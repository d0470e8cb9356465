//! What `cac-edge doctor --config serve.toml` adds about the service: the config is valid, each
//! camera's source is reachable (folder there, camera host answering, decoder installed), and —
//! when the service runs — each camera's last frame age, read from its HTTP API.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use super::config::{self, CameraConfig, ServeConfig};
use super::sources::stream::find;
use super::sources::{RtspDecoder, SourceSpec};
use crate::doctor::{Check, Status};

/// How long a camera host or the service's API may take to answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// The config check, then one check per camera and one for the running service. The config is
/// returned when valid, so that the caller checks its bundle and cache too.
pub fn service_checks(config_path: &Path) -> (Vec<Check>, Option<ServeConfig>) {
    let config = match config::load(config_path) {
        Ok(config) => config,
        Err(error) => {
            let fix = "fix the line named, then `cac-edge serve --check-config` (docs/FORMATS.md §7 lists every key)";
            return (vec![Check::problem("config", Status::Fail, error.to_string(), fix)], None);
        }
    };
    let mut checks = vec![Check::ok("config", format!("{}: valid, {} camera(s)", config_path.display(), config.cameras.len()))];
    checks.extend(config.cameras.iter().filter(|camera| camera.enabled).map(source_check));
    if let Some(address) = config.service.http {
        checks.extend(running_service_checks(address));
    }
    (checks, Some(config))
}

fn source_check(camera: &CameraConfig) -> Check {
    let name = &camera.name;
    match &camera.source {
        SourceSpec::Folder(folder) => match std::fs::read_dir(folder) {
            Ok(_) => Check::ok("camera", format!("{name}: folder {} is there and readable", folder.display())),
            Err(error) => Check::problem(
                "camera",
                Status::Fail,
                format!("{name}: folder {}: {error}", folder.display()),
                "create the folder and let the service's user read it (the unit's StateDirectory= or ReadWritePaths=)",
            ),
        },
        SourceSpec::Stdin => Check::ok("camera", format!("{name}: reads standard input")),
        SourceSpec::Http(url) | SourceSpec::Rtsp(url) => {
            let decoder = matches!(camera.source, SourceSpec::Rtsp(_)).then_some(camera.rtsp_decoder);
            if let Some(missing) = decoder.and_then(missing_decoder) {
                return Check::problem(
                    "camera",
                    Status::Fail,
                    format!("{name}: {missing} is not installed"),
                    decoder_fix(decoder),
                );
            }
            match reach(url) {
                Ok(address) => Check::ok("camera", format!("{name}: {} answers at {address}", camera.source)),
                Err(error) => Check::problem(
                    "camera",
                    Status::Fail,
                    format!("{name}: {}: {error}", camera.source),
                    "check the camera's address, power and network (ping it; open the URL in VLC from the box's network)",
                ),
            }
        }
        SourceSpec::V4l2(device) => match std::fs::metadata(device) {
            Ok(_) => Check::ok("camera", format!("{name}: {} is there", device.display())),
            Err(error) => Check::problem(
                "camera",
                Status::Fail,
                format!("{name}: {}: {error}", device.display()),
                "plug the camera in (`v4l2-ctl --list-devices` lists them) and let the service's user open it (group video)",
            ),
        },
    }
}

/// The decoder program the camera needs, when it is not on the PATH.
fn missing_decoder(decoder: RtspDecoder) -> Option<&'static str> {
    let program = match decoder {
        RtspDecoder::Ffmpeg => "ffmpeg",
        RtspDecoder::Gstreamer => "gst-launch-1.0",
    };
    let on_path =
        std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()));
    (!on_path).then_some(program)
}

fn decoder_fix(decoder: Option<RtspDecoder>) -> &'static str {
    match decoder {
        Some(RtspDecoder::Gstreamer) => {
            "apt install gstreamer1.0-tools gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-libav"
        }
        _ => "apt install ffmpeg",
    }
}

/// Connects to the URL's host and port (a TCP handshake: the camera is up and routable).
fn reach(url: &str) -> Result<SocketAddr, String> {
    let (scheme, rest) = url.split_once("://").ok_or("not a URL")?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    let default_port = if scheme.eq_ignore_ascii_case("http") { 80 } else { 554 };
    let with_port = if host_port.rsplit_once(':').is_some_and(|(_, port)| port.parse::<u16>().is_ok()) {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    let address = with_port
        .to_socket_addrs()
        .map_err(|error| format!("cannot resolve {with_port}: {error}"))?
        .next()
        .ok_or("no address")?;
    TcpStream::connect_timeout(&address, PROBE_TIMEOUT).map_err(|error| format!("cannot connect to {address}: {error}"))?;
    Ok(address)
}

/// Reads `/api/cameras` of the running service: one check per camera with its last frame age.
fn running_service_checks(address: SocketAddr) -> Vec<Check> {
    let body = match http_get(address, "/api/cameras") {
        Ok(body) => body,
        Err(error) => {
            return vec![Check::problem(
                "service",
                Status::Warn,
                format!("not answering on http://{address}: {error}"),
                "start it: systemctl start cac-edge (journalctl -u cac-edge says why it stopped)",
            )]
        }
    };
    let cameras: Vec<serde_json::Value> = match serde_json::from_slice(&body) {
        Ok(cameras) => cameras,
        Err(error) => {
            return vec![Check::problem(
                "service",
                Status::Fail,
                format!("http://{address}/api/cameras: not the service's answer: {error}"),
                "is another program on this port?",
            )]
        }
    };
    let mut checks = vec![Check::ok("service", format!("running, API on http://{address}"))];
    for camera in cameras {
        let name = camera["name"].as_str().unwrap_or("?");
        let phase = camera["phase"].as_str().unwrap_or("?");
        let age = camera["last_frame_age_s"]
            .as_f64()
            .map_or_else(|| "no frame yet".to_string(), |age| format!("last frame {age:.1} s ago"));
        let reason = camera["reason"].as_str().map(|reason| format!(" ({reason})")).unwrap_or_default();
        let detail = format!("{name}: {phase}{reason}, {age}, {} restarts", camera["restarts"]);
        // A disabled camera or an ended stdin has no frames to be fresh.
        if camera["fresh"].as_bool() == Some(true) || phase == "disabled" || phase == "ended" {
            checks.push(Check::ok("frames", detail));
        } else {
            checks.push(Check::problem(
                "frames",
                Status::Fail,
                detail,
                "see `journalctl -u cac-edge` for the source's errors; `cac-edge doctor` above checks it is reachable",
            ));
        }
    }
    checks
}

/// A plain HTTP/1.0 GET with timeouts; the body of a 200 answer.
fn http_get(address: SocketAddr, path: &str) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect_timeout(&address, PROBE_TIMEOUT).map_err(|error| error.to_string())?;
    stream.set_read_timeout(Some(PROBE_TIMEOUT)).map_err(|error| error.to_string())?;
    stream.set_write_timeout(Some(PROBE_TIMEOUT)).map_err(|error| error.to_string())?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {address}\r\n\r\n").map_err(|error| error.to_string())?;
    let mut response = Vec::new();
    // The API's answers are small; 16 MiB bounds a stranger on the port.
    stream.take(16 << 20).read_to_end(&mut response).map_err(|error| error.to_string())?;
    let split = find(&response, b"\r\n\r\n").ok_or("no HTTP header")?;
    let status_line = String::from_utf8_lossy(&response[..split]).lines().next().unwrap_or("").to_string();
    if status_line.split_whitespace().nth(1) != Some("200") {
        return Err(format!("answered `{status_line}`"));
    }
    Ok(response[split + 4..].to_vec())
}

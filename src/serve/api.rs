//! The HTTP API: the status page `/`, `/healthz`, `/readyz`, `/metrics` (Prometheus),
//! `/api/cameras`, `/api/cameras/<name>/latest` and `…/latest.jpg` (docs/SERVE.md). Loopback by
//! default.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tiny_http::{Header, Method, Request, Response, Server};

use super::camera::{Camera, Phase};
use super::frame::{lock, StopToken};
use super::metrics::{header, label_value};
use super::review::frame_file;
use super::service::{ServeError, Shared};

/// A scheduler silent for this long fails `/healthz` (the systemd watchdog restarts a hung
/// service; an orchestrator without one needs this).
const HUNG_SCHEDULER: Duration = Duration::from_secs(60);

/// The HTTP API's thread.
pub struct ApiServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// The API's socket, bound but not yet answering: the service binds it first (an address in use
/// fails the start before anything runs) and answers once its cameras are up, so that an API
/// that answers means every folder is watched (connections made meanwhile wait in the backlog).
pub struct BoundApi {
    server: Server,
    address: SocketAddr,
}

impl BoundApi {
    /// Binds `address`.
    pub fn bind(address: SocketAddr) -> Result<BoundApi, ServeError> {
        let server = Server::http(address)
            .map_err(|error| ServeError::Listen { address: address.to_string(), reason: error.to_string() })?;
        let address = server.server_addr().to_ip().unwrap_or(address);
        Ok(BoundApi { server, address })
    }

    /// Starts answering from `shared`.
    pub fn serve(self, shared: Arc<Shared>) -> Result<ApiServer, ServeError> {
        let BoundApi { server, address } = self;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("http-api".to_string())
                .spawn(move || serve(&server, &shared, &stop))
                .map_err(|error| ServeError::Listen { address: address.to_string(), reason: error.to_string() })?
        };
        Ok(ApiServer { address, stop, thread: Some(thread) })
    }
}

impl ApiServer {
    /// The address it listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Stops answering and waits for the thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(server: &Server, shared: &Shared, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        match server.recv_timeout(StopToken::POLL) {
            Ok(Some(request)) => answer(request, shared),
            Ok(None) => {}
            Err(error) => {
                tracing::warn!("HTTP API: {error}");
                std::thread::sleep(StopToken::POLL);
            }
        }
    }
}

type Reply = Response<std::io::Cursor<Vec<u8>>>;

fn answer(request: Request, shared: &Shared) {
    let reply = if *request.method() != Method::Get && *request.method() != Method::Head {
        text(405, "only GET is served\n")
    } else {
        route(request.url(), shared)
    };
    // A client that went away is not the service's problem.
    let _ = request.respond(reply);
}

fn route(url: &str, shared: &Shared) -> Reply {
    let path = url.split(['?', '#']).next().unwrap_or("");
    match path {
        "/" | "/index.html" => page(),
        "/healthz" => healthz(shared),
        "/readyz" => readyz(shared),
        "/metrics" => with_type(Response::from_data(metrics(shared).into_bytes()), "text/plain; version=0.0.4; charset=utf-8"),
        "/api/cameras" => {
            json(200, &serde_json::Value::Array(shared.cameras().iter().map(|camera| camera_json(camera)).collect()))
        }
        _ => match path.strip_prefix("/api/cameras/") {
            Some(rest) => camera_route(rest, shared),
            None => text(404, "not found; see / (the status page), /api/cameras, /metrics, /healthz, /readyz\n"),
        },
    }
}

fn camera_route(rest: &str, shared: &Shared) -> Reply {
    let (name, what) = match rest.split_once('/') {
        Some((name, what)) => (name, what),
        None => (rest, ""),
    };
    let Some(camera) = shared.camera(name) else {
        return text(404, &format!("no camera named `{name}`; GET /api/cameras lists them\n"));
    };
    match what {
        "" => json(200, &camera_json(&camera)),
        "latest" => match lock(&camera.latest).as_ref() {
            Some(latest) => json(200, &latest.record),
            None => text(404, "no decision yet\n"),
        },
        "latest.jpg" => {
            let frame = lock(&camera.latest).as_ref().map(|latest| latest.frame.clone());
            match frame.as_ref().and_then(frame_file) {
                Some((bytes, extension)) => {
                    let content_type = if extension == "png" { "image/png" } else { "image/jpeg" };
                    with_type(Response::from_data(bytes.to_vec()), content_type)
                }
                None => text(404, "no frame yet\n"),
            }
        }
        _ => text(404, "not found; use /api/cameras/<name>, …/latest or …/latest.jpg\n"),
    }
}

/// The status page (docs/SERVE.md § Status page): one self-contained file, compiled in, so that
/// a box without internet serves it whole and it always matches the API it reads.
const STATUS_PAGE: &str = include_str!("page/status.html");

fn page() -> Reply {
    let reply = with_type(Response::from_data(STATUS_PAGE.as_bytes().to_vec()), "text/html; charset=utf-8");
    // After an upgrade the browser must fetch the new page rather than keep the old one.
    match Header::from_bytes(&b"Cache-Control"[..], &b"no-cache"[..]) {
        Ok(header) => reply.with_header(header),
        Err(()) => reply,
    }
}

fn healthz(shared: &Shared) -> Reply {
    let silence = shared.collector_silence();
    if silence > HUNG_SCHEDULER {
        text(503, &format!("the scheduler has not run for {} s\n", silence.as_secs()))
    } else {
        text(200, "ok\n")
    }
}

fn readyz(shared: &Shared) -> Reply {
    let (ready, not_fresh) = shared.readiness();
    if ready {
        text(200, "ready\n")
    } else if not_fresh.is_empty() {
        text(503, "stopping\n")
    } else {
        text(503, &format!("no fresh frames from: {}\n", not_fresh.join(", ")))
    }
}

fn camera_json(camera: &Camera) -> serde_json::Value {
    let config = camera.config();
    let now = Instant::now();
    let (phase, reason) = match camera.phase() {
        Phase::Starting => ("starting", None),
        Phase::Running => ("running", None),
        Phase::Restarting(reason) => ("restarting", Some(reason)),
        Phase::Ended => ("ended", None),
        Phase::Failed(reason) => ("failed", Some(reason)),
        Phase::Disabled => ("disabled", None),
    };
    let latest = lock(&camera.latest).as_ref().map(|latest| latest.record.clone());
    let counters = &camera.mailbox.counters;
    let stats = &camera.stats;
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    serde_json::json!({
        "name": config.name,
        "source": config.source.to_string(),
        "enabled": config.enabled,
        "phase": phase,
        "reason": reason,
        "fresh": camera.is_fresh(now),
        "last_frame_age_s": camera.last_frame_age(now).map(|age| age.as_secs_f64()),
        "fps": config.fps,
        "state": latest.as_ref().and_then(|record| record.get("state").cloned()),
        "frames": {
            "received": load(&counters.received),
            "processed": load(&stats.processed),
            "dropped_busy": load(&counters.replaced),
            "dropped_stale": load(&stats.stale),
            "refused": load(&counters.refused),
            "failed": load(&stats.failed),
        },
        "restarts": load(&stats.restarts),
        "latest": latest,
        "history": camera.history.points(),
        "drift": *lock(&camera.drift),
    })
}

/// The `/metrics` page.
pub fn metrics(shared: &Shared) -> String {
    let mut out = String::new();
    let cameras = shared.cameras();
    let now = Instant::now();
    let per_camera = |out: &mut String, name: &str, kind: &str, help: &str, value: &dyn Fn(&Camera) -> Vec<(String, f64)>| {
        header(out, name, kind, help);
        for camera in &cameras {
            let camera_label = format!("camera=\"{}\"", label_value(&camera.config().name));
            for (extra, number) in value(camera) {
                let _ = writeln!(out, "{name}{{{camera_label}{extra}}} {number}");
            }
        }
    };
    let count = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed) as f64;
    per_camera(&mut out, "cac_edge_frames_received_total", "counter", "Frames the camera's source delivered.", &|camera| {
        vec![(String::new(), count(&camera.mailbox.counters.received))]
    });
    per_camera(&mut out, "cac_edge_frames_processed_total", "counter", "Frames classified.", &|camera| {
        vec![(String::new(), count(&camera.stats.processed))]
    });
    per_camera(
        &mut out,
        "cac_edge_frames_dropped_total",
        "counter",
        "Frames not classified: busy = replaced by a newer frame (fps cap or model busy), stale = waited longer than max_frame_age.",
        &|camera| {
            vec![
                (",reason=\"busy\"".to_string(), count(&camera.mailbox.counters.replaced)),
                (",reason=\"stale\"".to_string(), count(&camera.stats.stale)),
            ]
        },
    );
    per_camera(
        &mut out,
        "cac_edge_frames_failed_total",
        "counter",
        "Frames that failed: source = refused by the source (oversize, incomplete, corrupt), decode = not decodable or not classified.",
        &|camera| {
            vec![
                (",stage=\"source\"".to_string(), count(&camera.mailbox.counters.refused)),
                (",stage=\"decode\"".to_string(), count(&camera.stats.failed)),
            ]
        },
    );
    per_camera(&mut out, "cac_edge_decisions_total", "counter", "Decisions by outcome.", &|camera| {
        vec![
            (",decision=\"accept\"".to_string(), count(&camera.stats.accepted)),
            (",decision=\"abstain\"".to_string(), count(&camera.stats.abstained)),
        ]
    });
    per_camera(&mut out, "cac_edge_source_restarts_total", "counter", "Source restarts after a failure or a stall.", &|camera| {
        vec![(String::new(), count(&camera.stats.restarts))]
    });
    per_camera(
        &mut out,
        "cac_edge_camera_fresh",
        "gauge",
        "1 while the camera's source runs and its frames are fresh.",
        &|camera| vec![(String::new(), f64::from(u8::from(camera.is_fresh(now))))],
    );
    per_camera(
        &mut out,
        "cac_edge_last_frame_age_seconds",
        "gauge",
        "Seconds since the camera's newest frame arrived.",
        &|camera| camera.last_frame_age(now).map(|age| (String::new(), age.as_secs_f64())).into_iter().collect(),
    );
    per_camera(
        &mut out,
        "cac_edge_drift_score",
        "gauge",
        "Shift alarm: PSI of the recent d(x) against the cache's baseline.",
        &|camera| lock(&camera.drift).and_then(|drift| drift.score).map(|score| (String::new(), score)).into_iter().collect(),
    );
    per_camera(&mut out, "cac_edge_drift_alarm", "gauge", "1 while the camera's shift alarm is raised.", &|camera| {
        lock(&camera.drift).map(|drift| (String::new(), f64::from(u8::from(drift.alarm)))).into_iter().collect()
    });
    per_camera(&mut out, "cac_edge_drift_alarms_total", "counter", "Shift alarms raised.", &|camera| {
        vec![(String::new(), count(&camera.stats.drift_alarms))]
    });
    header(&mut out, "cac_edge_contrast", "histogram", "CAC's contrast d(x) of classified frames.");
    for camera in &cameras {
        camera.stats.contrast.write(&mut out, "cac_edge_contrast", &format!("camera=\"{}\"", label_value(&camera.config().name)));
    }
    header(&mut out, "cac_edge_inference_seconds", "histogram", "Encoder time per batch.");
    shared.inference_seconds.write(&mut out, "cac_edge_inference_seconds", "");
    header(&mut out, "cac_edge_frame_age_seconds", "histogram", "Frame age at decision (capture to decision).");
    shared.frame_age_seconds.write(&mut out, "cac_edge_frame_age_seconds", "");
    let model = shared.model.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    header(&mut out, "cac_edge_model_info", "gauge", "The model in force (its identity in labels).");
    let _ = writeln!(
        out,
        "cac_edge_model_info{{bundle=\"{}\",cache=\"{}\",classes_digest=\"{}\",classes=\"{}\",calibration=\"{}\",calibration_params=\"{}\",threshold=\"{}\",device=\"{}\",version=\"{}\"}} 1",
        label_value(&model.bundle),
        label_value(&model.cache),
        label_value(&model.classes_digest),
        model.classes,
        label_value(&model.calibration),
        label_value(&model.calibration_params),
        model.threshold,
        label_value(&model.device),
        env!("CARGO_PKG_VERSION"),
    );
    header(&mut out, "cac_edge_reloads_total", "counter", "Reloads (SIGHUP) that took effect, and those refused.");
    let _ = writeln!(out, "cac_edge_reloads_total{{result=\"ok\"}} {}", shared.reloads[0].load(Ordering::Relaxed));
    let _ = writeln!(out, "cac_edge_reloads_total{{result=\"refused\"}} {}", shared.reloads[1].load(Ordering::Relaxed));
    header(&mut out, "cac_edge_output_errors_total", "counter", "Writes to an output (JSON lines, review ring) that failed.");
    let _ = writeln!(out, "cac_edge_output_errors_total {}", shared.sink_errors.load(Ordering::Relaxed));
    #[cfg(feature = "mqtt")]
    if let Some(mqtt) = &shared.mqtt {
        mqtt.write_metrics(&mut out);
    }
    header(&mut out, "cac_edge_uptime_seconds", "gauge", "Seconds since the service started.");
    let _ = writeln!(out, "cac_edge_uptime_seconds {}", shared.uptime().as_secs_f64());
    out
}

fn text(status: u16, body: &str) -> Reply {
    with_type(Response::from_data(body.as_bytes().to_vec()).with_status_code(status), "text/plain; charset=utf-8")
}

fn json(status: u16, value: &serde_json::Value) -> Reply {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    with_type(Response::from_data(body).with_status_code(status), "application/json")
}

fn with_type(response: Reply, content_type: &str) -> Reply {
    match Header::from_bytes(&b"Content-Type"[..], content_type.as_bytes()) {
        Ok(header) => response.with_header(header),
        Err(()) => response,
    }
}

//! `cac-edge serve` end to end: the real binary, a real ONNX Runtime session on the test
//! bundle, real files, pipes, sockets and signals. Every wait is bounded.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::served::{free_port, get, services_available, test_images, write_config, Served, WAIT};
use common::{build_cache_cli, command, fixture, text};

/// What `cac-edge classify` says of `image` with the test bundle: the reference for the service's lines.
fn classify_reference(cache: &str, image: &Path, threshold: &str) -> serde_json::Value {
    common::classify_reference(&common::bundle_dir(), cache, image, threshold)
}

#[test]
fn config_errors_name_the_file_line_and_key_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let config =
        write_config(dir.path(), &cache, free_port(), "", "", "[[camera]]\nname = \"door\"\nsource = \"folder:in\"\nfps = 0\n");
    let output = command().args(["serve", "--check-config", "--config"]).arg(&config).output().expect("run");
    assert_eq!(output.status.code(), Some(2));
    let stderr = text(&output.stderr);
    assert!(stderr.contains(&format!("{}:15: camera[0].fps", config.display())), "{stderr}");
    let config = write_config(dir.path(), &cache, free_port(), "", "", "[[camera]]\nname = \"door\"\nsource = \"folder:in\"\n");
    let output = command().args(["serve", "--check-config", "--config"]).arg(&config).output().expect("run");
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stderr).contains("valid"), "{}", text(&output.stderr));
    let output = command().args(["serve", "--config"]).arg(dir.path().join("missing.toml")).output().expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(text(&output.stderr).contains("missing.toml: no such file"), "{}", text(&output.stderr));
}

#[test]
fn a_folder_camera_classifies_each_complete_file_once_like_classify_does() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let port = free_port();
    let cameras = "[[camera]]\nname = \"drop\"\nsource = \"folder:in\"\nfps = 50\ndebounce = 2\n";
    let config = write_config(dir.path(), &cache, port, "threshold = 0.0", "", cameras);
    let served = Served::start(&config, port);
    // Once the API answers, the folder is watched: a file dropped now is never missed, and the
    // camera runs before its first file.
    assert_eq!(served.camera("drop")["phase"], "running");
    let images = test_images();
    // A file written in two halves, one second apart, through one open handle: it must be
    // classified once, whole, and not counted as failed.
    let first = std::fs::read(&images[0]).unwrap();
    let mut half_written = std::fs::File::create(dir.path().join("in/first.jpg")).unwrap();
    half_written.write_all(&first[..first.len() / 2]).unwrap();
    half_written.flush().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    half_written.write_all(&first[first.len() / 2..]).unwrap();
    drop(half_written);
    let line = served.next_line();
    let reference = classify_reference(&cache, &images[0], "0.0");
    assert_eq!(line["camera"], "drop");
    assert_eq!(line["label"], reference["label"]);
    let (confidence, expected) = (line["confidence"].as_f64().unwrap(), reference["confidence"].as_f64().unwrap());
    assert!((confidence - expected).abs() < 1e-6, "{confidence} vs {expected}");
    assert_eq!(
        line["uncalibrated_confidence"].as_f64().map(|value| (value * 1e6).round()),
        reference["uncalibrated_confidence"].as_f64().map(|value| (value * 1e6).round())
    );
    for key in ["captured_at", "frame_age_ms", "decision", "threshold", "contrast", "device", "weight"] {
        assert!(line.get(key).is_some(), "{key} missing from {line}");
    }
    // Debounce 2: the published state appears with the second identical accepted label.
    assert_eq!(line["state"], serde_json::Value::Null);
    std::fs::copy(&images[0], dir.path().join("in/second.jpg")).unwrap();
    let line = served.next_line();
    assert_eq!(line["state"], reference["label"]);
    assert_eq!(line["state_changed"], true);
    // Every file gets its turn, in order, even when they arrive together.
    for (index, image) in images.iter().enumerate() {
        std::fs::copy(image, dir.path().join(format!("in/burst-{index}.jpg"))).unwrap();
    }
    let labels: Vec<_> = (0..images.len()).map(|_| served.next_line()["label"].clone()).collect();
    let expected: Vec<_> = images.iter().map(|image| classify_reference(&cache, image, "0.0")["label"].clone()).collect();
    assert_eq!(labels, expected);
    let camera = served.camera("drop");
    assert_eq!(camera["frames"]["processed"], images.len() + 2);
    assert_eq!(camera["frames"]["failed"], 0);
    assert_eq!(camera["frames"]["refused"], 0);
    let (status, jpeg) = get(port, "/api/cameras/drop/latest.jpg").expect("latest.jpg");
    assert_eq!(status, 200);
    assert_eq!(jpeg, std::fs::read(images.last().unwrap()).unwrap(), "latest.jpg is the last frame's own bytes");
}

#[test]
fn stale_frames_are_dropped_and_counted_never_queued() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let port = free_port();
    // One frame per 2 s at most, and a frame may wait 0.5 s: the second of two files 0.3 s apart
    // waits about 1.7 s for its turn, so it is stale.
    let cameras = "[[camera]]\nname = \"slow\"\nsource = \"folder:in\"\nfps = 0.5\nmax_frame_age = 0.5\n";
    let config = write_config(dir.path(), &cache, port, "", "", cameras);
    let served = Served::start(&config, port);
    let images = test_images();
    std::fs::copy(&images[0], dir.path().join("in/a.jpg")).unwrap();
    served.next_line();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::copy(&images[1], dir.path().join("in/b.jpg")).unwrap();
    served.wait_for(|| served.camera("slow")["frames"]["dropped_stale"] == 1, "the stale frame to be counted");
    assert_eq!(served.camera("slow")["frames"]["processed"], 1);
    assert_eq!(served.metric("cac_edge_frames_dropped_total{camera=\"slow\",reason=\"stale\"}"), 1.0);
    assert!(served.lines.recv_timeout(Duration::from_secs(3)).is_err(), "a stale frame must not be classified");
}

#[test]
fn sigterm_stops_within_5_seconds_and_sighup_reloads_without_restarting_unchanged_cameras() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    for folder in ["a", "b", "c"] {
        std::fs::create_dir(dir.path().join(folder)).unwrap();
    }
    let port = free_port();
    let lines_file = dir.path().join("decisions.jsonl");
    let service = format!("json_lines = \"{}\"", lines_file.display());
    let cameras = "[[camera]]\nname = \"kept\"\nsource = \"folder:a\"\nfps = 50\n\n[[camera]]\nname = \"moved\"\nsource = \"folder:b\"\nfps = 50\n";
    let config = write_config(dir.path(), &cache, port, "threshold = 0.5", &service, cameras);
    let mut served = Served::start(&config, port);
    let images = test_images();
    std::fs::copy(&images[0], dir.path().join("a/1.jpg")).unwrap();
    std::fs::copy(&images[0], dir.path().join("b/1.jpg")).unwrap();
    served.wait_for(|| std::fs::read_to_string(&lines_file).is_ok_and(|text| text.lines().count() == 2), "two lines in the file");

    // logrotate renames the file, then sends SIGHUP; the new config changes the threshold and
    // camera "moved"'s folder.
    std::fs::rename(&lines_file, dir.path().join("decisions.jsonl.1")).unwrap();
    let cameras = cameras.replace("folder:b", "folder:c");
    write_config(dir.path(), &cache, port, "threshold = 0.25", &service, &cameras);
    served.signal("HUP");
    served.wait_for(|| served.metric("cac_edge_reloads_total{result=\"ok\"}") == 1.0, "the reload");
    assert_eq!(served.camera("kept")["frames"]["processed"], 1, "the unchanged camera kept its state");
    assert_eq!(served.camera("moved")["frames"]["processed"], 0, "the changed camera was restarted");
    std::fs::copy(&images[1], dir.path().join("a/2.jpg")).unwrap();
    std::fs::copy(&images[1], dir.path().join("c/2.jpg")).unwrap();
    served.wait_for(
        || std::fs::read_to_string(&lines_file).is_ok_and(|text| text.lines().count() == 2),
        "two lines in the new file",
    );
    let new_lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&lines_file).unwrap().lines().map(|line| serde_json::from_str(line).unwrap()).collect();
    assert!(new_lines.iter().all(|line| line["threshold"] == 0.25), "{new_lines:?}");

    // An invalid config is refused: the service keeps running as it was and says why.
    std::fs::write(&config, "[model]\nbundle = 1\n").unwrap();
    served.signal("HUP");
    served.wait_for(|| served.metric("cac_edge_reloads_total{result=\"refused\"}") == 1.0, "the refused reload");
    assert!(served.stderr().contains("reload refused"), "{}", served.stderr());
    std::fs::copy(&images[2], dir.path().join("a/3.jpg")).unwrap();
    served.wait_for(|| served.camera("kept")["frames"]["processed"] == 2, "the old config to keep serving");

    // SIGTERM with a frame in flight: exit 0 within 5 s, every decision written.
    std::fs::copy(&images[0], dir.path().join("a/4.jpg")).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    served.signal("TERM");
    let (status, took) = served.wait_exit();
    assert!(status.success(), "{status:?}\n{}", served.stderr());
    assert!(took < Duration::from_secs(5), "stopping took {took:?}");
    let written = std::fs::read_to_string(&lines_file).unwrap();
    assert!(
        written.ends_with('\n') && written.lines().all(|line| serde_json::from_str::<serde_json::Value>(line).is_ok()),
        "{written}"
    );
}

#[test]
fn systemd_gets_ready_watchdog_and_stopping_notifications() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let port = free_port();
    let config = write_config(dir.path(), &cache, port, "", "", "[[camera]]\nname = \"drop\"\nsource = \"folder:in\"\n");
    let mut served = Served::start_with(&config, port, |command| {
        command.env("NOTIFY_SOCKET", &socket_path).env("WATCHDOG_USEC", "400000");
    });
    let mut received: Vec<String> = Vec::new();
    let mut buffer = [0u8; 512];
    let receive = |received: &mut Vec<String>, buffer: &mut [u8]| {
        let length = socket.recv(buffer).expect("a notification within 30 s");
        received.push(String::from_utf8_lossy(&buffer[..length]).into_owned());
    };
    while received.iter().filter(|message| message.as_str() == "WATCHDOG=1").count() < 3 {
        receive(&mut received, &mut buffer);
    }
    assert!(received[0].starts_with("READY=1\nSTATUS="), "{received:?}");
    served.signal("TERM");
    while !received.iter().any(|message| message == "STOPPING=1") {
        receive(&mut received, &mut buffer);
    }
    assert!(served.wait_exit().0.success());
}

#[test]
fn doctor_checks_the_config_the_sources_and_the_running_service() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let port = free_port();
    // A camera whose host refuses connections: unreachable for doctor, restarting in the service.
    let closed = free_port();
    let cameras = format!(
        "[[camera]]\nname = \"drop\"\nsource = \"folder:in\"\n\n[[camera]]\nname = \"gone\"\nsource = \"http://127.0.0.1:{closed}/snap.jpg\"\nstall_after = 2\n"
    );
    let config = write_config(dir.path(), &cache, port, "", "", &cameras);
    let doctor = || command().args(["doctor", "--json", "--config"]).arg(&config).output().expect("doctor");
    let checks = |output: &std::process::Output| -> Vec<serde_json::Value> {
        serde_json::from_slice(&output.stdout).expect("doctor JSON")
    };
    let find = |checks: &[serde_json::Value], name: &str, needle: &str| -> serde_json::Value {
        checks
            .iter()
            .find(|check| check["name"] == name && check["detail"].as_str().unwrap_or("").contains(needle))
            .cloned()
            .unwrap_or_else(|| panic!("no {name} check about {needle}: {checks:?}"))
    };
    let output = doctor();
    let before = checks(&output);
    assert_eq!(output.status.code(), Some(2), "the unreachable camera fails");
    assert_eq!(find(&before, "config", "valid")["status"], "ok");
    assert_eq!(find(&before, "cache", "verified")["status"], "ok");
    assert_eq!(find(&before, "camera", "drop: folder")["status"], "ok");
    assert_eq!(find(&before, "camera", "gone:")["status"], "fail");
    assert_eq!(find(&before, "service", "not answering")["status"], "warn");

    let served = Served::start(&config, port);
    std::fs::copy(&test_images()[0], dir.path().join("in/1.jpg")).unwrap();
    served.next_line();
    served.wait_for(|| served.camera("gone")["restarts"].as_u64() >= Some(1), "the failing source to be restarted");
    served.wait_for(|| served.camera("drop")["phase"] == "running", "the folder camera to be running");
    let during = checks(&doctor());
    assert_eq!(find(&during, "service", "running")["status"], "ok");
    assert_eq!(find(&during, "frames", "drop: running")["status"], "ok");
    let gone = find(&during, "frames", "gone: restarting");
    assert_eq!(gone["status"], "fail", "{gone}");
    drop(served);

    std::fs::write(&config, "[model]\nbundle = \"b\"\n").unwrap();
    let output = doctor();
    assert_eq!(output.status.code(), Some(2));
    assert!(find(&checks(&output), "config", "serve.toml")["detail"].as_str().unwrap().contains("model.cache"));
}

/// Starts serve with a stdin camera; returns a feeder of its stdin: bytes sent are written by a
/// thread (a service that stops reading cannot block the test), and dropping it closes stdin.
fn serve_stdin(dir: &Path, cache: &str, camera_extra: &str) -> (Served, mpsc::Sender<Vec<u8>>) {
    let port = free_port();
    let cameras = format!("[[camera]]\nname = \"pipe\"\nsource = \"stdin:\"\n{camera_extra}\n");
    let config = write_config(dir, cache, port, "threshold = 0.0", "", &cameras);
    let mut served = Served::start(&config, port);
    let mut stdin = served.child.stdin.take().expect("stdin");
    let (feed, chunks) = mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        for chunk in chunks {
            if stdin.write_all(&chunk).and_then(|()| stdin.flush()).is_err() {
                break;
            }
        }
    });
    (served, feed)
}

#[test]
fn a_source_faster_than_the_model_keeps_only_the_newest_frame() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    // fps 1: the first frame is taken at once, the next one second later. 40 frames arrive in
    // a burst meanwhile: the newest of them wins, the other 38 are dropped, none queued.
    let (mut served, stdin) = serve_stdin(dir.path(), &cache, "fps = 1\nmax_frame_age = 30");
    let frames: Vec<Vec<u8>> = test_images().iter().cycle().take(40).map(|path| std::fs::read(path).unwrap()).collect();
    stdin.send(frames.concat()).unwrap();
    served.wait_for(
        || served.camera("pipe")["frames"]["received"] == 40 && served.camera("pipe")["frames"]["processed"] == 2,
        "the burst to be handled",
    );
    let camera = served.camera("pipe");
    assert_eq!(camera["frames"]["dropped_busy"], 38, "{camera}");
    assert_eq!(camera["frames"]["dropped_stale"], 0, "{camera}");
    let (_, newest) = get(served.port, "/api/cameras/pipe/latest.jpg").expect("latest.jpg");
    assert_eq!(newest, frames[39], "the frame classified second is the newest one");
    assert_eq!(served.metric("cac_edge_frames_dropped_total{camera=\"pipe\",reason=\"busy\"}"), 38.0);
    // End of input: the only source has ended, so the service stops by itself, exit 0.
    drop(stdin);
    let (status, _) = served.wait_exit();
    assert!(status.success(), "{}", served.stderr());
    assert!(served.stderr().contains("every source has ended"), "{}", served.stderr());
}

#[test]
fn corrupt_frames_on_stdin_are_counted_and_the_good_ones_classified() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let (served, stdin) = serve_stdin(dir.path(), &cache, "fps = 1000");
    let images = test_images();
    let good = std::fs::read(&images[0]).unwrap();
    let reference = classify_reference(&cache, &images[0], "0.0");
    // Each good frame is written after the previous decision, so none is replaced.
    let send_and_expect = |bytes: &[u8]| {
        stdin.send(bytes.to_vec()).unwrap();
        let line = served.next_line();
        assert_eq!(line["label"], reference["label"], "{line}");
    };
    send_and_expect(&good);
    // Garbage between frames, then a good frame.
    let mut garbage = b"\x00\x01garbage between frames\xff\x00".to_vec();
    garbage.extend_from_slice(&good);
    send_and_expect(&garbage);
    // A frame cut short (the camera dropped bytes), then a good one: the cut frame never
    // becomes a decision, the good one does.
    let mut cut = good[..good.len() / 3].to_vec();
    cut.extend_from_slice(&good);
    send_and_expect(&cut);
    served.wait_for(|| served.camera("pipe")["frames"]["processed"] == 3, "three decisions");
    let camera = served.camera("pipe");
    let problems = camera["frames"]["refused"].as_u64().unwrap() + camera["frames"]["failed"].as_u64().unwrap();
    assert!(problems >= 1, "the cut frame is counted: {camera}");
    assert!(served.lines.recv_timeout(Duration::from_millis(500)).is_err(), "no decision for a broken frame");
}

/// A camera on loopback that answers snapshot requests only while `serving` is set; otherwise it
/// accepts the connection and says nothing (a stalled camera).
fn stalling_camera(jpeg: Vec<u8>, serving: std::sync::Arc<std::sync::atomic::AtomicBool>) -> u16 {
    use std::sync::atomic::Ordering;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let started = Instant::now();
        for stream in listener.incoming() {
            if started.elapsed() > WAIT * 2 {
                break;
            }
            let Ok(mut stream) = stream else { continue };
            let jpeg = jpeg.clone();
            let serving = std::sync::Arc::clone(&serving);
            std::thread::spawn(move || {
                let mut request = [0u8; 2048];
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let _ = stream.read(&mut request);
                if serving.load(Ordering::SeqCst) {
                    let header = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: image/jpeg\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        jpeg.len()
                    );
                    let _ = stream.write_all(header.as_bytes());
                    let _ = stream.write_all(&jpeg);
                } else {
                    // Hold the connection open, silent, for at most 20 s.
                    std::thread::sleep(Duration::from_secs(20));
                }
            });
        }
    });
    port
}

#[test]
fn a_stalled_camera_is_restarted_and_readyz_says_which_until_frames_flow_again() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let serving = std::sync::Arc::new(AtomicBool::new(false));
    let camera_port = stalling_camera(std::fs::read(&test_images()[0]).unwrap(), std::sync::Arc::clone(&serving));
    let port = free_port();
    let cameras = format!(
        "[[camera]]\nname = \"yard\"\nsource = \"http://127.0.0.1:{camera_port}/snapshot.jpg\"\nfps = 5\nstall_after = 1\n"
    );
    let config = write_config(dir.path(), &cache, port, "", "", &cameras);
    let served = Served::start(&config, port);
    served.wait_for(|| served.camera("yard")["restarts"].as_u64() >= Some(2), "two restarts of the stalled source");
    let (status, body) = get(port, "/readyz").unwrap();
    assert_eq!((status, text(&body).trim()), (503, "no fresh frames from: yard"));
    assert!(served.metric("cac_edge_source_restarts_total{camera=\"yard\"}") >= 2.0);
    assert_eq!(served.metric("cac_edge_camera_fresh{camera=\"yard\"}"), 0.0);
    serving.store(true, Ordering::SeqCst);
    served.wait_for(|| get(port, "/readyz").is_some_and(|(status, _)| status == 200), "frames to flow again");
    served.next_line();
    assert_eq!(served.camera("yard")["phase"], "running");
}

/// Processes whose command line mentions `needle` (decoder children left behind).
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) && !cmdline.contains("rtsp_server.py") {
                found.push(cmdline);
            }
        }
    }
    found
}

#[test]
fn rtsp_cameras_are_decoded_by_supervised_children_restarted_and_never_left_behind() {
    if !services_available(
        &["ffmpeg", "gst-launch-1.0", "/usr/bin/python3"],
        "ffmpeg gstreamer1.0-tools gstreamer1.0-rtsp gir1.2-gst-rtsp-server-1.0 python3-gi",
    ) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    let rtsp_port = free_port();
    let server_script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/support/rtsp_server.py");
    let mut server = Command::new("/usr/bin/python3")
        .arg(&server_script)
        .arg(rtsp_port.to_string())
        .arg("120")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the RTSP server");
    let mut ready = String::new();
    BufReader::new(server.stdout.take().unwrap()).read_line(&mut ready).expect("the server's first line");
    assert_eq!(ready.trim(), "ready", "the GStreamer RTSP server did not start (gir1.2-gst-rtsp-server-1.0 installed?)");
    let port = free_port();
    let cameras = format!(
        "[[camera]]\nname = \"h264\"\nsource = \"rtsp://127.0.0.1:{rtsp_port}/h264\"\nfps = 4\nstall_after = 5\n\n\
         [[camera]]\nname = \"mjpeg\"\nsource = \"rtsp://127.0.0.1:{rtsp_port}/mjpeg\"\nrtsp_decoder = \"gstreamer\"\nfps = 4\nstall_after = 5\n"
    );
    let config = write_config(dir.path(), &cache, port, "", "", &cameras);
    let mut served = Served::start(&config, port);
    served.wait_for(
        || {
            served.camera("h264")["frames"]["processed"].as_u64() >= Some(2)
                && served.camera("mjpeg")["frames"]["processed"].as_u64() >= Some(2)
        },
        "decisions from both RTSP cameras",
    );
    for camera in ["h264", "mjpeg"] {
        let (status, jpeg) = get(port, &format!("/api/cameras/{camera}/latest.jpg")).expect("latest.jpg");
        assert_eq!(status, 200);
        let frame = image::load_from_memory(&jpeg).expect("a decodable JPEG");
        assert_eq!((frame.width(), frame.height()), (320, 240), "{camera}");
    }
    assert_eq!(served.camera("h264")["restarts"], 0);
    let url = format!("127.0.0.1:{rtsp_port}/");
    assert_eq!(processes_mentioning(&url).len(), 2, "one decoder per camera: {:?}", processes_mentioning(&url));

    // The server goes away: each decoder exits, the source fails and is restarted with backoff.
    let _ = server.kill();
    let _ = server.wait();
    served.wait_for(
        || served.camera("h264")["restarts"].as_u64() >= Some(1) && served.camera("mjpeg")["restarts"].as_u64() >= Some(1),
        "restarts of both sources",
    );
    assert!(served.metric("cac_edge_source_restarts_total{camera=\"h264\"}") >= 1.0);

    served.signal("TERM");
    let (status, took) = served.wait_exit();
    assert!(status.success() && took < Duration::from_secs(5), "{status:?} after {took:?}");
    let start = Instant::now();
    while !processes_mentioning(&url).is_empty() && start.elapsed() < Duration::from_secs(3) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(processes_mentioning(&url).is_empty(), "decoders left behind: {:?}", processes_mentioning(&url));
}

#[test]
fn the_review_rings_labels_csv_once_filled_in_refits_the_temperature_with_eval() {
    let dir = tempfile::tempdir().unwrap();
    let cache = build_cache_cli(dir.path());
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let port = free_port();
    // Threshold 1: every frame abstains, so every frame goes to the review ring.
    let cameras = "[[camera]]\nname = \"door\"\nsource = \"folder:in\"\nfps = 50\n";
    let review = format!("[review]\nfolder = \"{}\"\n", dir.path().join("review").display());
    let config = write_config(dir.path(), &cache, port, "threshold = 1.0", "", &format!("{review}\n{cameras}"));
    let mut served = Served::start(&config, port);
    // The photos and their true labels (tests/fixtures/classes.txt); one frame at a time, so
    // that the ring's order is the order fed.
    let truth = [
        ("chelsea.png", "cat"),
        ("rocket.jpg", "rocket"),
        ("coffee.png", "coffee mug"),
        ("china.jpg", "building"),
        ("astronaut.png", "astronaut"),
        ("flower.jpg", "flower"),
    ];
    for (index, (photo, _)) in truth.iter().enumerate() {
        std::fs::copy(fixture(&format!("images/photos/{photo}")), dir.path().join(format!("in/{index}-{photo}"))).unwrap();
        assert_eq!(served.next_line()["decision"], "abstain");
    }
    served.signal("TERM");
    assert!(served.wait_exit().0.success(), "{}", served.stderr());

    // 1. copy the ring; 2. fill in the label column of its template.
    let labelled = dir.path().join("labelled");
    std::fs::create_dir(&labelled).unwrap();
    for entry in std::fs::read_dir(dir.path().join("review")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), labelled.join(entry.file_name())).unwrap();
    }
    let template = std::fs::read_to_string(labelled.join("labels.csv")).expect("the ring's labels.csv");
    let mut lines = template.lines();
    assert_eq!(lines.next(), Some("path,label,predicted,confidence,camera"));
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), truth.len(), "{template}");
    let mut filled = String::from("path,label,predicted,confidence,camera\n");
    for (row, (_, label)) in rows.iter().zip(truth) {
        let (path, rest) = row.split_once(",,").expect("an empty label column");
        assert!(labelled.join(path).is_file(), "{path} is in the ring");
        assert!(rest.ends_with(",door"), "{row}");
        filled.push_str(&format!("{path},{label},{rest}\n"));
    }
    // One row left unlabelled: eval skips it.
    filled.push_str(&format!("{}\n", rows[0]));
    std::fs::write(labelled.join("labels.csv"), filled).unwrap();

    // 3. eval on the box's own frames re-fits the temperature and the threshold (README's command).
    let report = dir.path().join("report");
    let output = command()
        .args(["eval", "--device", "cpu", "--bundle"])
        .arg(common::bundle_dir())
        .arg("--cache")
        .arg(&cache)
        .arg("--images")
        .arg(labelled.join("labels.csv"))
        .arg("--fit-images")
        .arg(labelled.join("labels.csv"))
        // A coverage target: the random-weight test bundle reaches no precision target.
        .args(["--write-temperature", "--write-threshold", "--target-coverage", "0.5"])
        .arg("--out")
        .arg(&report)
        .output()
        .expect("run eval");
    assert!(output.status.success(), "{}", text(&output.stderr));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(report.join("report.json")).unwrap()).unwrap();
    let temperature = report["fit"]["temperature"]["temperature"].as_f64().expect("a fitted temperature");
    assert!(temperature.is_finite() && temperature > 0.0);
    let info = text(&common::cac_edge(&["cache", "info", "--cache", &cache]).stdout);
    assert!(
        info.contains("ts_temperature") && info.contains("threshold"),
        "the temperature and threshold are in the cache: {info}"
    );
}

/// A dark, noisy JPEG: what a covered lens sends.
fn covered_lens_frame(seed: u32) -> Vec<u8> {
    let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    let image = image::RgbImage::from_fn(128, 112, |_, _| {
        state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        let level = 8 + (state >> 28) as u8;
        image::Rgb([level, level, level])
    });
    let mut jpeg = Vec::new();
    image.write_to(&mut std::io::Cursor::new(&mut jpeg), image::ImageFormat::Jpeg).expect("encode");
    jpeg
}

#[test]
fn the_shift_alarm_stays_quiet_on_familiar_frames_and_fires_when_the_lens_is_covered() {
    let dir = tempfile::tempdir().unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("onnx/demo");
    let cache = dir.path().join("demo.safetensors");
    let output = common::cache_build_cli(&demo, &demo.join("classes.txt"), &demo.join("base.txt"), &cache);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let eval = command()
        .args(["eval", "--device", "cpu", "--bundle"])
        .arg(&demo)
        .arg("--cache")
        .arg(&cache)
        .arg("--images")
        .arg(demo.join("images/labels.csv"))
        .arg("--write-drift-baseline")
        .arg("--out")
        .arg(dir.path().join("report"))
        .output()
        .expect("run eval");
    assert!(eval.status.success(), "{}", text(&eval.stderr));
    std::fs::create_dir(dir.path().join("in")).unwrap();
    let port = free_port();
    // A 50-frame window: in distribution its PSI is about χ²₉/50 (mean 0.18), so it is raised at 0.8.
    let config = dir.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[model]\nbundle = \"{}\"\ncache = \"{}\"\ndevice = \"cpu\"\nthreads = 1\n\n[service]\nhttp = \"127.0.0.1:{port}\"\n\n\
             [drift]\nwindow = 50\nraise = 0.8\nclear = 0.3\n\n[[camera]]\nname = \"cam\"\nsource = \"folder:in\"\nfps = 100\n",
            demo.display(),
            cache.display()
        ),
    )
    .unwrap();
    let served = Served::start(&config, port);
    let familiar: Vec<PathBuf> = std::fs::read_to_string(demo.join("images/labels.csv"))
        .unwrap()
        .lines()
        .skip(1)
        .filter_map(|line| line.split(',').next().map(|path| demo.join("images").join(path)))
        .take(60)
        .collect();
    for (index, image) in familiar.iter().enumerate() {
        std::fs::copy(image, dir.path().join(format!("in/{index:03}.jpg"))).unwrap();
        let drift = served.next_line()["drift"].clone();
        assert_eq!(drift["window"], 50, "{drift}");
        assert_eq!(drift["alarm"], false, "frame {index}: {drift}");
        assert_eq!(drift["score"].is_null(), index < 49, "a score once the window is full: {drift}");
    }
    assert_eq!(served.metric("cac_edge_drift_alarm{camera=\"cam\"}"), 0.0);
    let mut fired_after = None;
    for index in 0..60 {
        std::fs::write(dir.path().join(format!("in/covered-{index:03}.jpg")), covered_lens_frame(index)).unwrap();
        let drift = served.next_line()["drift"].clone();
        if drift["alarm_changed"] == true {
            assert_eq!(drift["alarm"], true);
            fired_after = Some(index + 1);
            break;
        }
    }
    let fired_after = fired_after.expect("the alarm fires within 60 covered frames");
    assert_eq!(served.metric("cac_edge_drift_alarm{camera=\"cam\"}"), 1.0);
    assert_eq!(served.metric("cac_edge_drift_alarms_total{camera=\"cam\"}"), 1.0);
    assert_eq!(served.camera("cam")["drift"]["alarm"], true);
    assert!(served.stderr().contains("shift alarm"), "{}", served.stderr());
    eprintln!("the shift alarm fired after {fired_after} covered frames (window 50)");
}

//! The MQTT output against a real broker: Debian's mosquitto, started by each test on
//! 127.0.0.1 with its own config (scripts/setup-test-services installs it). The service is the
//! real binary; the subscriber is a rumqttc client in the test. Every wait is bounded.
//!
//! - a broker killed (SIGKILL) mid-stream and restarted: every decision arrives, in order;
//! - a queue too small for an outage: the oldest are dropped and counted, the rest delivered;
//! - the Last Will on SIGKILL of the service, `offline` on SIGTERM;
//! - user name and password;
//! - TLS with a certificate authority made by the test (openssl);
//! - a broker across a slow link (a delaying proxy).
#![cfg(feature = "mqtt")]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::served::{free_port, services_available, test_images, write_config, Served, WAIT};
use common::{build_cache_cli, text};
use rumqttc::{Client, Event, MqttOptions, Packet, QoS};

const MOSQUITTO: &str = "/usr/sbin/mosquitto";

fn broker_available() -> bool {
    services_available(&[MOSQUITTO, "openssl"], "mosquitto openssl")
}

/// A mosquitto on loopback, killed on drop. Persistent: a restart keeps the subscriber's session
/// and the messages queued for it.
struct Broker {
    child: Option<Child>,
    config: PathBuf,
    port: u16,
}

impl Broker {
    /// `extra`: more mosquitto.conf lines (listeners, password file).
    fn start(dir: &Path, extra: &str) -> Broker {
        let port = free_port();
        let data = dir.join("broker");
        std::fs::create_dir_all(&data).expect("broker folder");
        let anonymous = if extra.contains("password_file") { "false" } else { "true" };
        let config = data.join("mosquitto.conf");
        let text = format!(
            "user root\npersistence true\npersistence_location {}/\nautosave_interval 1\nlog_dest stderr\nlog_type error\n\
             per_listener_settings false\nallow_anonymous {anonymous}\nlistener {port} 127.0.0.1\n{extra}\n",
            data.display()
        );
        std::fs::write(&config, text).expect("mosquitto.conf");
        let mut broker = Broker { child: None, config, port };
        broker.restart();
        broker
    }

    fn restart(&mut self) {
        let child = Command::new(MOSQUITTO)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.child.as_mut().and_then(|child| child.try_wait().ok().flatten()) {
                panic!("mosquitto exited ({status}); config:\n{}", std::fs::read_to_string(&self.config).unwrap_or_default());
            }
            assert!(start.elapsed() < WAIT, "mosquitto did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL: no goodbye to anyone.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// (topic, payload), in arrival order.
type Received = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A QoS 1 subscriber with a persistent session (it reconnects by itself), recording every
/// message it gets.
struct Subscriber {
    messages: Received,
    subscribed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Subscriber {
    fn start(port: u16, filter: &str, id: &str, credentials: Option<(&str, &str)>) -> Subscriber {
        let mut options = MqttOptions::new(id, "127.0.0.1", port);
        options.set_clean_session(false);
        options.set_keep_alive(Duration::from_secs(5));
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password);
        }
        let messages: Received = Arc::default();
        let subscribed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (client, mut connection) = Client::new(options, 100);
        let filter = filter.to_string();
        {
            let (messages, subscribed, stop) = (Arc::clone(&messages), Arc::clone(&subscribed), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match connection.recv_timeout(Duration::from_millis(100)) {
                        Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                            let _ = client.try_subscribe(filter.as_str(), QoS::AtLeastOnce);
                        }
                        Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => subscribed.store(true, Ordering::SeqCst),
                        Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                            messages.lock().unwrap().push((publish.topic.clone(), publish.payload.to_vec()));
                        }
                        Ok(Err(_)) => std::thread::sleep(Duration::from_millis(100)),
                        _ => {}
                    }
                }
            });
        }
        let subscriber = Subscriber { messages, subscribed, stop };
        wait_until(|| subscriber.subscribed.load(Ordering::SeqCst), "the subscriber's SUBACK");
        subscriber
    }

    fn payloads(&self, topic_end: &str) -> Vec<Vec<u8>> {
        let messages = self.messages.lock().unwrap();
        messages.iter().filter(|(topic, _)| topic.ends_with(topic_end)).map(|(_, payload)| payload.clone()).collect()
    }

    /// The decisions received, parsed, duplicates (QoS 1 redeliveries) removed; and how many
    /// duplicates there were.
    fn decisions(&self) -> (Vec<serde_json::Value>, usize) {
        let mut seen = Vec::new();
        let mut duplicates = 0;
        for payload in self.payloads("/decision") {
            let value: serde_json::Value = serde_json::from_slice(&payload).expect("a decision is JSON");
            if seen.contains(&value) {
                duplicates += 1;
            } else {
                seen.push(value);
            }
        }
        (seen, duplicates)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn wait_until(mut done: impl FnMut() -> bool, what: &str) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < WAIT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A folder camera `cam` and an `[mqtt]` table; the service started.
struct Setup {
    dir: tempfile::TempDir,
    cache: String,
    fed: usize,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().expect("temp dir");
        let cache = build_cache_cli(dir.path());
        std::fs::create_dir_all(dir.path().join("frames")).expect("frames folder");
        Setup { dir, cache, fed: 0 }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn serve(&self, mqtt: &str) -> Served {
        self.serve_with(mqtt, |_| {})
    }

    fn serve_with(&self, mqtt: &str, adjust: impl FnOnce(&mut Command)) -> Served {
        let port = free_port();
        let camera =
            format!("[[camera]]\nname = \"cam\"\nsource = \"folder:{}\"\nfps = 50\n", self.path().join("frames").display());
        let tables =
            format!("{camera}\n[mqtt]\nprefix = \"site/box\"\nqueue = \"{}\"\n{mqtt}\n", self.path().join("queue").display());
        let config = write_config(self.path(), &self.cache, port, "", "", &tables);
        Served::start_with(&config, port, adjust)
    }

    /// Drops `count` frames into the camera's folder (written aside, renamed in).
    fn feed(&mut self, count: usize) {
        let images = test_images();
        for _ in 0..count {
            let image = &images[self.fed % images.len()];
            let staged = self.path().join(format!(".staged-{}", self.fed));
            std::fs::copy(image, &staged).expect("copy a frame");
            std::fs::rename(&staged, self.path().join("frames").join(format!("{:05}.jpg", self.fed))).expect("drop a frame");
            self.fed += 1;
        }
    }
}

/// The next `count` JSON lines of the service (its own record of its decisions).
fn lines(served: &Served, count: usize) -> Vec<serde_json::Value> {
    (0..count).map(|_| served.next_line()).collect()
}

fn mqtt_table(broker: &Broker) -> String {
    format!("url = \"mqtt://127.0.0.1:{}\"\nkeep_alive = 5\n", broker.port)
}

#[test]
fn a_broker_killed_mid_stream_loses_nothing_and_the_order_is_kept() {
    if !broker_available() {
        return;
    }
    let mut setup = Setup::new();
    let mut broker = Broker::start(setup.path(), "");
    let subscriber = Subscriber::start(broker.port, "site/box/+/decision", "crash-test", None);
    let served = setup.serve(&mqtt_table(&broker));

    setup.feed(8);
    let mut expected = lines(&served, 8);
    wait_until(|| subscriber.decisions().0.len() == 8, "the first 8 decisions on the broker");
    served.wait_for(|| served.metric("cac_edge_mqtt_queued") == 0.0, "an empty queue");
    // The subscriber's session must be on disk before the broker dies (autosave_interval 1).
    std::thread::sleep(Duration::from_millis(1500));

    broker.kill();
    served.wait_for(|| served.metric("cac_edge_mqtt_connected") == 0.0, "the service to notice the broker is gone");
    setup.feed(12);
    expected.extend(lines(&served, 12));
    served.wait_for(|| served.metric("cac_edge_mqtt_queued") >= 12.0, "12 decisions queued on disk");

    broker.restart();
    setup.feed(4);
    expected.extend(lines(&served, 4));
    served.wait_for(|| subscriber.decisions().0.len() >= 24, "all 24 decisions after the broker came back");
    let (received, duplicates) = subscriber.decisions();
    assert_eq!(received, expected, "every decision, in the order the service made them");
    served.wait_for(|| served.metric("cac_edge_mqtt_queued") == 0.0, "the queue drained");
    assert!(served.metric("cac_edge_mqtt_connections_total") >= 2.0);
    assert_eq!(served.metric("cac_edge_mqtt_dropped_total"), 0.0);
    eprintln!("24 decisions across a broker crash: 0 lost, {duplicates} delivered twice (QoS 1)");
}

#[test]
fn a_full_queue_drops_the_oldest_counts_them_and_delivers_the_rest_in_order() {
    if !broker_available() {
        return;
    }
    let mut setup = Setup::new();
    let mut broker = Broker::start(setup.path(), "");
    let subscriber = Subscriber::start(broker.port, "site/box/+/decision", "overflow-test", None);
    std::thread::sleep(Duration::from_millis(1500));
    broker.kill();
    // About 50 kB: three segments of 16 kB, some 20 decisions each.
    let served = setup.serve(&format!("{}queue_max_megabytes = 0.05\n", mqtt_table(&broker)));
    let total = 150;
    setup.feed(total);
    let made = lines(&served, total);
    // State messages share the queue: every message made is either dropped (counted) or queued.
    // (The JSON line of a decision is written just before its MQTT message is queued.)
    let states = made.iter().filter(|line| line["state_changed"] == true).count();
    let accounted = || served.metric("cac_edge_mqtt_dropped_total") + served.metric("cac_edge_mqtt_queued");
    served.wait_for(|| accounted() as usize == total + states, "every message dropped or queued");
    let dropped = served.metric("cac_edge_mqtt_dropped_total");
    assert!(dropped > 0.0, "the queue overflowed");
    assert!(served.stderr().contains("MQTT queue full"), "the log says so:\n{}", served.stderr());

    broker.restart();
    served.wait_for(|| served.metric("cac_edge_mqtt_queued") == 0.0, "the rest delivered");
    let (received, _) = subscriber.decisions();
    // The survivors are the newest decisions, in order.
    assert!(!received.is_empty() && received.len() < total, "{} of {total} delivered", received.len());
    assert_eq!(received, made[total - received.len()..], "the newest decisions, in order");
    eprintln!(
        "{total} decisions during an outage, queue bound 50 kB: {dropped} messages dropped, {} decisions delivered",
        received.len()
    );
}

#[test]
fn the_last_will_says_offline_when_the_service_is_killed_and_a_clean_stop_says_it_too() {
    if !broker_available() {
        return;
    }
    let setup = Setup::new();
    let broker = Broker::start(setup.path(), "");
    let subscriber = Subscriber::start(broker.port, "site/box/available", "availability-test", None);
    let availability = || subscriber.payloads("/available").into_iter().map(|payload| text(&payload)).collect::<Vec<_>>();

    let mut served = setup.serve(&mqtt_table(&broker));
    wait_until(|| availability() == ["online"], "online");
    served.child.kill().expect("SIGKILL the service");
    let _ = served.child.wait();
    wait_until(|| availability() == ["online", "offline"], "the Last Will");

    let mut served = setup.serve(&mqtt_table(&broker));
    wait_until(|| availability().len() == 3, "online again");
    served.signal("TERM");
    let (status, took) = served.wait_exit();
    assert!(status.success(), "{status}; stderr:\n{}", served.stderr());
    assert!(took < Duration::from_secs(5), "stopped in {took:?}");
    wait_until(|| availability().len() == 4, "offline at a clean stop");
    assert_eq!(availability(), ["online", "offline", "online", "offline"]);
}

#[test]
fn a_broker_with_passwords_refuses_a_wrong_one_clearly_and_takes_the_right_one() {
    if !broker_available() {
        return;
    }
    let mut setup = Setup::new();
    let passwords = setup.path().join("passwords");
    std::fs::write(&passwords, "").expect("password file");
    let status = Command::new("/usr/bin/mosquitto_passwd").arg("-b").arg(&passwords).args(["box", "s3cret"]).status();
    assert!(status.is_ok_and(|status| status.success()), "mosquitto_passwd (package mosquitto)");
    let broker = Broker::start(setup.path(), &format!("password_file {}", passwords.display()));

    let wrong = format!("{}username = \"box\"\npassword = \"wrong\"\n", mqtt_table(&broker));
    let served = setup.serve(&wrong);
    served.wait_for(|| served.stderr().contains("refused the user name or password"), "the refusal, explained");
    assert_eq!(served.metric("cac_edge_mqtt_connected"), 0.0);
    drop(served);

    let subscriber = Subscriber::start(broker.port, "site/box/+/decision", "auth-test", Some(("box", "s3cret")));
    let right = format!("{}username = \"box\"\npassword = \"${{MQTT_PASSWORD}}\"\n", mqtt_table(&broker));
    let served = setup.serve_with(&right, |command| {
        command.env("MQTT_PASSWORD", "s3cret");
    });
    setup.feed(2);
    let made = lines(&served, 2);
    wait_until(|| subscriber.decisions().0.len() == 2, "2 decisions through the authenticated connection");
    assert_eq!(subscriber.decisions().0, made);
    assert!(!served.stderr().contains("s3cret"), "the password never reaches the log");
}

#[test]
fn tls_with_a_certificate_made_by_the_test() {
    if !broker_available() {
        return;
    }
    let mut setup = Setup::new();
    let pki = setup.path().join("pki");
    let (ca, cert, key) = make_certificates(&pki, "ca");
    let (other_ca, _, _) = make_certificates(&pki.join("other"), "other-ca");
    let tls_port = free_port();
    let listener = format!(
        "listener {tls_port} 127.0.0.1\ncafile {}\ncertfile {}\nkeyfile {}\n",
        ca.display(),
        cert.display(),
        key.display()
    );
    let broker = Broker::start(setup.path(), &listener);
    let subscriber = Subscriber::start(broker.port, "site/box/+/decision", "tls-test", None);

    let untrusted = format!("url = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"\n", other_ca.display());
    let served = setup.serve(&untrusted);
    served.wait_for(|| served.stderr().contains("TLS failed"), "the TLS failure, explained");
    drop(served);

    let trusted = format!("url = \"mqtts://127.0.0.1:{tls_port}\"\nca_file = \"{}\"\n", ca.display());
    let served = setup.serve(&trusted);
    served.wait_for(|| served.metric("cac_edge_mqtt_connected") == 1.0, "a TLS connection");
    setup.feed(1);
    let made = lines(&served, 1);
    wait_until(|| subscriber.decisions().0.len() == 1, "the decision, sent over TLS");
    assert_eq!(subscriber.decisions().0, made);
}

/// A certificate authority and a server certificate for 127.0.0.1 it signed: (ca, cert, key).
fn make_certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("pki folder");
    let path = |file: &str| dir.join(file);
    let openssl = |args: &[&str]| {
        let output = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
        assert!(output.status.success(), "openssl {args:?}: {}", text(&output.stderr));
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-subj",
        &format!("/CN={name}"),
    ]);
    openssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1"]);
    std::fs::write(path("san.ext"), "subjectAltName = IP:127.0.0.1, DNS:localhost\n").expect("san.ext");
    openssl(&[
        "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2", "-out",
        "server.pem", "-extfile", "san.ext",
    ]);
    (path("ca.pem"), path("server.pem"), path("server.key"))
}

/// A TCP proxy on loopback that holds every chunk for `delay` in each direction: a broker
/// across a slow link. Threads end when either side closes.
fn delaying_proxy(target: u16, delay: Duration) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
    let port = listener.local_addr().expect("address").port();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { return };
            let Ok(upstream) = std::net::TcpStream::connect(("127.0.0.1", target)) else { continue };
            for (from, to) in [(client.try_clone(), upstream.try_clone()), (upstream.try_clone(), client.try_clone())] {
                let (Ok(mut from), Ok(mut to)) = (from, to) else { continue };
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut buffer = [0u8; 65536];
                    while let Ok(read) = from.read(&mut buffer) {
                        if read == 0 {
                            break;
                        }
                        std::thread::sleep(delay);
                        if to.write_all(&buffer[..read]).is_err() {
                            break;
                        }
                    }
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
            }
        }
    });
    port
}

#[test]
fn a_broker_across_a_slow_link_is_connected_to() {
    if !broker_available() {
        return;
    }
    // 60 ms each way: CONNECT to CONNACK takes over 120 ms, longer than the publisher's 50 ms
    // poll (a poll that timed out while connecting used to drop the half-made connection).
    let mut setup = Setup::new();
    let broker = Broker::start(setup.path(), "");
    let subscriber = Subscriber::start(broker.port, "site/box/+/decision", "slow-link-test", None);
    let slow = delaying_proxy(broker.port, Duration::from_millis(60));
    let served = setup.serve(&format!("url = \"mqtt://127.0.0.1:{slow}\"\n"));
    served.wait_for(|| served.metric("cac_edge_mqtt_connected") == 1.0, "a connection across the slow link");
    setup.feed(2);
    let made = lines(&served, 2);
    wait_until(|| subscriber.decisions().0.len() == 2, "2 decisions across the slow link");
    assert_eq!(subscriber.decisions().0, made);
}

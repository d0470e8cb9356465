//! The MQTT output's on-disk queue: every message is appended here first and leaves only when
//! the broker has acknowledged it (QoS 1), so a broker that is down, a network that drops, or a
//! service that is killed loses nothing within the queue's size. Format: docs/FORMATS.md §10.
//!
//! - Messages are numbered (`seq`) in the order they were appended, and delivered in that order.
//! - The queue is a folder of segment files, `<first seq, 20 digits>.seg`, each a run of
//!   records `[body length: u32 LE][CRC-32 of the body: u32 LE][body]`, the body being
//!   `[flags: u8, bit 0 = retain][topic length: u16 LE][topic][payload]`. A record is written
//!   with one `write` call; a record cut short by a crash, or one whose CRC does not match, ends
//!   its segment when the queue is opened again (the rest of a last segment is cut off).
//! - `head` (text: a decimal seq) is the first message not yet acknowledged. It is saved
//!   atomically (written aside, then renamed) at most once a second and when the publisher stops,
//!   so after a crash a few messages may be delivered twice: MQTT's QoS 1 is "at least once".
//! - Over `max_bytes`, the oldest segment is deleted, delivered or not; messages lost that way are
//!   counted ([`DiskQueue::dropped`]). A segment is about an eighth of `max_bytes`.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// One MQTT message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic.
    pub topic: String,
    /// The payload.
    pub payload: Vec<u8>,
    /// Whether the broker keeps it as the topic's last value.
    pub retain: bool,
}

const RECORD_HEADER: usize = 8;
const SEGMENT_SUFFIX: &str = ".seg";
const HEAD_FILE: &str = "head";
/// Segments are at least this large, so a small queue is not a swarm of tiny files.
const MIN_SEGMENT_BYTES: u64 = 16 << 10;

/// A bounded FIFO of messages in a folder.
pub struct DiskQueue {
    dir: PathBuf,
    max_bytes: u64,
    segment_bytes: u64,
    /// Oldest first; the last one is written to.
    segments: VecDeque<Segment>,
    /// The first message not yet acknowledged.
    head: u64,
    /// The number the next appended message gets.
    next_seq: u64,
    /// The head as last saved.
    saved_head: u64,
    /// Messages deleted unsent because the queue was full (since open).
    dropped: u64,
}

struct Segment {
    first_seq: u64,
    /// Where each record starts.
    offsets: Vec<u64>,
    bytes: u64,
    path: PathBuf,
}

impl Segment {
    fn end_seq(&self) -> u64 {
        self.first_seq + self.offsets.len() as u64
    }
}

impl DiskQueue {
    /// Opens the queue in `dir` (created if missing), keeping what an earlier run left.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<DiskQueue> {
        fs::create_dir_all(dir).map_err(|error| with_path(error, dir, "cannot create the MQTT queue folder"))?;
        let mut firsts = Vec::new();
        for entry in fs::read_dir(dir).map_err(|error| with_path(error, dir, "cannot read the MQTT queue folder"))? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name.strip_suffix(SEGMENT_SUFFIX).and_then(|stem| stem.parse::<u64>().ok()) {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut segments = VecDeque::new();
        for (index, &first_seq) in firsts.iter().enumerate() {
            let path = segment_path(dir, first_seq);
            let is_last = index + 1 == firsts.len();
            let segment = scan_segment(&path, first_seq, is_last)?;
            // A segment must follow on from the one before; anything else is not ours to trust.
            if segments.back().is_some_and(|previous: &Segment| previous.end_seq() != first_seq) {
                tracing::warn!("MQTT queue: {} does not follow on from the segment before it; deleted", path.display());
                fs::remove_file(&path)?;
                continue;
            }
            segments.push_back(segment);
        }
        let next_seq = segments.back().map_or(0, Segment::end_seq);
        let oldest = segments.front().map_or(next_seq, |segment| segment.first_seq);
        let head = read_head(dir)?.unwrap_or(oldest).clamp(oldest, next_seq);
        let segment_bytes = (max_bytes / 8).max(MIN_SEGMENT_BYTES);
        let mut queue = DiskQueue {
            dir: dir.to_path_buf(),
            max_bytes,
            segment_bytes,
            segments,
            head,
            next_seq,
            saved_head: head,
            dropped: 0,
        };
        queue.delete_delivered_segments()?;
        Ok(queue)
    }

    /// Appends `message`; returns its seq. Over the size bound, the oldest segment goes.
    pub fn push(&mut self, message: &Message) -> io::Result<u64> {
        let record = encode(message)?;
        if record.len() as u64 > self.segment_bytes {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("an MQTT message of {} bytes does not fit the queue (raise mqtt.queue_max_megabytes)", record.len()),
            ));
        }
        if self.segments.back().is_none_or(|segment| segment.bytes + record.len() as u64 > self.segment_bytes) {
            self.start_segment()?;
        }
        let segment = self.segments.back_mut().ok_or_else(|| io::Error::other("no segment to write to"))?;
        let mut file = OpenOptions::new()
            .append(true)
            .open(&segment.path)
            .map_err(|error| with_path(error, &segment.path, "cannot append to the MQTT queue"))?;
        file.write_all(&record).map_err(|error| with_path(error, &segment.path, "cannot append to the MQTT queue"))?;
        segment.offsets.push(segment.bytes);
        segment.bytes += record.len() as u64;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.enforce_bound()?;
        Ok(seq)
    }

    /// The message numbered `seq`, when it is still queued and not yet acknowledged.
    pub fn get(&self, seq: u64) -> io::Result<Option<Message>> {
        if seq < self.head || seq >= self.next_seq {
            return Ok(None);
        }
        let Some(segment) = self.segments.iter().find(|segment| (segment.first_seq..segment.end_seq()).contains(&seq)) else {
            return Ok(None);
        };
        let index = (seq - segment.first_seq) as usize;
        let start = segment.offsets[index];
        let end = segment.offsets.get(index + 1).copied().unwrap_or(segment.bytes);
        let mut file =
            File::open(&segment.path).map_err(|error| with_path(error, &segment.path, "cannot read the MQTT queue"))?;
        file.seek(SeekFrom::Start(start))?;
        let mut record = vec![0; (end - start) as usize];
        file.read_exact(&mut record).map_err(|error| with_path(error, &segment.path, "cannot read the MQTT queue"))?;
        decode(&record[RECORD_HEADER..])
            .map(Some)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{}: a damaged record", segment.path.display())))
    }

    /// The broker acknowledged every message before `seq`.
    pub fn acknowledge_before(&mut self, seq: u64) -> io::Result<()> {
        self.head = self.head.max(seq.min(self.next_seq));
        self.delete_delivered_segments()
    }

    /// The first message not yet acknowledged.
    pub fn head(&self) -> u64 {
        self.head
    }

    /// The number the next message will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Messages waiting for the broker.
    pub fn len(&self) -> u64 {
        self.next_seq - self.head
    }

    /// Whether every message was acknowledged.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages deleted unsent because the queue was full, since it was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|segment| segment.bytes).sum()
    }

    /// Saves the head when it moved (atomically: a crash leaves the old or the new one).
    pub fn save_head(&mut self) -> io::Result<()> {
        if self.head == self.saved_head {
            return Ok(());
        }
        let path = self.dir.join(HEAD_FILE);
        let temporary = self.dir.join(format!("{HEAD_FILE}.tmp"));
        fs::write(&temporary, format!("{}\n", self.head))
            .map_err(|error| with_path(error, &temporary, "cannot save the MQTT queue's head"))?;
        fs::rename(&temporary, &path).map_err(|error| with_path(error, &path, "cannot save the MQTT queue's head"))?;
        self.saved_head = self.head;
        Ok(())
    }

    fn start_segment(&mut self) -> io::Result<()> {
        let path = segment_path(&self.dir, self.next_seq);
        File::create(&path).map_err(|error| with_path(error, &path, "cannot create an MQTT queue segment"))?;
        self.segments.push_back(Segment { first_seq: self.next_seq, offsets: Vec::new(), bytes: 0, path });
        Ok(())
    }

    /// Deletes the oldest segments while over the bound (never the one written to).
    fn enforce_bound(&mut self) -> io::Result<()> {
        let mut deleted = false;
        while self.bytes() > self.max_bytes && self.segments.len() > 1 {
            deleted = true;
            let Some(oldest) = self.segments.pop_front() else { break };
            let lost = oldest.end_seq().saturating_sub(self.head.max(oldest.first_seq));
            self.dropped += lost;
            self.head = self.head.max(oldest.end_seq());
            remove(&oldest.path)?;
            if lost > 0 {
                tracing::warn!(
                    "MQTT queue full ({} MB): the {lost} oldest undelivered message(s) were deleted (cac_edge_mqtt_dropped_total)",
                    self.max_bytes >> 20
                );
            }
        }
        // A restart must not resend what was deleted: the head moved past it for good.
        if deleted {
            self.save_head()?;
        }
        Ok(())
    }

    /// Deletes segments whose every message was acknowledged (not the one written to).
    fn delete_delivered_segments(&mut self) -> io::Result<()> {
        while self.segments.len() > 1 && self.segments.front().is_some_and(|segment| segment.end_seq() <= self.head) {
            if let Some(segment) = self.segments.pop_front() {
                remove(&segment.path)?;
            }
        }
        Ok(())
    }
}

fn segment_path(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(format!("{first_seq:020}{SEGMENT_SUFFIX}"))
}

fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => {
            Err(with_path(error, path, "cannot delete an MQTT queue segment"))
        }
        _ => Ok(()),
    }
}

fn read_head(dir: &Path) -> io::Result<Option<u64>> {
    let path = dir.join(HEAD_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.trim().parse().ok().or_else(|| {
            tracing::warn!("{}: not a number; the queue is delivered from its oldest message", path.display());
            None
        })),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(with_path(error, &path, "cannot read the MQTT queue's head")),
    }
}

/// Reads a segment's records up to the first one cut short or damaged; the last segment (the
/// one a crash may have cut) is truncated there, so appending continues from a clean end.
fn scan_segment(path: &Path, first_seq: u64, is_last: bool) -> io::Result<Segment> {
    let bytes = fs::read(path).map_err(|error| with_path(error, path, "cannot read an MQTT queue segment"))?;
    let mut offsets = Vec::new();
    let mut at = 0usize;
    while let Some(length) = record_length(&bytes[at..]) {
        offsets.push(at as u64);
        at += length;
    }
    if at < bytes.len() {
        tracing::warn!(
            "MQTT queue: {} ends in a damaged or partial record after {} message(s); the rest is dropped",
            path.display(),
            offsets.len()
        );
        if is_last {
            OpenOptions::new().write(true).open(path)?.set_len(at as u64)?;
        }
    }
    Ok(Segment { first_seq, offsets, bytes: at as u64, path: path.to_path_buf() })
}

/// The length of the whole record at the start of `bytes`, when it is complete and intact.
fn record_length(bytes: &[u8]) -> Option<usize> {
    let header = bytes.get(..RECORD_HEADER)?;
    let body_length = u32::from_le_bytes(header[..4].try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(header[4..8].try_into().ok()?);
    let body = bytes.get(RECORD_HEADER..RECORD_HEADER.checked_add(body_length)?)?;
    (crc32fast::hash(body) == crc && decode(body).is_some()).then_some(RECORD_HEADER + body_length)
}

fn encode(message: &Message) -> io::Result<Vec<u8>> {
    let topic_length = u16::try_from(message.topic.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "an MQTT topic longer than 65 535 bytes"))?;
    let mut body = Vec::with_capacity(3 + message.topic.len() + message.payload.len());
    body.push(u8::from(message.retain));
    body.extend_from_slice(&topic_length.to_le_bytes());
    body.extend_from_slice(message.topic.as_bytes());
    body.extend_from_slice(&message.payload);
    let body_length =
        u32::try_from(body.len()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "an MQTT message over 4 GiB"))?;
    let mut record = Vec::with_capacity(RECORD_HEADER + body.len());
    record.extend_from_slice(&body_length.to_le_bytes());
    record.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
    record.extend_from_slice(&body);
    Ok(record)
}

fn decode(body: &[u8]) -> Option<Message> {
    let (&flags, rest) = body.split_first()?;
    let topic_length = u16::from_le_bytes(rest.get(..2)?.try_into().ok()?) as usize;
    let topic = std::str::from_utf8(rest.get(2..2 + topic_length)?).ok()?.to_string();
    let payload = rest.get(2 + topic_length..)?.to_vec();
    Some(Message { topic, payload, retain: flags & 1 == 1 })
}

fn with_path(error: io::Error, path: &Path, what: &str) -> io::Error {
    io::Error::new(error.kind(), format!("{}: {what}: {error}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(n: u64) -> Message {
        Message {
            topic: format!("site/cam{}/decision", n % 3),
            payload: format!("{{\"n\":{n}}}").into_bytes(),
            retain: n.is_multiple_of(5),
        }
    }

    /// A queue in `dir` holding messages 0, 1 and 2; the path of its segment.
    fn three_messages(dir: &Path) -> PathBuf {
        let mut queue = DiskQueue::open(dir, 1 << 20).unwrap();
        for n in 0..3 {
            queue.push(&message(n)).unwrap();
        }
        queue.segments.back().unwrap().path.clone()
    }

    fn drain(queue: &DiskQueue) -> Vec<Message> {
        (queue.head()..queue.next_seq()).map(|seq| queue.get(seq).unwrap().unwrap()).collect()
    }

    #[test]
    fn messages_come_back_in_order_and_leave_when_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert!(queue.is_empty());
        for n in 0..10 {
            assert_eq!(queue.push(&message(n)).unwrap(), n);
        }
        assert_eq!(drain(&queue), (0..10).map(message).collect::<Vec<_>>());
        queue.acknowledge_before(4).unwrap();
        assert_eq!(queue.len(), 6);
        assert_eq!(queue.get(3).unwrap(), None, "acknowledged");
        assert_eq!(queue.get(4).unwrap(), Some(message(4)));
        assert_eq!(queue.get(10).unwrap(), None, "not yet written");
    }

    #[test]
    fn a_reopened_queue_resumes_from_the_saved_head() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut queue = DiskQueue::open(dir.path(), 1 << 20).unwrap();
            for n in 0..6 {
                queue.push(&message(n)).unwrap();
            }
            queue.acknowledge_before(2).unwrap();
            queue.save_head().unwrap();
            queue.acknowledge_before(3).unwrap(); // not saved: a crash comes now
        }
        let mut queue = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!((queue.head(), queue.next_seq()), (2, 6), "message 2 is delivered again: at least once");
        assert_eq!(queue.push(&message(6)).unwrap(), 6);
        assert_eq!(drain(&queue), (2..7).map(message).collect::<Vec<_>>());
    }

    #[test]
    fn a_record_cut_short_by_a_crash_is_dropped_and_appending_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = three_messages(dir.path());
        let length = fs::metadata(&path).unwrap().len();
        OpenOptions::new().write(true).open(&path).unwrap().set_len(length - 3).unwrap();
        let mut queue = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(queue.next_seq(), 2);
        queue.push(&message(7)).unwrap();
        assert_eq!(drain(&queue), vec![message(0), message(1), message(7)]);
    }

    #[test]
    fn a_damaged_record_ends_its_segment() {
        let dir = tempfile::tempdir().unwrap();
        let path = three_messages(dir.path());
        let mut bytes = fs::read(&path).unwrap();
        let second = encode(&message(0)).unwrap().len();
        bytes[second + RECORD_HEADER + 4] ^= 0x40; // a flipped bit in the second body
        fs::write(&path, bytes).unwrap();
        let queue = DiskQueue::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(drain(&queue), vec![message(0)]);
    }

    #[test]
    fn over_the_bound_the_oldest_go_and_are_counted() {
        let dir = tempfile::tempdir().unwrap();
        let bound = 8 * MIN_SEGMENT_BYTES;
        let mut queue = DiskQueue::open(dir.path(), bound).unwrap();
        let big = |n: u64| Message { topic: "t".into(), payload: vec![n as u8; 4000], retain: false };
        let total = 1000u64;
        for n in 0..total {
            queue.push(&big(n)).unwrap();
            assert!(queue.bytes() <= bound, "{} bytes after message {n}", queue.bytes());
        }
        let kept = queue.len();
        assert!(kept > 0 && kept < total);
        assert_eq!(queue.dropped(), total - kept, "every message is delivered or counted");
        assert_eq!(queue.next_seq(), total);
        // The survivors are the newest, in order.
        let survivors = drain(&queue);
        assert_eq!(survivors.last(), Some(&big(total - 1)));
        assert_eq!(survivors.first(), Some(&big(total - kept)));
        let files = fs::read_dir(dir.path()).unwrap().count();
        assert!(files <= 10, "{files} files");
        // The saved head follows the deletions: a restart does not resurrect them.
        let reopened = DiskQueue::open(dir.path(), bound).unwrap();
        assert_eq!((reopened.head(), reopened.next_seq()), (total - kept, total));
    }

    #[test]
    fn delivered_segments_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DiskQueue::open(dir.path(), 8 * MIN_SEGMENT_BYTES).unwrap();
        let big = Message { topic: "t".into(), payload: vec![7; 4000], retain: false };
        // 25 × 4 kB: under the 128 kB bound, over several 16 kB segments.
        for _ in 0..25 {
            queue.push(&big).unwrap();
        }
        let segments = queue.segments.len();
        assert!(segments > 2);
        queue.acknowledge_before(25).unwrap();
        assert_eq!(queue.segments.len(), 1, "only the segment written to stays");
        assert_eq!(queue.dropped(), 0);
    }

    #[test]
    fn a_message_larger_than_a_segment_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut queue = DiskQueue::open(dir.path(), 8 * MIN_SEGMENT_BYTES).unwrap();
        let huge = Message { topic: "t".into(), payload: vec![0; 2 * MIN_SEGMENT_BYTES as usize], retain: false };
        let error = queue.push(&huge).unwrap_err();
        assert!(error.to_string().contains("queue_max_megabytes"), "{error}");
        assert!(queue.is_empty());
    }
}

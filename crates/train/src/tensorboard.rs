//! TensorBoard event files written directly: TFRecord framing (length, masked CRC-32C of the
//! length, payload, masked CRC-32C of the payload) around hand-encoded `Event` protocol buffers
//! carrying scalar summaries. Only the few fields TensorBoard needs for scalars are written.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Appends scalar events to `events.out.tfevents.<time>.mdeq` in a directory.
pub struct EventWriter {
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
}

fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = crc32c::crc32c(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn length_delimited(field: u32, payload: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(payload.len() as u64, out);
    out.extend_from_slice(payload);
}

/// An `Event` with wall time, step and either a file version or one scalar summary value.
fn encode_event(wall_time: f64, step: i64, body: EventBody) -> Vec<u8> {
    let mut e = Vec::new();
    e.push(0x09); // field 1 wall_time, fixed64
    e.extend_from_slice(&wall_time.to_le_bytes());
    e.push(0x10); // field 2 step, varint
    varint(step as u64, &mut e);
    match body {
        EventBody::FileVersion(v) => length_delimited(3, v.as_bytes(), &mut e),
        EventBody::Scalar(tag, value) => {
            let mut v = Vec::new();
            length_delimited(1, tag.as_bytes(), &mut v); // Summary.Value.tag
            v.push(0x15); // Summary.Value.simple_value, fixed32
            v.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::new();
            length_delimited(1, &v, &mut summary); // Summary.value
            length_delimited(5, &summary, &mut e); // Event.summary
        }
    }
    e
}

enum EventBody<'a> {
    FileVersion(&'a str),
    Scalar(&'a str, f32),
}

fn now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl EventWriter {
    /// Creates a new event file in `dir` and writes its version record.
    pub fn create(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join(format!("events.out.tfevents.{}.mdeq", now() as u64));
        let file = std::fs::File::create(&path)?;
        let mut w = Self {
            file: std::io::BufWriter::new(file),
            path,
        };
        w.record(&encode_event(
            now(),
            0,
            EventBody::FileVersion("brain.Event:2"),
        ))?;
        Ok(w)
    }

    /// The file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn record(&mut self, data: &[u8]) -> std::io::Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        self.file.write_all(&len)?;
        self.file.write_all(&masked_crc(&len).to_le_bytes())?;
        self.file.write_all(data)?;
        self.file.write_all(&masked_crc(data).to_le_bytes())
    }

    /// Logs `value` under `tag` at `step`.
    pub fn scalar(&mut self, tag: &str, step: usize, value: f64) -> std::io::Result<()> {
        let event = encode_event(now(), step as i64, EventBody::Scalar(tag, value as f32));
        self.record(&event)
    }

    /// Pushes buffered events to disk.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

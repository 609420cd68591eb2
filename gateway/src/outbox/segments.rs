//! The segment log: sealed envelopes in append-only files under `<state_dir>/segments/`, each
//! frame written once and fsynced, each file deleted whole once no batch in it is queued.
//!
//! Why not the envelope in SQLite: a commit there writes every page it touches (the row, its
//! overflow pages, `meta`, `source_seq`, the audit row, the free list) to the WAL and again at
//! checkpoint, six times the bytes of a 1 KiB batch. A frame costs its own size plus 44 bytes.
//! SQLite keeps the index (`batches.seg`, `batches.off`), written for many frames at once; a
//! frame the index does not hold yet when the process dies is indexed from the file at the
//! next start, so a frame on disk is a committed batch.
//!
//! A file is named after the sequence number of its first frame (`<seq, 20 digits>.seg`);
//! frames follow in sequence order. Frame: magic `SYF1`, body length (u32 BE), CRC-32C of the
//! body (u32 BE), then the body: seq (u64 BE), created_ms (i64 BE), written_ms (i64 BE),
//! records (u32 BE), meta length (u32 BE), meta (JSON: `{"s": {source: last record seq},
//! "t": [fields kept, de-identified, dropped, without rule], "r": per-rule counts as in the
//! audit trail}`, counts only, never a field value), the envelope. A frame may be followed by
//! zeros up to the next 4 KiB boundary (see `Writer::append`), as few as one: a reader at an
//! unaligned offset takes a zero byte for padding, since every frame starts with the magic.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub const DIR: &str = "segments";
const MAGIC: &[u8; 4] = b"SYF1";
/// The file-system block frames may be padded to (zeros up to the next multiple).
const BLOCK: u64 = 4096;
const HEADER: usize = 12;
const FIXED: usize = 32;
/// No frame is larger (a batch is at most a few MiB): a damaged length is caught early.
const MAX_BODY: usize = 1 << 30;

const CRC: crc::Crc<u32, crc::Table<16>> = crc::Crc::<u32, crc::Table<16>>::new(&crc::CRC_32_ISCSI);

/// A frame's place and what the index needs from it (not the envelope).
#[derive(Debug, Clone)]
pub struct Frame {
    pub seq: u64,
    pub created_ms: i64,
    pub written_ms: i64,
    pub records: u32,
    pub meta: String,
    /// The first sequence number of the file holding it.
    pub seg: u64,
    pub off: u64,
    pub envelope_len: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: frame at byte {off} is damaged ({what})")]
    Damaged {
        path: String,
        off: u64,
        what: String,
        /// Where the next frame starts when the damage is inside an intact frame.
        next: Option<u64>,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SegmentError + '_ {
    move |source| SegmentError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub fn file_name(seg: u64) -> String {
    format!("{seg:020}.seg")
}

/// The segment files in `dir`, by first sequence number.
pub fn list(dir: &Path) -> Result<Vec<u64>, SegmentError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir)(e)),
    };
    for entry in rd {
        let entry = entry.map_err(io_err(dir))?;
        let name = entry.file_name();
        if let Some(seg) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".seg"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push(seg);
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// Appends frames; one open file at a time, a new one when it passes `seg_max` bytes.
pub struct Writer {
    dir: PathBuf,
    seg_max: u64,
    cur: Option<(u64, File, u64)>,
}

impl Writer {
    pub fn new(dir: PathBuf, seg_max: u64) -> Self {
        Self {
            dir,
            seg_max,
            cur: None,
        }
    }

    /// The file being appended to, if any.
    pub fn current(&self) -> Option<u64> {
        self.cur.as_ref().map(|c| c.0)
    }

    /// Writes one frame and syncs it to the device before returning.
    pub fn append(
        &mut self,
        seq: u64,
        created_ms: i64,
        records: u32,
        meta: String,
        envelope: &[u8],
    ) -> Result<Frame, SegmentError> {
        let written_ms = crate::timefmt::now_ms();
        let body_len = FIXED + meta.len() + envelope.len();
        let mut buf = Vec::with_capacity(HEADER + body_len);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(body_len as u32).to_be_bytes());
        buf.extend_from_slice(&[0; 4]);
        buf.extend_from_slice(&seq.to_be_bytes());
        buf.extend_from_slice(&created_ms.to_be_bytes());
        buf.extend_from_slice(&written_ms.to_be_bytes());
        buf.extend_from_slice(&records.to_be_bytes());
        buf.extend_from_slice(&(meta.len() as u32).to_be_bytes());
        buf.extend_from_slice(meta.as_bytes());
        buf.extend_from_slice(envelope);
        let crc = CRC.checksum(&buf[HEADER..]);
        buf[8..12].copy_from_slice(&crc.to_be_bytes());

        if self
            .cur
            .as_ref()
            .is_some_and(|(_, _, len)| *len > 0 && len + buf.len() as u64 > self.seg_max)
        {
            self.cur = None;
        }
        if self.cur.is_none() {
            std::fs::create_dir_all(&self.dir).map_err(io_err(&self.dir))?;
            let path = self.dir.join(file_name(seq));
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(io_err(&path))?;
            let len = file.metadata().map_err(io_err(&path))?.len();
            // The new name must survive a power loss as well as the frame.
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io_err(&self.dir))?;
            self.cur = Some((seq, file, len));
        }
        let Some((seg, file, len)) = self.cur.as_mut() else {
            unreachable!("opened above")
        };
        let off = *len;
        // A frame that ends part-way into a file-system block leaves that block to be written
        // to the device again with the next frame. For a frame of half a block or more,
        // padding to the block's end when that takes at most a quarter of the frame saves the
        // rewrite for at most 25% more bytes passed to write(2) (docs/benchmarks.md, section
        // 5: 6 KiB batches 1.70 to 1.29 times their size at the block layer). A smaller frame
        // shares its block with others whatever we do, and padding it would cost more bytes
        // than it saves.
        let pad = (BLOCK - (off + buf.len() as u64) % BLOCK) % BLOCK;
        if buf.len() as u64 >= BLOCK / 2 && pad > 0 && pad * 4 <= buf.len() as u64 {
            buf.resize(buf.len() + pad as usize, 0);
        }
        let path = self.dir.join(file_name(*seg));
        let written = file.write_all(&buf).and_then(|()| file.sync_data());
        if let Err(e) = written {
            // A partial frame must not stay in front of the next one: cut it off, or give up
            // on this file (the next start cuts it when it reads the file).
            if file.set_len(off).and_then(|()| file.sync_data()).is_err() {
                self.cur = None;
            }
            return Err(io_err(&path)(e));
        }
        *len += buf.len() as u64;
        Ok(Frame {
            seq,
            created_ms,
            written_ms,
            records,
            meta,
            seg: *seg,
            off,
            envelope_len: envelope.len() as u64,
        })
    }
}

/// What is at an offset of a segment file.
enum Step {
    /// A frame and its envelope.
    Frame(Frame, Vec<u8>),
    /// Zeros up to the next block, where the next frame starts.
    Pad(u64),
    End,
}

/// Reads what is at `off`.
fn read_frame(file: &mut File, path: &Path, off: u64) -> Result<Step, SegmentError> {
    let damaged = |what: &str| SegmentError::Damaged {
        path: path.display().to_string(),
        off,
        what: what.to_string(),
        next: None,
    };
    let mut head = [0u8; HEADER];
    let mut got = 0;
    while got < HEADER {
        let n = file.read(&mut head[got..]).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        got += n;
    }
    if got == 0 {
        return Ok(Step::End);
    }
    // No frame starts with a zero (the magic), so a zero here is padding; padding shorter than
    // a header ends inside these bytes, where the next frame's magic follows it.
    if off % BLOCK != 0 && head[0] == 0 {
        let next = off.next_multiple_of(BLOCK);
        let pad = (next - off).min(got as u64) as usize;
        if head[..pad].iter().all(|&b| b == 0) {
            return Ok(Step::Pad(next));
        }
        return Err(damaged("no frame starts here"));
    }
    if got < HEADER {
        return Err(damaged("cut short in its header"));
    }
    if &head[..4] != MAGIC {
        return Err(damaged("no frame starts here"));
    }
    let body_len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if !(FIXED..=MAX_BODY).contains(&body_len) {
        return Err(damaged("impossible length"));
    }
    let mut body = vec![0u8; body_len];
    file.read_exact(&mut body)
        .map_err(|_| damaged("cut short in its body"))?;
    let crc = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if CRC.checksum(&body) != crc {
        // The frame's bounds are sound: the frames after it can still be read.
        return Err(SegmentError::Damaged {
            path: path.display().to_string(),
            off,
            what: "checksum mismatch".into(),
            next: Some(off + (HEADER + body_len) as u64),
        });
    }
    let be8 = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[at..at + 8]);
        b
    };
    let be4 = |at: usize| {
        let mut b = [0u8; 4];
        b.copy_from_slice(&body[at..at + 4]);
        b
    };
    let meta_len = u32::from_be_bytes(be4(28)) as usize;
    if FIXED + meta_len > body_len {
        return Err(damaged("impossible meta length"));
    }
    let meta = String::from_utf8(body[FIXED..FIXED + meta_len].to_vec())
        .map_err(|_| damaged("meta is not UTF-8"))?;
    let frame = Frame {
        seq: u64::from_be_bytes(be8(0)),
        created_ms: i64::from_be_bytes(be8(8)),
        written_ms: i64::from_be_bytes(be8(16)),
        records: u32::from_be_bytes(be4(24)),
        meta,
        seg: 0,
        off,
        envelope_len: (body_len - FIXED - meta_len) as u64,
    };
    body.drain(..FIXED + meta_len);
    Ok(Step::Frame(frame, body))
}

/// The envelope of the frame at `off` in segment `seg`, checked against its checksum and seq.
pub fn read_envelope(dir: &Path, seg: u64, off: u64, seq: u64) -> Result<Vec<u8>, SegmentError> {
    let path = dir.join(file_name(seg));
    let mut file = File::open(&path).map_err(io_err(&path))?;
    file.seek(SeekFrom::Start(off)).map_err(io_err(&path))?;
    match read_frame(&mut file, &path, off)? {
        Step::Frame(f, envelope) if f.seq == seq => Ok(envelope),
        Step::Frame(..) => Err(SegmentError::Damaged {
            path: path.display().to_string(),
            off,
            what: format!("holds another batch than {seq}"),
            next: None,
        }),
        Step::Pad(_) | Step::End => Err(SegmentError::Damaged {
            path: path.display().to_string(),
            off,
            what: "no frame here".into(),
            next: None,
        }),
    }
}

/// A damaged frame, or where a file stopped making sense (then cut there).
#[derive(Debug)]
pub struct Damage {
    pub seg: u64,
    pub off: u64,
    pub cut_bytes: u64,
    pub error: String,
}

/// The frames with a sequence above `after`, oldest first. A frame whose bytes are damaged
/// within sound bounds is passed over; a file that stops making sense (a frame cut short by a
/// power loss, a damaged header) is read up to there, and with `repair` cut there, so that
/// later frames append after good ones. Each such place is returned (`cut_bytes` 0 when
/// passed over).
pub fn scan(
    dir: &Path,
    after: u64,
    repair: bool,
) -> Result<(Vec<Frame>, Vec<Damage>), SegmentError> {
    let mut frames = Vec::new();
    let mut damage = Vec::new();
    let segs = list(dir)?;
    for (i, &seg) in segs.iter().enumerate() {
        // Every frame of this file is below the next file's first sequence number.
        if segs
            .get(i + 1)
            .is_some_and(|&next| next <= after.saturating_add(1))
        {
            continue;
        }
        let path = dir.join(file_name(seg));
        let mut file = OpenOptions::new()
            .read(true)
            .write(repair)
            .open(&path)
            .map_err(io_err(&path))?;
        let size = file.metadata().map_err(io_err(&path))?.len();
        let mut off = 0u64;
        loop {
            match read_frame(&mut file, &path, off) {
                Ok(Step::End) => break,
                Ok(Step::Pad(next)) if next >= size => break,
                Ok(Step::Pad(next)) => {
                    file.seek(SeekFrom::Start(next)).map_err(io_err(&path))?;
                    off = next;
                }
                Ok(Step::Frame(mut f, envelope)) => {
                    let next = off + (HEADER + FIXED + f.meta.len()) as u64 + envelope.len() as u64;
                    if f.seq > after {
                        f.seg = seg;
                        frames.push(f);
                    }
                    off = next;
                }
                Err(SegmentError::Damaged {
                    what,
                    next: Some(next),
                    ..
                }) if next == size || starts_frame(&mut file, next) => {
                    damage.push(Damage {
                        seg,
                        off,
                        cut_bytes: 0,
                        error: what,
                    });
                    file.seek(SeekFrom::Start(next)).map_err(io_err(&path))?;
                    off = next;
                }
                Err(SegmentError::Damaged { what, .. }) => {
                    if repair {
                        file.set_len(off)
                            .and_then(|()| file.sync_all())
                            .map_err(io_err(&path))?;
                    }
                    damage.push(Damage {
                        seg,
                        off,
                        cut_bytes: size - off,
                        error: what,
                    });
                    break;
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok((frames, damage))
}

/// A frame, or a frame's padding, starts at `at`.
fn starts_frame(file: &mut File, at: u64) -> bool {
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(at))
        .and_then(|_| file.read_exact(&mut magic))
        .is_ok()
        && (&magic == MAGIC || (at % BLOCK != 0 && magic == [0; 4]))
}

/// Deletes the files none of whose frames is still queued: `live` is the lowest queued
/// sequence held in a segment (`None`: none), `current` the file being appended to (kept).
pub fn remove_unused(
    dir: &Path,
    live: Option<u64>,
    current: Option<u64>,
) -> Result<u64, SegmentError> {
    let segs = list(dir)?;
    let mut removed = 0;
    for (i, &seg) in segs.iter().enumerate() {
        if Some(seg) == current {
            continue;
        }
        // Every frame in this file is below the next file's first sequence number.
        let unused = match (live, segs.get(i + 1)) {
            (None, _) => true,
            (Some(live), Some(&next)) => next <= live,
            (Some(live), None) => current.is_some_and(|c| c <= live),
        };
        if unused {
            let path = dir.join(file_name(seg));
            std::fs::remove_file(&path).map_err(io_err(&path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Overwrites every segment file with zeros, syncs and deletes it (`shuyuan purge`).
pub fn wipe(dir: &Path) -> Result<u64, SegmentError> {
    let mut n = 0;
    for seg in list(dir)? {
        let path = dir.join(file_name(seg));
        let len = std::fs::metadata(&path).map_err(io_err(&path))?.len();
        let mut f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let zeros = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            let k = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..k]).map_err(io_err(&path))?;
            left -= k as u64;
        }
        f.sync_all().map_err(io_err(&path))?;
        std::fs::remove_file(&path).map_err(io_err(&path))?;
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_of_a_few_kib_are_padded_to_the_block_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let segs = dir.path().join(DIR);
        let mut w = Writer::new(segs.clone(), 1 << 20);
        // 1000 bytes: never padded (less than half a block); 6000: padded when it takes at
        // most a quarter of the frame.
        let sizes = [1000usize, 6000, 6000, 1000, 6000];
        let frames: Vec<Frame> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                w.append(i as u64 + 1, 0, 1, "{}".into(), &vec![i as u8; n])
                    .unwrap()
            })
            .collect();
        // Each frame starts where the one before ended, or at the next block when the padding
        // is at most a quarter of that frame.
        for (i, pair) in frames.windows(2).enumerate() {
            let len = (HEADER + FIXED + 2 + sizes[i]) as u64;
            let end = pair[0].off + len;
            let pad = end.next_multiple_of(BLOCK) - end;
            let expect = if len >= BLOCK / 2 && pad * 4 <= len {
                end + pad
            } else {
                end
            };
            assert_eq!(pair[1].off, expect, "frame {}", i + 2);
        }
        assert_eq!(frames[1].off, 1046, "1000 bytes: not padded");
        assert_eq!(frames[2].off, 8192, "6000 bytes: padded");
        let (all, damage) = scan(&segs, 0, false).unwrap();
        assert!(damage.is_empty(), "{damage:?}");
        assert_eq!(all.len(), 5);
        for (f, n) in all.iter().zip(sizes) {
            assert_eq!(read_envelope(&segs, f.seg, f.off, f.seq).unwrap().len(), n);
        }
    }

    #[test]
    fn padding_shorter_than_a_frame_header_is_passed_over() {
        // A frame padded by fewer bytes than a frame header: reading a header at the padding
        // takes in the next frame's magic too. Read as damage, this cut a file at start-up
        // and lost the committed frames after it (found by the outage test, 1-in-6 runs).
        for pad in 1..=(HEADER as u64 + 4) {
            let dir = tempfile::tempdir().unwrap();
            let segs = dir.path().join(DIR);
            let mut w = Writer::new(segs.clone(), 1 << 20);
            let n = (BLOCK - pad) as usize - HEADER - FIXED - 2;
            w.append(1, 0, 1, "{}".into(), &vec![1; n]).unwrap();
            let second = w.append(2, 0, 1, "{}".into(), &[2; 100]).unwrap();
            assert_eq!(second.off, BLOCK, "padded by {pad}");
            let path = segs.join(file_name(1));
            let len = std::fs::metadata(&path).unwrap().len();
            let (all, damage) = scan(&segs, 0, true).unwrap();
            assert!(damage.is_empty(), "padded by {pad}: {damage:?}");
            assert_eq!(all.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![1, 2]);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), len, "nothing cut");
            let (after_first, _) = scan(&segs, 1, false).unwrap();
            assert_eq!(after_first.len(), 1, "padded by {pad}");
        }
    }

    #[test]
    fn frames_read_back_and_a_torn_tail_is_cut_at_the_last_good_frame() {
        let dir = tempfile::tempdir().unwrap();
        let segs = dir.path().join(DIR);
        let mut w = Writer::new(segs.clone(), 300);
        let mut frames = Vec::new();
        for seq in 1..=5u64 {
            let env = vec![seq as u8; 100];
            frames.push(w.append(seq, 7, 3, "{}".into(), &env).unwrap());
        }
        // 100-byte envelopes in files of at most 300 bytes: two frames a file.
        assert_eq!(list(&segs).unwrap(), vec![1, 3, 5]);
        for f in &frames {
            let env = read_envelope(&segs, f.seg, f.off, f.seq).unwrap();
            assert_eq!(env, vec![f.seq as u8; 100]);
        }
        assert!(matches!(
            read_envelope(&segs, frames[1].seg, frames[1].off, 9),
            Err(SegmentError::Damaged { .. })
        ));
        let (all, damage) = scan(&segs, 2, false).unwrap();
        assert_eq!(all.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert!(damage.is_empty());

        // A power loss in the middle of frame 4: its file ends part-way through it.
        let path = segs.join(file_name(3));
        let len = std::fs::metadata(&path).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 30)
            .unwrap();
        // And a flipped byte in frame 5.
        let p5 = segs.join(file_name(5));
        let mut bytes = std::fs::read(&p5).unwrap();
        bytes[60] ^= 1;
        std::fs::write(&p5, bytes).unwrap();
        let (all, damage) = scan(&segs, 0, true).unwrap();
        assert_eq!(all.iter().map(|f| f.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(damage.len(), 2);
        assert_eq!(damage[0].error, "cut short in its body");
        assert!(damage[0].cut_bytes > 0);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), frames[3].off);
        // A damaged body within sound bounds is passed over, the file left as it is.
        assert_eq!(
            (damage[1].error.as_str(), damage[1].cut_bytes),
            ("checksum mismatch", 0)
        );
        assert!(std::fs::metadata(&p5).unwrap().len() > 100);

        // Only files wholly below the lowest queued batch go, never the current one.
        let mut w = Writer::new(segs.clone(), 300);
        w.append(6, 7, 3, "{}".into(), &[6; 100]).unwrap();
        assert_eq!(remove_unused(&segs, Some(3), w.current()).unwrap(), 1);
        assert_eq!(list(&segs).unwrap(), vec![3, 5, 6]);
        assert_eq!(remove_unused(&segs, Some(6), w.current()).unwrap(), 2);
        assert_eq!(remove_unused(&segs, None, w.current()).unwrap(), 0);
        assert_eq!(list(&segs).unwrap(), vec![6]);
    }
}

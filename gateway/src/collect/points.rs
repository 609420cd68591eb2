//! The register plan of a Modbus source: which reads to issue (contiguous points coalesced
//! into the fewest requests the protocol allows) and how to decode each point from the
//! words or bits that come back. Pure code, shared by every Modbus transport.

use std::sync::Arc;

use super::Value;
use crate::config::{DataType, KeyPath, PointConfig, RegisterKind, WordOrder};

/// Most registers one read may ask for (Modbus application protocol, function 03/04).
pub const MAX_REGISTERS: u16 = 125;
/// Most bits one read may ask for (functions 01/02).
pub const MAX_BITS: u16 = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read {
    pub kind: RegisterKind,
    pub start: u16,
    pub count: u16,
}

#[derive(Debug, Clone)]
struct PointPlan {
    name: Arc<str>,
    read: usize,
    offset: usize,
    data_type: DataType,
    order: WordOrder,
    scale: Option<f64>,
    add: Option<f64>,
}

/// What a read returned.
#[derive(Debug, Clone, PartialEq)]
pub enum ReadData {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

#[derive(Debug, Clone)]
pub struct ReadPlan {
    reads: Vec<Read>,
    points: Vec<PointPlan>,
}

fn words(t: DataType) -> u16 {
    match t {
        DataType::Bool | DataType::U16 | DataType::I16 => 1,
        DataType::U32 | DataType::I32 | DataType::F32 => 2,
        DataType::U64 | DataType::I64 | DataType::F64 => 4,
    }
}

fn is_bits(k: RegisterKind) -> bool {
    matches!(k, RegisterKind::Coil | RegisterKind::Discrete)
}

impl ReadPlan {
    /// Checks the points and plans the reads. Errors carry a path relative to the source.
    pub fn build(points: &[PointConfig]) -> Result<Self, Vec<(KeyPath, String)>> {
        let mut errs = Vec::new();
        let at = |i: usize, k: &str| KeyPath::root().key("points").idx(i).key(k);
        for (i, p) in points.iter().enumerate() {
            let bits = is_bits(p.register);
            if bits != (p.data_type == DataType::Bool) {
                let msg = if bits {
                    format!(
                        "point {:?}: a {:?} register holds one bit: use type = \"bool\"",
                        p.name, p.register
                    )
                } else {
                    format!("point {:?}: type bool needs register = \"coil\" or \"discrete\"; for a flag in a holding or input register read it as u16", p.name)
                };
                errs.push((at(i, "type"), msg));
            }
            if bits && (p.order.is_some() || p.scale.is_some() || p.offset.is_some()) {
                errs.push((
                    at(i, "order"),
                    format!(
                        "point {:?}: order, scale and offset do not apply to bits",
                        p.name
                    ),
                ));
            }
            if u32::from(p.address) + u32::from(words(p.data_type)) > 65_536 {
                errs.push((
                    at(i, "address"),
                    format!(
                        "point {:?}: {} registers from address {} run past 65535",
                        p.name,
                        words(p.data_type),
                        p.address
                    ),
                ));
            }
            for (k, v) in [("scale", p.scale), ("offset", p.offset)] {
                if v.is_some_and(|v| !v.is_finite()) {
                    errs.push((
                        at(i, k),
                        format!("point {:?}: {k} must be a finite number", p.name),
                    ));
                }
            }
            if p.scale == Some(0.0) {
                errs.push((
                    at(i, "scale"),
                    format!("point {:?}: scale 0 would always read 0", p.name),
                ));
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }

        let mut order: Vec<usize> = (0..points.len()).collect();
        order.sort_by_key(|&i| (points[i].register, points[i].address));
        let mut reads: Vec<Read> = Vec::new();
        let mut placed = vec![(0usize, 0usize); points.len()];
        for i in order {
            let p = &points[i];
            let width = words(p.data_type);
            let limit = if is_bits(p.register) {
                MAX_BITS
            } else {
                MAX_REGISTERS
            };
            let end = u32::from(p.address) + u32::from(width);
            let merge = reads.last().is_some_and(|r| {
                let r_end = u32::from(r.start) + u32::from(r.count);
                r.kind == p.register
                    && u32::from(p.address) <= r_end
                    && end.max(r_end) - u32::from(r.start) <= u32::from(limit)
            });
            if merge {
                if let Some(r) = reads.last_mut() {
                    let r_end = (u32::from(r.start) + u32::from(r.count)).max(end);
                    r.count = (r_end - u32::from(r.start)) as u16;
                }
            } else {
                reads.push(Read {
                    kind: p.register,
                    start: p.address,
                    count: width,
                });
            }
            let ri = reads.len() - 1;
            placed[i] = (ri, usize::from(p.address - reads[ri].start));
        }
        let points = points
            .iter()
            .zip(placed)
            .map(|(p, (read, offset))| PointPlan {
                name: Arc::from(p.name.as_str()),
                read,
                offset,
                data_type: p.data_type,
                order: p.order.unwrap_or_default(),
                scale: p.scale,
                add: p.offset,
            })
            .collect();
        Ok(Self { reads, points })
    }

    pub fn point_count(&self) -> usize {
        self.points.len()
    }

    /// The points' names, in plan order (the order [`Self::decode`] writes values in).
    pub fn point_names(&self) -> impl Iterator<Item = &Arc<str>> {
        self.points.iter().map(|p| &p.name)
    }

    pub fn reads(&self) -> &[Read] {
        &self.reads
    }

    /// Decodes every point from the reads' results (in plan order). A reply shorter than
    /// asked is an error for the whole poll.
    pub fn decode(&self, data: &[ReadData], out: &mut Vec<Value>) -> Result<(), String> {
        if data.len() != self.reads.len() {
            return Err(format!(
                "expected {} replies, got {}",
                self.reads.len(),
                data.len()
            ));
        }
        for (r, d) in self.reads.iter().zip(data) {
            let got = match d {
                ReadData::Words(w) => w.len(),
                ReadData::Bits(b) => b.len(),
            };
            if got < usize::from(r.count) {
                return Err(format!(
                    "short reply to {:?} {}+{}: {got} values",
                    r.kind, r.start, r.count
                ));
            }
        }
        for p in &self.points {
            let value = match &data[p.read] {
                ReadData::Bits(b) => Value::Bool(b[p.offset]),
                ReadData::Words(w) => {
                    let n = usize::from(words(p.data_type));
                    decode_words(
                        &w[p.offset..p.offset + n],
                        p.data_type,
                        p.order,
                        p.scale,
                        p.add,
                    )
                }
            };
            out.push(value);
        }
        Ok(())
    }
}

/// Puts the wire words back into big-endian `A B C D ...` order, then reads the type.
pub fn decode_words(
    regs: &[u16],
    t: DataType,
    order: WordOrder,
    scale: Option<f64>,
    add: Option<f64>,
) -> Value {
    let mut bytes = [0u8; 8];
    let n = regs.len().min(4);
    let swap_words = matches!(order, WordOrder::CDAB | WordOrder::DCBA);
    let swap_bytes = matches!(order, WordOrder::BADC | WordOrder::DCBA);
    for i in 0..n {
        let w = if swap_words { regs[n - 1 - i] } else { regs[i] };
        let [hi, lo] = w.to_be_bytes();
        let (a, b) = if swap_bytes { (lo, hi) } else { (hi, lo) };
        bytes[2 * i] = a;
        bytes[2 * i + 1] = b;
    }
    let b2 = [bytes[0], bytes[1]];
    let b4 = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let raw = match t {
        DataType::Bool => Value::Bool(u16::from_be_bytes(b2) != 0),
        DataType::U16 => Value::UInt(u16::from_be_bytes(b2).into()),
        DataType::I16 => Value::Int(i16::from_be_bytes(b2).into()),
        DataType::U32 => Value::UInt(u32::from_be_bytes(b4).into()),
        DataType::I32 => Value::Int(i32::from_be_bytes(b4).into()),
        DataType::U64 => Value::UInt(u64::from_be_bytes(bytes)),
        DataType::I64 => Value::Int(i64::from_be_bytes(bytes)),
        // Widen through the shortest decimal form, so 118.7 stays 118.7 and does not become
        // 118.69999694824219 in the platform's JSON.
        DataType::F32 => Value::Float(widen_f32(f32::from_be_bytes(b4))),
        DataType::F64 => Value::Float(f64::from_be_bytes(bytes)),
    };
    if scale.is_none() && add.is_none() {
        return raw;
    }
    let x = match raw {
        Value::UInt(u) => u as f64,
        Value::Int(i) => i as f64,
        Value::Float(f) => f,
        other => return other,
    };
    let y = x * scale.unwrap_or(1.0) + add.unwrap_or(0.0);
    // An integer register scaled by 0.1 holds one decimal: 3274 * 0.1 is 327.4, not
    // 327.40000000000003. Round to the decimals the scale and offset carry.
    if matches!(raw, Value::Float(_)) {
        return Value::Float(y);
    }
    let places = decimals(scale.unwrap_or(1.0)) + decimals(add.unwrap_or(0.0));
    let p = 10f64.powi(places.min(15) as i32);
    Value::Float((y * p).round() / p)
}

fn widen_f32(v: f32) -> f64 {
    if !v.is_finite() {
        return f64::from(v);
    }
    v.to_string().parse().unwrap_or(f64::from(v))
}

/// Decimal places in the shortest representation of `x` (0.25 has 2, 10 has 0).
fn decimals(x: f64) -> u32 {
    let s = x.abs().to_string();
    match s.split_once('.') {
        Some((_, frac)) if !s.contains('e') => frac.len() as u32,
        _ => 0,
    }
}

/// Encodes a value the way a device with `order` would put it on the wire (the simulator's
/// and the tests' side of [`decode_words`]).
pub fn encode_words(be_bytes: &[u8], order: WordOrder) -> Vec<u16> {
    let n = be_bytes.len() / 2;
    let swap_words = matches!(order, WordOrder::CDAB | WordOrder::DCBA);
    let swap_bytes = matches!(order, WordOrder::BADC | WordOrder::DCBA);
    (0..n)
        .map(|i| {
            let src = if swap_words { n - 1 - i } else { i };
            let (hi, lo) = (be_bytes[2 * src], be_bytes[2 * src + 1]);
            if swap_bytes {
                u16::from_be_bytes([lo, hi])
            } else {
                u16::from_be_bytes([hi, lo])
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pt(name: &str, register: RegisterKind, address: u16, t: DataType) -> PointConfig {
        PointConfig {
            name: name.into(),
            register,
            address,
            data_type: t,
            order: None,
            scale: None,
            offset: None,
        }
    }

    #[test]
    fn word_orders_round_trip_for_every_type_width() {
        let f = 1234.5678f32.to_be_bytes();
        for order in [
            WordOrder::ABCD,
            WordOrder::CDAB,
            WordOrder::BADC,
            WordOrder::DCBA,
        ] {
            let regs = encode_words(&f, order);
            assert_eq!(
                decode_words(&regs, DataType::F32, order, None, None),
                Value::Float(1234.5677)
            );
            let regs = encode_words(&(-123_456_789_012i64).to_be_bytes(), order);
            assert_eq!(
                decode_words(&regs, DataType::I64, order, None, None),
                Value::Int(-123_456_789_012)
            );
        }
    }

    #[test]
    fn cdab_is_word_swapped_as_devices_send_it() {
        // 0x41200000 is 10.0f32: a CDAB device sends the low word first.
        let v = decode_words(
            &[0x0000, 0x4120],
            DataType::F32,
            WordOrder::CDAB,
            None,
            None,
        );
        assert_eq!(v, Value::Float(10.0));
        let v = decode_words(
            &[0x2041, 0x0000],
            DataType::F32,
            WordOrder::BADC,
            None,
            None,
        );
        assert_eq!(v, Value::Float(10.0));
    }

    #[test]
    fn scale_and_offset_give_a_float() {
        let v = decode_words(
            &[1234],
            DataType::U16,
            WordOrder::ABCD,
            Some(0.1),
            Some(-3.0),
        );
        assert_eq!(v, Value::Float(120.4));
        let v = decode_words(&[3274], DataType::U16, WordOrder::ABCD, Some(0.1), None);
        assert_eq!(v, Value::Float(327.4));
        let v = decode_words(&[3], DataType::U16, WordOrder::ABCD, Some(0.25), None);
        assert_eq!(v, Value::Float(0.75));
        let v = decode_words(
            &encode_words(&118.7f32.to_be_bytes(), WordOrder::ABCD),
            DataType::F32,
            WordOrder::ABCD,
            None,
            None,
        );
        assert_eq!(v, Value::Float(118.7));
    }

    #[test]
    fn contiguous_points_coalesce_and_limits_split_reads() {
        let mut pts = vec![
            pt("a", RegisterKind::Holding, 100, DataType::F32),
            pt("b", RegisterKind::Holding, 102, DataType::U16),
            pt("c", RegisterKind::Holding, 110, DataType::U16),
            pt("d", RegisterKind::Coil, 5, DataType::Bool),
            pt("e", RegisterKind::Coil, 6, DataType::Bool),
            pt("f", RegisterKind::Input, 0, DataType::U16),
        ];
        let plan = ReadPlan::build(&pts).unwrap();
        assert_eq!(
            plan.reads(),
            &[
                Read {
                    kind: RegisterKind::Holding,
                    start: 100,
                    count: 3
                },
                Read {
                    kind: RegisterKind::Holding,
                    start: 110,
                    count: 1
                },
                Read {
                    kind: RegisterKind::Input,
                    start: 0,
                    count: 1
                },
                Read {
                    kind: RegisterKind::Coil,
                    start: 5,
                    count: 2
                },
            ]
        );
        pts.clear();
        for i in 0..130u16 {
            pts.push(pt(
                &format!("r{i}"),
                RegisterKind::Holding,
                i,
                DataType::U16,
            ));
        }
        let plan = ReadPlan::build(&pts).unwrap();
        assert_eq!(plan.reads().len(), 2);
        assert_eq!(plan.reads()[0].count, 125);
        assert_eq!(
            plan.reads()[1],
            Read {
                kind: RegisterKind::Holding,
                start: 125,
                count: 5
            }
        );
    }

    #[test]
    fn bad_points_are_refused_with_their_paths() {
        let pts = vec![
            pt("x", RegisterKind::Coil, 0, DataType::U16),
            pt("y", RegisterKind::Holding, 65535, DataType::U32),
        ];
        let errs = ReadPlan::build(&pts).unwrap_err();
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].0.to_string(), "points[0].type");
        assert!(errs[1].1.contains("past 65535"));
    }

    #[test]
    fn short_reply_is_an_error_not_a_panic() {
        let plan = ReadPlan::build(&[pt("a", RegisterKind::Holding, 0, DataType::U32)]).unwrap();
        let mut out = Vec::new();
        let err = plan
            .decode(&[ReadData::Words(vec![1])], &mut out)
            .unwrap_err();
        assert!(err.contains("short reply"));
    }
}

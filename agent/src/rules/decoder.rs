//! Native payload decoders for the safety path: a declarative byte layout, and Cayenne LPP.
//! Both read any bytes without panicking and allocate at most one entry per decoded value
//! (bounded by the payload's length); `tests` and the fuzz-style test below hold them to it.

use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
}

impl FieldType {
    pub fn size(self) -> usize {
        match self {
            FieldType::U8 | FieldType::I8 => 1,
            FieldType::U16 | FieldType::I16 => 2,
            FieldType::U32 | FieldType::I32 | FieldType::F32 => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Endian {
    #[default]
    Big,
    Little,
}

/// value = raw × scale + add.
#[derive(Debug, Clone, PartialEq)]
pub struct LayoutField {
    pub name: String,
    pub offset: usize,
    pub ty: FieldType,
    pub endian: Endian,
    pub scale: f64,
    pub add: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Decoder {
    Layout(Vec<LayoutField>),
    CayenneLpp,
}

/// A payload that did not decode whole; what did decode before the problem is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    pub fields: Vec<(String, f64)>,
    pub error: Option<String>,
}

impl Decoder {
    pub fn decode(&self, b: &[u8]) -> Decoded {
        match self {
            Decoder::Layout(fields) => layout(fields, b),
            Decoder::CayenneLpp => cayenne_lpp(b),
        }
    }
}

fn layout(fields: &[LayoutField], b: &[u8]) -> Decoded {
    let mut out = Decoded {
        fields: Vec::with_capacity(fields.len()),
        error: None,
    };
    for f in fields {
        let Some(bytes) = b.get(f.offset..f.offset + f.ty.size()) else {
            out.error = Some(format!(
                "field {} needs bytes {}..{}, the payload has {}",
                f.name,
                f.offset,
                f.offset + f.ty.size(),
                b.len()
            ));
            continue;
        };
        let mut a = [0u8; 4];
        a[..bytes.len()].copy_from_slice(bytes);
        if f.endian == Endian::Little {
            a[..bytes.len()].reverse();
        }
        // `a` now holds the big-endian bytes, left-aligned.
        let raw = match f.ty {
            FieldType::U8 => a[0] as f64,
            FieldType::I8 => a[0] as i8 as f64,
            FieldType::U16 => u16::from_be_bytes([a[0], a[1]]) as f64,
            FieldType::I16 => i16::from_be_bytes([a[0], a[1]]) as f64,
            FieldType::U32 => u32::from_be_bytes(a) as f64,
            FieldType::I32 => i32::from_be_bytes(a) as f64,
            FieldType::F32 => f32::from_be_bytes(a) as f64,
        };
        out.fields.push((f.name.clone(), raw * f.scale + f.add));
    }
    out
}

/// (type code, name, values: suffix, size, signed, divisor): one entry per value of the type.
/// Divisors rather than scales: 272 / 10 is 27.2, 272 × 0.1 is not.
type LppValue = (&'static str, usize, bool, f64);
const LPP: &[(u8, &str, &[LppValue])] = &[
    (0, "digital_input", &[("", 1, false, 1.0)]),
    (1, "digital_output", &[("", 1, false, 1.0)]),
    (2, "analog_input", &[("", 2, true, 100.0)]),
    (3, "analog_output", &[("", 2, true, 100.0)]),
    (101, "illuminance", &[("", 2, false, 1.0)]),
    (102, "presence", &[("", 1, false, 1.0)]),
    (103, "temperature", &[("", 2, true, 10.0)]),
    (104, "humidity", &[("", 1, false, 2.0)]),
    (
        113,
        "accelerometer",
        &[
            ("_x", 2, true, 1000.0),
            ("_y", 2, true, 1000.0),
            ("_z", 2, true, 1000.0),
        ],
    ),
    (115, "barometer", &[("", 2, false, 10.0)]),
    (
        134,
        "gyrometer",
        &[
            ("_x", 2, true, 100.0),
            ("_y", 2, true, 100.0),
            ("_z", 2, true, 100.0),
        ],
    ),
    (
        136,
        "gps",
        &[
            ("_latitude", 3, true, 10000.0),
            ("_longitude", 3, true, 10000.0),
            ("_altitude", 3, true, 100.0),
        ],
    ),
];

/// Whether `name` is a field Cayenne LPP can produce: `<type>[_<axis>]_<channel>`.
pub fn is_lpp_field(name: &str) -> bool {
    let Some((stem, channel)) = name.rsplit_once('_') else {
        return false;
    };
    if channel.parse::<u8>().is_err() {
        return false;
    }
    LPP.iter().any(|(_, ty, values)| {
        values
            .iter()
            .any(|(suffix, ..)| stem == format!("{ty}{suffix}"))
    })
}

fn cayenne_lpp(b: &[u8]) -> Decoded {
    let mut out = Decoded {
        fields: Vec::new(),
        error: None,
    };
    let mut i = 0;
    while i < b.len() {
        let Some((&channel, &code)) = b.get(i).zip(b.get(i + 1)) else {
            out.error = Some(format!("a truncated item at byte {i}"));
            break;
        };
        let Some((_, ty, values)) = LPP.iter().find(|(c, ..)| *c == code) else {
            out.error = Some(format!("unknown Cayenne LPP type {code} at byte {}", i + 1));
            break;
        };
        i += 2;
        for (suffix, size, signed, divisor) in values.iter() {
            let Some(bytes) = b.get(i..i + size) else {
                out.error = Some(format!("{ty} on channel {channel}: the payload ends early"));
                return out;
            };
            let mut raw: i64 = 0;
            for byte in bytes {
                raw = (raw << 8) | *byte as i64;
            }
            if *signed && bytes[0] & 0x80 != 0 {
                raw -= 1 << (8 * size);
            }
            out.fields
                .push((format!("{ty}{suffix}_{channel}"), raw as f64 / divisor));
            i += size;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cayenne_lpp_reference_examples() {
        // The examples of the Cayenne LPP documentation.
        let d = cayenne_lpp(&hex::decode("03670110056700FF").unwrap());
        assert_eq!(d.error, None);
        assert_eq!(
            d.fields,
            vec![
                ("temperature_3".to_string(), 27.2),
                ("temperature_5".to_string(), 25.5)
            ]
        );
        let d = cayenne_lpp(&hex::decode("06710415FF0D0000").unwrap());
        assert_eq!(d.fields[0], ("accelerometer_x_6".to_string(), 1.045));
        assert!((d.fields[1].1 - -0.243).abs() < 1e-9, "{:?}", d.fields);
        let d = cayenne_lpp(&hex::decode("018806765ff2960a0003e8").unwrap());
        assert!((d.fields[0].1 - 42.3519).abs() < 1e-9, "{:?}", d.fields);
        assert!((d.fields[1].1 - -87.9094).abs() < 1e-9, "{:?}", d.fields);
        assert!((d.fields[2].1 - 10.0).abs() < 1e-9, "{:?}", d.fields);
    }

    #[test]
    fn a_layout_reads_both_byte_orders_and_scales() {
        let fields = vec![
            LayoutField {
                name: "level".into(),
                offset: 0,
                ty: FieldType::U16,
                endian: Endian::Big,
                scale: 0.001,
                add: 0.0,
            },
            LayoutField {
                name: "t".into(),
                offset: 2,
                ty: FieldType::I16,
                endian: Endian::Little,
                scale: 0.1,
                add: 0.0,
            },
        ];
        let d = layout(&fields, &[0x09, 0xC4, 0x9C, 0xFF]);
        assert_eq!(d.fields[0], ("level".into(), 2.5));
        assert!((d.fields[1].1 - -10.0).abs() < 1e-9);
        let short = layout(&fields, &[0x09]);
        assert!(short.fields.is_empty() && short.error.is_some());
    }

    #[test]
    fn lpp_field_names() {
        assert!(is_lpp_field("temperature_3"));
        assert!(is_lpp_field("gps_altitude_1"));
        assert!(!is_lpp_field("temperature"));
        assert!(!is_lpp_field("water_level_1"));
    }

    /// No panic and bounded output on arbitrary bytes (a cheap stand-in for the fuzzer run
    /// recorded in BENCHMARKS.md).
    #[test]
    fn arbitrary_bytes_never_panic_and_allocate_at_most_one_value_per_byte() {
        let mut rng = fastrand::Rng::with_seed(7);
        let fields: Vec<LayoutField> = (0..8)
            .map(|i| LayoutField {
                name: format!("f{i}"),
                offset: i * 3,
                ty: [
                    FieldType::U8,
                    FieldType::I16,
                    FieldType::U32,
                    FieldType::F32,
                ][i % 4],
                endian: if i % 2 == 0 {
                    Endian::Big
                } else {
                    Endian::Little
                },
                scale: 1.0,
                add: 0.0,
            })
            .collect();
        for _ in 0..200_000 {
            let n = rng.usize(0..64);
            let b: Vec<u8> = (0..n).map(|_| rng.u8(..)).collect();
            let d = cayenne_lpp(&b);
            assert!(d.fields.len() <= b.len());
            let d = layout(&fields, &b);
            assert!(d.fields.len() <= fields.len());
        }
    }
}

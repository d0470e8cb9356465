//! The two pixel formats V4L2 webcams send, made into what the classifier takes: YUYV 4:2:2
//! converted to RGB, and UVC MJPEG frames made decodable.
//!
//! Both are plain functions on buffers (no device needed), so they are tested on every build with
//! the `serve` feature, against buffers made by ffmpeg (tests/fixtures/v4l2/make.sh).

use std::borrow::Cow;

use image::RgbImage;

/// Why a camera buffer could not be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PixelFormatError {
    /// The frame size the driver reported cannot hold YUYV pixels.
    #[error("YUYV frame of {width}x{height}: the width must be even and neither may be zero")]
    Size {
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// The line stride is shorter than one line of pixels.
    #[error("YUYV line stride of {bytes_per_line} bytes is shorter than a line of {width} pixels ({needed} bytes)")]
    Stride {
        /// The stride the driver reported.
        bytes_per_line: u32,
        /// Width in pixels.
        width: u32,
        /// Bytes one line of pixels needs.
        needed: usize,
    },
    /// The buffer holds fewer bytes than the frame size needs (a truncated or dropped frame).
    #[error("YUYV buffer of {len} bytes is shorter than the {needed} bytes a {width}x{height} frame needs")]
    Short {
        /// Bytes in the buffer.
        len: usize,
        /// Bytes the frame needs.
        needed: usize,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
    },
    /// An MJPEG buffer that is not a JPEG stream up to its scan.
    #[error("MJPEG frame: {0}")]
    Jpeg(&'static str),
}

/// Converts one YUYV (V4L2 `YUYV`, ffmpeg `yuyv422`) frame to RGB.
///
/// Each 4 bytes `Y0 U Y1 V` are two pixels sharing one chroma sample. The colours are BT.601 in
/// limited range (Y 16..235, U/V 16..240), which is what UVC webcams send in YUYV (the UVC
/// specification's default, and what V4L2 reports for them as `V4L2_COLORSPACE_SRGB` with the
/// default `ycbcr_enc`/`quantization`). `bytes_per_line` is the driver's stride (lines may be
/// padded); 0 means unpadded (`2 * width`). The last line need not carry its padding.
pub fn yuyv_to_rgb(data: &[u8], width: u32, height: u32, bytes_per_line: u32) -> Result<RgbImage, PixelFormatError> {
    if width == 0 || height == 0 || !width.is_multiple_of(2) {
        return Err(PixelFormatError::Size { width, height });
    }
    let line_bytes = width as usize * 2;
    let stride = if bytes_per_line == 0 { line_bytes } else { bytes_per_line as usize };
    if stride < line_bytes {
        return Err(PixelFormatError::Stride { bytes_per_line, width, needed: line_bytes });
    }
    // Checked: a driver's (or a fuzzer's) sizes must not overflow into a short "needed".
    let needed = (height as usize - 1).checked_mul(stride).and_then(|lines| lines.checked_add(line_bytes));
    let short = PixelFormatError::Short { len: data.len(), needed: needed.unwrap_or(usize::MAX), width, height };
    let Some(needed) = needed else { return Err(short) };
    if data.len() < needed {
        return Err(short);
    }
    let mut image = RgbImage::new(width, height);
    let out_line = width as usize * 3;
    for (row, out) in image.chunks_exact_mut(out_line).enumerate() {
        let line = &data[row * stride..row * stride + line_bytes];
        for (pair, out) in line.chunks_exact(4).zip(out.chunks_exact_mut(6)) {
            let (u, v) = (i32::from(pair[1]), i32::from(pair[3]));
            out[..3].copy_from_slice(&ycbcr_to_rgb(i32::from(pair[0]), u, v));
            out[3..].copy_from_slice(&ycbcr_to_rgb(i32::from(pair[2]), u, v));
        }
    }
    Ok(image)
}

/// Fixed-point scale of the BT.601 coefficients below (16 fractional bits: exact to well under
/// half a level over the whole 8-bit range).
const SHIFT: u32 = 16;

/// One limited-range BT.601 sample to RGB:
/// R = 1.164 (Y−16) + 1.596 (V−128), G = 1.164 (Y−16) − 0.392 (U−128) − 0.813 (V−128),
/// B = 1.164 (Y−16) + 2.018 (U−128); coefficients × 2^16, rounded, clamped to 0..=255.
fn ycbcr_to_rgb(y: i32, u: i32, v: i32) -> [u8; 3] {
    const Y: i32 = 76_309; // 1.164383 = 255/219
    const RV: i32 = 104_597; // 1.596027 = 1.402 · 255/224
    const GU: i32 = 25_675; // 0.391762 = 0.344136 · 255/224
    const GV: i32 = 53_279; // 0.812968 = 0.714136 · 255/224
    const BU: i32 = 132_201; // 2.017232 = 1.772 · 255/224
    const HALF: i32 = 1 << (SHIFT - 1);
    let y = (y - 16) * Y + HALF;
    let (u, v) = (u - 128, v - 128);
    let clamp = |value: i32| (value >> SHIFT).clamp(0, 255) as u8;
    [clamp(y + RV * v), clamp(y - GU * u - GV * v), clamp(y + BU * u)]
}

/// Makes a UVC camera's MJPEG frame a complete JPEG: many UVC cameras (the USB Video Class MJPEG
/// payload format allows it) leave out the Huffman tables (DHT) and rely on the standard ones of
/// ITU T.81 Annex K.3, which most decoders do not assume. When no DHT comes before the first scan
/// (SOS), those tables are inserted just before it; a frame that has its own tables is returned
/// unchanged (borrowed).
///
/// Only the header is walked (markers up to SOS); the entropy-coded data is not looked at, so a
/// frame truncated inside its scan passes here and is refused by the decoder.
pub fn mjpeg_with_huffman_tables(frame: &[u8]) -> Result<Cow<'_, [u8]>, PixelFormatError> {
    if !frame.starts_with(&[0xFF, 0xD8]) {
        return Err(PixelFormatError::Jpeg("does not start with a JPEG SOI marker"));
    }
    let mut at = 2;
    loop {
        // Any number of 0xFF fill bytes may precede a marker (T.81 B.1.1.2).
        while frame.get(at) == Some(&0xFF) && frame.get(at + 1) == Some(&0xFF) {
            at += 1;
        }
        let (Some(&0xFF), Some(&marker)) = (frame.get(at), frame.get(at + 1)) else {
            return Err(PixelFormatError::Jpeg("ends or loses marker sync before its scan (SOS)"));
        };
        match marker {
            0xC4 => return Ok(Cow::Borrowed(frame)),
            0xDA => {
                let mut fixed = Vec::with_capacity(frame.len() + STANDARD_DHT.len());
                fixed.extend_from_slice(&frame[..at]);
                fixed.extend_from_slice(&STANDARD_DHT);
                fixed.extend_from_slice(&frame[at..]);
                return Ok(Cow::Owned(fixed));
            }
            0xD9 => return Err(PixelFormatError::Jpeg("ends (EOI) before its scan (SOS)")),
            // TEM and RSTn stand alone, without a length.
            0x01 | 0xD0..=0xD7 => at += 2,
            _ => {
                let (Some(&high), Some(&low)) = (frame.get(at + 2), frame.get(at + 3)) else {
                    return Err(PixelFormatError::Jpeg("a segment header is cut off"));
                };
                let length = usize::from(u16::from_be_bytes([high, low]));
                if length < 2 {
                    return Err(PixelFormatError::Jpeg("a segment length is smaller than its own two bytes"));
                }
                at += 2 + length;
            }
        }
    }
}

/// The DHT segment of the four standard tables of ITU T.81 Annex K.3 (K.3.1 DC, K.3.2 AC), in
/// the order ffmpeg writes them (class/id: DC luminance 0/0, DC chrominance 0/1, AC luminance
/// 1/0, AC chrominance 1/1): the tables UVC MJPEG frames without a DHT are coded with.
const STANDARD_DHT: [u8; 420] = standard_dht();

/// Table K.3: code counts per length 1..=16 of the DC luminance table; values 0..=11.
const DC_LUMINANCE_BITS: [u8; 16] = [0, 1, 5, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0];
/// Table K.4: code counts of the DC chrominance table; values 0..=11.
const DC_CHROMINANCE_BITS: [u8; 16] = [0, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0];
/// The DC tables' values (both tables code the magnitude categories 0..=11).
const DC_VALUES: [u8; 12] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11];
/// Table K.5: code counts of the AC luminance table.
const AC_LUMINANCE_BITS: [u8; 16] = [0, 2, 1, 3, 3, 2, 4, 3, 5, 5, 4, 4, 0, 0, 1, 0x7D];
/// Table K.5: the AC luminance table's values in code order.
#[rustfmt::skip]
const AC_LUMINANCE_VALUES: [u8; 162] = [
    0x01, 0x02, 0x03, 0x00, 0x04, 0x11, 0x05, 0x12, 0x21, 0x31, 0x41, 0x06, 0x13, 0x51, 0x61, 0x07,
    0x22, 0x71, 0x14, 0x32, 0x81, 0x91, 0xA1, 0x08, 0x23, 0x42, 0xB1, 0xC1, 0x15, 0x52, 0xD1, 0xF0,
    0x24, 0x33, 0x62, 0x72, 0x82, 0x09, 0x0A, 0x16, 0x17, 0x18, 0x19, 0x1A, 0x25, 0x26, 0x27, 0x28,
    0x29, 0x2A, 0x34, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48, 0x49,
    0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68, 0x69,
    0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89,
    0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5, 0xA6, 0xA7,
    0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3, 0xC4, 0xC5,
    0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA, 0xE1, 0xE2,
    0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8,
    0xF9, 0xFA,
];
/// Table K.6: code counts of the AC chrominance table.
const AC_CHROMINANCE_BITS: [u8; 16] = [0, 2, 1, 2, 4, 4, 3, 4, 7, 5, 4, 4, 0, 1, 2, 0x77];
/// Table K.6: the AC chrominance table's values in code order.
#[rustfmt::skip]
const AC_CHROMINANCE_VALUES: [u8; 162] = [
    0x00, 0x01, 0x02, 0x03, 0x11, 0x04, 0x05, 0x21, 0x31, 0x06, 0x12, 0x41, 0x51, 0x07, 0x61, 0x71,
    0x13, 0x22, 0x32, 0x81, 0x08, 0x14, 0x42, 0x91, 0xA1, 0xB1, 0xC1, 0x09, 0x23, 0x33, 0x52, 0xF0,
    0x15, 0x62, 0x72, 0xD1, 0x0A, 0x16, 0x24, 0x34, 0xE1, 0x25, 0xF1, 0x17, 0x18, 0x19, 0x1A, 0x26,
    0x27, 0x28, 0x29, 0x2A, 0x35, 0x36, 0x37, 0x38, 0x39, 0x3A, 0x43, 0x44, 0x45, 0x46, 0x47, 0x48,
    0x49, 0x4A, 0x53, 0x54, 0x55, 0x56, 0x57, 0x58, 0x59, 0x5A, 0x63, 0x64, 0x65, 0x66, 0x67, 0x68,
    0x69, 0x6A, 0x73, 0x74, 0x75, 0x76, 0x77, 0x78, 0x79, 0x7A, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87,
    0x88, 0x89, 0x8A, 0x92, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0xA2, 0xA3, 0xA4, 0xA5,
    0xA6, 0xA7, 0xA8, 0xA9, 0xAA, 0xB2, 0xB3, 0xB4, 0xB5, 0xB6, 0xB7, 0xB8, 0xB9, 0xBA, 0xC2, 0xC3,
    0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xD9, 0xDA,
    0xE2, 0xE3, 0xE4, 0xE5, 0xE6, 0xE7, 0xE8, 0xE9, 0xEA, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xF8,
    0xF9, 0xFA,
];

/// Assembles [`STANDARD_DHT`] at compile time: marker, length, then each table's class/id byte,
/// its 16 counts and its values. A count table that does not add up to its values fails the build.
const fn standard_dht() -> [u8; 420] {
    let mut segment = [0u8; 420];
    segment[0] = 0xFF;
    segment[1] = 0xC4;
    // The length counts itself, not the marker: 420 - 2 = 0x01A2.
    segment[2] = 0x01;
    segment[3] = 0xA2;
    let mut at = 4;
    at = put_table(&mut segment, at, 0x00, &DC_LUMINANCE_BITS, &DC_VALUES);
    at = put_table(&mut segment, at, 0x01, &DC_CHROMINANCE_BITS, &DC_VALUES);
    at = put_table(&mut segment, at, 0x10, &AC_LUMINANCE_BITS, &AC_LUMINANCE_VALUES);
    at = put_table(&mut segment, at, 0x11, &AC_CHROMINANCE_BITS, &AC_CHROMINANCE_VALUES);
    assert!(at == segment.len(), "the standard DHT segment is 420 bytes");
    segment
}

const fn put_table(segment: &mut [u8; 420], mut at: usize, class_id: u8, bits: &[u8; 16], values: &[u8]) -> usize {
    segment[at] = class_id;
    at += 1;
    let mut count = 0;
    let mut i = 0;
    while i < 16 {
        segment[at + i] = bits[i];
        count += bits[i] as usize;
        i += 1;
    }
    at += 16;
    assert!(count == values.len(), "a Huffman table's counts must add up to its values");
    let mut i = 0;
    while i < values.len() {
        segment[at + i] = values[i];
        i += 1;
    }
    at + values.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/v4l2");
    const WIDTH: u32 = 48;
    const HEIGHT: u32 = 32;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{FIXTURES}/{name}")).unwrap_or_else(|error| panic!("{FIXTURES}/{name}: {error}"))
    }

    /// ffmpeg (tests/fixtures/v4l2/make.sh: in_color_matrix=bt601, in_range=tv, accurate
    /// rounding, chroma replicated per pixel pair) and this conversion round the same arithmetic
    /// differently: no channel may differ by more than 1 level, and on average by under 0.05 (measured:
    /// largest 1, mean 0.002).
    #[test]
    fn yuyv_matches_ffmpeg_bt601_limited_range() {
        let yuyv = fixture("photo.yuyv");
        let expected = fixture("photo.rgb");
        let image = yuyv_to_rgb(&yuyv, WIDTH, HEIGHT, WIDTH * 2).expect("converts");
        assert_eq!(image.as_raw().len(), expected.len());
        let differences: Vec<u8> = image.as_raw().iter().zip(&expected).map(|(a, b)| a.abs_diff(*b)).collect();
        let max = differences.iter().copied().max().unwrap_or(0);
        let mean = differences.iter().map(|&d| f64::from(d)).sum::<f64>() / differences.len() as f64;
        assert!(max <= 1, "largest difference from ffmpeg: {max}");
        assert!(mean < 0.05, "mean difference from ffmpeg: {mean}");
    }

    #[test]
    fn padded_lines_and_an_unpadded_last_line_convert_the_same() {
        let yuyv = fixture("photo.yuyv");
        let plain = yuyv_to_rgb(&yuyv, WIDTH, HEIGHT, 0).expect("converts");
        // 32 bytes of padding after every line, none after the last (drivers may leave it off).
        let stride = WIDTH as usize * 2 + 32;
        let mut padded = Vec::new();
        for line in yuyv.chunks_exact(WIDTH as usize * 2) {
            padded.extend_from_slice(line);
            padded.extend_from_slice(&[0xAB; 32]);
        }
        padded.truncate(padded.len() - 32);
        let from_padded = yuyv_to_rgb(&padded, WIDTH, HEIGHT, stride as u32).expect("converts");
        assert_eq!(plain, from_padded);
    }

    #[test]
    fn limited_range_ends_map_to_black_and_white_and_beyond_them_clamps() {
        let grey = |y: u8| yuyv_to_rgb(&[y, 128, y, 128], 2, 1, 4).expect("converts").into_raw();
        assert_eq!(grey(16), [0; 6]);
        assert_eq!(grey(0), [0; 6]);
        assert_eq!(grey(235), [255; 6]);
        assert_eq!(grey(255), [255; 6]);
        assert_eq!(grey(126), [128; 6]);
        // Pure red in BT.601 limited range: Y 81, U 90, V 240.
        let red = yuyv_to_rgb(&[81, 90, 81, 240], 2, 1, 4).expect("converts").into_raw();
        assert!(red[0] >= 254 && red[1] <= 1 && red[2] <= 1, "{red:?}");
    }

    #[test]
    fn bad_sizes_and_short_buffers_are_errors_not_panics() {
        let yuyv = fixture("photo.yuyv");
        assert!(matches!(yuyv_to_rgb(&yuyv, 0, HEIGHT, 0), Err(PixelFormatError::Size { .. })));
        assert!(matches!(yuyv_to_rgb(&yuyv, WIDTH, 0, 0), Err(PixelFormatError::Size { .. })));
        assert!(matches!(yuyv_to_rgb(&yuyv, WIDTH - 1, HEIGHT, 0), Err(PixelFormatError::Size { .. })));
        assert!(matches!(yuyv_to_rgb(&yuyv, WIDTH, HEIGHT, WIDTH), Err(PixelFormatError::Stride { .. })));
        assert!(matches!(yuyv_to_rgb(&yuyv[..yuyv.len() - 1], WIDTH, HEIGHT, 0), Err(PixelFormatError::Short { .. })));
        assert!(matches!(yuyv_to_rgb(&yuyv, WIDTH, HEIGHT + 1, 0), Err(PixelFormatError::Short { .. })));
        assert!(matches!(yuyv_to_rgb(&[], 2, 1, 0), Err(PixelFormatError::Short { .. })));
        let huge = yuyv_to_rgb(&yuyv, u32::MAX - 1, u32::MAX, 0);
        assert!(matches!(huge, Err(PixelFormatError::Short { .. })), "{huge:?}");
    }

    /// The segments of a JPEG header up to SOS: (marker, start, end of segment).
    fn segments(jpeg: &[u8]) -> Vec<(u8, usize, usize)> {
        let mut found = Vec::new();
        let mut at = 2;
        while jpeg[at + 1] != 0xDA {
            let end = at + 2 + usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
            found.push((jpeg[at + 1], at, end));
            at = end;
        }
        found
    }

    #[test]
    fn the_built_table_segment_is_the_one_ffmpeg_writes_for_its_default_tables() {
        // ffmpeg's mjpeg encoder with `-huffman default` writes Annex K's tables in one DHT, in
        // the same order (DC0, DC1, AC0, AC1): an independent copy of the 420 bytes.
        let jpeg = fixture("mjpeg-422.jpg");
        let (_, start, end) = segments(&jpeg).into_iter().find(|(marker, ..)| *marker == 0xC4).expect("a DHT");
        assert_eq!(&jpeg[start..end], &STANDARD_DHT[..]);
    }

    #[test]
    fn an_mjpeg_frame_without_tables_decodes_to_the_original_pixels_once_they_are_inserted() {
        let original = fixture("mjpeg-422.jpg");
        let (_, start, end) = segments(&original).into_iter().find(|(marker, ..)| *marker == 0xC4).expect("a DHT");
        // What a UVC camera sends: the same frame with its DHT cut out.
        let stripped = [&original[..start], &original[end..]].concat();
        assert!(image::load_from_memory(&stripped).is_err(), "the decoder needs the tables");
        let fixed = mjpeg_with_huffman_tables(&stripped).expect("a JPEG header");
        assert!(matches!(fixed, Cow::Owned(_)));
        let decoded = image::load_from_memory(&fixed).expect("decodes").to_rgb8();
        let expected = image::load_from_memory(&original).expect("decodes").to_rgb8();
        assert_eq!(decoded.dimensions(), (WIDTH, HEIGHT));
        assert_eq!(decoded, expected);
        // A frame with its own tables is passed through untouched.
        assert!(matches!(mjpeg_with_huffman_tables(&original), Ok(Cow::Borrowed(_))));
    }

    #[test]
    fn broken_mjpeg_headers_are_errors_not_panics() {
        let original = fixture("mjpeg-422.jpg");
        let (_, dht, dht_end) = segments(&original).into_iter().find(|(marker, ..)| *marker == 0xC4).expect("a DHT");
        let stripped = [&original[..dht], &original[dht_end..]].concat();
        let sos = segments(&stripped).last().map(|(_, _, end)| *end).expect("segments");
        assert!(mjpeg_with_huffman_tables(b"\x89PNG\r\n").is_err());
        assert!(mjpeg_with_huffman_tables(&[0xFF, 0xD8, 0xFF, 0xD9]).is_err());
        assert!(mjpeg_with_huffman_tables(&[0xFF, 0xD8, 0xFF, 0xE0, 0x00, 0x01]).is_err());
        // Every frame cut off before its tables' marker (or, without tables, before its SOS
        // marker) is refused; none panics.
        for cut in 0..dht + 2 {
            assert!(mjpeg_with_huffman_tables(&original[..cut]).is_err(), "cut at {cut}");
        }
        for cut in 0..sos + 2 {
            assert!(mjpeg_with_huffman_tables(&stripped[..cut]).is_err(), "cut at {cut}");
        }
        // Fill bytes before a marker are allowed.
        let mut filled = original[..2].to_vec();
        filled.extend_from_slice(&[0xFF, 0xFF]);
        filled.extend_from_slice(&original[2..]);
        assert!(matches!(mjpeg_with_huffman_tables(&filled), Ok(Cow::Borrowed(_))));
    }
}

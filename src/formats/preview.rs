//! Pictures of one section: grey for images, stable pseudo-colours for segmentations, a
//! segmentation over an image, as PNG.
//!
//! Colours are a hash of the label, so a segment has the same colour in every section, every
//! mip and every run (and 0, no segment, is black or shows the image under it).

use crate::dtype::DataType;
use crate::volume::Volume;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum PreviewError {
    #[error("a preview needs one z-section, got a box of depth {0}")]
    NotASection(usize),
    #[error("the overlay is {overlay:?} and the image {image:?}: they must match")]
    ShapeMismatch {
        overlay: [usize; 2],
        image: [usize; 2],
    },
    #[error("encoding the PNG")]
    Png(#[from] png::EncodingError),
}

/// An RGB picture, 8 bits per channel, rows from y = 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Picture {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

/// The first channel of a one-section volume as numbers, row by row.
fn values(vol: &Volume) -> Result<Vec<f64>, PreviewError> {
    if vol.shape[2] != 1 {
        return Err(PreviewError::NotASection(vol.shape[2]));
    }
    let n = vol.shape[0] * vol.shape[1];
    let size = vol.dtype.size();
    let bytes = &vol.data[..n * size];
    Ok(bytes
        .chunks_exact(size)
        .map(|b| match vol.dtype {
            DataType::Uint8 => b[0] as f64,
            DataType::Int8 => b[0] as i8 as f64,
            DataType::Uint16 => u16::from_le_bytes([b[0], b[1]]) as f64,
            DataType::Int16 => i16::from_le_bytes([b[0], b[1]]) as f64,
            DataType::Uint32 => u32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
            DataType::Int32 => i32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
            DataType::Float32 => f32::from_le_bytes(b.try_into().expect("4 bytes")) as f64,
            DataType::Uint64 => u64::from_le_bytes(b.try_into().expect("8 bytes")) as f64,
        })
        .collect())
}

/// Grey levels of an image section: uint8 as stored, other types stretched from the section's
/// minimum (black) to its maximum (white); NaN is black.
pub fn grey(vol: &Volume) -> Result<Vec<u8>, PreviewError> {
    let v = values(vol)?;
    if vol.dtype == DataType::Uint8 {
        return Ok(v.iter().map(|&x| x as u8).collect());
    }
    let finite = v.iter().copied().filter(|x| x.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
        (lo.min(x), hi.max(x))
    });
    let span = if hi > lo { hi - lo } else { 1.0 };
    Ok(v.iter()
        .map(|&x| {
            if x.is_finite() {
                ((x - lo) / span * 255.0).round().clamp(0.0, 255.0) as u8
            } else {
                0
            }
        })
        .collect())
}

/// The labels of a segmentation section (uint32 or uint64; other types as their values).
fn labels(vol: &Volume) -> Result<Vec<u64>, PreviewError> {
    if vol.shape[2] != 1 {
        return Err(PreviewError::NotASection(vol.shape[2]));
    }
    let n = vol.shape[0] * vol.shape[1];
    Ok(match vol.dtype {
        DataType::Uint64 => vol.data[..n * 8]
            .chunks_exact(8)
            .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
            .collect(),
        _ => values(vol)?.into_iter().map(|x| x as u64).collect(),
    })
}

/// A segment's colour: bright and saturated, from a hash of its label (SplitMix64's finaliser).
pub fn colour_of(label: u64) -> [u8; 3] {
    let mut z = label.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    // Each channel in 64..=255, one channel kept dark-ish so colours are not grey.
    let mut c = [0, 1, 2].map(|i| 64 + ((z >> (8 * i)) & 0xff) as u8 % 192);
    c[(z >> 40) as usize % 3] /= 3;
    c
}

fn shape2(vol: &Volume) -> [usize; 2] {
    [vol.shape[0], vol.shape[1]]
}

/// An image section in grey.
pub fn image_picture(image: &Volume) -> Result<Picture, PreviewError> {
    let g = grey(image)?;
    Ok(Picture {
        width: image.shape[0],
        height: image.shape[1],
        rgb: g.iter().flat_map(|&v| [v, v, v]).collect(),
    })
}

/// A segmentation section in pseudo-colours, over `image` (in grey, seen through by `1 - alpha`)
/// when given; label 0 shows the image, or black.
pub fn segmentation_picture(
    segmentation: &Volume,
    image: Option<&Volume>,
    alpha: f64,
) -> Result<Picture, PreviewError> {
    let l = labels(segmentation)?;
    let under = match image {
        Some(image) => {
            if shape2(image) != shape2(segmentation) {
                return Err(PreviewError::ShapeMismatch {
                    overlay: shape2(segmentation),
                    image: shape2(image),
                });
            }
            Some(grey(image)?)
        }
        None => None,
    };
    let alpha = alpha.clamp(0.0, 1.0);
    let rgb = l
        .iter()
        .enumerate()
        .flat_map(|(i, &label)| {
            let g = under.as_ref().map_or(0.0, |u| u[i] as f64);
            if label == 0 {
                let g = g as u8;
                return [g, g, g];
            }
            let c = colour_of(label);
            if under.is_none() {
                return c;
            }
            c.map(|c| (alpha * c as f64 + (1.0 - alpha) * g).round() as u8)
        })
        .collect();
    Ok(Picture {
        width: segmentation.shape[0],
        height: segmentation.shape[1],
        rgb,
    })
}

/// The picture as a PNG file's bytes (8-bit RGB).
pub fn encode_png(p: &Picture) -> Result<Vec<u8>, PreviewError> {
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, p.width as u32, p.height as u32);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header()?;
    writer.write_image_data(&p.rgb)?;
    writer.finish()?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_png(bytes: &[u8]) -> Picture {
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        Picture {
            width: info.width as usize,
            height: info.height as usize,
            rgb: buf,
        }
    }

    fn section(dtype: DataType, shape: [usize; 2], values: &[u64]) -> Volume {
        let size = dtype.size();
        let data = values
            .iter()
            .flat_map(|v| v.to_le_bytes()[..size].to_vec())
            .collect();
        Volume::from_bytes(dtype, [shape[0], shape[1], 1], 1, data).unwrap()
    }

    #[test]
    fn images_are_grey_and_wider_types_are_stretched() {
        let img = section(DataType::Uint8, [3, 2], &[0, 10, 20, 30, 40, 255]);
        let p = decode_png(&encode_png(&image_picture(&img).unwrap()).unwrap());
        assert_eq!((p.width, p.height), (3, 2));
        assert_eq!(&p.rgb[3..6], &[10, 10, 10]);
        assert_eq!(&p.rgb[15..18], &[255, 255, 255]);
        let wide = section(DataType::Uint16, [2, 2], &[1000, 2000, 3000, 1000]);
        assert_eq!(grey(&wide).unwrap(), vec![0, 128, 255, 0]);
    }

    #[test]
    fn segments_keep_their_colour_and_overlays_mix_with_the_image() {
        let seg = section(DataType::Uint64, [2, 2], &[0, 7, 7, u64::MAX]);
        let p = segmentation_picture(&seg, None, 0.5).unwrap();
        assert_eq!(&p.rgb[0..3], &[0, 0, 0]);
        assert_eq!(&p.rgb[3..6], &colour_of(7));
        assert_eq!(&p.rgb[6..9], &colour_of(7));
        assert_ne!(colour_of(7), colour_of(8));
        let img = section(DataType::Uint8, [2, 2], &[100, 100, 200, 0]);
        let o = segmentation_picture(&seg, Some(&img), 0.5).unwrap();
        assert_eq!(&o.rgb[0..3], &[100, 100, 100], "label 0 shows the image");
        let c = colour_of(7);
        assert_eq!(
            &o.rgb[6..9],
            &c.map(|c| ((c as f64 + 200.0) / 2.0).round() as u8)
        );
        let small = section(DataType::Uint8, [1, 2], &[1, 2]);
        assert!(segmentation_picture(&seg, Some(&small), 0.5).is_err());
        // Distinct labels mostly get visibly distinct colours.
        let distinct: std::collections::HashSet<[u8; 3]> = (1..200).map(colour_of).collect();
        assert!(distinct.len() > 190);
    }
}

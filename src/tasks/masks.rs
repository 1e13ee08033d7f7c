//! Inpainting masks drawn on the fly as LFM's training does (LaMa's `MixedMaskGenerator` with its default
//! arguments): half the masks are irregular brush strokes, half are boxes.
//!
//! The shapes are drawn in the coordinates of a 256-pixel canvas (LFM trains at 256², where the draws match the
//! reference's parameters exactly) and rasterised onto the image, so smaller or larger images get proportionally
//! scaled masks instead of LaMa's failure on sides below 2·margin + 30.

use rand::Rng;

/// LaMa's literal 3.1415926 (not π): kept so that stroke directions match the reference to the last digit.
#[allow(clippy::approx_constant)]
const LAMA_PI: f64 = 3.1415926;

/// The side the reference's parameters are written for.
pub const REFERENCE_SIDE: f64 = 256.0;

/// LaMa's parameters as LFM uses them (`get_mask_generator(None, None)`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MaskParams {
    /// Probability of an irregular-stroke mask (else boxes).
    pub irregular_probability: f64,
    /// Stroke angles are `0.01 + randint(max_angle)` radians.
    pub max_angle: u32,
    /// Segment lengths are `10 + randint(max_len)`.
    pub max_len: u32,
    /// Brush widths are `5 + randint(max_width)`.
    pub max_width: u32,
    /// Strokes are `randint(0, max_strokes + 1)`: LaMa's generator passes `max_times + 1` = 11 for its default 10,
    /// so a mask has 0–11 strokes, as in LFM's training.
    pub max_strokes: u32,
    /// Boxes keep this far from the border.
    pub margin: u32,
    /// Smallest box side.
    pub box_min: u32,
    /// Box sides are `randint(box_min, box_max + 1)` (LaMa's `bbox_min_size + 1 + (max − min)` = 101, exclusive).
    pub box_max: u32,
    /// Boxes per mask: 0 to this many.
    pub max_boxes: u32,
}

impl Default for MaskParams {
    fn default() -> Self {
        Self {
            irregular_probability: 0.5,
            max_angle: 4,
            max_len: 60,
            max_width: 20,
            max_strokes: 11,
            margin: 10,
            box_min: 30,
            box_max: 100,
            max_boxes: 3,
        }
    }
}

/// One straight piece of a brush stroke, in canvas coordinates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Segment {
    /// Start point `(x, y)`.
    pub from: (i64, i64),
    /// End point `(x, y)` (clipped to the canvas as the reference clips it).
    pub to: (i64, i64),
    /// The drawn length before clipping (10..=69 by default).
    pub length: u32,
    /// Brush width (5..=24 by default).
    pub width: u32,
}

/// An axis-aligned box, in canvas coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// Left column.
    pub x: u32,
    /// Top row.
    pub y: u32,
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

/// What a mask was drawn from.
#[derive(Debug, Clone, PartialEq)]
pub enum MaskShapes {
    /// Brush strokes, each a chain of 1–5 segments.
    Strokes(Vec<Vec<Segment>>),
    /// Boxes.
    Boxes(Vec<Rect>),
}

/// A generated mask.
#[derive(Debug, Clone, PartialEq)]
pub struct Mask {
    /// 1 = region to generate (the hole), 0 = kept; row-major `height × width`.
    pub hole: Vec<f32>,
    /// The shapes, in the canvas coordinates (`canvas` wide and high).
    pub shapes: MaskShapes,
    /// The canvas the shapes were drawn on: `(width, height)`, 256 on the image's short side.
    pub canvas: (u32, u32),
}

/// Draws one mask for a `width × height` image.
pub fn generate(rng: &mut impl Rng, params: &MaskParams, width: usize, height: usize) -> Mask {
    let scale = width.min(height) as f64 / REFERENCE_SIDE;
    let canvas = ((width as f64 / scale).round() as u32, (height as f64 / scale).round() as u32);
    let shapes = if rng.random_bool(params.irregular_probability) {
        MaskShapes::Strokes(strokes(rng, params, canvas))
    } else {
        MaskShapes::Boxes(boxes(rng, params, canvas))
    };
    let mut hole = vec![0f32; width * height];
    // A pixel's centre in canvas coordinates (pixel i's centre is the point i at scale 1, as in cv2), and back.
    let to_canvas = |i: usize| (i as f64 + 0.5) / scale - 0.5;
    let to_pixel = |c: f64| (c + 0.5) * scale - 0.5;
    // Each shape paints only the pixels of its bounding box (a 256² mask has up to 55 segments).
    for (min, max, shape) in shape_bounds(&shapes) {
        let x_range =
            (to_pixel(min.0).floor().max(0.0) as usize)..((to_pixel(max.0).ceil() + 1.0).max(0.0) as usize).min(width);
        let y_range =
            (to_pixel(min.1).floor().max(0.0) as usize)..((to_pixel(max.1).ceil() + 1.0).max(0.0) as usize).min(height);
        for y in y_range {
            let cy = to_canvas(y);
            for x in x_range.clone() {
                if shape.covers(to_canvas(x), cy) {
                    hole[y * width + x] = 1.0;
                }
            }
        }
    }
    Mask { hole, shapes, canvas }
}

/// LaMa's `make_random_irregular_mask` (draw method LINE).
fn strokes(rng: &mut impl Rng, p: &MaskParams, (w, h): (u32, u32)) -> Vec<Vec<Segment>> {
    let count = rng.random_range(0..=p.max_strokes);
    (0..count)
        .map(|i| {
            let mut start = (rng.random_range(0..w) as i64, rng.random_range(0..h) as i64);
            let pieces = 1 + rng.random_range(0..5);
            (0..pieces)
                .map(|_| {
                    let mut angle = 0.01 + rng.random_range(0..p.max_angle) as f64;
                    if i % 2 == 0 {
                        angle = 2.0 * LAMA_PI - angle;
                    }
                    let length = 10 + rng.random_range(0..p.max_len);
                    let width = 5 + rng.random_range(0..p.max_width);
                    // numpy's astype(int32) truncates toward zero; then clip to [0, side] (inclusive, as LaMa).
                    let end_x = ((start.0 as f64 + length as f64 * angle.sin()) as i64).clamp(0, w as i64);
                    let end_y = ((start.1 as f64 + length as f64 * angle.cos()) as i64).clamp(0, h as i64);
                    let segment = Segment { from: start, to: (end_x, end_y), length, width };
                    start = (end_x, end_y);
                    segment
                })
                .collect()
        })
        .collect()
}

/// LaMa's `make_random_rectangle_mask`.
fn boxes(rng: &mut impl Rng, p: &MaskParams, (w, h): (u32, u32)) -> Vec<Rect> {
    let largest = p.box_max.min(h.saturating_sub(2 * p.margin + 1)).min(w.saturating_sub(2 * p.margin + 1));
    let largest = largest.max(p.box_min);
    let count = rng.random_range(0..=p.max_boxes);
    (0..count)
        .map(|_| {
            let bw = rng.random_range(p.box_min..=largest);
            let bh = rng.random_range(p.box_min..=largest);
            let x = rng.random_range(p.margin..=(w - p.margin).saturating_sub(bw).max(p.margin));
            let y = rng.random_range(p.margin..=(h - p.margin).saturating_sub(bh).max(p.margin));
            Rect { x, y, width: bw, height: bh }
        })
        .collect()
}

/// One drawn shape.
#[derive(Clone, Copy)]
enum Shape<'a> {
    Segment(&'a Segment),
    Box(&'a Rect),
}

impl Shape<'_> {
    /// Whether the canvas point `(x, y)` is painted: within half a brush width of a segment (cv2's thick lines have
    /// round ends), or inside a box.
    fn covers(self, x: f64, y: f64) -> bool {
        match self {
            Shape::Segment(s) => {
                let (ax, ay) = (s.from.0 as f64, s.from.1 as f64);
                let (dx, dy) = (s.to.0 as f64 - ax, s.to.1 as f64 - ay);
                let len2 = dx * dx + dy * dy;
                let t = if len2 > 0.0 { (((x - ax) * dx + (y - ay) * dy) / len2).clamp(0.0, 1.0) } else { 0.0 };
                let (px, py) = (ax + t * dx - x, ay + t * dy - y);
                let radius = s.width as f64 / 2.0;
                px * px + py * py <= radius * radius
            }
            Shape::Box(b) => {
                // Pixels x..x+width (exclusive), with centres at integers.
                let inside = |v: f64, start: u32, len: u32| v >= start as f64 - 0.5 && v < (start + len) as f64 - 0.5;
                inside(x, b.x, b.width) && inside(y, b.y, b.height)
            }
        }
    }
}

/// A canvas point `(x, y)`.
type Point = (f64, f64);

/// Every shape with the canvas box `(min, max)` that holds it.
fn shape_bounds(shapes: &MaskShapes) -> Vec<(Point, Point, Shape<'_>)> {
    match shapes {
        MaskShapes::Strokes(strokes) => strokes
            .iter()
            .flatten()
            .map(|s| {
                let r = s.width as f64 / 2.0;
                let (x0, x1) = (s.from.0.min(s.to.0) as f64, s.from.0.max(s.to.0) as f64);
                let (y0, y1) = (s.from.1.min(s.to.1) as f64, s.from.1.max(s.to.1) as f64);
                ((x0 - r, y0 - r), (x1 + r, y1 + r), Shape::Segment(s))
            })
            .collect(),
        MaskShapes::Boxes(boxes) => boxes
            .iter()
            .map(|b| {
                let min = (b.x as f64 - 0.5, b.y as f64 - 0.5);
                let max = ((b.x + b.width) as f64 - 0.5, (b.y + b.height) as f64 - 0.5);
                (min, max, Shape::Box(b))
            })
            .collect(),
    }
}

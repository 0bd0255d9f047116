//! The loss curves of a run, drawn from its metrics CSV into a PNG and an SVG beside it. Text is
//! laid out with DejaVu Sans, bundled (assets/, Bitstream Vera licence): a fresh machine has no
//! font library plotters could ask, and CI has none installed.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// plotters looks fonts up by family name; ours serves every style the chart asks for.
fn register_font() -> Result<(), Box<dyn std::error::Error>> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        [FontStyle::Normal, FontStyle::Bold]
            .into_iter()
            .all(|style| plotters::style::register_font("sans-serif", style, FONT).is_ok())
    });
    if ok {
        Ok(())
    } else {
        Err("the bundled font could not be read".into())
    }
}

/// `(step, loss)` points of one curve.
type Curve = Vec<(f64, f64)>;

/// `(step, train loss)` and `(step, validation loss)` points of a `step,train_loss,valid_loss,...`
/// CSV (empty fields are steps without that measurement).
fn points(csv: &str) -> (Curve, Curve) {
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let Some(step) = f.first().and_then(|s| s.parse::<f64>().ok()) else {
            continue;
        };
        if let Some(x) = f.get(1).and_then(|s| s.parse::<f64>().ok()) {
            train.push((step, x));
        }
        if let Some(x) = f.get(2).and_then(|s| s.parse::<f64>().ok()) {
            valid.push((step, x));
        }
    }
    (train, valid)
}

/// Draws the train and validation losses of `csv` into `path` (SVG).
pub fn loss_svg(csv: &str, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let (train, valid) = points(csv);
    register_font()?;
    draw(
        SVGBackend::new(path, (800, 480)).into_drawing_area(),
        train,
        valid,
    )
}

/// Draws the train and validation losses of `csv` into `path` (PNG).
pub fn loss_png(csv: &str, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let (train, valid) = points(csv);
    register_font()?;
    draw(
        BitMapBackend::new(path, (800, 480)).into_drawing_area(),
        train,
        valid,
    )
}

fn draw<DB: DrawingBackend>(
    root: DrawingArea<DB, Shift>,
    train: Curve,
    valid: Curve,
) -> Result<(), Box<dyn std::error::Error>>
where
    DB::ErrorType: 'static,
{
    let all = || train.iter().chain(&valid);
    if all().next().is_none() {
        return Err("no losses to plot".into());
    }
    let last = all().map(|p| p.0).fold(1.0, f64::max);
    let lo = all().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = all().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-3);
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..last, (lo - pad)..(hi + pad))?;
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc("cross-entropy (nats/token)")
        .draw()?;
    for (series, name, color) in [(train, "train", BLUE), (valid, "validation", RED)] {
        chart
            .draw_series(LineSeries::new(series, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_both_curves() {
        let csv = "step,train_loss,valid_loss,learning_rate\n0,,5.5,0\n1,5.4,,0.1\n2,4.0,3.9,0.1\n";
        let (train, valid) = points(csv);
        assert_eq!(train, vec![(1.0, 5.4), (2.0, 4.0)]);
        assert_eq!(valid, vec![(0.0, 5.5), (2.0, 3.9)]);
        let path = std::env::temp_dir().join(format!("fla-plot-{}.svg", std::process::id()));
        loss_svg(csv, &path).expect("drawn");
        let svg = std::fs::read_to_string(&path).expect("written");
        assert!(svg.starts_with("<svg") && svg.contains("validation") && svg.contains("<polyline"));
        // Each colour twice: its curve and its legend mark.
        assert_eq!(svg.matches("stroke=\"#0000FF\"").count(), 2, "train curve");
        assert_eq!(
            svg.matches("stroke=\"#FF0000\"").count(),
            2,
            "validation curve"
        );
        let err = loss_svg("step,train_loss,valid_loss\n", &path).unwrap_err();
        assert!(err.to_string().contains("no losses"));
    }

    #[test]
    fn png_has_both_colours_and_text() {
        let csv = "step,train_loss,valid_loss,learning_rate\n0,,5.5,0\n1,5.4,,0.1\n2,4.0,3.9,0.1\n";
        let path = std::env::temp_dir().join(format!("fla-plot-{}.png", std::process::id()));
        loss_png(csv, &path).expect("drawn");
        let img = image::open(&path).expect("a PNG").to_rgb8();
        assert_eq!(img.dimensions(), (800, 480));
        let count = |f: &dyn Fn(&image::Rgb<u8>) -> bool| img.pixels().filter(|p| f(p)).count();
        // The curves (2 px wide, hundreds of px long) in pure blue and pure red.
        assert!(count(&|p| p.0 == [0, 0, 255]) > 300, "train curve");
        assert!(count(&|p| p.0 == [255, 0, 0]) > 300, "validation curve");
        // Text and axes: dark grey-to-black pixels beyond the mesh lines.
        assert!(
            count(&|p| p.0.iter().all(|&c| c < 100)) > 500,
            "labels drawn"
        );
        let err = loss_png("step,train_loss,valid_loss\n", &path).unwrap_err();
        assert!(err.to_string().contains("no losses"));
    }
}

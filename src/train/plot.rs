//! The PNG plot of the training losses.
//!
//! The plot has no text, because plotters needs system fonts to draw text and a doctor may be
//! trained on a machine without them. Its layout is fixed instead. Two panels share the x axis,
//! which runs from step 1 to the last step. The top panel shows the TFPO loss (blue) over its
//! SubTB part (red), the bottom panel the value hinge before `λ` (green). Each panel's y axis is
//! linear from 0 to the largest value it shows. Curves are moving averages over
//! [`SMOOTHING_WINDOW`] steps, and the exact numbers are in the CSV written beside the plot.

use std::path::Path;

use plotters::prelude::*;

use super::checkpoint::StepLog;
use super::TrainError;

/// Steps averaged for each plotted point.
pub const SMOOTHING_WINDOW: usize = 10;

fn moving_average(values: &[(usize, f32)]) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(values.len());
    let mut sum = 0.0f64;
    for (index, &(step, value)) in values.iter().enumerate() {
        sum += f64::from(value);
        if index >= SMOOTHING_WINDOW {
            sum -= f64::from(values[index - SMOOTHING_WINDOW].1);
        }
        let count = (index + 1).min(SMOOTHING_WINDOW);
        out.push((step as f64, sum / count as f64));
    }
    out
}

fn plot_error(path: &Path, err: impl std::fmt::Display) -> TrainError {
    TrainError::Checkpoint {
        path: path.to_owned(),
        message: format!("failed to draw the loss plot: {err}"),
    }
}

type Curve = (Vec<(f64, f64)>, RGBColor, u32);

/// Draws curves into one panel, with the y axis from 0 to the largest plotted value.
fn draw_panel(
    area: &DrawingArea<BitMapBackend<'_>, plotters::coord::Shift>,
    path: &Path,
    last_step: f64,
    curves: Vec<Curve>,
) -> Result<(), TrainError> {
    let top = curves
        .iter()
        .flat_map(|(points, _, _)| points.iter().map(|&(_, y)| y))
        .fold(0.0f64, f64::max)
        .max(1e-6);
    let mut chart = ChartBuilder::on(area)
        .margin(15)
        .build_cartesian_2d(1.0..last_step, 0.0..top * 1.05)
        .map_err(|err| plot_error(path, err))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .draw()
        .map_err(|err| plot_error(path, err))?;
    for (points, color, width) in curves {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(width)))
            .map_err(|err| plot_error(path, err))?;
    }
    Ok(())
}

/// Draws the loss curves of `history` into a PNG file.
pub fn plot_losses(history: &[StepLog], path: &Path) -> Result<(), TrainError> {
    let total: Vec<(usize, f32)> = history.iter().map(|s| (s.step, s.loss)).collect();
    let subtb: Vec<(usize, f32)> = history.iter().map(|s| (s.step, s.subtb)).collect();
    let value: Vec<(usize, f32)> = history
        .iter()
        .filter_map(|s| s.value.map(|v| (s.step, v)))
        .collect();
    let last_step = history.last().map_or(1, |s| s.step).max(2) as f64;

    let root = BitMapBackend::new(path, (800, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|err| plot_error(path, err))?;
    let panels = root.split_evenly((2, 1));
    // SubTB is drawn wider and first, so the total loss stays visible on top of it.
    let losses = vec![
        (moving_average(&subtb), RED, 5),
        (moving_average(&total), BLUE, 2),
    ];
    draw_panel(&panels[0], path, last_step, losses)?;
    draw_panel(
        &panels[1],
        path,
        last_step,
        vec![(moving_average(&value), GREEN, 2)],
    )?;
    root.present().map_err(|err| plot_error(path, err))
}

/// Writes `history` as CSV: `step,loss,subtb,value,lr,grad_norm`, with an empty `value` for
/// pairs without a divergence point.
pub fn write_history_csv(history: &[StepLog], path: &Path) -> Result<(), TrainError> {
    let mut text = String::from("step,pair_id,loss,subtb,value,lr,grad_norm\n");
    for s in history {
        let value = s.value.map(|v| v.to_string()).unwrap_or_default();
        text.push_str(&format!(
            "{},{},{},{},{},{},{}\n",
            s.step, s.pair_id, s.loss, s.subtb, value, s.lr, s.grad_norm
        ));
    }
    std::fs::write(path, text).map_err(|err| TrainError::Checkpoint {
        path: path.to_owned(),
        message: err.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history() -> Vec<StepLog> {
        (1..=40)
            .map(|step| StepLog {
                step,
                pair_id: format!("p{step}"),
                loss: 100.0 / step as f32,
                subtb: 99.0 / step as f32,
                value: (step % 3 != 0).then_some(1.0 / step as f32),
                lr: 1e-3,
                grad_norm: 2.0,
            })
            .collect()
    }

    #[test]
    fn plot_is_a_png() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        plot_losses(&history(), &path).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
        if let Ok(keep) = std::env::var("LLMDOCTOR_KEEP_PLOT") {
            std::fs::copy(&path, keep).unwrap();
        }
    }

    #[test]
    fn csv_has_one_row_per_step() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("losses.csv");
        write_history_csv(&history(), &path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 41);
        assert_eq!(lines[0], "step,pair_id,loss,subtb,value,lr,grad_norm");
        assert!(
            lines[3].contains(",,"),
            "step 3 has no value term: {}",
            lines[3]
        );
    }

    #[test]
    fn moving_average_uses_the_window() {
        let values: Vec<(usize, f32)> = (1..=12).map(|step| (step, step as f32)).collect();
        let averaged = moving_average(&values);
        assert_eq!(averaged[0], (1.0, 1.0));
        assert_eq!(averaged[1], (2.0, 1.5));
        // Steps 3..=12 average to 7.5.
        assert_eq!(averaged[11], (12.0, 7.5));
    }
}

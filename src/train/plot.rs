//! The PNG plot of the training losses.
//!
//! The plot has no text, because plotters needs system fonts to draw text and a doctor may be
//! trained on a machine without them. Its layout is fixed instead: the x axis is the step from
//! 1 to the last, the y axis runs linearly from 0 to the largest plotted value, and grid lines
//! divide both axes into tenths. Curves are moving averages over [`SMOOTHING_WINDOW`] steps:
//! blue is the TFPO loss, red the SubTB part, green the value hinge (before `λ`). The exact
//! numbers are in the CSV written beside the plot.

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

/// Draws the loss curves of `history` into a PNG file.
pub fn plot_losses(history: &[StepLog], path: &Path) -> Result<(), TrainError> {
    let total: Vec<(usize, f32)> = history.iter().map(|s| (s.step, s.loss)).collect();
    let subtb: Vec<(usize, f32)> = history.iter().map(|s| (s.step, s.subtb)).collect();
    let value: Vec<(usize, f32)> = history
        .iter()
        .filter_map(|s| s.value.map(|v| (s.step, v)))
        .collect();
    let curves = [
        (moving_average(&total), BLUE),
        (moving_average(&subtb), RED),
        (moving_average(&value), GREEN),
    ];
    let last_step = history.last().map_or(1, |s| s.step).max(2) as f64;
    let top = curves
        .iter()
        .flat_map(|(points, _)| points.iter().map(|&(_, y)| y))
        .fold(0.0f64, f64::max)
        .max(1e-6);

    let root = BitMapBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|err| plot_error(path, err))?;
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .build_cartesian_2d(1.0..last_step, 0.0..top * 1.05)
        .map_err(|err| plot_error(path, err))?;
    chart
        .configure_mesh()
        .x_labels(11)
        .y_labels(11)
        .disable_x_mesh()
        .draw()
        .map_err(|err| plot_error(path, err))?;
    for (points, color) in curves {
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(|err| plot_error(path, err))?;
    }
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

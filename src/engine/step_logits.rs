//! Logits of one engine step, grouped by request and choice.

use std::collections::HashMap;

use candle_core::Tensor;

use super::scheduler::RequestId;

/// Which row of a choice a logits tensor belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    /// The patient's own row.
    Patient,
    /// A doctor's own row, by index in the request's doctors.
    Doctor(usize),
    /// The patient's and its base's doctors' rows mixed before the output layer.
    Steered,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct RowKey {
    pub(crate) request: RequestId,
    pub(crate) choice: usize,
    pub(crate) slot: Slot,
}

/// Logits of one choice's rows in a step, converted to host vectors. A row the step did not
/// compute is `None`.
#[derive(Clone, Default)]
pub(crate) struct ChoiceLogits {
    pub(crate) patient: Option<Vec<f32>>,
    pub(crate) doctors: Vec<Option<Vec<f32>>>,
    pub(crate) steered: Option<Vec<f32>>,
}

impl ChoiceLogits {
    /// Returns the logits of doctor `index`'s own row, if the step computed it.
    pub(crate) fn doctor(&self, index: usize) -> Option<&[f32]> {
        self.doctors.get(index)?.as_deref()
    }
}

/// The logits tensors of one choice's rows: the patient's, each doctor's by index, and the
/// mixed steered row.
#[derive(Default)]
struct ChoiceTensors {
    patient: Option<Tensor>,
    doctors: Vec<(usize, Tensor)>,
    steered: Option<Tensor>,
}

/// Logits of one step, by request and choice.
#[derive(Default)]
pub(crate) struct StepLogits {
    tensors: HashMap<(RequestId, usize), ChoiceTensors>,
}

impl StepLogits {
    pub(crate) fn insert(&mut self, key: RowKey, tensor: Tensor) {
        let entry = self.tensors.entry((key.request, key.choice)).or_default();
        match key.slot {
            Slot::Patient => entry.patient = Some(tensor),
            Slot::Doctor(index) => entry.doctors.push((index, tensor)),
            Slot::Steered => entry.steered = Some(tensor),
        }
    }

    /// Removes and converts the logits of every choice of `request`.
    pub(crate) fn drain_filter_request(
        &mut self,
        request: RequestId,
    ) -> Vec<((RequestId, usize), ChoiceLogits)> {
        let keys: Vec<(RequestId, usize)> = self
            .tensors
            .keys()
            .filter(|(r, _)| *r == request)
            .copied()
            .collect();
        keys.into_iter()
            .filter_map(|key| {
                let ChoiceTensors {
                    patient,
                    doctors,
                    steered,
                } = self.tensors.remove(&key)?;
                let to_vec = |t: Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f32>()).ok();
                let rows = doctors
                    .iter()
                    .map(|(index, _)| index + 1)
                    .max()
                    .unwrap_or(0);
                let mut doctor_rows = vec![None; rows];
                for (index, tensor) in doctors {
                    doctor_rows[index] = to_vec(tensor);
                }
                Some((
                    key,
                    ChoiceLogits {
                        patient: patient.and_then(to_vec),
                        doctors: doctor_rows,
                        steered: steered.and_then(to_vec),
                    },
                ))
            })
            .collect()
    }
}

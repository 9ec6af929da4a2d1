//! Model and doctor routes: listing, and the admin routes that load, replace and unload
//! doctors while the server runs.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::doctor::{Doctor, DoctorBase};

use super::auth::{AdminKey, ApiKey};
use super::error::{body_rejection, ApiError, ErrorBody};
use super::json::parse_object;
use super::wire::{DoctorCard, DoctorList, LoadDoctorRequest, ModelCard, ModelList};
use super::AppState;

fn doctor_card(doctor: &Doctor) -> DoctorCard {
    DoctorCard {
        name: doctor.name().to_string(),
        description: doctor.manifest.description.clone(),
        default_beta: doctor.default_beta(),
        base: match &doctor.base {
            DoctorBase::Patient => "patient".to_string(),
            DoctorBase::Separate(_) => "separate".to_string(),
        },
        version: doctor.version,
    }
}

/// Lists the patient and every loaded doctor; a doctor's id selects it through `model`.
#[utoipa::path(
    get,
    path = "/v1/models",
    responses(
        (status = 200, body = ModelList),
        (status = 401, body = ErrorBody),
        (status = 503, description = "Loading", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "models"
)]
pub async fn list_models(
    State(state): State<AppState>,
    _key: ApiKey,
) -> Result<Json<ModelList>, ApiError> {
    let ready = state.ready()?;
    let mut data = vec![ModelCard {
        id: ready.patient_id.clone(),
        object: "model".into(),
        created: ready.loaded_at,
        owned_by: "llmdoctor".into(),
        parent: None,
        description: None,
    }];
    data.extend(ready.registry.list().iter().map(|doctor| ModelCard {
        id: doctor.name().to_string(),
        object: "model".into(),
        created: ready.loaded_at,
        owned_by: "llmdoctor".into(),
        parent: Some(ready.patient_id.clone()),
        description: Some(doctor.manifest.description.clone()),
    }));
    Ok(Json(ModelList {
        object: "list".into(),
        data,
    }))
}

/// Lists the loaded doctors.
#[utoipa::path(
    get,
    path = "/v1/doctors",
    responses(
        (status = 200, body = DoctorList),
        (status = 401, body = ErrorBody),
        (status = 503, description = "Loading", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "doctors"
)]
pub async fn list_doctors(
    State(state): State<AppState>,
    _key: ApiKey,
) -> Result<Json<DoctorList>, ApiError> {
    let ready = state.ready()?;
    Ok(Json(DoctorList {
        object: "list",
        data: ready
            .registry
            .list()
            .iter()
            .map(|d| doctor_card(d))
            .collect(),
    }))
}

/// Loads a doctor from its folder under the doctors directory, or replaces the loaded version.
/// Requests already running keep the version they started with.
#[utoipa::path(
    post,
    path = "/v1/doctors",
    request_body = LoadDoctorRequest,
    responses(
        (status = 200, description = "The loaded doctor", body = DoctorCard),
        (status = 400, description = "Invalid name, folder outside the doctors directory, or a doctor that fails to load", body = ErrorBody),
        (status = 404, description = "No folder of that name in the doctors directory", body = ErrorBody),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 403, description = "No admin key is configured", body = ErrorBody),
        (status = 503, description = "Loading", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "doctors"
)]
pub async fn load_doctor(
    State(state): State<AppState>,
    _admin: AdminKey,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<DoctorCard>, ApiError> {
    let body = body.map_err(|r| body_rejection(r, state.config.max_body_bytes))?;
    let request: LoadDoctorRequest = parse_object(&body, &[&["name"]])?;
    let registry = state.ready()?.registry.clone();
    let name = request.name.clone();
    // Loading reads weights from disk; keep it off the async workers.
    let doctor = tokio::task::spawn_blocking(move || registry.load(&name))
        .await
        .map_err(|err| ApiError::Internal(format!("doctor loading task failed: {err}")))??;
    tracing::info!(doctor = %doctor.name(), version = doctor.version, "doctor loaded by admin request");
    Ok(Json(doctor_card(&doctor)))
}

/// The body of a successful unload.
#[derive(Debug, Serialize, ToSchema)]
pub struct DoctorDeleted {
    /// The doctor's name.
    pub id: String,
    /// Always `doctor`.
    pub object: &'static str,
    /// Always true.
    pub deleted: bool,
}

/// Unloads a doctor. Requests already running keep steering with it until they finish.
#[utoipa::path(
    delete,
    path = "/v1/doctors/{name}",
    params(("name" = String, Path, description = "The doctor's name")),
    responses(
        (status = 200, body = DoctorDeleted),
        (status = 401, description = "Missing or wrong admin key", body = ErrorBody),
        (status = 403, description = "No admin key is configured", body = ErrorBody),
        (status = 404, description = "No loaded doctor has this name", body = ErrorBody),
        (status = 503, description = "Loading", body = ErrorBody),
    ),
    security(("bearer" = [])),
    tag = "doctors"
)]
pub async fn unload_doctor(
    State(state): State<AppState>,
    _admin: AdminKey,
    Path(name): Path<String>,
) -> Result<Json<DoctorDeleted>, ApiError> {
    let doctor = state.ready()?.registry.unload(&name)?;
    tracing::info!(doctor = %doctor.name(), "doctor unloaded by admin request");
    Ok(Json(DoctorDeleted {
        id: name,
        object: "doctor",
        deleted: true,
    }))
}

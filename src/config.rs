//! Settings of `llmdoctor serve`.
//!
//! Every setting comes from, in order of precedence: a command-line flag, an `LLMDOCTOR_*`
//! environment variable, the TOML config file, then the default below. The CLI turns flags and
//! environment variables into one [`RawConfig`], the file gives another, [`RawConfig::or`]
//! layers them, and [`ServeConfig::validate`] applies the defaults and checks ranges. The
//! repository's `config.toml` documents every key with its default.

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::engine::core::DEFAULT_STEERING_STATS_INTERVAL;

/// Default listen address: loopback only, so a fresh install is not exposed to the network.
pub const DEFAULT_HOST: &str = "127.0.0.1";
/// Default TCP port.
pub const DEFAULT_PORT: u16 = 8080;
/// Default folder of doctors, relative to the working directory.
pub const DEFAULT_DOCTORS_DIR: &str = "doctors";
/// Default maximum request body: 4 MiB, far above any prompt that fits a context window.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
/// Default KV-cache budget: 2 GiB.
pub const DEFAULT_KV_CACHE_BYTES: usize = 2 << 30;
/// Default maximum of running requests.
pub const DEFAULT_MAX_NUM_SEQS: usize = 64;
/// Default maximum of waiting requests before new ones get 429.
pub const DEFAULT_MAX_WAITING: usize = 256;
/// Default tokens processed per engine step, prefill and decode together.
pub const DEFAULT_STEP_TOKEN_BUDGET: usize = 512;
/// Default prompt tokens of one request processed per step.
pub const DEFAULT_PREFILL_CHUNK: usize = 256;
/// Default time without an engine-loop iteration, while work is pending, after which
/// `/health` reports 503.
pub const DEFAULT_HEALTH_STALL_TIMEOUT_SECS: f64 = 30.0;
/// Default `max_tokens` of a request that sets none.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Storage of quantised weights in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Quant {
    /// Requantise the one type without a batched CPU kernel (Q2_K) to Q8_0.
    #[default]
    Fast,
    /// Keep every tensor as stored in the file.
    AsStored,
    /// Requantise every block type to Q8_0, 4-bit ones included (for comparisons).
    #[serde(rename = "q8-0")]
    Q8_0,
}

/// Settings as one source gives them; `None` means "not set here".
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Listen address.
    pub host: Option<String>,
    /// Listen port; 0 picks a free port.
    pub port: Option<u16>,
    /// Patient model file (.gguf) or Hugging Face folder.
    pub model: Option<PathBuf>,
    /// Weight handling of quantised models.
    pub quant: Option<Quant>,
    /// Folder with one sub-folder per doctor.
    pub doctors_dir: Option<PathBuf>,
    /// Keys accepted as `Authorization: Bearer <key>` on generation routes.
    pub api_keys: Option<Vec<String>>,
    /// Key for the doctor admin routes.
    pub admin_key: Option<String>,
    /// Origins allowed by CORS; `*` allows any.
    pub cors_allowed_origins: Option<Vec<String>>,
    /// Maximum request body in bytes.
    pub max_body_bytes: Option<usize>,
    /// KV-cache budget in bytes.
    pub kv_cache_bytes: Option<usize>,
    /// Maximum running requests.
    pub max_num_seqs: Option<usize>,
    /// Maximum waiting requests.
    pub max_waiting: Option<usize>,
    /// Tokens per engine step.
    pub step_token_budget: Option<usize>,
    /// Prompt tokens per request per step.
    pub prefill_chunk: Option<usize>,
    /// Seconds without an engine tick, while busy, before `/health` is 503.
    pub health_stall_timeout: Option<f64>,
    /// `max_tokens` of requests that set none.
    pub default_max_tokens: Option<usize>,
    /// The patient's id in `/v1/models` and in responses.
    pub served_model_name: Option<String>,
    /// Seed of the engine's RNG for requests without a `seed`.
    pub seed: Option<u64>,
    /// Interval of the steering statistics: one in every n generated tokens is measured.
    pub steering_stats_interval: Option<usize>,
}

impl RawConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        toml::from_str(&text).map_err(|err| ConfigError::Parse {
            path: path.to_path_buf(),
            message: err.to_string(),
        })
    }

    /// Returns `self` with every unset setting taken from `lower`.
    pub fn or(self, lower: RawConfig) -> RawConfig {
        RawConfig {
            host: self.host.or(lower.host),
            port: self.port.or(lower.port),
            model: self.model.or(lower.model),
            quant: self.quant.or(lower.quant),
            doctors_dir: self.doctors_dir.or(lower.doctors_dir),
            api_keys: self.api_keys.or(lower.api_keys),
            admin_key: self.admin_key.or(lower.admin_key),
            cors_allowed_origins: self.cors_allowed_origins.or(lower.cors_allowed_origins),
            max_body_bytes: self.max_body_bytes.or(lower.max_body_bytes),
            kv_cache_bytes: self.kv_cache_bytes.or(lower.kv_cache_bytes),
            max_num_seqs: self.max_num_seqs.or(lower.max_num_seqs),
            max_waiting: self.max_waiting.or(lower.max_waiting),
            step_token_budget: self.step_token_budget.or(lower.step_token_budget),
            prefill_chunk: self.prefill_chunk.or(lower.prefill_chunk),
            health_stall_timeout: self.health_stall_timeout.or(lower.health_stall_timeout),
            default_max_tokens: self.default_max_tokens.or(lower.default_max_tokens),
            served_model_name: self.served_model_name.or(lower.served_model_name),
            seed: self.seed.or(lower.seed),
            steering_stats_interval: self
                .steering_stats_interval
                .or(lower.steering_stats_interval),
        }
    }
}

/// The CORS policy: the origins allowed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Cors {
    /// No CORS headers (the default): browsers on other origins cannot call the API.
    Off,
    /// Any origin.
    Any,
    /// These origins exactly.
    Origins(Vec<String>),
}

/// Validated settings of the server.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeConfig {
    /// Listen address.
    pub host: IpAddr,
    /// Listen port.
    pub port: u16,
    /// Patient model; `None` means the fetched default patient.
    pub model: Option<PathBuf>,
    /// Weight handling of quantised models.
    pub quant: Quant,
    /// Folder with one sub-folder per doctor.
    pub doctors_dir: PathBuf,
    /// Keys for generation routes; empty means no key is required.
    pub api_keys: Vec<String>,
    /// Key for the admin routes; `None` rejects every admin request.
    pub admin_key: Option<String>,
    /// CORS policy.
    pub cors: Cors,
    /// Maximum request body in bytes.
    pub max_body_bytes: usize,
    /// KV-cache budget in bytes.
    pub kv_cache_bytes: usize,
    /// Maximum running requests.
    pub max_num_seqs: usize,
    /// Maximum waiting requests.
    pub max_waiting: usize,
    /// Tokens per engine step.
    pub step_token_budget: usize,
    /// Prompt tokens per request per step.
    pub prefill_chunk: usize,
    /// Time without an engine tick, while busy, before `/health` is 503.
    pub health_stall_timeout: Duration,
    /// `max_tokens` of requests that set none.
    pub default_max_tokens: usize,
    /// The patient's model id; `None` derives it from the model file name.
    pub served_model_name: Option<String>,
    /// Seed of the engine's RNG for requests without a `seed`.
    pub seed: Option<u64>,
    /// Interval of the steering statistics: one in every n generated tokens of a steered
    /// choice is measured.
    pub steering_stats_interval: NonZeroUsize,
}

/// Errors in the settings. Each names the setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("failed to read the config file `{path}`: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has an unknown key.
    #[error("invalid config file `{path}`: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// A setting is out of range.
    #[error("invalid setting `{setting}`: {message}")]
    Invalid {
        /// The setting's name, as in the config file.
        setting: &'static str,
        /// The problem and the value received.
        message: String,
    },
}

fn positive(setting: &'static str, value: usize) -> Result<usize, ConfigError> {
    if value == 0 {
        return Err(ConfigError::Invalid {
            setting,
            message: "must be at least 1, got 0".into(),
        });
    }
    Ok(value)
}

impl ServeConfig {
    /// Applies defaults and checks every setting.
    pub fn validate(raw: RawConfig) -> Result<Self, ConfigError> {
        let host_text = raw.host.unwrap_or_else(|| DEFAULT_HOST.to_string());
        let host = host_text
            .parse::<IpAddr>()
            .map_err(|_| ConfigError::Invalid {
                setting: "host",
                message: format!("`{host_text}` is not an IP address, e.g. 127.0.0.1 or 0.0.0.0"),
            })?;
        let timeout = raw
            .health_stall_timeout
            .unwrap_or(DEFAULT_HEALTH_STALL_TIMEOUT_SECS);
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(ConfigError::Invalid {
                setting: "health_stall_timeout",
                message: format!("must be a positive number of seconds, got {timeout}"),
            });
        }
        let cors = match raw.cors_allowed_origins {
            None => Cors::Off,
            Some(origins) if origins.is_empty() => Cors::Off,
            Some(origins) if origins.iter().any(|o| o == "*") => Cors::Any,
            Some(origins) => Cors::Origins(origins),
        };
        let api_keys: Vec<String> = raw
            .api_keys
            .unwrap_or_default()
            .into_iter()
            .filter(|k| !k.is_empty())
            .collect();
        Ok(Self {
            host,
            port: raw.port.unwrap_or(DEFAULT_PORT),
            model: raw.model,
            quant: raw.quant.unwrap_or_default(),
            doctors_dir: raw
                .doctors_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DOCTORS_DIR)),
            api_keys,
            admin_key: raw.admin_key.filter(|k| !k.is_empty()),
            cors,
            max_body_bytes: positive(
                "max_body_bytes",
                raw.max_body_bytes.unwrap_or(DEFAULT_MAX_BODY_BYTES),
            )?,
            kv_cache_bytes: positive(
                "kv_cache_bytes",
                raw.kv_cache_bytes.unwrap_or(DEFAULT_KV_CACHE_BYTES),
            )?,
            max_num_seqs: positive(
                "max_num_seqs",
                raw.max_num_seqs.unwrap_or(DEFAULT_MAX_NUM_SEQS),
            )?,
            max_waiting: raw.max_waiting.unwrap_or(DEFAULT_MAX_WAITING),
            step_token_budget: positive(
                "step_token_budget",
                raw.step_token_budget.unwrap_or(DEFAULT_STEP_TOKEN_BUDGET),
            )?,
            prefill_chunk: positive(
                "prefill_chunk",
                raw.prefill_chunk.unwrap_or(DEFAULT_PREFILL_CHUNK),
            )?,
            health_stall_timeout: Duration::from_secs_f64(timeout),
            default_max_tokens: positive(
                "default_max_tokens",
                raw.default_max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            )?,
            served_model_name: raw.served_model_name.filter(|n| !n.is_empty()),
            seed: raw.seed,
            steering_stats_interval: match raw.steering_stats_interval {
                None => DEFAULT_STEERING_STATS_INTERVAL,
                Some(n) => NonZeroUsize::new(n).ok_or_else(|| ConfigError::Invalid {
                    setting: "steering_stats_interval",
                    message: "must be at least 1 (1 measures every token), got 0".into(),
                })?,
            },
        })
    }

    /// Returns how models (the patient and doctors with their own base) are loaded.
    pub fn load_options(&self) -> crate::model::LoadOptions {
        let policy = match self.quant {
            Quant::Fast => crate::model::QuantPolicy::FastTypes,
            Quant::AsStored => crate::model::QuantPolicy::AsStored,
            Quant::Q8_0 => crate::model::QuantPolicy::AllQ8_0,
        };
        crate::model::LoadOptions {
            format: crate::model::WeightFormat::Quantized(policy),
        }
    }

    /// Returns the engine's scheduler limits.
    pub fn scheduler(&self) -> crate::engine::scheduler::SchedulerConfig {
        crate::engine::scheduler::SchedulerConfig {
            kv_budget_bytes: self.kv_cache_bytes,
            max_num_seqs: self.max_num_seqs,
            max_waiting: self.max_waiting,
            step_token_budget: self.step_token_budget,
            prefill_chunk: self.prefill_chunk,
        }
    }

    /// Returns the engine's settings.
    pub fn engine(&self) -> crate::engine::core::EngineConfig {
        crate::engine::core::EngineConfig {
            scheduler: self.scheduler(),
            seed: self.seed,
            steering_stats_interval: self.steering_stats_interval,
        }
    }
}

impl Default for ServeConfig {
    fn default() -> Self {
        // Validating an empty config only applies the constant defaults above, which are in range.
        Self::validate(RawConfig::default()).unwrap_or_else(|err| panic!("{err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_listen_on_loopback_8080() {
        let config = ServeConfig::default();
        assert_eq!(config.host.to_string(), "127.0.0.1");
        assert_eq!(config.port, 8080);
        assert_eq!(config.cors, Cors::Off);
        assert_eq!(config.admin_key, None);
        assert_eq!(config.doctors_dir, PathBuf::from("doctors"));
    }

    #[test]
    fn higher_source_wins_and_lower_fills_gaps() {
        let flags = RawConfig {
            port: Some(9000),
            ..RawConfig::default()
        };
        let file = RawConfig {
            port: Some(7000),
            max_waiting: Some(3),
            ..RawConfig::default()
        };
        let config = ServeConfig::validate(flags.or(file)).unwrap();
        assert_eq!(config.port, 9000);
        assert_eq!(config.max_waiting, 3);
    }

    #[test]
    fn repository_config_file_parses_to_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config.toml");
        let raw = RawConfig::from_file(&path).unwrap();
        assert_eq!(ServeConfig::validate(raw).unwrap(), ServeConfig::default());
    }

    #[test]
    fn quant_names_parse() {
        for (text, quant) in [
            ("fast", Quant::Fast),
            ("as-stored", Quant::AsStored),
            ("q8-0", Quant::Q8_0),
        ] {
            let raw = toml::from_str::<RawConfig>(&format!("quant = \"{text}\"")).unwrap();
            assert_eq!(raw.quant, Some(quant), "{text}");
        }
        let err = toml::from_str::<RawConfig>("quant = \"q4\"").unwrap_err();
        assert!(err.to_string().contains("q8-0"), "{err}");
    }

    #[test]
    fn unknown_key_in_file_is_rejected() {
        let err = toml::from_str::<RawConfig>("prot = 1").unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn zero_step_budget_is_rejected() {
        let raw = RawConfig {
            step_token_budget: Some(0),
            ..RawConfig::default()
        };
        let err = ServeConfig::validate(raw).unwrap_err();
        assert!(err.to_string().contains("step_token_budget"), "{err}");
    }

    #[test]
    fn stats_interval_must_be_positive() {
        let raw = toml::from_str::<RawConfig>("steering_stats_interval = 0").unwrap();
        let err = ServeConfig::validate(raw).unwrap_err();
        assert!(err.to_string().contains("steering_stats_interval"), "{err}");
        let raw = toml::from_str::<RawConfig>("steering_stats_interval = 1").unwrap();
        let config = ServeConfig::validate(raw).unwrap();
        assert_eq!(config.engine().steering_stats_interval, NonZeroUsize::MIN);
    }

    #[test]
    fn star_origin_allows_any() {
        let raw = RawConfig {
            cors_allowed_origins: Some(vec!["*".into()]),
            ..RawConfig::default()
        };
        assert_eq!(ServeConfig::validate(raw).unwrap().cors, Cors::Any);
    }
}

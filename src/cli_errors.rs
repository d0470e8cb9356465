//! How a failed command is told: the error chain once (each OS error appears once, not repeated
//! by every layer that wraps it), then a hint in the command line's own terms. The library's
//! errors say what is wrong; which flag or command fixes it is the binary's to say.

use std::io::{self, Write};

use cac_edge::cache::CacheError;
use cac_edge::doctor::LIBRARY_FIX;
use cac_edge::encode::EncodeError;
use cac_edge::runtime::RuntimeError;
use cac_edge::Error as PipelineError;

/// Tells why the command failed, on stderr whatever the log filter (even `RUST_LOG=off`), and
/// without panicking when stderr cannot be written.
pub(crate) fn report(error: &anyhow::Error) {
    let mut message = format!("error: {}\n", error_chain(error));
    if let Some(hint) = hint(error) {
        message += &format!("hint: {hint}\n");
    }
    let _ = io::stderr().write_all(message.as_bytes());
}

/// "outer: inner: cause", leaving out a cause whose text an outer message already includes
/// (thiserror messages that embed `{source}` and also expose it as the source).
pub(crate) fn error_chain(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if message.contains(&text) {
            continue;
        }
        if !message.is_empty() {
            message.push_str(": ");
        }
        message.push_str(&text);
    }
    message
}

/// What to do about `error`, in terms of this command line, when there is something to say.
pub(crate) fn hint(error: &anyhow::Error) -> Option<String> {
    error.chain().find_map(|cause| {
        if let Some(error) = cause.downcast_ref::<PipelineError>() {
            return pipeline_hint(error);
        }
        #[cfg(feature = "serve")]
        if let Some(cac_edge::serve::ServeError::Model(error)) = cause.downcast_ref::<cac_edge::serve::ServeError>() {
            return pipeline_hint(error);
        }
        if let Some(error) = cause.downcast_ref::<CacheError>() {
            return cache_hint(error);
        }
        if let Some(error) = cause.downcast_ref::<EncodeError>() {
            return encode_hint(error);
        }
        cause.downcast_ref::<RuntimeError>().and_then(runtime_hint)
    })
}

// The library's wrappers are `#[error(transparent)]`, so the wrapped error is not a separate
// link of the chain: each hint looks inside the wrappers of its own type.

fn pipeline_hint(error: &PipelineError) -> Option<String> {
    match error {
        PipelineError::Cache(error) => cache_hint(error),
        PipelineError::Encode(error) => encode_hint(error),
        PipelineError::Runtime(error) => runtime_hint(error),
        _ => None,
    }
}

fn cache_hint(error: &CacheError) -> Option<String> {
    match error {
        // Building a cache opens the text encoders: a missing provider or library is said here.
        CacheError::Encode(error) => encode_hint(error),
        error if error.is_fixed_by_rebuilding() => Some(
            "build the cache with `cac-edge cache build --bundle BUNDLE --classes CLASSES.txt --base BASE.txt --output CACHE` \
             (once per bundle and class list), then pass it with --cache"
                .to_string(),
        ),
        _ => None,
    }
}

fn encode_hint(error: &EncodeError) -> Option<String> {
    match error {
        EncodeError::Runtime(error) => runtime_hint(error),
        _ => None,
    }
}

fn runtime_hint(error: &RuntimeError) -> Option<String> {
    match error {
        RuntimeError::LibraryNotFound { .. } | RuntimeError::LibraryLoad { .. } => Some(LIBRARY_FIX.to_string()),
        RuntimeError::ProviderUnavailable { .. } => Some("use --device cpu or --device auto".to_string()),
        RuntimeError::Options(_) => Some(
            "--tensorrt-fp16, --tensorrt-workspace and --tensorrt-cache need --device tensorrt or auto; \
             --gpu needs --device cuda, tensorrt or auto"
                .to_string(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_os_error_embedded_and_chained_is_said_once() {
        let os_error = io::Error::from(io::ErrorKind::NotFound);
        let cache_error = CacheError::Read { path: "/x/classes.txt".into(), source: os_error };
        let error = anyhow::Error::new(cache_error).context("building the cache /x/c.safetensors");
        let message = error_chain(&error);
        assert_eq!(message.matches("entity not found").count(), 1, "{message}");
        assert!(message.starts_with("building the cache /x/c.safetensors: /x/classes.txt: cannot read"), "{message}");
    }

    #[test]
    fn a_missing_cache_says_how_to_build_one() {
        let error = anyhow::Error::new(PipelineError::Cache(CacheError::Missing { path: "c.safetensors".into() }));
        assert!(hint(&error).unwrap().contains("cac-edge cache build --bundle"));
        let unrelated = anyhow::anyhow!("something else");
        assert_eq!(hint(&unrelated), None);
    }

    #[test]
    fn a_missing_provider_is_hinted_through_every_wrapper() {
        let unavailable = || RuntimeError::ProviderUnavailable {
            provider: "CUDAExecutionProvider",
            library: "x".into(),
            available: "CPU".into(),
        };
        let wrapped = [
            anyhow::Error::new(PipelineError::Encode(EncodeError::Runtime(unavailable()))),
            anyhow::Error::new(CacheError::Encode(EncodeError::Runtime(unavailable()))).context("building the cache c"),
            anyhow::Error::new(unavailable()),
        ];
        for error in wrapped {
            assert_eq!(hint(&error).as_deref(), Some("use --device cpu or --device auto"), "{error:#}");
        }
    }
}

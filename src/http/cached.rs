//! Answers of the query cache ([`crate::query::cache`]) as HTTP sees them:
//! a JSON body ready to send, or the error to answer again.

use std::future::Future;
use std::sync::Arc;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;

use crate::http::error::ApiError;
use crate::query::cache::{self, Answer, CacheKey};

/// What the API's query cache holds.
pub type Cache = cache::QueryCache<CachedAnswer>;

/// A cached answer: a body, or an error shared by every request that reads it.
pub type CachedAnswer = Result<JsonBody, Arc<ApiError>>;

impl Answer for CachedAnswer {
    fn is_failure(&self) -> bool {
        matches!(self, Err(err) if err.status().is_server_error())
    }

    fn weight(&self) -> usize {
        self.as_ref().map_or(64, |body| body.json.len())
    }
}

/// Bytes a JSON body is first given: a 50-entry page fits.
const INITIAL_BODY: usize = 8 * 1024;

/// A JSON answer ready to send, with its `Link: rel="next"` if any.
#[derive(Debug, Clone)]
pub struct JsonBody {
    pub json: Bytes,
    pub link: Option<HeaderValue>,
}

impl JsonBody {
    pub fn new(value: &impl serde::Serialize, link: Option<HeaderValue>) -> Result<Self, ApiError> {
        // Room for a page of entries from the start: a vector grown from
        // empty copies itself a dozen times on the way to a few KiB.
        let mut json = Vec::with_capacity(INITIAL_BODY);
        serde_json::to_writer(&mut json, value).map_err(ApiError::internal)?;
        // Cached bodies keep their buffer: not one four times too large.
        if json.capacity() > 4 * json.len() {
            json.shrink_to_fit();
        }
        Ok(Self {
            json: Bytes::from(json),
            link,
        })
    }
}

impl IntoResponse for &JsonBody {
    fn into_response(self) -> Response {
        let mut response = self.json.clone().into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(link) = &self.link {
            headers.insert(header::LINK, link.clone());
        }
        response
    }
}

/// What a load read: the answer (a 404 is an answer too) and the checkpoint
/// of the projection it was read at.
pub struct Loaded {
    pub answer: Result<JsonBody, ApiError>,
    pub seq: u64,
}

/// The answer for `key`: cached if fresh, else from `load`, run once for all
/// concurrent callers of the same key.
pub async fn get_or_load(
    cache: &Cache,
    key: CacheKey,
    load: impl Future<Output = Result<Loaded, ApiError>> + Send,
) -> Result<JsonBody, ApiError> {
    let load = async move {
        match load.await {
            Ok(loaded) => cache::Loaded {
                answer: loaded.answer.map_err(Arc::new),
                seq: loaded.seq,
            },
            Err(err) => cache::Loaded {
                answer: Err(Arc::new(err)),
                seq: 0,
            },
        }
    };
    cache.get_or_load(key, load).await.map_err(ApiError::Shared)
}

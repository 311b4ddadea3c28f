"""The provider's documented endpoints (``shared/api/seedance-1.0-lite-t2v.md``)."""

DEFAULT_BASE_URL = "https://modellixapi.jpushoa.com"
SUBMIT_PATH = "/api/v1/text-to-video/bytedance/seedance-1.0-lite-t2v/async"
TASK_PATH = "/api/v1/tasks/{task_id}"
MODEL_ID = "seedance-1.0-lite-t2v"
DOCUMENTED_RATE_PER_MIN = 100  # per API key

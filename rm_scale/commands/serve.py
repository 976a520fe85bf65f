"""`rm-scale serve`: start the reward server (rm_scale.scoring.server) on a model folder.

    rm-scale serve --model outputs/run/final [--host 127.0.0.1] [--port 8000] [--max-batch-tokens 16384]
                   [--max-wait-ms 10] [--normalize] [--token-env RM_SCALE_SERVE_TOKEN]

Binds to 127.0.0.1 unless told otherwise. When the environment variable named by --token-env is set, every request but
/health needs ``Authorization: Bearer <its value>``; the token is never printed or logged.
"""

from __future__ import annotations

import os
import sys
from typing import Any

TOKEN_ENV = "RM_SCALE_SERVE_TOKEN"


def run_serve(model: str, *, host: str = "127.0.0.1", port: int = 8000, max_batch_tokens: int = 16384,
              max_wait_ms: float = 10.0, max_request_bytes: int | None = None, max_items: int | None = None,
              normalize: bool = False, dtype: str = "float32", token_env: str = TOKEN_ENV) -> int:
    try:
        import uvicorn
    except ImportError:
        raise ValueError("rm-scale serve needs FastAPI and uvicorn: pip install 'rm_scale[serve]'") from None
    from rm_scale.scoring import RewardScorer  # lazy: imports torch (the command line's --help stays fast)
    from rm_scale.scoring.server import DEFAULT_MAX_ITEMS, DEFAULT_MAX_REQUEST_BYTES, create_app  # lazy, as above

    token = os.environ.get(token_env) or None
    scorer = RewardScorer(model, normalize=normalize, dtype=dtype)  # its rows: the default width (measured)
    app = create_app(scorer, max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms, token=token,
                     max_request_bytes=max_request_bytes or DEFAULT_MAX_REQUEST_BYTES,
                     max_items=max_items or DEFAULT_MAX_ITEMS)
    auth = f"bearer token from ${token_env}" if token else "no token"
    print(f"rm-scale serve: {model} on http://{host}:{port} (POST /get_reward, POST /score, GET /health; {auth}; "
          f"max_length {scorer.max_length}{', normalized' if normalize else ''})", file=sys.stderr, flush=True)
    _warn_public(host, token)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0


def _warn_public(host: str, token: Any) -> None:
    if host not in ("127.0.0.1", "localhost", "::1") and not token:
        print(f"rm-scale serve: warning: listening on {host} without a token: anyone who can reach this port can "
              f"use the model. Set ${TOKEN_ENV} to require a bearer token.", file=sys.stderr, flush=True)

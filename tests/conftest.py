"""The suite runs reconfx strict: a fallback that meets an exception it does not expect raises
it (reconfx.errors.unexpected) instead of quietly taking the longer way."""

import os

os.environ["RECONFX_STRICT"] = "1"

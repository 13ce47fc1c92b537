import os

# No Hub access in tests: fail at once instead of retrying for ~23 s (read at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import os

# No Hub access in tests: fail at once instead of retrying for ~23 s (read at import time).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# `make test` runs pytest on two workers (pytest-xdist, --dist loadfile: each file's tests on one worker, in order,
# its module-scoped fixtures built once). The files are handed out in this order, the longest first, so neither
# worker is left with a long one at the end; the docs site, which reuses the smoke pipeline's runs, comes last
# (commands.smoke_runs_lock keeps the two apart if they meet). Files not listed keep their order in between.
LONGEST_FIRST = ["test_rehearsal", "test_pipeline_smoke", "test_released", "test_gpu_check", "test_distributed",
                 "test_user_errors", "test_cluster_faults", "test_reports_p2", "test_reports_p1"]
LAST = ["test_docs"]


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)} | {name: 1000 + i for i, name in enumerate(LAST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(LONGEST_FIRST)))  # stable: file order within
